//! `cargo xtask bench clusterip`: the TCP connection rate (wrk, `Connection: close`,
//! 3 threads x 11 connections) from a client pod to a ClusterIP with three backend
//! pods on the node, with 1 to 100,000 Services loaded and the measured one in the
//! middle, side by side in one run (rounds alternate, each starting with another
//! measurement) with:
//! - the same client straight to the backend pods' IPs, one wrk thread each (the
//!   floor: the same servers loaded the same way);
//! - Ferrite per packet (a client pod outside the node's cgroup subtree, which is
//!   what `--socket-lb=false` gives every client);
//! - kube-proxy's iptables and nftables layouts
//!   (`ferrite_tests::kube_proxy_layout`) on nodes of their own, each with its own
//!   direct baseline;
//! - a Service with only the first backend, next to wrk straight to that backend
//!   (all three threads): the translation's cost alone, without spreading.
//!
//! Run twice: backends without TIME_WAIT (`tcp_max_tw_buckets=0`) and keeping it as
//! the kernel does by default (`clusterip` runs both, `clusterip-no-time-wait` and
//! `clusterip-time-wait` one each). Per-packet connections start from client pods of
//! their own (see [`CLIENTS`]). Services are loaded by `comparison.rs`, as for the
//! latency bench. After the tables: per column, how often a SYN was sent again and
//! why (the kernel's TcpExt counters, Ferrite's conntrack counters).
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ferrite_common::stat;
use ferrite_tests::lab::{Netns, Probe};
use socket2::Type;

use crate::{
    comparison::{
        listen, BenchNode, FerriteSetup, KubeProxyMode, Setups, TimeWait, HTTP_PORT,
        SINGLE_BACKEND_IP,
    },
    median,
};

const SIZES: [u32; 4] = [1, 1_000, 10_000, 100_000];
const ROUNDS: usize = 5;
const WRK_SECONDS: u32 = 3;
/// wrk threads: one per backend, so a direct run can load each backend as a Service does.
const WRK_THREADS: u32 = 3;
const CONNECTIONS_PER_THREAD: u32 = 11;
/// What each measurement column is, in the order of the results.
const COLUMNS: [&str; 10] = [
    "ferrite",
    "ferrite per packet",
    "direct",
    "kube-proxy nftables",
    "direct (nftables node)",
    "kube-proxy iptables",
    "direct (iptables node)",
    "one backend: ferrite",
    "one backend: per packet",
    "one backend: direct",
];

/// An HTTP server on 0.0.0.0:HTTP_PORT in `netns` (or another address of
/// [`HttpServer::start_on`]): a few threads accepting, each answering one request per
/// connection ("200 ok", then close). Stopped on drop.
pub(crate) struct HttpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub(crate) fn start(netns: &Netns) -> Result<Self> {
        Self::start_on(netns, Ipv4Addr::UNSPECIFIED.into())
    }

    /// The server on `ip`:HTTP_PORT (`::` takes IPv6 alone, next to `0.0.0.0`'s).
    pub(crate) fn start_on(netns: &Netns, ip: IpAddr) -> Result<Self> {
        let listener: TcpListener = netns
            .run(|| listen(SocketAddr::new(ip, HTTP_PORT), Type::STREAM))??
            .into();
        // Wake up now and then to see the stop flag (Linux applies SO_RCVTIMEO to accept).
        nix::sys::socket::setsockopt(
            &listener,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut stream, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut request = Vec::new();
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        );
                    }
                })
            })
            .collect();
        Ok(Self { stop, threads })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// wrk's requests/s from `probe` (its cgroup and network namespace) to `to`; every
