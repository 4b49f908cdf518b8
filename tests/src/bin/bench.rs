//! `cargo xtask bench`: ns/packet of the Service path (BPF_PROG_TEST_RUN) with 1,
//! 1,000, 10,000 and 100,000 Services loaded, measured side by side with a no-op TC
//! program on the same input in the same run, so machine noise hits both alike.
//!
//! Two measurements per size:
//! - warm: one test run with repeat = 1,000,000 (as the floor in DATAPATH-NOTES was
//!   measured). The kernel re-runs the program on the same skb, already DNATed after
//!   the first pass, so the packet is aimed at a pair of Services that point at each
//!   other (A -> B, B -> A): every pass is a full established-flow Service path
//!   (frontend lookup, conntrack hit, backend, DNAT with checksums, route).
//! - cold: one test run per packet (repeat = 1) over 512 flows spread across all
//!   loaded Services: each run follows a syscall, so caches are cold - closer to a
//!   busy node. The kernel's per-run time includes its timer, equally for both programs.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use ferrite_common::{program_names, PROTO_TCP};
use ferrite_tests::{frames, testbed::Testbed};

const SIZES: [u32; 4] = [1, 1_000, 10_000, 100_000];
const FLOWS: usize = 512;
const ROUNDS: usize = 7;
const RUNS_PER_ROUND: usize = 4_096;
const WARM_REPEAT: u32 = 1_000_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const PING: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 97, 0, 1), 80);
const PONG: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 97, 0, 2), 80);

fn service_ip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + index)
}

fn backend_ip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + index)
}

/// Mean ns per pass of `program` over `repeat` passes on one frame (the kernel
/// reports the per-pass mean).
fn measure_warm(bed: &Testbed, program: &str, frame: &[u8]) -> Result<f64> {
    let (_, duration) = bed.run_program(program, frame, WARM_REPEAT)?;
    Ok(duration.as_nanos() as f64)
}

