//! NetworkPolicy in the datapath, packet by packet (BPF_PROG_TEST_RUN): what an
//! isolated pod may send and receive, that answers of an allowed flow pass as
//! answers, and that a policy change reaches established flows when the agent moves
//! the epoch on. Map entries are laid out and written by the agent's own plan and
//! writer. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use ferrite_agent::model::policy::{Allow, Direction};
use ferrite_common::{
    config_flag, pod_mac_for,
    policy::{ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY},
    program_names, stat, svc_flag, PROTO_TCP, PROTO_UDP,
};
use ferrite_tests::{
    frames::{self, GATEWAY_MAC},
    testbed::{
        Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS,
    },
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const WORLD_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const CLIENT_IDENTITY: u32 = 17;
const SERVER_IDENTITY: u32 = 18;
const WORLD_CLIENTS_IDENTITY: u32 = 19;
const BOTH_WAYS: u32 = ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED;

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A node with a client pod, a server pod and a Service VIP:80 -> server:8080.
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.add_endpoint(CLIENT, TEST_RUN_IFINDEX)?;
    bed.add_endpoint(SERVER, TEST_RUN_IFINDEX)?;
    bed.add_service(sock(VIP, 80), PROTO_TCP, 1, 1, &[sock(SERVER, 8080)])?;
    bed.set_node_ip(NODE)?;
    bed.set_identity(CLIENT, 32, CLIENT_IDENTITY)?;
    bed.set_identity(SERVER, 32, SERVER_IDENTITY)?;
    Ok(bed)
}

fn tcp_8080(direction: Direction, identity: u32) -> Allow {
    Allow {
        direction,
        identity,
        protocol: PROTO_TCP,
        ports: Some((8080, 8080)),
    }
}

/// `frame` as delivered to the pod with `ip`: dst MAC = pod's eth0, src = gateway.
fn delivered_to(ip: Ipv4Addr, mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&pod_mac_for(ip));
    frame[6..12].copy_from_slice(&GATEWAY_MAC);
    frame
}

#[test]
fn a_pod_isolated_for_egress_opens_only_what_a_policy_allows_and_gets_its_answers() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_isolation(CLIENT, ENDPOINT_EGRESS_ISOLATED)?;
    let (client, server) = (sock(CLIENT, 40000), sock(SERVER, 8080));
    let syn = frames::tcp_syn(client, server, b"");
    assert_eq!(bed.from_pod(&syn)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 1);

    bed.set_allow(CLIENT, &tcp_8080(Direction::Egress, SERVER_IDENTITY), true)?;
    let out = bed.from_pod(&syn)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame, delivered_to(SERVER, syn.clone()));
    // Another protocol to the same port, and another port, are not allowed.
    let udp = frames::udp(client, server, b"x");
    assert_eq!(bed.from_pod(&udp)?.verdict, TC_ACT_SHOT);
    let other_port = frames::tcp_syn(sock(CLIENT, 40001), sock(SERVER, 8081), b"");
    assert_eq!(bed.from_pod(&other_port)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 3);

    // The server's answer is an answer, not a flow the server opens.
    let answer = frames::tcp_syn_ack(server, client);
    let out = bed.from_pod(&answer)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(out.frame, delivered_to(CLIENT, answer));
    Ok(())
}

#[test]
fn a_backend_isolated_for_ingress_takes_only_allowed_clients_through_its_service() -> Result<()> {
    let mut bed = testbed()?;
    // Isolated both ways, with no egress rule: its answers still pass.
    bed.set_isolation(SERVER, ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED)?;
    let client = sock(CLIENT, 40000);
    let syn = frames::tcp_syn(client, sock(VIP, 80), b"");
    assert_eq!(bed.from_pod(&syn)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 1);
    // Its retransmission, which finds the flow's entry, is judged the same way.
    assert_eq!(bed.from_pod(&syn)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 2);

    // Allowed on the backend's port (the policy sees the translated packet).
    bed.set_allow(SERVER, &tcp_8080(Direction::Ingress, CLIENT_IDENTITY), true)?;
    bed.bump_route_epoch()?;
    let out = bed.from_pod(&syn)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let server = sock(SERVER, 8080);
    assert_eq!(
        out.frame,
        delivered_to(SERVER, frames::tcp_syn(client, server, b""))
    );
    let answer = frames::tcp_syn_ack(server, client);
    let out = bed.from_pod(&answer)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        out.frame,
        delivered_to(CLIENT, frames::tcp_syn_ack(sock(VIP, 80), client))
    );
    // A flow the server opens is its egress: denied.
    let opened = frames::tcp_syn(sock(SERVER, 5000), sock(CLIENT, 80), b"");
    assert_eq!(bed.from_pod(&opened)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 1);
    Ok(())
}

