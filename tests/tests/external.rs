//! User stories for traffic from outside the cluster: a client in the "world"
//! namespace on the underlay reaches Services on every node's NodePort, on their
//! LoadBalancer IPs and externalIPs, through the XDP program on each node's uplink.
//! Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ferrite_common::stat;
use ferrite_tests::{
    cluster::{load_balancer_yaml, TCP_TARGET, UDP_TARGET},
    fake_apiserver::FakeApiServer,
    lab::{
        exchange, http_get, parse_answer, pod_ip, sh, udp_ask, wait_until, Cluster, Netns,
        ObjectSource, Server, SETTLE, WORLD_IP,
    },
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
/// How many extra client addresses the world has.
const CLIENTS: u8 = 16;
/// Extra client addresses of the world (on its loopback), beside WORLD_IP.
fn client_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 20 + index)
}

/// Two nodes; pod `a1` on node 0 and `b0` on node 1 serve TCP and UDP, pod `c0` on
/// node 0 is a client; the world has
/// 16 client addresses and routes the LoadBalancer IP to node 0, the externalIP to
/// node 1 (as a cloud load balancer and a router would).
struct World {
    _servers: Vec<Server>,
    cluster: Cluster,
}

fn world(service: impl Fn(&Cluster) -> String) -> Result<World> {
    world_with(&[], service)
}

/// The world, its agents reading their objects from `source`.
fn world_from(source: ObjectSource, service: impl Fn(&Cluster) -> String) -> Result<World> {
    world_prepared_from(source, &[], |_| Ok(()), service)
}

/// The world, with `agent_args` added to every agent's arguments.
fn world_with(agent_args: &[&str], service: impl Fn(&Cluster) -> String) -> Result<World> {
    world_prepared(agent_args, |_| Ok(()), service)
}

/// The world, with `prepare` run on the cluster before the agents start.
fn world_prepared(
    agent_args: &[&str],
    prepare: impl FnOnce(&Cluster) -> Result<()>,
    service: impl Fn(&Cluster) -> String,
) -> Result<World> {
    world_prepared_from(ObjectSource::File, agent_args, prepare, service)
}

fn world_prepared_from(
    source: ObjectSource,
    agent_args: &[&str],
    prepare: impl FnOnce(&Cluster) -> Result<()>,
    service: impl Fn(&Cluster) -> String,
) -> Result<World> {
    let mut cluster = Cluster::new(2)?;
    if source == ObjectSource::Kubernetes {
        FakeApiServer::serve_cluster(&mut cluster)?;
    }
    for node in &mut cluster.nodes {
        node.agent_args
            .extend(agent_args.iter().map(ToString::to_string));
    }
    cluster.nodes[0].add_pod("a1", pod_ip(0, 1))?;
    cluster.nodes[1].add_pod("b0", pod_ip(1, 0))?;
    // A client pod that is no Service's backend.
    cluster.nodes[0].add_pod("c0", pod_ip(0, 5))?;
    let mut servers = Vec::new();
    for pod in ["a1", "b0"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    let w = &cluster.world.name;
    for index in 0..CLIENTS {
        let address = format!("{}/32", client_ip(index));
        sh("ip", &["-n", w, "addr", "add", &address, "dev", "lo"])?;
    }
    for (ip, node) in [(LB_IP, 0), (EXTERNAL_IP, 1)] {
        let via = cluster.nodes[node].ip.context("plugged")?.to_string();
        sh(
            "ip",
            &["-n", w, "route", "add", &ip.to_string(), "via", &via],
        )?;
    }
    prepare(&cluster)?;
    cluster.write_config(&format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        service(&cluster)
    ))?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("the Service's frontends and the uplink", |m| {
            m.pod_routes() == 2
                && m.services
                    .values()
                    .any(|v| v.flags & ferrite_common::svc_flag::EXTERNAL != 0)
        })?;
    }
    Ok(World {
        _servers: servers,
        cluster,
    })
}

/// Both pods as backends, on their nodes.
fn both_backends(c: &Cluster, spec_extra: &str) -> String {
    load_balancer_yaml(
        "shop",
        VIP,
        PORT,
        NODE_PORT,
        &format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n{spec_extra}"),
        &[LB_IP],
        &[
            (c.pod("a1").ip, &c.nodes[0].name),
            (c.pod("b0").ip, &c.nodes[1].name),
        ],
    )
}

fn tcp_from(world: &Netns, from: Ipv4Addr, to: SocketAddrV4) -> Result<TcpStream> {
    let socket = world.run(move || -> Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.bind(&SockAddr::from(SocketAddrV4::new(from, 0)))?;
        socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(3))?;
        Ok(socket)
    })??;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// One TCP request from `from`: (answering pod, client IP it saw).
fn tcp_request(world: &Netns, from: Ipv4Addr, to: SocketAddrV4) -> Result<(String, String)> {
    let request = format!("from {from} to {to}");
    let mut stream = tcp_from(world, from, to)?;
    parse_answer(&exchange(&mut stream, &request)?, &request)
}

fn udp_socket(world: &Netns, from: Ipv4Addr) -> Result<UdpSocket> {
    let socket = world.run(move || UdpSocket::bind(SocketAddrV4::new(from, 0)))??;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

/// One UDP request from `from`: (answering pod, client IP it saw), checking the
/// answer comes from the address asked.
fn udp_request(world: &Netns, from: Ipv4Addr, to: SocketAddrV4) -> Result<(String, String)> {
    let socket = udp_socket(world, from)?;
    let request = format!("from {from} to {to}");
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        socket.send_to(request.as_bytes(), to)?;
        if let Ok((n, source)) = socket.recv_from(&mut buf) {
            anyhow::ensure!(source == to.into(), "answer from {source}, asked {to}");
            return parse_answer(&String::from_utf8_lossy(&buf[..n]), &request);
        }
    }
    bail!("no UDP answer from {to}")
}

