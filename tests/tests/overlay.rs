//! User stories for several nodes: each node a network namespace on a shared underlay
//! with its own agent and pins; pods talk across nodes over VXLAN or natively routed
//! (`--routing native`: the cross-node stories run in both); Services spread over
//! nodes; pods reach the world masqueraded. Needs root.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result};
use ferrite_tests::{
    cluster::{service_yaml, TCP_FRONTEND, TCP_TARGET, UDP_FRONTEND, UDP_TARGET, VIP},
    lab::{answered_by, bulk_transfer, parse_answer, pod_ip, Cluster, Routing, Server, WORLD_IP},
};

/// 2 nodes x 2 pods (a0, a1 on node 0; b0, b1 on node 1), every pod serving TCP and
/// UDP, a Service over a1 and b0 (one backend per node), agents synced.
struct TwoNodes {
    _servers: Vec<Server>,
    cluster: Cluster,
}

const PODS: [(&str, usize, usize); 4] = [("a0", 0, 0), ("a1", 0, 1), ("b0", 1, 0), ("b1", 1, 1)];
/// Clients are never backends: a pod reaching itself through a Service (hairpin) is
/// not supported yet.
const BACKENDS: [&str; 2] = ["a1", "b0"];
const CLIENTS: [&str; 2] = ["a0", "b1"];

fn yaml(cluster: &Cluster, backends: &[&str]) -> String {
    let ips: Vec<_> = backends.iter().map(|b| cluster.pod(b).ip).collect();
    format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        service_yaml("web", VIP, &ips)
    )
}

fn two_nodes(routing: Routing) -> Result<TwoNodes> {
    let mut cluster = Cluster::with_routing(2, routing)?;
    for (name, node, index) in PODS {
        cluster.nodes[node].add_pod(name, pod_ip(node, index))?;
    }
    let mut servers = Vec::new();
    for (name, _, _) in PODS {
        servers.push(cluster.pod(name).serve(TCP_TARGET)?);
        servers.push(cluster.pod(name).serve(UDP_TARGET)?);
    }
    cluster.write_config(&yaml(&cluster, &BACKENDS))?;
    cluster.start_agents()?;
    // Natively, the other node's routes say so (the nodes share the underlay).
    let native_flag = match routing {
        Routing::Native => ferrite_common::ROUTE_NATIVE,
        Routing::Vxlan => 0,
    };
    for node in &cluster.nodes {
        node.wait_for_maps("routes to both nodes and 2 local endpoints", |m| {
            m.pod_routes() == 2
                && m.endpoints.len() == 2
                && m.config.node_ip != [0; 4]
                && m.routes.values().all(|r| {
                    r.flags & ferrite_common::ROUTE_LOCAL != 0
                        || r.flags & ferrite_common::ROUTE_NATIVE == native_flag
                })
        })?;
    }
    Ok(TwoNodes {
        _servers: servers,
        cluster,
    })
}

/// Each story, over VXLAN and natively routed.
macro_rules! in_both_routings {
    ($($story:ident),* $(,)?) => {$(
        mod $story {
            #[test]
            fn vxlan() -> anyhow::Result<()> {
                super::$story(super::Routing::Vxlan)
            }

            #[test]
            fn native() -> anyhow::Result<()> {
                super::$story(super::Routing::Native)
            }
        }
    )*};
}

in_both_routings!(
    pods_on_different_nodes_reach_each_other_by_pod_ip_without_nat,
    a_cluster_ip_with_backends_on_both_nodes_uses_them_all_and_answers_from_the_vip,
    a_bulk_tcp_transfer_across_nodes_arrives_complete,
    pod_traffic_to_the_world_leaves_with_the_node_ip_and_the_reply_returns,
    removing_a_node_removes_its_route_and_leaves_the_others,
    cross_node_traffic_works_with_checksum_offload_off_and_on_everywhere,
    a_host_on_the_underlay_cannot_pose_as_another_nodes_pod,
);

/// Anti-spoofing on the uplink: a host on the nodes' link (the world's router here)
/// that sends unencapsulated from a pod address of node 1 to a pod of node 0 is not
/// node 1 (not its MAC): dropped and counted as `drop_spoofed`, never answered. Node
/// 1's own pods still reach the pod (natively or over VXLAN).
fn a_host_on_the_underlay_cannot_pose_as_another_nodes_pod(routing: Routing) -> Result<()> {
    use ferrite_tests::lab::sh;
    let env = two_nodes(routing)?;
    let c = &env.cluster;
    let (target, genuine) = (c.pod("a0"), c.pod("b0"));
    let node0 = c.nodes[0].ip.context("plugged")?;
    let spoofed: std::net::Ipv4Addr = "10.244.1.99".parse()?;
    let world = &c.world.name;
    sh(
        "ip",
        &[
            "-n",
            world,
            "addr",
            "add",
            &format!("{spoofed}/32"),
            "dev",
            "lo",
        ],
    )?;
    sh(
        "ip",
        &[
            "-n",
            world,
            "route",
            "add",
            "10.244.0.0/24",
            "via",
            &node0.to_string(),
        ],
    )?;
    let spoofed_drops = || -> Result<u64> {
        Ok(c.nodes[0].maps()?.counters()?[ferrite_common::stat::DROP_SPOOFED as usize].packets)
    };
    let before = spoofed_drops()?;
    let to = SocketAddrV4::new(target.ip, UDP_TARGET);
    let answered = c.world.run(move || -> Result<bool> {
        let socket = std::net::UdpSocket::bind((spoofed, 0))?;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            socket.send_to(b"i am b-something", to)?;
            if socket.recv_from(&mut buf).is_ok() {
                return Ok(true);
            }
        }
        Ok(false)
    })??;
    assert!(!answered, "a spoofed pod source was answered");
    assert!(
        spoofed_drops()? >= before + 3,
        "the spoofed datagrams were not counted as drop_spoofed"
    );
    let request = "genuine b0";
    let (reply, _) = genuine.udp_request(to, request)?;
    assert_eq!(parse_answer(&reply, request)?.1, genuine.ip.to_string());
    Ok(())
}

