//! `cargo xtask soak [--minutes N]` (default 10): two nodes under mixed traffic while
//! the cluster churns every second, then a report. Traffic: TCP connect/request/close,
//! long-lived TCP flows and UDP through a ClusterIP (local and cross-node backends),
//! NodePort TCP and UDP from the world into both nodes, and pod to pod across nodes.
//! Churn, one step per second: a second Service's backends cycle through
//! both/one/the other/none (scale to zero and back), 0-500 extra Services come and go
//! in batches of 50, and five Node objects of absent nodes appear and disappear.
//! Printed every 10 s: requests made and failed per kind, agent RSS, conntrack
//! entries. Traffic to the steady Service (whose backends never change) must never
//! fail; the exit status says whether it did. Ctrl-C ends it early with the report.
//! Everything is removed at the end.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferrite_common::{ServiceKey, PROTO_UDP};
use ferrite_tests::{
    cluster::{load_balancer_yaml, service_yaml, TCP_TARGET, UDP_TARGET},
    lab::{exchange, node_yaml, parse_answer, pod_ip, Cluster, Netns, Server},
};

const STEADY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const CHURN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const LONG_FLOWS: usize = 8;
const GHOST_NODES: u8 = 5;
const EXTRA_BATCH: u32 = 50;
const EXTRA_MAX: u32 = 500;

/// Requests made and failed, per kind of traffic.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn record(&self, kind: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // The first failures of each kind, to tell why.
                if self.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("failed: {kind}: {e:#}");
                }
            }
        }
    }
}

type Tallies = BTreeMap<&'static str, Tally>;

/// Traffic kinds; those marked steady must never fail.
const KINDS: [(&str, bool); 8] = [
    ("clusterip tcp connect", true),
    ("clusterip tcp long flow", true),
    ("clusterip udp", true),
    ("nodeport tcp (world)", true),
    ("nodeport udp (world)", true),
    ("pod to pod cross-node", true),
    ("churning service tcp", false),
    ("churning service udp", false),
];

fn tcp_request(netns: &Netns, to: SocketAddrV4, message: &str) -> Result<()> {
    parse_answer(&netns.tcp_request(to, message)?, message).map(|_| ())
}

fn udp_request(netns: &Netns, to: SocketAddrV4, message: &str) -> Result<()> {
    let socket = netns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    socket.connect(to)?;
    let mut buf = [0u8; 2048];
    // A datagram may be lost on a loaded 2-core machine; three tries, as a resolver.
    for _ in 0..3 {
        socket.send(message.as_bytes())?;
        if let Ok(n) = socket.recv(&mut buf) {
            return parse_answer(&String::from_utf8_lossy(&buf[..n]), message).map(|_| ());
        }
    }
    bail!("no UDP answer from {to}")
}

/// The cluster file at churn step `step`.
fn cluster_yaml(cluster: &Cluster, step: u64) -> String {
    let mut docs = vec![cluster.nodes_and_pods_yaml()];
    let node = |n: usize| cluster.nodes[n].name.as_str();
    docs.push(load_balancer_yaml(
        "steady",
        STEADY_VIP,
        PORT,
        NODE_PORT,
        "",
        &[],
        &[
            (cluster.pod("web-a").ip, node(0)),
            (cluster.pod("web-b").ip, node(1)),
        ],
    ));
    let churners = [cluster.pod("churn-a").ip, cluster.pod("churn-b").ip];
    let backends: &[Ipv4Addr] = match step % 4 {
        0 => &churners,
        1 => &churners[..1],
        2 => &churners[1..],
        _ => &[],
    };
    docs.push(service_yaml("churn", CHURN_VIP, backends));
    // 0, 50, ..., 500, 450, ..., 50, 0, ...
    let phase = (step % (2 * EXTRA_MAX as u64 / EXTRA_BATCH as u64)) as u32;
    let extra = EXTRA_BATCH * phase.min(2 * EXTRA_MAX / EXTRA_BATCH - phase);
    let endpoints: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(10, 244, 9, i)).collect();
    for index in 0..extra {
        let [_, _, high, low] = index.to_be_bytes();
        let vip = Ipv4Addr::new(10, 100, high, low);
        docs.push(service_yaml(&format!("extra-{index}"), vip, &endpoints));
    }
    for ghost in 0..GHOST_NODES {
        if (step / (ghost as u64 + 1)).is_multiple_of(2) {
            docs.push(node_yaml(
                &format!("ghost-{ghost}"),
                Ipv4Addr::new(198, 51, 100, 100 + ghost),
                &format!("10.244.{}.0/24", 100 + ghost),
            ));
        }
    }
    docs.join("---\n")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Run `work` in a loop on its own thread until `stop`, recording into `kind`.
