//! The uplink's XDP program, packet by packet (BPF_PROG_TEST_RUN): frames from the
//! world go in, the exact frame and verdict come out, checksums recomputed
//! independently; and the uplink's tcx program doing the same without XDP. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use ferrite_common::{
    config_flag, program_names, stat, svc_flag, MaglevTable, MAGLEV_TABLE_SIZE, PROTO_TCP,
    PROTO_UDP, SNAT_PORT_MAX, SNAT_PORT_MIN,
};
use ferrite_tests::{
    frames::{self, decode_checked},
    testbed::{
        Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS,
    },
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40000);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const LOCAL_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30080);
const REMOTE_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30081);
const LB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 100), 80);
const EMPTY_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30090);
const LOCAL_ONLY_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30091);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A node whose NodePort 30080 (TCP and UDP) has a backend on this node, 30081 one on
/// another node, 30090 none, 30091 is `externalTrafficPolicy: Local` without a local
/// backend, and a LoadBalancer IP admits 203.0.113.0/24 only.
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.set_node_ip(NODE_IP)?;
    bed.add_endpoint(LOCAL_BACKEND, TEST_RUN_IFINDEX)?;
    let node_port = svc_flag::EXTERNAL | svc_flag::NODE_PORT;
    for (frontend, rev_nat, first_id, backends, flags) in [
        (
            LOCAL_NODE_PORT,
            1,
            1,
            vec![sock(LOCAL_BACKEND, 8080)],
            node_port,
        ),
        (
            REMOTE_NODE_PORT,
            2,
            3,
            vec![sock(REMOTE_BACKEND, 8080)],
            node_port,
        ),
        (EMPTY_NODE_PORT, 3, 5, vec![], node_port),
        (
            LOCAL_ONLY_NODE_PORT,
            4,
            7,
            vec![],
            node_port | svc_flag::LOCAL_ONLY,
        ),
        (
            LB,
            5,
            9,
            vec![sock(LOCAL_BACKEND, 8080)],
            svc_flag::EXTERNAL | svc_flag::SOURCE_RANGES,
        ),
    ] {
        for protocol in [PROTO_TCP, PROTO_UDP] {
            bed.add_service(frontend, protocol, rev_nat, first_id, &backends)?;
            bed.set_service_flags(frontend, protocol, flags)?;
        }
    }
    bed.add_source_range(LB, PROTO_TCP, Ipv4Addr::new(203, 0, 113, 0), 24)?;
    Ok(bed)
}

#[test]
fn a_nodeport_with_a_local_backend_is_dnated_in_xdp_and_keeps_the_client() -> Result<()> {
    let bed = testbed()?;
    for (request, expected) in [
        (
            frames::tcp_syn(CLIENT, LOCAL_NODE_PORT, b""),
            frames::tcp_syn(CLIENT, sock(LOCAL_BACKEND, 8080), b""),
        ),
        (
            frames::tcp_ack(CLIENT, LOCAL_NODE_PORT, b"GET /"),
            frames::tcp_ack(CLIENT, sock(LOCAL_BACKEND, 8080), b"GET /"),
        ),
        (
            frames::udp(CLIENT, LOCAL_NODE_PORT, b"query"),
            frames::udp(CLIENT, sock(LOCAL_BACKEND, 8080), b"query"),
        ),
    ] {
        let out = bed.from_world(&request)?;
        // Passed on translated: the uplink's TC program delivers it.
        assert_eq!(out.verdict, XDP_PASS);
        assert_eq!(out.frame, expected);
        decode_checked(&out.frame)?;
    }
    assert_eq!(bed.counter(stat::EXTERNAL_NEW_FLOW)?, 2); // TCP and UDP flows
    assert_eq!(bed.counter(stat::SERVICE_ESTABLISHED)?, 1);
    Ok(())
}

