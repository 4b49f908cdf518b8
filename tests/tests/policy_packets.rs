//! NetworkPolicy in the datapath, packet by packet (BPF_PROG_TEST_RUN): what an
//! isolated pod may send and receive, that answers of an allowed flow pass as
//! answers, and that a policy change reaches established flows when the agent moves
//! the epoch on. Map entries are laid out and written by the agent's own plan and
//! writer. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use ferrite_agent::model::policy::{Allow, Direction};
use ferrite_common::{
    pod_mac_for,
    policy::{ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED},
    program_names, stat, PROTO_TCP, PROTO_UDP,
};
use ferrite_tests::{
    frames::{self, GATEWAY_MAC},
    testbed::{Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const CLIENT_IDENTITY: u32 = 17;
const SERVER_IDENTITY: u32 = 18;

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
