//! The purge of a Service change's ended flows (`ferrite_purge`, run in the kernel
//! with BPF_PROG_TEST_RUN) against the userspace purge it replaces: on the same
//! table, both delete exactly the entries (forward and reply) and affinity pins of
//! removed backends and of ended Service-backend pairs, and nothing else. Needs root.
use std::collections::BTreeSet;

use anyhow::{Context, Result};
use ferrite_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, AFFINITY_CLIENT_IP, CT_FLAG_REPLY,
    CT_FLAG_VIA_STACK, PROTO_TCP,
};
use ferrite_tests::testbed::Testbed;

// Rev-NAT indexes as u8: they widen into whatever width the entries store.
const VIP_INDEX: u8 = 7;
const OTHER_VIP_INDEX: u8 = 8;

fn key(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> CtKey {
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    }
}

/// The two entries the datapath records for a client's flow to a frontend balanced
/// to backend `backend_id` (10.244.1.<id>:8080), as it records them: the forward
/// entry under the client's tuple, the reply entry under the backend's.
fn flow(client_port: u16, rev_nat_index: u8, backend_id: u32) -> [(CtKey, CtValue); 2] {
    let client = [10, 244, 0, 2];
    let vip = [10, 96, 0, rev_nat_index];
    let backend = [10, 244, 1, backend_id as u8];
    let value = CtValue {
        backend_id,
        rev_nat_index: rev_nat_index.into(),
        backend_address: backend,
        backend_port: 8080,
        ..CtValue::default()
    };
    [
        (key(client, client_port, vip, 80), value),
        (
            key(backend, 8080, client, client_port),
            CtValue {
                flags: CT_FLAG_REPLY,
                nat_address: client,
                nat_port: client_port,
                ..value
            },
        ),
    ]
}

fn pin(client: u8, rev_nat_index: u8, backend_id: u32) -> (AffinityKey, AffinityValue) {
    (
        AffinityKey {
            rev_nat_index: rev_nat_index.into(),
            client_kind: AFFINITY_CLIENT_IP,
            client: [10, 244, 0, client],
            ..AffinityKey::default()
        },
        AffinityValue {
            backend_id,
            ..AffinityValue::default()
        },
    )
}

/// The table before: flows and pins of backends 1, 2 and 3 behind frontend 7, of
/// backend 3 behind frontend 8 too, and a flow the stack forwarded (no backend id).
/// Backend 2 is removed; backend 3 stops serving frontend 7 only.
struct Table {
    flows: Vec<(CtKey, CtValue)>,
    pins: Vec<(AffinityKey, AffinityValue)>,
}

fn table() -> Table {
    let mut flows: Vec<(CtKey, CtValue)> = [
        flow(40_001, VIP_INDEX, 1),
        flow(40_002, VIP_INDEX, 2),
        flow(40_003, VIP_INDEX, 2),
        flow(40_004, VIP_INDEX, 3),
        flow(40_005, OTHER_VIP_INDEX, 3),
        flow(40_006, OTHER_VIP_INDEX, 1),
    ]
    .concat();
    flows.push((
        key([10, 244, 1, 9], 8080, [10, 244, 0, 2], 40_007),
        CtValue {
            flags: CT_FLAG_VIA_STACK,
            ..CtValue::default()
        },
    ));
    let pins = vec![
        pin(2, VIP_INDEX, 1),
        pin(3, VIP_INDEX, 2),
        pin(4, VIP_INDEX, 3),
        pin(5, OTHER_VIP_INDEX, 3),
    ];
    Table { flows, pins }
}

fn removed_backends() -> BTreeSet<u32> {
    [2].into()
}

fn ended_pairs() -> BTreeSet<(u32, u32)> {
    [(VIP_INDEX.into(), 3)].into()
}

/// What stays: every entry whose own backend and frontend were not ended.
fn kept(table: &Table) -> (BTreeSet<CtKey>, BTreeSet<AffinityKey>) {
    fn widen(index: impl Into<u32>) -> u32 {
        index.into()
    }
    let ended = |index: u32, backend: u32| {
        removed_backends().contains(&backend)
            || ended_pairs()
                .iter()
                .any(|(i, b)| widen(*i) == index && *b == backend)
    };
    (
        table
            .flows
            .iter()
            .filter(|(_, v)| !ended(widen(v.rev_nat_index), v.backend_id))
            .map(|(k, _)| *k)
            .collect(),
        table
            .pins
            .iter()
            .filter(|(k, v)| !ended(widen(k.rev_nat_index), v.backend_id))
            .map(|(k, _)| *k)
            .collect(),
    )
}

fn fill(bed: &mut Testbed, table: &Table) -> Result<()> {
    let maps = bed.node_maps();
    for (key, value) in &table.flows {
        maps.conntrack.insert(key, value, 0)?;
    }
    for (key, value) in &table.pins {
        maps.affinity.insert(key, value, 0)?;
    }
    Ok(())
}

fn held(bed: &mut Testbed) -> Result<(BTreeSet<CtKey>, BTreeSet<AffinityKey>)> {
    let maps = bed.node_maps();
    let flows = maps
        .conntrack_entries()?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let pins = maps
        .affinity
        .keys()
        .collect::<Result<_, _>>()
        .context("reading ferrite_affin")?;
    Ok((flows, pins))
}

#[test]
fn the_kernel_purge_deletes_exactly_the_ended_flows_both_entries_and_their_pins() -> Result<()> {
    let table = table();
    let mut bed = Testbed::load()?;
    fill(&mut bed, &table)?;
    let (flows_before, pins_before) = held(&mut bed)?;
    assert_eq!(pins_before.len(), table.pins.len());
    assert_eq!(flows_before.len(), table.flows.len());
    let counts = bed
        .node_maps()
        .purge_conntrack_in_kernel(&removed_backends(), &ended_pairs())?
        .context("the test bed runs the purge program")?;
    let (want_flows, want_pins) = kept(&table);
    // Backend 2's two flows and backend 3's flow behind frontend 7: six entries;
    // two pins.
    assert_eq!(flows_before.len() - want_flows.len(), 6);
    assert_eq!(counts.conntrack, 6);
    assert_eq!(counts.affinity, 2);
    assert_eq!(held(&mut bed)?, (want_flows, want_pins));
    // Nothing stays in the purge maps to purge a later backend reusing an id.
    let again = bed
        .node_maps()
        .purge_conntrack_in_kernel(&BTreeSet::new(), &BTreeSet::new())?
        .context("runs")?;
    assert_eq!((again.conntrack, again.affinity), (0, 0));
    Ok(())
}

#[test]
fn the_kernel_purge_and_the_userspace_purge_leave_the_same_table() -> Result<()> {
    let table = table();
    let mut in_kernel = Testbed::load()?;
    fill(&mut in_kernel, &table)?;
    // (`purge_conntrack` itself would read a table this small out to userspace.)
    let purged_in_kernel = in_kernel
        .node_maps()
        .purge_conntrack_in_kernel(&removed_backends(), &ended_pairs())?
        .context("the test bed runs the purge program")?
        .conntrack as usize;
    let mut in_userspace = Testbed::load()?;
    fill(&mut in_userspace, &table)?;
    in_userspace.node_maps().set_purge_program(None);
    let purged_in_userspace = in_userspace
        .node_maps()
        .purge_conntrack(&removed_backends(), &ended_pairs())?;
    assert_eq!(purged_in_kernel, purged_in_userspace);
    assert_eq!(held(&mut in_kernel)?, held(&mut in_userspace)?);
    assert_eq!(held(&mut in_kernel)?, kept(&table));
    Ok(())
}