#[test]
fn a_nodeport_with_a_remote_backend_is_snated_to_the_node_from_its_port_range() -> Result<()> {
    let bed = testbed()?;
    let syn = bed.from_world(&frames::tcp_syn(CLIENT, REMOTE_NODE_PORT, b""))?;
    assert_eq!(syn.verdict, XDP_PASS);
    let decoded = decode_checked(&syn.frame)?;
    assert_eq!(decoded.destination, sock(REMOTE_BACKEND, 8080));
    assert_eq!(*decoded.source.ip(), NODE_IP);
    let port = decoded.source.port();
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port), "{port}");
    // Byte for byte the client's SYN, re-addressed.
    let expected = frames::tcp_syn(sock(NODE_IP, port), sock(REMOTE_BACKEND, 8080), b"");
    assert_eq!(syn.frame, expected);
    // The rest of the flow keeps the same translation.
    let data = bed.from_world(&frames::tcp_ack(CLIENT, REMOTE_NODE_PORT, b"payload"))?;
    let expected = frames::tcp_ack(sock(NODE_IP, port), sock(REMOTE_BACKEND, 8080), b"payload");
    assert_eq!(data.frame, expected);
    // Another client gets another port.
    let other = sock(*CLIENT.ip(), 40001);
    let second = bed.from_world(&frames::tcp_syn(other, REMOTE_NODE_PORT, b""))?;
    assert_ne!(decode_checked(&second.frame)?.source.port(), port);
    assert_eq!(bed.counter(stat::EXTERNAL_SNAT)?, 2);
    Ok(())
}

#[test]
fn the_reply_of_a_local_backend_is_translated_back_to_the_nodeport_and_the_client() -> Result<()> {
    let bed = testbed()?;
    bed.from_world(&frames::tcp_syn(CLIENT, LOCAL_NODE_PORT, b""))?;
    let reply = frames::tcp_ack(sock(LOCAL_BACKEND, 8080), CLIENT, b"200 OK");
    let out = bed.from_pod(&reply)?;
    // The IP packet is the backend's answer from the NodePort, checksums valid. The
    // Ethernet header and the verdict come from the kernel's FIB (the uplink and its
    // next hop), which a test run cannot consult for a real node: the end-to-end
    // tests show those replies reach the world.
    let expected = frames::tcp_ack(LOCAL_NODE_PORT, CLIENT, b"200 OK");
    assert_eq!(out.frame[12..], expected[12..]);
    decode_checked(&out.frame)?;
    assert_ne!(out.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::EXTERNAL_REPLY)?, 1);
    Ok(())
}

#[test]
fn load_balancer_source_ranges_drop_and_count_other_clients() -> Result<()> {
    let bed = testbed()?;
    let allowed = bed.from_world(&frames::tcp_syn(CLIENT, LB, b""))?;
    assert_eq!(allowed.verdict, XDP_PASS);
    assert_eq!(
        decode_checked(&allowed.frame)?.destination,
        sock(LOCAL_BACKEND, 8080)
    );
    let stranger = sock(Ipv4Addr::new(192, 0, 2, 55), 40000);
    let denied = bed.from_world(&frames::tcp_syn(stranger, LB, b""))?;
    assert_eq!(denied.verdict, XDP_DROP);
    assert_eq!(bed.counter(stat::DROP_SOURCE_RANGE)?, 1);
    Ok(())
}

#[test]
fn without_backends_a_nodeport_goes_to_the_stack_and_local_policy_drops() -> Result<()> {
    let bed = testbed()?;
    // No backend at all: untouched to the stack, which answers RST / port unreachable.
    let syn = frames::tcp_syn(CLIENT, EMPTY_NODE_PORT, b"");
    let out = bed.from_world(&syn)?;
    assert_eq!((out.verdict, &out.frame), (XDP_PASS, &syn));
    assert_eq!(bed.counter(stat::NODEPORT_REJECTED)?, 1);
    // externalTrafficPolicy: Local without a local backend: dropped and counted.
    let out = bed.from_world(&frames::udp(CLIENT, LOCAL_ONLY_NODE_PORT, b"q"))?;
    assert_eq!(out.verdict, XDP_DROP);
    assert_eq!(bed.counter(stat::DROP_NO_LOCAL_BACKEND)?, 1);
    Ok(())
}