/// Packets node `index`'s VXLAN device has sent (its netns's /proc/thread-self/net/dev).
fn vxlan_tx_packets(c: &Cluster, index: usize) -> Result<u64> {
    let dev = c.nodes[index]
        .netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))??;
    let line = dev
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&format!("{}:", ferrite_common::VXLAN_DEVICE))
        })
        .context("no VXLAN device")?;
    let fields: Vec<&str> = line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    Ok(fields.get(9).context("tx packets")?.parse()?)
}

fn pods_on_different_nodes_reach_each_other_by_pod_ip_without_nat(routing: Routing) -> Result<()> {
    let env = two_nodes(routing)?;
    let c = &env.cluster;
    let encapsulated_before = [vxlan_tx_packets(c, 0)?, vxlan_tx_packets(c, 1)?];
    for (client, server) in [("a0", "b0"), ("b1", "a1"), ("a0", "b1")] {
        let (client_pod, server_pod) = (c.pod(client), c.pod(server));
        let request = format!("{client} to {server}");
        let reply =
            client_pod.tcp_request(SocketAddrV4::new(server_pod.ip, TCP_TARGET), &request)?;
        let (answered, seen_from) = parse_answer(&reply, &request)?;
        assert_eq!(
            (answered.as_str(), seen_from),
            (server, client_pod.ip.to_string())
        );

        let target = SocketAddrV4::new(server_pod.ip, UDP_TARGET);
        let (reply, from) = client_pod.udp_request(target, &request)?;
        assert_eq!(from, SocketAddr::V4(target));
        assert_eq!(parse_answer(&reply, &request)?.1, client_pod.ip.to_string());
    }
    // Natively, nothing went through the VXLAN devices; over VXLAN, everything did.
    let encapsulated = [vxlan_tx_packets(c, 0)?, vxlan_tx_packets(c, 1)?];
    for node in 0..2 {
        let sent = encapsulated[node] - encapsulated_before[node];
        match routing {
            Routing::Native => assert_eq!(sent, 0, "node {node} encapsulated {sent} packets"),
            Routing::Vxlan => assert!(sent >= 6, "node {node} encapsulated {sent} packets"),
        }
    }
    Ok(())
}

fn a_cluster_ip_with_backends_on_both_nodes_uses_them_all_and_answers_from_the_vip(
    routing: Routing,
) -> Result<()> {
    let env = two_nodes(routing)?;
    let c = &env.cluster;
    for client in CLIENTS {
        let pod = c.pod(client);
        let (mut tcp, mut udp) = (BTreeSet::new(), BTreeSet::new());
        for i in 0..30 {
            let request = format!("{client} {i}");
            let reply = pod.tcp_request(TCP_FRONTEND, &request)?;
            let (backend, seen_from) = parse_answer(&reply, &request)?;
            // Inside the cluster the client's IP is never NATed.
            assert_eq!(seen_from, pod.ip.to_string());
            tcp.insert(backend);
            let (reply, from) = pod.udp_request(UDP_FRONTEND, &request)?;
            assert_eq!(
                from,
                SocketAddr::V4(UDP_FRONTEND),
                "UDP answer not from the VIP"
            );
            udp.insert(answered_by(&reply, &request)?);
        }
        let all: BTreeSet<String> = BACKENDS.map(String::from).into();
        assert_eq!((&tcp, &udp), (&all, &all), "backends used by {client}");
    }
    Ok(())
}

fn a_bulk_tcp_transfer_across_nodes_arrives_complete(routing: Routing) -> Result<()> {
    // Large writes from a local socket become GSO/TSO super-packets: this crosses
    // the VXLAN device at pod MTU 1450 (or the uplink at 1500, natively) and must
    // arrive byte for byte.
    const BYTES: usize = 64 << 20;
    let env = two_nodes(routing)?;
    let (client, server) = (env.cluster.pod("a0"), env.cluster.pod("b1"));
    let (received, _) = bulk_transfer(client, server, 9000, BYTES)?;
    assert_eq!(received, BYTES);
    Ok(())
}

