//! `ferrite monitor`'s datapath side, packet by packet (BPF_PROG_TEST_RUN): with a
//! monitor listening, every drop the datapath can be made to produce here writes
//! exactly one event to `ferrite_events` with its reason, tuple, device and program,
//! and a new Service flow one with its frontend and backend; with nobody listening,
//! nothing is written. Needs root.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use anyhow::{Context, Result};
use ferrite_common::{
    monitor, pod_mac_for, program_names, stat, svc_flag, EndpointInfo, MonitorEvent, PROTO_TCP,
    PROTO_UDP, ROUTE_LOCAL, ROUTE_REMOTE,
};
use ferrite_tests::{
    frames::{self, decode_checked, GATEWAY_MAC},
    frames6::{self, options_header, Ipv6Frame, NEXT_HOP_BY_HOP},
    testbed::{RunResult, Testbed, TC_ACT_SHOT, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS},
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 99);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const EMPTY_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 53);
const WORLD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40000);
const NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30080);
const LOCAL_ONLY_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30091);
const EMPTY_LB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 101), 80);
const RANGED_LB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 100), 80);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A node with a client and a backend pod, its own pod CIDR and another node's (no
/// overlay configured yet), a ClusterIP with a backend and one without, and external
/// frontends: a NodePort with a backend, an `externalTrafficPolicy: Local` NodePort
/// and a LoadBalancer IP without backends, and a LoadBalancer IP with source ranges.
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.set_node_ip(NODE_IP)?;
    bed.add_endpoint(CLIENT, TEST_RUN_IFINDEX)?;
    bed.add_endpoint(BACKEND, TEST_RUN_IFINDEX)?;
    bed.add_route(Ipv4Addr::new(10, 244, 0, 0), 24, NODE_IP, ROUTE_LOCAL)?;
    let other_node = Ipv4Addr::new(198, 51, 100, 2);
    bed.add_route(Ipv4Addr::new(10, 244, 1, 0), 24, other_node, ROUTE_REMOTE)?;
    bed.add_service(VIP, PROTO_TCP, 1, 1, &[sock(BACKEND, 8080)])?;
    bed.add_service(EMPTY_VIP, PROTO_UDP, 2, 2, &[])?;
    let node_port = svc_flag::EXTERNAL | svc_flag::NODE_PORT;
    for (frontend, rev_nat, first_id, backends, flags) in [
        (NODE_PORT, 3, 3, vec![sock(BACKEND, 8080)], node_port),
        (
            LOCAL_ONLY_NODE_PORT,
            4,
            5,
            vec![],
            node_port | svc_flag::LOCAL_ONLY,
        ),
        (EMPTY_LB, 5, 6, vec![], svc_flag::EXTERNAL),
        (
            RANGED_LB,
            6,
            7,
            vec![sock(BACKEND, 8080)],
            svc_flag::EXTERNAL | svc_flag::SOURCE_RANGES,
        ),
    ] {
        bed.add_service(frontend, PROTO_TCP, rev_nat, first_id, &backends)?;
        bed.set_service_flags(frontend, PROTO_TCP, flags)?;
    }
    bed.add_source_range(RANGED_LB, PROTO_TCP, Ipv4Addr::new(203, 0, 113, 0), 24)?;
    Ok(bed)
}

/// Where a frame is fed in.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Pod,
    World,
    Overlay,
}

impl Entry {
    fn program(self) -> &'static str {
        match self {
            Entry::Pod => program_names::FROM_POD,
            Entry::World => program_names::FROM_WORLD,
            Entry::Overlay => program_names::FROM_OVERLAY,
        }
    }

    fn run(self, bed: &Testbed, frame: &[u8]) -> Result<RunResult> {
        match self {
            Entry::Pod => bed.from_pod(frame),
            Entry::World => bed.from_world(frame),
            Entry::Overlay => Ok(bed.run_program(program_names::FROM_OVERLAY, frame, 1)?.0),
        }
    }

    fn dropped(self) -> u32 {
        match self {
            Entry::World => XDP_DROP,
            _ => TC_ACT_SHOT,
        }
    }
}

/// A frame that must be dropped, and what its event must say.
struct DropCase {
    name: &'static str,
    entry: Entry,
    /// Frames fed first, which must write no drop event.
    before: Vec<Vec<u8>>,
    frame: Vec<u8>,
    reason: u32,
    /// Source, destination (with ports, 0 where the packet has none) and protocol.
    tuple: (SocketAddrV4, SocketAddrV4, u8),
}

