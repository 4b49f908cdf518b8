//! Explain runs (`ferrite explain`), packet by packet (BPF_PROG_TEST_RUN): a packet
//! run through a program's explain copy leaves every map byte for byte as it was
//! (bpftool dumps before and after), counters included, and its trace names the
//! backend, verdict and frame the same packet then gets from the real program. Needs
//! root.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
};

use anyhow::Result;
use ferrite_agent::{
    explain::run::TcContext,
    plan::{Op, Route6Key},
};
use ferrite_common::{
    explain::{choice, step, verdict, write, SockRequest},
    monitor,
    policy::ENDPOINT_INGRESS_ISOLATED,
    program_names, stat, svc_flag, EndpointInfo, ExplainTrace, RouteInfo, ServiceKey, PROTO_TCP,
    PROTO_UDP, ROUTE_REMOTE,
};
use ferrite_tests::{
    frames::{self, decode_checked},
    frames6::{self, Ipv6Frame},
    testbed::{
        Explained, Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, XDP_PASS,
    },
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 11),
    Ipv4Addr::new(10, 244, 0, 12),
    Ipv4Addr::new(10, 244, 0, 13),
];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 7);
const REMOTE_NODE_PORT: SocketAddrV4 = SocketAddrV4::new(NODE_IP, 30081);
const WORLD_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40000);

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A node with a client pod and three backend pods behind ClusterIP 10.96.0.10
/// (80 -> 8080 TCP, 53 -> 5353 UDP), a ClusterIP without backends, one with
/// session affinity, another node's pod CIDR, and a NodePort whose backend is a pod
/// of that node.
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.set_node_ip(NODE_IP)?;
    bed.add_endpoint(CLIENT, TEST_RUN_IFINDEX)?;
    for backend in BACKENDS {
        bed.add_endpoint(backend, TEST_RUN_IFINDEX)?;
    }
    let tcp: Vec<_> = BACKENDS.iter().map(|ip| sock(*ip, 8080)).collect();
    let udp: Vec<_> = BACKENDS.iter().map(|ip| sock(*ip, 5353)).collect();
    bed.add_service(sock(VIP, 80), PROTO_TCP, 1, 1, &tcp)?;
    bed.add_service(sock(VIP, 53), PROTO_UDP, 2, 11, &udp)?;
    bed.add_service(sock(EMPTY_VIP, 80), PROTO_TCP, 3, 21, &[])?;
    bed.add_frontend(sock(STICKY_VIP, 80), PROTO_TCP, 4, &[1, 2, 3])?;
    bed.set_affinity(sock(STICKY_VIP, 80), PROTO_TCP, 10_800)?;
    bed.add_route(Ipv4Addr::new(10, 244, 1, 0), 24, OTHER_NODE, ROUTE_REMOTE)?;
    bed.add_service(
        REMOTE_NODE_PORT,
        PROTO_TCP,
        5,
        31,
        &[sock(REMOTE_POD, 8080)],
    )?;
    bed.set_service_flags(
        REMOTE_NODE_PORT,
        PROTO_TCP,
        svc_flag::EXTERNAL | svc_flag::NODE_PORT,
    )?;
    Ok(bed)
}

/// Explain `frame` (`explain`), checking that it changed no map; then run the same
/// frame for real (`real`), checking that it did (the dumps see writes).
fn explain_then_run<T>(
    bed: &Testbed,
    explain: impl FnOnce() -> Result<Explained>,
    real: impl FnOnce() -> Result<T>,
) -> Result<(Explained, T)> {
    let before = bed.map_dumps()?;
    let explained = explain()?;
    assert_unchanged(&before, &bed.map_dumps()?);
    let out = real()?;
    assert_ne!(before, bed.map_dumps()?, "the real run wrote nothing");
    Ok((explained, out))
}

fn assert_unchanged(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    for (name, dump) in before {
        assert_eq!(Some(dump), after.get(name), "{name} changed");
    }
}

fn has(trace: &ExplainTrace, counter: u32) -> bool {
    trace.counted & (1 << counter) != 0
}

