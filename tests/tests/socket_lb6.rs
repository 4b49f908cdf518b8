//! Socket-level load balancing of IPv6 sockets (`sock6`): the datapath object's
//! socket programs attached to a cgroup subtree of the test's own, a `ferrite-probe`
//! client in that subtree and in a network namespace of the test's own, whose
//! backends listen on addresses of that namespace. Service frontends are written to
//! the IPv6 maps as the agent will write them; no frontend address exists anywhere,
//! so an untranslated call finds no route and fails.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use anyhow::{ensure, Context, Result};
use aya::maps::{HashMap, MapData};
use ferrite_common::{
    lb6::to_ipv4_mapped, map_names, monitor, program_names, stat, AffinityKey, AffinityValue,
    AFFINITY_CLIENT_NETNS, PROTO_TCP, PROTO_UDP,
};
use ferrite_tests::{
    lab::{answered_by, sh, unique, Cgroup, Netns, Probe, ProbeOutcome, Server},
    testbed::Testbed,
    testbed6::Frontend6,
};

/// The ClusterIP and the backends' addresses (on the namespace's loopback).
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const BACKEND_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5, 0, 0, 0, 0, 0, 0xa);
const BACKEND_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5, 0, 0, 0, 0, 0, 0xb);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 5, 10);
const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 99, 5, 4);
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// The socket programs on a cgroup of the test's own, a namespace with the backends'
/// addresses, and a client process in both. Fields drop in order: the namespace, the
/// programs' links (with the test bed), then the cgroup.
struct Bed {
    netns: Netns,
    tb: Testbed,
    cgroup: Cgroup,
}

impl Bed {
    fn new() -> Result<Self> {
        let cgroup = Cgroup::new(&unique("sock6"))?;
        let mut tb = Testbed::load()?;
        tb.attach_socket_lb(&cgroup.path)?;
        let netns = Netns::new(&unique("sock6"))?;
        let name = netns.name.clone();
        for address in [
            format!("{BACKEND_A}/128"),
            format!("{BACKEND_B}/128"),
            format!("{BACKEND4}/32"),
        ] {
            sh("ip", &["-n", &name, "addr", "add", &address, "dev", "lo"])?;
        }
        Ok(Self { netns, tb, cgroup })
    }

    /// A client process: in the cgroup (so the programs see its sockets) and the
    /// namespace.
    fn probe(&self) -> Probe {
        Probe {
            cgroup: Some(self.cgroup.path.clone()),
            netns: self.netns.path(),
            udp_port: 0,
        }
    }

    /// TCP and UDP servers named `name` on `address`.
    fn server(&self, name: &str, address: impl Into<SocketAddr>) -> Result<Server> {
        Server::start(&self.netns, name, address)
    }
}

/// The server that answered `outcome`, checking the socket reports `peer` as its peer.
fn answered(outcome: &ProbeOutcome, request: &str, peer: impl Into<SocketAddr>) -> Result<String> {
    let reply = outcome.answer().with_context(|| request.to_string())?;
    let peer = peer.into().to_string();
    ensure!(
        outcome.from.as_deref() == Some(peer.as_str()),
        "{request}: the socket reports {:?} as its peer, not {peer}",
        outcome.from
    );
    answered_by(reply, request)
}

#[test]
fn tcp_to_an_ipv6_cluster_ip_reaches_its_backend_and_shows_the_service_as_peer() -> Result<()> {
    let mut bed = Bed::new()?;
    let _server = bed.server("a", v6(BACKEND_A, BACKEND_PORT))?;
    let frontend = v6(VIP6, SERVICE_PORT);
    let options = Frontend6 {
        rev_nat_index: 7,
        ..Frontend6::default()
    };
    bed.tb.add_service6(
        frontend,
        PROTO_TCP,
        options,
        70,
        &[v6(BACKEND_A, BACKEND_PORT)],
    )?;

    let outcome = bed.probe().tcp(frontend, "over tcp6")?;
    assert_eq!(answered(&outcome, "over tcp6", frontend)?, "a");
    assert_eq!(bed.tb.counter(stat::SOCK_TRANSLATED)?, 1);
    assert_eq!(bed.tb.counter(stat::SOCK_REFUSED)?, 0);
    Ok(())
}

#[test]
fn udp_to_an_ipv6_cluster_ip_is_answered_from_the_service_address() -> Result<()> {
    let mut bed = Bed::new()?;
    let _server = bed.server("a", v6(BACKEND_A, BACKEND_PORT))?;
    let frontend = v6(VIP6, 53);
    let options = Frontend6 {
        rev_nat_index: 8,
        ..Frontend6::default()
    };
    bed.tb.add_service6(
        frontend,
        PROTO_UDP,
        options,
        80,
        &[v6(BACKEND_A, BACKEND_PORT)],
    )?;

    let outcome = bed.probe().udp(frontend, "over udp6")?;
    assert_eq!(answered(&outcome, "over udp6", frontend)?, "a");
    assert_eq!(bed.tb.counter(stat::SOCK_TRANSLATED)?, 1);
    // A connected socket (a resolver's) too, at connect: there is no per-packet
    // IPv6 Service path to leave it to. Its peer reads as the Service.
    let outcome = bed.probe().udp_connected(frontend, "connected udp6")?;
    assert_eq!(answered(&outcome, "connected udp6", frontend)?, "a");
    assert_eq!(bed.tb.counter(stat::SOCK_TRANSLATED)?, 2);
    Ok(())
}