fn counter(c: &Cluster, node: usize, index: u32) -> Result<u64> {
    Ok(c.nodes[node].maps()?.counters()?[index as usize].packets)
}

/// On the lab's veth uplinks the default (`--xdp auto`) balances at the uplink's tcx
/// ingress: XDP on a veth saves nothing and costs GSO.
#[test]
fn nodeport_loadbalancer_and_external_ips_reach_local_and_remote_backends() -> Result<()> {
    external_frontends_reach_local_and_remote_backends(ObjectSource::File, &[])
}

/// The same, the agents watching an API server.
#[test]
fn watching_an_api_server_nodeport_loadbalancer_and_external_ips_reach_local_and_remote_backends(
) -> Result<()> {
    external_frontends_reach_local_and_remote_backends(ObjectSource::Kubernetes, &[])
}

/// The same through XDP, as on a real NIC (`--xdp always`).
#[test]
fn with_xdp_nodeport_loadbalancer_and_external_ips_reach_local_and_remote_backends() -> Result<()> {
    external_frontends_reach_local_and_remote_backends(ObjectSource::File, &["--xdp", "always"])
}

/// The same between nodes routing natively: the remote backend's replies to the
/// SNATed flows come back unencapsulated to the node that SNATed them.
#[test]
fn natively_routed_nodeport_loadbalancer_and_external_ips_reach_local_and_remote_backends(
) -> Result<()> {
    external_frontends_reach_local_and_remote_backends(ObjectSource::File, &["--routing", "native"])
}

fn external_frontends_reach_local_and_remote_backends(
    source: ObjectSource,
    agent_args: &[&str],
) -> Result<()> {
    let env = world_prepared_from(source, agent_args, |_| Ok(()), |c| both_backends(c, ""))?;
    let c = &env.cluster;
    let xdp = agent_args.contains(&"always");
    for node in &c.nodes {
        let on_uplink = ferrite_agent::datapath::attachments(&node.pin_dir())?
            .contains(&ferrite_agent::datapath::Attachment::Xdp("ul0".into()));
        let in_tc = node.maps()?.contents()?.config.flags
            & ferrite_common::config_flag::EXTERNAL_IN_TC
            != 0;
        assert_eq!(
            (on_uplink, in_tc),
            (xdp, !xdp),
            "{}: XDP attached, TC flag",
            node.name
        );
    }
    let mut frontends = vec![(LB_IP, PORT), (EXTERNAL_IP, PORT)];
    for node in &c.nodes {
        frontends.push((node.ip.context("plugged")?, NODE_PORT));
    }
    for (ip, port) in frontends {
        let mut answered = BTreeSet::new();
        // Different clients: Maglev spreads them over both backends.
        for index in 0..8 {
            let from = client_ip(index);
            let (pod, seen) = tcp_request(&c.world, from, SocketAddrV4::new(ip, port))?;
            // A backend on the receiving node sees the client; one on the other
            // node sees the receiving node (SNAT keeps the reply path symmetric).
            let receiving_node = c
                .nodes
                .iter()
                .position(|n| n.pods.iter().any(|p| p.name == pod))
                .context("known pod")?;
            // Decided by where the traffic entered, never by what was seen.
            let entered = match ip {
                LB_IP => 0,
                EXTERNAL_IP => 1,
                _ => c
                    .nodes
                    .iter()
                    .position(|n| n.ip == Some(ip))
                    .context("a node's address")?,
            };
            let expected_peer = if entered == receiving_node {
                from.to_string()
            } else {
                c.nodes[entered].ip.context("plugged")?.to_string()
            };
            assert_eq!(seen, expected_peer, "{pod} via {ip}:{port}");
            answered.insert(pod);

            let (pod, _) = udp_request(&c.world, from, SocketAddrV4::new(ip, port + 1))?;
            answered.insert(pod);
        }
        assert_eq!(
            answered,
            BTreeSet::from(["a1".to_string(), "b0".to_string()]),
            "via {ip}:{port}"
        );
    }
    // The external logic did it: new external flows and SNATed forwards were counted.
    for node in 0..2 {
        assert!(counter(c, node, stat::EXTERNAL_NEW_FLOW)? > 0);
        assert!(counter(c, node, stat::EXTERNAL_SNAT)? > 0);
    }
    Ok(())
}

/// A secondary address of node 0 on its uplink.
const SECONDARY_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 51);
/// Node 0's address on a second interface, a link of its own to the world.
const SECOND_LINK_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 7, 1);
/// The world's client addresses on that link.
fn second_link_client(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 7, 10 + index)
}

/// Node 0 gets a secondary address on its uplink and a second interface (`ext1`, a
/// link to the world, whose end there holds 8 client addresses).
fn second_addresses(c: &Cluster) -> Result<()> {
    let (node, world) = (&c.nodes[0].netns.name, &c.world.name);
    let secondary = format!("{SECONDARY_IP}/24");
    sh("ip", &["-n", node, "addr", "add", &secondary, "dev", "ul0"])?;
    sh(
        "ip",
        &[
            "-n", node, "link", "add", "ext1", "type", "veth", "peer", "name", "wext1", "netns",
            world,
        ],
    )?;
    let own = format!("{SECOND_LINK_IP}/24");
    sh("ip", &["-n", node, "addr", "add", &own, "dev", "ext1"])?;
    sh("ip", &["-n", node, "link", "set", "ext1", "up"])?;
    for index in 0..8 {
        let address = format!("{}/24", second_link_client(index));
        sh(
            "ip",
            &["-n", world, "addr", "add", &address, "dev", "wext1"],
        )?;
    }
    sh("ip", &["-n", world, "link", "set", "wext1", "up"])?;
    // Complete checksums, as from a host on a real wire.
    sh(
        "ip",
        &[
            "netns", "exec", world, "ethtool", "-K", "wext1", "tx", "off",
        ],
    )?;
    Ok(())
}

