//! User stories for every path inside an ordinary cluster: pods and the nodes' own
//! processes reaching Services (ClusterIP, NodePort) whose backends are pods or node
//! addresses (host network, like every cluster's `kubernetes` Service), on the same
//! node and on the other; nodes reaching other nodes' pods; a pod reaching itself
//! through its Service; a Service without endpoints refusing at once; a UDP client
//! following its Service when its old backend still backs another; in-cluster
//! clients of an `externalTrafficPolicy: Local` Service on a node without its
//! endpoints.
//!
//! Clients are `ferrite-probe` processes in the node's cgroup subtree, in the pod's or
//! the node's network namespace, as a pod's processes and the kubelet are. Each story
//! runs with socket-level load balancing (the default) and with
//! `--socket-lb=false` (per-packet only), the agents reading a YAML file; again with
//! socket-level load balancing, the agents watching an API server (every change the
//! watch events of the objects that changed); and per packet between nodes routing
//! natively (`--routing native`). Needs root.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use ferrite_common::stat;
use ferrite_tests::{
    cluster::{load_balancer_yaml, service_yaml, TCP_TARGET, UDP_TARGET},
    fake_apiserver::FakeApiServer,
    lab::{
        exchange, parse_answer, pod_ip, sh, tcp_from_port, Cluster, Node, Probe, ProbeOutcome,
        Routing, Server,
    },
};

/// ClusterIP with a backend pod on each node (TCP 80 -> 8080, UDP 53 -> 5353).
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
/// ClusterIPs whose endpoint is node 0's / node 1's own address (host network).
const API_HERE: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const API_THERE: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 3);
/// A ClusterIP without endpoints.
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 4);
/// A ClusterIP whose only backend is the client pod `c0` itself.
const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 5);
/// A NodePort Service (TCP 30090, UDP 30091) with a backend pod on each node.
const NODE_PORT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 6);
const NODE_PORT: u16 = 30090;
/// Where the host-network servers listen on each node.
const HOST_PORT: u16 = 9443;
/// An `externalTrafficPolicy: Local` LoadBalancer (TCP 80 / UDP 81 on its ingress IP,
/// nodePorts 30100 / 30101) whose only endpoint is `b1` on node 1.
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 7);
const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 107);
const LOCAL_NODE_PORT: u16 = 30100;

/// How the nodes run: with socket-level load balancing or per packet only, reading
/// their objects from a file or watching an API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    SocketLb,
    PerPacket,
    SocketLbWatchingAnApiServer,
    /// Per packet, the nodes routing natively (`--routing native`).
    NativePerPacket,
}

impl Mode {
    fn socket_lb(self) -> bool {
        matches!(self, Mode::SocketLb | Mode::SocketLbWatchingAnApiServer)
    }
}

/// Two nodes: backend pods `a0` (node 0) and `b1` (node 1), client pods `c0` (node 0,
/// also the only backend of SELF) and `c1` (node 1), a host-network server on each
/// node's address, every agent synced.
struct Lab {
    _servers: Vec<Server>,
    cluster: Cluster,
}

fn tcp(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 80)
}

fn udp(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 53)
}

/// A ClusterIP Service `name` (TCP 80, UDP 53) whose endpoint is a node's address,
/// serving both on HOST_PORT: what the `kubernetes` Service looks like.
fn host_network_service(name: &str, vip: Ipv4Addr, node_ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: https, port: 80, protocol: TCP, targetPort: {HOST_PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {HOST_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: https, port: {HOST_PORT}, protocol: TCP}}
- {{name: dns, port: {HOST_PORT}, protocol: UDP}}
endpoints:
- addresses: [\"{node_ip}\"]
  conditions: {{ready: true}}
"
    )
}

fn lab(mode: Mode) -> Result<Lab> {
    lab_with(mode, |_| String::new())
}

