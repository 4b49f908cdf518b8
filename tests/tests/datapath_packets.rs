//! The datapath, packet by packet (BPF_PROG_TEST_RUN): a pod's frames go in, the
//! exact frame and verdict come out. Expected frames are built independently and every
//! checksum is recomputed. Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::Result;
use ferrite_common::{
    explain::verdict, pod_mac_for, program_names, stat, CtKey, CT_FLAG_CLOSING,
    CT_FLAG_UNESTABLISHED, CT_FLAG_VIA_STACK, PROTO_TCP, PROTO_UDP, ROUTE_LOCAL, ROUTE_REMOTE,
    SNAT_PORT_MIN,
};
use ferrite_tests::{
    frames::{self, decode_checked, GATEWAY_MAC},
    testbed::{Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX},
    verdict_model::{Expected, Fragments, Frontend, NodeModel, FROM_POD_COUNTERS},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 11),
    Ipv4Addr::new(10, 244, 0, 12),
    Ipv4Addr::new(10, 244, 0, 13),
];

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// One node's worth of state: a client pod, three backend pods, a Service with a TCP
/// port (80 -> 8080) and a UDP port (53 -> 5353).
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.add_endpoint(CLIENT, TEST_RUN_IFINDEX)?;
    for backend in BACKENDS {
        bed.add_endpoint(backend, TEST_RUN_IFINDEX)?;
    }
    let tcp_backends: Vec<_> = BACKENDS.iter().map(|ip| sock(*ip, 8080)).collect();
    let udp_backends: Vec<_> = BACKENDS.iter().map(|ip| sock(*ip, 5353)).collect();
    bed.add_service(sock(VIP, 80), PROTO_TCP, 1, 1, &tcp_backends)?;
    bed.add_service(sock(VIP, 53), PROTO_UDP, 2, 11, &udp_backends)?;
    Ok(bed)
}

/// `frame` as delivered to the pod with `ip`: dst MAC = pod's eth0, src = gateway.
fn delivered_to(ip: Ipv4Addr, mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&pod_mac_for(ip));
    frame[6..12].copy_from_slice(&GATEWAY_MAC);
    frame
}

fn backend_of(frame: &[u8]) -> Ipv4Addr {
    *decode_checked(frame).unwrap().destination.ip()
}

#[test]
fn tcp_to_a_cluster_ip_is_dnated_to_a_backend_and_the_reply_comes_from_the_vip() -> Result<()> {
    let bed = testbed()?;
    let client = sock(CLIENT, 40000);
    let syn = frames::tcp_syn(client, sock(VIP, 80), b"");
    let out = bed.from_pod(&syn)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let backend = backend_of(&out.frame);
    assert!(BACKENDS.contains(&backend), "picked {backend}");
    // Exactly the SYN the client sent, addressed to backend:8080, checksums valid.
    let expected = delivered_to(backend, frames::tcp_syn(client, sock(backend, 8080), b""));
    assert_eq!(out.frame, expected);
    decode_checked(&out.frame)?;

    // The same flow keeps its backend (conntrack), with payload intact.
    let data = frames::tcp_ack(client, sock(VIP, 80), b"GET / HTTP/1.1\r\n\r\n");
    let out = bed.from_pod(&data)?;
    let expected = delivered_to(
        backend,
        frames::tcp_ack(client, sock(backend, 8080), b"GET / HTTP/1.1\r\n\r\n"),
    );
    assert_eq!(out.frame, expected);

    // The backend's answer is reverse-NATed: it comes from VIP:80 to the client.
    let reply = frames::tcp_ack(sock(backend, 8080), client, b"HTTP/1.1 200 OK\r\n");
    let out = bed.from_pod(&reply)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let expected = delivered_to(
        CLIENT,
        frames::tcp_ack(sock(VIP, 80), client, b"HTTP/1.1 200 OK\r\n"),
    );
    assert_eq!(out.frame, expected);
    assert_eq!(bed.counter(stat::SERVICE_NEW_FLOW)?, 1);
    assert_eq!(bed.counter(stat::SERVICE_ESTABLISHED)?, 1);
    assert_eq!(bed.counter(stat::REVERSE_NAT)?, 1);
    Ok(())
}

/// Rev-NAT indexes are 32-bit: 65,537 names its own frontend, not the one of index 1
/// (VIP:80) that a 16-bit index would have wrapped it to.
#[test]
fn a_rev_nat_index_past_16_bits_reverse_nats_replies_to_its_own_frontend() -> Result<()> {
    let mut bed = testbed()?;
    let frontend = sock(Ipv4Addr::new(10, 96, 1, 10), 443);
    let backend = sock(BACKENDS[0], 8443);
    bed.add_service(frontend, PROTO_TCP, 65_537, 50, &[backend])?;
    let client = sock(CLIENT, 40001);
    let out = bed.from_pod(&frames::tcp_syn(client, frontend, b""))?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let expected = delivered_to(*backend.ip(), frames::tcp_syn(client, backend, b""));
    assert_eq!(out.frame, expected);

    let out = bed.from_pod(&frames::tcp_ack(backend, client, b"hello"))?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let expected = delivered_to(CLIENT, frames::tcp_ack(frontend, client, b"hello"));
    assert_eq!(out.frame, expected);
    assert_eq!(bed.counter(stat::REVERSE_NAT)?, 1);
    Ok(())
}