fn drop_cases() -> Result<Vec<DropCase>> {
    let syn = frames::tcp_syn(sock(CLIENT, 40000), VIP, b"");
    // An EtherType of neither family (IPv6 drops: `an_ipv6_drop_yields_...`).
    let mut not_ip = syn.clone();
    not_ip[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    let datagram = frames::udp(sock(CLIENT, 40001), EMPTY_VIP, &[7; 32]);
    let (first, later) = frames::fragment(&datagram, 16, 9)?;
    let unspecified = sock(Ipv4Addr::UNSPECIFIED, 0);
    Ok(vec![
        DropCase {
            name: "not IP",
            entry: Entry::Pod,
            before: vec![],
            frame: not_ip,
            reason: stat::DROP_UNSUPPORTED_L3,
            tuple: (unspecified, unspecified, 0),
        },
        DropCase {
            name: "IHL 4",
            entry: Entry::Pod,
            before: vec![],
            frame: bad_ihl,
            reason: stat::DROP_MALFORMED,
            // Its addresses, and no ports behind a header of an impossible length.
            tuple: (sock(CLIENT, 0), sock(*VIP.ip(), 0), PROTO_TCP),
        },
        DropCase {
            name: "spoofed source",
            entry: Entry::Pod,
            before: vec![],
            frame: frames::tcp_syn(sock(STRANGER, 40000), VIP, b""),
            reason: stat::DROP_SPOOFED,
            tuple: (sock(STRANGER, 40000), VIP, PROTO_TCP),
        },
        DropCase {
            name: "no such pod in this node's CIDR",
            entry: Entry::Pod,
            before: vec![],
            frame: frames::udp(
                sock(CLIENT, 40002),
                sock(Ipv4Addr::new(10, 244, 0, 77), 53),
                b"q",
            ),
            reason: stat::DROP_UNKNOWN_POD,
            tuple: (
                sock(CLIENT, 40002),
                sock(Ipv4Addr::new(10, 244, 0, 77), 53),
                PROTO_UDP,
            ),
        },
        DropCase {
            name: "another node's pod, no overlay yet",
            entry: Entry::Pod,
            before: vec![],
            frame: frames::tcp_syn(sock(CLIENT, 40003), sock(REMOTE_POD, 80), b""),
            reason: stat::DROP_NO_OVERLAY,
            tuple: (sock(CLIENT, 40003), sock(REMOTE_POD, 80), PROTO_TCP),
        },
        DropCase {
            name: "later fragment of a datagram refused for want of backends",
            entry: Entry::Pod,
            // The first fragment is answered with port unreachable: no drop.
            before: vec![first],
            frame: later,
            reason: stat::DROP_NO_BACKEND,
            // A later fragment carries no ports.
            tuple: (sock(CLIENT, 0), sock(*EMPTY_VIP.ip(), 0), PROTO_UDP),
        },
        DropCase {
            name: "LoadBalancer client outside its source ranges",
            entry: Entry::World,
            before: vec![],
            frame: frames::tcp_syn(sock(Ipv4Addr::new(192, 0, 2, 55), 40000), RANGED_LB, b""),
            reason: stat::DROP_SOURCE_RANGE,
            tuple: (
                sock(Ipv4Addr::new(192, 0, 2, 55), 40000),
                RANGED_LB,
                PROTO_TCP,
            ),
        },
        DropCase {
            name: "local-policy NodePort without a local backend",
            entry: Entry::World,
            before: vec![],
            frame: frames::tcp_syn(WORLD, LOCAL_ONLY_NODE_PORT, b""),
            reason: stat::DROP_NO_LOCAL_BACKEND,
            tuple: (WORLD, LOCAL_ONLY_NODE_PORT, PROTO_TCP),
        },
        DropCase {
            name: "LoadBalancer IP without backends",
            entry: Entry::World,
            before: vec![],
            frame: frames::tcp_syn(WORLD, EMPTY_LB, b""),
            reason: stat::DROP_NO_BACKEND,
            tuple: (WORLD, EMPTY_LB, PROTO_TCP),
        },
        DropCase {
            // BPF_PROG_TEST_RUN gives the packet no tunnel metadata: the program
            // cannot tell its VNI, an internal drop.
            name: "overlay packet without tunnel metadata",
            entry: Entry::Overlay,
            before: vec![],
            frame: frames::tcp_syn(sock(REMOTE_POD, 1234), sock(BACKEND, 8080), b""),
            reason: stat::DROP_INTERNAL,
            tuple: (sock(REMOTE_POD, 1234), sock(BACKEND, 8080), PROTO_TCP),
        },
    ])
}

/// The IPv4 address of an event's 16 bytes (the first 4; the rest must be zero).
fn v4(address: [u8; 16]) -> Ipv4Addr {
    assert_eq!(
        address[4..],
        [0; 12],
        "an IPv4 address in the first 4 bytes"
    );
    Ipv4Addr::new(address[0], address[1], address[2], address[3])
}

/// An IPv4 event's tuple (one of a packet of neither family is all zero).
fn tuple_of(event: &MonitorEvent) -> (SocketAddrV4, SocketAddrV4, u8) {
    assert_ne!(event.family, monitor::FAMILY_IPV6);
    (
        sock(v4(event.saddr), event.sport),
        sock(v4(event.daddr), event.dport),
        event.proto,
    )
}

#[test]
fn with_a_monitor_listening_every_drop_yields_one_event_with_its_reason_tuple_and_program(
) -> Result<()> {
    let mut bed = testbed()?;
    bed.set_monitor(monitor::WANT_DROPS)?;
    let mut reasons_seen = Vec::new();
    for case in drop_cases()? {
        let name = case.name;
        for frame in &case.before {
            let out = case.entry.run(&bed, frame)?;
            assert_ne!(out.verdict, case.entry.dropped(), "{name}: setup frame");
        }
        assert_eq!(bed.take_events()?, vec![], "{name}: setup frames");
        let before = bed.counter(case.reason)?;
        let out = case.entry.run(&bed, &case.frame)?;
        assert_eq!(out.verdict, case.entry.dropped(), "{name}: verdict");
        assert_eq!(bed.counter(case.reason)?, before + 1, "{name}: counter");
        let events = bed.take_events()?;
        assert_eq!(events.len(), 1, "{name}: {events:?}");
        let event = events[0];
        assert_eq!(event.kind, monitor::KIND_DROP, "{name}");
        assert_eq!(
            stat::NAMES[event.reason as usize],
            stat::NAMES[case.reason as usize],
            "{name}: reason"
        );
        assert_eq!(tuple_of(&event), case.tuple, "{name}: tuple");
        assert_eq!(event.ifindex, TEST_RUN_IFINDEX, "{name}: ifindex");
        assert_eq!(
            monitor::PROGRAMS[event.program as usize],
            case.entry.program(),
            "{name}: program"
        );
        assert_eq!(event.len as usize, case.frame.len(), "{name}: length");
        assert_ne!(event.time_ns, 0, "{name}: time");
        assert_eq!(
            (event.backend_address, event.backend_port, event.backend_id),
            ([0; 16], 0, 0),
            "{name}: a drop has no backend"
        );
        reasons_seen.push(case.reason);
    }
    reasons_seen.sort();
    reasons_seen.dedup();
    assert_eq!(reasons_seen.len(), 9, "distinct drop reasons covered");
    Ok(())
}

/// A monitor reading too slowly (here: not at all) loses events once the ring is
/// full; each lost one is counted, and every drop is still counted as a drop.
#[test]
fn events_that_do_not_fit_in_the_ring_are_counted_as_lost() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_monitor(monitor::WANT_DROPS)?;
    let spoofed = drop_cases()?
        .into_iter()
        .find(|c| c.reason == stat::DROP_SPOOFED)
        .context("a spoofed-source case")?;
    for frame in &spoofed.before {
        spoofed.entry.run(&bed, frame)?;
    }
    bed.take_events()?;
    // More drops than the ring has room for, none read until the end.
    let sent: u64 = 2 * u64::from(ferrite_common::monitor::RING_BYTES)
        / std::mem::size_of::<MonitorEvent>() as u64;
    let drops_before = bed.counter(stat::DROP_SPOOFED)?;
    let (out, _) = bed.run_program(spoofed.entry.program(), &spoofed.frame, sent as u32)?;
    assert_eq!(out.verdict, spoofed.entry.dropped());
    assert_eq!(bed.counter(stat::DROP_SPOOFED)? - drops_before, sent);
    let delivered = bed.take_events()?.len() as u64;
    let lost = bed.counter(stat::MONITOR_LOST)?;
    assert!(
        delivered > 0 && lost > 0,
        "delivered {delivered}, lost {lost}"
    );
    assert_eq!(
        delivered + lost,
        sent,
        "every event delivered or counted lost"
    );
    Ok(())
}