/// The lab, with `extra` YAML documents (given the cluster) in the config.
fn lab_with(mode: Mode, extra: impl Fn(&Cluster) -> String) -> Result<Lab> {
    let routing = match mode {
        Mode::NativePerPacket => Routing::Native,
        _ => Routing::Vxlan,
    };
    let mut cluster = Cluster::with_routing(2, routing)?;
    if mode == Mode::SocketLbWatchingAnApiServer {
        FakeApiServer::serve_cluster(&mut cluster)?;
    }
    if !mode.socket_lb() {
        for node in &mut cluster.nodes {
            node.agent_args.push("--socket-lb=false".into());
        }
    }
    cluster.nodes[0].add_pod("a0", pod_ip(0, 0))?;
    cluster.nodes[0].add_pod("c0", pod_ip(0, 5))?;
    cluster.nodes[1].add_pod("b1", pod_ip(1, 0))?;
    cluster.nodes[1].add_pod("c1", pod_ip(1, 5))?;
    let mut servers = Vec::new();
    for pod in ["a0", "b1", "c0"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    for node in &cluster.nodes {
        let address = SocketAddrV4::new(node.ip.context("plugged")?, HOST_PORT);
        servers.push(Server::start(&node.netns, &host_name(node), address)?);
    }
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let pods = |names: &[&str]| -> Vec<(Ipv4Addr, String)> {
        names
            .iter()
            .map(|name| {
                let node = if cluster.nodes[0].pods.iter().any(|p| p.name == *name) {
                    &cluster.nodes[0]
                } else {
                    &cluster.nodes[1]
                };
                (cluster.pod(name).ip, node.name.clone())
            })
            .collect()
    };
    let node_port_backends = pods(&["a0", "b1"]);
    let node_port_backends: Vec<(Ipv4Addr, &str)> = node_port_backends
        .iter()
        .map(|(ip, node)| (*ip, node.as_str()))
        .collect();
    let config = [
        cluster.nodes_and_pods_yaml(),
        service_yaml("web", WEB, &[cluster.pod("a0").ip, cluster.pod("b1").ip]),
        host_network_service("api-here", API_HERE, n0.ip.context("plugged")?),
        host_network_service("api-there", API_THERE, n1.ip.context("plugged")?),
        service_yaml("empty", EMPTY, &[]),
        service_yaml("self", SELF, &[cluster.pod("c0").ip]),
        load_balancer_yaml(
            "np",
            NODE_PORT_VIP,
            80,
            NODE_PORT,
            "",
            &[],
            &node_port_backends,
        ),
        extra(&cluster),
    ]
    .join("---\n");
    cluster.write_config(&config)?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("every Service and both pod CIDRs", |m| {
            m.pod_routes() == 2 && m.services.contains_key(&master(NODE_PORT_VIP, 80))
        })?;
    }
    // The overlay's host routes come with the same sync (natively: via the uplink).
    let device = match routing {
        Routing::Native => "dev ul0",
        Routing::Vxlan => "ferrite_vxlan",
    };
    for (node, other_cidr) in [
        (&cluster.nodes[0], "10.244.1.0/24"),
        (&cluster.nodes[1], "10.244.0.0/24"),
    ] {
        ferrite_tests::lab::wait_until("the overlay route", ferrite_tests::lab::SETTLE, || {
            sh("ip", &["-n", &node.netns.name, "route", "show", other_cidr])
                .is_ok_and(|r| r.contains(device))
        })?;
    }
    Ok(Lab {
        _servers: servers,
        cluster,
    })
}

fn master(ip: Ipv4Addr, port: u16) -> ferrite_common::ServiceKey {
    ferrite_common::ServiceKey::new(ip, port, ferrite_common::PROTO_TCP, 0)
}

fn host_name(node: &Node) -> String {
    format!("host-{}", node.name)
}