fn pod_traffic_to_the_world_leaves_with_the_node_ip_and_the_reply_returns(
    routing: Routing,
) -> Result<()> {
    let env = two_nodes(routing)?;
    let c = &env.cluster;
    let _world = Server::start(&c.world, "world", SocketAddrV4::new(WORLD_IP, 7000))?;
    for (client, node) in [("a0", 0), ("b1", 1)] {
        let pod = c.pod(client);
        let node_ip = c.nodes[node].ip.context("node ip")?.to_string();
        let request = format!("{client} says hi");
        let reply = pod.tcp_request(SocketAddrV4::new(WORLD_IP, 7000), &request)?;
        assert_eq!(
            parse_answer(&reply, &request)?,
            ("world".to_string(), node_ip.clone())
        );
        let (reply, from) = pod.udp_request(SocketAddrV4::new(WORLD_IP, 7000), &request)?;
        assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(WORLD_IP, 7000)));
        assert_eq!(parse_answer(&reply, &request)?.1, node_ip);
    }
    Ok(())
}

fn removing_a_node_removes_its_route_and_leaves_the_others(routing: Routing) -> Result<()> {
    let env = two_nodes(routing)?;
    let c = &env.cluster;
    let (node0, node1) = (&c.nodes[0], &c.nodes[1]);
    let before = node0.maps()?.contents()?;
    // node 1 leaves the cluster: its Node object and pods are gone from the file.
    let without = yaml(c, &["a1"]).replace(&c.nodes[1].name, "gone-node");
    let without: String = without
        .split("---\n")
        .filter(|doc| !doc.contains("kind: Node\nmetadata: {name: gone-node}"))
        .collect::<Vec<_>>()
        .join("---\n");
    node0.write_config(&without)?;
    // Its pod CIDR's route goes before its node address's (one sync, ordered writes):
    // wait for both.
    node0.wait_for_maps("node 1's routes to go", |m| {
        m.routes
            .values()
            .all(|r| r.flags == ferrite_common::ROUTE_LOCAL)
    })?;
    let after = node0.maps()?.contents()?;
    let own: Vec<_> = before
        .routes
        .iter()
        .filter(|(_, r)| r.flags == ferrite_common::ROUTE_LOCAL)
        .collect();
    assert_eq!(after.routes.iter().collect::<Vec<_>>(), own);
    // Pods on node 0 still talk to each other.
    let reply = c
        .pod("a0")
        .tcp_request(SocketAddrV4::new(c.pod("a1").ip, TCP_TARGET), "local")?;
    assert_eq!(answered_by(&reply, "local")?, "a1");
    assert_eq!(
        node1.maps()?.contents()?.pod_routes(),
        2,
        "node 1 was not touched"
    );
    Ok(())
}

/// A host that is not Ferrite: a plain Linux vxlan device (VNI 1, port 4789) with
/// static FDB/neighbour entries, announced to Ferrite as a Node with a pod CIDR.
struct LinuxVtep {
    netns: ferrite_tests::lab::Netns,
    ip: std::net::Ipv4Addr,
    inside: std::net::Ipv4Addr,
}

const LINUX_VTEP_MAC: &str = "02:00:5e:00:00:09";

fn linux_vtep(cluster: &Cluster, ferrite_pods: &[std::net::Ipv4Addr]) -> Result<LinuxVtep> {
    use ferrite_tests::lab::{sh, unique, Netns};
    let netns = Netns::new(&unique("linux"))?;
    let ip: std::net::Ipv4Addr = "198.51.100.50".parse()?;
    cluster.underlay.plug(&netns, ip)?;
    let ns = netns.name.as_str();
    let ferrite_node = cluster.nodes[0].ip.context("node ip")?.to_string();
    let ferrite_vtep = ferrite_common::vtep_mac_for(cluster.nodes[0].ip.unwrap())
        .map(|b| format!("{b:02x}"))
        .join(":");
    let ip_cmd = |args: &str| -> Result<()> {
        let mut full = vec!["-n", ns];
        full.extend(args.split_whitespace());
        sh("ip", &full).map(drop)
    };
    ip_cmd(&format!(
        "link add vxlan1 type vxlan id 1 dstport 4789 local {ip} dev ul0"
    ))?;
    ip_cmd(&format!("link set vxlan1 address {LINUX_VTEP_MAC} up"))?;
    ip_cmd("addr add 10.244.9.1/24 dev vxlan1")?;
    ip_cmd("route add 10.244.0.0/24 dev vxlan1")?;
    for pod in ferrite_pods {
        ip_cmd(&format!(
            "neigh add {pod} lladdr {ferrite_vtep} dev vxlan1 nud permanent"
        ))?;
    }
    sh(
        "bridge",
        &[
            "-n",
            ns,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vxlan1",
            "dst",
            &ferrite_node,
        ],
    )?;
    Ok(LinuxVtep {
        netns,
        ip,
        inside: "10.244.9.1".parse()?,
    })
}

fn linux_node_yaml(vtep: &LinuxVtep) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: linux-host, annotations: {{ferrite.dev/vtep-mac: \"{LINUX_VTEP_MAC}\"}}}}\nspec: {{podCIDR: 10.244.9.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
        vtep.ip
    )
}

