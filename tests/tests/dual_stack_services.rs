//! User stories for dual-stack Services on a dual-stack cluster: a Service with a
//! ClusterIP of each family whose backends are dual-stack pods on both nodes. A pod
//! and a node's own processes reach it over IPv6 as over IPv4, balanced at their
//! sockets over the backends of both nodes (each backend sees the client's own
//! address); UDP answers come from the Service address; the node's IPv6 address
//! serves the nodePorts to them the same way, and so does another node's (served
//! as this node's NodePort, as over IPv4); a dual-stack socket naming
//! the IPv4 ClusterIP as an IPv4-mapped address reaches it too; a Service without
//! IPv6 endpoints refuses at once; a deleted Service's IPv6 entries go. Each from a
//! YAML file and from an API server's watch events. Needs root.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{ensure, Result};
use ferrite_common::stat;
use ferrite_tests::{
    cluster::{TCP_TARGET, UDP_TARGET},
    fake_apiserver::FakeApiServer,
    lab::{
        node_ip6, parse_answer, pod_ip, pod_ip6, wait_until, Cluster, ObjectSource, Probe, Server,
        SETTLE,
    },
};

/// The dual-stack ClusterIP Service (TCP 80 -> 8080, UDP 53 -> 5353).
const WEB4: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 1);
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0x3, 0x1);
/// Its nodePorts (TCP, UDP).
const NODE_PORT: u16 = 30180;
const NODE_PORT_UDP: u16 = 30181;
/// An IPv6-only ClusterIP Service without endpoints.
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0x3, 0x2);

fn endpoints_yaml(name: &str, family: &str, addresses: &[IpAddr]) -> String {
    let endpoints: String = addresses
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{family}
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: {family}
ports:
- {{name: http, port: {TCP_TARGET}, protocol: TCP}}
- {{name: dns, port: {UDP_TARGET}, protocol: UDP}}
endpoints:
{endpoints}"
    )
}

fn services_yaml(backends4: &[IpAddr], backends6: &[IpAddr]) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {WEB4}
  clusterIPs: [{WEB4}, \"{WEB6}\"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {TCP_TARGET}, nodePort: {NODE_PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {UDP_TARGET}, nodePort: {NODE_PORT_UDP}}}
---
{}---
{}---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: \"{EMPTY6}\"
  clusterIPs: [\"{EMPTY6}\"]
  ipFamilies: [IPv6]
  ipFamilyPolicy: SingleStack
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {TCP_TARGET}}}
",
        endpoints_yaml("web", "IPv4", backends4),
        endpoints_yaml("web", "IPv6", backends6),
    )
}

/// A frontend's TCP and UDP addresses.
fn frontend(ip: impl Into<IpAddr>, tcp_port: u16, udp_port: u16) -> (SocketAddr, SocketAddr) {
    let ip = ip.into();
    (SocketAddr::new(ip, tcp_port), SocketAddr::new(ip, udp_port))
}

/// Ask a frontend `times` times over TCP and over UDP from `probe`; the backends that
/// answered and the client addresses they saw. The socket must show the frontend as
/// its peer: getpeername of the TCP connection, the source of every UDP answer.
fn ask(
    probe: &Probe,
    (to, udp): (SocketAddr, SocketAddr),
    times: usize,
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let (mut backends, mut seen) = (BTreeSet::new(), BTreeSet::new());
    for i in 0..times {
        let request = format!("tcp #{i}");
        let outcome = probe.tcp(to, &request)?;
        let (backend, client) = parse_answer(outcome.answer()?, &request)?;
        ensure!(
            outcome.from.as_deref() == Some(to.to_string().as_str()),
            "getpeername shows the Service, not {:?}",
            outcome.from
        );
        backends.insert(backend);
        seen.insert(client);
        let request = format!("udp #{i}");
        let outcome = probe.udp(udp, &request)?;
        let (backend, client) = parse_answer(outcome.answer()?, &request)?;
        ensure!(
            outcome.from.as_deref() == Some(udp.to_string().as_str()),
            "the UDP answer comes from the Service address, not {:?}",
            outcome.from
        );
        backends.insert(backend);
        seen.insert(client);
    }
    Ok((backends, seen))
}