/// Who answered (`<server>|<client as seen>|<request>`), checking the request came
/// back whole and the answer came from `expected_from` as the socket reports it.
fn answered(
    outcome: &ProbeOutcome,
    request: &str,
    expected_from: SocketAddrV4,
) -> Result<(String, String)> {
    let (name, seen_as) = parse_answer(outcome.answer()?, request)?;
    ensure!(
        outcome.from.as_deref() == Some(expected_from.to_string().as_str()),
        "{request}: answer from {:?}, not {expected_from}",
        outcome.from
    );
    Ok((name, seen_as))
}

/// TCP, unconnected UDP and connected UDP from `probe` to a Service whose answers
/// must all come from `server` and appear to come from the Service address.
fn all_protocols_reach(probe: &Probe, vip: Ipv4Addr, server: &str, what: &str) -> Result<()> {
    let request = format!("{what} tcp");
    let (name, _) = answered(&probe.tcp(tcp(vip), &request)?, &request, tcp(vip))?;
    ensure!(
        name == server,
        "{request}: answered by {name}, not {server}"
    );
    for (kind, outcome) in [
        ("udp", probe.udp(udp(vip), &format!("{what} udp"))?),
        (
            "connected udp",
            probe.udp_connected(udp(vip), &format!("{what} connected udp"))?,
        ),
    ] {
        let request = format!("{what} {kind}");
        let (name, _) = answered(&outcome, &request, udp(vip))?;
        ensure!(
            name == server,
            "{request}: answered by {name}, not {server}"
        );
    }
    Ok(())
}

/// Whether the node counted what this mode should do: socket-level translations, or
/// none of them.
fn check_mode(node: &Node, mode: Mode) -> Result<()> {
    let translated = node_counter(node, stat::SOCK_TRANSLATED)?;
    if mode.socket_lb() {
        ensure!(translated > 0, "socket-level LB translated nothing")
    } else {
        ensure!(translated == 0, "socket-level LB ran although off")
    }
    Ok(())
}

/// Each story, with socket-level load balancing and without it, with it from an API
/// server, and per packet between natively routed nodes.
macro_rules! in_both_modes {
    ($($story:ident),* $(,)?) => {$(
        mod $story {
            #[test]
            fn with_socket_lb() -> anyhow::Result<()> {
                super::$story(super::Mode::SocketLb)
            }

            #[test]
            fn per_packet_only() -> anyhow::Result<()> {
                super::$story(super::Mode::PerPacket)
            }

            #[test]
            fn with_socket_lb_watching_an_api_server() -> anyhow::Result<()> {
                super::$story(super::Mode::SocketLbWatchingAnApiServer)
            }

            #[test]
            fn natively_routed_per_packet() -> anyhow::Result<()> {
                super::$story(super::Mode::NativePerPacket)
            }
        }
    )*};
}

in_both_modes!(
    pods_reach_a_service_whose_endpoint_is_a_nodes_own_address,
    host_processes_reach_cluster_ips,
    nodes_reach_other_nodes_pods_and_get_answers_back,
    nodes_and_pods_reach_their_own_and_other_nodes_node_ports,
    a_pod_reaches_itself_through_its_service,
    a_service_without_endpoints_refuses_at_once,
    a_udp_client_follows_its_service_when_the_old_backend_still_backs_another,
    a_connected_udp_socket_to_a_service_whose_backend_port_is_closed_is_refused,
    in_cluster_clients_of_a_local_traffic_policy_service_reach_endpoints_on_other_nodes,
);