#[test]
fn an_explained_new_cluster_ip_flow_writes_nothing_and_gets_what_the_real_one_gets() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let client = sock(CLIENT, 40000);
    for (nonce, frame, port) in [
        (1, frames::tcp_syn(client, sock(VIP, 80), b""), 8080),
        (2, frames::udp(client, sock(VIP, 53), b"query"), 5353),
    ] {
        let (explained, real) = explain_then_run(
            &bed,
            || explainer.from_pod(&frame, nonce),
            || bed.from_pod(&frame),
        )?;
        let trace = explained.trace;
        assert_eq!(trace.nonce, nonce as u32);
        // The same verdict and the very frame the real run leaves.
        assert_eq!(explained.run.verdict, TC_ACT_REDIRECT);
        assert_eq!(real.verdict, TC_ACT_REDIRECT);
        assert_eq!(explained.run.frame, real.frame);
        let backend = decode_checked(&real.frame)?.destination;
        assert_eq!(
            sock(Ipv4Addr::from(trace.backend.address), trace.backend.port),
            backend
        );
        assert_eq!(backend.port(), port);
        let steps = step::SOURCE_CHECKED | step::CT_MISS | step::FRONTEND | step::BACKEND_CHOSEN;
        assert_eq!(trace.steps & steps, steps, "steps {:#x}", trace.steps);
        assert_eq!(trace.choice, choice::HASH);
        assert!((1..=3).contains(&trace.backend_slot));
        assert_eq!(trace.frontend.address, VIP.octets());
        assert_eq!(trace.service.count, 3);
        assert_eq!(trace.verdict, verdict::TO_POD);
        assert_eq!(trace.verdict_target, TEST_RUN_IFINDEX);
        assert!(has(&trace, stat::SERVICE_NEW_FLOW) && has(&trace, stat::DELIVERED_LOCAL));
        assert_eq!(
            trace.skipped,
            write::CT_CREATE | write::LB_STATS | write::MONITOR_EVENT,
            "skipped {:#x}",
            trace.skipped
        );
    }
    // Only the real runs counted.
    assert_eq!(bed.counter(stat::SERVICE_NEW_FLOW)?, 2);
    Ok(())
}

#[test]
fn an_explained_established_packet_follows_conntrack_without_touching_it() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let client = sock(CLIENT, 40001);
    let backend = decode_checked(
        &bed.from_pod(&frames::tcp_syn(client, sock(VIP, 80), b""))?
            .frame,
    )?
    .destination;
    let ack = frames::tcp_ack(client, sock(VIP, 80), b"GET /");
    // The flow's first packet after the SYN: its source and route are not cached yet.
    let (explained, real) =
        explain_then_run(&bed, || explainer.from_pod(&ack, 3), || bed.from_pod(&ack))?;
    let trace = explained.trace;
    assert_eq!(explained.run.frame, real.frame);
    assert_eq!(decode_checked(&real.frame)?.destination, backend);
    assert_eq!(trace.steps & step::CT_HIT, step::CT_HIT);
    assert_eq!(
        trace.steps & step::BACKEND_CHOSEN,
        0,
        "conntrack holds the backend"
    );
    assert_eq!(
        trace.steps & (step::SOURCE_CHECKED | step::ROUTE_RESOLVED),
        step::SOURCE_CHECKED | step::ROUTE_RESOLVED
    );
    assert_eq!(
        trace.skipped,
        write::CT_ACCOUNTING | write::CT_CACHE,
        "skipped {:#x}",
        trace.skipped
    );
    assert!(has(&trace, stat::SERVICE_ESTABLISHED));
    // Now cached by the real packet: the next one is explained from the caches.
    let before = bed.map_dumps()?;
    let explained = explainer.from_pod(&ack, 4)?;
    assert_unchanged(&before, &bed.map_dumps()?);
    assert_eq!(explained.run.frame, real.frame);
    let trace = explained.trace;
    assert_eq!(trace.steps & step::SOURCE_CACHED, step::SOURCE_CACHED);
    assert_eq!(trace.steps & step::ROUTE_RESOLVED, 0);
    assert_eq!(trace.skipped, write::CT_ACCOUNTING);
    Ok(())
}

