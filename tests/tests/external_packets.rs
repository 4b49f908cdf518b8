//! The uplink's XDP program, packet by packet (BPF_PROG_TEST_RUN): frames from the
//! world go in, the exact frame and verdict come out, checksums recomputed
//! independently; and the uplink's tcx program doing the same without XDP. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use ferrite_common::{
    config_flag, explain::write, program_names, stat, svc_flag, CtKey, CtValue, MaglevTable,
    CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT, CT_FLAG_UNESTABLISHED, MAGLEV_TABLE_SIZE,
    PROTO_TCP, PROTO_UDP, ROUTE_REMOTE, SNAT_PORT_MAX, SNAT_PORT_MIN,
};
use ferrite_tests::{
    frames::{self, decode_checked},
    testbed::{
        Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS,
    },
    tunnel_shim::TunnelShim,
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

/// The other node, where `REMOTE_BACKEND` lives.
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

fn tcp_key(from: SocketAddrV4, to: SocketAddrV4) -> CtKey {
    CtKey {
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port(),
        dport: to.port(),
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    }
}

/// The reply key of the NodePort flow SNATed to this node's `port`, whose backend
/// is `REMOTE_BACKEND`: the entry that claims the port.
fn claim_key(port: u16) -> CtKey {
    tcp_key(sock(REMOTE_BACKEND, 8080), sock(NODE_IP, port))
}

/// A TCP flow from `client` to REMOTE_NODE_PORT holding SNAT port `port`, its two
/// entries as the datapath writes them, created at `created` (jiffies) and
/// established or not (`CT_FLAG_UNESTABLISHED`); `forward`: with its forward entry.
fn claim(
    bed: &mut Testbed,
    port: u16,
    client: SocketAddrV4,
    created: u64,
    established: bool,
    forward: bool,
) -> Result<()> {
    let handshake = if established {
        0
    } else {
        CT_FLAG_UNESTABLISHED
    };
    let flags = CT_FLAG_EXTERNAL | CT_FLAG_SNAT | handshake;
    let entry = CtValue {
        backend_id: 3,
        rev_nat_index: 2,
        flags,
        backend_address: REMOTE_BACKEND.octets(),
        backend_port: 8080,
        created_jiffies: created,
        last_seen_jiffies: created,
        ..CtValue::default()
    };
    let reply = CtValue {
        flags: flags | CT_FLAG_REPLY,
        nat_address: client.ip().octets(),
        nat_port: client.port(),
        ..entry
    };
    bed.insert_conntrack(claim_key(port), reply)?;
    if forward {
        let forward = CtValue {
            nat_address: NODE_IP.octets(),
            nat_port: port,
            packets: 1,
            ..entry
        };
        bed.insert_conntrack(tcp_key(client, REMOTE_NODE_PORT), forward)?;
    }
    Ok(())
}

/// The SNAT ports a new TCP flow from `client` to REMOTE_NODE_PORT tries, in the
/// order it tries them (16), found from outside: each SYN takes the first free one;
/// its forward entry is then removed and its reply entry left holding the port, so
/// the next SYN takes the next. Conntrack is left empty.
fn snat_ports_tried(bed: &mut Testbed, client: SocketAddrV4) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for _ in 0..16 {
        let out = bed.from_world(&frames::tcp_syn(client, REMOTE_NODE_PORT, b""))?;
        assert_eq!(out.verdict, XDP_PASS);
        ports.push(decode_checked(&out.frame)?.source.port());
        bed.remove_conntrack(&[tcp_key(client, REMOTE_NODE_PORT)])?;
    }
    let held: Vec<_> = ports.iter().map(|port| claim_key(*port)).collect();
    bed.remove_conntrack(&held)?;
    assert_eq!(bed.conntrack_keys()?, []);
    Ok(ports)
}

