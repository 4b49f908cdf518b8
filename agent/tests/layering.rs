//! The agent's modules depend one way, in the tiers `src/lib.rs` states: every
//! `crate::` path outside unit tests names a module of an earlier tier. So no module
//! imports one that imports it back, and the stated order is the real one.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The tiers of `lib.rs`'s docs: `//! N. ` lines (and their continuations), each
/// naming modules in backticks.
fn tiers(lib: &str) -> Vec<BTreeSet<String>> {
    let mut tiers: Vec<BTreeSet<String>> = Vec::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//!")) {
        let text = line.trim_start();
        let starts_tier = text
            .split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if starts_tier {
            tiers.push(BTreeSet::new());
        } else if !line.starts_with("    ") || text.is_empty() {
            if !tiers.is_empty() && text.is_empty() {
                break;
            }
            continue;
        }
        let tier = tiers.last_mut().expect("a tier");
        let mut parts = text.split('`');
        while let (Some(_), Some(name)) = (parts.next(), parts.next()) {
            tier.insert(name.to_string());
        }
    }
    tiers
}

/// The source files of module `name`: `name.rs`, or every file under `name/`.
fn files_of(name: &str) -> Vec<PathBuf> {
    let file = Path::new(SRC).join(format!("{name}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut files = Vec::new();
    let mut dirs = vec![Path::new(SRC).join(name)];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("module directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The first path segment of every `crate::` path in `code` (`crate::a::b`,
/// `crate::{a, b::{c, d}}`).
fn crate_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (0, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// A file's code without its unit tests (the `mod tests` at its end).
fn without_tests(code: &str) -> &str {
    code.find("#[cfg(test)]\nmod tests")
        .map_or(code, |i| &code[..i])
}

#[test]
fn every_module_uses_only_modules_of_earlier_tiers() {
    let lib = fs::read_to_string(Path::new(SRC).join("lib.rs")).expect("lib.rs");
    let tiers = tiers(&lib);
    assert!(tiers.len() >= 5, "tiers read from lib.rs: {tiers:?}");
    let tier_of: BTreeMap<&str, usize> = tiers
        .iter()
        .enumerate()
        .flat_map(|(i, names)| names.iter().map(move |n| (n.as_str(), i)))
        .collect();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    let listed: BTreeSet<String> = tier_of.keys().map(|s| s.to_string()).collect();
    assert_eq!(
        listed, declared,
        "lib.rs's tiers must list every module once"
    );

    let mut wrong = Vec::new();
    for (module, tier) in &tier_of {
        for file in files_of(module) {
            // Unit tests, inline or in a `tests.rs` of their own, may look up.
            if file.ends_with("test_support.rs") || file.ends_with("tests.rs") {
                continue;
            }
            let code = fs::read_to_string(&file).expect("source");
            for used in crate_modules(without_tests(&code)) {
                match tier_of.get(used.as_str()) {
                    Some(t) if t < tier => {}
                    Some(_) if used == *module => {}
                    Some(t) => wrong.push(format!(
                        "{} ({module}, tier {}) uses `{used}` (tier {})",
                        file.display(),
                        tier + 1,
                        t + 1
                    )),
                    None => {}
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn crate_paths_are_read_in_every_form() {
    let code = "use crate::{a, b::c, d::{e, f}};\nlet x = crate::g::h();\nuse crate::{\n    i,\n    j::{k, l},\n};";
    let found: Vec<String> = crate_modules(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "d", "g", "i", "j"]);
}
