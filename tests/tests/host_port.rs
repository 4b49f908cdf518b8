//! User stories for hostPorts (Kubernetes' "Services"/hostPort e2e stories): a pod
//! declares `containers[].ports[].hostPort`, and the agent serves it in the datapath
//! as a frontend on its node's address, as it serves a NodePort: no `portmap` in the
//! conflist. The world, the node itself, a pod on the same node and a pod on the
//! other node reach it over TCP and UDP, and the answers come from
//! `<node address>:<hostPort>`; a second pod asking for the same port is refused
//! with a reason and takes it over when the first goes; `hostIP` limits a hostPort
//! to one address; in Kubernetes mode the port follows the Pod's watch events. A
//! user who still chains `portmap` after `ferrite-cni` gets working hostPorts from
//! it too. Needs root.
use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use ferrite_agent::plan::MapContents;
use ferrite_common::{ServiceKey, CT_FLAG_VIA_STACK, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    cluster::{self, TCP_TARGET, UDP_TARGET},
    cni::{Runtime, Sandbox},
    fake_apiserver::FakeApiServer,
    lab::{
        exchange, node_yaml, parse_answer, pod_ip, sh, wait_until, Cluster, Netns, Node, Pod,
        Probe, SETTLE, WORLD_GATEWAY,
    },
};
use serde_json::{json, Value};

/// The pod's hostPort (TCP and UDP), on every address of its node.
const HOST_PORT: u16 = 8088;

/// A Pod object of `node` for lab pod `pod` whose container has `ports` (flow-style
/// entries).
fn pod_yaml(pod: &Pod, node: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: app, image: none, ports: [{ports}]}}]}}\n\
         status: {{phase: Running, podIP: {}}}\n",
        pod.name, pod.namespace, pod.ip
    )
}

/// hostPort 8088 to the pod's TCP server and, over UDP, to its UDP server.
fn web_ports(host_ip: Option<Ipv4Addr>) -> String {
    let host_ip = host_ip
        .map(|ip| format!(", hostIP: {ip}"))
        .unwrap_or_default();
    format!(
        "{{containerPort: {TCP_TARGET}, hostPort: {HOST_PORT}{host_ip}}}, \
         {{containerPort: {UDP_TARGET}, hostPort: {HOST_PORT}, protocol: UDP{host_ip}}}"
    )
}

/// The hostPort frontend `to` has in `maps`: its master's backend count.
fn frontend_count(maps: &MapContents, to: SocketAddrV4, proto: u8) -> Option<u16> {
    maps.services
        .get(&ServiceKey::new(*to.ip(), to.port(), proto, 0))
        .map(|v| v.count)
}

/// One TCP and one UDP request of a process (`probe`: in the node's cgroup, so the
/// socket-level load balancing applies) to `to`: (answering pod, client it saw) of
/// each, the UDP answer checked to come from `to`.
fn probe_both(probe: &Probe, to: SocketAddrV4, what: &str) -> Result<[(String, String); 2]> {
    let request = format!("{what} tcp");
    let tcp = probe.tcp(to, &request)?;
    let tcp = parse_answer(
        tcp.answer().with_context(|| format!("{what}: TCP"))?,
        &request,
    )?;
    let request = format!("{what} udp");
    let udp = probe.udp(to, &request)?;
    let answer = udp.answer().with_context(|| format!("{what}: UDP"))?;
    ensure!(
        udp.from.as_deref() == Some(to.to_string().as_str()),
        "{what}: the UDP answer came from {:?}, not {to}",
        udp.from
    );
    Ok([tcp, parse_answer(answer, &request)?])
}

/// One UDP request from the netns `from` (an unconnected socket, per packet) to `to`:
/// (answering pod, client it saw), the answer checked to come from `to`.
fn udp_request(from: &Netns, to: SocketAddrV4, request: &str) -> Result<(String, String)> {
    let socket = from.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        socket.send_to(request.as_bytes(), to)?;
        if let Ok((n, source)) = socket.recv_from(&mut buf) {
            ensure!(source == to.into(), "answer from {source}, asked {to}");
            return parse_answer(&String::from_utf8_lossy(&buf[..n]), request);
        }
    }
    bail!("no UDP answer from {to}")
}

