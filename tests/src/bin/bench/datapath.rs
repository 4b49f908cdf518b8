//! `cargo xtask bench datapath`: ns/packet (BPF_PROG_TEST_RUN) of every per-packet
//! path a real packet takes, each measured right before its baseline on the same
//! frames in the same round (median of rounds; ratio = path / baseline of the run):
//! - established: pod -> pod on this node (redirect_peer, MACs rewritten) and to
//!   another node (overlay: remote CIDR route, MACs, tunnel key, redirect to the
//!   VXLAN device); pod -> ClusterIP with a local and a remote backend (80 -> 8080:
//!   DNAT with both L4 checksum fixes); replies reverse-NATed on the backend's veth
//!   (`ferrite_from_pod`) and arriving over the overlay (`ferrite_from_overlay`);
//!   NodePort in XDP (`ferrite_from_world`) to a local backend and SNATed to a
//!   remote one. One frame, repeat = WARM_REPEAT. The kernel re-runs the program on
//!   the packet the previous pass left, so the bench node (tests/src/bench_node.rs)
//!   sets each path up so that its output is again a packet of the same path (pairs
//!   of Services that are each other's backend; for XDP, a conntrack entry
//!   translating the NodePort flow's output back). Counters each pass bumps once are
//!   checked after every measurement: each pass is a full pass of the named path.
//! - new flows: pod -> ClusterIP (backend selection, both conntrack inserts, DNAT,
//!   delivery) and NodePort in XDP (Maglev, both inserts, DNAT; for the remote
//!   backend also a SNAT port claimed with BPF_NOEXIST), NEW_FLOWS distinct 5-tuples
//!   (distinct client pods and ports, or world addresses), each run once (repeat =
//!   1, so the kernel's per-run timer overhead is in the baseline too). Conntrack is
//!   cleared of the round's flows after each measurement (2 x NEW_FLOWS entries; the
//!   map holds 262,144), so every round's packets are new flows again: checked with
//!   the new-flow counters. One unmeasured round per size warms caches and the
//!   per-(Service, backend) counters, which exist once per pair, not per flow.
//! - with 1, 10,000 and 100,000 ClusterIP Services loaded (two backends each), new
//!   ClusterIP flows spread over all of them. Established flows never look up a
//!   Service (conntrack holds the backend): flat by construction, measured once.
//!
//! - the floors: each established path next to its own floor (datapath-ebpf's
//!   `floor`, never attached), only the work any datapath must do for that path's
//!   packet (the lookups it cannot skip, the rewrites, the delivery), checked to
//!   leave the same frame and verdict as the path: what the path costs beyond the
//!   work itself (target: <= its floor + 30 ns).
//!
//! - both families: the paths IPv6 has (`ferrite_tests::bench_families`: pod -> pod
//!   on the node and to the other node, from the overlay to a pod), IPv6 next to its
//!   IPv4 twin in the same rounds, both in test runs of FAMILY_REPEAT passes (IPv6
//!   delivery decrements the hop limit); ratio = IPv6 / IPv4 (target: <= 1.15x).
//!
//! - the drop path: a pod's frame from an address that is not its own
//!   (`drop_spoofed`), with nobody listening (`ferrite_monitor` clear: one array
//!   lookup more than before monitors existed) and with a monitor listening for
//!   drops (the event written to `ferrite_events`). DROP_REPEAT passes per run, fewer
//!   than the ring holds; the ring is drained after each run and checked to hold one
//!   event per pass. Printed last.
//!
//! Baselines: `ferrite_noop` (TC), `ferrite_noop_xdp` (XDP); `ferrite_from_overlay`
//! runs behind a shim that gives the packet tunnel metadata (a test run has none)
//! and tail-calls it, so its baseline is the same shim tail-calling `ferrite_noop`.
//! The BPF instruction count of every program is printed from the object
//! (llvm-objdump) and after loading (the verifier's translated length).
use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{ensure, Context, Result};
use ferrite_common::{monitor, program_names, stat};
use ferrite_tests::{
    bench_families::{Family, FamilyPath, FAMILY_REPEAT, HOP_LIMIT},
    bench_node::{BenchNode, Established, Hook, NewFlow},
    frames,
    lab::bpf_object,
    testbed::TC_ACT_SHOT,
};

