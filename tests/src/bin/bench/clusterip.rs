//! `cargo xtask bench clusterip`: the TCP connection rate (wrk, `Connection: close`,
//! 3 threads x 11 connections) from a client pod to a ClusterIP with three backend
//! pods on the node, with 1 to 100,000 Services loaded and the measured one in the
//! middle, side by side in one run (rounds alternate, each starting with another
//! measurement) with:
//! - the same client straight to the backend pods' IPs, one wrk thread each (the
//!   floor: the same servers loaded the same way);
//! - Ferrite per packet (the client outside the node's cgroup subtree, which is what
//!   `--socket-lb=false` gives every client);
//! - kube-proxy's iptables layout (KUBE-SERVICES -> KUBE-SVC with statistic
//!   probabilities -> KUBE-SEP DNAT) and its nftables layout (a verdict map of
//!   Service address . protocol . port, numgen over the endpoints) on nodes of their
//!   own, each with its own direct baseline.
//!
//! Filler Services are written straight into the maps (one backend each, never
//! reached): through the agent they would each need a rev-NAT index, and those are
//! 16-bit (65,535 frontends per node, as in Cilium). The kube-proxy layouts stop at
//! 10,000 Services: restoring 100,000 takes many minutes (printed as skipped).
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use ferrite_agent::{
    model::{L4Addr, Protocol},
    plan::{self, FrontendEntries, MapContents},
};
use ferrite_common::{ServiceKey, PROTO_TCP};
use ferrite_tests::lab::{pod_ip, sh, wait_until, Netns, Node, Probe};

use crate::{iptables_restore, kube_proxy_endpoints, median};

const SIZES: [u32; 4] = [1, 1_000, 10_000, 100_000];
/// kube-proxy layouts are measured up to this many Services.
pub(crate) const KUBE_PROXY_MAX: u32 = 10_000;
const ROUNDS: usize = 5;
const WRK_SECONDS: u32 = 3;
/// wrk threads: one per backend, so a direct run can load each backend as a Service does.
const WRK_THREADS: u32 = 3;
const CONNECTIONS_PER_THREAD: u32 = 11;
pub(crate) const HTTP_PORT: u16 = 8080;
const BACKENDS: usize = 3;

/// Filler Service `index` (of `count`): the measured one takes the middle index.
pub(crate) fn service_ip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + index)
}

fn filler_backend(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + index)
}

/// An HTTP server on 0.0.0.0:HTTP_PORT in `netns`: a few threads accepting, each
/// answering one request per connection ("200 ok", then close). Stopped on drop.
pub(crate) struct HttpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub(crate) fn start(netns: &Netns) -> Result<Self> {
        let listener = netns.run(|| TcpListener::bind(("0.0.0.0", HTTP_PORT)))??;
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
pub(crate) fn wrk(probe: &Probe, targets: &[SocketAddrV4]) -> Result<f64> {
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

/// One node of the comparison: a client pod and BACKENDS backend pods with HTTP
/// servers. `ferrite`: an agent runs on it (else plain routing, a rule set does NAT).
pub(crate) struct BenchNode {
    pub(crate) node: Node,
    _servers: Vec<Box<dyn Send>>,
}

impl BenchNode {
    fn new(label: &str, index: usize) -> Result<Self> {
        Self::serving(label, index, |netns| {
            Ok(Box::new(HttpServer::start(netns)?) as Box<dyn Send>)
        })
    }

    /// The node, its backends' servers started by `serve` (on HTTP_PORT).
    pub(crate) fn serving(
        label: &str,
        index: usize,
        serve: impl Fn(&Netns) -> Result<Box<dyn Send>>,
    ) -> Result<Self> {
        let mut node = Node::new(label)?;
        node.add_pod("client", pod_ip(index, 0))?;
        let mut servers = Vec::new();
        for b in 0..BACKENDS {
            node.add_pod(&format!("web-{b}"), pod_ip(index, 10 + b))?;
            let netns = &node.pods[b + 1].netns;
            // The server closes first, so TIME_WAIT lands on it: tens of thousands per
            // run, and a later run reusing those tuples (socket-level LB makes them
            // the same as direct ones) would pay for the earlier run's. Without
            // TIME_WAIT no run depends on the one before.
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
            servers.push(serve(netns)?);
        }
        Ok(Self {
            node,
            _servers: servers,
        })
    }

    pub(crate) fn backends(&self) -> Vec<Ipv4Addr> {
        self.node.pods[1..].iter().map(|p| p.ip).collect()
    }

    pub(crate) fn client(&self) -> &ferrite_tests::lab::Pod {
        &self.node.pods[0]
    }

    /// Pods reached by plain routing (no Ferrite): /32 routes to the host veths and
    /// forwarding, as a bridge-less CNI wires them.
    pub(crate) fn route_plainly(&self) -> Result<()> {
        for pod in &self.node.pods {
            sh(
                "ip",
                &[
                    "-n",
                    &self.node.netns.name,
                    "route",
                    "add",
                    &format!("{}/32", pod.ip),
                    "dev",
                    &pod.host_interface,
                ],
            )?;
        }
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.node.netns.name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        Ok(())
    }
}

/// The measured Service (TCP 80 -> HTTP_PORT on the backends) for the agent.
fn measured_yaml(node: &Node, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> String {
    measured_yaml_with(node, vip, backends, &["TCP"])
}

/// The measured Service with port 80 -> HTTP_PORT for each of `protocols`.
pub(crate) fn measured_yaml_with(
    node: &Node,
    vip: Ipv4Addr,
    backends: &[Ipv4Addr],
    protocols: &[&str],
) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    let service_ports: Vec<String> = protocols
        .iter()
        .map(|p| {
            format!(
                "{{name: {}, port: 80, protocol: {p}, targetPort: {HTTP_PORT}}}",
                p.to_lowercase()
            )
        })
        .collect();
    let slice_ports: Vec<String> = protocols
        .iter()
        .map(|p| {
            format!(
                "{{name: {}, port: {HTTP_PORT}, protocol: {p}}}",
                p.to_lowercase()
            )
        })
        .collect();
    format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: measured, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: measured-1, namespace: default, labels: {{kubernetes.io/service-name: measured}}}}\naddressType: IPv4\nports: [{}]\nendpoints:\n{endpoints}",
        node.pods_yaml(),
        service_ports.join(", "),
        slice_ports.join(", ")
    )
}