/// Mean ns per run of `program` over `frames`, one run per packet.
fn measure_cold(bed: &Testbed, program: &str, frames: &[Vec<u8>]) -> Result<f64> {
    let mut total = std::time::Duration::ZERO;
    for i in 0..RUNS_PER_ROUND {
        let (_, duration) = bed.run_program(program, &frames[i % frames.len()], 1)?;
        total += duration;
    }
    Ok(total.as_nanos() as f64 / RUNS_PER_ROUND as f64)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `ferrite-bench [datapath|overlay|control-plane]...`: the sections to run (all by default).
fn main() -> Result<()> {
    let sections: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    if run("datapath") {
        datapath_bench()?;
    }
    if run("overlay") {
        overlay_bench()?;
    }
    if run("control-plane") {
        control_plane_bench()?;
    }
    Ok(())
}

fn datapath_bench() -> Result<()> {
    let mut bed = Testbed::load()?;
    bed.add_endpoint(CLIENT, ferrite_tests::testbed::TEST_RUN_IFINDEX)?;
    bed.add_service(PING, PROTO_TCP, 65_535, u32::MAX - 1, &[PONG])?;
    bed.add_service(PONG, PROTO_TCP, 65_534, u32::MAX - 2, &[PING])?;
    let ping = frames::tcp_ack(SocketAddrV4::new(CLIENT, 10_000), PING, b"");
    bed.from_pod(&ping)?; // creates the pair's conntrack entries
    println!("Service path vs no-op TC program, BPF_PROG_TEST_RUN, 54-byte TCP frames,");
    println!("established flows; median of {ROUNDS} rounds, service and no-op interleaved\n");
    println!(
        "{:>9} | {:>12} {:>8} {:>9} {:>7} | {:>12} {:>8} {:>9} {:>7}",
        "",
        "warm service",
        "no-op",
        "overhead",
        "vs 1",
        "cold service",
        "no-op",
        "overhead",
        "vs 1"
    );
    println!(
        "{:>9} | {:>12} {:>8} {:>9} {:>7} | {:>12} {:>8} {:>9} {:>7}",
        "services", "ns/pkt", "ns/pkt", "ns", "", "ns/pkt", "ns/pkt", "ns", ""
    );
    let mut loaded = 0u32;
    let mut first = None;
    for size in SIZES {
        // Rev-NAT indexes are 16-bit (as Cilium's): past 65,535 Services they repeat,
        // which does not change the lookups measured here.
        while loaded < size {
            let frontend = SocketAddrV4::new(service_ip(loaded), 80);
            let backend = SocketAddrV4::new(backend_ip(loaded), 8080);
            let rev_nat = (loaded % 65_535) as u16 + 1;
            bed.add_service(frontend, PROTO_TCP, rev_nat, loaded + 1, &[backend])?;
            loaded += 1;
        }
        let step = (size as usize / FLOWS).max(1);
        let flows: Vec<Vec<u8>> = (0..FLOWS)
            .map(|i| {
                let service = ((i * step) % size as usize) as u32;
                frames::tcp_ack(
                    SocketAddrV4::new(CLIENT, 20_000 + i as u16),
                    SocketAddrV4::new(service_ip(service), 80),
                    b"",
                )
            })
            .collect();
        // Warm up: the first packet of each flow creates its conntrack entries.
        for frame in &flows {
            bed.from_pod(frame)?;
        }
        let mut samples: [Vec<f64>; 4] = Default::default();
        for _ in 0..ROUNDS {
            samples[0].push(measure_warm(&bed, program_names::FROM_POD, &ping)?);
            samples[1].push(measure_warm(&bed, program_names::NOOP, &ping)?);
            samples[2].push(measure_cold(&bed, program_names::FROM_POD, &flows)?);
            samples[3].push(measure_cold(&bed, program_names::NOOP, &flows)?);
        }
        let [warm, warm_noop, cold, cold_noop] = samples.map(median);
        let (first_warm, first_cold) = *first.get_or_insert((warm, cold));
        println!(
            "{size:>9} | {warm:>12.1} {warm_noop:>8.1} {:>+9.1} {:>6.2}x | {cold:>12.1} {cold_noop:>8.1} {:>+9.1} {:>6.2}x",
            warm - warm_noop,
            warm / first_warm,
            cold - cold_noop,
            cold / first_cold
        );
    }
    println!(
        "\ntargets: flat (<= 1.2x from 1 to 100,000 Services), <= +40 ns over the no-op program"
    );
    Ok(())
}

const TRANSFER_BYTES: usize = 512 << 20;
const CONNECTIONS: usize = 2_000;
const OVERLAY_ROUNDS: usize = 3;

/// Cross-node pod -> pod over VXLAN: Ferrite next to the flannel-style wiring (Linux
/// bridge + kernel vxlan + routes, no BPF), same underlay, MTU and traffic, rounds
/// alternating so noise hits both.
fn overlay_bench() -> Result<()> {
    use ferrite_tests::{
        cluster::TCP_TARGET,
        flannel::FlannelCluster,
        lab::{bulk_transfer, connection_loop, pod_ip, Cluster, Server},
    };
    let mut ferrite = Cluster::new(2)?;
    ferrite.nodes[0].add_pod("client", pod_ip(0, 0))?;
    ferrite.nodes[1].add_pod("server", pod_ip(1, 0))?;
    ferrite.write_config(&ferrite.nodes_and_pods_yaml())?;
    ferrite.start_agents()?;
    for node in &ferrite.nodes {
        node.wait_for_maps("overlay routes", |m| {
            m.pod_routes() == 2 && m.endpoints.len() == 1
        })?;
    }
    let flannel = FlannelCluster::new(2, 1500 - ferrite_common::VXLAN_OVERHEAD)?;
    let setups = [
        ("ferrite", ferrite.pod("client"), ferrite.pod("server")),
        ("flannel-style", &flannel.pods[0], &flannel.pods[1]),
    ];
    let _servers: Vec<Server> = setups
        .iter()
        .map(|(_, _, server)| server.serve(TCP_TARGET))
        .collect::<Result<_>>()?;
    let mut gbits: [Vec<f64>; 2] = Default::default();
    let mut rates: [Vec<f64>; 2] = Default::default();
    for round in 0..OVERLAY_ROUNDS {
        for (i, (_, client, server)) in setups.iter().enumerate() {
            let port = 9100 + round as u16;
            let (bytes, elapsed) = bulk_transfer(client, server, port, TRANSFER_BYTES)?;
            gbits[i].push(bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9);
            let to = SocketAddrV4::new(server.ip, TCP_TARGET);
            let elapsed = connection_loop(client, to, CONNECTIONS)?;
            rates[i].push(CONNECTIONS as f64 / elapsed.as_secs_f64());
        }
    }
    let [gbits_ferrite, gbits_flannel] = gbits.map(median);
    let [rate_ferrite, rate_flannel] = rates.map(median);
    println!("\nCross-node pod -> pod over VXLAN (pod MTU 1450), median of {OVERLAY_ROUNDS} alternating rounds\n");
    println!(
        "{:<28} {:>12} {:>15} {:>8}",
        "", "ferrite", "flannel-style", "ratio"
    );
    println!(
        "{:<28} {gbits_ferrite:>12.2} {gbits_flannel:>15.2} {:>7.2}x",
        "TCP throughput, Gbit/s",
        gbits_ferrite / gbits_flannel
    );
    println!(
        "{:<28} {rate_ferrite:>12.0} {rate_flannel:>15.0} {:>7.2}x",
        "TCP connections/s",
        rate_ferrite / rate_flannel
    );
    println!("\ntarget: ferrite >= flannel-style (ratio >= 1.00)");
    Ok(())
}

const CP_SERVICES: u32 = 10_000;
const CP_ENDPOINTS: u32 = 10;
const CP_CHANGES: usize = 100;

fn cp_vip(service: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + service)
}

