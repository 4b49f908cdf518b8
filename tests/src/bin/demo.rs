//! `cargo xtask demo`: two nodes (network namespaces on a shared node network, each
//! with its own agent and pins), five pods, the agents on examples/two-nodes.yaml,
//! and real traffic: pod to pod across nodes, a ClusterIP Service whose backends are
//! spread over both nodes (TCP and UDP), a pod reaching a host outside the cluster
//! with its source masqueraded, the world reaching the Service through NodePorts and
//! the load-balancer IP, and the in-cluster paths: a pod and a host process reaching
//! the `kubernetes` Service (its endpoint: an API server on a node's own address),
//! balanced at their sockets, a node reaching the other node's pods, the Service
//! over IPv6 from a pod (the cluster is dual-stack), and a NetworkPolicy letting one
//! client in and keeping the other out. Everything it creates is removed at the end,
//! on failure and on Ctrl-C.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::{bail, Context, Result};
use ferrite_agent::{datapath, monitor::Line};
use ferrite_common::policy::ENDPOINT_INGRESS_ISOLATED;
use ferrite_tests::{
    cluster::{TCP_FRONTEND, TCP_TARGET, UDP_FRONTEND, UDP_TARGET},
    lab::{node_ip6, parse_answer, sh, Cluster, Server, WORLD_IP},
    monitor::Monitor,
};

const REQUESTS_PER_CLIENT: usize = 30;
const NODES: [&str; 2] = ["ferrite-demo-1", "ferrite-demo-2"];
const UNDERLAY: &str = "ferrite-demo-underlay";
const WORLD: &str = "ferrite-demo-world";
/// The Service's NodePorts (http, dns) and load-balancer IP, as in examples/two-nodes.yaml.
const NODE_PORT: u16 = 30080;
const UDP_NODE_PORT: u16 = 30053;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// (pod, node index, IP) as in examples/two-nodes.yaml; each pod's IPv6 address is
/// [`pod_ip6`] of it.
const PODS: [(&str, usize, [u8; 4]); 5] = [
    ("client-a", 0, [10, 244, 0, 2]),
    ("web-1", 0, [10, 244, 0, 11]),
    ("client-b", 1, [10, 244, 1, 2]),
    ("web-2", 1, [10, 244, 1, 11]),
    ("web-3", 1, [10, 244, 1, 12]),
];
/// The Service's IPv6 ClusterIP, as in examples/two-nodes.yaml.
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// A pod's IPv6 address in examples/two-nodes.yaml: its node's IPv6 pod CIDR, the
/// last group written as the IPv4 address's last octet (10.244.1.11: fd00:10:244:1::11).
fn pod_ip6(node: usize, ip: [u8; 4]) -> Ipv6Addr {
    let last = u16::from_str_radix(&ip[3].to_string(), 16).expect("decimal digits");
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, last)
}
const BACKENDS: [&str; 3] = ["web-1", "web-2", "web-3"];
/// The `kubernetes` Service and its endpoint, the API server on ferrite-demo-1's own
/// address, as in examples/two-nodes.yaml.
const KUBERNETES: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
const API_SERVER_PORT: u16 = 6443;
const CLIENTS: [&str; 2] = ["client-a", "client-b"];

fn main() -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: tearing down…");
        flag.store(true, Ordering::SeqCst);
    })?;
    let keep = std::env::args().any(|a| a == "--keep");
    let result = run(&interrupted, keep);
    println!("teardown: agents stopped; pods, nodes, node network and pins removed");
    result
}

fn check(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A demo killed hard (SIGKILL) cannot clean up: remove what it left first.
fn remove_leftovers() {
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with("ferrite-demo") {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
    for node in NODES {
        let _ = datapath::uninstall(&datapath::pin_dir(node));
    }
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("      {line}");
    }
}

/// Step 8: a pod's process and a host process reach the `kubernetes` Service (its
/// endpoint is the API server on node 1's own address, host network), balanced when
/// they connect; node 1 reaches a pod of node 2 through its overlay address.
/// The web pods' NetworkPolicy of the last step: only pods labelled `role:
/// frontend` (client-a) may reach them.
const WEB_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-frontends, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {role: frontend}}}], ports: [{port: 8080, protocol: TCP}]}]
";