/// Filler Services `0..count` but `measured`, written into the pinned maps as the
/// agent lays them out (no rev-NAT entry: no reply of theirs is ever translated).
pub(crate) fn fill_ferrite(node: &Node, count: u32, measured: u32) -> Result<()> {
    let mut entries = MapContents::default();
    let tcp = |ip, port| L4Addr {
        ip,
        port,
        protocol: Protocol::Tcp,
    };
    for index in (0..count).filter(|i| *i != measured) {
        let id = 1_000_000 + index;
        let backend = tcp(filler_backend(index), HTTP_PORT);
        entries.backends.insert(id, plan::backend_value(&backend));
        FrontendEntries {
            frontend: tcp(service_ip(index), 80),
            scope: ferrite_common::service_scope::ALL,
            rev_nat_index: u16::MAX,
            backend_ids: &[id],
            ready: 1,
            flags: 0,
            affinity_timeout_s: 0,
        }
        .write_into(&mut entries);
    }
    let ops = plan::diff(&MapContents::default(), &entries);
    node.maps()?.apply(&ops)
}

/// kube-proxy's iptables layout for `count` Services, the measured one among them.
pub(crate) fn iptables_rules(count: u32, measured: u32, backends: &[Ipv4Addr]) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let mut rules = String::from("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n");
    for index in 0..count {
        let svc = format!("KUBE-SVC-{index:012}");
        chains.push_str(&format!(":{svc} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j {svc}\n",
            service_ip(index)
        ));
        let endpoints: Vec<SocketAddrV4> = if index == measured {
            backends
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
                .collect()
        } else {
            vec![SocketAddrV4::new(filler_backend(index), HTTP_PORT)]
        };
        kube_proxy_endpoints(
            &svc,
            &format!("{index:08}"),
            2,
            &endpoints,
            &mut chains,
            &mut rules,
        );
    }
    format!("{chains}{rules}COMMIT\n")
}

/// kube-proxy's nftables layout: the Service verdict map, a chain per Service with
/// numgen over its endpoints, a DNAT chain per endpoint.
pub(crate) fn nftables_rules(count: u32, measured: u32, backends: &[Ipv4Addr]) -> String {
    use std::fmt::Write;
    let mut elements = String::new();
    let mut chains = String::new();
    for index in 0..count {
        let endpoints: Vec<Ipv4Addr> = if index == measured {
            backends.to_vec()
        } else {
            vec![filler_backend(index)]
        };
        let _ = write!(
            elements,
            "{}{} . tcp . 80 : goto service-{index}",
            if index == 0 { "" } else { ", " },
            service_ip(index)
        );
        let picks: Vec<String> = (0..endpoints.len())
            .map(|e| format!("{e} : goto endpoint-{index}-{e}"))
            .collect();
        let _ = writeln!(
            chains,
            "  chain service-{index} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            endpoints.len(),
            picks.join(", ")
        );
        for (e, ip) in endpoints.iter().enumerate() {
            let _ = writeln!(
                chains,
                "  chain endpoint-{index}-{e} {{\n    meta l4proto tcp dnat to {ip}:{HTTP_PORT}\n  }}"
            );
        }
    }
    format!(
        "table ip kube-proxy {{}}
delete table ip kube-proxy
table ip kube-proxy {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ {elements} }}
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-output {{
    type nat hook output priority -100; policy accept;
    jump services
  }}
{chains}}}
"
    )
}