#[test]
fn udp_to_a_cluster_ip_is_dnated_and_answered_from_the_vip() -> Result<()> {
    let bed = testbed()?;
    let client = sock(CLIENT, 5000);
    let query = frames::udp(client, sock(VIP, 53), b"query");
    let out = bed.from_pod(&query)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let backend = backend_of(&out.frame);
    let expected = delivered_to(backend, frames::udp(client, sock(backend, 5353), b"query"));
    assert_eq!(out.frame, expected);

    let answer = frames::udp(sock(backend, 5353), client, b"answer");
    let out = bed.from_pod(&answer)?;
    let expected = delivered_to(CLIENT, frames::udp(sock(VIP, 53), client, b"answer"));
    assert_eq!(out.frame, expected);
    Ok(())
}

#[test]
fn a_fragmented_datagram_to_a_cluster_ip_and_its_fragmented_answer_are_translated_whole(
) -> Result<()> {
    let bed = testbed()?;
    let client = sock(CLIENT, 5002);
    let payload: Vec<u8> = (0..200u8).collect();
    let query = frames::udp(client, sock(VIP, 53), &payload);
    let (first, last) = frames::fragment(&query, 96, 0x1234)?;
    let (first_out, last_out) = (bed.from_pod(&first)?, bed.from_pod(&last)?);
    assert_eq!(
        (first_out.verdict, last_out.verdict),
        (TC_ACT_REDIRECT, TC_ACT_REDIRECT)
    );
    // The first fragment carries the ports and the UDP checksum over the whole
    // datagram: put back together, the datagram is the one the backend would get
    // unfragmented, checksum included.
    let whole = frames::reassemble(&first_out.frame, &last_out.frame)?;
    let backend = backend_of(&whole);
    let expected = delivered_to(backend, frames::udp(client, sock(backend, 5353), &payload));
    assert_eq!(whole[14 + 20..], expected[14 + 20..]);
    assert_eq!(decode_checked(&whole)?.destination, sock(backend, 5353));
    assert_eq!(bed.counter(stat::FRAGMENT_TRACKED)?, 1);

    // The backend's answer, fragmented too, comes back from the VIP.
    let answer: Vec<u8> = (0..180u8).rev().collect();
    let reply = frames::udp(sock(backend, 5353), client, &answer);
    let (first, last) = frames::fragment(&reply, 64, 0x4321)?;
    let (first_out, last_out) = (bed.from_pod(&first)?, bed.from_pod(&last)?);
    let whole = frames::reassemble(&first_out.frame, &last_out.frame)?;
    let expected = delivered_to(CLIENT, frames::udp(sock(VIP, 53), client, &answer));
    assert_eq!(whole[14 + 20..], expected[14 + 20..]);
    assert_eq!(decode_checked(&whole)?.source, sock(VIP, 53));
    assert_eq!(bed.counter(stat::FRAGMENT_ROUTED)?, 0);
    Ok(())
}

#[test]
fn udp_without_checksum_keeps_checksum_zero() -> Result<()> {
    let bed = testbed()?;
    let client = sock(CLIENT, 5001);
    let out = bed.from_pod(&frames::udp_without_checksum(client, sock(VIP, 53), b"q"))?;
    let decoded = decode_checked(&out.frame)?;
    assert_eq!(decoded.udp_checksum, Some(0));
    assert_eq!(decoded.destination.port(), 5353);
    Ok(())
}

#[test]
fn flows_spread_over_every_backend_and_each_flow_sticks() -> Result<()> {
    let bed = testbed()?;
    let mut used = BTreeSet::new();
    for port in 30000..30300u16 {
        let syn = frames::tcp_syn(sock(CLIENT, port), sock(VIP, 80), b"");
        let first = backend_of(&bed.from_pod(&syn)?.frame);
        let again = backend_of(&bed.from_pod(&syn)?.frame);
        assert_eq!(first, again, "flow from port {port} changed backend");
        used.insert(first);
    }
    assert_eq!(used.len(), BACKENDS.len(), "backends used: {used:?}");
    Ok(())
}

#[test]
fn ip_options_shift_the_l4_header_and_dnat_still_lands_right() -> Result<()> {
    let bed = testbed()?;
    let client = sock(CLIENT, 40001);
    let with_options = |to: SocketAddrV4| {
        let plain = frames::tcp_syn(client, to, b"");
        let mut ip = etherparse::Ipv4Header::from_slice(&plain[14..]).unwrap().0;
        ip.options = [1u8, 1, 1, 1][..].try_into().unwrap(); // four NOPs: IHL 6
        ip.total_len += 4;
        ip.header_checksum = ip.calc_header_checksum();
        let mut frame = plain[..14].to_vec();
        frame.extend(ip.to_bytes());
        frame.extend(&plain[34..]);
        frame
    };
    let out = bed.from_pod(&with_options(sock(VIP, 80)))?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let backend = *decode_checked(&out.frame)?.destination.ip();
    assert_eq!(
        out.frame,
        delivered_to(backend, with_options(sock(backend, 8080)))
    );
    Ok(())
}