/// Pod `web` on node 0 has hostPort 8088 (TCP and UDP) in its Pod object; nothing in
/// netfilter and no portmap. The world, a process of node 0, a pod on node 0 (at the
/// socket and per packet) and a pod on node 1 reach it, each answer from node 0's
/// address and port. Clients on node 0 and the world keep their address (the
/// frontend is local, as an `externalTrafficPolicy: Local` NodePort); node 1's pod
/// reaches node 0's address masqueraded to node 1's, as for any node address.
#[test]
fn a_host_port_is_reached_from_the_world_the_node_a_pod_beside_it_and_a_pod_on_another_node(
) -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    cluster.nodes[0].add_pod("web", pod_ip(0, 10))?;
    cluster.nodes[0].add_pod("c0", pod_ip(0, 20))?;
    cluster.nodes[1].add_pod("c1", pod_ip(1, 20))?;
    let node_ip = cluster.nodes[0].ip.context("plugged")?;
    let node1_ip = cluster.nodes[1].ip.context("plugged")?;
    let node0 = cluster.nodes[0].name.clone();
    let config = cluster.nodes_and_pods_yaml().replace(
        &cluster.pod("web").yaml(&node0),
        &pod_yaml(cluster.pod("web"), &node0, &web_ports(None)),
    );
    ensure!(
        config.contains("hostPort"),
        "the Pod object has its hostPorts"
    );
    cluster.write_config(&config)?;
    cluster.start_agents()?;
    let host_port = SocketAddrV4::new(node_ip, HOST_PORT);
    cluster.nodes[0].wait_for_maps("the hostPort frontends", |m| {
        frontend_count(m, host_port, PROTO_TCP) == Some(1)
            && frontend_count(m, host_port, PROTO_UDP) == Some(1)
    })?;
    cluster.nodes[1].wait_for_maps("both pod CIDRs", |m| m.pod_routes() == 2)?;
    // Node 1 serves no hostPort of node 0's pod, on no address.
    let maps1 = cluster.nodes[1].maps()?.contents()?;
    ensure!(
        !maps1.services.keys().any(|k| k.port == HOST_PORT),
        "node 1 has a frontend at port {HOST_PORT}"
    );
    let web = cluster.pod("web");
    let _servers = [web.serve(TCP_TARGET)?, web.serve(UDP_TARGET)?];
    let (c0, c1) = (cluster.pod("c0"), cluster.pod("c1"));

    // The world: through the uplink's XDP/tcx program, its address kept.
    let reply = cluster.world.tcp_request(host_port, "world tcp")?;
    assert_eq!(
        parse_answer(&reply, "world tcp")?,
        ("web".into(), WORLD_GATEWAY.to_string())
    );
    assert_eq!(
        udp_request(&cluster.world, host_port, "world udp")?,
        ("web".into(), WORLD_GATEWAY.to_string())
    );

    // The node's own process, at its sockets.
    for (name, client) in probe_both(&cluster.nodes[0].host_probe(), host_port, "node")? {
        assert_eq!(name, "web");
        assert_eq!(client, node_ip.to_string(), "the node's process as seen");
    }

    // A pod on the same node: at its sockets, then per packet (no cgroup).
    for (name, client) in probe_both(&c0.probe(), host_port, "same node")? {
        assert_eq!(name, "web");
        assert_eq!(client, c0.ip.to_string(), "the same-node client as seen");
    }
    let mut stream: TcpStream = c0.tcp_connect(host_port).context("same node, per packet")?;
    let reply = exchange(&mut stream, "same node per packet")?;
    assert_eq!(
        parse_answer(&reply, "same node per packet")?,
        ("web".into(), c0.ip.to_string())
    );
    let (udp, from) = c0.udp_request(host_port, "same node per packet udp")?;
    assert_eq!(from, host_port.into(), "the UDP answer's source");
    assert_eq!(
        parse_answer(&udp, "same node per packet udp")?,
        ("web".into(), c0.ip.to_string())
    );
    drop(stream);

    // A pod on the other node: to node 0's address like any node address.
    for (name, client) in probe_both(&c1.probe(), host_port, "other node")? {
        assert_eq!(name, "web");
        assert_eq!(
            client,
            node1_ip.to_string(),
            "the other node's client as seen"
        );
    }
    let reply = c1.tcp_request(host_port, "other node per packet")?;
    assert_eq!(parse_answer(&reply, "other node per packet")?.0, "web");
    Ok(())
}