#[test]
fn pods_and_a_host_behind_a_plain_linux_vxlan_device_talk_both_ways() -> Result<()> {
    let mut cluster = Cluster::new(1)?;
    cluster.nodes[0].add_pod("a0", pod_ip(0, 0))?;
    let pod_ip0 = cluster.pod("a0").ip;
    let vtep = linux_vtep(&cluster, &[pod_ip0, pod_ip(0, 97), pod_ip(0, 98)])?;
    let _pod_server = cluster.pod("a0").serve(TCP_TARGET)?;
    let _pod_udp = cluster.pod("a0").serve(UDP_TARGET)?;
    let _linux_tcp = Server::start(
        &vtep.netns,
        "linux",
        SocketAddrV4::new(vtep.inside, TCP_TARGET),
    )?;
    let _linux_udp = Server::start(
        &vtep.netns,
        "linux",
        SocketAddrV4::new(vtep.inside, UDP_TARGET),
    )?;
    cluster.write_config(&format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        linux_node_yaml(&vtep)
    ))?;
    cluster.start_agents()?;
    cluster.nodes[0].wait_for_maps("a route to the Linux host", |m| m.pod_routes() == 2)?;

    let pod = cluster.pod("a0");
    // Ferrite pod -> host behind the Linux VTEP.
    let reply = pod.tcp_request(SocketAddrV4::new(vtep.inside, TCP_TARGET), "to linux")?;
    assert_eq!(
        parse_answer(&reply, "to linux")?,
        ("linux".into(), pod_ip0.to_string())
    );
    let (reply, _) = pod.udp_request(SocketAddrV4::new(vtep.inside, UDP_TARGET), "udp to linux")?;
    assert_eq!(parse_answer(&reply, "udp to linux")?.1, pod_ip0.to_string());

    // Host behind the Linux VTEP -> Ferrite pod.
    let stream_target = SocketAddrV4::new(pod_ip0, TCP_TARGET);
    let mut stream = vtep.netns.run(move || {
        std::net::TcpStream::connect_timeout(&stream_target.into(), Duration::from_secs(5))
    })??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let reply = ferrite_tests::lab::exchange(&mut stream, "from linux")?;
    assert_eq!(
        parse_answer(&reply, "from linux")?,
        ("a0".into(), vtep.inside.to_string())
    );
    let socket = vtep
        .netns
        .run(|| std::net::UdpSocket::bind("10.244.9.1:0"))??;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"udp from linux", SocketAddrV4::new(pod_ip0, UDP_TARGET))?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(pod_ip0, UDP_TARGET)));
    assert_eq!(
        parse_answer(std::str::from_utf8(&buf[..n])?, "udp from linux")?.0,
        "a0"
    );

    // An inner packet for a pod that is not on the node is dropped and counted.
    let unknown = SocketAddrV4::new(pod_ip(0, 97), UDP_TARGET);
    socket.send_to(b"nobody", unknown)?;
    let counter = |index: u32| -> Result<u64> {
        Ok(cluster.nodes[0].maps()?.counters()?[index as usize].packets)
    };
    ferrite_tests::lab::wait_until("drop_unknown_pod", ferrite_tests::lab::SETTLE, || {
        counter(ferrite_common::stat::DROP_UNKNOWN_POD).unwrap_or(0) >= 1
    })?;

    // Truncated VXLAN: a short header, and a valid header with half an Ethernet
    // frame. The kernel's vxlan receive path drops both before the datapath; nothing
    // reaches a pod and the node keeps working.
    let delivered_before = counter(ferrite_common::stat::RECEIVED_FROM_NODE)?;
    let raw = vtep
        .netns
        .run(|| std::net::UdpSocket::bind("198.51.100.50:0"))??;
    let node_port = SocketAddrV4::new(cluster.nodes[0].ip.unwrap(), 4789);
    raw.send_to(&[0x08, 0, 0, 0], node_port)?;
    raw.send_to(
        &[0x08, 0, 0, 0, 0, 0, 1, 0, 0x0a, 0x58, 10, 244, 0, 2],
        node_port,
    )?;
    let (reply, _) = pod.udp_request(SocketAddrV4::new(vtep.inside, UDP_TARGET), "still fine")?;
    assert_eq!(parse_answer(&reply, "still fine")?.1, pod_ip0.to_string());
    // Only the answer to "still fine" came in over the overlay.
    assert_eq!(
        counter(ferrite_common::stat::RECEIVED_FROM_NODE)?,
        delivered_before + 1
    );

    // A frame with another VNI is dropped and counted.
    let ns = vtep.netns.name.as_str();
    let run = |args: &str| -> Result<()> {
        let mut full = vec!["-n", ns];
        full.extend(args.split_whitespace());
        ferrite_tests::lab::sh("ip", &full).map(drop)
    };
    run(&format!(
        "link add vxlan2 type vxlan id 2 dstport 4789 local {} dev ul0",
        vtep.ip
    ))?;
    run("link set vxlan2 up")?;
    run("addr add 10.244.8.1/24 dev vxlan2")?;
    run(&format!("route add {}/32 dev vxlan2", pod_ip(0, 98)))?;
    run(&format!(
        "neigh add {} lladdr 02:00:00:00:00:01 dev vxlan2 nud permanent",
        pod_ip(0, 98)
    ))?;
    let node = cluster.nodes[0].ip.unwrap().to_string();
    ferrite_tests::lab::sh(
        "bridge",
        &[
            "-n",
            ns,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vxlan2",
            "dst",
            &node,
        ],
    )?;
    let wrong = vtep
        .netns
        .run(|| std::net::UdpSocket::bind("10.244.8.1:0"))??;
    wrong.send_to(b"wrong vni", SocketAddrV4::new(pod_ip(0, 98), UDP_TARGET))?;
    ferrite_tests::lab::wait_until("drop_wrong_vni", ferrite_tests::lab::SETTLE, || {
        counter(ferrite_common::stat::DROP_WRONG_VNI).unwrap_or(0) >= 1
    })?;
    Ok(())
}