use crate::median;

const SIZES: [u32; 3] = [1, 10_000, 100_000];
const ROUNDS: usize = 7;
const WARM_REPEAT: u32 = 1_000_000;
const NEW_FLOWS: u32 = 4_096;
/// What an established path may cost over its floor.
const FLOOR_TARGET_NS: f64 = 30.0;
/// Test runs of FAMILY_REPEAT passes per measurement of a path in one family.
const FAMILY_RUNS: u32 = 2_000;
/// What an IPv6 path may cost next to its IPv4 twin.
const FAMILY_TARGET: f64 = 1.15;
/// Drops per run: half of what `ferrite_events` holds. Each event takes its size plus
/// the ring's 8-byte record header, and the kernel never lets a reservation fill the
/// ring whole (4,096 events of 64 bytes in 256 KiB left the last one unwritten).
const DROP_REPEAT: u32 =
    monitor::RING_BYTES / (core::mem::size_of::<ferrite_common::MonitorEvent>() as u32 + 8) / 2;

/// Sum of `counters` over CPUs.
fn counts(node: &BenchNode, counters: &[u32]) -> Result<Vec<u64>> {
    counters.iter().map(|c| node.bed.counter(*c)).collect()
}

/// Check that `counters` moved by exactly `by` since `before`.
fn moved(node: &BenchNode, counters: &[u32], before: &[u64], by: u64, what: &str) -> Result<()> {
    for (counter, before) in counters.iter().zip(before) {
        let now = node.bed.counter(*counter)?;
        ensure!(
            now - before == by,
            "{what}: {} moved by {} instead of {by}: not every pass was a full pass ({:?})",
            stat::NAMES[*counter as usize],
            now - before,
            node.bed.drops()?
        );
    }
    Ok(())
}

/// ns per pass of `path` (repeat = WARM_REPEAT), every pass checked by counters.
fn established(node: &BenchNode, path: Established) -> Result<f64> {
    let before = counts(node, path.counters())?;
    let frame = path.frame();
    let (out, duration) = node.run(path.hook(), &frame, WARM_REPEAT)?;
    ensure!(
        out.verdict == path.hook().forwarded(),
        "{}: verdict {}",
        path.label(),
        out.verdict
    );
    moved(
        node,
        path.counters(),
        &before,
        WARM_REPEAT as u64,
        path.label(),
    )?;
    Ok(duration.as_nanos() as f64)
}

/// Check that one pass of `path`'s floor leaves the frame and verdict the path leaves:
/// a floor doing less than the path must would not measure the same work.
fn check_floor(node: &BenchNode, path: Established) -> Result<()> {
    let frame = path.frame();
    let (datapath, _) = node.run(path.hook(), &frame, 1)?;
    let (floor, _) = node.run_floor(path, &frame, 1)?;
    ensure!(
        floor.verdict == datapath.verdict && floor.frame == datapath.frame,
        "{}: {} left another frame than {}",
        path.label(),
        path.floor(),
        path.hook().program()
    );
    Ok(())
}

/// ns per pass of `path`'s floor (repeat = WARM_REPEAT).
fn floor(node: &BenchNode, path: Established) -> Result<f64> {
    let (out, duration) = node.run_floor(path, &path.frame(), WARM_REPEAT)?;
    ensure!(
        out.verdict == path.hook().forwarded(),
        "{}: verdict {}",
        path.floor(),
        out.verdict
    );
    Ok(duration.as_nanos() as f64)
}

fn established_baseline(node: &BenchNode, path: Established) -> Result<f64> {
    let (_, duration) = node.run_noop(path.hook(), &path.frame(), WARM_REPEAT)?;
    Ok(duration.as_nanos() as f64)
}