/// kube-proxy's rule for `externalTrafficPolicy: Local`: only clients from outside
/// the cluster are held to the node's own endpoints. A pod and a process of node 0,
/// which has no endpoint of the Service, reach its NodePort (on either node's
/// address) and its load-balancer IP, TCP and UDP, and get `b1` of node 1; a client
/// from outside reaching node 0's NodePort is still dropped there.
fn in_cluster_clients_of_a_local_traffic_policy_service_reach_endpoints_on_other_nodes(
    mode: Mode,
) -> Result<()> {
    let lab = lab_with(mode, |c| {
        load_balancer_yaml(
            "local",
            LOCAL_VIP,
            80,
            LOCAL_NODE_PORT,
            "  externalTrafficPolicy: Local\n",
            &[LOCAL_LB_IP],
            &[(c.pod("b1").ip, c.nodes[1].name.as_str())],
        )
    })?;
    let c = &lab.cluster;
    let (node0, node1) = (
        c.nodes[0].ip.context("plugged")?,
        c.nodes[1].ip.context("plugged")?,
    );
    for (who, probe) in [
        ("pod c0", c.pod("c0").probe()),
        ("node 0", c.nodes[0].host_probe()),
    ] {
        for to in [
            SocketAddrV4::new(node0, LOCAL_NODE_PORT),
            SocketAddrV4::new(node1, LOCAL_NODE_PORT),
            SocketAddrV4::new(LOCAL_LB_IP, 80),
        ] {
            let request = format!("{who} -> {to} tcp");
            let (name, _) = answered(&probe.tcp(to, &request)?, &request, to)?;
            ensure!(name == "b1", "{request}: answered by {name}");
        }
        for to in [
            SocketAddrV4::new(node0, LOCAL_NODE_PORT + 1),
            SocketAddrV4::new(LOCAL_LB_IP, 81),
        ] {
            let request = format!("{who} -> {to} udp");
            let (name, _) = answered(&probe.udp(to, &request)?, &request, to)?;
            ensure!(name == "b1", "{request}: answered by {name}");
        }
    }
    let dropped = node_counter(&c.nodes[0], stat::DROP_NO_LOCAL_BACKEND)?;
    let to = SocketAddrV4::new(node0, LOCAL_NODE_PORT);
    let from_outside = c
        .world
        .run(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(2)))?;
    ensure!(
        from_outside.is_err(),
        "the world reached {to} without a local endpoint"
    );
    ensure!(
        node_counter(&c.nodes[0], stat::DROP_NO_LOCAL_BACKEND)? > dropped,
        "the world's SYN was not dropped for want of a local endpoint"
    );
    check_mode(&c.nodes[0], mode)
}

/// Every cluster's `kubernetes` Service: the API server listens on a control-plane
/// node's address. Pods on that node and on the other reach it, TCP and UDP, and the
/// answers come from the Service address.
fn pods_reach_a_service_whose_endpoint_is_a_nodes_own_address(mode: Mode) -> Result<()> {
    let lab = lab(mode)?;
    let c = &lab.cluster;
    for client in ["c0", "c1"] {
        let probe = c.pod(client).probe();
        for (vip, node) in [(API_HERE, &c.nodes[0]), (API_THERE, &c.nodes[1])] {
            all_protocols_reach(&probe, vip, &host_name(node), &format!("{client} -> {vip}"))?;
        }
    }
    check_mode(&c.nodes[0], mode)
}

/// The kubelet, node agents, host-network pods: the node's own processes reach a
/// ClusterIP whose backends are pods on both nodes (both used), and Services backed by
/// a node address, TCP, connected and unconnected UDP, with answers from the Service.
fn host_processes_reach_cluster_ips(mode: Mode) -> Result<()> {
    let lab = lab(mode)?;
    let c = &lab.cluster;
    for node in &c.nodes {
        let probe = node.host_probe();
        let mut used = BTreeSet::new();
        for i in 0..12 {
            let request = format!("{} web {i}", node.name);
            used.insert(answered(&probe.tcp(tcp(WEB), &request)?, &request, tcp(WEB))?.0);
            let outcome = probe.udp(udp(WEB), &request)?;
            used.insert(answered(&outcome, &request, udp(WEB))?.0);
            let outcome = probe.udp_connected(udp(WEB), &request)?;
            used.insert(answered(&outcome, &request, udp(WEB))?.0);
        }
        ensure!(
            used == BTreeSet::from(["a0".to_string(), "b1".to_string()]),
            "{}: the local and the remote backend both answer: {used:?}",
            node.name
        );
        for (vip, server) in [(API_HERE, &c.nodes[0]), (API_THERE, &c.nodes[1])] {
            all_protocols_reach(
                &probe,
                vip,
                &host_name(server),
                &format!("{} -> {vip}", node.name),
            )?;
        }
    }
    check_mode(&c.nodes[0], mode)
}

