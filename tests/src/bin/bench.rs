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

fn main() -> Result<()> {
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
    drop(bed);
    overlay_bench()
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
            m.routes.len() == 2 && m.endpoints.len() == 1
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
