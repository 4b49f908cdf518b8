//! `cargo xtask bench latency`: request/response latency on an established flow,
//! what users feel once connections are open. One byte there and back, over and
//! over, on one TCP connection (and one UDP socket) from a client pod to an echoing
//! backend pod (`ferrite-probe ping-pong`, the same client and server for every
//! column), with 1 and 10,000 Services loaded (`comparison.rs`, as for `clusterip`):
//! - same node: three backends on the client's node. Ferrite with socket-level LB
//!   (the client in the node's cgroup) and per packet (the client outside it), next
//!   to the same client straight to a backend pod; kube-proxy's iptables and
//!   nftables layouts, each on a plainly routed node of its own next to its own
//!   direct baseline;
//! - cross-node: the client on node 0, one backend on node 1, over VXLAN. Ferrite's
//!   overlay as above; kube-proxy's layouts on the client's node of flannel's vxlan
//!   wiring (`ferrite_tests::flannel`, as the overlay bench's baseline), next to the
//!   same client straight to the backend pod over it.
//!
//! Transactions/s and p50/p99/p99.9 round-trip times, medians of alternating
//! rounds (each round starts with another column).
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use ferrite_tests::{
    flannel::FlannelCluster,
    lab::{pod_ip, Cluster, Netns, PingPong, Pod, Probe},
};
use socket2::Type;

use crate::{
    comparison::{
        listen, BenchNode, FerriteSetup, KubeProxyMode, KubeProxySetup, Setups, TimeWait, HTTP_PORT,
    },
    median,
};

/// The pod CIDR of flannel's wiring (`ferrite_tests::flannel`): kube-proxy's
/// `--cluster-cidr` there.
const FLANNEL_CLUSTER_CIDR: &str = "10.245.0.0/16";

const SIZES: [u32; 2] = [1, 10_000];
const ROUNDS: usize = 5;
const SECONDS: f64 = 2.0;