/// `--nodeport-addresses` with CIDRs: a NodePort answers on every address of the
/// node inside them - a secondary address of the uplink and the address of a second
/// interface, from the world and from the node itself - reaching backends here and
/// on the other node; never on 127.0.0.1.
#[test]
fn node_ports_answer_on_every_node_address_nodeport_addresses_selects() -> Result<()> {
    node_ports_on_selected_addresses(&[])
}

/// The same through XDP, which then runs on the second interface too.
#[test]
fn with_xdp_node_ports_answer_on_every_node_address_nodeport_addresses_selects() -> Result<()> {
    node_ports_on_selected_addresses(&["--xdp", "always"])
}

fn node_ports_on_selected_addresses(more_args: &[&str]) -> Result<()> {
    let mut args = vec!["--nodeport-addresses", "198.51.100.0/24,100.64.7.0/24"];
    args.extend(more_args);
    let env = world_prepared(&args, second_addresses, |c| both_backends(c, ""))?;
    let c = &env.cluster;
    let agent = &c.nodes[0];
    let attached = ferrite_agent::datapath::attachments(&agent.pin_dir())?;
    use ferrite_agent::datapath::Attachment;
    assert!(
        attached.contains(&Attachment::Ingress("ext1".into())),
        "the second interface balances external traffic: {attached:?}"
    );
    assert_eq!(
        attached.contains(&Attachment::Xdp("ext1".into())),
        !more_args.is_empty(),
        "XDP on the second interface where the uplink runs it: {attached:?}"
    );
    for (frontend, client) in [
        (SECONDARY_IP, client_ip as fn(u8) -> Ipv4Addr),
        (SECOND_LINK_IP, second_link_client),
        (agent.ip.context("plugged")?, client_ip),
    ] {
        let mut answered = BTreeSet::new();
        for index in 0..8 {
            let from = client(index);
            let to = SocketAddrV4::new(frontend, NODE_PORT);
            let (pod, seen) =
                tcp_request(&c.world, from, to).with_context(|| format!("from {from} to {to}"))?;
            // The local backend sees the client, the remote one this node (SNAT).
            let expected = if pod == "a1" {
                from
            } else {
                agent.ip.context("plugged")?
            };
            assert_eq!(seen, expected.to_string(), "{pod} via {to}");
            answered.insert(pod.clone());
            let (pod, _) = udp_request(&c.world, from, SocketAddrV4::new(frontend, NODE_PORT + 1))?;
            answered.insert(pod);
        }
        assert_eq!(
            answered,
            BTreeSet::from(["a1".to_string(), "b0".to_string()]),
            "via {frontend}"
        );
        // The node's own processes reach it too (the socket path).
        let to = SocketAddrV4::new(frontend, NODE_PORT);
        let request = format!("node to {to}");
        let outcome = agent.host_probe().tcp(to, &request)?;
        parse_answer(outcome.answer()?, &request)?;
    }
    // Loopback is never a NodePort address: nothing listens there, so it is refused.
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, NODE_PORT);
    let outcome = agent.host_probe().tcp(to, "loopback")?;
    assert_eq!(outcome.error.as_deref(), Some("refused"), "{outcome:?}");
    Ok(())
}

/// By default (`primary`) only the InternalIP answers: a secondary address of the
/// node is left to the stack, which refuses the NodePort.
#[test]
fn by_default_node_ports_answer_on_the_internal_ip_only() -> Result<()> {
    let env = world_prepared(&[], second_addresses, |c| both_backends(c, ""))?;
    let c = &env.cluster;
    let internal = c.nodes[0].ip.context("plugged")?;
    tcp_request(
        &c.world,
        client_ip(0),
        SocketAddrV4::new(internal, NODE_PORT),
    )?;
    for frontend in [SECONDARY_IP, SECOND_LINK_IP] {
        let from = if frontend == SECOND_LINK_IP {
            second_link_client(0)
        } else {
            client_ip(0)
        };
        let error = tcp_from(&c.world, from, SocketAddrV4::new(frontend, NODE_PORT))
            .err()
            .with_context(|| format!("{frontend} answered a NodePort"))?;
        let io = error.downcast_ref::<std::io::Error>().context("io error")?;
        assert_eq!(io.kind(), ErrorKind::ConnectionRefused, "{error:#}");
    }
    Ok(())
}

fn health(world: &Netns, node_ip: Ipv4Addr, port: u16) -> Result<(u16, String)> {
    let mut stream = tcp_from(world, client_ip(0), SocketAddrV4::new(node_ip, port))?;
    http_get(&mut stream, "/")
}

