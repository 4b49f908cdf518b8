//! Dual-stack on the IPv4 overlay (IPv6 inside IPv4 VXLAN, as flannel and Cilium do
//! on an IPv4 underlay): each node's kernel routes the other nodes' IPv6 pod CIDRs
//! through the VXLAN device to their IPv4 node addresses, and `ferrite_routes6`
//! names every node's IPv6 pod CIDR and the other nodes' IPv6 addresses; a full
//! sync repairs the routes, and a node that goes takes both with it. From the objects in a file and from the Kubernetes API.
//! Needs root.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use ferrite_common::{vtep_mac_for, ROUTE_LOCAL, ROUTE_NODE, ROUTE_REMOTE};
use ferrite_tests::{
    fake_apiserver::FakeApiServer,
    lab::{node_ip6, pod_cidr6, sh, wait_until, Cluster, ObjectSource, SETTLE},
};

/// `ip -6 -n NETNS ARGS...`'s output.
fn ip6(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-6", "-n", netns];
    all.extend_from_slice(args);
    sh("ip", &all)
}

fn mac(bytes: [u8; 6]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

fn ipv6_pod_cidrs_of_the_other_nodes_are_routed_through_the_ipv4_tunnel_until_the_node_goes(
    source: ObjectSource,
) -> Result<()> {
    let mut cluster = Cluster::new(2)?;
    if source == ObjectSource::Kubernetes {
        FakeApiServer::serve_cluster(&mut cluster)?;
    }
    cluster.dual_stack()?;
    cluster.write_config(&cluster.nodes_and_pods_yaml())?;
    cluster.start_agents()?;
    let node1_ip: Ipv4Addr = cluster.nodes[1].ip.context("plugged")?;
    // As Ipv6Addr prints them (the lab writes `fd00:10:244:0::/64`).
    let canonical = |cidr: String| -> Result<String> {
        let (network, len) = cidr.split_once('/').context("a CIDR")?;
        Ok(format!("{}/{len}", network.parse::<Ipv6Addr>()?))
    };
    let (cidr0, cidr1) = (canonical(pod_cidr6(0))?, canonical(pod_cidr6(1))?);
    for node in &cluster.nodes {
        node.wait_for_maps("both nodes' IPv6 pod CIDRs in ferrite_routes6", |m| {
            m.routes6.len() == 3
        })?;
    }
    // ferrite_routes6 of node 0: its own IPv6 pod CIDR, and node 1's owned by node 1's
    // IPv4 address (the tunnel's end), as the IPv4 pod CIDRs are; node 1's IPv6
    // address (its NodePorts, for the socket programs), as its IPv4 /32 is.
    let routes6 = cluster.nodes[0].maps()?.route6_entries()?;
    let entries: Vec<(String, Ipv4Addr, u16)> = routes6
        .iter()
        .map(|(key, info)| {
            (
                format!("{}/{}", Ipv6Addr::from(key.network), key.prefix_len),
                Ipv4Addr::from(info.node_ip),
                info.flags,
            )
        })
        .collect();
    let node0_ip: Ipv4Addr = cluster.nodes[0].ip.context("plugged")?;
    assert_eq!(
        entries,
        [
            (cidr0.clone(), node0_ip, ROUTE_LOCAL),
            (cidr1.clone(), node1_ip, ROUTE_REMOTE),
            (format!("{}/128", node_ip6(1)), node1_ip, ROUTE_NODE),
        ]
    );

    let node0 = cluster.nodes[0].netns.name.clone();
    let route = || ip6(&node0, &["route", "show", &cidr1]);
    wait_until("node 0's IPv6 route to node 1's pods", SETTLE, || {
        route().is_ok_and(|r| r.contains(&format!("dst {node1_ip}")))
    })?;
    let shown = route()?;
    for part in [
        "encap ip id 1 ",
        "via fd00:10:244:1::1 ",
        "dev ferrite_vxlan ",
        "src fd00:10:244::1 ",
        "onlink",
    ] {
        assert!(shown.contains(part), "{part:?} not in {shown}");
    }
    let neighbour = ip6(
        &node0,
        &["neigh", "show", "fd00:10:244:1::1", "dev", "ferrite_vxlan"],
    )?;
    let vtep = mac(vtep_mac_for(node1_ip));
    assert!(
        neighbour.contains(&format!("lladdr {vtep}")) && neighbour.contains("PERMANENT"),
        "{neighbour}"
    );
    let address = ip6(&node0, &["addr", "show", "dev", "ferrite_vxlan"])?;
    assert!(address.contains("fd00:10:244::1/128"), "{address}");

    // Removed behind the agent's back: the next full sync (read back from the
    // device) puts the route and its neighbour back.
    ip6(&node0, &["route", "del", &cidr1, "dev", "ferrite_vxlan"])?;
    ip6(
        &node0,
        &["neigh", "del", "fd00:10:244:1::1", "dev", "ferrite_vxlan"],
    )?;
    assert!(route()?.trim().is_empty());
    wait_until("the full sync to put the IPv6 route back", SETTLE, || {
        route().is_ok_and(|r| r == shown)
    })?;
    wait_until("... and its neighbour", SETTLE, || {
        ip6(&node0, &["neigh", "show", "dev", "ferrite_vxlan"])
            .is_ok_and(|n| n.contains(&format!("fd00:10:244:1::1 lladdr {vtep} PERMANENT")))
    })?;

    // Node 1 leaves: its Node object and pods are gone.
    let gone = cluster.nodes[1].name.clone();
    let without_node_1: String = cluster
        .nodes_and_pods_yaml()
        .split("---\n")
        .filter(|doc| !doc.contains(&gone))
        .collect::<Vec<_>>()
        .join("---\n");
    cluster.write_config(&without_node_1)?;
    cluster.nodes[0].wait_for_maps("node 1's IPv6 pod CIDR and address to go", |m| {
        m.routes6.len() == 1
    })?;
    let left = cluster.nodes[0].maps()?.route6_entries()?;
    let left: Vec<_> = left.values().map(|info| info.flags).collect();
    assert_eq!(left, [ROUTE_LOCAL], "node 0's own stays");
    wait_until("node 0's IPv6 route to node 1's pods to go", SETTLE, || {
        route().is_ok_and(|r| r.trim().is_empty())
    })?;
    wait_until("node 0's neighbour for node 1 to go", SETTLE, || {
        ip6(&node0, &["neigh", "show", "dev", "ferrite_vxlan"])
            .is_ok_and(|n| !n.contains("fd00:10:244:1::1"))
    })?;
    let address = ip6(&node0, &["addr", "show", "dev", "ferrite_vxlan"])?;
    assert!(address.contains("fd00:10:244::1/128"), "{address}");
    Ok(())
}

ferrite_tests::from_both_sources!(
    ipv6_pod_cidrs_of_the_other_nodes_are_routed_through_the_ipv4_tunnel_until_the_node_goes
);