#[test]
fn with_nobody_listening_for_drops_no_drop_writes_an_event() -> Result<()> {
    let mut bed = testbed()?;
    // No monitor at all, then one that wants only new flows.
    for wants in [0, monitor::WANT_FLOWS] {
        bed.set_monitor(wants)?;
        for case in drop_cases()? {
            for frame in case.before.iter().chain([&case.frame]) {
                case.entry.run(&bed, frame)?;
            }
            assert_eq!(bed.take_events()?, vec![], "{}: wants {wants}", case.name);
        }
    }
    // Each was still counted.
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 2);
    Ok(())
}

#[test]
fn a_new_service_flow_yields_one_event_with_its_frontend_and_backend() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_monitor(monitor::WANT_FLOWS)?;
    let client = sock(CLIENT, 40000);
    let syn = bed.from_pod(&frames::tcp_syn(client, VIP, b""))?;
    assert_eq!(decode_checked(&syn.frame)?.destination, sock(BACKEND, 8080));
    let events = bed.take_events()?;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = events[0];
    assert_eq!(event.kind, monitor::KIND_FLOW);
    assert_eq!(event.reason, stat::SERVICE_NEW_FLOW);
    assert_eq!(
        monitor::PROGRAMS[event.program as usize],
        program_names::FROM_POD
    );
    assert_eq!(tuple_of(&event), (client, VIP, PROTO_TCP));
    assert_eq!(
        sock(v4(event.backend_address), event.backend_port),
        sock(BACKEND, 8080)
    );
    assert_eq!(event.rev_nat_index, 1);
    assert_eq!(event.ifindex, TEST_RUN_IFINDEX);
    // The flow's next packets are established: no new event.
    bed.from_pod(&frames::tcp_ack(client, VIP, b"GET /"))?;
    assert_eq!(bed.take_events()?, vec![]);

    // An external client's new flow, balanced in XDP.
    let out = bed.from_world(&frames::tcp_syn(WORLD, NODE_PORT, b""))?;
    assert_eq!(out.verdict, XDP_PASS);
    let events = bed.take_events()?;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = events[0];
    assert_eq!(
        (event.kind, event.reason),
        (monitor::KIND_FLOW, stat::EXTERNAL_NEW_FLOW)
    );
    assert_eq!(
        monitor::PROGRAMS[event.program as usize],
        program_names::FROM_WORLD
    );
    assert_eq!(tuple_of(&event), (WORLD, NODE_PORT, PROTO_TCP));
    assert_eq!(
        sock(v4(event.backend_address), event.backend_port),
        sock(BACKEND, 8080)
    );
    assert_eq!((event.rev_nat_index, event.backend_id), (3, 3));

    // Nobody listening for flows: new flows write nothing.
    bed.set_monitor(monitor::WANT_DROPS)?;
    bed.from_pod(&frames::tcp_syn(sock(CLIENT, 40001), VIP, b""))?;
    assert_eq!(bed.take_events()?, vec![]);
    assert_eq!(bed.counter(stat::SERVICE_NEW_FLOW)?, 2);
    Ok(())
}