#[test]
fn an_explained_spoofed_packet_is_dropped_without_counting_or_logging() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let spoofed = frames::tcp_syn(
        sock(Ipv4Addr::new(10, 244, 0, 99), 40000),
        sock(VIP, 80),
        b"",
    );
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_pod(&spoofed, 5),
        || bed.from_pod(&spoofed),
    )?;
    assert_eq!(
        (explained.run.verdict, real.verdict),
        (TC_ACT_SHOT, TC_ACT_SHOT)
    );
    let trace = explained.trace;
    assert_eq!(trace.verdict, verdict::DROP);
    assert_eq!(trace.drop_reason, stat::DROP_SPOOFED);
    assert!(has(&trace, stat::DROP_SPOOFED));
    assert_eq!(trace.skipped, write::DROP_LOG);
    assert_eq!(trace.steps & step::SOURCE_CHECKED, 0);
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 1, "the real run only");
    Ok(())
}

#[test]
fn an_explained_flow_to_a_service_without_backends_is_refused_like_a_real_one() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let syn = frames::tcp_syn(sock(CLIENT, 40002), sock(EMPTY_VIP, 80), b"");
    let (explained, real) =
        explain_then_run(&bed, || explainer.from_pod(&syn, 6), || bed.from_pod(&syn))?;
    assert_eq!(explained.run.verdict, real.verdict);
    assert_eq!(explained.run.frame, real.frame);
    assert_eq!(
        explained.run.frame,
        frames::icmp_unreachable_for(&syn, 3, 0)?
    );
    let trace = explained.trace;
    assert_eq!(trace.verdict, verdict::BOUNCE);
    assert_eq!(trace.steps & step::FRONTEND, step::FRONTEND);
    assert_eq!(trace.service.count, 0);
    assert_eq!(trace.steps & step::BACKEND_CHOSEN, 0);
    assert!(has(&trace, stat::SERVICE_REJECTED));
    assert_eq!(bed.counter(stat::SERVICE_REJECTED)?, 1, "the real run only");
    Ok(())
}

#[test]
fn an_explained_flow_neither_makes_nor_refreshes_an_affinity_pin() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let first = frames::tcp_syn(sock(CLIENT, 40003), sock(STICKY_VIP, 80), b"");
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_pod(&first, 7),
        || bed.from_pod(&first),
    )?;
    assert_eq!(explained.run.frame, real.frame);
    assert_eq!(
        explained.trace.skipped & write::AFFINITY,
        write::AFFINITY,
        "the pin it would make"
    );
    assert_eq!(explained.trace.choice, choice::HASH);
    // Pinned now: another flow of the client goes where the pin says, and the
    // explain run leaves the pin's clock alone.
    let second = frames::tcp_syn(sock(CLIENT, 40004), sock(STICKY_VIP, 80), b"");
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_pod(&second, 8),
        || bed.from_pod(&second),
    )?;
    assert_eq!(explained.trace.choice, choice::AFFINITY);
    assert_eq!(explained.trace.skipped & write::AFFINITY, write::AFFINITY);
    assert_eq!(explained.run.frame, real.frame);
    Ok(())
}

#[test]
fn an_explained_nodeport_flow_to_another_node_claims_the_snat_port_the_real_one_gets() -> Result<()>
{
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let syn = frames::tcp_syn(WORLD_CLIENT, REMOTE_NODE_PORT, b"");
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_world(&syn, 9),
        || bed.from_world(&syn),
    )?;
    assert_eq!((explained.run.verdict, real.verdict), (XDP_PASS, XDP_PASS));
    assert_eq!(explained.run.frame, real.frame);
    let out = decode_checked(&real.frame)?;
    let trace = explained.trace;
    assert_eq!(trace.steps & step::SNAT, step::SNAT);
    assert_eq!(
        sock(Ipv4Addr::from(trace.snat_address), trace.snat_port),
        out.source
    );
    assert_eq!(out.destination, sock(REMOTE_POD, 8080));
    assert_eq!(trace.verdict, verdict::PASS);
    assert!(has(&trace, stat::EXTERNAL_SNAT) && has(&trace, stat::EXTERNAL_NEW_FLOW));
    assert_eq!(
        bed.counter(stat::EXTERNAL_NEW_FLOW)?,
        1,
        "the real run only"
    );
    Ok(())
}