#[test]
fn on_the_wire_the_overlay_is_rfc7348_vxlan_with_the_inner_frame_untouched() -> Result<()> {
    use nix::sys::{
        socket::{
            recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
            SockType,
        },
        time::TimeVal,
    };
    use std::os::fd::AsRawFd;
    let env = two_nodes(Routing::Vxlan)?;
    let c = &env.cluster;
    let (client, server) = (c.pod("a0"), c.pod("b0"));
    let (node0, node1) = (c.nodes[0].ip.unwrap(), c.nodes[1].ip.unwrap());
    // Capture everything node 0 sends (AF_PACKET sees frames as they leave).
    let capture = c.nodes[0].netns.run(|| {
        socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::EthAll,
        )
    })??;
    setsockopt(&capture, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000))?;
    let marker = b"ferrite-wire-check";
    let target = SocketAddrV4::new(server.ip, UDP_TARGET);
    let sender = client
        .netns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
    let mut frame = None;
    'outer: for _ in 0..20 {
        sender.send_to(marker, target)?;
        let mut buf = vec![0u8; 2048];
        while let Ok(n) = recv(capture.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            let data = &buf[..n];
            if data.windows(marker.len()).any(|w| w == marker) && n > 50 + 42 {
                frame = Some(data.to_vec());
                break 'outer;
            }
        }
    }
    let frame = frame.context("no encapsulated frame captured on node 0's uplink")?;
    let outer = etherparse::SlicedPacket::from_ethernet(&frame)?;
    let Some(etherparse::NetSlice::Ipv4(ip)) = &outer.net else {
        anyhow::bail!("outer not IPv4")
    };
    assert_eq!(
        (ip.header().source_addr(), ip.header().destination_addr()),
        (node0, node1)
    );
    let Some(etherparse::TransportSlice::Udp(udp)) = &outer.transport else {
        anyhow::bail!("outer not UDP")
    };
    assert_eq!(udp.destination_port(), 4789);
    assert_eq!(
        udp.checksum(),
        0,
        "outer UDP checksum 0, as Linux vxlan sends over IPv4"
    );
    assert_eq!(udp.length() as usize, 8 + 8 + (frame.len() - 14 - 20 - 16));
    let vxlan = udp.payload();
    assert_eq!(vxlan[0], 0x08, "VXLAN flags: the I bit only");
    assert_eq!(
        u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]),
        1,
        "VNI"
    );
    assert_eq!(vxlan[7], 0);
    // The inner frame: the pod's UDP datagram as sent, between the two VTEPs' MACs.
    let inner = etherparse::SlicedPacket::from_ethernet(&vxlan[8..])?;
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &inner.link else {
        anyhow::bail!("inner not Ethernet")
    };
    assert_eq!(eth.destination(), ferrite_common::vtep_mac_for(node1));
    assert_eq!(eth.source(), ferrite_common::vtep_mac_for(node0));
    let Some(etherparse::NetSlice::Ipv4(inner_ip)) = &inner.net else {
        anyhow::bail!("inner not IPv4")
    };
    assert_eq!(
        (
            inner_ip.header().source_addr(),
            inner_ip.header().destination_addr()
        ),
        (client.ip, server.ip)
    );
    let Some(etherparse::TransportSlice::Udp(inner_udp)) = &inner.transport else {
        anyhow::bail!("inner not UDP")
    };
    assert_eq!(
        (inner_udp.destination_port(), inner_udp.payload()),
        (UDP_TARGET, &marker[..])
    );
    Ok(())
}

