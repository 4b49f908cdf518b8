//! The datapath's IPv6 path, packet by packet (BPF_PROG_TEST_RUN): what a
//! dual-stack pod sends, fed to `ferrite_from_pod`, which hands IPv6 to
//! `ferrite_from_pod6` by a tail call through `ferrite_progs`, filled as the agent
//! fills it. The exact frame and verdict come out; expected frames are built
//! independently. Also what another node sends over the overlay (behind the
//! tunnel-key shim): from its IPv6 pod CIDR only. Needs root.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use ferrite_common::{
    explain::verdict,
    pod_mac_for,
    policy::{ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED},
    program_names, stat, EndpointInfo, DEFAULT_VNI, PROTO_ICMPV6, PROTO_UDP, ROUTE_NODE,
    ROUTE_REMOTE,
};
use ferrite_tests::{
    frames::GATEWAY_MAC,
    frames6::{
        self, fragment_header, options_header, Extension, Ipv6Frame, NEXT_DESTINATION_OPTIONS,
        NEXT_HOP_BY_HOP, NEXT_ROUTING,
    },
    testbed::{Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX},
    tunnel_shim::TunnelShim,
};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 2);
const WEB: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 3);
/// A pod of another node (no entry here).
const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 1, 5);
/// The dual-stack pods' MACs: their IPv4 addresses'.
const CLIENT_MAC: [u8; 6] = pod_mac_for(Ipv4Addr::new(10, 244, 0, 2));
const WEB_MAC: [u8; 6] = pod_mac_for(Ipv4Addr::new(10, 244, 0, 3));
/// The host veth of the web pod: where delivery to it is redirected.
const WEB_VETH: u32 = 42;

fn endpoint(ifindex: u32, pod_mac: [u8; 6], flags: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        pod_mac,
        host_mac: GATEWAY_MAC,
        flags,
    }
}

/// A node with the client pod (sending through the test run's device) and the web
/// pod, and `ferrite_progs` filled.
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.add_endpoint6(CLIENT, endpoint(TEST_RUN_IFINDEX, CLIENT_MAC, 0))?;
    bed.add_endpoint6(WEB, endpoint(WEB_VETH, WEB_MAC, 0))?;
    bed.fill_tail_calls()?;
    Ok(bed)
}

/// A UDP datagram from `source` to `destination`, as the client pod sends it (to
/// its gateway's MAC), through `extensions`.
fn udp_frame(source: Ipv6Addr, destination: Ipv6Addr, extensions: Vec<Extension>) -> Ipv6Frame {
    Ipv6Frame {
        eth_dst: GATEWAY_MAC,
        eth_src: CLIENT_MAC,
        source,
        destination,
        hop_limit: 64,
        extensions,
        proto: PROTO_UDP,
        upper: frames6::udp(source, 40000, destination, 8080, b"over IPv6"),
    }
}

/// `frame` as the web pod receives it: from its gateway, one hop less.
fn delivered_to_web(frame: &Ipv6Frame) -> Vec<u8> {
    Ipv6Frame {
        eth_dst: WEB_MAC,
        eth_src: GATEWAY_MAC,
        hop_limit: frame.hop_limit - 1,
        ..frame.clone()
    }
    .build()
}

/// Run `frame` through `ferrite_from_pod`; assert the verdict and that `counter`
/// moved by one. Returns the frame that came out.
fn expect(bed: &Testbed, frame: &[u8], verdict: u32, counter: u32) -> Result<Vec<u8>> {
    let before = bed.counter(counter)?;
    let out = bed.from_pod(frame)?;
    let name = stat::NAMES[counter as usize];
    assert_eq!(out.verdict, verdict, "verdict (expected {name})");
    assert_eq!(bed.counter(counter)?, before + 1, "counter {name}");
    Ok(out.frame)
}