#[test]
fn external_traffic_policy_local_keeps_the_client_ip_and_health_checks_tell_nodes_apart(
) -> Result<()> {
    const HEALTH_PORT: u16 = 32000;
    // Only a1 (node 0) backs the Service.
    let env = world(|c| {
        load_balancer_yaml(
            "local",
            VIP,
            PORT,
            NODE_PORT,
            &format!("  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n"),
            &[LB_IP],
            &[(c.pod("a1").ip, &c.nodes[0].name)],
        )
    })?;
    let c = &env.cluster;
    let (node0, node1) = (c.nodes[0].ip.unwrap(), c.nodes[1].ip.unwrap());
    for index in 0..4 {
        let from = client_ip(index);
        for to in [
            SocketAddrV4::new(node0, NODE_PORT),
            SocketAddrV4::new(LB_IP, PORT),
        ] {
            assert_eq!(
                tcp_request(&c.world, from, to)?,
                ("a1".to_string(), from.to_string()),
                "the backend sees the real client"
            );
        }
        let (pod, seen) = udp_request(&c.world, from, SocketAddrV4::new(node0, NODE_PORT + 1))?;
        assert_eq!((pod.as_str(), seen), ("a1", from.to_string()));
    }
    // Node 1 has no local backend: dropped and counted, never forwarded.
    let before = counter(c, 1, stat::DROP_NO_LOCAL_BACKEND)?;
    assert!(tcp_from(&c.world, client_ip(0), SocketAddrV4::new(node1, NODE_PORT)).is_err());
    assert!(counter(c, 1, stat::DROP_NO_LOCAL_BACKEND)? > before);

    let (status, body) = health(&c.world, node0, HEALTH_PORT)?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
    let (status, body) = health(&c.world, node1, HEALTH_PORT)?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    Ok(())
}

#[test]
fn client_ip_affinity_keeps_each_client_on_one_backend() -> Result<()> {
    let env = world(|c| {
        both_backends(
            c,
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
        )
    })?;
    let c = &env.cluster;
    let to = SocketAddrV4::new(c.nodes[0].ip.unwrap(), NODE_PORT);
    let mut chosen = BTreeMap::new();
    for index in 0..CLIENTS {
        let from = client_ip(index);
        let connections = if index == 0 { 50 } else { 5 };
        let mut backends = BTreeSet::new();
        for _ in 0..connections {
            backends.insert(tcp_request(&c.world, from, to)?.0);
        }
        assert_eq!(backends.len(), 1, "{from} moved between {backends:?}");
        chosen.insert(from, backends.into_iter().next().unwrap());
    }
    // Clients are still spread (all 16 on one backend: 1 in 32768 by chance).
    let used: BTreeSet<_> = chosen.values().collect();
    assert_eq!(used.len(), 2, "{chosen:?}");
    Ok(())
}

#[test]
fn load_balancer_source_ranges_admit_listed_clients_only() -> Result<()> {
    let allowed = client_ip(1);
    // Drops logged by the datapath name their reason (each reason has its name).
    let env = world_with(&["--datapath-log", "debug"], |c| {
        both_backends(
            c,
            &format!("  loadBalancerSourceRanges: [\"{allowed}/32\", \"198.18.0.0/15\"]\n"),
        )
    })?;
    let c = &env.cluster;
    let lb = SocketAddrV4::new(LB_IP, PORT);
    for _ in 0..3 {
        tcp_request(&c.world, allowed, lb)?;
    }
    let before = counter(c, 0, stat::DROP_SOURCE_RANGE)?;
    let denied = tcp_from(&c.world, client_ip(2), lb);
    assert!(denied.is_err(), "a client outside the ranges got through");
    assert!(counter(c, 0, stat::DROP_SOURCE_RANGE)? > before);
    let agent = c.nodes[0].agent.as_ref().context("agent runs")?;
    wait_until("the drop in the agent log", SETTLE, || {
        agent.log_text().contains("drop: reason drop_source_range")
    })
    .inspect_err(|_| eprintln!("agent log:\n{}", agent.log_text()))?;
    // The NodePort itself is not restricted (kube-proxy's behaviour).
    let node_port = SocketAddrV4::new(c.nodes[0].ip.unwrap(), NODE_PORT);
    tcp_request(&c.world, client_ip(2), node_port)?;
    Ok(())
}