#[test]
fn an_explained_overlay_packet_takes_its_tunnel_key_from_the_control_block() -> Result<()> {
    let mut bed = testbed()?;
    bed.update_config(|config| config.vni = 1)?;
    let explainer = bed.explainer()?;
    let frame = frames::tcp_syn(sock(REMOTE_POD, 40000), sock(BACKENDS[0], 8080), b"");
    let from = |sender: Ipv4Addr| TcContext {
        ifindex: TEST_RUN_IFINDEX,
        cb: [1, u32::from(sender), 0, 0, 0],
    };
    let before = bed.map_dumps()?;
    let delivered = explainer.tc(
        program_names::EXPLAIN_OVERLAY,
        &frame,
        &from(OTHER_NODE),
        10,
    )?;
    assert_eq!(delivered.run.verdict, TC_ACT_REDIRECT);
    assert_eq!(delivered.trace.verdict, verdict::TO_POD);
    assert!(has(&delivered.trace, stat::RECEIVED_FROM_NODE));
    assert_eq!(
        delivered.trace.steps & step::SOURCE_CHECKED,
        step::SOURCE_CHECKED
    );
    // From a node that does not own the source's pod CIDR: spoofed.
    let spoofed = explainer.tc(program_names::EXPLAIN_OVERLAY, &frame, &from(NODE_IP), 11)?;
    assert_eq!(spoofed.run.verdict, TC_ACT_SHOT);
    assert_eq!(spoofed.trace.drop_reason, stat::DROP_SPOOFED);
    assert_unchanged(&before, &bed.map_dumps()?);
    Ok(())
}

#[test]
fn an_explained_socket_call_gets_a_backend_as_the_socket_programs_choose() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let request = |address: Ipv4Addr, port: u16, cookie: u64| SockRequest {
        address: address.octets(),
        port,
        proto: PROTO_TCP,
        cookie,
        ..SockRequest::default()
    };
    let before = bed.map_dumps()?;
    let mut chosen = std::collections::BTreeSet::new();
    for cookie in 1..=32u64 {
        let explained = explainer.socket(request(VIP, 80, cookie), cookie as u16)?;
        assert_eq!(explained.run.verdict, TC_ACT_OK);
        let trace = explained.trace;
        assert_eq!(trace.verdict, verdict::PASS);
        assert_eq!(
            trace.frontend,
            ServiceKey::new(VIP, 80, PROTO_TCP, 0),
            "the master key"
        );
        assert_eq!(trace.choice, choice::HASH);
        assert!(has(&trace, stat::SOCK_TRANSLATED));
        // The same cookie, the same backend.
        let again = explainer.socket(request(VIP, 80, cookie), 100)?.trace;
        assert_eq!(again.backend_id, trace.backend_id);
        chosen.insert(trace.backend_id);
    }
    assert_eq!(
        chosen.len(),
        3,
        "cookies spread over every backend: {chosen:?}"
    );
    let refused = explainer.socket(request(EMPTY_VIP, 80, 1), 101)?;
    assert_eq!(refused.run.verdict, TC_ACT_SHOT);
    assert_eq!(refused.trace.drop_reason, stat::SOCK_REFUSED);
    let untouched = explainer.socket(request(Ipv4Addr::new(10, 96, 9, 9), 80, 1), 102)?;
    assert_eq!(untouched.trace.steps & step::FRONTEND, 0);
    assert_eq!(untouched.trace.verdict, verdict::PASS);
    assert_unchanged(&before, &bed.map_dumps()?);
    Ok(())
}

#[test]
fn explained_flows_and_drops_send_monitors_no_event() -> Result<()> {
    let mut bed = testbed()?;
    bed.set_monitor(monitor::WANT_DROPS | monitor::WANT_FLOWS)?;
    let new_flow = frames::tcp_syn(sock(CLIENT, 40006), sock(VIP, 80), b"");
    let spoofed = frames::tcp_syn(
        sock(Ipv4Addr::new(10, 244, 0, 99), 40006),
        sock(VIP, 80),
        b"",
    );
    let world = frames::tcp_syn(WORLD_CLIENT, REMOTE_NODE_PORT, b"");
    {
        let explainer = bed.explainer()?;
        explainer.from_pod(&new_flow, 13)?;
        let dropped = explainer.from_pod(&spoofed, 14)?;
        assert_eq!(dropped.trace.drop_reason, stat::DROP_SPOOFED);
        explainer.from_world(&world, 15)?;
    }
    assert_eq!(bed.take_events()?.len(), 0, "an explain run told monitors");
    // The same packets for real: a new flow, a drop and a new external flow.
    bed.from_pod(&new_flow)?;
    bed.from_pod(&spoofed)?;
    bed.from_world(&world)?;
    assert_eq!(bed.take_events()?.len(), 3);
    Ok(())
}

