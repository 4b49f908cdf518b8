//! User stories for hostPorts: a pod declares `hostPort`, and the runtime runs the
//! shipped conflist (deploy/10-ferrite.conflist: `ferrite-cni`, then Debian's real
//! `portmap` plugin, chained as containerd's libcni chains it, `runtimeConfig.
//! portMappings` and all), so portmap DNATs `<node address>:<hostPort>` to the pod in
//! netfilter. Pods on the same node as the pod behind the hostPort, pods on the other
//! node and the world reach it over TCP and UDP, and their answers come from the
//! node's address and hostPort. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};

use anyhow::{ensure, Context, Result};
use ferrite_common::{CT_FLAG_VIA_STACK, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    cluster::{TCP_TARGET, UDP_TARGET},
    cni::{Runtime, Sandbox},
    lab::{exchange, parse_answer, pod_ip, wait_until, Cluster, Node, Pod, SETTLE, WORLD_GATEWAY},
};
use serde_json::{json, Value};

/// The pod's hostPort (TCP and UDP), on every address of its node.
const HOST_PORT: u16 = 8088;

/// The shipped conflist as the DaemonSet's installer writes it for `node`, with the
/// IPAM state in the node's test directory instead of /var/lib/cni/ferrite.
fn shipped_conflist(node: &Node) -> Result<Value> {
    let text =
        include_str!("../../deploy/10-ferrite.conflist").replace("__NODE_NAME__", &node.name);
    let mut conflist: Value = serde_json::from_str(&text)?;
    ensure!(
        conflist["plugins"][1]["type"] == "portmap",
        "the shipped conflist chains portmap"
    );
    conflist["plugins"][0]["dataDir"] = json!(node.dir.join("ipam"));
    Ok(conflist)
}

/// One request over TCP on `stream` and one over UDP from `client` to `to`: each
/// answer comes from `to` (for UDP, as the socket reports it; for TCP, the
/// connection would not exist otherwise) and names the server and the client's
/// address as it saw it.
fn ask(
    client: &Pod,
    stream: &mut TcpStream,
    to: SocketAddrV4,
    what: &str,
) -> Result<[(String, String); 2]> {
    let request = format!("{what} tcp");
    let tcp = exchange(stream, &request).with_context(|| format!("{what}: TCP to {to}"))?;
    let tcp = parse_answer(&tcp, &request)?;
    let request = format!("{what} udp");
    let (udp, from) = client
        .udp_request(to, &request)
        .with_context(|| format!("{what}: UDP to {to}"))?;
    ensure!(
        from == to.into(),
        "{what}: the UDP answer came from {from}, not {to}"
    );
    Ok([tcp, parse_answer(&udp, &request)?])
}

/// The `via stack` conntrack entries of `node`: (source, destination, source port,
/// protocol) of their keys.
fn via_stack_entries(node: &Node) -> Result<Vec<(Ipv4Addr, Ipv4Addr, u16, u8)>> {
    Ok(node
        .maps()?
        .conntrack_entries()?
        .into_iter()
        .filter(|(_, value)| value.flags & CT_FLAG_VIA_STACK != 0)
        .map(|(key, _)| (key.saddr.into(), key.daddr.into(), key.sport, key.proto))
        .collect())
}

/// A pod behind a hostPort (TCP and UDP) on node 0, wired by the shipped conflist,
/// is reached by a pod on the same node, a pod on the other node and the world. The
/// same-node client's answers come back from the node's address and the server sees
/// the client's own pod address: the backend's answers go back through the stack,
/// where portmap's conntrack state translates them (before the fix they were
/// redirected straight into the client, which reset the connection to an address it
/// never called, and a UDP client got its answer from the pod's address). Only that
/// flow leaves a `via stack` conntrack entry.
#[test]
fn pods_on_the_same_node_and_on_the_other_reach_a_host_port_and_get_its_answers() -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("c0", pod_ip(0, 20))?;
    cluster.nodes[1].add_pod("c1", pod_ip(1, 20))?;
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agents()?;
    for node in &cluster.nodes {
        node.wait_for_maps("both pod CIDRs and the node's client pod", |m| {
            m.pod_routes() == 2 && m.endpoints.len() == 1
        })?;
    }
    let node = &cluster.nodes[0];
    wait_until("the pod CIDR is published", SETTLE, || {
        ferrite_agent::files::pod_cidr_file(&node.name).exists()
    })?;
    let node_ip = node.ip.context("plugged")?;
    let runtime = Runtime::new(node, shipped_conflist(node)?);
    let port_mappings = json!({"portMappings": [
        {"hostPort": HOST_PORT, "containerPort": TCP_TARGET, "protocol": "tcp"},
        {"hostPort": HOST_PORT, "containerPort": UDP_TARGET, "protocol": "udp"},
    ]});
    let mut web = Sandbox::new("web")?;
    runtime.add_with(&mut web, &port_mappings)?;
    let _servers = [web.pod.serve(TCP_TARGET)?, web.pod.serve(UDP_TARGET)?];
    let host_port = SocketAddrV4::new(node_ip, HOST_PORT);
    let (c0, c1) = (cluster.pod("c0"), cluster.pod("c1"));

    // The same node: portmap DNATs, nothing SNATs (the server sees the pod).
    let mut stream = c0
        .tcp_connect(host_port)
        .context("same node: TCP connect")?;
    for (name, client) in ask(c0, &mut stream, host_port, "same node")? {
        assert_eq!(name, "web");
        assert_eq!(client, c0.ip.to_string(), "the same-node client as seen");
    }
    // The mechanism: one entry for each of those flows, under its reply tuple (the
    // pod behind the hostPort -> the client pod). Checked while the TCP connection
    // is open: closed, its entry goes 10 s after its last packet.
    let mut entries = via_stack_entries(node)?;
    entries.sort(); // by source port: UDP's 5353, then TCP's 8080
    assert_eq!(
        entries,
        [
            (web.pod.ip, c0.ip, UDP_TARGET, PROTO_UDP),
            (web.pod.ip, c0.ip, TCP_TARGET, PROTO_TCP)
        ]
    );
    drop(stream);

    // The other node: its pod's traffic to a node address leaves masqueraded.
    let node1_ip = cluster.nodes[1].ip.context("plugged")?;
    let mut stream = c1
        .tcp_connect(host_port)
        .context("other node: TCP connect")?;
    for (name, client) in ask(c1, &mut stream, host_port, "other node")? {
        assert_eq!(name, "web");
        assert_eq!(
            client,
            node1_ip.to_string(),
            "the other node's client as seen"
        );
    }
    // The world, unchanged by any of it.
    let reply = cluster.world.tcp_request(host_port, "world")?;
    assert_eq!(parse_answer(&reply, "world")?.1, WORLD_GATEWAY.to_string());
    // Neither left an entry: their answers go to node addresses, through the stack.
    for entry in via_stack_entries(node)? {
        assert_eq!((entry.0, entry.1), (web.pod.ip, c0.ip), "{entry:?}");
    }
    drop(stream);
    runtime.del_with(&web, &port_mappings)?;
    Ok(())
}