/// A new NodePort flow to a remote backend whose every SNAT port (61000-65535) is
/// claimed: of the 16 ports it tries, it takes over the one held longest by a flow
/// whose client never completed its handshake (a spoofed SYN's), removing that
/// flow's entries, never an established flow's (even an older one); an explain run
/// names the port and writes nothing. With all 16 held by established flows it is
/// dropped (`drop_no_snat_port`), as before. Fails without the takeover: the first
/// SYN is dropped.
#[test]
fn a_new_flow_finding_every_snat_port_taken_takes_over_the_oldest_half_open_claim() -> Result<()> {
    let mut bed = testbed()?;
    let client = sock(*CLIENT.ip(), 45000);
    let tried = snat_ports_tried(&mut bed, client)?;
    let mut distinct = tried.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 16, "{tried:?}");
    // Every other port of the range: established flows, older than any below.
    for port in SNAT_PORT_MIN..=SNAT_PORT_MAX {
        if !tried.contains(&port) {
            let holder = sock(Ipv4Addr::new(192, 0, 2, 9), port);
            claim(&mut bed, port, holder, 1, true, false)?;
        }
    }
    // The tried ports: half-open flows of spoofed clients, created at scattered
    // times, and one established flow older than all of them.
    let spoofed = |i: usize| sock(Ipv4Addr::new(198, 18, 0, i as u8), 40000 + i as u16);
    let created = |i: usize| 1_000 + ((i * 7) % 16) as u64 * 10;
    let established = 3;
    for (i, port) in tried.iter().enumerate() {
        let (when, done) = if i == established {
            (100, true)
        } else {
            (created(i), false)
        };
        claim(&mut bed, *port, spoofed(i), when, done, true)?;
    }
    let oldest = (0..16)
        .filter(|i| *i != established)
        .min_by_key(|i| created(*i))
        .unwrap();
    let port = tried[oldest];
    let syn = frames::tcp_syn(client, REMOTE_NODE_PORT, b"");

    let before = bed.map_dumps()?;
    let explained = bed.explainer()?.from_world(&syn, 7)?;
    assert_eq!(bed.map_dumps()?, before, "the explain run wrote nothing");
    assert_eq!(explained.trace.snat_port, port);
    assert!(explained.trace.skipped & write::SNAT_RECLAIM != 0);

    let out = bed.from_world(&syn)?;
    assert_eq!(out.verdict, XDP_PASS);
    assert_eq!(
        out.frame,
        frames::tcp_syn(sock(NODE_IP, port), sock(REMOTE_BACKEND, 8080), b"")
    );
    // The half-open flow is gone, the port is the new flow's.
    assert_eq!(
        bed.conntrack(&tcp_key(spoofed(oldest), REMOTE_NODE_PORT))?,
        None
    );
    let reply = bed.conntrack(&claim_key(port))?.expect("the port's claim");
    assert_eq!(
        (reply.nat_address, reply.nat_port, reply.flags),
        (
            CLIENT.ip().octets(),
            client.port(),
            CT_FLAG_EXTERNAL | CT_FLAG_SNAT | CT_FLAG_REPLY | CT_FLAG_UNESTABLISHED
        )
    );
    // Every other claim as it was.
    for (i, other) in tried.iter().enumerate().filter(|(i, _)| *i != oldest) {
        let held = bed.conntrack(&claim_key(*other))?.expect("a claim");
        assert_eq!(
            (held.nat_address, held.nat_port),
            (spoofed(i).ip().octets(), spoofed(i).port())
        );
        assert!(bed
            .conntrack(&tcp_key(spoofed(i), REMOTE_NODE_PORT))?
            .is_some());
    }
    assert_eq!(bed.counter(stat::SNAT_PORT_RECLAIMED)?, 1);
    assert_eq!(bed.counter(stat::DROP_NO_SNAT_PORT)?, 0);

    // Every port it tries held by an established flow: no port, dropped.
    bed.remove_conntrack(&[tcp_key(client, REMOTE_NODE_PORT)])?;
    for (i, port) in tried.iter().enumerate() {
        claim(&mut bed, *port, spoofed(i), created(i), true, true)?;
    }
    let out = bed.from_world(&syn)?;
    assert_eq!(out.verdict, XDP_DROP);
    assert_eq!(bed.counter(stat::DROP_NO_SNAT_PORT)?, 1);
    assert_eq!(bed.counter(stat::SNAT_PORT_RECLAIMED)?, 1);
    Ok(())
}