#[test]
fn a_connection_a_changed_policy_denies_stops_when_the_epoch_moves() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_isolation(SERVER, ENDPOINT_INGRESS_ISOLATED)?;
    let allow = tcp_8080(Direction::Ingress, CLIENT_IDENTITY);
    bed.set_allow(SERVER, &allow, true)?;
    let (client, server) = (sock(CLIENT, 40000), sock(SERVER, 8080));
    let syn = frames::tcp_syn(client, server, b"");
    assert_eq!(bed.from_pod(&syn)?.verdict, TC_ACT_REDIRECT);
    let data = frames::tcp_ack(client, server, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(bed.from_pod(&data)?.verdict, TC_ACT_REDIRECT);

    // The verdict is cached in the flow's entry until the agent moves the epoch on.
    bed.set_allow(SERVER, &allow, false)?;
    assert_eq!(bed.from_pod(&data)?.verdict, TC_ACT_REDIRECT);
    bed.bump_route_epoch()?;
    assert_eq!(bed.from_pod(&data)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 1);
    // Its answers are judged by the flow they belong to: dropped too.
    let answer = frames::tcp_ack(server, client, b"HTTP/1.1 200 OK\r\n");
    assert_eq!(bed.from_pod(&answer)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 2);
    Ok(())
}

#[test]
fn what_the_stack_delivers_to_an_isolated_pod_is_judged_except_the_nodes_own() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_isolation(SERVER, ENDPOINT_INGRESS_ISOLATED)?;
    let server = sock(SERVER, 8080);
    let to_pod = |bed: &Testbed, frame: &[u8]| -> Result<u32> {
        Ok(bed.run_program(program_names::TO_POD, frame, 1)?.0.verdict)
    };
    // A kubelet probe from the node's address.
    let probe = frames::tcp_syn(sock(NODE, 33000), server, b"");
    assert_eq!(to_pod(&bed, &probe)?, TC_ACT_OK);
    // A pod of another node, through the stack, and a UDP datagram from the world.
    let remote = frames::tcp_syn(sock(REMOTE_POD, 33000), server, b"");
    assert_eq!(to_pod(&bed, &remote)?, TC_ACT_SHOT);
    let world = frames::udp(sock(Ipv4Addr::new(203, 0, 113, 9), 53), server, b"x");
    assert_eq!(to_pod(&bed, &world)?, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 2);
    // Allowed from everyone on UDP: the datagram passes.
    let any_udp = Allow {
        direction: Direction::Ingress,
        identity: ferrite_common::policy::IDENTITY_ANY,
        protocol: PROTO_UDP,
        ports: None,
    };
    bed.set_allow(SERVER, &any_udp, true)?;
    assert_eq!(to_pod(&bed, &world)?, TC_ACT_OK);
    Ok(())
}

/// A rule without ports: every protocol, ICMP included (as in Kubernetes).
fn any_protocol(direction: Direction, identity: u32) -> Allow {
    Allow {
        direction,
        identity,
        protocol: 0,
        ports: None,
    }
}

fn udp_53(direction: Direction, identity: u32) -> Allow {
    Allow {
        direction,
        identity,
        protocol: PROTO_UDP,
        ports: Some((53, 53)),
    }
}

/// `frame` (an ICMP error) as a router on the way sent it: from `router`.
fn sent_by(router: Ipv4Addr, frame: &[u8]) -> Result<Vec<u8>> {
    let (mut ip, rest) = etherparse::Ipv4Header::from_slice(&frame[14..])?;
    ip.source = router.octets();
    ip.header_checksum = ip.calc_header_checksum();
    Ok([&frame[..14], &ip.to_bytes()[..], rest].concat())
}

fn to_pod(bed: &Testbed, frame: &[u8]) -> Result<u32> {
    Ok(bed.run_program(program_names::TO_POD, frame, 1)?.0.verdict)
}