#[test]
fn malformed_and_foreign_frames_pass_untouched() -> Result<()> {
    let bed = testbed()?;
    let good = frames::tcp_syn(CLIENT, LOCAL_NODE_PORT, b"");
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("only an ethernet header", good[..14].to_vec()),
        ("cut in the IP header", good[..20].to_vec()),
        ("cut in the TCP header", good[..40].to_vec()),
    ];
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    cases.push(("IHL 3", bad_ihl));
    let mut too_long = good.clone();
    too_long[16..18].copy_from_slice(&1500u16.to_be_bytes());
    cases.push(("total length beyond the frame", too_long));
    let datagram = frames::udp(CLIENT, LOCAL_NODE_PORT, &[1; 32]);
    let (_, later) = frames::fragment(&datagram, 16, 7)?;
    cases.push(("later fragment, first never seen", later));
    let mut ipv6 = good.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    cases.push(("IPv6", ipv6));
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    cases.push(("ARP", arp));
    let mut icmp = good.clone();
    icmp[23] = 1;
    cases.push(("ICMP to the node", icmp));
    for (what, frame) in cases {
        let out = bed.from_world(&frame).with_context(|| what.to_string())?;
        assert_eq!(out.verdict, XDP_PASS, "{what}");
        assert_eq!(out.frame, frame, "{what}: changed");
    }
    assert_eq!(bed.counter(stat::EXTERNAL_NEW_FLOW)?, 0);
    assert!(bed.drops()?.is_empty(), "{:?}", bed.drops()?);
    Ok(())
}

/// `frame` with the IPv4 Don't Fragment flag cleared (IP checksum fixed).
fn without_df(frame: &[u8]) -> Result<Vec<u8>> {
    let (mut ip, rest) = etherparse::Ipv4Header::from_slice(&frame[14..])?;
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    Ok([&frame[..14], &ip.to_bytes()[..], rest].concat())
}

/// The ICMP "fragmentation needed" a router sends back for `frame`.
fn frag_needed_for(frame: &[u8], mtu: u16) -> Result<Vec<u8>> {
    frames::icmp_unreachable_for(frame, 4, mtu)
}

/// What the uplink does with `frame`: XDP first, then (if it passed) the tcx program.
fn through_the_uplink(bed: &Testbed, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let xdp = bed.from_world(frame)?;
    if xdp.verdict != XDP_PASS {
        return Ok((xdp.verdict, xdp.frame));
    }
    let (tc, _) = bed.run_program(program_names::FROM_UPLINK, &xdp.frame, 1)?;
    Ok((tc.verdict, tc.frame))
}

#[test]
fn a_df_packet_larger_than_pods_take_is_answered_with_fragmentation_needed() -> Result<()> {
    const POD_MTU: u16 = 1450;
    let mut bed = testbed()?;
    bed.set_pod_mtu(POD_MTU)?;
    let payload_fitting = vec![7u8; POD_MTU as usize - 28];
    let payload_over = vec![7u8; POD_MTU as usize - 28 + 1];

    // A new flow, one byte over, DF set (etherparse sets it, as Linux does for UDP):
    // XDP leaves it as it is, the tcx program turns it into the ICMP error and sends
    // it back out of the uplink.
    let big = frames::udp(CLIENT, LOCAL_NODE_PORT, &payload_over);
    let xdp = bed.from_world(&big)?;
    assert_eq!((xdp.verdict, &xdp.frame), (XDP_PASS, &big));
    assert_eq!(
        through_the_uplink(&bed, &big)?,
        (TC_ACT_REDIRECT, frag_needed_for(&big, POD_MTU)?)
    );
    // Exactly the MTU passes XDP translated.
    let fits = frames::udp(CLIENT, LOCAL_NODE_PORT, &payload_fitting);
    let out = bed.from_world(&fits)?;
    assert_eq!(out.verdict, XDP_PASS);
    assert_eq!(
        out.frame,
        frames::udp(CLIENT, sock(LOCAL_BACKEND, 8080), &payload_fitting)
    );
    // Without DF, one byte over is forwarded, translated (fragmented on the way).
    let out = bed.from_world(&without_df(&big)?)?;
    assert_eq!(out.verdict, XDP_PASS);
    let expected = frames::udp(CLIENT, sock(LOCAL_BACKEND, 8080), &payload_over);
    assert_eq!(out.frame, without_df(&expected)?);

    // An established flow to a remote backend: the error quotes what the client sent,
    // not the SNATed packet.
    let first = bed.from_world(&frames::udp(CLIENT, REMOTE_NODE_PORT, b"hello"))?;
    assert_eq!(
        decode_checked(&first.frame)?.destination.ip(),
        &REMOTE_BACKEND
    );
    let big = frames::udp(CLIENT, REMOTE_NODE_PORT, &payload_over);
    assert_eq!(
        through_the_uplink(&bed, &big)?,
        (TC_ACT_REDIRECT, frag_needed_for(&big, POD_MTU)?)
    );
    // Big DF packets to anything else (the node itself) are none of its business.
    let to_node = frames::udp(CLIENT, sock(NODE_IP, 22), &payload_over);
    assert_eq!(through_the_uplink(&bed, &to_node)?, (TC_ACT_OK, to_node));
    assert_eq!(bed.counter(stat::ICMP_FRAG_NEEDED)?, 2);
    Ok(())
}