#[test]
fn pod_to_pod_by_ip_is_delivered_untouched() -> Result<()> {
    let bed = testbed()?;
    let frame = frames::tcp_syn(sock(CLIENT, 1234), sock(BACKENDS[1], 9999), b"hi");
    let out = bed.from_pod(&frame)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame, delivered_to(BACKENDS[1], frame));
    Ok(())
}

#[test]
fn traffic_to_unknown_destinations_goes_to_the_host_stack_unchanged() -> Result<()> {
    let bed = testbed()?;
    let frame = frames::udp(
        sock(CLIENT, 1234),
        sock(Ipv4Addr::new(192, 0, 2, 1), 53),
        b"x",
    );
    let out = bed.from_pod(&frame)?;
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    assert_eq!(bed.counter(stat::PASSED_TO_STACK)?, 1);
    Ok(())
}

/// This node's address and its own address on the overlay (in its pod CIDR).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OVERLAY_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// The testbed with this node's addresses and pod CIDR (10.244.0.0/24), and another
/// node's (10.244.1.0/24): what tells `ferrite_to_pod` a pod's packet from others.
fn node_testbed() -> Result<Testbed> {
    let mut bed = testbed()?;
    bed.set_node_ip(NODE_IP)?;
    bed.update_config(|config| config.overlay_ip = OVERLAY_IP.octets())?;
    bed.add_route(Ipv4Addr::new(10, 244, 0, 0), 24, NODE_IP, ROUTE_LOCAL)?;
    let other_node = Ipv4Addr::new(198, 51, 100, 2);
    bed.add_route(Ipv4Addr::new(10, 244, 1, 0), 24, other_node, ROUTE_REMOTE)?;
    Ok(bed)
}

fn ct_key(from: SocketAddrV4, to: SocketAddrV4, proto: u8) -> CtKey {
    CtKey {
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port(),
        dport: to.port(),
        proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// A pod's connection to a hostPort (`<node address>:<hostPort>`, which portmap
/// DNATs in the stack to a pod of this node): the stack delivers the translated
/// packet through that pod's veth, where `ferrite_to_pod` passes it untouched and
/// records the flow, so the pod's answers pass to the stack untouched (where
/// netfilter translates them back to the node's address) instead of being
/// redirected straight into the client, from an address it never called. Also
/// once the route epoch has moved (the entry's cached route resolved anew), and in
/// an explain run, which writes nothing.
#[test]
fn answers_to_flows_the_stack_forwarded_between_pods_go_back_through_the_stack() -> Result<()> {
    let mut bed = node_testbed()?;
    let (client, tcp_pod, udp_pod) = (
        sock(CLIENT, 40000),
        sock(BACKENDS[0], 8080),
        sock(BACKENDS[0], 5353),
    );
    let flows = [
        (
            frames::tcp_syn(client, tcp_pod, b""),
            frames::tcp_ack(tcp_pod, client, b""),
        ),
        (
            frames::udp(client, udp_pod, b"query"),
            frames::udp(udp_pod, client, b"answer"),
        ),
    ];
    for (forward, answer) in &flows {
        let out = bed.run_program(program_names::TO_POD, forward, 1)?.0;
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, forward));
        let out = bed.from_pod(answer)?;
        assert_eq!(
            (out.verdict, &out.frame),
            (TC_ACT_OK, answer),
            "the answer goes to the stack, untouched"
        );
    }
    assert_eq!(bed.counter(stat::PASSED_TO_STACK)?, 2);
    assert_eq!(bed.counter(stat::DELIVERED_LOCAL)?, 0);
    let entry = bed
        .conntrack(&ct_key(tcp_pod, client, PROTO_TCP))?
        .expect("the TCP flow's entry");
    assert_eq!(entry.flags, CT_FLAG_VIA_STACK);

    bed.bump_route_epoch()?;
    let explainer = bed.explainer()?;
    let before = bed.map_dumps()?;
    let explained = explainer.from_pod(&flows[0].1, 1)?;
    assert_eq!(bed.map_dumps()?, before, "the explain run wrote nothing");
    assert_eq!(
        (explained.run.verdict, explained.trace.verdict),
        (TC_ACT_OK, verdict::PASS)
    );
    assert_eq!(explained.trace.ct_flags, CT_FLAG_VIA_STACK);
    for (_, answer) in &flows {
        let out = bed.from_pod(answer)?;
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, answer));
    }

    // The pod's answers on a flow the stack did not forward: delivered as before.
    let direct = frames::tcp_ack(tcp_pod, sock(CLIENT, 40001), b"");
    let out = bed.from_pod(&direct)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, delivered_to(CLIENT, direct))
    );
    Ok(())
}