fn dual_stack_service_reached_over_both_families(source: ObjectSource) -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    if source == ObjectSource::Kubernetes {
        FakeApiServer::serve_cluster(&mut cluster)?;
    }
    cluster.dual_stack()?;
    cluster.nodes[0].add_dual_stack_pod("web-0", pod_ip(0, 0), pod_ip6(0, 0))?;
    cluster.nodes[1].add_dual_stack_pod("web-1", pod_ip(1, 0), pod_ip6(1, 0))?;
    cluster.nodes[0].add_dual_stack_pod("client", pod_ip(0, 1), pod_ip6(0, 1))?;
    let mut servers = Vec::new();
    for (name, node) in [("web-0", 0), ("web-1", 1)] {
        let pod = cluster.pod(name);
        servers.push(pod.serve(TCP_TARGET)?);
        servers.push(pod.serve(UDP_TARGET)?);
        let ip6 = pod_ip6(node, 0);
        for port in [TCP_TARGET, UDP_TARGET] {
            servers.push(Server::start(
                &pod.netns,
                name,
                SocketAddr::new(ip6.into(), port),
            )?);
        }
    }
    let backends4 = [pod_ip(0, 0).into(), pod_ip(1, 0).into()];
    let backends6 = [pod_ip6(0, 0).into(), pod_ip6(1, 0).into()];
    let objects = |services: &str| format!("{}---\n{services}", cluster.nodes_and_pods_yaml());
    cluster.write_config(&objects(&services_yaml(&backends4, &backends6)))?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("both families' frontends written", |m| {
            m.services.keys().any(|k| k.address == WEB4.octets())
                && m.services6.keys().any(|k| k.address == WEB6.octets())
                && m.services6.keys().any(|k| k.address == EMPTY6.octets())
        })?;
    }

    // The overlay's IPv6 routes to the other node come with its Node object, which
    // an API server may deliver after the Services: wait until its pod answers.
    let across = SocketAddr::new(pod_ip6(1, 0).into(), TCP_TARGET);
    wait_until("a TCP answer across nodes over IPv6", SETTLE, || {
        cluster
            .pod("client")
            .probe()
            .tcp(across, "ready?")
            .is_ok_and(|outcome| outcome.reply.is_some())
    })?;

    let node = &cluster.nodes[0];
    let translated =
        || -> Result<u64> { Ok(node.maps()?.counters()?[stat::SOCK_TRANSLATED as usize].packets) };
    let before = translated()?;
    let client = cluster.pod("client");
    let both: BTreeSet<String> = ["web-0", "web-1"].map(String::from).into();

    // A pod, over IPv6: both nodes' backends answer, each seeing the pod's own IPv6
    // address (no NAT: the socket was pointed at the backend).
    let (answered, seen) = ask(&client.probe(), frontend(WEB6, 80, 53), 12)?;
    ensure!(answered == both, "IPv6 answered by {answered:?}");
    ensure!(
        seen == BTreeSet::from([pod_ip6(0, 1).to_string()]),
        "backends saw {seen:?}"
    );
    // ... and over IPv4, the same Service.
    let (answered, _) = ask(&client.probe(), frontend(WEB4, 80, 53), 12)?;
    ensure!(answered == both, "IPv4 answered by {answered:?}");
    ensure!(
        translated()? >= before + 48,
        "every call was balanced at the socket"
    );

    // A dual-stack socket naming the IPv4 ClusterIP as ::ffff:10.96.3.1 reaches its
    // IPv4 backends, and getpeername shows the mapped Service address.
    let mapped = SocketAddr::new(WEB4.to_ipv6_mapped().into(), 80);
    let outcome = client.probe().tcp(mapped, "mapped")?;
    let (backend, _) = parse_answer(outcome.answer()?, "mapped")?;
    ensure!(both.contains(&backend), "answered by {backend}");
    ensure!(
        outcome.from.as_deref() == Some(mapped.to_string().as_str()),
        "getpeername shows {:?}",
        outcome.from
    );

    // Its node's IPv6 address at the nodePorts: the NodePort frontends on that
    // address, balanced at the socket over both nodes' backends.
    let node_port = frontend(node_ip6(0), NODE_PORT, NODE_PORT_UDP);
    let (answered, _) = ask(&client.probe(), node_port, 12)?;
    ensure!(
        answered == both,
        "the IPv6 NodePort answered by {answered:?}"
    );
    // Another node's IPv6 address at the nodePorts: served as this node's NodePort
    // (that node's address known from its /128 in ferrite_routes6), the socket
    // still showing the address it asked for.
    let other_node_port = frontend(node_ip6(1), NODE_PORT, NODE_PORT_UDP);
    let (answered, _) = ask(&client.probe(), other_node_port, 12)?;
    ensure!(
        answered == both,
        "node 1's IPv6 NodePort answered by {answered:?}"
    );

    // The node's own processes reach the IPv6 ClusterIP too.
    let (answered, _) = ask(&node.host_probe(), frontend(WEB6, 80, 53), 12)?;
    ensure!(answered == both, "from the node over IPv6: {answered:?}");

    // An IPv6 Service without endpoints refuses at once.
    let refused_before = node.maps()?.counters()?[stat::SOCK_REFUSED as usize].packets;
    let outcome = client
        .probe()
        .tcp(SocketAddr::new(EMPTY6.into(), 80), "none")?;
    ensure!(
        outcome.error.as_deref() == Some("refused"),
        "a Service without endpoints: {outcome:?}"
    );
    ensure!(node.maps()?.counters()?[stat::SOCK_REFUSED as usize].packets > refused_before);

    // The Service goes: its IPv6 entries leave every node's maps.
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    for node in &cluster.nodes {
        node.wait_for_maps("the IPv6 frontends gone", |m| {
            m.services6.is_empty() && m.backends6.is_empty() && m.rev_nat6.is_empty()
        })?;
    }
    drop(servers);
    Ok(())
}

ferrite_tests::from_both_sources!(dual_stack_service_reached_over_both_families);
