//! `cargo xtask bench clusterip-families`: a dual-stack Service's IPv6 ClusterIP next
//! to its IPv4 one, from the same client pod to the same three backend pods on its
//! node, balanced at the socket (`ferrite_connect4` / `ferrite_connect6` and the
//! datagram hooks; IPv6 has no per-packet Service path). For each family:
//! - TCP connections/s through the ClusterIP (wrk as in `clusterip`, `Connection:
//!   close`), next to the same client straight to the backends' addresses of that
//!   family, one wrk thread each (the floor);
//! - request/response on an established flow, TCP and UDP (`ferrite-probe
//!   ping-pong` as in `latency`), through the ClusterIP and straight to a backend.
//!
//! Backends without TIME_WAIT, so no run depends on the ones before. Rounds alternate
//! (each starts with another column), medians; then the IPv6/IPv4 ratio of each.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{ensure, Result};
use ferrite_common::stat;
use ferrite_tests::{
    bench_families::Family,
    lab::{pod_ip, pod_ip6, sh, Cluster, Node, PingPong, Probe},
};

use crate::{
    clusterip::{wrk, HttpServer},
    comparison::HTTP_PORT,
    latency::{medians, EchoServer},
    median,
};

/// The measured Service's ClusterIPs, one per family.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 1);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0x3, 0x1);
/// Its ports: HTTP (80 -> HTTP_PORT) and echo (81 -> ECHO_PORT, TCP and UDP).
const SERVICE_HTTP_PORT: u16 = 80;
const SERVICE_ECHO_PORT: u16 = 81;
const ECHO_PORT: u16 = HTTP_PORT + 1;
const BACKENDS: usize = 3;
const ROUNDS: usize = 5;
const PING_PONG_SECONDS: f64 = 2.0;
/// The target: IPv6 paths within 1.15x of IPv4's cost.
const TARGET: f64 = 1.15;

/// What a column measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Measure {
    /// wrk's connections/s.
    Connections,
    /// One-byte round trips over `tcp` or `udp`: transactions/s, p50, p99, p99.9 (µs).
    PingPong(&'static str),
}

impl Measure {
    const ALL: [Self; 3] = [
        Self::Connections,
        Self::PingPong("tcp"),
        Self::PingPong("udp"),
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Connections => "TCP connections/s",
            Self::PingPong("tcp") => "TCP request/response",
            Self::PingPong(_) => "UDP request/response",
        }
    }
}

/// One column: a measure in a family, through the ClusterIP or straight to backends.
#[derive(Clone, Copy)]
struct Column {
    measure: Measure,
    family: Family,
    through_service: bool,
}

/// The address of `family` among a dual-stack pair.
fn of(family: Family, ip: Ipv4Addr, ip6: Ipv6Addr) -> IpAddr {
    match family {
        Family::Ipv4 => ip.into(),
        Family::Ipv6 => ip6.into(),
    }
}

fn endpoints_yaml(family: Family, backends: &[IpAddr]) -> String {
    let name = family.name();
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: measured-{name}
  namespace: default
  labels: {{kubernetes.io/service-name: measured}}
addressType: {name}
ports:
- {{name: http, port: {HTTP_PORT}, protocol: TCP}}
- {{name: echo, port: {ECHO_PORT}, protocol: TCP}}
- {{name: echo-udp, port: {ECHO_PORT}, protocol: UDP}}
endpoints:
{endpoints}"
    )
}