/// The agent's log and skipped-objects metric name why `web2`'s port was refused.
fn wait_for_refusal(node: &Node, owner: &str, refused: &str, to: SocketAddrV4) -> Result<()> {
    let reason = format!(
        "Pod default/{refused}: hostPort {to}/TCP already used by pod default/{owner} (hostPort)"
    );
    wait_until("the refusal logged", SETTLE, || {
        node.agent
            .as_ref()
            .is_some_and(|a| a.log_text().contains(&reason))
    })
    .with_context(|| format!("no {reason:?} in the agent's log"))?;
    ensure!(node.metric("ferrite_skipped_objects")? >= 1.0);
    Ok(())
}

/// Two pods ask for hostPort 8088: the older keeps it (no creationTimestamp in the
/// file: by name, `web` before `web2`) and the other is refused with a logged
/// reason; its other hostPort still applies. When `web` goes, `web2` takes the port
/// over. A `hostIP` that is one of the node's addresses limits the port to it; one
/// that is not is refused.
#[test]
fn a_second_pod_asking_for_a_taken_host_port_is_refused_and_takes_it_over_when_the_first_goes(
) -> Result<()> {
    let mut cluster = Cluster::new(1)?;
    cluster.nodes[0].add_pod("web", pod_ip(0, 10))?;
    cluster.nodes[0].add_pod("web2", pod_ip(0, 11))?;
    let node_ip = cluster.nodes[0].ip.context("plugged")?;
    let name = cluster.nodes[0].name.clone();
    // A second address on the uplink, which NodePorts (and hostPorts) answer on.
    let secondary = Ipv4Addr::new(198, 51, 100, 150);
    sh(
        "ip",
        &[
            "-n",
            &cluster.nodes[0].netns.name,
            "addr",
            "add",
            &format!("{secondary}/24"),
            "dev",
            "ul0",
        ],
    )?;
    cluster.nodes[0]
        .agent_args
        .push(format!("--nodeport-addresses={node_ip}/32,{secondary}/32"));
    let node_yaml = node_yaml(&name, node_ip, "10.244.0.0/24");
    let both = [
        node_yaml.clone(),
        pod_yaml(cluster.pod("web"), &name, &web_ports(None)),
        pod_yaml(
            cluster.pod("web2"),
            &name,
            &format!(
                "{}, {{containerPort: {TCP_TARGET}, hostPort: 8089}}",
                web_ports(None)
            ),
        ),
    ]
    .join("---\n");
    cluster.write_config(&both)?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    let (web, web2) = (cluster.pod("web"), cluster.pod("web2"));
    let _servers = [
        web.serve(TCP_TARGET)?,
        web.serve(UDP_TARGET)?,
        web2.serve(TCP_TARGET)?,
        web2.serve(UDP_TARGET)?,
    ];
    let host_port = SocketAddrV4::new(node_ip, HOST_PORT);
    node.wait_for_maps("web's and web2's frontends", |m| {
        frontend_count(m, host_port, PROTO_TCP).is_some()
            && frontend_count(m, SocketAddrV4::new(node_ip, 8089), PROTO_TCP).is_some()
    })?;
    wait_for_refusal(node, "web", "web2", host_port)?;
    let answered = |to: SocketAddrV4| -> Result<String> {
        let reply = cluster.world.tcp_request(to, "who")?;
        Ok(parse_answer(&reply, "who")?.0)
    };
    for to in [host_port, SocketAddrV4::new(secondary, HOST_PORT)] {
        assert_eq!(answered(to)?, "web", "{to}");
        assert_eq!(udp_request(&cluster.world, to, "who")?.0, "web", "{to}");
    }
    assert_eq!(answered(SocketAddrV4::new(node_ip, 8089))?, "web2");

    // web goes: web2 has the port, on both addresses.
    let without_web = [node_yaml.clone(), pod_yaml(web2, &name, &web_ports(None))].join("---\n");
    cluster.write_config(&without_web)?;
    node.wait_for_maps("web2's backend behind the port", |m| {
        let key = ServiceKey::new(node_ip, HOST_PORT, PROTO_TCP, 1);
        m.services
            .get(&key)
            .and_then(|slot| m.backends.get(&slot.backend_id))
            .is_some_and(|b| b.address == web2.ip.octets())
    })?;
    for to in [host_port, SocketAddrV4::new(secondary, HOST_PORT)] {
        assert_eq!(answered(to)?, "web2", "{to}");
        assert_eq!(udp_request(&cluster.world, to, "who")?.0, "web2", "{to}");
    }

    // hostIP: the secondary address only; an address that is not the node's is
    // refused with its reason.
    let limited = [
        node_yaml,
        pod_yaml(web2, &name, &web_ports(Some(secondary))),
        pod_yaml(
            web,
            &name,
            "{containerPort: 8080, hostPort: 8090, hostIP: 192.0.2.9}",
        ),
    ]
    .join("---\n");
    cluster.write_config(&limited)?;
    node.wait_for_maps("the port on the secondary address only", |m| {
        frontend_count(m, host_port, PROTO_TCP).is_none()
            && frontend_count(m, SocketAddrV4::new(secondary, HOST_PORT), PROTO_TCP).is_some()
    })?;
    assert_eq!(answered(SocketAddrV4::new(secondary, HOST_PORT))?, "web2");
    let refused = cluster.world.tcp_request(host_port, "who");
    assert!(
        refused.is_err(),
        "the node's own address still answers: {refused:?}"
    );
    wait_until("the foreign hostIP refused", SETTLE, || {
        node.agent.as_ref().is_some_and(|a| {
            a.log_text()
                .contains("hostIP 192.0.2.9 is not an address this node serves NodePorts on")
        })
    })?;
    Ok(())
}