/// The API server calling a webhook pod, Prometheus scraping: a node reaches every
/// pod of the other node by its pod IP, from its own overlay address, and back.
fn nodes_reach_other_nodes_pods_and_get_answers_back(mode: Mode) -> Result<()> {
    let lab = lab(mode)?;
    let c = &lab.cluster;
    for (node, pod, overlay) in [(0, "b1", "10.244.0.1"), (1, "a0", "10.244.1.1")] {
        let probe = c.nodes[node].host_probe();
        let target = c.pod(pod);
        for (kind, outcome, to) in [
            (
                "tcp",
                probe.tcp(SocketAddrV4::new(target.ip, TCP_TARGET), "to a pod")?,
                TCP_TARGET,
            ),
            (
                "udp",
                probe.udp(SocketAddrV4::new(target.ip, UDP_TARGET), "to a pod")?,
                UDP_TARGET,
            ),
        ] {
            let (name, seen_as) = answered(&outcome, "to a pod", SocketAddrV4::new(target.ip, to))?;
            ensure!(
                (name.as_str(), seen_as.as_str()) == (pod, overlay),
                "node {node} -> {pod} ({kind}): answered by {name}, seen as {seen_as}"
            );
        }
    }
    Ok(())
}

/// A node reaches the NodePort on its own address and on the other node's; so do
/// pods. TCP and UDP; the answers come from the address asked.
fn nodes_and_pods_reach_their_own_and_other_nodes_node_ports(mode: Mode) -> Result<()> {
    let lab = lab(mode)?;
    let c = &lab.cluster;
    let backends = ["a0", "b1"];
    for (who, probe) in [
        ("node 0", c.nodes[0].host_probe()),
        ("node 1", c.nodes[1].host_probe()),
        ("pod c0", c.pod("c0").probe()),
    ] {
        for node in &c.nodes {
            let ip = node.ip.context("plugged")?;
            let (tcp_port, udp_port) = (
                SocketAddrV4::new(ip, NODE_PORT),
                SocketAddrV4::new(ip, NODE_PORT + 1),
            );
            let request = format!("{who} -> {tcp_port}");
            let (name, _) = answered(&probe.tcp(tcp_port, &request)?, &request, tcp_port)?;
            ensure!(backends.contains(&name.as_str()), "{request}: {name}");
            let request = format!("{who} -> {udp_port}");
            let (name, _) = answered(&probe.udp(udp_port, &request)?, &request, udp_port)?;
            ensure!(backends.contains(&name.as_str()), "{request}: {name}");
        }
    }
    check_mode(&c.nodes[0], mode)
}

/// Hairpin: a pod reaches its own Service and lands on itself.
fn a_pod_reaches_itself_through_its_service(mode: Mode) -> Result<()> {
    let lab = lab(mode)?;
    let probe = lab.cluster.pod("c0").probe();
    all_protocols_reach(&probe, SELF, "c0", "c0 -> its own Service")?;
    check_mode(&lab.cluster.nodes[0], mode)
}

