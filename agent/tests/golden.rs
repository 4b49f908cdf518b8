//! Golden tests of the control plane, without root: each file under `golden/` holds
//! a script, then the objects and expected writes it names (txtar, as Cilium's
//! load-balancer tests). The script drives one node's agent over a map image as the
//! Kubernetes source would (a Node or Pod change is a full sync, a Service or
//! EndpointSlice change an update of the Services it names), compares each step's
//! writes with the expected ones, and after every step checks that a full sync of
//! the same objects would write nothing and means what a full sync from scratch
//! means. `FERRITE_GOLDEN_UPDATE=1` rewrites the expected writes.
//!
//! Script lines (`#` starts a comment):
//! - `node NAME`, `external-ip-cidr CIDR` and `cluster-cidr CIDR[,CIDR]`: the node
//!   and its limits (before `full`);
//! - `full FILE`: the cluster is FILE's objects; the agent's first full sync;
//! - `apply FILE`: create or replace FILE's objects, and sync;
//! - `delete KIND NAMESPACE/NAME` (`delete Node NAME`): and sync;
//! - `cni NAMESPACE/NAME IP [IP6]`: the CNI plugin wires that pod (its host veth
//!   appears, the plugin writes its endpoint entries, IPv6 too for a dual-stack pod)
//!   before the agent hears of it; then the agent's periodic full resync;
//! - `resync`: a periodic full sync;
//! - `writes FILE`: the last step's writes are FILE's lines;
//! - `skipped FILE`: what the last step left out, and why, is FILE's lines (as the
//!   agent logs them, sorted).
mod support;

use std::{collections::BTreeMap, fs, path::Path};

use ferrite_agent::limits::{ClusterCidrs, Limits};
use support::{describe_sync, render, SimNode};

/// A txtar archive: the leading script and the named files.
struct Archive {
    script: String,
    files: Vec<(String, String)>,
}

fn parse_archive(text: &str) -> Archive {
    let mut script = String::new();
    let mut files: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        let header = line
            .trim_end()
            .strip_prefix("-- ")
            .and_then(|rest| rest.strip_suffix(" --"));
        match (header, files.last_mut()) {
            (Some(name), _) => files.push((name.to_string(), String::new())),
            (None, Some((_, body))) => body.push_str(line),
            (None, None) => script.push_str(line),
        }
    }
    Archive { script, files }
}

fn format_archive(archive: &Archive) -> String {
    let mut out = archive.script.clone();
    for (name, body) in &archive.files {
        out.push_str(&format!("-- {name} --\n{body}"));
    }
    out
}

fn synced<'a>(node: &'a mut Option<SimNode>, step: &str) -> Result<&'a mut SimNode, String> {
    node.as_mut().ok_or(format!("{step}: no `full` yet"))
}

/// Run one golden file; with `update`, write the writes seen as the expected ones.
fn run(path: &Path, update: bool) -> Result<(), String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut archive = parse_archive(&text);
    let files: BTreeMap<String, String> = archive.files.iter().cloned().collect();
    let file = |name: &str| {
        files
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no file {name}"))
    };
    let (mut node_name, mut limits) = ("node-1".to_string(), Limits::default());
    let mut node: Option<SimNode> = None;
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut mismatches = Vec::new();
    for (number, line) in archive.script.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let step = format!("{}:{} `{line}`", path.display(), number + 1);
        match words.as_slice() {
            [] => continue,
            ["node", name] => {
                node_name = name.to_string();
                continue;
            }
            ["external-ip-cidr", cidr] => {
                match cidr.parse().map_err(|e| format!("{step}: {e}"))? {
                    ipnet::IpNet::V4(v4) => limits.external_ip_cidrs.push(v4),
                    ipnet::IpNet::V6(v6) => limits.external_ip_cidrs6.push(v6),
                }
                continue;
            }
            ["cluster-cidr", cidrs] => {
                let cidrs = ClusterCidrs::parse(cidrs).map_err(|e| format!("{step}: {e}"))?;
                (limits.cluster_cidr, limits.cluster_cidr6) = (cidrs.v4, cidrs.v6);
                continue;
            }
            ["full", name] => {
                let mut fresh = SimNode::new(&node_name, limits.clone());
                fresh.objects = ferrite_agent::objects_yaml::parse_objects(&file(name)?)
                    .map_err(|e| format!("{step}: {e}"))?
                    .0;
                fresh.full_sync();
                node = Some(fresh);
            }
            ["apply", name] => synced(&mut node, &step)?.apply(&file(name)?),
            ["delete", kind, name] => {
                let (namespace, name) = name.split_once('/').unwrap_or(("", name));
                synced(&mut node, &step)?.delete(kind, namespace, name);
            }
            ["resync"] => synced(&mut node, &step)?.full_sync(),
            ["cni", pod, ip, ip6 @ ..] if ip6.len() <= 1 => {
                let (namespace, name) = pod
                    .split_once('/')
                    .ok_or(format!("{step}: NAMESPACE/NAME"))?;
                let ip = ip.parse().map_err(|e| format!("{step}: {e}"))?;
                let ip6 = ip6
                    .first()
                    .map(|ip6| ip6.parse())
                    .transpose()
                    .map_err(|e| format!("{step}: {e}"))?;
                synced(&mut node, &step)?.cni_wire(namespace, name, ip, ip6);
            }
            ["writes", name] => {
                let node = synced(&mut node, &step)?;
                let mut actual = describe_sync(&node.last_sync);
                actual.push('\n');
                for op in &node.last_ops {
                    actual.push_str(&render(op));
                    actual.push('\n');
                }
                let expected = file(name).unwrap_or_default();
                if actual != expected {
                    mismatches.push(format!(
                        "{step}: writes differ\n--- expected\n{expected}--- actual\n{actual}"
                    ));
                }
                seen.push((name.to_string(), actual));
                continue;
            }
            ["skipped", name] => {
                let node = synced(&mut node, &step)?;
                let mut skipped = node.last_skipped.clone();
                skipped.sort();
                let actual: String = skipped.iter().map(|s| format!("{s}\n")).collect();
                let expected = file(name).unwrap_or_default();
                if actual != expected {
                    mismatches.push(format!(
                        "{step}: skipped differ\n--- expected\n{expected}--- actual\n{actual}"
                    ));
                }
                seen.push((name.to_string(), actual));
                continue;
            }
            _ => return Err(format!("{step}: unknown script line")),
        }
        synced(&mut node, &step)?.check_incremental_means_full(&step);
    }
    if update {
        // The objects as they were, then the writes in script order.
        archive
            .files
            .retain(|(name, _)| !seen.iter().any(|(seen, _)| seen == name));
        archive.files.extend(seen);
        fs::write(path, format_archive(&archive)).map_err(|e| e.to_string())?;
        return Ok(());
    }
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(mismatches.join("\n"))
    }
}

#[test]
fn every_golden_file_writes_what_it_says() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("FERRITE_GOLDEN_UPDATE").is_some();
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .expect("tests/golden")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "txtar"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 5, "golden files: {paths:?}");
    let failures: Vec<String> = paths
        .iter()
        .filter_map(|path| run(path, update).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn an_archive_reads_back_as_written() {
    let text = "node a\nfull x.yaml\n-- x.yaml --\nkind: List\n-- w.txt --\n# full sync\n";
    let archive = parse_archive(text);
    assert_eq!(archive.script, "node a\nfull x.yaml\n");
    assert_eq!(archive.files.len(), 2);
    assert_eq!(format_archive(&archive), text);
}