/// Anti-spoofing across nodes: what arrives over the overlay must
/// come from the sending node's own pod CIDR. A host on the overlay that sends from
/// another node's pod address, or from no node's, is dropped and counted; its own
/// addresses still work.
#[test]
fn a_node_cannot_send_over_the_overlay_from_pod_addresses_that_are_not_its_own() -> Result<()> {
    use ferrite_tests::lab::sh;
    let mut cluster = Cluster::new(1)?;
    cluster.nodes[0].add_pod("a0", pod_ip(0, 0))?;
    let pod_ip0 = cluster.pod("a0").ip;
    let vtep = linux_vtep(&cluster, &[pod_ip0])?;
    let _pod_udp = cluster.pod("a0").serve(UDP_TARGET)?;
    cluster.write_config(&format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        linux_node_yaml(&vtep)
    ))?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    node.wait_for_maps("a route to the Linux host", |m| m.pod_routes() == 2)?;

    let target = SocketAddrV4::new(pod_ip0, UDP_TARGET);
    let ask_from = |source: std::net::Ipv4Addr| -> Result<Option<String>> {
        vtep.netns.run(move || -> Result<Option<String>> {
            let socket = std::net::UdpSocket::bind((source, 0))?;
            socket.set_read_timeout(Some(Duration::from_millis(300)))?;
            let mut buf = [0u8; 512];
            for _ in 0..3 {
                socket.send_to(b"who am i", target)?;
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
            Ok(None)
        })?
    };
    let spoofed_drops = || -> Result<u64> {
        Ok(node.maps()?.counters()?[ferrite_common::stat::DROP_SPOOFED as usize].packets)
    };
    let genuine = ask_from(vtep.inside)?.context("no answer to the host's own address")?;
    assert_eq!(
        parse_answer(&genuine, "who am i")?.1,
        vtep.inside.to_string()
    );
    let before = spoofed_drops()?;
    // A pod address of the Ferrite node itself, and one of no node at all.
    for spoofed in ["10.244.0.99", "10.244.77.7"] {
        sh(
            "ip",
            &[
                "-n",
                &vtep.netns.name,
                "addr",
                "add",
                &format!("{spoofed}/32"),
                "dev",
                "vxlan1",
            ],
        )?;
        assert_eq!(ask_from(spoofed.parse()?)?, None, "{spoofed} got through");
    }
    assert!(
        spoofed_drops()? >= before + 6,
        "spoofed packets not counted"
    );
    Ok(())
}

/// Issue #7, item 3 (cilium#30609): `ferrite uninstall` removes every program, pin,
/// rule and device Ferrite installed, and the node is back to plain Linux networking:
/// its pods still reach each other through ordinary routing.
#[test]
fn uninstall_removes_everything_and_leaves_plain_linux_networking() -> Result<()> {
    use ferrite_tests::lab::{ferrite_bin, sh, wait_until, SETTLE};
    let mut cluster = Cluster::new(1)?;
    cluster.nodes[0].add_pod("u0", pod_ip(0, 0))?;
    cluster.nodes[0].add_pod("u1", pod_ip(0, 1))?;
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agents()?;
    let node = &mut cluster.nodes[0];
    node.wait_for_sync(0, 2)?;
    node.kill_agent()?;
    let in_node = |program: &str, args: &[&str]| -> Result<String> {
        let netns = format!("--net={}", node.netns.path().display());
        let mut full = vec![netns.as_str(), program];
        full.extend(args);
        sh("nsenter", &full)
    };
    let ferrite = ferrite_bin();
    in_node(
        ferrite.to_str().unwrap(),
        &["uninstall", "--node", &node.name],
    )?;

    assert!(
        !node.pin_dir().exists(),
        "pins left in {}",
        node.pin_dir().display()
    );
    assert!(!ferrite_agent::files::run_dir(&node.name).exists());
    let attached = in_node("bpftool", &["net", "show"])?;
    assert!(
        !attached.contains("ferrite"),
        "programs still attached:\n{attached}"
    );
    let tables = in_node("nft", &["list", "tables"])?;
    assert!(!tables.contains("ferrite"), "{tables}");
    let links = in_node("ip", &["-o", "link"])?;
    assert!(!links.contains(ferrite_common::VXLAN_DEVICE), "{links}");

    let (u0, u1) = (cluster.pod("u0"), cluster.pod("u1"));
    let _server = u1.serve(TCP_TARGET)?;
    let to_u1 = SocketAddrV4::new(u1.ip, TCP_TARGET);
    wait_until("plain routing between the pods", SETTLE, || {
        u0.tcp_request(to_u1, "plain").is_ok()
    })?;
    assert_eq!(
        answered_by(&u0.tcp_request(to_u1, "plain")?, "plain")?,
        "u1"
    );
    Ok(())
}

/// Issue #7, item 6 (calico#3145's 63-second delays, flannel's ethtool workarounds):
/// cross-node TCP (a bulk transfer too), UDP and a ClusterIP work with tx/rx checksum
/// offload off on every device involved, and again with it back on.
fn cross_node_traffic_works_with_checksum_offload_off_and_on_everywhere(
    routing: Routing,
) -> Result<()> {
    use ferrite_tests::lab::sh;
    let env = two_nodes(routing)?;
    let c = &env.cluster;
    // (netns, device): pod eth0s, host veths, the VXLAN devices, the node uplinks,
    // and the underlay's ports.
    let mut devices: Vec<(String, String)> = Vec::new();
    for node in &c.nodes {
        for pod in &node.pods {
            devices.push((pod.netns.name.clone(), "eth0".into()));
            devices.push((node.netns.name.clone(), pod.host_interface.clone()));
        }
        devices.push((node.netns.name.clone(), ferrite_common::VXLAN_DEVICE.into()));
        devices.push((node.netns.name.clone(), "ul0".into()));
    }
    let ports = sh(
        "ip",
        &[
            "-n",
            &c.underlay.netns.name,
            "-o",
            "link",
            "show",
            "master",
            "br0",
        ],
    )?;
    for line in ports.lines() {
        if let Some(name) = line.split(": ").nth(1) {
            let name = name.split('@').next().unwrap_or(name);
            devices.push((c.underlay.netns.name.clone(), name.to_string()));
        }
    }
    for setting in ["off", "on"] {
        for (netns, device) in &devices {
            sh(
                "ip",
                &[
                    "netns", "exec", netns, "ethtool", "-K", device, "tx", setting, "rx", setting,
                ],
            )
            .with_context(|| format!("ethtool on {device} in {netns}"))?;
        }
        for (client, server) in [("a0", "b0"), ("b1", "a1")] {
            let (client_pod, server_pod) = (c.pod(client), c.pod(server));
            let request = format!("{client} to {server}, offload {setting}");
            let reply =
                client_pod.tcp_request(SocketAddrV4::new(server_pod.ip, TCP_TARGET), &request)?;
            assert_eq!(answered_by(&reply, &request)?, server);
            let target = SocketAddrV4::new(server_pod.ip, UDP_TARGET);
            let (reply, _) = client_pod.udp_request(target, &request)?;
            assert_eq!(answered_by(&reply, &request)?, server);
            let reply = client_pod.tcp_request(TCP_FRONTEND, &request)?;
            assert!(BACKENDS.contains(&answered_by(&reply, &request)?.as_str()));
        }
        let (received, _) = bulk_transfer(c.pod("a0"), c.pod("b1"), 7100, 8 << 20)?;
        assert_eq!(received, 8 << 20, "offload {setting}");
    }
    Ok(())
}