#[test]
fn the_attached_programs_ignore_the_explain_mark() -> Result<()> {
    let bed = testbed()?;
    let explainer = bed.explainer()?;
    let syn = frames::tcp_syn(sock(CLIENT, 40005), sock(VIP, 80), b"");
    let context = TcContext {
        ifindex: TEST_RUN_IFINDEX,
        cb: [0; 5],
    };
    let before = bed.map_dumps()?;
    // The real program with an explain run's mark: processed and written as any.
    let mark = ferrite_tests::testbed::explain_word(12);
    let out = explainer.tc_with_mark(program_names::FROM_POD, &syn, &context, mark)?;
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_ne!(before, bed.map_dumps()?);
    assert_eq!(bed.counter(stat::SERVICE_NEW_FLOW)?, 1);
    // And an explain copy runs nothing without the mark.
    let unmarked = explainer.tc_with_mark(program_names::EXPLAIN_POD, &syn, &context, 0)?;
    assert_eq!(unmarked.verdict, TC_ACT_SHOT);
    Ok(())
}

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 2);
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 3);
/// A pod of the other node, whose IPv6 pod CIDR is `fd00:10:244:0:0:1::/96`.
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 1, 0, 7);
/// The web pod's host veth: where delivery to it is redirected.
const WEB6_VETH: u32 = 42;

/// A dual-stack node: the client pod (sending through the test run's device) and
/// the web pod, both by their IPv6 addresses, the other node's IPv6 pod CIDR, and
/// `ferrite_progs` filled as the agent fills it.
fn testbed6(web_flags: u32) -> Result<Testbed> {
    let mut bed = testbed()?;
    let endpoint = |ifindex, pod_mac, flags| EndpointInfo {
        ifindex,
        pod_mac,
        host_mac: frames::GATEWAY_MAC,
        flags,
    };
    bed.add_endpoint6(CLIENT6, endpoint(TEST_RUN_IFINDEX, [0x0a; 6], 0))?;
    bed.add_endpoint6(WEB6, endpoint(WEB6_VETH, [0x0b; 6], web_flags))?;
    let route = RouteInfo {
        node_ip: OTHER_NODE.octets(),
        vtep_mac: ferrite_common::vtep_mac_for(OTHER_NODE),
        flags: ROUTE_REMOTE,
    };
    let cidr = Route6Key {
        prefix_len: 96,
        network: REMOTE_POD6.octets(),
    };
    bed.node_maps().apply(&[Op::PutRoute6(cidr, route)])?;
    bed.fill_tail_calls()?;
    Ok(bed)
}

/// A UDP datagram from `source` to `destination` (port 8080), as a pod sends it.
fn udp6(source: Ipv6Addr, destination: Ipv6Addr) -> Vec<u8> {
    Ipv6Frame {
        eth_dst: frames::GATEWAY_MAC,
        eth_src: [0x0a; 6],
        source,
        destination,
        hop_limit: 64,
        extensions: vec![],
        proto: PROTO_UDP,
        upper: frames6::udp(source, 40000, destination, 8080, b"over IPv6"),
    }
    .build()
}

/// The hop limit of an Ethernet/IPv6 frame.
fn hop_limit(frame: &[u8]) -> u8 {
    frame[14 + 7]
}