/// An uplink without XDP (a veth: `--xdp auto`): its tcx program balances external
/// traffic itself, giving byte for byte the frame and verdict that XDP followed by
/// the tcx program give: DNAT to a local backend, DNAT+SNAT to a remote one, the
/// established flow, refusal without backends, the local-policy drop, and the node's
/// own traffic untouched.
#[test]
fn without_xdp_the_uplinks_tcx_program_balances_external_traffic_exactly_as_xdp_does() -> Result<()>
{
    let xdp = testbed()?;
    let mut tc = testbed()?;
    tc.set_config_flags(config_flag::EXTERNAL_IN_TC)?;
    let frames = [
        frames::tcp_syn(CLIENT, LOCAL_NODE_PORT, b""),
        frames::tcp_ack(CLIENT, LOCAL_NODE_PORT, b"established"),
        frames::udp(CLIENT, REMOTE_NODE_PORT, b"remote"),
        frames::udp(CLIENT, REMOTE_NODE_PORT, b"remote again"),
        frames::tcp_syn(CLIENT, EMPTY_NODE_PORT, b""),
        frames::tcp_syn(CLIENT, LOCAL_ONLY_NODE_PORT, b""),
        frames::tcp_syn(CLIENT, sock(NODE_IP, 22), b""),
    ];
    for frame in &frames {
        let (via_xdp_verdict, via_xdp) = through_the_uplink(&xdp, frame)?;
        let (out, _) = tc.run_program(program_names::FROM_UPLINK, frame, 1)?;
        // XDP_DROP and TC_ACT_SHOT are the same verdict.
        let via_xdp_verdict = if via_xdp_verdict == XDP_DROP {
            TC_ACT_SHOT
        } else {
            via_xdp_verdict
        };
        assert_eq!(
            (out.verdict, &out.frame),
            (via_xdp_verdict, &via_xdp),
            "{frame:02x?}"
        );
    }
    for counter in [
        stat::EXTERNAL_NEW_FLOW,
        stat::EXTERNAL_SNAT,
        stat::SERVICE_ESTABLISHED,
        stat::NODEPORT_REJECTED,
        stat::DROP_NO_LOCAL_BACKEND,
    ] {
        assert_eq!(
            tc.counter(counter)?,
            xdp.counter(counter)?,
            "{}",
            stat::NAMES[counter as usize]
        );
        assert!(
            tc.counter(counter)? > 0,
            "{}",
            stat::NAMES[counter as usize]
        );
    }
    Ok(())
}

const MAGLEV_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30100);
/// The backends of `MAGLEV_NODE_PORT`, in slot order (slot 1 first), all on this node.
const MAGLEV_BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 21),
    Ipv4Addr::new(10, 244, 0, 22),
    Ipv4Addr::new(10, 244, 0, 23),
];
/// Source ports of the clients' flows: enough flows that `hash % 3` sends some of them
/// to every backend.
const MAGLEV_CLIENT_PORTS: std::ops::Range<u16> = 41000..41048;

/// A node whose NodePort 30100 (TCP) has three local backends and no Maglev table yet.
fn maglev_testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.set_node_ip(NODE_IP)?;
    let backends: Vec<_> = MAGLEV_BACKENDS.iter().map(|ip| sock(*ip, 8080)).collect();
    for backend in MAGLEV_BACKENDS {
        bed.add_endpoint(backend, TEST_RUN_IFINDEX)?;
    }
    bed.add_service(MAGLEV_NODE_PORT, PROTO_TCP, 1, 1, &backends)?;
    bed.set_service_flags(
        MAGLEV_NODE_PORT,
        PROTO_TCP,
        svc_flag::EXTERNAL | svc_flag::NODE_PORT,
    )?;
    Ok(bed)
}