/// A dual-stack pod spoofing an IPv6 source: the drop's event carries the IPv6
/// addresses, the next header and the ports, the ports only where TCP or UDP follows
/// the fixed header (extension headers are not walked for the monitor).
#[test]
fn an_ipv6_drop_yields_one_event_with_its_ipv6_tuple() -> Result<()> {
    let client: Ipv6Addr = "fd00:10:244::2".parse()?;
    let stranger: Ipv6Addr = "fd00:10:244::99".parse()?;
    let web: Ipv6Addr = "fd00:10:244::3".parse()?;
    let client_mac = pod_mac_for(CLIENT);
    let mut bed = Testbed::load()?;
    let endpoint = EndpointInfo {
        ifindex: TEST_RUN_IFINDEX,
        pod_mac: client_mac,
        host_mac: GATEWAY_MAC,
        flags: 0,
    };
    bed.add_endpoint6(client, endpoint)?;
    bed.fill_tail_calls()?;
    bed.set_monitor(monitor::WANT_DROPS)?;
    let spoofed = |extensions| Ipv6Frame {
        eth_dst: GATEWAY_MAC,
        eth_src: client_mac,
        source: stranger,
        destination: web,
        hop_limit: 64,
        extensions,
        proto: PROTO_UDP,
        upper: frames6::udp(stranger, 40000, web, 8080, b"spoofed"),
    };
    for (frame, proto, ports) in [
        (spoofed(vec![]), PROTO_UDP, (40000, 8080)),
        (
            spoofed(vec![options_header(NEXT_HOP_BY_HOP, 0)]),
            NEXT_HOP_BY_HOP,
            (0, 0),
        ),
    ] {
        let frame = frame.build();
        let out = bed.from_pod(&frame)?;
        assert_eq!(out.verdict, TC_ACT_SHOT);
        let events = bed.take_events()?;
        assert_eq!(events.len(), 1, "{events:?}");
        let event = events[0];
        assert_eq!(
            (event.kind, stat::NAMES[event.reason as usize]),
            (monitor::KIND_DROP, "drop_spoofed")
        );
        assert_eq!(
            monitor::PROGRAMS[event.program as usize],
            program_names::FROM_POD
        );
        assert_eq!(event.family, monitor::FAMILY_IPV6);
        assert_eq!(
            (
                Ipv6Addr::from(event.saddr),
                Ipv6Addr::from(event.daddr),
                event.proto
            ),
            (stranger, web, proto)
        );
        assert_eq!((event.sport, event.dport), ports);
        assert_eq!(event.len as usize, frame.len());
        assert_eq!(
            (event.backend_address, event.backend_port),
            ([0; 16], 0),
            "a drop has no backend"
        );
    }
    Ok(())
}