/// The upstream conformance case "HostPort validates that there is no conflict
/// between pods with same hostPort but different hostIP and protocol": three pods
/// ask for hostPort 54323, one with hostIP 127.0.0.1 over TCP, one with the node's
/// address over TCP, one with the node's address over UDP; a process of the node
/// (hostNetwork, as the upstream test's client pod) reaches each at its own.
#[test]
fn host_ports_differing_in_host_ip_or_protocol_do_not_conflict() -> Result<()> {
    const PORT: u16 = 54323;
    let mut cluster = Cluster::new(1)?;
    for (index, name) in ["pod1", "pod2", "pod3"].iter().enumerate() {
        cluster.nodes[0].add_pod(name, pod_ip(0, 20 + index))?;
    }
    let node_ip = cluster.nodes[0].ip.context("plugged")?;
    let name = cluster.nodes[0].name.clone();
    let objects = [
        node_yaml(&name, node_ip, "10.244.0.0/24"),
        pod_yaml(
            cluster.pod("pod1"),
            &name,
            &format!("{{containerPort: {TCP_TARGET}, hostPort: {PORT}, hostIP: 127.0.0.1}}"),
        ),
        pod_yaml(
            cluster.pod("pod2"),
            &name,
            &format!("{{containerPort: {TCP_TARGET}, hostPort: {PORT}, hostIP: {node_ip}}}"),
        ),
        pod_yaml(
            cluster.pod("pod3"),
            &name,
            &format!(
                "{{containerPort: {UDP_TARGET}, hostPort: {PORT}, hostIP: {node_ip}, protocol: UDP}}"
            ),
        ),
    ]
    .join("---\n");
    cluster.write_config(&objects)?;
    cluster.start_agents()?;
    let mut servers = Vec::new();
    for pod in ["pod1", "pod2", "pod3"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    let node = &cluster.nodes[0];
    let (loopback, on_node) = (
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT),
        SocketAddrV4::new(node_ip, PORT),
    );
    node.wait_for_maps("the three hostPorts", |m| {
        frontend_count(m, loopback, PROTO_TCP).is_some()
            && frontend_count(m, on_node, PROTO_TCP).is_some()
            && frontend_count(m, on_node, PROTO_UDP).is_some()
    })?;
    let process = node.host_probe();
    let tcp = |to: SocketAddrV4| -> Result<String> {
        let outcome = process.tcp(to, "which")?;
        Ok(parse_answer(
            outcome.answer().with_context(|| format!("TCP {to}"))?,
            "which",
        )?
        .0)
    };
    assert_eq!(tcp(loopback)?, "pod1", "TCP to {loopback}");
    assert_eq!(tcp(on_node)?, "pod2", "TCP to {on_node}");
    let udp = process.udp(on_node, "which")?;
    assert_eq!(
        parse_answer(udp.answer().context("UDP")?, "which")?.0,
        "pod3",
        "UDP to {on_node}"
    );
    drop(servers);
    Ok(())
}