/// Only what pods send through the stack is recorded: answers to a pod's traffic
/// from the world and the node's own connections (from its address, or from its
/// overlay address inside the pod CIDR) leave no entry, since their answers go to
/// the stack anyway; a pod of another node reaching a pod here through the stack (a
/// hostPort on the overlay address) is recorded like a pod of this node.
#[test]
fn only_flows_from_pods_are_recorded_as_forwarded_by_the_stack() -> Result<()> {
    let bed = node_testbed()?;
    let pod = sock(BACKENDS[0], 8080);
    for source in [Ipv4Addr::new(203, 0, 113, 10), NODE_IP, OVERLAY_IP] {
        let frame = frames::tcp_syn(sock(source, 40000), pod, b"");
        let out = bed.run_program(program_names::TO_POD, &frame, 1)?.0;
        assert_eq!((out.verdict, out.frame), (TC_ACT_OK, frame));
    }
    assert_eq!(bed.conntrack_keys()?, []);
    let remote = sock(Ipv4Addr::new(10, 244, 1, 7), 40000);
    bed.run_program(program_names::TO_POD, &frames::tcp_syn(remote, pod, b""), 1)?;
    assert_eq!(bed.conntrack_keys()?, [ct_key(pod, remote, PROTO_TCP)]);
    Ok(())
}

/// A pod reaching a pod straight from the client port of its live hostPort flow to
/// that pod gets another client port (the two flows' answers are told apart, as
/// Linux NAT remaps clashing tuples: `port_remapped`); once the hostPort flow is
/// closing, the direct flow takes the tuple over (`ct_reopened`) and is delivered
/// untouched. A new hostPort connection on a closing flow's tuple opens it again.
#[test]
fn a_direct_flow_on_a_tuple_the_stack_forwarded_gets_its_own_port_until_that_flow_closes(
) -> Result<()> {
    let bed = node_testbed()?;
    let pod = sock(BACKENDS[0], 8080);
    let through_stack = |client| -> Result<()> {
        let out = bed.run_program(program_names::TO_POD, &frames::tcp_syn(client, pod, b""), 1)?;
        assert_eq!(out.0.verdict, TC_ACT_OK);
        Ok(())
    };
    let close = |client| -> Result<()> {
        assert_eq!(
            bed.from_pod(&frames::tcp_fin(pod, client))?.verdict,
            TC_ACT_OK
        );
        Ok(())
    };

    let live = sock(CLIENT, 40002);
    through_stack(live)?;
    let out = bed.from_pod(&frames::tcp_syn(live, pod, b""))?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let seen = decode_checked(&out.frame)?;
    assert_eq!(seen.destination, pod);
    assert!(seen.source.port() >= SNAT_PORT_MIN, "{seen:?}");
    assert_eq!(bed.counter(stat::PORT_REMAPPED)?, 1);

    let closed = sock(CLIENT, 40003);
    through_stack(closed)?;
    close(closed)?;
    let syn = frames::tcp_syn(closed, pod, b"");
    let out = bed.from_pod(&syn)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, delivered_to(*pod.ip(), syn))
    );
    assert_eq!(bed.counter(stat::CT_REOPENED)?, 1);
    assert_eq!(bed.conntrack(&ct_key(pod, closed, PROTO_TCP))?, None);
    let answer = frames::tcp_ack(pod, closed, b"");
    let out = bed.from_pod(&answer)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, delivered_to(CLIENT, answer))
    );

    let again = sock(CLIENT, 40004);
    through_stack(again)?;
    close(again)?;
    let key = ct_key(pod, again, PROTO_TCP);
    assert_eq!(
        bed.conntrack(&key)?.map(|e| e.flags),
        Some(CT_FLAG_VIA_STACK | CT_FLAG_CLOSING)
    );
    through_stack(again)?;
    // Open again, as a new connection: its handshake not completed yet.
    assert_eq!(
        bed.conntrack(&key)?.map(|e| e.flags),
        Some(CT_FLAG_VIA_STACK | CT_FLAG_UNESTABLISHED)
    );
    Ok(())
}

#[test]
fn a_spoofed_source_is_dropped_and_counted() -> Result<()> {
    let mut bed = testbed()?;
    // Not a pod of this node at all.
    let stranger = frames::tcp_syn(sock(Ipv4Addr::new(10, 244, 0, 99), 1), sock(VIP, 80), b"");
    assert_eq!(bed.from_pod(&stranger)?.verdict, TC_ACT_SHOT);
    // Another pod's IP, sent from a veth that is not that pod's.
    bed.add_endpoint(Ipv4Addr::new(10, 244, 0, 50), 4242)?;
    let impostor = frames::tcp_syn(sock(Ipv4Addr::new(10, 244, 0, 50), 1), sock(VIP, 80), b"");
    assert_eq!(bed.from_pod(&impostor)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 2);
    assert_eq!(bed.counter(stat::SERVICE_NEW_FLOW)?, 0);
    Ok(())
}