/// Mean ns per run over `frames`, one run each, of the path or its baseline.
fn per_frame(node: &BenchNode, hook: Hook, frames: &[Vec<u8>], baseline: bool) -> Result<f64> {
    let mut total = std::time::Duration::ZERO;
    for frame in frames {
        let (out, duration) = if baseline {
            node.run_noop(hook, frame, 1)?
        } else {
            node.run(hook, frame, 1)?
        };
        ensure!(
            baseline || out.verdict == hook.forwarded(),
            "new flow: verdict {}",
            out.verdict
        );
        total += duration;
    }
    Ok(total.as_nanos() as f64 / frames.len() as f64)
}

/// One measurement of new flows: every frame a new flow (checked), then cleared.
fn new_flows(node: &mut BenchNode, path: NewFlow, frames: &[Vec<u8>]) -> Result<f64> {
    let before = counts(node, path.counters())?;
    let ns = per_frame(node, path.hook(), frames, false)?;
    moved(
        node,
        path.counters(),
        &before,
        frames.len() as u64,
        path.label(),
    )?;
    let removed = node.clear_new_flows()?;
    ensure!(
        removed == 2 * frames.len(),
        "{}: {removed} conntrack entries to clear, expected {}",
        path.label(),
        2 * frames.len()
    );
    Ok(ns)
}

/// ns per pass of a spoofed pod frame (dropped), with `ferrite_monitor` set to
/// `wants` (0: left clear, as it is); every pass checked to be counted and, with
/// drops wanted, reported.
fn spoofed_drop(node: &mut BenchNode, frame: &[u8], wants: u32) -> Result<f64> {
    if wants == 0 {
        return spoofed_drop_run(node, frame);
    }
    node.bed.set_monitor(wants)?;
    let ns = spoofed_drop_run(node, frame)?;
    let events = node.bed.take_events()?.len();
    ensure!(
        events == DROP_REPEAT as usize,
        "spoofed: {events} events for {DROP_REPEAT} drops"
    );
    node.bed.set_monitor(0)?;
    Ok(ns)
}

fn spoofed_drop_run(node: &BenchNode, frame: &[u8]) -> Result<f64> {
    let before = node.bed.counter(stat::DROP_SPOOFED)?;
    let (out, duration) = node.run(Hook::FromPod, frame, DROP_REPEAT)?;
    ensure!(
        out.verdict == TC_ACT_SHOT,
        "spoofed: verdict {}",
        out.verdict
    );
    let counted = node.bed.counter(stat::DROP_SPOOFED)? - before;
    ensure!(
        counted == DROP_REPEAT as u64,
        "spoofed: {counted} drops counted"
    );
    Ok(duration.as_nanos() as f64)
}

/// The drop path with and without a monitor listening (see the module's doc).
fn drops(node: &mut BenchNode) -> Result<()> {
    use std::net::{Ipv4Addr, SocketAddrV4};
    let stranger = SocketAddrV4::new(Ipv4Addr::new(10, 244, 250, 250), 40000);
    let frame = frames::tcp_syn(
        stranger,
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80),
        b"",
    );
    println!(
        "\nThe drop path: a pod's frame from an address not its own, repeat {DROP_REPEAT} (fewer than"
    );
    println!("the event ring holds; drained and checked after each run).\n");
    println!(
        "{:<36} {:<22} {:>8} {:>9} {:>8} {:>7}",
        "path", "program", "ns/pkt", "baseline", "+ns", "ratio"
    );
    // One row at a time: an object from before monitors existed gives the first.
    for (label, wants) in [
        ("drop_spoofed, no monitor", 0),
        ("drop_spoofed, monitor listening", monitor::WANT_DROPS),
    ] {
        let mut samples: [Vec<f64>; 2] = Default::default();
        for _ in 0..ROUNDS {
            samples[0].push(spoofed_drop(node, &frame, wants)?);
            let (_, base) = node.run_noop(Hook::FromPod, &frame, DROP_REPEAT)?;
            samples[1].push(base.as_nanos() as f64);
        }
        let [ns, base] = samples.map(median);
        println!(
            "{label:<36} {:<22} {ns:>8.1} {base:>9.1} {:>+8.1} {:>6.2}x",
            Hook::FromPod.program(),
            ns - base,
            ns / base
        );
    }
    Ok(())
}

