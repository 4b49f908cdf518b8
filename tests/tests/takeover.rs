//! User stories for taking a node over from kube-proxy (`ferrite agent
//! --take-over-from-kube-proxy`): a node where kube-proxy's rules (its iptables
//! layout loaded with the real `iptables-restore` of the nf_tables or the legacy
//! backend, or its nftables layout with `nft -f`) serve a Service, with connections open through it from pods (ClusterIP)
//! and from the world (NodePort) and a UDP flow, gets Ferrite: no connection breaks,
//! each keeps its backend, new ones are served by Ferrite, and kube-proxy's rules
//! are gone. Needs root.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use ferrite_agent::host;
use ferrite_tests::{
    cluster::{load_balancer_yaml, TCP_TARGET, UDP_TARGET},
    kube_proxy_layout::{self, ServicePort},
    lab::{
        answered_by, exchange, ferrite_bin, pod_ip, sh, wait_until, Cluster, Server, CLUSTER_CIDR,
        SETTLE,
    },
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const PORT: u16 = 80;
const UDP_PORT: u16 = 81;
const NODE_PORT: u16 = 30080;
/// Connections held open through the ClusterIP from a pod, and through the NodePort
/// from the world, while Ferrite takes over.
const HELD_FROM_PODS: usize = 100;
const HELD_FROM_WORLD: usize = 20;
/// Of the connections from pods, those that keep exchanging requests while Ferrite
/// starts and takes over.
const BUSY: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// iptables' nf_tables backend (`iptables` on this machine).
    Iptables,
    /// The legacy (x_tables) backend.
    IptablesLegacy,
    Nftables,
}

/// One node run by kube-proxy (no Ferrite program loaded): backends `b0`, `b1`, a
/// client pod `c0`, the Service `web` (TCP 80 on NodePort 30080, UDP 81 on 30081)
/// in kube-proxy's rules and in the config the agent will read.
struct KubeProxyNode {
    _servers: Vec<Server>,
    cluster: Cluster,
    rules: String,
}

fn kube_proxy_ports(backends: &[Ipv4Addr]) -> Vec<ServicePort> {
    vec![
        ServicePort {
            cluster_ip: VIP,
            port: PORT,
            proto: "tcp",
            node_port: Some(NODE_PORT),
            endpoints: backends
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, TCP_TARGET))
                .collect(),
        },
        ServicePort {
            cluster_ip: VIP,
            port: UDP_PORT,
            proto: "udp",
            node_port: Some(NODE_PORT + 1),
            endpoints: backends
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, UDP_TARGET))
                .collect(),
        },
    ]
}

/// `input` to `command` run in the node's network namespace.
fn in_node(cluster: &Cluster, command: &[&str], input: &str) -> Result<String> {
    cluster.nodes[0].netns.run_with_input(command, input)
}

fn load_rules(node: &KubeProxyNode, layout: Layout) -> Result<()> {
    match layout {
        Layout::Iptables => in_node(
            &node.cluster,
            &["iptables-nft-restore", "--noflush"],
            &node.rules,
        ),
        Layout::IptablesLegacy => in_node(
            &node.cluster,
            &["iptables-legacy-restore", "--noflush"],
            &node.rules,
        ),
        Layout::Nftables => in_node(&node.cluster, &["nft", "-f", "-"], &node.rules),
    }
    .map(drop)
}