/// Established flows keep where their packets go (the pod's veth and MACs) and that
/// their source was checked in their conntrack entries, so they skip the endpoint
/// lookups. A change to the endpoints reaches them when the agent moves the route
/// epoch on (its last write after any endpoint or route change), not before.
#[test]
fn established_flows_follow_endpoint_changes_once_the_route_epoch_moves() -> Result<()> {
    let mut bed = testbed()?;
    let client = sock(CLIENT, 40001);
    let out = bed.from_pod(&frames::tcp_syn(client, sock(VIP, 80), b""))?;
    let backend = backend_of(&out.frame);
    let ack = frames::tcp_ack(client, sock(VIP, 80), b"data");
    let to_backend = frames::tcp_ack(client, sock(backend, 8080), b"data");
    assert_eq!(
        bed.from_pod(&ack)?.frame,
        delivered_to(backend, to_backend.clone())
    );
    let reply = frames::tcp_ack(sock(backend, 8080), client, b"answer");
    let to_client = delivered_to(CLIENT, frames::tcp_ack(sock(VIP, 80), client, b"answer"));
    assert_eq!(bed.from_pod(&reply)?.frame, to_client);

    // The backend pod is re-wired behind another veth (another gateway MAC): the
    // flow's cached delivery holds until the epoch moves, then follows.
    let new_gateway = [0xdd; 6];
    bed.set_endpoint(backend, TEST_RUN_IFINDEX, new_gateway)?;
    assert_eq!(
        bed.from_pod(&ack)?.frame,
        delivered_to(backend, to_backend.clone())
    );
    bed.bump_route_epoch()?;
    let mut rewired = delivered_to(backend, to_backend);
    rewired[6..12].copy_from_slice(&new_gateway);
    assert_eq!(bed.from_pod(&ack)?.frame, rewired);

    // The backend's IP now belongs to another veth: its replies from this one were
    // checked before (at this epoch), and are refused once the epoch moves.
    assert_eq!(bed.from_pod(&reply)?.frame, to_client);
    bed.set_endpoint(backend, 4242, new_gateway)?;
    assert_eq!(bed.from_pod(&reply)?.frame, to_client);
    bed.bump_route_epoch()?;
    assert_eq!(bed.from_pod(&reply)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 1);
    Ok(())
}

/// kube-proxy's REJECT: a new flow to a Service without ready backends is answered at
/// once with ICMP port unreachable (the client's connect fails with ECONNREFUSED
/// instead of waiting for its timeout), built in place and sent back into the pod; a
/// small datagram grows to the error's size.
#[test]
fn a_service_without_ready_backends_refuses_new_flows_with_port_unreachable() -> Result<()> {
    let mut bed = testbed()?;
    let empty = Ipv4Addr::new(10, 96, 0, 99);
    bed.add_service(sock(empty, 80), PROTO_TCP, 3, 100, &[])?;
    bed.add_service(sock(empty, 53), PROTO_UDP, 4, 101, &[])?;
    let syn = frames::tcp_syn(sock(CLIENT, 1), sock(empty, 80), b"");
    let out = bed.from_pod(&syn)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, frames::icmp_unreachable_for(&syn, 3, 0)?)
    );
    let query = frames::udp(sock(CLIENT, 2), sock(empty, 53), b"q");
    let out = bed.from_pod(&query)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, frames::icmp_unreachable_for(&query, 3, 0)?)
    );
    assert_eq!(bed.counter(stat::SERVICE_REJECTED)?, 2);
    assert_eq!(bed.counter(stat::DROP_NO_BACKEND)?, 0);
    Ok(())
}

/// kube-proxy's behaviour for a Service's closed target port: the backend's ICMP
/// error about a translated packet reaches the client translated back like the
/// flow's replies, so its connected UDP socket gets ECONNREFUSED (untranslated, the
/// error names the backend, which no socket of the client talks to, and the client
/// waits for its timeout). Exact bytes: what the client gets is the error the Service
/// address would send about what the client sent: the source, the quoted
/// destination and port, and every checksum (the IP header's, the quoted IP
/// header's, the quoted UDP or TCP checksum, the ICMP checksum) as if built afresh.
#[test]
fn icmp_errors_of_translated_flows_are_translated_back_for_the_client() -> Result<()> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
    let bed = testbed()?;
    // UDP, port unreachable quoting 8 bytes of the datagram (RFC 792's minimum).
    let query = frames::udp(sock(CLIENT, 5000), sock(VIP, 53), b"query");
    let delivered = bed.from_pod(&query)?.frame;
    let backend = backend_of(&delivered);
    let error = frames::icmp_unreachable_for(&delivered, 3, 0)?;
    let out = bed.from_pod(&error)?;
    assert_eq!(
        (out.verdict, out.frame),
        (
            TC_ACT_REDIRECT,
            delivered_to(CLIENT, frames::icmp_unreachable_for(&query, 3, 0)?)
        )
    );
    // TCP, fragmentation needed quoting the whole segment, its checksum included (as
    // Linux quotes, up to 576 bytes).
    let syn = frames::tcp_syn(sock(CLIENT, 40100), sock(VIP, 80), b"hello");
    let delivered = bed.from_pod(&syn)?.frame;
    let frag_needed = || {
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        })
    };
    let quoted = delivered.len() - 14;
    let error = frames::icmp_error_for(&delivered, frag_needed(), quoted)?;
    let out = bed.from_pod(&error)?;
    assert_eq!(
        (out.verdict, out.frame),
        (
            TC_ACT_REDIRECT,
            delivered_to(CLIENT, frames::icmp_error_for(&syn, frag_needed(), quoted)?)
        )
    );
    // A UDP datagram without checksum: the quoted checksum stays 0.
    let bare = frames::udp_without_checksum(sock(CLIENT, 5001), sock(VIP, 53), b"q");
    let delivered = bed.from_pod(&bare)?.frame;
    let out = bed.from_pod(&frames::icmp_unreachable_for(&delivered, 3, 0)?)?;
    assert_eq!(
        out.frame,
        delivered_to(CLIENT, frames::icmp_unreachable_for(&bare, 3, 0)?)
    );
    assert_eq!(bed.counter(stat::ICMP_ERROR_REVERSE_NAT)?, 3);

    // Not translated: an error about no flow conntrack knows, and one a pod sends
    // about a flow it is not the backend of (its source is not the quoted
    // destination): both go as they are.
    let other = BACKENDS.iter().copied().find(|b| *b != backend).unwrap();
    let unknown = frames::udp(sock(CLIENT, 5999), sock(other, 5353), b"direct");
    let forged_about = frames::udp(sock(CLIENT, 5000), sock(backend, 5353), b"query");
    for error in [
        frames::icmp_unreachable_for(&delivered_to(other, unknown), 3, 0)?,
        {
            let mut forged = frames::icmp_unreachable_for(&forged_about, 3, 0)?;
            forged[26..30].copy_from_slice(&other.octets());
            let (mut ip, rest) = etherparse::Ipv4Header::from_slice(&forged[14..])?;
            ip.header_checksum = ip.calc_header_checksum();
            [&forged[..14], &ip.to_bytes()[..], rest].concat()
        },
    ] {
        let out = bed.from_pod(&error)?;
        assert_eq!(
            (out.verdict, out.frame),
            (TC_ACT_REDIRECT, delivered_to(CLIENT, error))
        );
    }
    assert_eq!(bed.counter(stat::ICMP_ERROR_REVERSE_NAT)?, 3);
    Ok(())
}

