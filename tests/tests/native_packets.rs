//! Native routing (`--routing native`), packet by packet (BPF_PROG_TEST_RUN): a pod's
//! packet to another node's pod leaves unencapsulated and untouched, and what arrives
//! on the uplink from another node's pod CIDR is delivered only when its frame comes
//! from that node's MAC, as the kernel's neighbour table resolves the node's address
//! on the uplink. The uplink is a veth in a network namespace of the test's own (the
//! programs' FIB lookups read that namespace). Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use ferrite_common::{
    explain::verdict, pod_mac_for, program_names, stat, ROUTE_LOCAL, ROUTE_NATIVE, ROUTE_NODE,
    ROUTE_REMOTE,
};
use ferrite_tests::{
    frames::{self, GATEWAY_MAC},
    lab::{sh, unique, Netns},
    testbed::{RunResult, Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OVERLAY_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const OTHER_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const OTHER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const OTHER_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
/// A host on the nodes' link that is not the other node.
const STRANGER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
/// A third node on the link whose MAC this node has not resolved.
const UNRESOLVED_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
const UNRESOLVED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// The node's link: a namespace with the uplink `up0` (this node's address, forwarding), the
/// other node's MAC in its neighbour table (as the agent's managed entry keeps it),
/// and the uplink's ifindex there.
struct Link {
    netns: Netns,
    uplink: u32,
}

fn link() -> Result<Link> {
    let netns = Netns::new(&unique("native-pkt"))?;
    let ns = netns.name.as_str();
    let ip = |args: &[&str]| sh("ip", &[&["-n", ns], args].concat());
    ip(&[
        "link", "add", "up0", "type", "veth", "peer", "name", "up0peer",
    ])?;
    ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "up0"])?;
    ip(&["link", "set", "up0", "up"])?;
    ip(&["link", "set", "up0peer", "up"])?;
    // bpf_fib_lookup answers only where the device forwards, as a node's uplink does.
    sh(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    let mac = OTHER_NODE_MAC.map(|b| format!("{b:02x}")).join(":");
    ip(&[
        "neigh",
        "replace",
        &OTHER_NODE_IP.to_string(),
        "lladdr",
        &mac,
        "dev",
        "up0",
        "nud",
        "permanent",
    ])?;
    // "<ifindex>: up0@up0peer: ..." (sysfs shows the test's own namespace).
    let shown = ip(&["-o", "link", "show", "up0"])?;
    let uplink = shown
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .with_context(|| format!("up0's ifindex in {shown:?}"))?;
    Ok(Link { netns, uplink })
}

/// One node routing natively: its pod `POD`, its pod CIDR, the other nodes' pod
/// CIDRs routed natively (and their addresses), `uplink` as its uplink.
fn native_node(uplink: u32) -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.add_endpoint(POD, TEST_RUN_IFINDEX)?;
    bed.update_config(|config| {
        config.node_ip = NODE_IP.octets();
        config.overlay_ip = OVERLAY_IP.octets();
        config.uplink_ifindex = uplink;
    })?;
    bed.add_route(Ipv4Addr::new(10, 244, 0, 0), 24, NODE_IP, ROUTE_LOCAL)?;
    for (cidr, node) in [
        (Ipv4Addr::new(10, 244, 1, 0), OTHER_NODE_IP),
        (Ipv4Addr::new(10, 244, 2, 0), UNRESOLVED_NODE_IP),
    ] {
        bed.add_route(cidr, 24, node, ROUTE_REMOTE | ROUTE_NATIVE)?;
        bed.add_route(node, 32, node, ROUTE_NODE | ROUTE_NATIVE)?;
    }
    Ok(bed)
}

/// `frame` as sent on the link by `mac` to this node.
fn from_mac(mac: [u8; 6], mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame[6..12].copy_from_slice(&mac);
    frame
}

/// The uplink's tcx program on `frame`, arriving on the link's uplink.
fn on_uplink(bed: &Testbed, link: &Link, frame: &[u8]) -> Result<RunResult> {
    link.netns
        .run(|| bed.run_program_on(program_names::FROM_UPLINK, frame, link.uplink))?
}

#[test]
fn a_pods_packet_to_another_nodes_pod_leaves_through_the_uplink_unencapsulated_and_untouched(
) -> Result<()> {
    let link = link()?;
    let bed = native_node(link.uplink)?;
    for frame in [
        frames::tcp_syn(sock(POD, 40000), sock(OTHER_POD, 8080), b"hello"),
        frames::udp(sock(POD, 40001), sock(OTHER_POD, 5353), b"query"),
    ] {
        let out = bed.from_pod(&frame)?;
        // bpf_redirect_neigh: the kernel writes the MACs on the way out; the datapath
        // changes nothing (no outer header, no NAT, TTL as sent).
        assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &frame));
        let explained = bed.explainer()?.from_pod(&frame, 1)?;
        assert_eq!(
            (explained.trace.verdict, explained.trace.verdict_target),
            (verdict::REDIRECT_NEIGH, link.uplink),
            "out of the uplink, the kernel resolving the next hop"
        );
    }
    assert_eq!(bed.counter(stat::SENT_TO_NODE)?, 2);
    Ok(())
}

#[test]
fn from_the_other_nodes_mac_a_packet_of_its_pod_is_delivered_and_from_another_mac_dropped_as_spoofed(
) -> Result<()> {
    let link = link()?;
    let bed = native_node(link.uplink)?;
    let packet = frames::tcp_syn(sock(OTHER_POD, 40000), sock(POD, 8080), b"hello");

    let genuine = from_mac(OTHER_NODE_MAC, packet.clone());
    let out = on_uplink(&bed, &link, &genuine)?;
    let mut delivered = genuine.clone();
    delivered[..6].copy_from_slice(&pod_mac_for(POD));
    delivered[6..12].copy_from_slice(&GATEWAY_MAC);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_REDIRECT, &delivered));
    assert_eq!(bed.counter(stat::RECEIVED_FROM_NODE)?, 1);

    // The same packet from a host on the link that is not that node.
    let spoofed = from_mac(STRANGER_MAC, packet.clone());
    let out = on_uplink(&bed, &link, &spoofed)?;
    assert_eq!((out.verdict, &out.frame), (TC_ACT_SHOT, &spoofed));
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 1);
    assert_eq!(bed.counter(stat::RECEIVED_FROM_NODE)?, 1);

    // A node whose MAC this node has not resolved cannot be told from an impostor:
    // dropped too (what the agent's managed neighbour entries are for).
    let unresolved = from_mac(
        OTHER_NODE_MAC,
        frames::tcp_syn(sock(UNRESOLVED_POD, 40000), sock(POD, 8080), b"hello"),
    );
    let out = on_uplink(&bed, &link, &unresolved)?;
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 2);
    Ok(())
}

/// The node's own processes reach other nodes' pods from its overlay address: the
/// answers, from the other node's MAC, go to the stack untouched.
#[test]
fn answers_to_the_nodes_own_processes_from_another_nodes_pod_go_to_the_stack_untouched(
) -> Result<()> {
    let link = link()?;
    let bed = native_node(link.uplink)?;
    let answer = from_mac(
        OTHER_NODE_MAC,
        frames::udp(sock(OTHER_POD, 5353), sock(OVERLAY_IP, 40000), b"answer"),
    );
    let out = on_uplink(&bed, &link, &answer)?;
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &answer));
    assert_eq!(bed.counter(stat::PASSED_TO_STACK)?, 1);
    let spoofed = from_mac(STRANGER_MAC, answer.clone());
    let out = on_uplink(&bed, &link, &spoofed)?;
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 1);
    Ok(())
}
