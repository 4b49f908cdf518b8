//! `cargo xtask bench insitu`: what each Ferrite program costs per run under real
//! TCP traffic, from the kernel's own accounting (`kernel.bpf_stats_enabled=1`:
//! run_time_ns and run_cnt per program, read with `bpftool prog show -j`; the old
//! value is restored on every path). A two-node lab cluster: a client pod and a
//! server pod on node 0, a server pod on node 1, a ClusterIP Service in front of
//! each server. From the client: iperf3 (IPERF_SECONDS) and a connection-rate run
//! (wrk, `Connection: close`) to the pod on the same node, to the pod on the other
//! node (overlay), and to each Service; all of it with the agents' defaults
//! (socket-level LB: the ClusterIP connects are translated at connect(), so their
//! packets take the pod -> pod path), then again after restarting the agents with
//! `--socket-lb=false` (every ClusterIP packet DNATed and reverse-NATed per packet).
//! Clients run in node 0's cgroup subtree, as its pods' processes do.
//!
//! The programs measured are the agents' own, found through each node's pins
//! (/sys/fs/bpf/ferrite/<node>/: the pinned pod programs and every pinned link's
//! program), so other Ferrite programs on the machine do not count. Figures are
//! summed over both nodes (the client's and the servers' sides of each flow): the
//! mean ns per run of each program over the run. One TCP segment can be one run or a
//! GSO super-packet of many (veth and VXLAN keep GSO), so per-run costs of the bulk
//! runs are per super-packet.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ferrite_common::program_names;
use ferrite_tests::lab::{pod_ip, sh, wait_until, Cluster, Node, Probe, SETTLE};

use crate::{
    clusterip::{wrk, HttpServer},
    comparison::HTTP_PORT,
};

const IPERF_SECONDS: u32 = 3;
const IPERF_PORT: u16 = 5201;
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The programs in the order printed.
const PROGRAMS: [&str; 10] = [
    program_names::FROM_POD,
    program_names::TO_POD,
    program_names::FROM_OVERLAY,
    program_names::FROM_UPLINK,
    program_names::FROM_HOST,
    program_names::FROM_WORLD,
    program_names::SOCK_CONNECT4,
    program_names::SOCK_SENDMSG4,
    program_names::SOCK_RECVMSG4,
    program_names::SOCK_GETPEERNAME4,
];

/// `kernel.bpf_stats_enabled=1` while alive; the previous value back on drop.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing {STATS_SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!("could not restore {STATS_SYSCTL} to {}: {e}", self.previous);
        }
    }
}

/// An iperf3 server in a pod, in its node's cgroup (killed on drop).
struct IperfServer(std::process::Child);