/// Instructions per function symbol of the object, from `llvm-objdump -d` (a
/// 64-bit immediate load counts as the two instructions it takes).
fn object_instructions(object: &Path) -> Result<BTreeMap<String, usize>> {
    let tool = [
        "llvm-objdump-22",
        "/usr/lib/llvm-22/bin/llvm-objdump",
        "llvm-objdump",
    ]
    .into_iter()
    .find(|t| Command::new(t).arg("--version").output().is_ok())
    .context("no llvm-objdump")?;
    let out = Command::new(tool).arg("-d").arg(object).output()?;
    ensure!(out.status.success(), "llvm-objdump failed");
    let mut counts = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, name)| name.to_string())
        {
            current = Some(name);
            continue;
        }
        // "      12:	b7 01 00 00 00 00 00 00	r1 = 0x0": 8 bytes per instruction slot.
        let Some((offset, rest)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        if let (Some(name), true) = (&current, offset.chars().all(|c| c.is_ascii_hexdigit())) {
            let bytes = rest
                .split('\t')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .count();
            *counts.entry(name.clone()).or_insert(0) += bytes.max(8) / 8;
        }
    }
    Ok(counts)
}

/// A Rust-mangled symbol's item name (`..16ferrite_datapath8log_drop..` ->
/// `log_drop`), others as they are.
fn readable(symbol: &str) -> String {
    let Some((_, rest)) = symbol.split_once("16ferrite_datapath") else {
        return symbol.to_string();
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    match digits.parse::<usize>() {
        Ok(len) if rest.len() >= digits.len() + len => {
            format!("{} (closure)", &rest[digits.len()..digits.len() + len])
        }
        _ => symbol.to_string(),
    }
}

fn print_instructions(node: &BenchNode) -> Result<()> {
    let object = bpf_object();
    let counts = object_instructions(&object)?;
    println!(
        "BPF instructions per program: object (llvm-objdump -d {}), loaded (xlated, after the verifier)\n",
        object.display()
    );
    println!("{:<24} {:>8} {:>8}", "program", "object", "loaded");
    for (name, count) in counts.iter().filter(|(n, _)| n.starts_with("ferrite_")) {
        let loaded = node
            .bed
            .xlated_instructions(name)
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "-".into());
        println!("{name:<24} {count:>8} {loaded:>8}");
    }
    let others: Vec<String> = counts
        .iter()
        .filter(|(n, _)| !n.starts_with("ferrite_"))
        .map(|(n, c)| format!("{} {c}", readable(n)))
        .collect();
    if !others.is_empty() {
        println!("other functions in the object: {}", others.join(", "));
    }
    println!("(loaded: '-' for programs the test bed does not load; the cgroup hooks)\n");
    Ok(())
}