fn worker<'scope>(
    scope: &'scope thread::Scope<'scope, '_>,
    stop: &'scope AtomicBool,
    tallies: &'scope Tallies,
    kind: &'static str,
    pause: Duration,
    mut work: impl FnMut(u64) -> Result<()> + Send + 'scope,
) {
    scope.spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            tallies[kind].record(kind, work(i));
            i += 1;
            thread::sleep(pause);
        }
    });
}

struct Sample {
    at: Duration,
    rss_kib: [u64; 2],
    conntrack: [usize; 2],
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut minutes = 10.0;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => minutes = args.next().context("--minutes N")?.parse()?,
            other => bail!("unknown argument {other} (usage: ferrite-soak [--minutes N])"),
        }
    }
    let duration = Duration::from_secs_f64(minutes * 60.0);

    let mut cluster = Cluster::new(2)?;
    for (node, name, index) in [
        (0, "client-a", 2),
        (0, "web-a", 11),
        (0, "churn-a", 21),
        (1, "client-b", 2),
        (1, "web-b", 11),
        (1, "churn-b", 21),
    ] {
        cluster.nodes[node].add_pod(name, pod_ip(node, index))?;
    }
    let mut servers: Vec<Server> = Vec::new();
    for pod in ["web-a", "web-b", "churn-a", "churn-b"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    for node in &mut cluster.nodes {
        node.resync_seconds = 10;
    }
    cluster.write_config(&cluster_yaml(&cluster, 0))?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("the steady Service", |m| {
            m.pod_routes() >= 2
                && m.services
                    .contains_key(&ServiceKey::new(STEADY_VIP, PORT + 1, PROTO_UDP, 0))
        })?;
    }
    let nodes = [0, 1].map(|n| cluster.nodes[n].ip.expect("plugged"));
    println!(
        "soak: {minutes} min; 2 nodes ({}, {}), steady Service {STEADY_VIP}:{PORT} (NodePort {NODE_PORT}) over web-a and web-b, churn every second",
        nodes[0], nodes[1]
    );

    let stop = AtomicBool::new(false);
    let interrupted = std::sync::Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    let tallies: Tallies = KINDS.iter().map(|(k, _)| (*k, Tally::default())).collect();
    let pids = [0, 1].map(|n| cluster.nodes[n].agent.as_ref().expect("started").pid());
    let mut samples: Vec<Sample> = Vec::new();
    let mut steps = 0;
    let cluster = &cluster;
    thread::scope(|scope| -> Result<()> {
        let (stop, tallies) = (&stop, &tallies);
        let steady_tcp = SocketAddrV4::new(STEADY_VIP, PORT);
        let steady_udp = SocketAddrV4::new(STEADY_VIP, PORT + 1);
        let pod = |name: &str| -> &Netns { &cluster.pod(name).netns };
        let world = &cluster.world;
        let pause = Duration::from_millis(20);
        for client in ["client-a", "client-b"] {
            let netns = pod(client);
            worker(
                scope,
                stop,
                tallies,
                "clusterip tcp connect",
                pause,
                move |i| tcp_request(netns, steady_tcp, &format!("connect {i}")),
            );
        }
        let netns = pod("client-a");
        worker(scope, stop, tallies, "clusterip udp", pause, move |i| {
            udp_request(netns, steady_udp, &format!("udp {i}"))
        });
        worker(
            scope,
            stop,
            tallies,
            "nodeport tcp (world)",
            pause,
            move |i| {
                let to = SocketAddrV4::new(nodes[i as usize % 2], NODE_PORT);
                tcp_request(world, to, &format!("nodeport {i}"))
            },
        );
        worker(
            scope,
            stop,
            tallies,
            "nodeport udp (world)",
            pause,
            move |i| {
                let to = SocketAddrV4::new(nodes[i as usize % 2], NODE_PORT + 1);
                udp_request(world, to, &format!("nodeport udp {i}"))
            },
        );
        let netns = pod("client-a");
        let web_b = SocketAddrV4::new(cluster.pod("web-b").ip, TCP_TARGET);
        worker(
            scope,
            stop,
            tallies,
            "pod to pod cross-node",
            pause,
            move |i| tcp_request(netns, web_b, &format!("direct {i}")),
        );
        let netns = pod("client-b");
        let churn_tcp = SocketAddrV4::new(CHURN_VIP, PORT);
        worker(
            scope,
            stop,
            tallies,
            "churning service tcp",
            pause,
            move |i| tcp_request(netns, churn_tcp, &format!("churn {i}")),
        );
        let churn_udp = SocketAddrV4::new(CHURN_VIP, 53);
        worker(
            scope,
            stop,
            tallies,
            "churning service udp",
            pause,
            move |i| udp_request(netns, churn_udp, &format!("churn udp {i}")),
        );
        // Long-lived flows: each keeps its backend for the whole run.
        for flow in 0..LONG_FLOWS {
            let netns = pod(["client-a", "client-b"][flow % 2]);
            let mut stream = netns.tcp_connect(steady_tcp)?;
            let first = format!("long {flow} open");
            let backend = parse_answer(&exchange(&mut stream, &first)?, &first)?.0;
            let pause = Duration::from_millis(200);
            worker(
                scope,
                stop,
                tallies,
                "clusterip tcp long flow",
                pause,
                move |i| {
                    let request = format!("long {flow} {i}");
                    let answer = parse_answer(&exchange(&mut stream, &request)?, &request)?.0;
                    anyhow::ensure!(answer == backend, "moved from {backend} to {answer}");
                    Ok(())
                },
            );
        }

        let start = Instant::now();
        println!(
            "{:>6}  {:>10}  {:>8}  {:>13}  {:>13}  {:>13}",
            "time", "requests", "failed", "steady failed", "agent RSS KiB", "conntrack"
        );
        let result = (|| -> Result<()> {
            while start.elapsed() < duration && !interrupted.load(Ordering::SeqCst) {
                steps += 1;
                cluster.write_config(&cluster_yaml(cluster, steps))?;
                thread::sleep(Duration::from_secs(1));
                if steps % 10 != 0 && start.elapsed() < duration {
                    continue;
                }
                let conntrack = [0, 1].map(|n| {
                    cluster.nodes[n]
                        .maps()
                        .and_then(|m| m.conntrack_entries())
                        .map(|e| e.len())
                        .unwrap_or(0)
                });
                let sample = Sample {
                    at: start.elapsed(),
                    rss_kib: pids.map(rss_kib),
                    conntrack,
                };
                let (made, failed, steady_failed) = totals(tallies);
                println!(
                    "{:>5}s  {made:>10}  {failed:>8}  {steady_failed:>13}  {:>6} {:>6}  {:>6} {:>6}",
                    sample.at.as_secs(),
                    sample.rss_kib[0],
                    sample.rss_kib[1],
                    sample.conntrack[0],
                    sample.conntrack[1]
                );
                samples.push(sample);
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    for (n, node) in cluster.nodes.iter().enumerate() {
        let counters = node.maps()?.counters()?;
        let drops: Vec<String> = ferrite_common::stat::NAMES
            .iter()
            .zip(&counters)
            .filter(|(name, c)| {
                (name.starts_with("drop_") || **name == "port_remapped") && c.packets > 0
            })
            .map(|(name, c)| format!("{name} {}", c.packets))
            .collect();
        println!(
            "node {n} datapath drops and port remaps: {}",
            match drops.is_empty() {
                true => "none".to_string(),
                false => drops.join(", "),
            }
        );
    }
    drop(servers);
    report(&tallies, &samples, steps)
}

fn totals(tallies: &Tallies) -> (u64, u64, u64) {
    let mut out = (0, 0, 0);
    for (kind, steady) in KINDS {
        let tally = &tallies[kind];
        let (ok, failed) = (
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
        );
        out.0 += ok + failed;
        out.1 += failed;
        if steady {
            out.2 += failed;
        }
    }
    out
}

fn report(tallies: &Tallies, samples: &[Sample], steps: u64) -> Result<()> {
    println!("\nchurn steps: {steps} (one per second)");
    println!("{:<28} {:>10} {:>8}", "traffic", "requests", "failed");
    for (kind, steady) in KINDS {
        let tally = &tallies[kind];
        let (ok, failed) = (
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
        );
        let note = if steady {
            ""
        } else {
            " (backends churn, scale to zero)"
        };
        println!("{kind:<28} {:>10} {failed:>8}{note}", ok + failed);
    }
    if samples.len() >= 2 {
        for node in 0..2 {
            let rss: Vec<u64> = samples.iter().map(|s| s.rss_kib[node]).collect();
            let half = rss.len() / 2;
            let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
            let ct_max = samples.iter().map(|s| s.conntrack[node]).max().unwrap_or(0);
            println!(
                "node {node}: agent RSS first {} KiB, last {} KiB, max {} KiB; mean of the second half / first half: {:.3}; conntrack entries max {ct_max}, last {}",
                rss[0],
                rss[rss.len() - 1],
                rss.iter().max().unwrap_or(&0),
                mean(&rss[half..]) / mean(&rss[..half]),
                samples[samples.len() - 1].conntrack[node],
            );
        }
    }
    let (_, _, steady_failed) = totals(tallies);
    if steady_failed > 0 {
        bail!("{steady_failed} requests to the steady Service or between pods failed");
    }
    println!("soak passed: no request to a backend that stayed ready failed");
    Ok(())
}