pub(crate) fn nft(netns: &Netns, script: &str) -> Result<Duration> {
    let path = std::env::temp_dir().join(format!("{}-kube-proxy.nft", netns.name));
    std::fs::write(&path, script)?;
    let start = Instant::now();
    let result = sh(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "nft",
            "-f",
            &path.to_string_lossy(),
        ],
    );
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(start.elapsed())
}

pub fn bench() -> Result<()> {
    let ferrite = BenchNode::new("cipf", 0)?;
    let iptables = BenchNode::new("cipi", 1)?;
    let nftables = BenchNode::new("cipn", 2)?;
    iptables.route_plainly()?;
    nftables.route_plainly()?;
    println!(
        "\nClusterIP from a client pod, TCP connections/s (wrk, Connection: close, {WRK_THREADS} threads x {CONNECTIONS_PER_THREAD} connections, {WRK_SECONDS} s), median of {ROUNDS} alternating rounds\n"
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
    let ferrite_backends = ferrite.backends();
    let mut node = ferrite.node;
    node.resync_seconds = 3600;
    let mut agent_started = false;
    for count in SIZES {
        let measured = count / 2;
        let vip = service_ip(measured);
        let frontend = SocketAddrV4::new(vip, 80);
        // The agent holds the measured Service; fillers go straight into its maps.
        node.write_config(&measured_yaml(&node, vip, &ferrite_backends))?;
        if !agent_started {
            node.start_agent()?;
            agent_started = true;
        }
        let master = ServiceKey::new(vip, 80, PROTO_TCP, 0);
        let n = &node;
        wait_until(
            "the measured Service in the maps",
            Duration::from_secs(60),
            || {
                n.maps()
                    .is_ok_and(|m| m.services.get(&master, 0).is_ok_and(|v| v.count == 3))
            },
        )?;
        fill_ferrite(&node, count, measured)?;
        let kube_proxy = count <= KUBE_PROXY_MAX;
        if kube_proxy {
            let restore = iptables_restore(
                &iptables.node.netns,
                &iptables_rules(count, measured, &iptables.backends()),
                false,
            )?;
            let load = nft(
                &nftables.node.netns,
                &nftables_rules(count, measured, &nftables.backends()),
            )?;
            eprintln!(
                "  ({count} Services: iptables-restore {:.1} s, nft -f {:.1} s)",
                restore.as_secs_f64(),
                load.as_secs_f64()
            );
        }
        let socket_client = node.pods[0].probe();
        let packet_client = Probe {
            cgroup: None,
            ..node.pods[0].probe()
        };
        let direct: Vec<SocketAddrV4> = ferrite_backends
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
            .collect();
        // Every measurement: (column, client, destinations).
        let mut runs = vec![
            (0, socket_client.clone(), vec![frontend]),
            (1, packet_client.clone(), vec![frontend]),
            (2, socket_client.clone(), direct),
        ];
        if kube_proxy {
            for (column, other) in [(3, &nftables), (5, &iptables)] {
                let client = Probe {
                    cgroup: None,
                    ..other.client().probe()
                };
                let direct = other
                    .backends()
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
                    .collect();
                runs.push((column, client.clone(), vec![frontend]));
                runs.push((column + 1, client, direct));
            }
        }
        let mut results: [Vec<f64>; 7] = Default::default();
        for round in 0..ROUNDS {
            // Each round starts with another measurement: none always goes first.
            for step in 0..runs.len() {
                let (column, client, to) = &runs[(round + step) % runs.len()];
                results[*column].push(wrk(client, to)?);
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
    }
    println!("\nferrite: socket-level LB (client in the node's cgroup); per-pkt: the same node, client outside the cgroup (= --socket-lb=false)");
    println!("targets: ferrite >= 0.95x direct at every size; >= 1.3x the nftables layout; >= 2x the iptables layout at 10,000");
    direct_after_service(&node)?;
    drop(node);
    Ok(())
}

/// A client that talks to a backend both through a Service and straight by its pod IP
/// (per packet: outside the cgroup): its direct connection rate before and after a
/// run of Service connections whose closing flows still hold their reply tuples.
fn direct_after_service(node: &Node) -> Result<()> {
    use ferrite_common::stat;
    let client = Probe {
        cgroup: None,
        ..node.pods[0].probe()
    };
    let direct = SocketAddrV4::new(node.pods[1].ip, HTTP_PORT);
    let master = node
        .maps()?
        .services
        .iter()
        .filter_map(Result::ok)
        .find(|(k, v)| k.backend_slot == 0 && v.count as usize == BACKENDS)
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
