//! User stories for dual-stack pods on a dual-stack cluster (a pod CIDR, an address
//! and a cluster CIDR per family): two pods of a node talk over IPv6 as they do over
//! IPv4, the datapath delivering straight into the pod; a pod of another node
//! reaches them over IPv6 inside the IPv4 underlay's VXLAN; a pod cannot send from
//! another pod's IPv6 address; a pod reaches a host outside the cluster over IPv6,
//! masqueraded to its node's IPv6 address; a deleted pod's IPv6 address stops
//! being delivered. Each from a YAML file and from an API server's watch events.
//! Needs root.
use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};

use anyhow::{ensure, Result};
use ferrite_common::{stat, Endpoint6Key};
use ferrite_tests::{
    fake_apiserver::FakeApiServer,
    lab::{
        node_ip6, pod_ip, pod_ip6, wait_until, Cluster, ObjectSource, Server, SETTLE, WORLD_IP6,
    },
};

/// The port the IPv6 servers listen on (the IPv4 ones of other stories use others).
const PORT6: u16 = 8086;

fn v6(ip: Ipv6Addr) -> SocketAddrV6 {
    SocketAddrV6::new(ip, PORT6, 0, 0)
}

fn endpoint6(ip: Ipv6Addr) -> Endpoint6Key {
    Endpoint6Key {
        address: ip.octets(),
    }
}

fn dual_stack_pods_talk_over_ipv6_and_reach_the_world_masqueraded(
    source: ObjectSource,
) -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    if source == ObjectSource::Kubernetes {
        FakeApiServer::serve_cluster(&mut cluster)?;
    }
    cluster.dual_stack()?;
    let (web6, client6, gone6) = (pod_ip6(0, 0), pod_ip6(0, 1), pod_ip6(0, 2));
    let node = &mut cluster.nodes[0];
    node.add_dual_stack_pod("web", pod_ip(0, 0), web6)?;
    node.add_dual_stack_pod("client", pod_ip(0, 1), client6)?;
    node.add_dual_stack_pod("gone", pod_ip(0, 2), gone6)?;
    let remote6 = pod_ip6(1, 0);
    cluster.nodes[1].add_dual_stack_pod("remote", pod_ip(1, 0), remote6)?;
    let _web = Server::start(&cluster.pod("web").netns, "web", v6(web6))?;
    let _gone = Server::start(&cluster.pod("gone").netns, "gone", v6(gone6))?;
    let _world = Server::start(&cluster.world, "world", v6(WORLD_IP6))?;
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agents()?;
    let node = &cluster.nodes[0];
    node.wait_for_maps("the pods' IPv6 addresses in ferrite_endpnt6", |m| {
        [web6, client6, gone6]
            .iter()
            .all(|ip| m.endpoints6.contains_key(&endpoint6(*ip)))
    })?;

    // Pod to pod over IPv6: the server sees the client's own address, and the
    // datapath delivered it (the host stack never forwarded it).
    let counters =
        || -> Result<Vec<u64>> { Ok(node.maps()?.counters()?.iter().map(|c| c.packets).collect()) };
    let before = counters()?;
    let client = cluster.pod("client");
    for (tcp, udp) in [("one", "two"), ("three", "four")] {
        assert_eq!(
            client.netns.tcp_request(v6(web6), tcp)?,
            format!("web|{client6}|{tcp}")
        );
        let socket = client.netns.run(|| UdpSocket::bind((client6, 0)))??;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        socket.send_to(udp.as_bytes(), v6(web6))?;
        let mut answer = [0u8; 256];
        let (n, from) = socket.recv_from(&mut answer)?;
        assert_eq!(
            String::from_utf8_lossy(&answer[..n]),
            format!("web|{client6}|{udp}")
        );
        assert_eq!(from, v6(web6).into());
    }
    let after = counters()?;
    let delivered = stat::DELIVERED_LOCAL as usize;
    ensure!(
        after[delivered] >= before[delivered] + 8,
        "pod-to-pod IPv6 delivered by the datapath: {} -> {}",
        before[delivered],
        after[delivered]
    );

    // From a pod of the other node: IPv6 inside the IPv4 underlay's VXLAN, checked
    // to come from that node's IPv6 pod CIDR and delivered into the pod, which sees
    // the client's own address.
    let received = || counters().map(|c| c[stat::RECEIVED_FROM_NODE as usize]);
    let before = received()?;
    let remote = cluster.pod("remote");
    wait_until("a TCP answer across nodes over IPv6", SETTLE, || {
        remote
            .netns
            .tcp_request(v6(web6), "across")
            .is_ok_and(|answer| answer == format!("web|{remote6}|across"))
    })?;
    ensure!(
        received()? > before,
        "received from the other node by the datapath"
    );

    // Out of the cluster over IPv6: the world sees the node's IPv6 address.
    assert_eq!(
        client.netns.tcp_request(v6(WORLD_IP6), "out")?,
        format!("world|{}|out", node_ip6(0))
    );

    // The pod `gone` is deleted: its IPv6 address leaves ferrite_endpnt6 (the
    // others stay).
    cluster.nodes[0].pods.retain(|p| p.name != "gone");
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    let node = &cluster.nodes[0];
    node.wait_for_maps("the deleted pod's IPv6 address gone", |m| {
        !m.endpoints6.contains_key(&endpoint6(gone6)) && m.endpoints6.contains_key(&endpoint6(web6))
    })?;
    assert_eq!(
        cluster.pod("client").netns.tcp_request(v6(web6), "still")?,
        format!("web|{client6}|still")
    );
    // A pod cannot send from another pod's IPv6 address (last: the client then
    // holds the web pod's address itself).
    let counters =
        || -> Result<Vec<u64>> { Ok(node.maps()?.counters()?.iter().map(|c| c.packets).collect()) };
    let spoofed_before = counters()?[stat::DROP_SPOOFED as usize];
    cluster.pod("client").netns.run(|| -> Result<()> {
        ferrite_tests::lab::sh(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{web6}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        let socket = UdpSocket::bind((web6, 0))?;
        for _ in 0..3 {
            socket.send_to(b"spoofed", v6(pod_ip6(0, 9)))?;
        }
        Ok(())
    })??;
    wait_until("three spoofed IPv6 datagrams dropped", SETTLE, || {
        counters().is_ok_and(|c| c[stat::DROP_SPOOFED as usize] >= spoofed_before + 3)
    })?;

    Ok(())
}

ferrite_tests::from_both_sources!(dual_stack_pods_talk_over_ipv6_and_reach_the_world_masqueraded);