/// Kubernetes mode: a Pod with a hostPort, added through a watch event, becomes a
/// frontend a pod of the node reaches; an update dropping the hostPort and then
/// the Pod's deletion take it away.
#[test]
fn in_kubernetes_mode_a_host_port_follows_the_pods_watch_events() -> Result<()> {
    let (mut node, _servers) = cluster::example_node("kube-hp")?;
    let api = FakeApiServer::start(&node.netns)?;
    api.apply_yaml(&cluster::example_for(&node.name))?;
    let node_ip: Ipv4Addr = "198.51.100.1".parse()?;
    api.apply_yaml(&node_yaml(&node.name, node_ip, "10.244.0.0/24"))?;
    let kubeconfig = node.dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    node.start_agent_kube(&kubeconfig)?;
    node.wait_for_sync(2, 5)?;
    let (backend, _) = cluster::BACKENDS[0];
    let (client, _) = cluster::CLIENTS[0];
    let host_port = SocketAddrV4::new(node_ip, HOST_PORT);
    let with_ports = pod_yaml(node.pod(backend), &node.name, &web_ports(None));
    api.apply_yaml(&with_ports)?;
    node.wait_for_maps("the hostPort frontends", |m| {
        frontend_count(m, host_port, PROTO_TCP) == Some(1)
            && frontend_count(m, host_port, PROTO_UDP) == Some(1)
    })?;
    for (name, client_seen) in probe_both(&node.pod(client).probe(), host_port, "kube")? {
        assert_eq!(name, backend);
        assert_eq!(client_seen, node.pod(client).ip.to_string());
    }
    // The update drops the UDP hostPort.
    let tcp_only = pod_yaml(
        node.pod(backend),
        &node.name,
        &format!("{{containerPort: {TCP_TARGET}, hostPort: {HOST_PORT}}}"),
    );
    api.apply_yaml(&tcp_only)?;
    node.wait_for_maps("the UDP hostPort gone", |m| {
        frontend_count(m, host_port, PROTO_UDP).is_none()
            && frontend_count(m, host_port, PROTO_TCP) == Some(1)
    })?;
    api.delete("Pod", "default", backend);
    node.wait_for_maps("the pod's frontends gone", |m| {
        frontend_count(m, host_port, PROTO_TCP).is_none()
    })?;
    Ok(())
}

/// The shipped conflist with Debian's real `portmap` chained after `ferrite-cni` by
/// the user, as containerd's libcni chains it, with the IPAM state in the node's
/// test directory.
fn conflist_with_portmap(node: &Node) -> Result<Value> {
    let text =
        include_str!("../../deploy/10-ferrite.conflist").replace("__NODE_NAME__", &node.name);
    let mut conflist: Value = serde_json::from_str(&text)?;
    let plugins = conflist["plugins"].as_array_mut().context("plugins")?;
    ensure!(
        plugins.iter().all(|p| p["type"] != "portmap"),
        "the shipped conflist needs no portmap"
    );
    plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}));
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

/// A user who chains `portmap` after `ferrite-cni` (the Pod object declaring no
/// hostPort, so portmap's netfilter DNAT is what serves it) still gets working
/// hostPorts: a pod on the same node, a pod on the other node and the world reach
/// it. The same-node client's answers come back from the node's address and the
/// server sees the client's own pod address: the backend's answers go back through
/// the stack, where portmap's conntrack state translates them (redirected straight
/// into the client, it would reset the connection to an address it never called).
/// Only that flow leaves a `via stack` conntrack entry.
#[test]
fn a_user_chained_portmap_still_serves_host_ports_to_pods_on_both_nodes_and_the_world() -> Result<()>
{
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
    let runtime = Runtime::new(node, conflist_with_portmap(node)?);
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