/// A flow SNATed on the way (a pod balanced to itself, hairpin: SNATed to
/// 169.254.42.1): the error its backend sends to the SNAT address goes back to the
/// client, its quoted source and port restored too.
#[test]
fn an_icmp_error_of_a_snated_flow_goes_back_to_the_client_it_was_snated_from() -> Result<()> {
    let mut bed = testbed()?;
    let itself = Ipv4Addr::new(10, 96, 0, 20);
    bed.add_service(sock(itself, 53), PROTO_UDP, 9, 90, &[sock(CLIENT, 5353)])?;
    let query = frames::udp(sock(CLIENT, 5002), sock(itself, 53), b"me?");
    let delivered = bed.from_pod(&query)?.frame;
    assert_eq!(
        *decode_checked(&delivered)?.source.ip(),
        ferrite_common::HAIRPIN_IP
    );
    let out = bed.from_pod(&frames::icmp_unreachable_for(&delivered, 3, 0)?)?;
    assert_eq!(
        (out.verdict, out.frame),
        (
            TC_ACT_REDIRECT,
            delivered_to(CLIENT, frames::icmp_unreachable_for(&query, 3, 0)?)
        )
    );
    Ok(())
}

/// A Service whose backend is a node address (a host-network endpoint, as the
/// `kubernetes` Service's): the node's stack answers a closed port with ICMP, which
/// it delivers to the pod through its veth, where `ferrite_to_pod` translates it back.
#[test]
fn an_icmp_error_of_a_host_network_backend_is_translated_on_its_way_to_the_pod() -> Result<()> {
    let mut bed = node_testbed()?;
    let api = Ipv4Addr::new(10, 96, 0, 21);
    bed.add_service(sock(api, 53), PROTO_UDP, 9, 90, &[sock(NODE_IP, 9443)])?;
    let query = frames::udp(sock(CLIENT, 5003), sock(api, 53), b"api?");
    let out = bed.from_pod(&query)?;
    // Into the stack, to the node's socket.
    assert_eq!(out.verdict, TC_ACT_OK);
    let error = frames::icmp_unreachable_for(&out.frame, 3, 0)?;
    let out = bed.run_program(program_names::TO_POD, &error, 1)?.0;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_OK, frames::icmp_unreachable_for(&query, 3, 0)?)
    );
    Ok(())
}