fn kube_proxy_node(layout: Layout) -> Result<KubeProxyNode> {
    let mut cluster = Cluster::new(1)?;
    let node = &mut cluster.nodes[0];
    node.agent_args.push("--take-over-from-kube-proxy".into());
    let backends = [pod_ip(0, 1), pod_ip(0, 2)];
    node.add_pod("b0", backends[0])?;
    node.add_pod("b1", backends[1])?;
    node.add_pod("c0", pod_ip(0, 5))?;
    let mut servers = Vec::new();
    for pod in ["b0", "b1"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    // What the node had before Ferrite: pods routed by their CNI plugin, forwarding on.
    let node = &cluster.nodes[0];
    let pods: Vec<(Ipv4Addr, String)> = node
        .pods
        .iter()
        .map(|p| (p.ip, p.host_interface.clone()))
        .collect();
    node.netns.run(move || {
        pods.iter()
            .try_for_each(|(ip, interface)| host::pods::add_pod_route(*ip, interface))
    })??;
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &node.netns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    let name = node.name.clone();
    cluster.write_config(&format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        load_balancer_yaml(
            "web",
            VIP,
            PORT,
            NODE_PORT,
            "",
            &[],
            &[(backends[0], &name), (backends[1], &name)]
        )
    ))?;
    let ports = kube_proxy_ports(&backends);
    let rules = match layout {
        Layout::Iptables | Layout::IptablesLegacy => {
            kube_proxy_layout::iptables(&ports, CLUSTER_CIDR)
        }
        Layout::Nftables => kube_proxy_layout::nftables(&ports, CLUSTER_CIDR),
    };
    let node = KubeProxyNode {
        _servers: servers,
        cluster,
        rules,
    };
    load_rules(&node, layout)?;
    Ok(node)
}

/// A TCP connection held open, and the backend that answered its first request.
struct Held {
    stream: TcpStream,
    backend: String,
}

fn hold(stream: TcpStream, index: usize) -> Result<Held> {
    let mut stream = stream;
    let request = format!("before {index}");
    let backend = answered_by(&exchange(&mut stream, &request)?, &request)?;
    Ok(Held { stream, backend })
}

/// Each held connection still answers, from the backend it had: the ones that broke.
fn broken(held: &mut [Held], round: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for (index, h) in held.iter_mut().enumerate() {
        let request = format!("{round} {index}");
        match exchange(&mut h.stream, &request).and_then(|r| answered_by(&r, &request)) {
            Ok(backend) if backend == h.backend => {}
            Ok(backend) => broken.push(format!("#{index}: {} -> {backend}", h.backend)),
            Err(e) => broken.push(format!("#{index} ({}): {e:#}", h.backend)),
        }
    }
    broken
}

fn udp_exchange(socket: &UdpSocket, request: &str) -> Result<String> {
    socket.send(request.as_bytes())?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    answered_by(&String::from_utf8_lossy(&buf[..n]), request)
}

/// What is left of kube-proxy's rules in the node's namespace (iptables chains of
/// both backends, nftables tables).
fn kube_proxy_rules_left(cluster: &Cluster) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for save in ["iptables-nft-save", "iptables-legacy-save"] {
        let saved = in_node(cluster, &[save], "")?;
        left.extend(
            saved
                .lines()
                .filter(|l| l.contains("KUBE-"))
                .map(|l| format!("{save}: {l}")),
        );
    }
    let tables = in_node(cluster, &["nft", "list", "tables"], "")?;
    left.extend(
        tables
            .lines()
            .filter(|l| l.contains("kube-proxy"))
            .map(String::from),
    );
    Ok(left)
}