/// A NetworkPolicy lets client-a reach web-2 and stops client-b, which a drop
/// monitor on web-2's node sees.
fn network_policy(cluster: &Cluster, objects: &str) -> Result<()> {
    let patience = std::time::Duration::from_secs(20);
    let node = &cluster.nodes[1];
    let drops = Monitor::start(node, &["--type", "drop"], patience)?;
    cluster.write_config(&format!("{objects}---\n{WEB_POLICY}"))?;
    let web_2 = cluster.pod("web-2");
    node.wait_for_maps("web-2 isolated by its policy", |m| {
        m.endpoints.iter().any(|(k, e)| {
            k.address == web_2.ip.octets() && e.flags & ENDPOINT_INGRESS_ISOLATED != 0
        })
    })?;
    println!(
        "\n[10/10] NetworkPolicy web-from-frontends: pods app=web accept TCP 8080 only from pods role=frontend (client-a)"
    );
    let to = SocketAddrV4::new(web_2.ip, TCP_TARGET);
    let allowed = cluster.pod("client-a").probe().tcp(to, "allowed?")?;
    let (server, _) = parse_answer(allowed.answer()?, "allowed?")?;
    println!("      client-a -> web-2 {to}: answered by {server}");
    let denied = cluster.pod("client-b").probe().tcp(to, "allowed?")?;
    if denied.reply.is_some() {
        bail!("client-b reached web-2 through its policy");
    }
    println!(
        "      client-b -> web-2 {to}: no answer ({})",
        denied.error.as_deref().unwrap_or("-")
    );
    let line = drops.wait_for(
        patience,
        |line| matches!(line, Line::Drop(e) if e.reason == "drop_policy_ingress"),
    )?;
    if let Line::Drop(event) = line {
        println!(
            "      ferrite monitor --node {} saw: {} {}:{} -> {}:{} at {} (pods {} -> {})",
            node.name,
            event.reason,
            event.source,
            event.source_port,
            event.destination,
            event.destination_port,
            event.program,
            event.source_pod.as_deref().unwrap_or("?"),
            event.destination_pod.as_deref().unwrap_or("?")
        );
        if event.destination_pod.as_deref() != Some("default/web-2") {
            bail!("the monitor did not name the pod the policy protects");
        }
    }
    drops.interrupt()?;
    println!("\n      ferrite inspect --node {} policy:", node.name);
    indent(&node.inspect("policy")?);
    Ok(())
}

fn in_cluster_paths(cluster: &Cluster, api_server: SocketAddrV4) -> Result<()> {
    println!(
        "[8/10] in-cluster paths: the `kubernetes` Service {KUBERNETES} -> the API server on {api_server} (host network of {})\n",
        NODES[0]
    );
    println!(
        "      {:<44} {:<16} {:<20} {:<22}",
        "CLIENT", "ANSWERED BY", "SAW THE CALLER AS", "PEER (getpeername)"
    );
    let node_2 = &cluster.nodes[1];
    let clients = [
        (
            format!("pod client-b on {}", NODES[1]),
            cluster.pod("client-b").probe(),
            KUBERNETES,
        ),
        (
            format!("host process on {}", NODES[1]),
            node_2.host_probe(),
            KUBERNETES,
        ),
        (
            format!("host process on {}", NODES[0]),
            cluster.nodes[0].host_probe(),
            KUBERNETES,
        ),
        (
            format!("host process on {} -> pod web-2", NODES[0]),
            cluster.nodes[0].host_probe(),
            SocketAddrV4::new(cluster.pod("web-2").ip, TCP_TARGET),
        ),
    ];
    for (who, probe, to) in clients {
        let request = format!("{who} -> {to}");
        let outcome = probe.tcp(to, &request)?;
        let (server, seen_as) = parse_answer(outcome.answer()?, &request)?;
        println!(
            "      {who:<44} {server:<16} {seen_as:<20} {:<22}",
            outcome.from.as_deref().unwrap_or("?")
        );
        if outcome.from.as_deref() != Some(to.to_string().as_str()) {
            bail!(
                "{request}: the socket's peer is {:?}, not {to}",
                outcome.from
            );
        }
    }
    let counters = node_2.maps()?.counters()?;
    println!(
        "      (balanced at connect(): {} translations on {}; the node reaches other nodes' pods from its overlay address)\n",
        counters[ferrite_common::stat::SOCK_TRANSLATED as usize].packets,
        NODES[1]
    );
    Ok(())
}