fn cp_endpoint(service: u32, endpoint: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + service * CP_ENDPOINTS + endpoint)
}

fn cp_objects(service: u32, endpoints: &[Ipv4Addr]) -> (serde_json::Value, serde_json::Value) {
    use serde_json::json;
    let name = format!("svc-{service}");
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"clusterIP": cp_vip(service).to_string(),
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}});
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ip| json!({"addresses": [ip.to_string()],
            "conditions": {"ready": true}})).collect::<Vec<_>>()});
    (svc, slice)
}

/// kube-proxy's iptables layout for the same Services (KUBE-SERVICES -> KUBE-SVC-*
/// with statistic probabilities -> KUBE-SEP-* DNAT), as one iptables-restore input.
fn kube_proxy_rules(services: u32) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    for s in 0..services {
        let svc = format!("KUBE-SVC-{s:012}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j {svc}\n",
            cp_vip(s)
        ));
        for e in 0..CP_ENDPOINTS {
            let sep = format!("KUBE-SEP-{s:06}{e:06}");
            chains.push_str(&format!(":{sep} - [0:0]\n"));
            let remaining = CP_ENDPOINTS - e;
            if remaining > 1 {
                rules.push_str(&format!(
                    "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / remaining as f64
                ));
            } else {
                rules.push_str(&format!("-A {svc} -j {sep}\n"));
            }
            rules.push_str(&format!(
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {}:8080\n",
                cp_endpoint(s, e)
            ));
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn iptables_restore(
    netns: &ferrite_tests::lab::Netns,
    input: &str,
    noflush: bool,
) -> Result<std::time::Duration> {
    use std::io::Write;
    let mut command = std::process::Command::new("ip");
    command.args(["netns", "exec", &netns.name, "iptables-restore"]);
    if noflush {
        command.arg("--noflush");
    }
    let start = std::time::Instant::now();
    let mut child = command.stdin(std::process::Stdio::piped()).spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "iptables-restore failed");
    Ok(start.elapsed())
}

