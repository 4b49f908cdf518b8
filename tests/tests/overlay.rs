//! User stories for several nodes: each node a network namespace on a shared underlay
//! with its own agent and pins; pods talk across nodes over VXLAN; Services spread
//! over nodes; pods reach the world masqueraded. Needs root.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener},
    time::Duration,
};

use anyhow::{Context, Result};
use ferrite_tests::{
    cluster::{service_yaml, TCP_FRONTEND, TCP_TARGET, UDP_FRONTEND, UDP_TARGET, VIP},
    lab::{answered_by, parse_answer, pod_ip, Cluster, Server, WORLD_IP},
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

fn two_nodes() -> Result<TwoNodes> {
    let mut cluster = Cluster::new(2)?;
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
    for node in &cluster.nodes {
        node.wait_for_maps("routes to both nodes and 2 local endpoints", |m| {
            m.routes.len() == 2 && m.endpoints.len() == 2 && m.config.node_ip != [0; 4]
        })?;
    }
    Ok(TwoNodes {
        _servers: servers,
        cluster,
    })
}

#[test]
fn pods_on_different_nodes_reach_each_other_by_pod_ip_without_nat() -> Result<()> {
    let env = two_nodes()?;
    let c = &env.cluster;
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
    Ok(())
}

#[test]
fn a_cluster_ip_with_backends_on_both_nodes_uses_them_all_and_answers_from_the_vip() -> Result<()> {
    let env = two_nodes()?;
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

#[test]
fn a_bulk_tcp_transfer_across_nodes_arrives_complete() -> Result<()> {
    const BYTES: usize = 64 << 20;
    let env = two_nodes()?;
    let (client, server) = (env.cluster.pod("a0"), env.cluster.pod("b1"));
    let listener = server.netns.run(|| TcpListener::bind("0.0.0.0:9000"))??;
    let sink = std::thread::spawn(move || -> Result<usize> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            match stream.read(&mut buf)? {
                0 => break,
                n => total += n,
            }
        }
        stream.write_all(total.to_string().as_bytes())?;
        Ok(total)
    });
    let mut stream = client.tcp_connect(SocketAddrV4::new(server.ip, 9000))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let chunk = vec![0x5au8; 1 << 16];
    for _ in 0..BYTES / chunk.len() {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    assert_eq!((received, reply), (BYTES, BYTES.to_string()));
    Ok(())
}

#[test]
fn pod_traffic_to_the_world_leaves_with_the_node_ip_and_the_reply_returns() -> Result<()> {
    let env = two_nodes()?;
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

#[test]
fn removing_a_node_removes_its_route_and_leaves_the_others() -> Result<()> {
    let env = two_nodes()?;
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
    node0.wait_for_maps("node 1's route to go", |m| m.routes.len() == 1)?;
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
        node1.maps()?.contents()?.routes.len(),
        2,
        "node 1 was not touched"
    );
    Ok(())
}