/// A dual-stack socket names an IPv4 Service by its IPv4-mapped address: balanced
/// over the IPv4 frontend, the peer shown IPv4-mapped (TCP through connect6, UDP
/// through sendmsg4 and recvmsg6).
#[test]
fn a_dual_stack_socket_reaches_an_ipv4_service_by_its_ipv4_mapped_address() -> Result<()> {
    let mut bed = Bed::new()?;
    let _server = bed.server("four", SocketAddrV4::new(BACKEND4, BACKEND_PORT))?;
    for (protocol, rev_nat_index) in [(PROTO_TCP, 9), (PROTO_UDP, 10)] {
        bed.tb.add_service(
            SocketAddrV4::new(VIP4, SERVICE_PORT),
            protocol,
            rev_nat_index,
            rev_nat_index * 10,
            &[SocketAddrV4::new(BACKEND4, BACKEND_PORT)],
        )?;
    }
    let mapped = v6(Ipv6Addr::from(to_ipv4_mapped(VIP4.octets())), SERVICE_PORT);
    let probe = bed.probe();

    let outcome = probe.tcp(mapped, "mapped tcp")?;
    assert_eq!(answered(&outcome, "mapped tcp", mapped)?, "four");
    let outcome = probe.udp(mapped, "mapped udp")?;
    assert_eq!(answered(&outcome, "mapped udp", mapped)?, "four");
    assert_eq!(bed.tb.counter(stat::SOCK_TRANSLATED)?, 2);
    Ok(())
}

#[test]
fn an_ipv6_service_without_ready_backends_refuses_at_once() -> Result<()> {
    let mut bed = Bed::new()?;
    let tcp = v6(VIP6, SERVICE_PORT);
    let udp = v6(VIP6, 53);
    for (frontend, protocol, rev_nat_index) in [(tcp, PROTO_TCP, 11), (udp, PROTO_UDP, 12)] {
        let options = Frontend6 {
            rev_nat_index,
            ..Frontend6::default()
        };
        bed.tb.add_frontend6(frontend, protocol, options, &[])?;
    }
    // And the same over an IPv4-mapped address, for an IPv4 Service.
    bed.tb
        .add_frontend(SocketAddrV4::new(VIP4, SERVICE_PORT), PROTO_TCP, 13, &[])?;
    let mapped = v6(Ipv6Addr::from(to_ipv4_mapped(VIP4.octets())), SERVICE_PORT);

    let probe = bed.probe();
    for (what, outcome) in [
        ("tcp6", probe.tcp(tcp, "nobody")?),
        ("udp6", probe.udp(udp, "nobody")?),
        ("mapped tcp", probe.tcp(mapped, "nobody")?),
    ] {
        assert_eq!(
            outcome.error.as_deref(),
            Some("refused"),
            "{what}: {outcome:?}"
        );
    }
    assert_eq!(bed.tb.counter(stat::SOCK_REFUSED)?, 3);
    assert_eq!(bed.tb.counter(stat::SOCK_TRANSLATED)?, 0);
    Ok(())
}

/// Session affinity is keyed by the client's network namespace, as for IPv4: every
/// connection of the namespace goes to the backend its first one was given, pinned
/// in the affinity map shared by both families.
#[test]
fn session_affinity_keeps_a_client_namespace_on_one_ipv6_backend() -> Result<()> {
    const CONNECTIONS: usize = 8;
    let mut bed = Bed::new()?;
    let _a = bed.server("a", v6(BACKEND_A, BACKEND_PORT))?;
    let _b = bed.server("b", v6(BACKEND_B, BACKEND_PORT))?;
    let frontend = v6(VIP6, SERVICE_PORT);
    let options = Frontend6 {
        rev_nat_index: 14,
        affinity_timeout_s: 600,
        ..Frontend6::default()
    };
    bed.tb.add_service6(
        frontend,
        PROTO_TCP,
        options,
        140,
        &[v6(BACKEND_A, BACKEND_PORT), v6(BACKEND_B, BACKEND_PORT)],
    )?;

    let probe = bed.probe();
    let mut answering = Vec::new();
    for i in 0..CONNECTIONS {
        let request = format!("affine {i}");
        answering.push(answered(
            &probe.tcp(frontend, &request)?,
            &request,
            frontend,
        )?);
    }
    answering.dedup();
    assert_eq!(
        answering.len(),
        1,
        "one backend for the namespace: {answering:?}"
    );

    let pins: HashMap<&MapData, AffinityKey, AffinityValue> = HashMap::try_from(
        bed.tb
            .ebpf
            .map(map_names::AFFINITY)
            .context("affinity map")?,
    )?;
    let pinned: Vec<u32> = pins
        .iter()
        .filter_map(|entry| entry.ok())
        .filter(|(key, _)| key.rev_nat_index == 14 && key.client_kind == AFFINITY_CLIENT_NETNS)
        .map(|(_, pin)| pin.backend_id)
        .collect();
    let expected = if answering[0] == "a" { 140 } else { 141 };
    assert_eq!(pinned, [expected], "the namespace's pin");
    assert_eq!(bed.tb.counter(stat::SOCK_TRANSLATED)?, CONNECTIONS as u64);
    Ok(())
}

