//! The built datapath object against `ferrite_common`, the contract it is built
//! from: a map renamed, added or resized on one side only fails here. Reads the
//! object file only (no root).
use std::collections::BTreeSet;

use anyhow::{Context, Result};
use ferrite_common::{capacity, map_names};

fn object() -> Result<aya_obj::Object> {
    let path = ferrite_tests::lab::bpf_object();
    let bytes = std::fs::read(&path)
        .with_context(|| format!("reading {} (cargo xtask build-ebpf)", path.display()))?;
    aya_obj::Object::parse(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// The object's BTF maps (the `.maps` section), without the sections of its globals
/// and aya-log's own map, which the contract does not name.
fn declared_maps(object: &aya_obj::Object) -> BTreeSet<&str> {
    object
        .maps
        .keys()
        .map(String::as_str)
        .filter(|name| !name.starts_with('.') && *name != "AYA_LOGS")
        .collect()
}

#[test]
fn the_objects_maps_are_exactly_the_contracts_map_names() -> Result<()> {
    let object = object()?;
    let contract: BTreeSet<&str> = map_names::ALL.into_iter().collect();
    assert_eq!(contract.len(), map_names::ALL.len(), "a name listed twice");
    assert_eq!(declared_maps(&object), contract);
    Ok(())
}

#[test]
fn each_sized_map_is_declared_with_its_default_capacity() -> Result<()> {
    let object = object()?;
    for (name, entries) in capacity::DEFAULTS {
        let map = object
            .maps
            .get(name)
            .with_context(|| format!("no map {name}"))?;
        assert_eq!(map.max_entries(), entries, "{name}");
    }
    Ok(())
}