/// kube-proxy's REJECT: a Service without ready endpoints refuses at once (TCP
/// connect fails with ECONNREFUSED; UDP gets an error or an ICMP port unreachable),
/// from pods and from the node itself; a silent drop would end in a timeout.
fn a_service_without_endpoints_refuses_at_once(mode: Mode) -> Result<()> {
    let lab = lab(mode)?;
    let c = &lab.cluster;
    for (who, probe) in [
        ("pod c0", c.pod("c0").probe()),
        ("node 0", c.nodes[0].host_probe()),
    ] {
        for (kind, outcome) in [
            ("tcp", probe.tcp(tcp(EMPTY), "anyone?")?),
            ("udp", probe.udp(udp(EMPTY), "anyone?")?),
            ("connected udp", probe.udp_connected(udp(EMPTY), "anyone?")?),
        ] {
            ensure!(
                outcome.error.as_deref() == Some("refused"),
                "{who} {kind} to a Service without endpoints: {outcome:?}"
            );
            eprintln!("{who} {kind}: refused after {} µs", outcome.micros);
        }
    }
    let counters = c.nodes[0].maps()?.counters()?;
    let (at_socket, per_packet) = (
        counters[stat::SOCK_REFUSED as usize].packets,
        counters[stat::SERVICE_REJECTED as usize].packets,
    );
    if mode.socket_lb() {
        // Connected UDP is left to the per-packet path.
        ensure!(
            at_socket == 4 && per_packet == 2,
            "{at_socket} {per_packet}"
        )
    } else {
        ensure!(
            at_socket == 0 && per_packet == 6,
            "{at_socket} {per_packet}"
        )
    }
    Ok(())
}

/// A ClusterIP Service (UDP 53) whose only endpoint `address` listens on nothing
/// at the target port (5999).
fn closed_port_service(name: &str, vip: Ipv4Addr, address: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5999}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: dns, port: 5999, protocol: UDP}}
endpoints:
- addresses: [\"{address}\"]
  conditions: {{ready: true}}
"
    )
}

/// kube-proxy's behaviour for a Service whose backend port is closed: a connected UDP
/// socket gets ECONNREFUSED at once from the backend's ICMP port unreachable, which
/// the datapath translates back to the Service address (the quoted packet too), as
/// Linux NAT does. Backends on the client's node (the error seen on the backend's
/// veth), on the other node (arriving over the overlay), and a node address (the
/// node's stack answers, through the client's veth). Connected UDP is per packet in
/// both modes (socket-level LB leaves it alone), so both need the translation;
/// untranslated, the error names the backend, which the socket never talked to,
/// and the client waits for its timeout. (Socket-level LB gives unconnected UDP and
/// TCP the backend's address at the socket: the kernel matches those errors itself.)
fn a_connected_udp_socket_to_a_service_whose_backend_port_is_closed_is_refused(
    mode: Mode,
) -> Result<()> {
    const HERE: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 1);
    const THERE: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 2);
    const HOST: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 3);
    let lab = lab_with(mode, |c| {
        [
            closed_port_service("closed-here", HERE, c.pod("a0").ip),
            closed_port_service("closed-there", THERE, c.pod("b1").ip),
            closed_port_service("closed-host", HOST, c.nodes[0].ip.expect("plugged")),
        ]
        .join("---\n")
    })?;
    let c = &lab.cluster;
    for node in &c.nodes {
        node.wait_for_maps("the closed ports' Services", |m| {
            m.services.contains_key(&ferrite_common::ServiceKey::new(
                HOST,
                53,
                ferrite_common::PROTO_UDP,
                0,
            ))
        })?;
    }
    let probe = c.pod("c0").probe();
    for (what, vip) in [
        ("a backend on the node", HERE),
        ("a backend on the other node", THERE),
        ("a node address", HOST),
    ] {
        let outcome = probe.udp_connected(udp(vip), "anyone?")?;
        ensure!(
            outcome.error.as_deref() == Some("refused"),
            "connected UDP to {vip} ({what}): {outcome:?}"
        );
    }
    // The errors of the local and host-network backends on node 0, the remote one's
    // on node 0 too (the client's node, where the flow is translated).
    let translated = node_counter(&c.nodes[0], stat::ICMP_ERROR_REVERSE_NAT)?;
    ensure!(translated == 3, "{translated} ICMP errors translated");
    // Connected UDP is left to the per-packet path in both modes.
    ensure!(node_counter(&c.nodes[0], stat::SOCK_TRANSLATED)? == 0);
    Ok(())
}