/// A Maglev table whose entry i is owned by the backend slot `slot_of(i)`. Its digest
/// is the agent's change detection, which the datapath never reads.
fn maglev_table(slot_of: impl Fn(usize) -> u16) -> Box<MaglevTable> {
    let mut table = Box::new(MaglevTable {
        digest: 0,
        backend_slots: [0; MAGLEV_TABLE_SIZE],
        _pad: [0; 3],
    });
    for (entry, slot) in table.backend_slots.iter_mut().enumerate() {
        *slot = slot_of(entry);
    }
    table
}

/// The backend each client flow to `MAGLEV_NODE_PORT` gets as a new flow (conntrack
/// emptied first, so none of them is established), in client port order. Each SYN
/// must come out exactly DNATed to that backend.
fn backends_of_new_maglev_flows(bed: &mut Testbed) -> Result<Vec<Ipv4Addr>> {
    let established = bed.conntrack_keys()?;
    bed.remove_conntrack(&established)?;
    let mut backends = Vec::new();
    for port in MAGLEV_CLIENT_PORTS {
        let client = sock(*CLIENT.ip(), port);
        let new_flows = bed.counter(stat::EXTERNAL_NEW_FLOW)?;
        let out = bed.from_world(&frames::tcp_syn(client, MAGLEV_NODE_PORT, b""))?;
        assert_eq!(out.verdict, XDP_PASS, "client port {port}");
        let backend = *decode_checked(&out.frame)?.destination.ip();
        assert!(
            MAGLEV_BACKENDS.contains(&backend),
            "client port {port}: {backend}"
        );
        assert_eq!(
            out.frame,
            frames::tcp_syn(client, sock(backend, 8080), b""),
            "client port {port}"
        );
        assert_eq!(bed.counter(stat::EXTERNAL_NEW_FLOW)?, new_flows + 1);
        backends.push(backend);
    }
    Ok(backends)
}

/// An external frontend gives a new flow the backend its Maglev table names, not the
/// `hash % count` slot ClusterIPs use. A table with slot 1 owning its first half and
/// slot 2 its second names slot 3 nowhere: no flow reaches backend 3 (`hash % 3`
/// sends about a third there), and the flows land on both halves. With the halves
/// swapped, every flow lands on the other backend of the two.
#[test]
fn a_new_external_flow_goes_to_the_backend_its_maglev_entry_names() -> Result<()> {
    let mut bed = maglev_testbed()?;
    let half = MAGLEV_TABLE_SIZE / 2;
    let [first, second, unnamed] = MAGLEV_BACKENDS;
    bed.set_maglev_table(
        MAGLEV_NODE_PORT,
        PROTO_TCP,
        &maglev_table(|entry| if entry < half { 1 } else { 2 }),
    )?;
    let by_halves = backends_of_new_maglev_flows(&mut bed)?;
    assert!(!by_halves.contains(&unnamed), "{by_halves:?}");
    assert!(
        by_halves.contains(&first) && by_halves.contains(&second),
        "{by_halves:?}"
    );

    bed.set_maglev_table(
        MAGLEV_NODE_PORT,
        PROTO_TCP,
        &maglev_table(|entry| if entry < half { 2 } else { 1 }),
    )?;
    let swapped = backends_of_new_maglev_flows(&mut bed)?;
    for ((port, before), after) in MAGLEV_CLIENT_PORTS.zip(&by_halves).zip(&swapped) {
        let other = if *before == first { second } else { first };
        assert_eq!(*after, other, "client port {port}");
    }
    Ok(())
}

/// A Maglev entry naming no current backend slot (0, or beyond the count: a table
/// written for more backends than the Service has now, mid-update) is not trusted:
/// its flows get the `hash % count` slot, the backend they get without a table.
#[test]
fn maglev_entries_naming_no_current_backend_slot_fall_back_to_the_hash_slot() -> Result<()> {
    let mut bed = maglev_testbed()?;
    let without_table = backends_of_new_maglev_flows(&mut bed)?;
    for backend in MAGLEV_BACKENDS {
        assert!(without_table.contains(&backend), "{without_table:?}");
    }
    for stale_slot in [0, MAGLEV_BACKENDS.len() as u16 + 1] {
        bed.set_maglev_table(MAGLEV_NODE_PORT, PROTO_TCP, &maglev_table(|_| stale_slot))?;
        assert_eq!(
            backends_of_new_maglev_flows(&mut bed)?,
            without_table,
            "every entry naming slot {stale_slot}"
        );
    }
    Ok(())
}