pub fn bench() -> Result<()> {
    let mut node = BenchNode::new()?;
    println!("Datapath per packet: BPF_PROG_TEST_RUN, 54-byte TCP frames, the bench node of");
    println!(
        "tests/src/bench_node.rs (the frames tests/tests/bench_paths.rs checks byte for byte);"
    );
    println!(
        "median of {ROUNDS} rounds, each measurement followed by its baseline on the same frames\n"
    );
    print_instructions(&node)?;

    println!("Established flows: one frame, repeat {WARM_REPEAT}, every pass a full pass (checked by counters).");
    println!(
        "Flat in the number of Services by construction (no Service lookup: conntrack holds the"
    );
    println!(
        "backend); measured with {} ClusterIP Service loaded.\n",
        node.services()
    );
    println!(
        "{:<36} {:<22} {:>8} {:>9} {:>8} {:>7} {:>9} {:>11}",
        "path", "program", "ns/pkt", "baseline", "+ns", "ratio", "floor +ns", "over floor"
    );
    for path in Established::ALL {
        check_floor(&node, path)?;
    }
    // Per path: the path, its baseline, its floor.
    let mut samples: Vec<[Vec<f64>; 3]> = vec![Default::default(); Established::ALL.len()];
    for _ in 0..ROUNDS {
        for (i, path) in Established::ALL.into_iter().enumerate() {
            samples[i][0].push(established(&node, path)?);
            samples[i][1].push(established_baseline(&node, path)?);
            samples[i][2].push(floor(&node, path)?);
        }
    }
    let mut missed = Vec::new();
    for (path, [ns, base, floor]) in Established::ALL.into_iter().zip(&samples) {
        let [ns, base, floor] = [ns, base, floor].map(|s| median(s.clone()));
        let over = ns - floor;
        if over > FLOOR_TARGET_NS {
            missed.push(path.label());
        }
        println!(
            "{:<36} {:<22} {ns:>8.1} {base:>9.1} {:>+8.1} {:>6.2}x {:>+9.1} {over:>+11.1}",
            path.label(),
            path.hook().program(),
            ns - base,
            ns / base,
            floor - base
        );
    }
    println!(
        "baselines: {} (TC), {} (XDP); from the overlay: the tunnel-key shim + tail call into {}",
        Hook::FromPod.noop(),
        Hook::FromWorld.noop(),
        Hook::FromPod.noop()
    );
    println!("\nfloors (each checked to leave the path's frame and verdict):");
    for path in Established::ALL {
        println!(
            "  {:<36} {:<30} {}",
            path.label(),
            path.floor(),
            path.floor_work()
        );
    }
    println!(
        "target: every path <= its floor + {FLOOR_TARGET_NS} ns; {}",
        if missed.is_empty() {
            "met".to_string()
        } else {
            format!("missed by: {}", missed.join(", "))
        }
    );
    families(&node)?;

    println!(
        "\nNew flows: {NEW_FLOWS} distinct 5-tuples per measurement, each run once (repeat 1: the"
    );
    println!(
        "kernel's per-run overhead is in the baseline too); conntrack cleared of them after each"
    );
    println!("(so never filling up); ClusterIP flows spread over all loaded Services.\n");
    let header: Vec<String> = NewFlow::ALL
        .iter()
        .map(|p| format!("{:<40}", p.label()))
        .collect();
    println!("{:>8} | {}", "services", header.join(" | "));
    let columns = format!(
        "{:>7} {:>6} {:>7} {:>6} {:>6}",
        "ns/pkt", "base", "+ns", "ratio", "vs 1"
    );
    println!(
        "{:>8} | {}",
        "",
        vec![format!("{columns:<40}"); NewFlow::ALL.len()].join(" | ")
    );
    let mut first: Option<Vec<f64>> = None;
    for size in SIZES {
        node.load_services(size)?;
        let frames: Vec<Vec<Vec<u8>>> = NewFlow::ALL
            .iter()
            .map(|p| node.new_flow_frames(*p, NEW_FLOWS))
            .collect();
        for (path, frames) in NewFlow::ALL.into_iter().zip(&frames) {
            new_flows(&mut node, path, frames)?; // warm-up, not measured
        }
        let mut samples: Vec<[Vec<f64>; 2]> = vec![Default::default(); NewFlow::ALL.len()];
        for _ in 0..ROUNDS {
            for (i, path) in NewFlow::ALL.into_iter().enumerate() {
                samples[i][0].push(new_flows(&mut node, path, &frames[i])?);
                samples[i][1].push(per_frame(&node, path.hook(), &frames[i], true)?);
            }
        }
        let medians: Vec<(f64, f64)> = samples
            .into_iter()
            .map(|[ns, base]| (median(ns), median(base)))
            .collect();
        let first = first.get_or_insert_with(|| medians.iter().map(|m| m.0).collect());
        let cells: Vec<String> = medians
            .iter()
            .zip(first.iter())
            .map(|((ns, base), first)| {
                format!(
                    "{:<40}",
                    format!(
                        "{ns:>7.1} {base:>6.1} {:>+7.1} {:>5.2}x {:>5.2}x",
                        ns - base,
                        ns / base,
                        ns / first
                    )
                )
            })
            .collect();
        println!("{size:>8} | {}", cells.join(" | "));
    }
    ensure!(
        node.bed.drops()?.is_empty(),
        "drops during the bench: {:?}",
        node.bed.drops()?
    );
    println!(
        "\ntargets: pod -> ClusterIP new flows <= +1000 ns over the no-op at 1 Service and <= 1.3x \
         from 1 to 100,000 Services; NodePort (XDP) new flows flat (<= 1.2x)"
    );
    policy_new_flows(&mut node)?;
    drops(&mut node)
}