/// Someone deletes the VXLAN device and Ferrite's nftables table under a running
/// agent, and again while the agent is down: the next full sync (or the restart)
/// makes both again and attaches `ferrite_from_overlay` to the new device (a pinned
/// link outlives its device, attached nowhere: it is not taken for attached). Then a
/// host on the overlay is answered from its own address and its spoofed pod
/// addresses are dropped again, and `/readyz` says ready.
#[test]
fn a_deleted_vxlan_device_and_nft_table_are_made_again_and_the_overlay_checks_run_on_them(
) -> Result<()> {
    use ferrite_tests::lab::{sh, wait_until, SETTLE};
    let mut cluster = Cluster::new(1)?;
    cluster.nodes[0].add_pod("a0", pod_ip(0, 0))?;
    let pod_ip0 = cluster.pod("a0").ip;
    let vtep = linux_vtep(&cluster, &[pod_ip0])?;
    let _pod_udp = cluster.pod("a0").serve(UDP_TARGET)?;
    cluster.write_config(&format!(
        "{}---\n{}",
        cluster.nodes_and_pods_yaml(),
        linux_node_yaml(&vtep)
    ))?;
    cluster.start_agents()?;
    cluster.nodes[0].wait_for_maps("a route to the Linux host", |m| m.pod_routes() == 2)?;

    let target = SocketAddrV4::new(pod_ip0, UDP_TARGET);
    let ask_from = |source: std::net::Ipv4Addr| -> Result<Option<String>> {
        vtep.netns.run(move || -> Result<Option<String>> {
            let socket = std::net::UdpSocket::bind((source, 0))?;
            socket.set_read_timeout(Some(Duration::from_millis(300)))?;
            let mut buf = [0u8; 512];
            for _ in 0..3 {
                socket.send_to(b"who am i", target)?;
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
            }
            Ok(None)
        })?
    };
    let spoofed: std::net::Ipv4Addr = "10.244.0.99".parse()?;
    sh(
        "ip",
        &[
            "-n",
            &vtep.netns.name,
            "addr",
            "add",
            &format!("{spoofed}/32"),
            "dev",
            "vxlan1",
        ],
    )?;
    let netns = format!("--net={}", cluster.nodes[0].netns.path().display());
    let vxlan = ferrite_common::VXLAN_DEVICE;
    let delete_device_and_table = || -> Result<()> {
        sh("nsenter", &[&netns, "ip", "link", "del", vxlan])?;
        sh(
            "nsenter",
            &[&netns, "nft", "delete", "table", "ip", "ferrite"],
        )?;
        Ok(())
    };
    let overlay_checks_run = |node: &ferrite_tests::lab::Node, when: &str| -> Result<()> {
        wait_until(
            &format!("{when}: the device, the table and the program on it"),
            SETTLE,
            || {
                let ifindex = node
                    .netns
                    .run(move || nix::net::if_::if_nametoindex(vxlan).ok());
                let attached = ferrite_agent::datapath::attached_ifindex(
                    &node.pin_dir(),
                    &ferrite_agent::datapath::Attachment::Ingress(vxlan.into()),
                );
                let table = sh(
                    "nsenter",
                    &[&netns, "nft", "list", "table", "ip", "ferrite"],
                );
                matches!((ifindex, attached), (Ok(Some(i)), Ok(Some(a))) if i == a) && table.is_ok()
            },
        )?;
        let drops = || -> Result<u64> {
            Ok(node.maps()?.counters()?[ferrite_common::stat::DROP_SPOOFED as usize].packets)
        };
        let before = drops()?;
        let genuine = ask_from(vtep.inside)?.with_context(|| format!("{when}: no answer"))?;
        assert_eq!(
            parse_answer(&genuine, "who am i")?.1,
            vtep.inside.to_string(),
            "{when}"
        );
        assert_eq!(
            ask_from(spoofed)?,
            None,
            "{when}: a spoofed pod address got through"
        );
        assert!(
            drops()? >= before + 3,
            "{when}: spoofed packets not dropped by the datapath"
        );
        wait_until(&format!("{when}: /readyz 200"), SETTLE, || {
            node.agent_http("/readyz")
                .is_ok_and(|(status, _)| status == 200)
        })?;
        Ok(())
    };
    overlay_checks_run(&cluster.nodes[0], "at first")?;

    delete_device_and_table()?;
    overlay_checks_run(&cluster.nodes[0], "under the running agent")?;

    cluster.nodes[0].kill_agent()?;
    delete_device_and_table()?;
    cluster.nodes[0].start_agent()?;
    overlay_checks_run(&cluster.nodes[0], "after a restart")?;
    Ok(())
}