/// A router lets a packet expire when its TTL is 0 or 1; the datapath forwards
/// without decrementing, so it drops what it would hand to a pod or send over the
/// overlay with such a TTL (`drop_ttl_exceeded`): pod to pod, through a ClusterIP,
/// established or new, to another node. What goes to the stack is left to it (it
/// decrements TTL and answers "time exceeded").
#[test]
fn packets_the_datapath_forwards_with_ttl_one_or_zero_are_dropped() -> Result<()> {
    let mut bed = node_testbed()?;
    // An overlay device to send the other node's pod's packets to.
    bed.update_config(|config| config.vxlan_ifindex = 1)?;
    let pod = frames::udp(sock(CLIENT, 6000), sock(BACKENDS[1], 5353), b"ttl");
    let service = frames::udp(sock(CLIENT, 6001), sock(VIP, 53), b"ttl");
    let remote = frames::udp(
        sock(CLIENT, 6002),
        sock(Ipv4Addr::new(10, 244, 1, 9), 5353),
        b"ttl",
    );
    let world = frames::udp(
        sock(CLIENT, 6003),
        sock(Ipv4Addr::new(192, 0, 2, 1), 53),
        b"ttl",
    );
    // TTL 2 goes on (and is not decremented: a known limit).
    for frame in [&pod, &service, &remote] {
        let two = frames::with_ttl(frame, 2)?;
        let out = bed.from_pod(&two)?;
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "{two:02x?}");
        assert_eq!(out.frame[22], 2);
    }
    let mut dropped = 0;
    for ttl in [1, 0] {
        for frame in [&pod, &service, &remote] {
            let expiring = frames::with_ttl(frame, ttl)?;
            let out = bed.from_pod(&expiring)?;
            assert_eq!(out.verdict, TC_ACT_SHOT, "TTL {ttl}: {expiring:02x?}");
            dropped += 1;
        }
        let expiring = frames::with_ttl(&world, ttl)?;
        let out = bed.from_pod(&expiring)?;
        assert_eq!((out.verdict, out.frame), (TC_ACT_OK, expiring));
    }
    // The direct pod-to-pod frame left untouched, the Service's translated.
    let expiring = frames::with_ttl(&pod, 1)?;
    assert_eq!(bed.from_pod(&expiring)?.frame, expiring);
    dropped += 1;
    assert_eq!(bed.counter(stat::DROP_TTL_EXCEEDED)?, dropped);
    Ok(())
}

/// Conntrack knows when a TCP flow completed its handshake: both entries of a new
/// flow are `CT_FLAG_UNESTABLISHED` until the client sends a segment with ACK (not
/// SYN or RST) after the backend answered; the backend's SYN-ACK alone (which a
/// spoofed SYN gets too), a client's ACK before any answer, and a client's RST
/// complete nothing. What conntrack GC's SYN lifetime and the SNAT port takeover
/// go by.
#[test]
fn a_tcp_flow_is_established_once_its_client_acknowledges_the_backends_answer() -> Result<()> {
    let bed = testbed()?;
    let client = sock(CLIENT, 40200);
    let out = bed.from_pod(&frames::tcp_syn(client, sock(VIP, 80), b""))?;
    let backend = sock(backend_of(&out.frame), 8080);
    let flags = |from, to| -> Result<u16> {
        Ok(bed
            .conntrack(&ct_key(from, to, PROTO_TCP))?
            .expect("entry")
            .flags)
    };
    let both = || -> Result<[u16; 2]> {
        Ok([
            flags(client, sock(VIP, 80))?,
            flags(backend, client)? & !ferrite_common::CT_FLAG_REPLY,
        ])
    };
    let unestablished = [CT_FLAG_UNESTABLISHED; 2];
    assert_eq!(both()?, unestablished);
    bed.from_pod(&frames::tcp_ack(client, sock(VIP, 80), b""))?;
    assert_eq!(both()?, unestablished, "an ACK before any answer");
    bed.from_pod(&frames::tcp_syn_ack(backend, client))?;
    assert_eq!(both()?, unestablished, "the backend's SYN-ACK");
    bed.from_pod(&frames::tcp_ack(client, sock(VIP, 80), b""))?;
    assert_eq!(both()?, [0, 0], "the client's ACK of it");

    // A refused connection: the backend's RST, the client's: still half-open.
    let refused = sock(CLIENT, 40201);
    let out = bed.from_pod(&frames::tcp_syn(refused, sock(VIP, 80), b""))?;
    let backend = sock(backend_of(&out.frame), 8080);
    bed.from_pod(&frames::tcp_rst(backend, refused))?;
    bed.from_pod(&frames::tcp_rst(refused, sock(VIP, 80)))?;
    let entry = bed
        .conntrack(&ct_key(refused, sock(VIP, 80), PROTO_TCP))?
        .expect("entry");
    assert_eq!(entry.flags, CT_FLAG_UNESTABLISHED | CT_FLAG_CLOSING);
    // UDP flows have no handshake.
    bed.from_pod(&frames::udp(sock(CLIENT, 5004), sock(VIP, 53), b"q"))?;
    let entry = bed
        .conntrack(&ct_key(sock(CLIENT, 5004), sock(VIP, 53), PROTO_UDP))?
        .expect("entry");
    assert_eq!(entry.flags, 0);
    Ok(())
}