/// Another node on the overlay: its IPv4 address (the tunnel's end), its IPv6 pod
/// CIDR with a pod in it, and its IPv6 address (the agent's `ROUTE_NODE` /128 in
/// `ferrite_routes6`, there for the socket programs' NodePorts).
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const OTHER_POD_CIDR: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0);
const OTHER_NODES_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const OTHER_NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// Over the overlay, another node sends IPv6 from its pods' addresses, not from its
/// own IPv6 address: that node's /128 in `ferrite_routes6` changes no anti-spoofing
/// verdict.
#[test]
fn over_the_overlay_another_node_sends_ipv6_from_its_pods_not_from_its_own_address() -> Result<()> {
    let mut bed = testbed()?;
    bed.update_config(|config| config.vni = DEFAULT_VNI)?;
    bed.add_route6(OTHER_POD_CIDR, 64, OTHER_NODE, ROUTE_REMOTE)?;
    bed.add_route6(OTHER_NODE6, 128, OTHER_NODE, ROUTE_NODE)?;
    let overlay = TunnelShim::new(
        &[bed.program_fd(program_names::FROM_OVERLAY)?],
        DEFAULT_VNI,
        OTHER_NODE,
    )?;
    let run = |frame: &Ipv6Frame, verdict: u32, counter: u32| -> Result<Vec<u8>> {
        let before = bed.counter(counter)?;
        let (out, _) = overlay.run(0, &frame.build(), 1)?;
        let name = stat::NAMES[counter as usize];
        assert_eq!(out.verdict, verdict, "verdict (expected {name})");
        assert_eq!(bed.counter(counter)?, before + 1, "counter {name}");
        Ok(out.frame)
    };
    let from_its_pod = udp_frame(OTHER_NODES_POD, WEB, vec![]);
    let out = run(&from_its_pod, TC_ACT_REDIRECT, stat::RECEIVED_FROM_NODE)?;
    assert_eq!(out, delivered_to_web(&from_its_pod));
    let from_its_address = udp_frame(OTHER_NODE6, WEB, vec![]);
    run(&from_its_address, TC_ACT_SHOT, stat::DROP_SPOOFED)?;
    Ok(())
}

#[test]
fn a_pods_ipv6_to_a_pod_of_the_node_is_delivered_with_its_macs_and_one_hop_less() -> Result<()> {
    let bed = testbed()?;
    let frame = udp_frame(CLIENT, WEB, vec![]);
    let out = expect(&bed, &frame.build(), TC_ACT_REDIRECT, stat::DELIVERED_LOCAL)?;
    assert_eq!(out, delivered_to_web(&frame));
    assert_eq!(bed.drops()?, vec![]);
    Ok(())
}

#[test]
fn a_hop_limit_of_one_to_a_pod_of_the_node_expires() -> Result<()> {
    let bed = testbed()?;
    for hop_limit in [0, 1] {
        let frame = Ipv6Frame {
            hop_limit,
            ..udp_frame(CLIENT, WEB, vec![])
        };
        expect(&bed, &frame.build(), TC_ACT_SHOT, stat::DROP_TTL_EXCEEDED)?;
    }
    let frame = Ipv6Frame {
        hop_limit: 2,
        ..udp_frame(CLIENT, WEB, vec![])
    };
    let out = expect(&bed, &frame.build(), TC_ACT_REDIRECT, stat::DELIVERED_LOCAL)?;
    assert_eq!(out, delivered_to_web(&frame));
    Ok(())
}

#[test]
fn a_source_that_is_not_the_pods_own_address_on_its_own_veth_is_dropped() -> Result<()> {
    let mut bed = testbed()?;
    // An address no pod of the node has.
    let spoofed = udp_frame(REMOTE, WEB, vec![]).build();
    expect(&bed, &spoofed, TC_ACT_SHOT, stat::DROP_SPOOFED)?;
    // The web pod's address, sent through the client's veth.
    let other_pods = udp_frame(WEB, CLIENT, vec![]).build();
    expect(&bed, &other_pods, TC_ACT_SHOT, stat::DROP_SPOOFED)?;
    // The client's own address, its entry naming another veth.
    bed.add_endpoint6(CLIENT, endpoint(7, CLIENT_MAC, 0))?;
    let wrong_veth = udp_frame(CLIENT, WEB, vec![]).build();
    expect(&bed, &wrong_veth, TC_ACT_SHOT, stat::DROP_SPOOFED)?;
    Ok(())
}