/// Kubernetes mode, natively routed: the agents watch the API server; a node that
/// joins later (its Node object appears, then its agent starts) is routed natively
/// by the others from that watch event on: their host route via its InternalIP on
/// the uplink and its managed neighbour entry; pods reach its pod and back, the
/// node's own processes too (from their overlay address), and nothing is
/// encapsulated.
#[test]
fn a_node_joining_a_natively_routed_cluster_is_routed_natively_from_its_node_object() -> Result<()>
{
    use ferrite_tests::{fake_apiserver::FakeApiServer, lab::sh};
    let mut cluster = Cluster::with_routing(3, Routing::Native)?;
    FakeApiServer::serve_cluster(&mut cluster)?;
    cluster.nodes[0].add_pod("a0", pod_ip(0, 0))?;
    cluster.nodes[1].add_pod("b0", pod_ip(1, 0))?;
    cluster.nodes[2].add_pod("c0", pod_ip(2, 0))?;
    let mut servers = Vec::new();
    for pod in ["a0", "b0", "c0"] {
        servers.push(cluster.pod(pod).serve(TCP_TARGET)?);
        servers.push(cluster.pod(pod).serve(UDP_TARGET)?);
    }
    let joining = cluster.nodes[2].name.clone();
    let without_node_2: String = cluster
        .nodes_and_pods_yaml()
        .split("---\n")
        .filter(|doc| !doc.contains(&joining))
        .collect::<Vec<_>>()
        .join("---\n");
    cluster.write_config(&without_node_2)?;
    cluster.start_agent(0)?;
    cluster.start_agent(1)?;
    for node in &cluster.nodes[..2] {
        node.wait_for_maps("the two nodes' pod CIDRs", |m| m.pod_routes() == 2)?;
    }
    let (node0_netns, node2_ip) = (
        cluster.nodes[0].netns.name.clone(),
        cluster.nodes[2].ip.context("plugged")?,
    );
    let route = || {
        sh(
            "ip",
            &["-n", &node0_netns, "route", "show", "10.244.2.0/24"],
        )
    };
    assert_eq!(route()?.trim(), "", "no route before node 2 exists");

    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agent(2)?;
    for node in &cluster.nodes {
        node.wait_for_maps("all three pod CIDRs, routed natively", |m| {
            m.pod_routes() == 3
                && m.routes.values().all(|r| {
                    r.flags & ferrite_common::ROUTE_LOCAL != 0
                        || r.flags & ferrite_common::ROUTE_NATIVE != 0
                })
        })?;
    }
    ferrite_tests::lab::wait_until(
        "node 0's native route to node 2",
        ferrite_tests::lab::SETTLE,
        || route().is_ok_and(|r| r.contains(&format!("via {node2_ip} dev ul0"))),
    )?;
    let neighbour = sh(
        "ip",
        &[
            "-n",
            &node0_netns,
            "neigh",
            "show",
            &node2_ip.to_string(),
            "dev",
            "ul0",
        ],
    )?;
    assert!(neighbour.contains("managed"), "{neighbour}");

    let encapsulated_before = [
        vxlan_tx_packets(&cluster, 0)?,
        vxlan_tx_packets(&cluster, 2)?,
    ];
    for (client, server) in [("a0", "c0"), ("c0", "a0"), ("b0", "c0")] {
        let (client_pod, server_pod) = (cluster.pod(client), cluster.pod(server));
        let request = format!("{client} to {server}");
        let reply =
            client_pod.tcp_request(SocketAddrV4::new(server_pod.ip, TCP_TARGET), &request)?;
        assert_eq!(
            parse_answer(&reply, &request)?,
            (server.to_string(), client_pod.ip.to_string())
        );
    }
    // Node 0's own processes reach node 2's pod from node 0's overlay address.
    let probe = cluster.nodes[0].host_probe();
    let target = SocketAddrV4::new(cluster.pod("c0").ip, UDP_TARGET);
    let outcome = probe.udp(target, "from node 0")?;
    assert_eq!(
        parse_answer(outcome.answer()?, "from node 0")?,
        ("c0".to_string(), "10.244.0.1".to_string())
    );
    let encapsulated = [
        vxlan_tx_packets(&cluster, 0)?,
        vxlan_tx_packets(&cluster, 2)?,
    ];
    assert_eq!(encapsulated, encapsulated_before, "nothing encapsulated");
    drop(servers);
    Ok(())
}