/// A monitor listening sees each IPv6 call: a TCP connect and a UDP send as new
/// flows naming the IPv6 frontend and the IPv6 backend chosen, a call to a frontend
/// without backends as refused; an IPv4-mapped call as the IPv4 call it is.
#[test]
fn a_monitor_sees_ipv6_socket_calls_with_their_ipv6_frontend_and_backend() -> Result<()> {
    let mut bed = Bed::new()?;
    let _server = bed.server("a", v6(BACKEND_A, BACKEND_PORT))?;
    let _four = bed.server("four", SocketAddrV4::new(BACKEND4, BACKEND_PORT))?;
    let tcp = v6(VIP6, SERVICE_PORT);
    let udp = v6(VIP6, 53);
    let empty = v6(VIP6, 81);
    for (frontend, protocol, rev_nat_index, first_id) in
        [(tcp, PROTO_TCP, 14, 140), (udp, PROTO_UDP, 15, 150)]
    {
        let options = Frontend6 {
            rev_nat_index,
            ..Frontend6::default()
        };
        let backends = [v6(BACKEND_A, BACKEND_PORT)];
        bed.tb
            .add_service6(frontend, protocol, options, first_id, &backends)?;
    }
    let options = Frontend6 {
        rev_nat_index: 16,
        ..Frontend6::default()
    };
    bed.tb.add_frontend6(empty, PROTO_TCP, options, &[])?;
    bed.tb.add_service(
        SocketAddrV4::new(VIP4, SERVICE_PORT),
        PROTO_TCP,
        17,
        170,
        &[SocketAddrV4::new(BACKEND4, BACKEND_PORT)],
    )?;
    let mapped = v6(Ipv6Addr::from(to_ipv4_mapped(VIP4.octets())), SERVICE_PORT);
    bed.tb
        .set_monitor(monitor::WANT_DROPS | monitor::WANT_FLOWS)?;
    let probe = bed.probe();

    let expected_flows = [
        (tcp, PROTO_TCP, program_names::SOCK_CONNECT6, 14, 140),
        (udp, PROTO_UDP, program_names::SOCK_SENDMSG6, 15, 150),
    ];
    for (frontend, protocol, program, rev_nat_index, backend_id) in expected_flows {
        let outcome = if protocol == PROTO_TCP {
            probe.tcp(frontend, "watched")?
        } else {
            probe.udp(frontend, "watched")?
        };
        assert_eq!(answered(&outcome, "watched", frontend)?, "a");
        let events = bed.tb.take_events()?;
        assert_eq!(events.len(), 1, "{program}: {events:?}");
        let event = events[0];
        assert_eq!(
            (event.kind, stat::NAMES[event.reason as usize]),
            (monitor::KIND_FLOW, "sock_translated"),
            "{program}"
        );
        assert_eq!(monitor::PROGRAMS[event.program as usize], program);
        assert_eq!(
            (event.family, event.proto),
            (monitor::FAMILY_IPV6, protocol)
        );
        assert_eq!(
            (Ipv6Addr::from(event.daddr), event.dport),
            (*frontend.ip(), frontend.port()),
            "{program}: the frontend"
        );
        assert_eq!(
            (Ipv6Addr::from(event.backend_address), event.backend_port),
            (BACKEND_A, BACKEND_PORT),
            "{program}: the backend"
        );
        assert_eq!(
            (event.rev_nat_index, event.backend_id),
            (rev_nat_index, backend_id)
        );
    }

    let outcome = probe.tcp(empty, "nobody")?;
    assert_eq!(outcome.error.as_deref(), Some("refused"), "{outcome:?}");
    let events = bed.tb.take_events()?;
    assert_eq!(events.len(), 1, "{events:?}");
    let refused = events[0];
    assert_eq!(
        (refused.kind, stat::NAMES[refused.reason as usize]),
        (monitor::KIND_DROP, "sock_refused")
    );
    assert_eq!(
        (refused.family, Ipv6Addr::from(refused.daddr), refused.dport),
        (monitor::FAMILY_IPV6, VIP6, 81)
    );

    let outcome = probe.tcp(mapped, "mapped")?;
    assert_eq!(answered(&outcome, "mapped", mapped)?, "four");
    let events = bed.tb.take_events()?;
    assert_eq!(events.len(), 1, "{events:?}");
    let four = events[0];
    assert_eq!(four.family, monitor::FAMILY_IPV4);
    assert_eq!(&four.daddr[..4], &VIP4.octets());
    assert_eq!(&four.backend_address[..4], &BACKEND4.octets());
    Ok(())
}