#[test]
fn a_nodeport_without_backends_is_refused_at_once_not_left_to_time_out() -> Result<()> {
    let env = world(|_| load_balancer_yaml("empty", VIP, PORT, NODE_PORT, "", &[], &[]))?;
    let c = &env.cluster;
    let node0 = c.nodes[0].ip.unwrap();
    let error = tcp_from(&c.world, client_ip(0), SocketAddrV4::new(node0, NODE_PORT))
        .err()
        .context("connected to a Service without backends")?;
    let io = error.downcast_ref::<std::io::Error>().context("io error")?;
    assert_eq!(io.kind(), ErrorKind::ConnectionRefused, "{error:#}");
    // UDP: ICMP port unreachable, seen by a connected socket as "refused".
    let socket = udp_socket(&c.world, client_ip(0))?;
    socket.connect(SocketAddrV4::new(node0, NODE_PORT + 1))?;
    let mut refused = false;
    for _ in 0..3 {
        socket.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        if let Err(e) = socket.recv(&mut buf) {
            if e.kind() == ErrorKind::ConnectionRefused {
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "no ICMP port unreachable for UDP");
    assert!(counter(c, 0, stat::NODEPORT_REJECTED)? >= 2);
    Ok(())
}

/// One long-lived connection from each of the 8 clients to `to`, with the pod that
/// answered it.
/// Connections from the world's clients in turn until both backends hold some (Maglev
/// hashes each connection's source port too: eight connections all land on one of two
/// backends once in 256 runs), at most 64.
fn open_connections(world: &Netns, to: SocketAddrV4) -> Result<Vec<(String, TcpStream)>> {
    let mut open: Vec<(String, TcpStream)> = Vec::new();
    for index in 0..64 {
        let mut stream = tcp_from(world, client_ip(index % 8), to)?;
        let pod = parse_answer(&exchange(&mut stream, "hello")?, "hello")?.0;
        open.push((pod, stream));
        let both = ["a1", "b0"]
            .iter()
            .all(|pod| open.iter().any(|(p, _)| p == pod));
        if open.len() >= 8 && both {
            break;
        }
    }
    Ok(open)
}

#[test]
fn removing_a_backend_under_load_breaks_no_connection_to_the_others() -> Result<()> {
    removing_a_backend_under_load_breaks_no_connection_to_the_others_from(ObjectSource::File)
}

/// The same, the agents watching an API server.
#[test]
fn watching_an_api_server_removing_a_backend_under_load_breaks_no_connection_to_the_others(
) -> Result<()> {
    removing_a_backend_under_load_breaks_no_connection_to_the_others_from(ObjectSource::Kubernetes)
}

fn removing_a_backend_under_load_breaks_no_connection_to_the_others_from(
    source: ObjectSource,
) -> Result<()> {
    let env = world_from(source, |c| both_backends(c, ""))?;
    let c = &env.cluster;
    let to = SocketAddrV4::new(c.nodes[0].ip.unwrap(), NODE_PORT);
    // Long-lived connections to both backends.
    let mut open = open_connections(&c.world, to)?;
    anyhow::ensure!(open.iter().any(|(p, _)| p == "b0"), "no connection to b0");
    // Scale down: a1 leaves the Service.
    let without_a1 = load_balancer_yaml(
        "shop",
        VIP,
        PORT,
        NODE_PORT,
        &format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n"),
        &[LB_IP],
        &[(c.pod("b0").ip, &c.nodes[1].name)],
    );
    c.write_config(&format!("{}---\n{without_a1}", c.nodes_and_pods_yaml()))?;
    c.nodes[0].wait_for_maps("one backend left", |m| {
        m.services
            .iter()
            .any(|(k, v)| k.port == NODE_PORT && k.backend_slot == 0 && v.count == 1)
    })?;
    for (pod, stream) in open.iter_mut().filter(|(p, _)| p == "b0") {
        let reply = exchange(stream, "still there?")?;
        assert_eq!(parse_answer(&reply, "still there?")?.0, *pod);
    }
    wait_until("new connections all go to b0", SETTLE, || {
        (0..8).all(|i| tcp_request(&c.world, client_ip(i), to).is_ok_and(|(pod, _)| pod == "b0"))
    })?;
    Ok(())
}

#[test]
fn a_terminating_backend_finishes_its_connections_and_takes_no_new_ones() -> Result<()> {
    a_terminating_backend_finishes_its_connections_and_takes_no_new_ones_from(ObjectSource::File)
}

/// The same, the agents watching an API server.
#[test]
fn watching_an_api_server_a_terminating_backend_finishes_its_connections_and_takes_no_new_ones(
) -> Result<()> {
    a_terminating_backend_finishes_its_connections_and_takes_no_new_ones_from(
        ObjectSource::Kubernetes,
    )
}

fn a_terminating_backend_finishes_its_connections_and_takes_no_new_ones_from(
    source: ObjectSource,
) -> Result<()> {
    let env = world_from(source, |c| both_backends(c, ""))?;
    let c = &env.cluster;
    let to = SocketAddrV4::new(c.nodes[0].ip.unwrap(), NODE_PORT);
    let mut open = open_connections(&c.world, to)?;
    anyhow::ensure!(open.iter().any(|(p, _)| p == "a1"), "no connection to a1");
    // a1 is being deleted: not ready, still serving, terminating.
    let a1 = format!(
        "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true}}\n",
        c.pod("a1").ip,
        c.nodes[0].name
    );
    let terminating = both_backends(c, "").replace(
        &a1,
        &a1.replace(
            "{ready: true}",
            "{ready: false, serving: true, terminating: true}",
        ),
    );
    anyhow::ensure!(terminating.contains("terminating: true"), "{terminating}");
    c.write_config(&format!("{}---\n{terminating}", c.nodes_and_pods_yaml()))?;
    c.nodes[0].wait_for_maps("a1 out of the slots", |m| {
        m.services
            .iter()
            .any(|(k, v)| k.port == NODE_PORT && k.backend_slot == 0 && v.count == 1)
    })?;
    // Every open connection, a1's included, still works.
    for (pod, stream) in open.iter_mut() {
        let reply = exchange(stream, "still there?")?;
        assert_eq!(parse_answer(&reply, "still there?")?.0, *pod);
    }
    // New connections all go to b0.
    for index in 0..8 {
        assert_eq!(tcp_request(&c.world, client_ip(index), to)?.0, "b0");
    }
    Ok(())
}

/// A UDP server in `netns` answering each datagram with its size, stopped on drop
/// (answers stay small, whatever was received).
struct SizeEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SizeEcho {
    fn start(netns: &Netns, port: u16) -> Result<Self> {
        let socket =
            netns.run(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))??;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(n.to_string().as_bytes(), from);
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SizeEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP socket of the world connected to `to`, with path MTU discovery `mode`
/// (IP_PMTUDISC_DO: DF set; IP_PMTUDISC_DONT: DF clear).
fn udp_with_pmtu_mode(world: &Netns, to: SocketAddrV4, mode: i32) -> Result<UdpSocket> {
    let socket = udp_socket(world, WORLD_IP)?;
    set_pmtu_mode(&socket, mode)?;
    socket.connect(to)?;
    Ok(socket)
}

/// IP_MTU_DISCOVER (nix has no setter for it).
fn set_pmtu_mode(socket: &UdpSocket, mode: i32) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a live socket, and a c_int option value of the size given.
    let result = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::IPPROTO_IP,
            nix::libc::IP_MTU_DISCOVER,
            (&mode as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    nix::errno::Errno::result(result)?;
    Ok(())
}

/// Send `size` bytes of payload and return the size the server reports.
fn sized_request(socket: &UdpSocket, size: usize) -> std::io::Result<usize> {
    let mut buf = [0u8; 64];
    let mut last = std::io::Error::from(ErrorKind::TimedOut);
    for _ in 0..3 {
        socket.send(&vec![b'x'; size])?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).parse().unwrap_or(0)),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                last = e
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[test]
fn path_mtu_discovery_works_through_a_node_port_and_oversized_datagrams_without_df_arrive(
) -> Result<()> {
    const SIZES_PORT: u16 = 9999;
    const SIZES_NODE_PORT: u16 = 30099;
    let env = world(|c| {
        format!(
            "{}---
apiVersion: v1
kind: Service
metadata: {{name: sizes, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.99
  ports:
  - {{name: sizes, port: 9, protocol: UDP, targetPort: {SIZES_PORT}, nodePort: {SIZES_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sizes-1, namespace: default, labels: {{kubernetes.io/service-name: sizes}}}}
addressType: IPv4
ports:
- {{name: sizes, port: {SIZES_PORT}, protocol: UDP}}
endpoints:
- addresses: [\"{}\"]
  nodeName: {}
  conditions: {{ready: true}}
",
            both_backends(c, ""),
            c.pod("b0").ip,
            c.nodes[1].name
        )
    })?;
    let c = &env.cluster;
    let _sizes = SizeEcho::start(&c.pod("b0").netns, SIZES_PORT)?;
    let pod_mtu = (1500 - ferrite_common::VXLAN_OVERHEAD) as usize;
    let one_over = pod_mtu - 28 + 1; // UDP payload of an IP packet one byte over
    let [remote, local] =
        [0, 1].map(|n| SocketAddrV4::new(c.nodes[n].ip.expect("plugged"), SIZES_NODE_PORT));
    wait_until("the NodePort to answer", SETTLE, || {
        udp_with_pmtu_mode(&c.world, remote, nix::libc::IP_PMTUDISC_DONT)
            .is_ok_and(|s| sized_request(&s, 10).is_ok())
    })?;

    // Without DF, one byte over the pod MTU arrives whole, through the overlay (node 0
    // forwards to b0 on node 1) and straight to a local pod (node 1).
    for to in [remote, local] {
        let socket = udp_with_pmtu_mode(&c.world, to, nix::libc::IP_PMTUDISC_DONT)?;
        assert_eq!(sized_request(&socket, one_over)?, one_over, "via {to}");
    }
    // The pod's own stack fragments what it sends one byte over its MTU (no DF) to a
    // pod on another node; the overlay carries the fragments.
    let a1 = &c.pod("a1").netns;
    let to_b0 = SocketAddrV4::new(c.pod("b0").ip, SIZES_PORT);
    let socket = a1.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    set_pmtu_mode(&socket, nix::libc::IP_PMTUDISC_DONT)?;
    socket.connect(to_b0)?;
    assert_eq!(sized_request(&socket, one_over)?, one_over, "pod to pod");
    // Through a ClusterIP: only the first fragment carries the ports; the datapath
    // remembers them for the rest of the datagram.
    let c0 = &c.pod("c0").netns;
    let via_cluster_ip = |to: SocketAddrV4, size: usize| -> Result<Vec<u8>> {
        let socket = c0.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        set_pmtu_mode(&socket, nix::libc::IP_PMTUDISC_DONT)?;
        socket.connect(to)?;
        let mut buf = vec![0u8; 65536];
        for _ in 0..3 {
            socket.send(&vec![b'x'; size])?;
            if let Ok(n) = socket.recv(&mut buf) {
                return Ok(buf[..n].to_vec());
            }
        }
        bail!("no answer from {to}")
    };
    let sizes_vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 9);
    let answer = via_cluster_ip(sizes_vip, one_over)?;
    assert_eq!(String::from_utf8_lossy(&answer), one_over.to_string());
    // And back: backends echo a datagram over the MTU, which they send fragmented;
    // every answer comes from the Service address (connected socket), whole.
    for _ in 0..6 {
        let answer = via_cluster_ip(SocketAddrV4::new(VIP, PORT + 1), one_over)?;
        assert!(answer.len() > one_over, "{} bytes", answer.len());
    }
    assert!(counter(c, 0, stat::FRAGMENT_TRACKED)? > 0);
    assert_eq!(counter(c, 0, stat::FRAGMENT_ROUTED)?, 0);

    // With DF, the world learns the pod MTU from node 0's ICMP "fragmentation needed"
    // (the socket reports EMSGSIZE and its path MTU drops), then fits.
    for to in [remote, local] {
        let socket = udp_with_pmtu_mode(&c.world, to, nix::libc::IP_PMTUDISC_DO)?;
        let error = sized_request(&socket, one_over).expect_err("no answer to a DF packet over");
        assert_eq!(
            error.raw_os_error(),
            Some(nix::libc::EMSGSIZE),
            "via {to}: {error}"
        );
        let path_mtu = nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::IpMtu)?;
        assert_eq!(path_mtu as usize, pod_mtu, "via {to}");
        assert_eq!(
            sized_request(&socket, one_over - 1)?,
            one_over - 1,
            "via {to}"
        );
    }
    for node in 0..2 {
        assert!(
            counter(c, node, stat::ICMP_FRAG_NEEDED)? >= 1,
            "node {node}"
        );
    }
    Ok(())
}

/// Spoofed SYNs to `to` from random addresses of 198.18.0.0/15 and random ports,
/// crafted whole (IPv4 and TCP checksums computed here) and sent from the world with
/// a raw socket, `count` of them.
fn spoofed_syns(
    raw: &Socket,
    rng: &mut fastrand::Rng,
    to: SocketAddrV4,
    count: usize,
) -> Result<()> {
    for _ in 0..count {
        let source = Ipv4Addr::from(0xc612_0000 | rng.u32(..0x2_0000));
        let builder = etherparse::PacketBuilder::ipv4(source.octets(), to.ip().octets(), 64)
            .tcp(rng.u16(1024..), to.port(), rng.u32(..), 64240)
            .syn();
        let mut packet = Vec::with_capacity(builder.size(0));
        builder.write(&mut packet, &[])?;
        raw.send_to(&packet, &SockAddr::from(to))?;
    }
    Ok(())
}

/// Issue 24: a SYN flood from spoofed sources at a NodePort whose only backend is on
/// the other node claims a SNAT port of node 0 per SYN (a backend answers every SYN,
/// so each flow looks like a connection being opened) until the range (61000-65535)
/// is full. Real connections from the world then still succeed: a new flow that
/// finds every port it tries taken takes over the oldest held by a flow whose client
/// never completed its handshake (`snat_port_reclaimed`), never an established one.
/// The flood's flows stay half-open in conntrack (their lifetime is the SYN
/// lifetime, 60 s), the real ones are established. Before the fix the real
/// connections timed out (`drop_no_snat_port`) for as long as the flood's flows
/// lived: 6 hours.
#[test]
fn after_a_syn_flood_from_spoofed_sources_real_connections_to_a_node_port_succeed() -> Result<()> {
    // Only b0 (node 1) backs it: node 0 SNATs every flow to a port of its range.
    let env = world(|c| {
        load_balancer_yaml(
            "flooded",
            VIP,
            PORT,
            NODE_PORT,
            "",
            &[],
            &[(c.pod("b0").ip, &c.nodes[1].name)],
        )
    })?;
    let c = &env.cluster;
    let node0 = c.nodes[0].ip.context("plugged")?;
    let to = SocketAddrV4::new(node0, NODE_PORT);
    // One real connection before the flood: established, it must keep its port.
    let mut before = tcp_from(&c.world, client_ip(0), to)?;
    let (pod, _) = parse_answer(&exchange(&mut before, "before")?, "before")?;
    assert_eq!(pod, "b0");

    let raw = c.world.run(|| -> Result<Socket> {
        // IPPROTO_RAW: the packets carry their own IP header (IP_HDRINCL).
        Ok(Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(255)),
        )?)
    })??;
    let mut rng = fastrand::Rng::with_seed(0x5f10_0d24);
    // Until SYNs find every port they try taken (taken over with the fix, dropped
    // without it) a thousand times: the range is full. In batches, so the veths'
    // queues keep up.
    let exhausted = || -> Result<u64> {
        Ok(counter(c, 0, stat::SNAT_PORT_RECLAIMED)? + counter(c, 0, stat::DROP_NO_SNAT_PORT)?)
    };
    let mut sent = 0;
    while exhausted()? < 1_000 {
        anyhow::ensure!(sent < 100_000, "{sent} SYNs did not fill the SNAT range");
        spoofed_syns(&raw, &mut rng, to, 500)?;
        sent += 500;
        std::thread::sleep(Duration::from_millis(20));
    }
    let ports = (ferrite_common::SNAT_PORT_MAX - ferrite_common::SNAT_PORT_MIN) as usize + 1;
    let entries = c.nodes[0].maps()?.conntrack_entries()?;
    let half_open_claims = entries
        .iter()
        .filter(|(key, value)| {
            key.daddr == node0.octets()
                && key.dport >= ferrite_common::SNAT_PORT_MIN
                && value.flags & ferrite_common::CT_FLAG_REPLY != 0
                && value.flags & ferrite_common::CT_FLAG_UNESTABLISHED != 0
        })
        .count();
    eprintln!("{sent} spoofed SYNs sent; {half_open_claims} of {ports} SNAT ports held by half-open flows");
    assert!(
        half_open_claims * 100 >= ports * 95,
        "{half_open_claims} of {ports}"
    );

    // Real clients get through, the flood's claims still within their lifetime.
    for index in 1..6 {
        let from = client_ip(index);
        let (pod, seen) = tcp_request(&c.world, from, to)
            .with_context(|| format!("a real connection from {from} after the flood"))?;
        assert_eq!((pod.as_str(), seen), ("b0", node0.to_string()));
    }
    // The connection from before the flood kept its port and works.
    let (pod, _) = parse_answer(&exchange(&mut before, "after")?, "after")?;
    assert_eq!(pod, "b0");
    assert!(counter(c, 0, stat::SNAT_PORT_RECLAIMED)? > 0);
    assert_eq!(counter(c, 0, stat::DROP_NO_SNAT_PORT)?, 0);
    // The real clients' flows completed their handshake.
    let entries = c.nodes[0].maps()?.conntrack_entries()?;
    for index in 0..6 {
        let from = client_ip(index).octets();
        let flow = entries
            .iter()
            .find(|(key, _)| key.saddr == from && key.dport == NODE_PORT)
            .with_context(|| format!("the flow of {}", client_ip(index)))?;
        assert_eq!(
            flow.1.flags & ferrite_common::CT_FLAG_UNESTABLISHED,
            0,
            "{}",
            client_ip(index)
        );
    }
    Ok(())
}

/// A NodePort Service (UDP, nodePort `node_port`) whose only endpoint `address` on
/// `node` listens on nothing at the target port (5999).
fn closed_udp_node_port(
    name: &str,
    vip: Ipv4Addr,
    node_port: u16,
    address: Ipv4Addr,
    node: &str,
) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: NodePort
  clusterIP: {vip}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5999, nodePort: {node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: dns, port: 5999, protocol: UDP}}
endpoints:
- addresses: [\"{address}\"]
  nodeName: {node}
  conditions: {{ready: true}}
"
    )
}

/// Issue 24, item 13, from the world: a connected UDP client of a NodePort whose
/// backend's target port is closed gets ECONNREFUSED at once, as through
/// kube-proxy's NAT: the backend's ICMP port unreachable is translated back like the
/// flow's replies (from the NodePort, quoting what the client sent). With the backend
/// on node 0 (DNAT only) the error leaves from its veth; with the backend on node 1
/// (node 0 SNATs the flow to a port of its range) it goes back over the overlay to
/// node 0, which holds the flow, by the quoted SNAT port, and is translated there.
/// Untranslated, the error names the backend (or quotes node 0's SNAT port), which
/// the client's socket never talked to, and the client waits for its timeout.
#[test]
fn a_connected_udp_client_of_a_node_port_whose_backend_port_is_closed_is_refused() -> Result<()> {
    const HERE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 81), 30090);
    const THERE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 82), 30091);
    let env = world(|c| {
        [
            closed_udp_node_port(
                "closed-here",
                HERE.0,
                HERE.1,
                c.pod("a1").ip,
                &c.nodes[0].name,
            ),
            closed_udp_node_port(
                "closed-there",
                THERE.0,
                THERE.1,
                c.pod("b0").ip,
                &c.nodes[1].name,
            ),
        ]
        .join("---\n")
    })?;
    let c = &env.cluster;
    let node0 = c.nodes[0].ip.context("plugged")?;
    for (index, (what, node_port)) in [("on the node", HERE.1), ("on the other node", THERE.1)]
        .into_iter()
        .enumerate()
    {
        let socket = udp_socket(&c.world, client_ip(index as u8))?;
        socket.connect(SocketAddrV4::new(node0, node_port))?;
        // A first datagram may meet a neighbour entry still being resolved: three tries.
        let mut error = None;
        for _ in 0..3 {
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            error = socket.recv(&mut buf).err();
            if error.as_ref().map(std::io::Error::kind) == Some(ErrorKind::ConnectionRefused) {
                break;
            }
        }
        assert_eq!(
            error.as_ref().map(std::io::Error::kind),
            Some(ErrorKind::ConnectionRefused),
            "connected UDP to node 0's NodePort {node_port}, the backend {what}: {error:?}"
        );
    }
    // Both errors were translated on node 0, where the flows' state is.
    assert!(counter(c, 0, stat::ICMP_ERROR_REVERSE_NAT)? >= 2);
    assert_eq!(counter(c, 0, stat::NODEPORT_REJECTED)?, 0);
    Ok(())
}