impl IperfServer {
    fn start(probe: &Probe) -> Result<Self> {
        let mut command = std::process::Command::new(ferrite_tests::lab::probe_bin());
        if let Some(cgroup) = &probe.cgroup {
            command.arg("--cgroup").arg(cgroup);
        }
        let child = command
            .arg("--netns")
            .arg(&probe.netns)
            .args(["--bind", "0", "exec", "iperf3", "-s", "-p"])
            .arg(IPERF_PORT.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self(child))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// iperf3 from `probe` to `to` for IPERF_SECONDS: Gbit/s received.
fn iperf(probe: &Probe, to: SocketAddrV4) -> Result<f64> {
    let out = probe.exec(&[
        "iperf3",
        "-c",
        &to.ip().to_string(),
        "-p",
        &to.port().to_string(),
        "-t",
        &IPERF_SECONDS.to_string(),
        "-J",
    ])?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report without sum_received")?;
    Ok(bits / 1e9)
}

/// The ids of the programs a node's agent runs: its pinned programs and the
/// programs of its pinned links.
fn node_program_ids(node: &Node) -> Result<BTreeSet<u64>> {
    let dir = node.pin_dir();
    let mut ids = BTreeSet::new();
    for name in [program_names::FROM_POD, program_names::TO_POD] {
        let shown = bpftool(&["prog", "show", "pinned", &path_str(&dir.join(name))?])?;
        ids.insert(shown["id"].as_u64().context("prog id")?);
    }
    for entry in std::fs::read_dir(dir.join("links"))? {
        let shown = bpftool(&["link", "show", "pinned", &path_str(&entry?.path())?])?;
        ids.insert(shown["prog_id"].as_u64().context("link prog_id")?);
    }
    Ok(ids)
}

fn path_str(path: &Path) -> Result<String> {
    Ok(path.to_str().context("path")?.to_string())
}

fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    Ok(serde_json::from_str(&sh("bpftool", &all)?)?)
}

/// (run_time_ns, run_cnt) per program name, summed over the programs `ids`.
fn program_stats(ids: &BTreeSet<u64>) -> Result<BTreeMap<&'static str, (u64, u64)>> {
    let shown = bpftool(&["prog", "show"])?;
    let mut stats = BTreeMap::new();
    for prog in shown.as_array().context("bpftool prog show")? {
        if !prog["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            continue;
        }
        // Kernel program names stop at 15 characters.
        let shown_name = prog["name"].as_str().unwrap_or("");
        let Some(name) = PROGRAMS
            .iter()
            .find(|n| !shown_name.is_empty() && n.starts_with(shown_name))
        else {
            continue;
        };
        let entry = stats.entry(*name).or_insert((0, 0));
        entry.0 += prog["run_time_ns"].as_u64().unwrap_or(0);
        entry.1 += prog["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(stats)
}

fn service_yaml(name: &str, vip: Ipv4Addr, backend: Ipv4Addr) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}, {{name: iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: {HTTP_PORT}}}, {{name: iperf, port: {IPERF_PORT}}}]\nendpoints: [{{addresses: [\"{backend}\"], conditions: {{ready: true}}}}]\n"
    )
}

fn wait_for_agents(cluster: &Cluster) -> Result<()> {
    for node in &cluster.nodes {
        node.wait_for_maps("routes, pods and Services", |m| {
            m.pod_routes() == 2
                && !m.endpoints.is_empty()
                && m.services.keys().filter(|k| k.backend_slot == 0).count() >= 4
        })?;
    }
    Ok(())
}

/// One traffic run's destination.
struct Target {
    label: &'static str,
    http: SocketAddrV4,
    iperf: SocketAddrV4,
}

pub fn bench() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("client", pod_ip(0, 0))?;
    cluster.nodes[0].add_pod("near", pod_ip(0, 1))?;
    cluster.nodes[1].add_pod("far", pod_ip(1, 0))?;
    for node in &cluster.nodes {
        node.pods.iter().try_for_each(|pod| {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &pod.netns.name,
                    "sysctl",
                    "-qw",
                    "net.ipv4.tcp_max_tw_buckets=0",
                ],
            )
            .map(drop)
        })?;
    }
    let (near, far) = (cluster.pod("near").ip, cluster.pod("far").ip);
    cluster.write_config(&format!(
        "{}\n{}{}",
        cluster.nodes_and_pods_yaml(),
        service_yaml("near", LOCAL_VIP, near),
        service_yaml("far", REMOTE_VIP, far)
    ))?;
    cluster.start_agents()?;
    wait_for_agents(&cluster)?;
    let _http = [
        HttpServer::start(&cluster.pod("near").netns)?,
        HttpServer::start(&cluster.pod("far").netns)?,
    ];
    let _iperf = [
        IperfServer::start(&cluster.pod("near").probe())?,
        IperfServer::start(&cluster.pod("far").probe())?,
    ];
    let targets = [
        Target {
            label: "pod -> pod, same node",
            http: SocketAddrV4::new(near, HTTP_PORT),
            iperf: SocketAddrV4::new(near, IPERF_PORT),
        },
        Target {
            label: "pod -> pod, other node",
            http: SocketAddrV4::new(far, HTTP_PORT),
            iperf: SocketAddrV4::new(far, IPERF_PORT),
        },
        Target {
            label: "pod -> ClusterIP, local backend",
            http: SocketAddrV4::new(LOCAL_VIP, 80),
            iperf: SocketAddrV4::new(LOCAL_VIP, IPERF_PORT),
        },
        Target {
            label: "pod -> ClusterIP, remote backend",
            http: SocketAddrV4::new(REMOTE_VIP, 80),
            iperf: SocketAddrV4::new(REMOTE_VIP, IPERF_PORT),
        },
    ];
    let _stats = BpfStats::enable()?;
    println!(
        "\nIn situ: ns per run of each Ferrite program under real TCP traffic (bpf_stats_enabled),"
    );
    println!("run_time_ns / run_cnt summed over both nodes' programs; client pod on node 0, in its cgroup.");
    println!("iperf3: {IPERF_SECONDS} s, one connection (runs are GSO super-packets); wrk: Connection: close");
    println!("(each run a new TCP connection: handshake, request, answer, close).\n");
    let mut rows = Vec::new();
    for mode in ["socket LB", "--socket-lb=false"] {
        if mode != "socket LB" {
            for node in &mut cluster.nodes {
                node.kill_agent()?;
                node.agent_args.push("--socket-lb=false".into());
                node.start_agent()?;
            }
            wait_for_agents(&cluster)?;
            let cgroup = cluster.nodes[0].cgroup.path.clone();
            wait_until("the socket-level programs to go", SETTLE, || {
                sh("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])
                    .is_ok_and(|out| !out.contains("ferrite_"))
            })?;
        }
        let mut ids = BTreeSet::new();
        for node in &cluster.nodes {
            ids.extend(node_program_ids(node)?);
        }
        let client = cluster.pod("client").probe();
        for target in &targets {
            for kind in ["iperf3", "wrk"] {
                let before = program_stats(&ids)?;
                let rate = match kind {
                    "iperf3" => format!("{:.2} Gbit/s", iperf(&client, target.iperf)?),
                    _ => format!("{:.0} conn/s", wrk(&client, &[target.http])?),
                };
                let after = program_stats(&ids)?;
                let per_run: Vec<(&str, f64, u64)> = PROGRAMS
                    .iter()
                    .filter_map(|name| {
                        let (time, runs) = after.get(name).copied().unwrap_or_default();
                        let (time0, runs0) = before.get(name).copied().unwrap_or_default();
                        let runs = runs.saturating_sub(runs0);
                        (runs > 0)
                            .then(|| (*name, time.saturating_sub(time0) as f64 / runs as f64, runs))
                    })
                    .collect();
                if per_run.is_empty() {
                    bail!("no Ferrite program ran during {} ({kind})", target.label);
                }
                rows.push((target.label, mode, kind, rate, per_run));
            }
        }
    }
    println!(
        "{:<34} {:<18} {:<7} {:>14} | ns/run (runs) of each program that ran",
        "traffic", "mode", "tool", "rate"
    );
    for (label, mode, kind, rate, per_run) in rows {
        let cells: Vec<String> = per_run
            .iter()
            .map(|(name, ns, runs)| {
                format!("{} {ns:.0} ({runs})", name.trim_start_matches("ferrite_"))
            })
            .collect();
        println!(
            "{label:<34} {mode:<18} {kind:<7} {rate:>14} | {}",
            cells.join(", ")
        );
    }
    println!("\n(socket LB: a ClusterIP connect() is translated once, its packets then take the pod -> pod path;");
    println!(
        " --socket-lb=false: every ClusterIP packet is DNATed / reverse-NATed by the TC programs)"
    );
    Ok(())
}