#[test]
fn icmp_errors_about_an_allowed_flow_pass_and_others_are_judged_on_their_own() -> Result<()> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
    let mut bed = testbed()?;
    bed.set_isolation(CLIENT, BOTH_WAYS)?;
    bed.set_isolation(SERVER, BOTH_WAYS)?;
    bed.set_allow(CLIENT, &udp_53(Direction::Egress, SERVER_IDENTITY), true)?;
    bed.set_allow(SERVER, &udp_53(Direction::Ingress, CLIENT_IDENTITY), true)?;
    let query = frames::udp(sock(CLIENT, 5000), sock(SERVER, 53), b"q");
    let delivered = bed.from_pod(&query)?;
    assert_eq!(delivered.verdict, TC_ACT_REDIRECT);

    // The server's port unreachable (its egress allows no ICMP, the client's
    // ingress neither) reaches the client as it was sent.
    let refused = frames::icmp_unreachable_for(&delivered.frame, 3, 0)?;
    let out = bed.from_pod(&refused)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, delivered_to(CLIENT, refused.clone()))
    );

    // A router's "fragmentation needed" about the client's datagram to the world,
    // delivered by the stack: about an allowed flow, so it passes.
    bed.set_allow(CLIENT, &udp_53(Direction::Egress, IDENTITY_ANY), true)?;
    let to_world = frames::udp(sock(CLIENT, 5001), sock(WORLD_SERVER, 53), b"q");
    assert_eq!(bed.from_pod(&to_world)?.verdict, TC_ACT_OK);
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        });
    let too_big = sent_by(
        ROUTER,
        &frames::icmp_error_for(&to_world, frag_needed.clone(), 28)?,
    )?;
    assert_eq!(to_pod(&bed, &too_big)?, TC_ACT_OK);
    // The same about a datagram the client never sent: judged as a packet of its own.
    let never_sent = frames::udp(sock(CLIENT, 5999), sock(WORLD_SERVER, 53), b"q");
    let forged = sent_by(
        ROUTER,
        &frames::icmp_error_for(&never_sent, frag_needed, 28)?,
    )?;
    assert_eq!(to_pod(&bed, &forged)?, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 1);
    // A port unreachable about no flow conntrack holds: the server's egress.
    let unknown = frames::udp(sock(CLIENT, 5002), sock(SERVER, 54), b"q");
    let out = bed.from_pod(&frames::icmp_unreachable_for(&unknown, 3, 0)?)?;
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 1);

    // The flow a changed policy denies: its errors are judged on their own too.
    bed.set_allow(SERVER, &udp_53(Direction::Ingress, CLIENT_IDENTITY), false)?;
    bed.bump_route_epoch()?;
    assert_eq!(bed.from_pod(&refused)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 2);
    Ok(())
}

#[test]
fn an_allowed_echo_request_lets_its_reply_pass_and_an_unsolicited_reply_is_judged() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_isolation(CLIENT, BOTH_WAYS)?;
    bed.set_isolation(SERVER, BOTH_WAYS)?;
    // A rule with ports does not allow ICMP.
    bed.set_allow(CLIENT, &tcp_8080(Direction::Egress, SERVER_IDENTITY), true)?;
    let request = frames::icmp_echo(CLIENT, SERVER, true, 7, 1);
    assert_eq!(bed.from_pod(&request)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 1);

    bed.set_allow(
        CLIENT,
        &any_protocol(Direction::Egress, SERVER_IDENTITY),
        true,
    )?;
    bed.set_allow(
        SERVER,
        &any_protocol(Direction::Ingress, CLIENT_IDENTITY),
        true,
    )?;
    let out = bed.from_pod(&request)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, delivered_to(SERVER, request.clone()))
    );
    // The reply passes though the server may send nothing and the client receive
    // nothing on its own.
    let reply = frames::icmp_echo(SERVER, CLIENT, false, 7, 1);
    let out = bed.from_pod(&reply)?;
    assert_eq!(
        (out.verdict, out.frame),
        (TC_ACT_REDIRECT, delivered_to(CLIENT, reply))
    );
    // The next request and its reply: the same flow.
    let next = frames::icmp_echo(CLIENT, SERVER, true, 7, 2);
    assert_eq!(bed.from_pod(&next)?.verdict, TC_ACT_REDIRECT);
    let next_reply = frames::icmp_echo(SERVER, CLIENT, false, 7, 2);
    assert_eq!(bed.from_pod(&next_reply)?.verdict, TC_ACT_REDIRECT);

    // A reply without its request (another identifier), and a request the server
    // opens: the server's egress.
    let unsolicited = frames::icmp_echo(SERVER, CLIENT, false, 8, 1);
    assert_eq!(bed.from_pod(&unsolicited)?.verdict, TC_ACT_SHOT);
    let opened = frames::icmp_echo(SERVER, CLIENT, true, 7, 1);
    assert_eq!(bed.from_pod(&opened)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 3);
    // Identifier 0: the server's request has the tuple of the client's reply.
    let request_0 = frames::icmp_echo(CLIENT, SERVER, true, 0, 1);
    assert_eq!(bed.from_pod(&request_0)?.verdict, TC_ACT_REDIRECT);
    let opened_0 = frames::icmp_echo(SERVER, CLIENT, true, 0, 1);
    assert_eq!(bed.from_pod(&opened_0)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_EGRESS)?, 4);

    // Through the stack: the client's ping to the world and the world's reply.
    bed.set_allow(CLIENT, &any_protocol(Direction::Egress, IDENTITY_ANY), true)?;
    let to_world = frames::icmp_echo(CLIENT, WORLD_SERVER, true, 9, 1);
    assert_eq!(bed.from_pod(&to_world)?.verdict, TC_ACT_OK);
    let from_world = frames::icmp_echo(WORLD_SERVER, CLIENT, false, 9, 1);
    assert_eq!(to_pod(&bed, &from_world)?, TC_ACT_OK);
    let unsolicited = frames::icmp_echo(WORLD_SERVER, CLIENT, false, 10, 1);
    assert_eq!(to_pod(&bed, &unsolicited)?, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 1);

    // A policy change reaches the echo flow when the epoch moves.
    bed.set_allow(
        SERVER,
        &any_protocol(Direction::Ingress, CLIENT_IDENTITY),
        false,
    )?;
    bed.bump_route_epoch()?;
    assert_eq!(bed.from_pod(&next)?.verdict, TC_ACT_SHOT);
    assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 2);
    Ok(())
}