/// kubernetes#48370 in a new form: a fixed-port UDP client of Service `one` keeps its
/// flow to backend `a0` while `a0` also backs Service `two`. When `one`'s endpoint is
/// replaced by `b1`, the client's next datagram goes to `b1` (its flow of `one` ends,
/// although `a0` lives on), while `two`'s clients keep `a0`.
fn a_udp_client_follows_its_service_when_the_old_backend_still_backs_another(
    mode: Mode,
) -> Result<()> {
    const ONE: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 1);
    const TWO: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 2);
    let lab = lab_with(mode, |c| {
        [
            service_yaml("one", ONE, &[c.pod("a0").ip]),
            service_yaml("two", TWO, &[c.pod("a0").ip]),
        ]
        .join("---\n")
    })?;
    let c = &lab.cluster;
    // Clients on both nodes (the backend local and remote), connected and not.
    let clients = [
        ("c0 connected", c.pod("c0").probe().from_port(40001), true),
        ("c1 connected", c.pod("c1").probe().from_port(40002), true),
        ("c0", c.pod("c0").probe().from_port(40003), false),
    ];
    let ask = |probe: &Probe, connected: bool, vip: Ipv4Addr, request: &str| -> Result<String> {
        let outcome = match connected {
            true => probe.udp_connected(udp(vip), request)?,
            false => probe.udp(udp(vip), request)?,
        };
        Ok(answered(&outcome, request, udp(vip))?.0)
    };
    for (name, probe, connected) in &clients {
        ensure!(
            ask(probe, *connected, ONE, name)? == "a0",
            "{name} starts on a0"
        );
        ensure!(
            ask(probe, *connected, TWO, name)? == "a0",
            "{name} starts on a0"
        );
    }
    let moved = [
        c.nodes_and_pods_yaml(),
        service_yaml("one", ONE, &[c.pod("b1").ip]),
        service_yaml("two", TWO, &[c.pod("a0").ip]),
    ]
    .join("---\n");
    c.write_config(&moved)?;
    for node in &c.nodes {
        node.wait_for_maps("Service one on b1 alone", |m| {
            let slot = ferrite_common::ServiceKey::new(ONE, 53, ferrite_common::PROTO_UDP, 1);
            m.services
                .get(&slot)
                .and_then(|v| m.backends.get(&v.backend_id))
                .is_some_and(|b| b.address == c.pod("b1").ip.octets())
        })?;
    }
    for (name, probe, connected) in &clients {
        for round in 0..3 {
            let request = format!("{name} after the move {round}");
            ensure!(
                ask(probe, *connected, ONE, &request)? == "b1",
                "{request} reached b1"
            );
            ensure!(
                ask(probe, *connected, TWO, &request)? == "a0",
                "{request}: two stays"
            );
        }
    }
    Ok(())
}

