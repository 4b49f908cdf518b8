//! `cargo xtask bench latency`: request/response latency on an established flow,
//! what users feel once connections are open. One byte there and back, over and
//! over, on one TCP connection (and one UDP socket) from a client pod to one of three
//! echoing backend pods on its node (`ferrite-probe ping-pong`, the same client and
//! server for every column), with 1 and 10,000 Services loaded:
//! - Ferrite with socket-level LB (the client in the node's cgroup) and per packet
//!   (the client outside it), next to the same client straight to a backend pod;
//! - kube-proxy's iptables and nftables layouts (TCP), each on a node of its own next
//!   to its own direct baseline.
//!
//! Transactions/s and p50/p99/p99.9 round-trip times, medians of alternating
//! rounds (each round starts with another column).
use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;
use ferrite_common::{ServiceKey, PROTO_TCP, PROTO_UDP};
use ferrite_tests::lab::{wait_until, Netns, PingPong, Probe};

use crate::{
    clusterip::{
        fill_ferrite, iptables_rules, measured_yaml_with, nft, nftables_rules, service_ip,
        BenchNode, HTTP_PORT, KUBE_PROXY_MAX,
    },
    iptables_restore, median,
};

const SIZES: [u32; 2] = [1, 10_000];
const ROUNDS: usize = 3;
const SECONDS: f64 = 2.0;

/// Echoes every byte it gets, over TCP (a thread per connection) and UDP, on
/// 0.0.0.0:HTTP_PORT in a pod. Stopped on drop.
struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(netns: &Netns) -> Result<Box<dyn Send>> {
        let listener = netns.run(|| TcpListener::bind(("0.0.0.0", HTTP_PORT)))??;
        let udp = netns.run(|| UdpSocket::bind(("0.0.0.0", HTTP_PORT)))??;
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
        Ok(Box::new(Self {
            stop,
            threads: vec![tcp, datagrams],
        }))
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

/// One column: its name, the client, where it sends, over which protocol, and the
/// column of its direct baseline.
struct Column {
    name: &'static str,
    client: Probe,
    to: SocketAddrV4,
    protocol: &'static str,
    direct: usize,
}

/// The medians of a column's rounds: transactions/s, p50, p99, p99.9 (µs).
fn medians(runs: &[PingPong]) -> [f64; 4] {
    let of = |f: &dyn Fn(&PingPong) -> f64| median(runs.iter().map(f).collect());
    [
        of(&|r| r.per_second()),
        of(&|r| r.p50_ns as f64 / 1e3),
        of(&|r| r.p99_ns as f64 / 1e3),
        of(&|r| r.p999_ns as f64 / 1e3),
    ]
}

pub fn bench() -> Result<()> {
    let ferrite = BenchNode::serving("latf", 0, EchoServer::start)?;
    let iptables = BenchNode::serving("lati", 1, EchoServer::start)?;
    let nftables = BenchNode::serving("latn", 2, EchoServer::start)?;
    iptables.route_plainly()?;
    nftables.route_plainly()?;
    println!(
        "\nRequest/response on an established flow: 1 byte there and back (ferrite-probe ping-pong, {SECONDS} s per run), client pod -> ClusterIP with 3 echoing backends on its node; medians of {ROUNDS} alternating rounds\n"
    );
    println!(
        "{:>8} {:<5} {:<26} {:>9} {:>8} {:>8} {:>8} | {:>7} {:>7}",
        "services", "proto", "path", "trans/s", "p50 µs", "p99 µs", "p99.9", "tps/dir", "p99/dir"
    );
    let ferrite_backends = ferrite.backends();
    let mut node = ferrite.node;
    node.resync_seconds = 3600;
    let mut agent_started = false;
    for count in SIZES {
        let measured = count / 2;
        let vip = service_ip(measured);
        let frontend = SocketAddrV4::new(vip, 80);
        node.write_config(&measured_yaml_with(
            &node,
            vip,
            &ferrite_backends,
            &["TCP", "UDP"],
        ))?;
        if !agent_started {
            node.start_agent()?;
            agent_started = true;
        }
        let n = &node;
        wait_until(
            "the measured Service in the maps",
            Duration::from_secs(60),
            || {
                n.maps().is_ok_and(|m| {
                    [PROTO_TCP, PROTO_UDP].iter().all(|proto| {
                        m.services
                            .get(&ServiceKey::new(vip, 80, *proto, 0), 0)
                            .is_ok_and(|v| v.count == 3)
                    })
                })
            },
        )?;
        fill_ferrite(&node, count, measured)?;
        let kube_proxy = count <= KUBE_PROXY_MAX;
        if kube_proxy {
            iptables_restore(
                &iptables.node.netns,
                &iptables_rules(count, measured, &iptables.backends()),
                false,
            )?;
            nft(
                &nftables.node.netns,
                &nftables_rules(count, measured, &nftables.backends()),
            )?;
        }
        let socket_client = node.pods[0].probe();
        let packet_client = Probe {
            cgroup: None,
            ..node.pods[0].probe()
        };
        let direct = SocketAddrV4::new(ferrite_backends[0], HTTP_PORT);
        let mut columns = Vec::new();
        for protocol in ["tcp", "udp"] {
            let base = columns.len();
            columns.extend([
                Column {
                    name: "direct to a backend pod",
                    client: socket_client.clone(),
                    to: direct,
                    protocol,
                    direct: base,
                },
                Column {
                    name: "ferrite, socket-level LB",
                    client: socket_client.clone(),
                    to: frontend,
                    protocol,
                    direct: base,
                },
                Column {
                    name: "ferrite, per packet",
                    client: packet_client.clone(),
                    to: frontend,
                    protocol,
                    direct: base,
                },
            ]);
        }
        if kube_proxy {
            for (name, other) in [
                ("kube-proxy nftables", &nftables),
                ("kube-proxy iptables", &iptables),
            ] {
                let client = Probe {
                    cgroup: None,
                    ..other.client().probe()
                };
                let base = columns.len();
                columns.push(Column {
                    name: "direct (its own node)",
                    client: client.clone(),
                    to: SocketAddrV4::new(other.backends()[0], HTTP_PORT),
                    protocol: "tcp",
                    direct: base,
                });
                columns.push(Column {
                    name,
                    client,
                    to: frontend,
                    protocol: "tcp",
                    direct: base,
                });
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
                "{count:>8} {:<5} {:<26} {:>9.0} {:>8.1} {:>8.1} {:>8.1} | {:>6.2}x {:>6.2}x",
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
        if let Some(nftables) = columns.iter().position(|c| c.name == "kube-proxy nftables") {
            for (column, result) in columns.iter().zip(&results) {
                if column.protocol == "tcp" && column.name.starts_with("ferrite") {
                    println!(
                        "{count:>8} tcp   {:<26} {:.2}x the transactions/s of kube-proxy nftables",
                        column.name,
                        result[0] / results[nftables][0]
                    );
                }
            }
        }
    }
    println!("\ntargets: socket-level LB >= 0.98x direct transactions/s and p99 within 5 %; per packet >= 0.95x direct; both ahead of nftables");
    drop(node);
    Ok(())
}