/// The story: kube-proxy serves, connections open; Ferrite starts with the take-over;
/// not one connection breaks and new ones are Ferrite's.
fn take_over(layout: Layout) -> Result<KubeProxyNode> {
    let mut node = kube_proxy_node(layout)?;
    let cluster = &node.cluster;
    let node_ip = cluster.nodes[0].ip.context("plugged")?;
    let client = cluster.pod("c0");
    let (cluster_ip, node_port) = (
        SocketAddrV4::new(VIP, PORT),
        SocketAddrV4::new(node_ip, NODE_PORT),
    );
    let mut held = Vec::new();
    for index in 0..HELD_FROM_PODS {
        held.push(hold(client.tcp_connect(cluster_ip)?, index)?);
    }
    for index in 0..HELD_FROM_WORLD {
        held.push(hold(
            cluster.world.tcp_connect(node_port)?,
            HELD_FROM_PODS + index,
        )?);
    }
    let backends: BTreeSet<&str> = held.iter().map(|h| h.backend.as_str()).collect();
    ensure!(
        backends.len() == 2,
        "kube-proxy's rules spread the connections over both backends: {backends:?}"
    );
    let udp = client.netns.run(|| -> Result<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(SocketAddrV4::new(VIP, UDP_PORT))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(socket)
    })??;
    let udp_backend = udp_exchange(&udp, "udp before")?;

    // Some connections keep talking while Ferrite starts: their packets meet its
    // programs the moment they are attached.
    let mut busy: Vec<Held> = held.drain(..BUSY).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let talking = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut rounds, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                failures.extend(broken(&mut busy, &format!("during {rounds}")));
                rounds += 1;
            }
            (busy, rounds, failures)
        })
    };
    node.cluster.nodes[0].start_agent()?;
    let node0 = &node.cluster.nodes[0];
    let done = wait_until("the take-over", SETTLE, || {
        node0
            .agent
            .as_ref()
            .is_some_and(|a| a.log_text().contains("took the node over from kube-proxy"))
    });
    if let Err(e) = done {
        let log = node0
            .agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default();
        bail!("{e:#}\nagent log:\n{log}");
    }
    // What the agent says it took over (shown with --nocapture).
    let log = node0
        .agent
        .as_ref()
        .map(|a| a.log_text())
        .unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("kube-proxy")) {
        eprintln!("{line}");
    }
    stop.store(true, Ordering::Relaxed);
    let (busy, rounds, failures) = talking.join().expect("the talking thread");
    ensure!(
        failures.is_empty(),
        "{} requests on busy connections failed while Ferrite took over, e.g. {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(rounds > 0);
    held.extend(busy);
    let broken = broken(&mut held, "after");
    ensure!(
        broken.is_empty(),
        "{} of {} connections broken, e.g. {:#?}",
        broken.len(),
        held.len(),
        &broken[..broken.len().min(5)]
    );
    ensure!(
        udp_exchange(&udp, "udp after")? == udp_backend,
        "the UDP flow kept its backend"
    );
    let seeded = node.cluster.nodes[0].metric("ferrite_takeover_flows_total")?;
    ensure!(
        seeded == (HELD_FROM_PODS + HELD_FROM_WORLD + 1) as f64,
        "every held flow taken over (and nothing else), got {seeded}"
    );
    ensure!(node.cluster.nodes[0].metric("ferrite_takeover_rules_removed_total")? > 0.0);
    let left = kube_proxy_rules_left(&node.cluster)?;
    ensure!(left.is_empty(), "kube-proxy's rules left: {left:#?}");

    // kube-proxy's rules are gone: what answers now is Ferrite.
    let cluster = &node.cluster;
    let client = cluster.pod("c0");
    let mut reached = BTreeSet::new();
    for index in 0..20 {
        let request = format!("new {index}");
        let mut stream = client.tcp_connect(cluster_ip)?;
        reached.insert(answered_by(&exchange(&mut stream, &request)?, &request)?);
        let mut stream = cluster.world.tcp_connect(node_port)?;
        reached.insert(answered_by(&exchange(&mut stream, &request)?, &request)?);
    }
    ensure!(reached.len() == 2, "new connections reach {reached:?}");
    drop(held);
    Ok(node)
}

#[test]
fn a_node_taken_over_from_kube_proxys_iptables_keeps_every_open_connection() -> Result<()> {
    let mut node = take_over(Layout::Iptables)?;
    // The way back: Ferrite uninstalled, kube-proxy (here its rules, as it writes
    // them again when it starts) serves the node again.
    node.cluster.nodes[0].kill_agent()?;
    let name = node.cluster.nodes[0].name.clone();
    let uninstall = ferrite_bin();
    in_node(
        &node.cluster,
        &[
            uninstall.to_str().context("path")?,
            "uninstall",
            "--node",
            &name,
        ],
        "",
    )?;
    load_rules(&node, Layout::Iptables)?;
    let request = "after the rollback";
    let mut stream = node
        .cluster
        .pod("c0")
        .tcp_connect(SocketAddrV4::new(VIP, PORT))?;
    answered_by(&exchange(&mut stream, request)?, request)?;
    Ok(())
}

#[test]
fn a_node_taken_over_from_kube_proxys_nftables_keeps_every_open_connection() -> Result<()> {
    take_over(Layout::Nftables).map(drop)
}

#[test]
fn a_node_taken_over_from_kube_proxys_legacy_iptables_keeps_every_open_connection() -> Result<()> {
    take_over(Layout::IptablesLegacy).map(drop)
}