/// Echoes every byte it gets, over TCP (a thread per connection) and UDP, on
/// 0.0.0.0:HTTP_PORT in a pod (or another address of [`EchoServer::start_on`]).
/// Stopped on drop.
pub(crate) struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(netns: &Netns) -> Result<Box<dyn Send>> {
        Ok(Box::new(Self::start_on(
            netns,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HTTP_PORT),
        )?))
    }

    /// The server on `address` (`[::]` takes IPv6 alone, next to `0.0.0.0`'s).
    pub(crate) fn start_on(netns: &Netns, address: SocketAddr) -> Result<Self> {
        let listener: TcpListener = netns.run(|| listen(address, Type::STREAM))??.into();
        let udp: UdpSocket = netns.run(|| listen(address, Type::DGRAM))??.into();
        // Wake up now and then to see the stop flag (Linux applies SO_RCVTIMEO to accept).
        let tick = Duration::from_millis(200);
        nix::sys::socket::setsockopt(
            &listener,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )?;
        udp.set_read_timeout(Some(tick))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let tcp = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    continue;
                };
                let flag = flag.clone();
                connections.push(std::thread::spawn(move || {
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(tick));
                    let mut buf = [0u8; 64];
                    while !flag.load(Ordering::Relaxed) {
                        match stream.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => break,
                        }
                    }
                }));
            }
            for connection in connections {
                let _ = connection.join();
            }
        });
        let flag = stop.clone();
        let datagrams = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Self {
            stop,
            threads: vec![tcp, datagrams],
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One column: where it runs, what it goes through, the client, where it sends,
/// over which protocol, and the column of its direct baseline.
struct Column {
    place: &'static str,
    name: &'static str,
    client: Probe,
    to: SocketAddrV4,
    protocol: &'static str,
    direct: usize,
}

/// The medians of a column's rounds: transactions/s, p50, p99, p99.9 (µs).
pub(crate) fn medians(runs: &[PingPong]) -> [f64; 4] {
    let of = |f: &dyn Fn(&PingPong) -> f64| median(runs.iter().map(f).collect());
    [
        of(&|r| r.per_second()),
        of(&|r| r.p50_ns as f64 / 1e3),
        of(&|r| r.p99_ns as f64 / 1e3),
        of(&|r| r.p999_ns as f64 / 1e3),
    ]
}

const SAME_NODE: &str = "same node";
const CROSS_NODE: &str = "cross-node";
const PROTOCOLS: [&str; 2] = ["tcp", "udp"];

/// For each protocol: `client` straight to `backend` (the group's baseline), then
/// each of `through` (name, client) to `frontend`.
fn group(
    columns: &mut Vec<Column>,
    place: &'static str,
    direct: (&'static str, &Probe, SocketAddrV4),
    through: &[(&'static str, &Probe)],
    frontend: SocketAddrV4,
) {
    for protocol in PROTOCOLS {
        let base = columns.len();
        let (name, client, backend) = direct;
        columns.push(Column {
            place,
            name,
            client: client.clone(),
            to: backend,
            protocol,
            direct: base,
        });
        for (name, client) in through {
            columns.push(Column {
                place,
                name,
                client: (*client).clone(),
                to: frontend,
                protocol,
                direct: base,
            });
        }
    }
}

/// The same client outside the node's cgroup subtree: per packet, not socket-level.
fn outside_cgroup(pod: &Pod) -> Probe {
    Probe {
        cgroup: None,
        ..pod.probe()
    }
}

pub fn bench() -> Result<()> {
    // Same node: Ferrite, and kube-proxy's layouts on plainly routed nodes of their own.
    let mut ferrite = BenchNode::serving("latf", 0, 1, TimeWait::Off, EchoServer::start)?;
    let iptables = BenchNode::serving("lati", 1, 1, TimeWait::Off, EchoServer::start)?;
    let nftables = BenchNode::serving("latn", 2, 1, TimeWait::Off, EchoServer::start)?;
    iptables.route_plainly()?;
    nftables.route_plainly()?;
    ferrite.start_agent()?;
    // Cross-node: the client on node 0, the backend on node 1, over VXLAN; Ferrite's
    // overlay, and flannel's vxlan wiring with kube-proxy on the client's node.
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("client", pod_ip(0, 0))?;
    cluster.nodes[1].add_pod("web", pod_ip(1, 10))?;
    let _cluster_server = EchoServer::start(&cluster.nodes[1].pods[0].netns)?;
    for node in &mut cluster.nodes {
        node.resync_seconds = 3600;
    }
    let cluster_objects = cluster.nodes_and_pods_yaml();
    cluster.write_config(&cluster_objects)?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("overlay routes", |m| m.pod_routes() == 2)?;
    }
    let flannel_iptables = FlannelCluster::new(2, 1500 - ferrite_common::VXLAN_OVERHEAD)?;
    let flannel_nftables = FlannelCluster::new(2, 1500 - ferrite_common::VXLAN_OVERHEAD)?;
    let _flannel_servers = [
        EchoServer::start(&flannel_iptables.pods[1].netns)?,
        EchoServer::start(&flannel_nftables.pods[1].netns)?,
    ];
    let same_node_kube_proxy = [
        (KubeProxyMode::Nftables, &nftables),
        (KubeProxyMode::Iptables, &iptables),
    ];
    let cross_node_kube_proxy = [
        (KubeProxyMode::Nftables, &flannel_nftables),
        (KubeProxyMode::Iptables, &flannel_iptables),
    ];
    let mut kube_proxy: Vec<KubeProxySetup> = same_node_kube_proxy
        .iter()
        .map(|(mode, node)| node.kube_proxy_setup(*mode))
        .collect();
    for (mode, flannel) in cross_node_kube_proxy {
        kube_proxy.push(KubeProxySetup {
            mode,
            netns: &flannel.nodes[0],
            backends: vec![flannel.pods[1].ip],
            cluster_cidr: FLANNEL_CLUSTER_CIDR,
        });
    }
    let setups = Setups {
        ferrite: vec![
            FerriteSetup {
                nodes: vec![&ferrite.node],
                objects: ferrite.node.pods_yaml(),
                backends: ferrite.backends(),
            },
            FerriteSetup {
                nodes: cluster.nodes.iter().collect(),
                objects: cluster_objects,
                backends: vec![cluster.nodes[1].pods[0].ip],
            },
        ],
        kube_proxy,
        protocols: &PROTOCOLS,
        single_backend: false,
    };
    println!(
        "\nRequest/response on an established flow: 1 byte there and back (ferrite-probe ping-pong, {SECONDS} s per run), client pod -> ClusterIP; same node: 3 echoing backends on the client's node; cross-node: 1 echoing backend on the other node (VXLAN); medians of {ROUNDS} alternating rounds\n"
    );
    println!(
        "{:>8} {:<10} {:<5} {:<26} {:>9} {:>8} {:>8} {:>8} | {:>7} {:>7}",
        "services",
        "placement",
        "proto",
        "path",
        "trans/s",
        "p50 µs",
        "p99 µs",
        "p99.9",
        "tps/dir",
        "p99/dir"
    );
    let mut summary = Vec::new();
    for count in crate::sizes(&SIZES) {
        let prepared = setups.prepare(count)?;
        let frontend = prepared.frontend;
        let mut columns = Vec::new();
        let (socket_client, packet_client) =
            (ferrite.client(0).probe(), outside_cgroup(ferrite.client(0)));
        let ferrite_paths = |socket, packet| {
            [
                ("ferrite, socket-level LB", socket),
                ("ferrite, per packet", packet),
            ]
        };
        group(
            &mut columns,
            SAME_NODE,
            (
                "direct to a backend pod",
                &socket_client,
                SocketAddrV4::new(ferrite.backends()[0], HTTP_PORT),
            ),
            &ferrite_paths(&socket_client, &packet_client),
            frontend,
        );
        let cross_client = cluster.nodes[0].pods[0].probe();
        let cross_packet_client = outside_cgroup(&cluster.nodes[0].pods[0]);
        group(
            &mut columns,
            CROSS_NODE,
            (
                "direct to the backend pod",
                &cross_client,
                SocketAddrV4::new(cluster.nodes[1].pods[0].ip, HTTP_PORT),
            ),
            &ferrite_paths(&cross_client, &cross_packet_client),
            frontend,
        );
        if prepared.kube_proxy {
            for (mode, node) in same_node_kube_proxy {
                let client = outside_cgroup(node.client(0));
                group(
                    &mut columns,
                    SAME_NODE,
                    (
                        "direct (its own node)",
                        &client,
                        SocketAddrV4::new(node.backends()[0], HTTP_PORT),
                    ),
                    &[(mode.name(), &client)],
                    frontend,
                );
            }
            for (mode, flannel) in cross_node_kube_proxy {
                let client = flannel.pods[0].probe();
                group(
                    &mut columns,
                    CROSS_NODE,
                    (
                        "direct (flannel vxlan)",
                        &client,
                        SocketAddrV4::new(flannel.pods[1].ip, HTTP_PORT),
                    ),
                    &[(mode.name(), &client)],
                    frontend,
                );
            }
        }
        let mut runs: Vec<Vec<PingPong>> = columns.iter().map(|_| Vec::new()).collect();
        for round in 0..ROUNDS {
            for step in 0..columns.len() {
                let index = (round + step) % columns.len();
                let column = &columns[index];
                runs[index].push(
                    column
                        .client
                        .ping_pong(column.to, column.protocol, SECONDS)?,
                );
            }
        }
        let results: Vec<[f64; 4]> = runs.iter().map(|r| medians(r)).collect();
        for (column, result) in columns.iter().zip(&results) {
            let direct = results[column.direct];
            println!(
                "{count:>8} {:<10} {:<5} {:<26} {:>9.0} {:>8.1} {:>8.1} {:>8.1} | {:>6.2}x {:>6.2}x",
                column.place,
                column.protocol,
                column.name,
                result[0],
                result[1],
                result[2],
                result[3],
                result[0] / direct[0],
                result[2] / direct[2],
            );
        }
        // Each Ferrite path next to the nftables layout of its placement and protocol.
        for (column, result) in columns.iter().zip(&results) {
            let nftables = columns.iter().position(|c| {
                c.name == KubeProxyMode::Nftables.name()
                    && c.place == column.place
                    && c.protocol == column.protocol
            });
            if let (true, Some(nftables)) = (column.name.starts_with("ferrite"), nftables) {
                summary.push(format!(
                    "{count:>8} {:<10} {:<5} {:<26} {:.2}x the transactions/s of kube-proxy nftables",
                    column.place,
                    column.protocol,
                    column.name,
                    result[0] / results[nftables][0]
                ));
            }
        }
    }
    println!();
    for line in summary {
        println!("{line}");
    }
    println!("\ntargets: socket-level LB >= 0.98x direct transactions/s and p99 within 5 %; per packet >= 0.95x direct; both ahead of nftables");
    Ok(())
}