/// New flows to a pod that NetworkPolicy isolates for ingress, allowed by its
/// clients' identity (an ipcache lookup, one or two policy lookups, both conntrack
/// entries written), as `ferrite_ipcache` and the server's rules grow; next to the
/// same SYNs to an unpoliced pod (no lookup, no entry), in the same rounds.
fn policy_new_flows(node: &mut BenchNode) -> Result<()> {
    println!(
        "\nNetworkPolicy, new flows: {NEW_FLOWS} SYNs from unpoliced pods to a pod isolated for ingress"
    );
    println!(
        "(allowed by the clients' identity; both conntrack entries written, cleared after each"
    );
    println!("measurement), next to the same SYNs to an unpoliced pod, alternating rounds.\n");
    println!(
        "{:>8} {:>7} | {:>8} {:>10} {:>7} {:>9}",
        "ipcache", "rules", "ns/pkt", "unpoliced", "+ns", "vs first"
    );
    let policed = node.pod_new_flow_frames(true, NEW_FLOWS);
    let open = node.pod_new_flow_frames(false, NEW_FLOWS);
    let mut first = None;
    for (pods, rules) in [
        (10_000, 1),
        (10_000, 100),
        (10_000, 10_000),
        (100_000, 10_000),
    ] {
        node.load_policy(pods, rules)?;
        let mut samples: [Vec<f64>; 2] = Default::default();
        for round in 0..=ROUNDS {
            let before = counts(node, &[stat::DELIVERED_LOCAL])?;
            let ns = per_frame(node, Hook::FromPod, &policed, false)?;
            moved(
                node,
                &[stat::DELIVERED_LOCAL],
                &before,
                NEW_FLOWS as u64,
                "policed new flows",
            )?;
            let removed = node.clear_new_flows()?;
            ensure!(
                removed == 2 * NEW_FLOWS as usize,
                "policed new flows: {removed} conntrack entries, expected {}",
                2 * NEW_FLOWS
            );
            let open_ns = per_frame(node, Hook::FromPod, &open, false)?;
            // The first round warms caches: not counted.
            if round > 0 {
                samples[0].push(ns);
                samples[1].push(open_ns);
            }
        }
        let [ns, open_ns] = samples.map(median);
        let first = *first.get_or_insert(ns);
        println!(
            "{pods:>8} {rules:>7} | {ns:>8.1} {open_ns:>10.1} {:>+7.1} {:>8.2}x",
            ns - open_ns,
            ns / first
        );
    }
    println!("\ntarget: flat (<= 1.2x from the smallest to the largest)");
    Ok(())
}