/// A SYN flood from spoofed sources at a NodePort whose backend is on another node
/// claims a SNAT port per SYN and runs through the whole range: every SYN still gets
/// a port (the flood's own oldest half-open claims are taken over), a real client
/// gets one, and once it completed its handshake (the backend's SYN-ACK over the
/// overlay, its ACK) the rest of the flood never takes its port. Fails without the
/// takeover: the flood's later SYNs and real clients are dropped (`drop_no_snat_port`).
#[test]
fn a_syn_flood_from_spoofed_sources_cannot_hold_the_snat_ports_against_real_clients() -> Result<()>
{
    let mut bed = testbed()?;
    bed.add_route(Ipv4Addr::new(10, 244, 1, 0), 24, REMOTE_NODE, ROUTE_REMOTE)?;
    let overlay = TunnelShim::new(
        &[bed.program_fd(program_names::FROM_OVERLAY)?],
        0,
        REMOTE_NODE,
    )?;
    // Random sources in 198.18.0.0/15 and ports, as a flood spoofs them.
    let mut rng = fastrand::Rng::with_seed(0x5f100d);
    let mut flood = |bed: &Testbed, from: u32, to: u32| -> Result<()> {
        for i in from..to {
            let source = Ipv4Addr::from(0xc612_0000 | rng.u32(..0x2_0000));
            let syn = frames::tcp_syn(sock(source, rng.u16(1024..)), REMOTE_NODE_PORT, b"");
            assert_eq!(bed.from_world(&syn)?.verdict, XDP_PASS, "flood SYN {i}");
        }
        Ok(())
    };
    let range = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    flood(&bed, 0, 2 * range)?;
    assert_eq!(bed.counter(stat::DROP_NO_SNAT_PORT)?, 0);
    assert!(
        bed.counter(stat::SNAT_PORT_RECLAIMED)? > 0,
        "the flood filled the range"
    );

    // A real client: SYN, the backend's SYN-ACK (over the overlay), its ACK.
    let real = sock(*CLIENT.ip(), 45001);
    let out = bed.from_world(&frames::tcp_syn(real, REMOTE_NODE_PORT, b""))?;
    assert_eq!(out.verdict, XDP_PASS);
    let port = decode_checked(&out.frame)?.source.port();
    let answer = frames::tcp_syn_ack(sock(REMOTE_BACKEND, 8080), sock(NODE_IP, port));
    overlay.run(0, &answer, 1)?;
    bed.from_world(&frames::tcp_ack(real, REMOTE_NODE_PORT, b""))?;
    let reply = bed.conntrack(&claim_key(port))?.expect("the port's claim");
    assert_eq!(reply.flags & CT_FLAG_UNESTABLISHED, 0, "established");

    // The flood goes on, through the range twice more: the client keeps its port.
    flood(&bed, 2 * range, 4 * range)?;
    let reply = bed.conntrack(&claim_key(port))?.expect("the port's claim");
    assert_eq!(
        (reply.nat_address, reply.nat_port),
        (real.ip().octets(), real.port())
    );
    let data = bed.from_world(&frames::tcp_ack(real, REMOTE_NODE_PORT, b"GET /"))?;
    assert_eq!(
        data.frame,
        frames::tcp_ack(sock(NODE_IP, port), sock(REMOTE_BACKEND, 8080), b"GET /")
    );
    // And another real client still gets in.
    let late = sock(*CLIENT.ip(), 45002);
    let out = bed.from_world(&frames::tcp_syn(late, REMOTE_NODE_PORT, b""))?;
    assert_eq!(out.verdict, XDP_PASS);
    assert_eq!(bed.counter(stat::DROP_NO_SNAT_PORT)?, 0);
    Ok(())
}