#[test]
fn what_is_for_no_pod_of_the_node_passes_to_the_stack_unchanged() -> Result<()> {
    let bed = testbed()?;
    for destination in [REMOTE, "2001:db8::1".parse()?] {
        let frame = udp_frame(CLIENT, destination, vec![]).build();
        let out = expect(&bed, &frame, TC_ACT_OK, stat::PASSED_TO_STACK)?;
        assert_eq!(out, frame);
    }
    Ok(())
}

#[test]
fn neighbour_discovery_and_multicast_listener_messages_pass_to_the_stack_from_any_source(
) -> Result<()> {
    let bed = testbed()?;
    let link_local: Ipv6Addr = "fe80::5858:aff:fef4:2".parse()?;
    let gateway: Ipv6Addr = "fe80::ecee:eeff:feee:eeee".parse()?;
    let all_routers: Ipv6Addr = "ff02::2".parse()?;
    let solicited_node: Ipv6Addr = "ff02::1:ffee:eeee".parse()?;
    let mld_routers: Ipv6Addr = "ff02::16".parse()?;
    for (name, source, destination, icmp_type, extensions) in [
        ("router solicitation", link_local, all_routers, 133, vec![]),
        (
            "neighbour solicitation",
            Ipv6Addr::UNSPECIFIED,
            solicited_node,
            135,
            vec![],
        ),
        ("neighbour advertisement", link_local, gateway, 136, vec![]),
        // Behind a hop-by-hop header (its router alert option).
        (
            "MLDv2 report",
            link_local,
            mld_routers,
            143,
            vec![options_header(NEXT_HOP_BY_HOP, 0)],
        ),
    ] {
        let frame = Ipv6Frame {
            hop_limit: 255,
            proto: PROTO_ICMPV6,
            upper: frames6::icmpv6(source, destination, icmp_type, &[0; 20]),
            ..udp_frame(source, destination, extensions)
        }
        .build();
        let out = expect(&bed, &frame, TC_ACT_OK, stat::PASSED_ND)?;
        assert_eq!(out, frame, "{name}: passed as it came");
    }
    // Discovery messages are never for a routed address: one to a pod elsewhere
    // from a stranger is judged as any packet (and fails anti-spoofing).
    let routed = Ipv6Frame {
        hop_limit: 255,
        proto: PROTO_ICMPV6,
        upper: frames6::icmpv6(link_local, REMOTE, 135, &[0; 20]),
        ..udp_frame(link_local, REMOTE, vec![])
    }
    .build();
    expect(&bed, &routed, TC_ACT_SHOT, stat::DROP_SPOOFED)?;
    // Nor fragmented (RFC 6980).
    let fragmented = Ipv6Frame {
        hop_limit: 255,
        proto: PROTO_ICMPV6,
        upper: frames6::icmpv6(link_local, all_routers, 133, &[0; 4]),
        ..udp_frame(link_local, all_routers, vec![fragment_header(0, false, 1)])
    }
    .build();
    expect(&bed, &fragmented, TC_ACT_SHOT, stat::DROP_SPOOFED)?;
    Ok(())
}