/// request must succeed.
pub(crate) fn wrk<T: Into<SocketAddr> + Copy>(probe: &Probe, targets: &[T]) -> Result<f64> {
    let targets: Vec<SocketAddr> = targets.iter().map(|t| (*t).into()).collect();
    // One wrk thread per target address (wrk's Lua `setup` gives each thread its
    // own): a direct baseline loads the same backends a Service spreads over.
    let script = std::env::temp_dir().join(format!("ferrite-bench-wrk-{}.lua", std::process::id()));
    let addresses: Vec<String> = targets
        .iter()
        .map(|t| format!("{{\"{}\", \"{}\"}}", t.ip(), t.port()))
        .collect();
    std::fs::write(
        &script,
        format!(
            "local targets = {{ {} }}\nlocal n = 0\nfunction setup(thread)\n  local t = targets[n % #targets + 1]\n  n = n + 1\n  thread.addr = wrk.lookup(t[1], t[2])[1]\nend\n",
            addresses.join(", ")
        ),
    )?;
    let url = format!("http://{}/", targets[0]);
    let (threads, connections, seconds) = (
        WRK_THREADS.to_string(),
        (WRK_THREADS * CONNECTIONS_PER_THREAD).to_string(),
        format!("{WRK_SECONDS}s"),
    );
    let out = probe.exec(&[
        "wrk",
        "-t",
        &threads,
        "-c",
        &connections,
        "-d",
        &seconds,
        "-s",
        &script.to_string_lossy(),
        "-H",
        "Connection: close",
        &url,
    ]);
    let _ = std::fs::remove_file(&script);
    let out = out?;
    let to = targets[0];
    if out.contains("Non-2xx") {
        bail!("wrk to {to} had failed requests:\n{out}");
    }
    if let Some(errors) = out.lines().find(|l| l.contains("Socket errors")) {
        eprintln!("  (wrk to {to}: {})", errors.trim());
    }
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk output without Requests/sec:\n{out}"))
}

/// Kernel TCP counters that tell where connections wait on TIME_WAIT: SYNs the
/// client sent again, SYNs a server's TIME_WAIT socket refused (PAWS: an older
/// timestamp than the closed connection's last), ACKs a TIME_WAIT socket left
/// unsent (rate limit), and TIME_WAIT sockets not made (table full).
const TCP_COUNTERS: [&str; 4] = [
    "TcpExtTCPSynRetrans",
    "TcpExtPAWSTimewait",
    "TcpExtTCPACKSkippedTimeWait",
    "TcpExtTCPTimeWaitOverflow",
];
/// Ferrite's counters of a client port meeting an older flow's tuple.
const FERRITE_COUNTERS: [u32; 2] = [stat::CT_REOPENED, stat::PORT_REMAPPED];