/// A NodePort whose backend is a policed pod of this node: the backend's ingress
/// policy judges the external client (its own address, the target port) before the
/// pod sees anything, in XDP and in the uplink's tcx program without XDP alike.
#[test]
fn an_external_client_of_a_local_backend_is_judged_by_its_ingress_policy_before_delivery(
) -> Result<()> {
    let node_port = sock(NODE, 30080);
    let world_client = sock(Ipv4Addr::new(203, 0, 113, 10), 40000);
    let syn = frames::tcp_syn(world_client, node_port, b"");
    let translated = frames::tcp_syn(world_client, sock(SERVER, 8080), b"");
    for in_tc in [false, true] {
        let mut bed = testbed()?;
        bed.add_service(node_port, PROTO_TCP, 2, 2, &[sock(SERVER, 8080)])?;
        bed.set_service_flags(
            node_port,
            PROTO_TCP,
            svc_flag::EXTERNAL | svc_flag::NODE_PORT,
        )?;
        if in_tc {
            bed.set_config_flags(config_flag::EXTERNAL_IN_TC)?;
        }
        let run = |bed: &Testbed| -> Result<(u32, Vec<u8>)> {
            if in_tc {
                let (out, _) = bed.run_program(program_names::FROM_UPLINK, &syn, 1)?;
                Ok((out.verdict, out.frame))
            } else {
                let out = bed.from_world(&syn)?;
                Ok((out.verdict, out.frame))
            }
        };
        bed.set_isolation(SERVER, ENDPOINT_INGRESS_ISOLATED)?;
        bed.set_allow(SERVER, &tcp_8080(Direction::Ingress, CLIENT_IDENTITY), true)?;
        let (verdict, _) = run(&bed)?;
        assert_eq!(verdict, if in_tc { TC_ACT_SHOT } else { XDP_DROP });
        assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 1, "in tc: {in_tc}");
        assert_eq!(bed.counter(stat::EXTERNAL_NEW_FLOW)?, 0);

        // An ipBlock holding the client: admitted, translated, the client kept.
        bed.set_identity(Ipv4Addr::new(203, 0, 113, 0), 24, WORLD_CLIENTS_IDENTITY)?;
        bed.set_allow(
            SERVER,
            &tcp_8080(Direction::Ingress, WORLD_CLIENTS_IDENTITY),
            true,
        )?;
        bed.bump_route_epoch()?;
        let (verdict, frame) = run(&bed)?;
        if in_tc {
            assert_eq!(
                (verdict, frame),
                (TC_ACT_REDIRECT, delivered_to(SERVER, translated.clone()))
            );
        } else {
            assert_eq!((verdict, frame), (XDP_PASS, translated.clone()));
        }
        assert_eq!(bed.counter(stat::EXTERNAL_NEW_FLOW)?, 1);
        // The backend's answer passes as an answer.
        let answer = frames::tcp_syn_ack(sock(SERVER, 8080), world_client);
        assert_ne!(bed.from_pod(&answer)?.verdict, TC_ACT_SHOT);
        assert_eq!(bed.counter(stat::DROP_POLICY_INGRESS)?, 1);
    }
    Ok(())
}