/// The Service is dual-stack: client-a reaches its IPv6 ClusterIP and its node's
/// IPv6 address at the nodePort, balanced at the socket over backends on both nodes,
/// which see client-a's own IPv6 address; UDP answers come from the Service.
fn dual_stack_service(cluster: &Cluster) -> Result<()> {
    let client = cluster.pod("client-a");
    let client_ip6 = pod_ip6(0, PODS[0].2);
    println!(
        "[9/10] dual stack: client-a ({client_ip6}) -> the Service's IPv6 addresses, 10 TCP connections and 10 UDP requests each\n"
    );
    println!(
        "      {:<54} {:<22} {:<18} {:<22}",
        "FRONTEND", "ANSWERED BY", "SAW THE CALLER AS", "UDP ANSWERS FROM"
    );
    let node6 = node_ip6(0);
    let frontends = [
        (
            "IPv6 ClusterIP",
            SocketAddr::new(WEB6.into(), 80),
            SocketAddr::new(WEB6.into(), 53),
        ),
        (
            "NodePort on ferrite-demo-1's IPv6",
            SocketAddr::new(node6.into(), NODE_PORT),
            SocketAddr::new(node6.into(), UDP_NODE_PORT),
        ),
    ];
    let probe = client.probe();
    for (what, tcp, udp) in frontends {
        let (mut answered, mut seen, mut udp_from) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for i in 0..10 {
            let request = format!("{what} #{i}");
            let outcome = probe.tcp(tcp, &request)?;
            let (backend, caller) = parse_answer(outcome.answer()?, &request)?;
            answered.insert(backend);
            seen.insert(caller);
            let outcome = probe.udp(udp, &request)?;
            let (backend, _) = parse_answer(outcome.answer()?, &request)?;
            answered.insert(backend);
            udp_from.insert(outcome.from.unwrap_or_default());
        }
        let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
        println!(
            "      {:<54} {:<22} {:<18} {:<22}",
            format!("{what} {tcp}"),
            join(&answered),
            join(&seen),
            join(&udp_from)
        );
        if answered.len() < 2 || seen != BTreeSet::from([client_ip6.to_string()]) {
            bail!("{what}: answered by {answered:?}, the caller seen as {seen:?}");
        }
        if udp_from != BTreeSet::from([udp.to_string()]) {
            bail!("{what}: UDP answers from {udp_from:?}, not {udp}");
        }
    }
    println!("      (from outside the cluster the Service is IPv4 only: no IPv6 XDP/TC Service path yet)\n");
    Ok(())
}

/// The demo's last word: `ferrite explain` on one of its own flows. It picks a
/// ClusterIP connection client-a made (its conntrack entry is still there, closing) and
/// asks what the loaded datapath does with a packet of it now, then with a new one.
fn explain_own_flow(cluster: &Cluster) -> Result<()> {
    let client = cluster.pod("client-a");
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.pods.iter().any(|p| p.name == "client-a"))
        .context("client-a's node")?;
    let conntrack = node.inspect_json("conntrack")?;
    let own = conntrack
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| {
            row["direction"] == "forward"
                && row["destination"] == TCP_FRONTEND.to_string()
                && row["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{}:", client.ip)))
        })
        .and_then(|row| row["source"].as_str().map(String::from));
    let to = format!("{TCP_FRONTEND}/tcp");
    let flows: Vec<(String, String)> = match &own {
        Some(source) => vec![
            (
                "client-a's own connection, still in conntrack".into(),
                source.clone(),
            ),
            (
                "a new connection from client-a".into(),
                format!("{}:40000", client.ip),
            ),
        ],
        None => vec![(
            "a new connection from client-a".into(),
            format!("{}:40000", client.ip),
        )],
    };
    for (what, from) in flows {
        println!(
            "\n      ferrite explain --node {} --from {from} --to {to}   ({what}):",
            node.name
        );
        let shown = node.explain_text(&["--from", &from, "--to", &to])?;
        indent(&shown);
        if !shown.contains("=> ") {
            bail!("explain gave no verdict:\n{shown}");
        }
    }
    Ok(())
}