/// TCP_COUNTERS then FERRITE_COUNTERS of a node: the kernel's summed over its pods
/// (each counts on one side: the client's, or the servers'), Ferrite's where it runs.
fn counters(node: &BenchNode, ferrite: bool) -> Result<Vec<u64>> {
    let mut sums = vec![0; TCP_COUNTERS.len()];
    for pod in &node.node.pods {
        let netstat = pod
            .netns
            .run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
        let lines: Vec<&str> = netstat.lines().collect();
        // Pairs of lines: "TcpExt: names...", then "TcpExt: values...".
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            for (name, value) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                let prefix = names.split(':').next().unwrap_or_default();
                let full = format!("{prefix}{name}");
                if let Some(i) = TCP_COUNTERS.iter().position(|c| *c == full) {
                    sums[i] += value.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    let all = if ferrite {
        Some(node.node.maps()?.counters()?)
    } else {
        None
    };
    sums.extend(FERRITE_COUNTERS.map(|i| all.as_ref().map_or(0, |all| all[i as usize].packets)));
    Ok(sums)
}

/// `clusterip` with backends keeping TIME_WAIT and without it; one of them alone.
pub fn bench(settings: &[TimeWait]) -> Result<()> {
    for time_wait in settings {
        bench_with(*time_wait)?;
    }
    Ok(())
}

/// A connection's initial sequence number and timestamp offset are keyed on the
/// addresses its client's kernel sees: the backend's for direct and socket-level
/// connections, the Service's for per-packet ones. A backend in TIME_WAIT refuses a
/// SYN from a reused client port whose timestamp is older than the closed
/// connection's (PAWS), which between two keys is a coin toss, and the client sends
/// it again a second later. Measurements of different keys therefore run from
/// client pods of their own: none pays for another's TIME_WAIT.
const CLIENTS: usize = 3;
/// The client pod of the backends' own addresses (direct, socket-level LB).
const BACKEND_KEYED: usize = 0;
/// The client pod of per-packet connections to the measured Service.
const SERVICE_KEYED: usize = 1;
/// The client pod of per-packet connections to the one-backend Service.
const SINGLE_SERVICE_KEYED: usize = 2;

fn http_node(label: &str, index: usize, time_wait: TimeWait) -> Result<BenchNode> {
    BenchNode::serving(label, index, CLIENTS, time_wait, |netns| {
        Ok(Box::new(HttpServer::start(netns)?) as Box<dyn Send>)
    })
}

fn bench_with(time_wait: TimeWait) -> Result<()> {
    let mut ferrite = http_node("cipf", 0, time_wait)?;
    let iptables = http_node("cipi", 1, time_wait)?;
    let nftables = http_node("cipn", 2, time_wait)?;
    iptables.route_plainly()?;
    nftables.route_plainly()?;
    ferrite.start_agent()?;
    let setups = Setups {
        ferrite: vec![FerriteSetup {
            nodes: vec![&ferrite.node],
            objects: ferrite.node.pods_yaml(),
            backends: ferrite.backends(),
        }],
        kube_proxy: vec![
            iptables.kube_proxy_setup(KubeProxyMode::Iptables),
            nftables.kube_proxy_setup(KubeProxyMode::Nftables),
        ],
        protocols: &["tcp"],
        single_backend: true,
    };
    println!(
        "\nClusterIP from a client pod, TCP connections/s (wrk, Connection: close, {WRK_THREADS} threads x {CONNECTIONS_PER_THREAD} connections, {WRK_SECONDS} s), median of {ROUNDS} alternating rounds; {}\n",
        time_wait.describe()
    );
    println!(
        "{:>8} | {:>9} {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>8} {:>8}",
        "services",
        "ferrite",
        "per-pkt",
        "direct",
        "f/dir",
        "nftables",
        "direct",
        "n/dir",
        "iptables",
        "direct",
        "i/dir",
        "f/nft",
        "f/ipt"
    );
    let mut one_backend_rows = Vec::new();
    // Over all sizes, per column: connections made, and the counters' increments.
    let mut connections = [0.0; COLUMNS.len()];
    let mut events = [[0u64; TCP_COUNTERS.len() + FERRITE_COUNTERS.len()]; COLUMNS.len()];
    for count in crate::sizes(&SIZES) {
        let prepared = setups.prepare(count)?;
        for (mode, took) in &prepared.load_times {
            eprintln!(
                "  ({count} Services: {} loaded in {:.1} s)",
                mode.name(),
                took.as_secs_f64()
            );
        }
        let frontend = prepared.frontend;
        let single = SocketAddrV4::new(SINGLE_BACKEND_IP, frontend.port());
        let socket_client = ferrite.client(BACKEND_KEYED).probe();
        let outside_cgroup = |node: &BenchNode, client| Probe {
            cgroup: None,
            ..node.client(client).probe()
        };
        let direct = |node: &BenchNode| -> Vec<SocketAddrV4> {
            node.backends()
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
                .collect()
        };
        let first_backend = direct(&ferrite)[..1].to_vec();
        // Every measurement: (its index in COLUMNS, client, destinations, its node).
        let mut runs = vec![
            (0, socket_client.clone(), vec![frontend], &ferrite),
            (
                1,
                outside_cgroup(&ferrite, SERVICE_KEYED),
                vec![frontend],
                &ferrite,
            ),
            (2, socket_client.clone(), direct(&ferrite), &ferrite),
            (7, socket_client.clone(), vec![single], &ferrite),
            (
                8,
                outside_cgroup(&ferrite, SINGLE_SERVICE_KEYED),
                vec![single],
                &ferrite,
            ),
            (9, socket_client.clone(), first_backend, &ferrite),
        ];
        if prepared.kube_proxy {
            for (column, other) in [(3, &nftables), (5, &iptables)] {
                let client = outside_cgroup(other, SERVICE_KEYED);
                runs.push((column, client, vec![frontend], other));
                let client = outside_cgroup(other, BACKEND_KEYED);
                runs.push((column + 1, client, direct(other), other));
            }
        }
        let mut results: [Vec<f64>; COLUMNS.len()] = Default::default();
        for round in 0..ROUNDS {
            // Each round starts with another measurement: none always goes first.
            for step in 0..runs.len() {
                let (column, client, to, node) = &runs[(round + step) % runs.len()];
                let is_ferrite = std::ptr::eq(*node, &ferrite);
                let before = counters(node, is_ferrite)?;
                let rate = wrk(client, to)?;
                let after = counters(node, is_ferrite)?;
                results[*column].push(rate);
                connections[*column] += rate * WRK_SECONDS as f64;
                for (sum, (a, b)) in events[*column].iter_mut().zip(after.iter().zip(&before)) {
                    *sum += a - b;
                }
            }
        }
        let m: Vec<f64> = results
            .into_iter()
            .map(|r| if r.is_empty() { f64::NAN } else { median(r) })
            .collect();
        let cell = |v: f64| {
            if v.is_nan() {
                "skipped".to_string()
            } else {
                format!("{v:.0}")
            }
        };
        let ratio = |a: f64, b: f64| {
            if a.is_nan() || b.is_nan() {
                "-".to_string()
            } else {
                format!("{:.2}x", a / b)
            }
        };
        println!(
            "{count:>8} | {:>9} {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6} | {:>8} {:>8}",
            cell(m[0]), cell(m[1]), cell(m[2]), ratio(m[0], m[2]),
            cell(m[3]), cell(m[4]), ratio(m[3], m[4]),
            cell(m[5]), cell(m[6]), ratio(m[5], m[6]),
            ratio(m[0], m[3]), ratio(m[0], m[5])
        );
        one_backend_rows.push(format!(
            "{count:>8} | {:>9} {:>9} {:>9} | {:>6} {:>6}",
            cell(m[7]),
            cell(m[8]),
            cell(m[9]),
            ratio(m[7], m[9]),
            ratio(m[8], m[9])
        ));
    }
    println!("\nA Service with one backend (the first), next to wrk straight to that backend:\n");
    println!(
        "{:>8} | {:>9} {:>9} {:>9} | {:>6} {:>6}",
        "services", "ferrite", "per-pkt", "direct", "f/dir", "p/dir"
    );
    for row in one_backend_rows {
        println!("{row}");
    }
    println!(
        "\nPer 1,000 connections, all sizes (client and backend pods' TcpExt counters; Ferrite's where it runs):\n"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "column", "SYN again", "PAWS TW", "TW ACK skip", "TW overflow", "ct_reopen", "remapped"
    );
    for (column, name) in COLUMNS.iter().enumerate() {
        if connections[column] == 0.0 {
            continue;
        }
        let per_thousand: Vec<String> = events[column]
            .iter()
            .map(|n| format!("{:>10.2}", *n as f64 * 1000.0 / connections[column]))
            .collect();
        println!("{name:<24} {}", per_thousand.join(" "));
    }
    println!("\nferrite: socket-level LB (client in the node's cgroup); per-pkt: the same node, client outside the cgroup (= --socket-lb=false)");
    println!("targets: ferrite >= 0.95x direct at every size; >= 1.3x the nftables layout; >= 2x the iptables layout at 10,000");
    drop(setups);
    if time_wait == TimeWait::Off {
        direct_after_service(&ferrite)?;
    }
    Ok(())
}

/// A client that talks to a backend both through a Service and straight by its pod IP
/// (per packet: outside the cgroup): its direct connection rate before and after a
/// run of Service connections whose closing flows still hold their reply tuples.
fn direct_after_service(bench_node: &BenchNode) -> Result<()> {
    let node = &bench_node.node;
    let client = Probe {
        cgroup: None,
        ..bench_node.client(BACKEND_KEYED).probe()
    };
    let backends = bench_node.backends();
    let direct = SocketAddrV4::new(backends[0], HTTP_PORT);
    let master = node
        .maps()?
        .services
        .iter()
        .filter_map(Result::ok)
        .find(|(k, v)| k.backend_slot == 0 && v.count as usize == backends.len())
        .map(|(k, _)| k)
        .context("the measured Service")?;
    let frontend = SocketAddrV4::new(Ipv4Addr::from(master.address), master.port);
    let counters = || -> Result<Vec<u64>> {
        let all = node.maps()?.counters()?;
        Ok([
            stat::PORT_REMAPPED,
            stat::DROP_NO_SNAT_PORT,
            stat::CT_REOPENED,
        ]
        .map(|i| all[i as usize].packets)
        .to_vec())
    };
    let before_counters = counters()?;
    let before = wrk(&client, &[direct])?;
    let mut via_service = 0.0;
    for _ in 0..3 {
        via_service += wrk(&client, &[frontend])? * WRK_SECONDS as f64;
    }
    let after = wrk(&client, &[direct])?;
    let now = counters()?;
    let delta: Vec<u64> = now
        .iter()
        .zip(&before_counters)
        .map(|(a, b)| a - b)
        .collect();
    println!(
        "\ndirect connections from a client after {via_service:.0} of its Service connections (per packet): {after:.0}/s, before {before:.0}/s ({:.2}x; target >= 0.9x); port_remapped +{}, drop_no_snat_port +{}, ct_reopened +{}",
        after / before,
        delta[0],
        delta[1],
        delta[2]
    );
    Ok(())
}