#[test]
fn an_explained_ipv6_flow_to_a_pod_of_this_node_follows_the_real_path_writing_nothing() -> Result<()>
{
    let bed = testbed6(0)?;
    let explainer = bed.explainer()?;
    let frame = udp6(CLIENT6, WEB6);
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_pod(&frame, 20),
        || bed.from_pod(&frame),
    )?;
    assert_eq!(explained.run.verdict, TC_ACT_REDIRECT);
    assert_eq!(real.verdict, TC_ACT_REDIRECT);
    // The frame the real run leaves: the web pod's MACs, one hop less.
    assert_eq!(explained.run.frame, real.frame);
    assert_eq!(hop_limit(&explained.run.frame), hop_limit(&frame) - 1);
    let trace = explained.trace;
    assert_eq!(trace.nonce, 20);
    assert_eq!(trace.verdict, verdict::TO_POD);
    assert_eq!(trace.verdict_target, WEB6_VETH);
    assert_eq!(trace.steps & step::SOURCE_CHECKED, step::SOURCE_CHECKED);
    assert!(has(&trace, stat::DELIVERED_LOCAL));
    assert_eq!(trace.skipped, 0, "the IPv6 path keeps no state");
    assert_eq!(bed.counter(stat::DELIVERED_LOCAL)?, 1, "the real run only");
    Ok(())
}

#[test]
fn an_explained_spoofed_ipv6_packet_is_dropped_without_counting() -> Result<()> {
    let bed = testbed6(0)?;
    let explainer = bed.explainer()?;
    let spoofed = udp6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 99), WEB6);
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_pod(&spoofed, 21),
        || bed.from_pod(&spoofed),
    )?;
    assert_eq!(
        (explained.run.verdict, real.verdict),
        (TC_ACT_SHOT, TC_ACT_SHOT)
    );
    let trace = explained.trace;
    assert_eq!(trace.verdict, verdict::DROP);
    assert_eq!(trace.drop_reason, stat::DROP_SPOOFED);
    assert_eq!(trace.skipped, write::DROP_LOG);
    assert_eq!(trace.steps & step::SOURCE_CHECKED, 0);
    assert_eq!(bed.counter(stat::DROP_SPOOFED)?, 1, "the real run only");
    Ok(())
}

#[test]
fn an_explained_ipv6_flow_to_an_isolated_pod_gets_the_policy_drop() -> Result<()> {
    let bed = testbed6(ENDPOINT_INGRESS_ISOLATED)?;
    let explainer = bed.explainer()?;
    let frame = udp6(CLIENT6, WEB6);
    let (explained, real) = explain_then_run(
        &bed,
        || explainer.from_pod(&frame, 22),
        || bed.from_pod(&frame),
    )?;
    assert_eq!(
        (explained.run.verdict, real.verdict),
        (TC_ACT_SHOT, TC_ACT_SHOT)
    );
    assert_eq!(explained.trace.drop_reason, stat::DROP_POLICY_INGRESS);
    assert_eq!(
        bed.counter(stat::DROP_POLICY_INGRESS)?,
        1,
        "the real run only"
    );
    Ok(())
}

#[test]
fn an_explained_ipv6_overlay_packet_is_checked_against_the_senders_pod_cidr() -> Result<()> {
    let mut bed = testbed6(0)?;
    bed.update_config(|config| config.vni = 1)?;
    let explainer = bed.explainer()?;
    let frame = udp6(REMOTE_POD6, WEB6);
    let from = |sender: Ipv4Addr| TcContext {
        ifindex: TEST_RUN_IFINDEX,
        cb: [1, u32::from(sender), 0, 0, 0],
    };
    let before = bed.map_dumps()?;
    let delivered = explainer.tc(
        program_names::EXPLAIN_OVERLAY,
        &frame,
        &from(OTHER_NODE),
        23,
    )?;
    assert_eq!(delivered.run.verdict, TC_ACT_REDIRECT);
    assert_eq!(delivered.trace.verdict, verdict::TO_POD);
    assert_eq!(delivered.trace.verdict_target, WEB6_VETH);
    assert!(has(&delivered.trace, stat::RECEIVED_FROM_NODE));
    assert_eq!(
        delivered.trace.steps & step::SOURCE_CHECKED,
        step::SOURCE_CHECKED
    );
    assert_eq!(hop_limit(&delivered.run.frame), hop_limit(&frame) - 1);
    let spoofed = explainer.tc(program_names::EXPLAIN_OVERLAY, &frame, &from(NODE_IP), 24)?;
    assert_eq!(spoofed.run.verdict, TC_ACT_SHOT);
    assert_eq!(spoofed.trace.drop_reason, stat::DROP_SPOOFED);
    assert_unchanged(&before, &bed.map_dumps()?);
    assert_eq!(bed.counter(stat::RECEIVED_FROM_NODE)?, 0);
    Ok(())
}