/// ns per pass of `path` in `family` (or of its baseline), over FAMILY_RUNS runs of
/// FAMILY_REPEAT passes; every pass checked by the path's counters.
fn family_run(node: &BenchNode, path: FamilyPath, family: Family, baseline: bool) -> Result<f64> {
    let label = format!("{}, {}", path.label(), family.name());
    let frame = path.frame(family);
    let before = counts(node, path.counters(family))?;
    let mut total = 0.0;
    for _ in 0..FAMILY_RUNS {
        let (out, duration) = if baseline {
            node.run_noop(path.hook(), &frame, FAMILY_REPEAT)?
        } else {
            node.run(path.hook(), &frame, FAMILY_REPEAT)?
        };
        ensure!(
            baseline || out.verdict == path.verdict(family),
            "{label}: verdict {}",
            out.verdict
        );
        total += duration.as_nanos() as f64;
    }
    if !baseline {
        let passes = (FAMILY_RUNS * FAMILY_REPEAT) as u64;
        moved(node, path.counters(family), &before, passes, &label)?;
    }
    Ok(total / FAMILY_RUNS as f64)
}

/// The paths of both families, IPv6 next to IPv4 in the same rounds (see
/// `ferrite_tests::bench_families`).
fn families(node: &BenchNode) -> Result<()> {
    println!(
        "\nIPv6 next to IPv4: the same paths and ports, 74-byte IPv6 and 54-byte IPv4 TCP ACKs; IPv6"
    );
    println!(
        "delivery decrements the hop limit, so both families run {FAMILY_RUNS} test runs of {FAMILY_REPEAT} passes"
    );
    println!(
        "(hop limit {HOP_LIMIT}) per measurement, each followed by its baseline; median of {ROUNDS} rounds.\n"
    );
    println!(
        "{:<26} {:<6} {:<22} {:>8} {:>9} {:>8} {:>7} | {:>9} {:>9}",
        "path", "family", "program", "ns/pkt", "baseline", "+ns", "ratio", "v6/v4 ns", "v6/v4 +ns"
    );
    let mut samples: Vec<[[Vec<f64>; 2]; 2]> = vec![Default::default(); FamilyPath::ALL.len()];
    for _ in 0..ROUNDS {
        for (i, path) in FamilyPath::ALL.into_iter().enumerate() {
            for (f, family) in Family::ALL.into_iter().enumerate() {
                samples[i][f][0].push(family_run(node, path, family, false)?);
                samples[i][f][1].push(family_run(node, path, family, true)?);
            }
        }
    }
    let mut missed = Vec::new();
    for (path, per_family) in FamilyPath::ALL.into_iter().zip(samples) {
        let [v4, v6] = per_family.map(|[ns, base]| (median(ns), median(base)));
        for (family, (ns, base)) in Family::ALL.into_iter().zip([v4, v6]) {
            let versus = match family {
                Family::Ipv4 => String::new(),
                Family::Ipv6 => {
                    let added = (ns - base) / (v4.0 - v4.1);
                    if path.whole_in_both() && added > FAMILY_TARGET {
                        missed.push(format!("{} ({added:.2}x)", path.label()));
                    }
                    format!("{:>8.2}x {added:>8.2}x", ns / v4.0)
                }
            };
            println!(
                "{:<26} {:<6} {:<22} {ns:>8.1} {base:>9.1} {:>+8.1} {:>6.2}x | {versus}",
                path.label(),
                family.name(),
                path.hook().program(),
                ns - base,
                ns / base,
            );
        }
    }
    println!(
        "IPv6 programs: {} and {} reached by a tail call (in the row's ns); to the other node",
        program_names::FROM_POD6,
        program_names::FROM_OVERLAY6
    );
    println!(
        "IPv6 is handed to the stack (verdict OK), whose LWT route encapsulates it: the program's"
    );
    println!("part only, not judged (`bench overlay` measures the path end to end).");
    println!(
        "target: IPv6 +ns <= {FAMILY_TARGET}x its IPv4 twin's; {}",
        if missed.is_empty() {
            "met".to_string()
        } else {
            format!("missed by: {}", missed.join(", "))
        }
    );
    Ok(())
}