fn run(interrupted: &AtomicBool, keep: bool) -> Result<()> {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-nodes.yaml");
    let config = config.canonicalize().context("examples/two-nodes.yaml")?;
    remove_leftovers();

    println!("Ferrite demo: two nodes, five pods, a LoadBalancer Service spread over both nodes\n");
    let names: Vec<String> = NODES.iter().map(ToString::to_string).collect();
    let mut cluster = Cluster::named(UNDERLAY, WORLD, &names)?;
    for node in &cluster.nodes {
        println!(
            "[1/10] node {:?}: network namespace, {} on the node network, datapath pinned at {}",
            node.name,
            node.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            node.pin_dir().display()
        );
    }
    cluster.dual_stack()?;
    for (name, node, ip) in PODS {
        cluster.nodes[node].add_dual_stack_pod(name, Ipv4Addr::from(ip), pod_ip6(node, ip))?;
    }
    println!(
        "[2/10] dual-stack pods (veth, /32 and /128, gateways 169.254.1.1 and {}, MTU 1450): {}",
        ferrite_agent::host::pods::POD_GATEWAY_IP6,
        PODS.map(|(n, node, ip)| format!(
            "{n} {} {} on {}",
            Ipv4Addr::from(ip),
            pod_ip6(node, ip),
            NODES[node]
        ))
        .join(", ")
    );
    let mut servers = Vec::new();
    for (name, node, ip) in PODS.into_iter().filter(|(n, _, _)| BACKENDS.contains(n)) {
        let pod = cluster.pod(name);
        for port in [TCP_TARGET, UDP_TARGET] {
            servers.push(pod.serve(port)?);
            let address = SocketAddr::new(pod_ip6(node, ip).into(), port);
            servers.push(Server::start(&pod.netns, name, address)?);
        }
    }
    servers.push(Server::start(
        &cluster.world,
        "world",
        SocketAddrV4::new(WORLD_IP, 7000),
    )?);
    let api_server = SocketAddrV4::new(cluster.nodes[0].ip.context("plugged")?, API_SERVER_PORT);
    servers.push(Server::start(
        &cluster.nodes[0].netns,
        "api-server",
        api_server,
    )?);
    check(interrupted)?;

    let objects = std::fs::read_to_string(&config).context("examples/two-nodes.yaml")?;
    cluster.write_config(&objects)?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("the agent's first sync", |m| {
            m.pod_routes() == 2 && !m.services.is_empty()
        })?;
    }
    println!(
        "[3/10] agents running on {}: synced (routes to both nodes)\n",
        config.display()
    );
    check(interrupted)?;

    let (client_a, web_2) = (cluster.pod("client-a"), cluster.pod("web-2"));
    let request = "hello across nodes";
    let reply = client_a.tcp_request(SocketAddrV4::new(web_2.ip, TCP_TARGET), request)?;
    let (server, seen) = parse_answer(&reply, request)?;
    println!(
        "[4/10] pod to pod across nodes over VXLAN: client-a ({}) -> {} answered by {server}, which saw the caller as {seen} (no NAT)",
        client_a.ip, web_2.ip
    );

    println!(
        "[5/10] ClusterIP: {} clients x {REQUESTS_PER_CLIENT} TCP connections to {TCP_FRONTEND} and UDP requests to {UDP_FRONTEND}",
        CLIENTS.len()
    );
    let mut seen: BTreeMap<&str, (usize, usize)> = BACKENDS.iter().map(|n| (*n, (0, 0))).collect();
    let mut udp_from_vip = 0;
    for client in CLIENTS {
        let pod = cluster.pod(client);
        for i in 0..REQUESTS_PER_CLIENT {
            check(interrupted)?;
            let request = format!("{client} #{i}");
            let reply = pod.tcp_request(TCP_FRONTEND, &request)?;
            let (backend, _) = parse_answer(&reply, &request)?;
            if let Some(entry) = seen.get_mut(backend.as_str()) {
                entry.0 += 1;
            }
            let (reply, from) = pod.udp_request(UDP_FRONTEND, &request)?;
            if from == SocketAddr::V4(UDP_FRONTEND) {
                udp_from_vip += 1;
            }
            let (backend, _) = parse_answer(&reply, &request)?;
            if let Some(entry) = seen.get_mut(backend.as_str()) {
                entry.1 += 1;
            }
        }
    }
    println!(
        "\n      {:<8} {:<13} {:<16} {:>16} {:>13}",
        "BACKEND", "POD IP", "NODE", "TCP CONNECTIONS", "UDP REQUESTS"
    );
    for (name, node, ip) in PODS.iter().filter(|(n, _, _)| BACKENDS.contains(n)) {
        let (tcp, udp) = seen[name];
        println!(
            "      {name:<8} {:<13} {:<16} {tcp:>16} {udp:>13}",
            Ipv4Addr::from(*ip).to_string(),
            NODES[*node]
        );
    }
    let total = CLIENTS.len() * REQUESTS_PER_CLIENT;
    println!(
        "      every TCP connection was to {TCP_FRONTEND} (TCP accepts replies only from there); {udp_from_vip}/{total} UDP replies came from {UDP_FRONTEND}\n"
    );
    if seen.values().any(|(tcp, udp)| *tcp == 0 || *udp == 0) || udp_from_vip != total {
        bail!("traffic was not spread over every backend or replies did not come from the VIP");
    }

    let request = "hello world";
    let reply = client_a.tcp_request(SocketAddrV4::new(WORLD_IP, 7000), request)?;
    let (_, seen_as) = parse_answer(&reply, request)?;
    println!(
        "[6/10] egress: client-a -> {WORLD_IP} (outside the cluster); the world saw the caller as {seen_as}, node {}'s address (masqueraded)\n",
        NODES[0]
    );

    // The cloud load balancer's address reaches node 1, as a provider's router would.
    let via = cluster.nodes[0].ip.context("plugged")?.to_string();
    sh(
        "ip",
        &[
            "-n",
            &cluster.world.name,
            "route",
            "add",
            &LB_IP.to_string(),
            "via",
            &via,
        ],
    )?;
    let mut frontends: Vec<(String, SocketAddrV4)> = cluster
        .nodes
        .iter()
        .map(|n| {
            let ip = n.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
            (
                format!("NodePort of {}", n.name),
                SocketAddrV4::new(ip, NODE_PORT),
            )
        })
        .collect();
    frontends.push(("LoadBalancer IP".into(), SocketAddrV4::new(LB_IP, 80)));
    println!("[7/10] from outside the cluster (the world, {WORLD_IP}), through XDP on each node's uplink:\n");
    println!(
        "      {:<28} {:<20} {:<34} {:<16}",
        "FRONTEND", "ADDRESS", "ANSWERED BY (10 connections)", "CLIENT SEEN AS"
    );
    for (what, to) in frontends {
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        let mut peers = std::collections::BTreeSet::new();
        for i in 0..10 {
            check(interrupted)?;
            let request = format!("world #{i}");
            let reply = cluster.world.tcp_request(to, &request)?;
            let (backend, peer) = parse_answer(&reply, &request)?;
            *answered.entry(backend).or_default() += 1;
            peers.insert(peer);
        }
        let answered: Vec<String> = answered.iter().map(|(b, n)| format!("{b} x{n}")).collect();
        let peers: Vec<String> = peers.into_iter().collect();
        println!(
            "      {what:<28} {:<20} {:<34} {}",
            to.to_string(),
            answered.join(", "),
            peers.join(", ")
        );
    }
    println!("      (a backend on the receiving node sees the client; one on the other node sees the receiving node, which SNATs so the reply returns through it)\n");

    in_cluster_paths(&cluster, api_server)?;
    check(interrupted)?;
    dual_stack_service(&cluster)?;
    check(interrupted)?;

    let node = &cluster.nodes[0];
    println!("      ferrite inspect --node {} services:", node.name);
    indent(&node.inspect("services")?);
    println!("\n      ferrite inspect --node {} routes:", node.name);
    indent(&node.inspect("routes")?);
    println!(
        "\n      ferrite inspect --node {} stats (non-zero):",
        node.name
    );
    let stats = node.inspect("stats")?;
    for (i, line) in stats.lines().enumerate() {
        let zero = line.split_whitespace().nth(1) == Some("0");
        if i == 0 || !zero {
            println!("      {line}");
        }
    }
    explain_own_flow(&cluster)?;
    check(interrupted)?;
    network_policy(&cluster, &objects)?;
    println!(
        "\n      try: bpftool map dump pinned {}/ferrite_service",
        node.pin_dir().display()
    );
    println!(
        "           ferrite monitor --node {} --type all   (drops and new flows as they happen)",
        node.name
    );
    if keep {
        println!("\n--keep: the nodes stay up; press Ctrl-C to tear down");
        while !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    drop(servers);
    drop(cluster);
    Ok(())
}