/// UDP through a backend's termination (a datagram every 10 ms from one client
/// socket to a NodePort): while a1 is terminating but still serving, the flow's
/// datagrams keep reaching a1, every one answered; once a1 stops serving they move
/// to b0 and stay there. (Cilium lost them for the whole grace period.)
#[test]
fn udp_to_a_terminating_backend_reaches_it_until_it_stops_serving() -> Result<()> {
    let env = world(|c| both_backends(c, ""))?;
    let c = &env.cluster;
    let to = SocketAddrV4::new(c.nodes[0].ip.unwrap(), NODE_PORT + 1);
    // A client whose flow the NodePort gives a1.
    let socket = (0..16)
        .find_map(|i| {
            let socket = udp_socket(&c.world, client_ip(i)).ok()?;
            (udp_ask(&socket, to, "which?").ok()?.as_deref() == Some("a1")).then_some(socket)
        })
        .context("no client's flow went to a1")?;
    let a1 = format!(
        "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true}}\n",
        c.pod("a1").ip,
        c.nodes[0].name
    );
    let with_a1 = |conditions: &str| {
        both_backends(c, "").replace(&a1, &a1.replace("{ready: true}", conditions))
    };
    let stream = |count: usize| -> Result<Vec<Option<String>>> {
        (0..count)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(10));
                udp_ask(&socket, to, &format!("datagram {i}"))
            })
            .collect()
    };
    assert!(stream(20)?.iter().all(|p| p.as_deref() == Some("a1")));

    let terminating = with_a1("{ready: false, serving: true, terminating: true}");
    c.write_config(&format!("{}---\n{terminating}", c.nodes_and_pods_yaml()))?;
    c.nodes[0].wait_for_maps("a1 out of the slots", |m| {
        m.services
            .iter()
            .any(|(k, v)| k.port == NODE_PORT + 1 && k.backend_slot == 0 && v.count == 1)
    })?;
    let answered = stream(50)?;
    assert!(
        answered.iter().all(|p| p.as_deref() == Some("a1")),
        "while a1 terminates and serves: {answered:?}"
    );

    let stopped = with_a1("{ready: false, serving: false, terminating: true}");
    c.write_config(&format!("{}---\n{stopped}", c.nodes_and_pods_yaml()))?;
    c.nodes[0].wait_for_maps("a1 gone from the backends", |m| {
        !m.backends
            .values()
            .any(|b| b.address == c.pod("a1").ip.octets())
    })?;
    let answered = stream(20)?;
    assert!(
        answered.iter().all(|p| p.as_deref() == Some("b0")),
        "once a1 stopped serving: {answered:?}"
    );
    Ok(())
}