#[test]
fn extension_headers_are_walked_to_the_upper_layer_and_a_ninth_is_dropped() -> Result<()> {
    let bed = testbed()?;
    // Hop-by-hop, destination options (16 bytes), first fragment: delivered whole.
    let chain = vec![
        options_header(NEXT_HOP_BY_HOP, 0),
        options_header(NEXT_DESTINATION_OPTIONS, 1),
        fragment_header(0, true, 0x1234),
    ];
    let frame = udp_frame(CLIENT, WEB, chain);
    let out = expect(&bed, &frame.build(), TC_ACT_REDIRECT, stat::DELIVERED_LOCAL)?;
    assert_eq!(out, delivered_to_web(&frame));
    // A later fragment (no UDP header in it) goes the same way.
    let later = Ipv6Frame {
        upper: vec![0xab; 24],
        ..udp_frame(
            CLIENT,
            WEB,
            vec![
                options_header(NEXT_HOP_BY_HOP, 0),
                fragment_header(3, false, 0x1234),
            ],
        )
    };
    let out = expect(&bed, &later.build(), TC_ACT_REDIRECT, stat::DELIVERED_LOCAL)?;
    assert_eq!(out, delivered_to_web(&later));

    // Eight extension headers: the most walked.
    let eight = |kind| {
        let mut chain = vec![options_header(NEXT_HOP_BY_HOP, 0)];
        chain.extend((0..6).map(|_| options_header(NEXT_DESTINATION_OPTIONS, 0)));
        chain.push(options_header(kind, 0));
        chain
    };
    let frame = udp_frame(CLIENT, WEB, eight(NEXT_ROUTING));
    let out = expect(&bed, &frame.build(), TC_ACT_REDIRECT, stat::DELIVERED_LOCAL)?;
    assert_eq!(out, delivered_to_web(&frame));
    // A ninth.
    let mut nine = eight(NEXT_ROUTING);
    nine.push(options_header(NEXT_DESTINATION_OPTIONS, 0));
    let frame = udp_frame(CLIENT, WEB, nine).build();
    expect(&bed, &frame, TC_ACT_SHOT, stat::DROP_EXTENSION_HEADERS)?;
    assert_eq!(bed.counter(stat::DROP_MALFORMED)?, 0);
    Ok(())
}

/// The documented rules for bad input (see datapath-ebpf/src/headers6.rs).
#[test]
fn truncated_ipv6_and_extension_headers_are_dropped_as_malformed() -> Result<()> {
    let bed = testbed()?;
    let good = udp_frame(CLIENT, WEB, vec![options_header(NEXT_HOP_BY_HOP, 0)]).build();
    // BPF_PROG_TEST_RUN refuses IPv6 frames shorter than Ethernet + 40 bytes: a
    // truncated packet is one whose payload length claims more than the frame holds.
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut beyond = good.clone();
    beyond[18..20].copy_from_slice(&(good.len() as u16).to_be_bytes());
    cases.push(("payload length beyond the frame", beyond));
    let mut version = good.clone();
    version[14] = 0x40;
    cases.push(("IP version 4 in an IPv6 frame", version));
    // The hop-by-hop header says 4 x 8 bytes more than the payload has.
    let mut long_extension = good.clone();
    long_extension[14 + 40 + 1] = 4;
    cases.push(("extension header beyond the payload", long_extension));
    // The payload length ends inside the extension header (the frame goes on).
    let mut cut = good.clone();
    cut[18..20].copy_from_slice(&4u16.to_be_bytes());
    cases.push(("payload ends in the extension header", cut));
    // A UDP header cut short by the payload length.
    let mut short_udp = good.clone();
    short_udp[18..20].copy_from_slice(&(8u16 + 4).to_be_bytes());
    cases.push(("UDP header cut short", short_udp));
    // The frame itself ends inside the extension header (6 of its 8 bytes).
    let mut header_cut = good[..14 + 40 + 6].to_vec();
    header_cut[18..20].copy_from_slice(&6u16.to_be_bytes());
    cases.push(("frame ends in the extension header", header_cut));
    for (name, frame) in cases {
        let before = bed.counter(stat::DROP_MALFORMED)?;
        let out = bed.from_pod(&frame)?;
        assert_eq!(out.verdict, TC_ACT_SHOT, "{name}: verdict");
        assert_eq!(
            bed.counter(stat::DROP_MALFORMED)?,
            before + 1,
            "{name}: drop_malformed"
        );
    }
    assert_eq!(bed.counter(stat::DELIVERED_LOCAL)?, 0);
    Ok(())
}