/// A client that talks to a backend through a Service and straight by its pod IP from
/// the same ports: the direct connection's reply tuple is still held by the closing
/// Service flow. It reopens that tuple, as Linux conntrack does, instead of
/// remapping its port: thousands of such connections used to fill the SNAT port
/// range with leftovers until garbage collection and then drop new connections
/// (`drop_no_snat_port`, the connection rate down to a tenth). The client runs
/// outside the node's cgroup, so its Service connections are balanced per packet.
#[test]
fn direct_connections_after_service_ones_reopen_their_tuples_instead_of_remapping() -> Result<()> {
    const ONLY_A0: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 9);
    const CONNECTIONS: u16 = 300;
    let lab = lab_with(Mode::SocketLb, |c| {
        service_yaml("only-a0", ONLY_A0, &[c.pod("a0").ip])
    })?;
    let c = &lab.cluster;
    let client = c.pod("c0");
    let backend = SocketAddrV4::new(c.pod("a0").ip, TCP_TARGET);
    for (what, to) in [("via the Service", tcp(ONLY_A0)), ("direct", backend)] {
        for port in 41000..41000 + CONNECTIONS {
            let from = SocketAddrV4::new(client.ip, port);
            let request = format!("{what} from {port}");
            let mut stream = tcp_from_port(&client.netns, from, to)?;
            let (name, _) = parse_answer(&exchange(&mut stream, &request)?, &request)?;
            ensure!(name == "a0", "{request}: answered by {name}");
        }
    }
    let counters = c.nodes[0].maps()?.counters()?;
    let count = |index: u32| counters[index as usize].packets;
    ensure!(
        count(stat::PORT_REMAPPED) == 0 && count(stat::DROP_NO_SNAT_PORT) == 0,
        "no remaps, no drops: remapped {}, dropped {}",
        count(stat::PORT_REMAPPED),
        count(stat::DROP_NO_SNAT_PORT)
    );
    ensure!(
        count(stat::CT_REOPENED) >= CONNECTIONS as u64,
        "every direct connection reopened its tuple: {}",
        count(stat::CT_REOPENED)
    );
    Ok(())
}

/// The socket-level programs of the cgroup directory `path` (names, per bpftool).
fn socket_programs(path: &std::path::Path) -> Result<Vec<String>> {
    let shown = sh("bpftool", &["cgroup", "show", &path.to_string_lossy()])?;
    Ok(shown
        .lines()
        .filter_map(|line| line.split_whitespace().find(|w| w.starts_with("ferrite_")))
        .map(String::from)
        .collect())
}

/// Socket-level load balancing attaches to the node's own cgroup subtree (never the
/// machine's root, which the lab's agents are never given), and `--socket-lb=false`
/// takes it away again: the per-packet path then serves the same clients.
#[test]
fn socket_lb_stays_in_the_nodes_cgroup_subtree_and_turns_off_with_the_flag() -> Result<()> {
    let mut lab = lab(Mode::SocketLb)?;
    let root = ferrite_agent::datapath::default_cgroup_root()?;
    let node = &mut lab.cluster.nodes[0];
    let mut attached = socket_programs(&node.cgroup.path)?;
    attached.sort();
    let mut expected: Vec<&str> = ferrite_common::program_names::SOCKET_LB
        .iter()
        .map(|(name, _)| *name)
        .collect();
    expected.sort();
    assert_eq!(attached, expected);
    assert_eq!(
        socket_programs(&root)?,
        Vec::<String>::new(),
        "nothing on {}",
        root.display()
    );
    let probe = lab.cluster.pod("c0").probe();
    answered(
        &probe.tcp(tcp(WEB), "with sockets")?,
        "with sockets",
        tcp(WEB),
    )?;

    let node = &mut lab.cluster.nodes[0];
    let before = node_counter(node, stat::SOCK_TRANSLATED)?;
    node.kill_agent()?;
    node.agent_args.push("--socket-lb=false".into());
    node.start_agent()?;
    let cgroup = node.cgroup.path.clone();
    ferrite_tests::lab::wait_until(
        "the socket-level programs to go",
        ferrite_tests::lab::SETTLE,
        || socket_programs(&cgroup).is_ok_and(|p| p.is_empty()),
    )?;
    answered(&probe.tcp(tcp(WEB), "per packet")?, "per packet", tcp(WEB))?;
    assert_eq!(
        node_counter(node, stat::SOCK_TRANSLATED)?,
        before,
        "no socket-level translation once off"
    );
    Ok(())
}

fn node_counter(node: &Node, index: u32) -> Result<u64> {
    Ok(node.maps()?.counters()?[index as usize].packets)
}