/// 10,000 Services x 10 endpoints from the fake API server into the maps, next to
/// kube-proxy's iptables-restore of the same set.
fn control_plane_bench() -> Result<()> {
    use ferrite_tests::{
        fake_apiserver::FakeApiServer,
        lab::{node_yaml, wait_until, Node},
    };
    use std::time::{Duration, Instant};
    let mut node = Node::new("cp")?;
    let api = FakeApiServer::start(&node.netns)?;
    api.apply_yaml(&node_yaml(
        &node.name,
        "198.51.100.1".parse()?,
        "10.244.0.0/24",
    ))?;
    for s in 0..CP_SERVICES {
        let endpoints: Vec<_> = (0..CP_ENDPOINTS).map(|e| cp_endpoint(s, e)).collect();
        let (svc, slice) = cp_objects(s, &endpoints);
        api.apply(svc);
        api.apply(slice);
    }
    let kubeconfig = node.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let start = Instant::now();
    node.start_agent_kube(&kubeconfig)?;
    let maps_ready = || {
        node.maps()
            .ok()
            .and_then(|m| {
                m.services
                    .get(
                        &ferrite_common::ServiceKey::new(cp_vip(CP_SERVICES - 1), 80, PROTO_TCP, 0),
                        0,
                    )
                    .ok()
            })
            .is_some()
    };
    wait_until("the first full sync", Duration::from_secs(120), maps_ready)?;
    let first_sync = start.elapsed();
    let pid = node.agent.as_ref().map(|a| a.pid()).unwrap_or(0);

    // Single EndpointSlice changes: the newest endpoint sorts last, so it lands in
    // the Service's last backend slot.
    let maps = node.maps()?;
    let mut latencies = Vec::new();
    for i in 0..CP_CHANGES {
        let service = (i as u32 * 97) % CP_SERVICES;
        let fresh = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 131, 0, 0)) + i as u32);
        let mut endpoints: Vec<_> = (1..CP_ENDPOINTS).map(|e| cp_endpoint(service, e)).collect();
        endpoints.push(fresh);
        let (_, slice) = cp_objects(service, &endpoints);
        let slot =
            ferrite_common::ServiceKey::new(cp_vip(service), 80, PROTO_TCP, CP_ENDPOINTS as u16);
        let changed = Instant::now();
        api.apply(slice);
        loop {
            let landed = maps
                .services
                .get(&slot, 0)
                .ok()
                .and_then(|v| maps.backends.get(&v.backend_id, 0).ok())
                .is_some_and(|b| b.address == fresh.octets());
            if landed {
                break;
            }
            anyhow::ensure!(
                changed.elapsed() < Duration::from_secs(30),
                "change {i} never reached the map"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        latencies.push(changed.elapsed().as_secs_f64() * 1000.0);
    }
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    drop(maps);
    drop(api);
    drop(node);

    // kube-proxy's side: the full restore, then one Service's chains rewritten.
    let netns = ferrite_tests::lab::Netns::new(&ferrite_tests::lab::unique("kp"))?;
    let full = kube_proxy_rules(CP_SERVICES);
    let full_restore = iptables_restore(&netns, &full, false)?;
    let one = kube_proxy_rules(1).replace(":KUBE-SERVICES - [0:0]\n", "");
    let mut one_change = Vec::new();
    for _ in 0..20 {
        one_change.push(iptables_restore(&netns, &one, true)?.as_secs_f64() * 1000.0);
    }

    println!("\nControl plane: {CP_SERVICES} Services x {CP_ENDPOINTS} endpoints from the fake API server\n");
    println!(
        "{:<44} {:>12} {:>22}",
        "", "ferrite", "kube-proxy (iptables)"
    );
    println!(
        "{:<44} {:>11.0}ms {:>21.0}ms",
        "first full sync (agent start -> maps / restore)",
        first_sync.as_secs_f64() * 1000.0,
        full_restore.as_secs_f64() * 1000.0
    );
    println!(
        "{:<44} {:>11.1}ms {:>21.1}ms",
        "one EndpointSlice change, p50",
        percentile(latencies.clone(), 0.5),
        percentile(one_change.clone(), 0.5)
    );
    println!(
        "{:<44} {:>11.1}ms {:>21.1}ms",
        "one EndpointSlice change, p99",
        percentile(latencies, 0.99),
        percentile(one_change, 0.99)
    );
    println!(
        "{:<44} {:>10}MB",
        "agent RSS after the changes",
        rss_kib / 1024
    );
    println!("\ntargets: full sync < 1 s, p99 < 5 ms, RSS < 100 MB (kube-proxy column: its restore of the same rules; one change = --noflush restore of one Service's chains)");
    Ok(())
}