#[test]
fn a_pod_isolated_by_network_policy_neither_sends_nor_receives_ipv6() -> Result<()> {
    for (client, web, counter) in [
        (ENDPOINT_EGRESS_ISOLATED, 0, stat::DROP_POLICY_EGRESS),
        (ENDPOINT_INGRESS_ISOLATED, 0, stat::DROP_POLICY_EGRESS),
        (0, ENDPOINT_INGRESS_ISOLATED, stat::DROP_POLICY_INGRESS),
        (0, ENDPOINT_EGRESS_ISOLATED, stat::DROP_POLICY_INGRESS),
    ] {
        let mut bed = testbed()?;
        bed.add_endpoint6(CLIENT, endpoint(TEST_RUN_IFINDEX, CLIENT_MAC, client))?;
        bed.add_endpoint6(WEB, endpoint(WEB_VETH, WEB_MAC, web))?;
        let frame = udp_frame(CLIENT, WEB, vec![]).build();
        expect(&bed, &frame, TC_ACT_SHOT, counter)?;
        // An isolated sender's packets for the stack too.
        if client != 0 {
            let frame = udp_frame(CLIENT, REMOTE, vec![]).build();
            expect(&bed, &frame, TC_ACT_SHOT, counter)?;
        }
    }
    Ok(())
}

/// What the stack sends a pod over IPv6 (to-pod, the veth's egress): a pod that
/// NetworkPolicy isolates in either direction gets none; another pod's passes
/// unchanged, as does neighbour discovery to its link-local address.
#[test]
fn ipv6_the_stack_sends_an_isolated_pod_is_dropped() -> Result<()> {
    for (flags, verdict, counter) in [
        (
            ENDPOINT_INGRESS_ISOLATED,
            TC_ACT_SHOT,
            Some(stat::DROP_POLICY_INGRESS),
        ),
        (
            ENDPOINT_EGRESS_ISOLATED,
            TC_ACT_SHOT,
            Some(stat::DROP_POLICY_INGRESS),
        ),
        (0, TC_ACT_OK, None),
    ] {
        let mut bed = testbed()?;
        bed.add_endpoint6(WEB, endpoint(WEB_VETH, WEB_MAC, flags))?;
        let frame = udp_frame(REMOTE, WEB, vec![]).build();
        let before = counter.map(|c| bed.counter(c)).transpose()?;
        let out = bed.run_program(program_names::TO_POD, &frame, 1)?.0;
        assert_eq!(out.verdict, verdict, "flags {flags:#x}");
        if let (Some(counter), Some(before)) = (counter, before) {
            assert_eq!(bed.counter(counter)?, before + 1);
        } else {
            assert_eq!(out.frame, frame, "passed unchanged");
        }
        let link_local = udp_frame("fe80::1".parse()?, "fe80::2".parse()?, vec![]).build();
        let out = bed.run_program(program_names::TO_POD, &link_local, 1)?.0;
        assert_eq!(out.verdict, TC_ACT_OK, "no pod's address");
    }
    Ok(())
}