/// The documented rules for bad input (see datapath-ebpf/src/headers.rs).
#[test]
fn malformed_frames_get_the_documented_verdict_and_counter() -> Result<()> {
    let bed = testbed()?;
    let good = frames::tcp_syn(sock(CLIENT, 40000), sock(VIP, 80), b"payload");
    let mut cases: Vec<(&str, Vec<u8>, u32, u32)> = Vec::new();

    // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than Ethernet + 20 bytes, so a
    // truncated header is fed as one whose IHL claims more than the frame holds.
    let mut truncated_header = good[..40].to_vec();
    truncated_header[14] = 0x4f; // IHL 15: 60 bytes of header in a 26-byte packet
    cases.push((
        "truncated IPv4 header",
        truncated_header,
        TC_ACT_SHOT,
        stat::DROP_MALFORMED,
    ));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    cases.push(("IHL 4", bad_ihl, TC_ACT_SHOT, stat::DROP_MALFORMED));
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    cases.push((
        "IP version 6 in an IPv4 frame",
        bad_version,
        TC_ACT_SHOT,
        stat::DROP_MALFORMED,
    ));
    let mut too_long = good.clone();
    too_long[16..18].copy_from_slice(&1500u16.to_be_bytes());
    cases.push((
        "total length beyond the frame",
        too_long,
        TC_ACT_SHOT,
        stat::DROP_MALFORMED,
    ));
    let mut cut_tcp = good[..14 + 20 + 10].to_vec();
    cut_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push((
        "TCP header cut short",
        cut_tcp,
        TC_ACT_SHOT,
        stat::DROP_MALFORMED,
    ));
    let mut ipv6 = good.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    cases.push(("IPv6", ipv6, TC_ACT_SHOT, stat::DROP_UNSUPPORTED_L3));
    let mut arp = good[..14].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend([0u8; 28]);
    cases.push(("ARP", arp, TC_ACT_OK, stat::PASSED_ARP));
    // A later fragment to the VIP whose first fragment was never seen has no ports:
    // never DNATed.
    let (_, later) = frames::fragment(
        &frames::udp(sock(CLIENT, 7), sock(VIP, 53), &[1; 32]),
        16,
        9,
    )?;
    cases.push((
        "later fragment to a Service, first never seen",
        later,
        TC_ACT_OK,
        stat::FRAGMENT_ROUTED,
    ));

    for (name, frame, verdict, counter) in cases {
        let before = bed.counter(counter)?;
        let out = bed.from_pod(&frame)?;
        assert_eq!(out.verdict, verdict, "{name}: verdict");
        assert_eq!(
            bed.counter(counter)?,
            before + 1,
            "{name}: counter {}",
            stat::NAMES[counter as usize]
        );
        if verdict == TC_ACT_OK {
            assert_eq!(out.frame, frame, "{name}: passed frames are not modified");
        }
    }
    assert_eq!(
        bed.counter(stat::SERVICE_NEW_FLOW)?,
        0,
        "nothing malformed was load-balanced"
    );
    Ok(())
}

/// The node of `testbed` as the reference model of the documented rules sees it.
fn model() -> NodeModel {
    let frontend = |port, proto, backend_port| Frontend {
        address: VIP,
        port,
        proto,
        backends: BACKENDS.iter().map(|ip| sock(*ip, backend_port)).collect(),
    };
    NodeModel {
        pods: [&[CLIENT][..], &BACKENDS].concat(),
        frontends: vec![frontend(80, PROTO_TCP, 8080), frontend(53, PROTO_UDP, 5353)],
    }
}

/// Random frames and mutations of a valid one (fixed seed), each given the one verdict
/// the documented rules give it (the reference model of `verdict_model`, which the
/// fuzz test shares): the verdict, the frame that comes out, and every counter the
/// model knows moved by exactly what the model says, frame by frame.
#[test]
fn random_garbage_gets_the_documented_verdict_and_counters_frame_by_frame() -> Result<()> {
    let bed = testbed()?;
    let model = model();
    let mut fragments = Fragments::new();
    let mut expected_counts: BTreeMap<u32, u64> = FROM_POD_COUNTERS
        .iter()
        .map(|counter| (*counter, 0))
        .collect();
    let mut verdicts: BTreeMap<Expected, u32> = BTreeMap::new();
    let good = frames::tcp_syn(sock(CLIENT, 40000), sock(VIP, 80), b"0123456789");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..2000 {
        let mut frame = if i % 2 == 0 {
            // Mutations of a valid frame: flip bytes in its headers.
            let mut f = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % 54;
                f[at] = next() as u8;
            }
            f
        } else {
            // The kernel refuses shorter frames for test runs (see above).
            let len = 60 + (next() as usize % 100);
            (0..len).map(|_| next() as u8).collect()
        };
        if i % 3 == 0 {
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        }
        let (expected, counters) = model.from_pod(&frame, &mut fragments);
        *verdicts.entry(expected).or_default() += 1;
        let out = bed.from_pod(&frame)?;
        assert!(
            model.from_pod_output_fits(expected, &frame, &out),
            "frame {i}: expected {expected:?}, got verdict {} and {:02x?} from {frame:02x?}",
            out.verdict,
            out.frame
        );
        for counter in counters {
            *expected_counts.entry(counter).or_default() += 1;
        }
        for (counter, count) in &expected_counts {
            assert_eq!(
                bed.counter(*counter)?,
                *count,
                "frame {i} ({expected:?}): counter {}",
                stat::NAMES[*counter as usize]
            );
        }
    }
    // The frames reach past the first checks: each of these rules decided some.
    for rule in [
        Expected::Drop(stat::DROP_UNSUPPORTED_L3),
        Expected::Drop(stat::DROP_MALFORMED),
        Expected::Drop(stat::DROP_SPOOFED),
        Expected::Pass(Some(stat::PASSED_TO_STACK)),
        Expected::Deliver { translated: true },
    ] {
        assert!(verdicts.contains_key(&rule), "{rule:?} never: {verdicts:?}");
    }
    Ok(())
}