/// The dual-stack Service and both families' EndpointSlices.
fn service_yaml(backends: &[(Ipv4Addr, Ipv6Addr)]) -> String {
    let [backends4, backends6]: [Vec<IpAddr>; 2] =
        Family::ALL.map(|f| backends.iter().map(|(ip, ip6)| of(f, *ip, *ip6)).collect());
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: measured, namespace: default}}
spec:
  clusterIP: {CLUSTER_IP}
  clusterIPs: [{CLUSTER_IP}, \"{CLUSTER_IP6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: {SERVICE_HTTP_PORT}, protocol: TCP, targetPort: {HTTP_PORT}}}
  - {{name: echo, port: {SERVICE_ECHO_PORT}, protocol: TCP, targetPort: {ECHO_PORT}}}
  - {{name: echo-udp, port: {SERVICE_ECHO_PORT}, protocol: UDP, targetPort: {ECHO_PORT}}}
---
{}---
{}",
        endpoints_yaml(Family::Ipv4, &backends4),
        endpoints_yaml(Family::Ipv6, &backends6),
    )
}

fn sockets_translated(node: &Node) -> Result<u64> {
    Ok(node.maps()?.counters()?[stat::SOCK_TRANSLATED as usize].packets)
}

pub fn bench() -> Result<()> {
    let mut cluster = Cluster::new(1)?;
    cluster.dual_stack()?;
    let node = &mut cluster.nodes[0];
    node.resync_seconds = 3600;
    node.add_dual_stack_pod("client", pod_ip(0, 0), pod_ip6(0, 0))?;
    let backends: Vec<(Ipv4Addr, Ipv6Addr)> = (0..BACKENDS)
        .map(|b| (pod_ip(0, 10 + b), pod_ip6(0, 10 + b)))
        .collect();
    let mut servers: Vec<Box<dyn Send>> = Vec::new();
    for (b, (ip, ip6)) in backends.iter().enumerate() {
        let index = node.add_dual_stack_pod(&format!("web-{b}"), *ip, *ip6)?;
        let netns = &node.pods[index].netns;
        // The server closes first, so TIME_WAIT would land on it (shared by both families).
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &netns.name,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_max_tw_buckets=0",
            ],
        )?;
        for family in Family::ALL {
            let any = of(family, Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED);
            servers.push(Box::new(HttpServer::start_on(netns, any)?));
            servers.push(Box::new(EchoServer::start_on(
                netns,
                SocketAddr::new(any, ECHO_PORT),
            )?));
        }
    }
    cluster.write_config(&format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        service_yaml(&backends)
    ))?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    node.wait_for_maps("both ClusterIPs with their backends", |m| {
        let full = |count: u16| count as usize == BACKENDS;
        m.services
            .iter()
            .any(|(k, v)| k.address == CLUSTER_IP.octets() && k.backend_slot == 0 && full(v.count))
            && m.services6.iter().any(|(k, v)| {
                k.address == CLUSTER_IP6.octets() && k.backend_slot == 0 && full(v.count)
            })
    })?;
    let client: Probe = cluster.pod("client").probe();

    let columns: Vec<Column> = Measure::ALL
        .into_iter()
        .flat_map(|measure| {
            Family::ALL.into_iter().flat_map(move |family| {
                [true, false].map(|through_service| Column {
                    measure,
                    family,
                    through_service,
                })
            })
        })
        .collect();
    // Every column's runs: ping-pong results, or wrk's connections/s.
    let mut runs: Vec<Vec<PingPong>> = columns.iter().map(|_| Vec::new()).collect();
    let mut rates: Vec<Vec<f64>> = columns.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for step in 0..columns.len() {
            let index = (round + step) % columns.len();
            let column = columns[index];
            let frontend = of(column.family, CLUSTER_IP, CLUSTER_IP6);
            let backend = |b: &(Ipv4Addr, Ipv6Addr)| of(column.family, b.0, b.1);
            let translated = sockets_translated(node)?;
            match column.measure {
                Measure::Connections => {
                    let targets: Vec<SocketAddr> = if column.through_service {
                        vec![SocketAddr::new(frontend, SERVICE_HTTP_PORT)]
                    } else {
                        backends
                            .iter()
                            .map(|b| SocketAddr::new(backend(b), HTTP_PORT))
                            .collect()
                    };
                    rates[index].push(wrk(&client, &targets)?);
                }
                Measure::PingPong(protocol) => {
                    let to = if column.through_service {
                        SocketAddr::new(frontend, SERVICE_ECHO_PORT)
                    } else {
                        SocketAddr::new(backend(&backends[0]), ECHO_PORT)
                    };
                    runs[index].push(client.ping_pong(to, protocol, PING_PONG_SECONDS)?);
                }
            }
            // Through the Service, every family's connections are balanced at the
            // socket: no per-packet path can stand in for a missed translation.
            let translated = sockets_translated(node)? - translated;
            ensure!(
                translated > 0 || !column.through_service,
                "{} {}: no socket translated",
                column.family.name(),
                column.measure.label()
            );
        }
    }
    // Per column: transactions (or connections)/s, then p50, p99 (µs) for ping-pong.
    let results: Vec<Vec<f64>> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| match column.measure {
            Measure::Connections => vec![median(rates[i].clone())],
            Measure::PingPong(_) => medians(&runs[i])[..3].to_vec(),
        })
        .collect();
    let find = |measure, family, through_service| {
        let i = columns
            .iter()
            .position(|c| {
                c.measure == measure && c.family == family && c.through_service == through_service
            })
            .expect("every column is measured");
        &results[i]
    };

    println!(
        "\nA dual-stack ClusterIP from a client pod, socket-level LB, IPv6 next to IPv4: the same client, the same {BACKENDS} backend pods on its node; wrk (Connection: close) and ferrite-probe ping-pong ({PING_PONG_SECONDS} s); backends without TIME_WAIT; medians of {ROUNDS} alternating rounds\n"
    );
    println!(
        "{:<22} {:<6} {:>10} {:>10} {:>8} | {:>9} {:>9} {:>9} {:>9}",
        "", "family", "ClusterIP", "direct", "svc/dir", "svc p50", "svc p99", "dir p50", "dir p99"
    );
    let mut verdicts = Vec::new();
    for measure in Measure::ALL {
        for family in Family::ALL {
            let (service, direct) = (find(measure, family, true), find(measure, family, false));
            let latency = |r: &[f64]| match r {
                [_, p50, p99] => (format!("{p50:.1}"), format!("{p99:.1}")),
                _ => ("-".into(), "-".into()),
            };
            let (service_p50, service_p99) = latency(service);
            let (direct_p50, direct_p99) = latency(direct);
            println!(
                "{:<22} {:<6} {:>10.0} {:>10.0} {:>7.2}x | {:>9} {:>9} {:>9} {:>9}",
                measure.label(),
                family.name(),
                service[0],
                direct[0],
                service[0] / direct[0],
                service_p50,
                service_p99,
                direct_p50,
                direct_p99
            );
        }
        let [v4, v6] = Family::ALL.map(|f| find(measure, f, true));
        let [d4, d6] = Family::ALL.map(|f| find(measure, f, false));
        // The cost of an operation is the inverse of its rate.
        let cost = v4[0] / v6[0];
        let mut line = format!(
            "{:<22} IPv6/IPv4 through the ClusterIP: {:.2}x the rate ({cost:.2}x the time per operation); direct {:.2}x",
            measure.label(),
            v6[0] / v4[0],
            d6[0] / d4[0]
        );
        // Ping-pong's p99 (µs), next to the same ratio straight to a backend.
        if let (Some(p99_4), Some(p99), Some(direct_p99_4), Some(direct_p99)) =
            (v4.get(2), v6.get(2), d4.get(2), d6.get(2))
        {
            line.push_str(&format!(
                "; p99 {:.2}x (direct {:.2}x)",
                p99 / p99_4,
                direct_p99 / direct_p99_4
            ));
        }
        let met = if cost <= TARGET { "met" } else { "NOT met" };
        verdicts.push(format!("{line} -> {met}"));
    }
    println!();
    for line in verdicts {
        println!("{line}");
    }
    println!("\ntarget: IPv6 within {TARGET:.2}x of IPv4 (time per connection / per transaction through the ClusterIP)");
    drop(servers);
    Ok(())
}