/// Without the agent's slots IPv6 is dropped as unsupported, as before the IPv6
/// path, in real and explain runs alike; with them, explain runs follow it too.
#[test]
fn without_its_slot_ipv6_is_unsupported_in_real_and_explain_runs() -> Result<()> {
    let mut bed = Testbed::load()?;
    bed.add_endpoint6(CLIENT, endpoint(TEST_RUN_IFINDEX, CLIENT_MAC, 0))?;
    bed.add_endpoint6(WEB, endpoint(WEB_VETH, WEB_MAC, 0))?;
    let frame = udp_frame(CLIENT, WEB, vec![]).build();
    expect(&bed, &frame, TC_ACT_SHOT, stat::DROP_UNSUPPORTED_L3)?;
    let explained = bed.explainer()?.from_pod(&frame, 6)?;
    assert_eq!(explained.run.verdict, TC_ACT_SHOT);
    assert_eq!(explained.trace.verdict, verdict::DROP);
    assert_eq!(explained.trace.drop_reason, stat::DROP_UNSUPPORTED_L3);
    bed.fill_tail_calls()?;
    expect(&bed, &frame, TC_ACT_REDIRECT, stat::DELIVERED_LOCAL)?;
    let explained = bed.explainer()?.from_pod(&frame, 7)?;
    assert_eq!(explained.run.verdict, TC_ACT_REDIRECT);
    assert_eq!(explained.trace.verdict, verdict::TO_POD);
    assert_eq!(explained.trace.verdict_target, WEB_VETH);
    Ok(())
}

/// Mutations of a valid frame with an extension header chain (fixed seed): each
/// gets exactly one of the IPv6 path's verdicts, counted once, and what passes to
/// the stack passes as it came.
#[test]
fn mutated_ipv6_frames_each_get_one_documented_verdict() -> Result<()> {
    let bed = testbed()?;
    let good = udp_frame(
        CLIENT,
        WEB,
        vec![
            options_header(NEXT_HOP_BY_HOP, 0),
            options_header(NEXT_DESTINATION_OPTIONS, 1),
            fragment_header(0, true, 7),
        ],
    )
    .build();
    let outcomes = [
        (stat::DELIVERED_LOCAL, TC_ACT_REDIRECT),
        (stat::PASSED_TO_STACK, TC_ACT_OK),
        (stat::PASSED_ND, TC_ACT_OK),
        (stat::DROP_MALFORMED, TC_ACT_SHOT),
        (stat::DROP_SPOOFED, TC_ACT_SHOT),
        (stat::DROP_EXTENSION_HEADERS, TC_ACT_SHOT),
        (stat::DROP_TTL_EXCEEDED, TC_ACT_SHOT),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..600 {
        let mut frame = good.clone();
        // Flip bytes past the EtherType (what the IPv6 program is handed).
        for _ in 0..1 + next() % 3 {
            let at = 14 + (next() as usize) % (frame.len() - 14);
            frame[at] = next() as u8;
        }
        if i % 5 == 0 {
            // Cut the frame, whatever its header says.
            frame.truncate(14 + 40 + (next() as usize) % (frame.len() - 54));
        }
        let before: Vec<u64> = outcomes
            .iter()
            .map(|(counter, _)| bed.counter(*counter))
            .collect::<Result<_>>()?;
        let out = bed.from_pod(&frame)?;
        let moved: Vec<(u32, u32)> = outcomes
            .iter()
            .zip(&before)
            .filter(|((counter, _), n)| bed.counter(*counter).ok() != Some(**n))
            .map(|(outcome, _)| *outcome)
            .collect();
        assert_eq!(moved.len(), 1, "frame {i}: counters moved {moved:?}");
        let (counter, verdict) = moved[0];
        assert_eq!(
            out.verdict,
            verdict,
            "frame {i}: {} from {frame:02x?}",
            stat::NAMES[counter as usize]
        );
        if verdict == TC_ACT_OK {
            assert_eq!(out.frame, frame, "frame {i}: passed as it came");
        }
        seen.insert(stat::NAMES[counter as usize]);
    }
    assert_eq!(bed.counter(stat::DROP_INTERNAL)?, 0);
    // The mutations reach past the first checks.
    for name in ["delivered_local", "drop_malformed", "drop_spoofed"] {
        assert!(seen.contains(name), "{name} never: {seen:?}");
    }
    Ok(())
}
