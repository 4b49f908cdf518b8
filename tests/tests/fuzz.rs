//! 1,000,000 random and mutated frames through the datapath's
//! programs with BPF_PROG_TEST_RUN, each verdict compared with a reference model of
//! the documented rules, written independently of the datapath's code: parsing and
//! `ferrite_from_pod` in `ferrite_tests::verdict_model` (shared with the packet
//! tests), the other programs here (see `datapath-ebpf/src/headers.rs`,
//! `external.rs`, `from_host.rs` and `to_pod.rs` for the rules). Truncated
//! headers, bad IHL, IP options, fragments, wrong checksums, zero-length L4, other
//! protocols and EtherTypes, VXLAN datagrams, DF packets over the pod MTU, TTLs a
//! router lets expire. Also
//! checks that what is passed or dropped leaves unchanged, and that no fragment is
//! ever Service-translated.
//! Needs root.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context, Result};
use ferrite_common::{program_names, stat, svc_flag, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    frames,
    testbed::{
        Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, XDP_DROP, XDP_PASS,
    },
    verdict_model::{
        destination, is_unreachable_for, is_unreachable_ip_for, parse, Expected, Fragments,
        Frontend, NodeModel, Parsed, FROM_POD_COUNTERS,
    },
};

const FROM_POD_FRAMES: usize = 540_000;
const FROM_WORLD_FRAMES: usize = 300_000;
const FROM_UPLINK_FRAMES: usize = 200_000;
const FROM_OVERLAY_FRAMES: usize = 50_000;
const FROM_HOST_FRAMES: usize = 150_000;
const TO_POD_FRAMES: usize = 60_000;
const SEED: u64 = 0x5eed_f00d;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12)];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A Service without backends.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const NODE_PORT: u16 = 30080;
/// `externalTrafficPolicy: Local` without a local backend.
const LOCAL_ONLY_PORT: u16 = 30091;
const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Pod MTU of the fuzzed node: the smallest IPv4 allows, so seeds and mutations land
/// on both sides of it.
const POD_MTU: usize = 68;

/// The fuzzed node as the reference model sees it (`testbed` writes the same).
fn model() -> NodeModel {
    let tcp: Vec<_> = BACKENDS.iter().map(|b| sock(*b, 8080)).collect();
    let udp: Vec<_> = BACKENDS.iter().map(|b| sock(*b, 5353)).collect();
    let frontend = |address, port, proto, backends: &[SocketAddrV4]| Frontend {
        address,
        port,
        proto,
        backends: backends.to_vec(),
    };
    let mut frontends = vec![
        frontend(VIP, 80, PROTO_TCP, &tcp),
        frontend(VIP, 53, PROTO_UDP, &udp),
        frontend(EMPTY_VIP, 80, PROTO_TCP, &[]),
    ];
    for proto in [PROTO_TCP, PROTO_UDP] {
        frontends.push(frontend(NODE_IP, NODE_PORT, proto, &tcp));
        frontends.push(frontend(NODE_IP, LOCAL_ONLY_PORT, proto, &[]));
    }
    NodeModel {
        pods: vec![CLIENT, BACKENDS[0], BACKENDS[1]],
        frontends,
    }
}

/// `ferrite_from_world` (XDP) on the uplink.
fn model_from_world(frame: &[u8], fragments: &mut Fragments) -> Expected {
    let Ok(h) = parse(frame, fragments) else {
        return Expected::Pass(None);
    };
    let Some((_, dport)) = h.ports else {
        return Expected::Pass(None);
    };
    if is_external_frontend(&h) && h.too_big_with_df(POD_MTU) {
        return Expected::Pass(None); // for from_uplink to answer
    }
    match (h.daddr, dport, h.proto) {
        (NODE_IP, NODE_PORT, PROTO_TCP | PROTO_UDP) => Expected::Translated,
        (NODE_IP, LOCAL_ONLY_PORT, PROTO_TCP | PROTO_UDP) => {
            Expected::Drop(stat::DROP_NO_LOCAL_BACKEND)
        }
        _ => Expected::Pass(None),
    }
}

/// A NodePort of the fuzzed node (with or without backends).
fn is_external_frontend(h: &Parsed) -> bool {
    h.daddr == NODE_IP
        && matches!(h.ports, Some((_, NODE_PORT | LOCAL_ONLY_PORT)))
        && (h.proto == PROTO_TCP || h.proto == PROTO_UDP)
}

/// `ferrite_from_uplink` (tcx on the uplink, after XDP): DF packets too big for pods
/// to an external frontend are answered with ICMP; frames now addressed to a pod are
/// delivered (dropped with a TTL a router lets expire); everything else passes
/// untouched and uncounted.
fn model_from_uplink(model: &NodeModel, frame: &[u8], fragments: &mut Fragments) -> Expected {
    match parse(frame, fragments) {
        Ok(h) if is_external_frontend(&h) && h.too_big_with_df(POD_MTU) => Expected::FragNeeded,
        Ok(h) if model.is_pod(h.daddr) && h.ttl_expires => Expected::Drop(stat::DROP_TTL_EXCEEDED),
        Ok(h) if model.is_pod(h.daddr) => Expected::Deliver { translated: false },
        _ => Expected::Pass(None),
    }
}

/// `ferrite_from_host` at an egress hook (BPF_PROG_TEST_RUN runs it as on `lo`, where
/// every source is the node's own): a new flow to a frontend is translated and sent to
/// its backend; without backends it is answered with ICMP port unreachable handed to
/// the stack (a later fragment of it is dropped); the overlay's datagrams (the node's
/// VXLAN port, 0 in the test bed) and everything else pass.
fn model_from_host(model: &NodeModel, frame: &[u8], fragments: &mut Fragments) -> Expected {
    let Ok(h) = parse(frame, fragments) else {
        return Expected::Pass(None);
    };
    let Some((_, dport)) = h.ports else {
        return Expected::Pass(None);
    };
    if h.proto == PROTO_UDP && dport == 0 {
        return Expected::Pass(None);
    }
    match model.service(&h, dport) {
        Some(true) => Expected::Deliver { translated: true },
        Some(false) if h.later_fragment => Expected::Drop(stat::DROP_NO_BACKEND),
        Some(false) => Expected::Rejected,
        None => Expected::Pass(None),
    }
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Well-formed frames of every kind the programs meet.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for from in [CLIENT, BACKENDS[0], WORLD] {
        for (to, port) in [
            (VIP, 80),
            (VIP, 53),
            (EMPTY_VIP, 80),
            (BACKENDS[1], 8080),
            (NODE_IP, NODE_PORT),
            (NODE_IP, LOCAL_ONLY_PORT),
            (Ipv4Addr::new(8, 8, 8, 8), 443),
        ] {
            seeds.push(frames::tcp_syn(sock(from, 40000), sock(to, port), b""));
            seeds.push(frames::tcp_ack(
                sock(from, 40001),
                sock(to, port),
                b"payload",
            ));
            seeds.push(frames::udp(sock(from, 40002), sock(to, port), b"query"));
            seeds.push(frames::udp(sock(from, 40003), sock(to, port), &[0x55; 60]));
        }
    }
    // A VXLAN datagram (an inner frame inside UDP 4789).
    let inner = frames::tcp_syn(sock(CLIENT, 1), sock(BACKENDS[0], 2), b"");
    seeds.push(frames::udp(
        sock(WORLD, 50000),
        sock(NODE_IP, 4789),
        &[&[8, 0, 0, 0, 0, 0, 1, 0][..], &inner].concat(),
    ));
    seeds
}

fn set_ip_checksum(frame: &mut [u8]) {
    if frame.len() < 34 {
        return;
    }
    let ihl = ((frame[14] & 0x0f) as usize * 4).clamp(20, frame.len() - 14);
    frame[24] = 0;
    frame[25] = 0;
    let mut sum: u32 = 0;
    for pair in frame[14..14 + ihl].chunks(2) {
        sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// One mutation of a seed (or of random bytes), as hostile input does.
fn mutate(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.u8(..) < 8 {
        // Pure noise, sometimes with an IPv4 EtherType to get past the first check.
        let mut frame: Vec<u8> = (0..rng.usize(14..200)).map(|_| rng.u8(..)).collect();
        if rng.bool() {
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        return frame;
    }
    let mut frame = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(0..4) {
        match rng.u8(..11) {
            // Truncated anywhere after the Ethernet header.
            0 => frame.truncate(rng.usize(14..=frame.len())),
            // IHL: too small, options (with option bytes inserted), or beyond the frame.
            1 => {
                let ihl = rng.u8(0..16);
                if ihl > 5 && rng.bool() && frame.len() >= 34 {
                    let options = (ihl as usize - 5) * 4;
                    let at = 34;
                    frame.splice(at..at, std::iter::repeat_n(1u8, options));
                    let total = u16::from_be_bytes([frame[16], frame[17]]) as usize + options;
                    frame[16..18].copy_from_slice(&(total as u16).to_be_bytes());
                }
                if frame.len() > 14 {
                    frame[14] = (frame[14] & 0xf0) | ihl;
                }
            }
            // Total length: random, zero-length L4 (just the IP header), or one too many.
            2 if frame.len() >= 18 => {
                let ihl = (frame[14] & 0x0f) as u16 * 4;
                let total = u16::from_be_bytes([frame[16], frame[17]]);
                let new = match rng.u8(..3) {
                    0 => rng.u16(..),
                    1 => ihl,
                    _ => total.wrapping_add(1),
                };
                frame[16..18].copy_from_slice(&new.to_be_bytes());
            }
            // Fragments: MF, an offset, or both.
            3 if frame.len() >= 22 => {
                let flags: u16 = [0x2000, 0x0001, 0x2010, 0x4000, rng.u16(..)][rng.usize(..5)];
                frame[20..22].copy_from_slice(&flags.to_be_bytes());
            }
            // Protocol: ICMP, GRE, SCTP, anything.
            4 if frame.len() >= 24 => frame[23] = [1, 47, 132, rng.u8(..)][rng.usize(..4)],
            // EtherType: IPv6, ARP, VLAN, anything.
            5 => {
                let ethertype: u16 = [0x86dd, 0x0806, 0x8100, rng.u16(..)][rng.usize(..4)];
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
            // Wrong checksums (IP or L4): the datapath does not verify them.
            6 => {
                let at = rng.usize(24..frame.len().max(25));
                if at < frame.len() {
                    frame[at] ^= 0xff;
                }
            }
            // Version.
            7 if frame.len() > 14 => frame[14] = (rng.u8(..16) << 4) | (frame[14] & 0x0f),
            // TTL: one a router lets expire (0, 1), the next, or anything.
            10 if frame.len() > 22 => frame[22] = [0, 1, 2, rng.u8(..)][rng.usize(..4)],
            // Random bytes past the addresses (ports, flags, payload), or appended.
            8 => {
                if rng.bool() && frame.len() > 34 {
                    let at = rng.usize(34..frame.len());
                    frame[at] = rng.u8(..);
                } else {
                    frame.extend((0..rng.usize(1..64)).map(|_| rng.u8(..)));
                }
            }
            // Any byte at all (addresses too).
            _ => {
                let at = rng.usize(..frame.len());
                frame[at] = rng.u8(..);
            }
        }
        if rng.bool() {
            set_ip_checksum(&mut frame);
        }
    }
    frame
}

/// A node's datapath state the models above describe.
fn testbed() -> Result<Testbed> {
    let mut bed = Testbed::load()?;
    bed.set_node_ip(NODE_IP)?;
    bed.set_pod_mtu(POD_MTU as u16)?;
    for pod in [CLIENT, BACKENDS[0], BACKENDS[1]] {
        bed.add_endpoint(pod, TEST_RUN_IFINDEX)?;
    }
    let tcp: Vec<_> = BACKENDS.iter().map(|b| sock(*b, 8080)).collect();
    let udp: Vec<_> = BACKENDS.iter().map(|b| sock(*b, 5353)).collect();
    bed.add_service(sock(VIP, 80), PROTO_TCP, 1, 1, &tcp)?;
    bed.add_service(sock(VIP, 53), PROTO_UDP, 2, 3, &udp)?;
    bed.add_service(sock(EMPTY_VIP, 80), PROTO_TCP, 3, 5, &[])?;
    let node_port = svc_flag::EXTERNAL | svc_flag::NODE_PORT;
    for protocol in [PROTO_TCP, PROTO_UDP] {
        bed.add_service(
            sock(NODE_IP, NODE_PORT),
            protocol,
            4 + protocol as u32,
            10,
            &tcp,
        )?;
        bed.set_service_flags(sock(NODE_IP, NODE_PORT), protocol, node_port)?;
        bed.add_service(
            sock(NODE_IP, LOCAL_ONLY_PORT),
            protocol,
            40 + protocol as u32,
            20,
            &[],
        )?;
        bed.set_service_flags(
            sock(NODE_IP, LOCAL_ONLY_PORT),
            protocol,
            node_port | svc_flag::LOCAL_ONLY,
        )?;
    }
    Ok(bed)
}

/// BPF_PROG_TEST_RUN's skb setup refuses frames announcing IPv4 or IPv6 without room
/// for that header (on a wire they arrive padded to 60 bytes).
fn too_short_for_test_run(frame: &[u8]) -> bool {
    match [frame[12], frame[13]] {
        [0x08, 0x00] => frame.len() < 14 + 20,
        [0x86, 0xdd] => frame.len() < 14 + 40,
        _ => false,
    }
}

#[test]
fn a_million_random_and_mutated_frames_get_the_documented_verdicts() -> Result<()> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let seeds = seeds();
    let mut mismatches = Vec::new();
    let mut expected_counts: BTreeMap<u32, u64> = BTreeMap::new();
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();

    let model = model();
    let bed = testbed()?;
    let mut pod_fragments = Fragments::new();
    let mut refused = 0;
    for i in 0..FROM_POD_FRAMES {
        let frame = mutate(&mut rng, &seeds);
        let (expected, counters) = model.from_pod(&frame, &mut pod_fragments);
        let fragment = if counters.contains(&stat::FRAGMENT_ROUTED) {
            " fragment"
        } else if counters.contains(&stat::FRAGMENT_TRACKED) {
            " tracked fragment"
        } else {
            ""
        };
        *kinds
            .entry(format!("from_pod {expected:?}{fragment}"))
            .or_default() += 1;
        let out = match bed.from_pod(&frame) {
            Ok(out) => out,
            // Not a verdict: the test harness refused the frame.
            Err(_) if too_short_for_test_run(&frame) => {
                refused += 1;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("from_pod #{i}: {frame:02x?}")),
        };
        for counter in counters {
            *expected_counts.entry(counter).or_default() += 1;
        }
        let ok = model.from_pod_output_fits(expected, &frame, &out);
        if !ok && mismatches.len() < 10 {
            mismatches.push(format!(
                "from_pod #{i} {expected:?} got {} {:02x?}",
                out.verdict, frame
            ));
        }
    }
    // Every counter the model expects, and nothing more of them.
    for counter in FROM_POD_COUNTERS {
        expected_counts.entry(counter).or_default();
    }
    for (counter, count) in &expected_counts {
        let name = stat::NAMES[*counter as usize];
        let actual = bed.counter(*counter)?;
        if actual != *count {
            mismatches.push(format!("from_pod counter {name}: {actual}, model {count}"));
        }
    }

    let bed = testbed()?;
    let mut world_fragments = Fragments::new();
    let mut dropped = 0;
    for i in 0..FROM_WORLD_FRAMES {
        let frame = mutate(&mut rng, &seeds);
        let expected = model_from_world(&frame, &mut world_fragments);
        *kinds.entry(format!("from_world {expected:?}")).or_default() += 1;
        let out = bed
            .from_world(&frame)
            .with_context(|| format!("from_world #{i}: {frame:02x?}"))?;
        let ok = match expected {
            Expected::Pass(_) => out.verdict == XDP_PASS && out.frame == frame,
            Expected::Drop(_) => {
                dropped += 1;
                out.verdict == XDP_DROP && out.frame == frame
            }
            Expected::Translated => {
                out.verdict == XDP_PASS
                    && destination(&out.frame).is_some_and(|(ip, port)| {
                        BACKENDS.contains(&ip) && port.is_none_or(|p| p == 8080)
                    })
            }
            Expected::Deliver { .. } | Expected::FragNeeded | Expected::Rejected => {
                unreachable!("TC only")
            }
        };
        if !ok && mismatches.len() < 20 {
            mismatches.push(format!(
                "from_world #{i} {expected:?} got {} {:02x?}",
                out.verdict, frame
            ));
        }
    }
    if bed.counter(stat::DROP_NO_LOCAL_BACKEND)? != dropped {
        mismatches.push("from_world drop_no_local_backend count differs".into());
    }

    let bed = testbed()?;
    let mut uplink_fragments = Fragments::new();
    let mut ran = FROM_POD_FRAMES - refused + FROM_WORLD_FRAMES;
    let mut frag_needed = 0;
    let ttl_drops_before = bed.counter(stat::DROP_TTL_EXCEEDED)?;
    let mut uplink_ttl_drops = 0;
    for i in 0..FROM_UPLINK_FRAMES {
        let frame = mutate(&mut rng, &seeds);
        let Ok((out, _)) = bed.run_program(program_names::FROM_UPLINK, &frame, 1) else {
            assert!(too_short_for_test_run(&frame), "from_uplink #{i} refused");
            continue;
        };
        ran += 1;
        let expected = model_from_uplink(&model, &frame, &mut uplink_fragments);
        *kinds
            .entry(format!("from_uplink {expected:?}"))
            .or_default() += 1;
        let ok = match expected {
            Expected::Pass(_) => out.verdict == TC_ACT_OK && out.frame == frame,
            Expected::FragNeeded => {
                frag_needed += 1;
                out.verdict == TC_ACT_REDIRECT && is_unreachable_for(&out.frame, &frame, 4, POD_MTU)
            }
            Expected::Drop(_) => {
                uplink_ttl_drops += 1;
                out.verdict == TC_ACT_SHOT && out.frame == frame
            }
            _ => out.verdict == TC_ACT_REDIRECT && out.frame[12..] == frame[12..],
        };
        if !ok && mismatches.len() < 30 {
            mismatches.push(format!(
                "from_uplink #{i} {expected:?} got {} {:02x?}",
                out.verdict, frame
            ));
        }
    }
    if bed.counter(stat::ICMP_FRAG_NEEDED)? != frag_needed {
        mismatches.push("from_uplink icmp_frag_needed count differs".into());
    }
    if bed.counter(stat::DROP_TTL_EXCEEDED)? - ttl_drops_before != uplink_ttl_drops {
        mismatches.push("from_uplink drop_ttl_exceeded count differs".into());
    }
    // The overlay program only ever sees what the kernel's VXLAN device decapsulated,
    // with tunnel metadata; a frame without it (every test run) is dropped as
    // drop_internal, whatever it holds.
    let before = bed.counter(stat::DROP_INTERNAL)?;
    let mut overlay_ran = 0;
    for i in 0..FROM_OVERLAY_FRAMES {
        let frame = mutate(&mut rng, &seeds);
        let Ok((out, _)) = bed.run_program(program_names::FROM_OVERLAY, &frame, 1) else {
            assert!(too_short_for_test_run(&frame), "from_overlay #{i} refused");
            continue;
        };
        overlay_ran += 1;
        if (out.verdict, &out.frame) != (TC_ACT_SHOT, &frame) && mismatches.len() < 40 {
            mismatches.push(format!(
                "from_overlay #{i} got {} {:02x?}",
                out.verdict, frame
            ));
        }
    }
    if bed.counter(stat::DROP_INTERNAL)? - before != overlay_ran {
        mismatches.push("from_overlay drop_internal count differs".into());
    }
    // Not counted as modelled frames: without tunnel metadata they only exercise the
    // rule above, whatever they hold.

    let bed = testbed()?;
    let mut host_fragments = Fragments::new();
    let (mut rejected, mut host_dropped) = (0, 0);
    for i in 0..FROM_HOST_FRAMES {
        let frame = mutate(&mut rng, &seeds);
        let Ok((out, _)) = bed.run_program(program_names::FROM_HOST, &frame, 1) else {
            assert!(too_short_for_test_run(&frame), "from_host #{i} refused");
            continue;
        };
        ran += 1;
        let expected = model_from_host(&model, &frame, &mut host_fragments);
        *kinds.entry(format!("from_host {expected:?}")).or_default() += 1;
        let ok = match expected {
            // A reply of a flow it translated gets its source translated back; the
            // destination never changes.
            Expected::Pass(_) => {
                out.verdict == TC_ACT_OK
                    && out.frame.len() == frame.len()
                    && (out.frame.len() < 34 || out.frame[30..34] == frame[30..34])
            }
            Expected::Drop(_) => {
                host_dropped += 1;
                out.verdict == TC_ACT_SHOT && out.frame == frame
            }
            Expected::Rejected => {
                rejected += 1;
                out.verdict == TC_ACT_REDIRECT && is_unreachable_ip_for(&out.frame, &frame, 3, 0)
            }
            Expected::Deliver { .. } => {
                out.verdict == TC_ACT_REDIRECT
                    && out.frame.len() == frame.len()
                    && destination(&out.frame).is_some_and(|(ip, port)| {
                        BACKENDS.contains(&ip) && port.is_none_or(|p| [8080, 5353].contains(&p))
                    })
            }
            Expected::Translated | Expected::FragNeeded => unreachable!("not from_host"),
        };
        if !ok && mismatches.len() < 50 {
            mismatches.push(format!(
                "from_host #{i} {expected:?} got {} {:02x?}",
                out.verdict, frame
            ));
        }
    }
    if bed.counter(stat::SERVICE_REJECTED)? != rejected
        || bed.counter(stat::DROP_NO_BACKEND)? != host_dropped
    {
        mismatches.push("from_host service_rejected or drop_no_backend count differs".into());
    }
    // What the stack delivers to a pod passes, whatever it holds (only replies of
    // flows conntrack knows are translated, and a fresh bed knows none).
    let bed = testbed()?;
    for i in 0..TO_POD_FRAMES {
        let frame = mutate(&mut rng, &seeds);
        let Ok((out, _)) = bed.run_program(program_names::TO_POD, &frame, 1) else {
            assert!(too_short_for_test_run(&frame), "to_pod #{i} refused");
            continue;
        };
        ran += 1;
        if (out.verdict, &out.frame) != (TC_ACT_OK, &frame) && mismatches.len() < 60 {
            mismatches.push(format!("to_pod #{i} got {} {:02x?}", out.verdict, frame));
        }
    }
    eprintln!(
        "{ran} frames checked against the model, and {overlay_ran} through \
         ferrite_from_overlay without tunnel metadata"
    );
    assert!(
        ran >= 1_000_000,
        "only {ran} frames checked against the model"
    );
    eprintln!("frames by expected verdict: {kinds:#?}\n{refused} frames too short for their IPv4/IPv6 header refused by BPF_PROG_TEST_RUN's skb setup");
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    // The mutations reached every rule, not just the first checks.
    for rule in [
        "from_pod Drop(6)",
        "from_pod Drop(5)",
        "from_pod Drop(7)",
        "from_pod Rejected",
        "from_pod Drop(8) tracked fragment",
        "from_pod Pass(Some(1)) fragment",
        "from_pod Pass(Some(10))",
        "from_pod Deliver { translated: true }",
        "from_pod Deliver { translated: true } tracked fragment",
        "from_pod Drop(35)",
        "from_world Translated",
        "from_world Drop(20)",
        "from_uplink FragNeeded",
        "from_uplink Drop(35)",
        "from_host Rejected",
        "from_host Deliver { translated: true }",
        "from_host Drop(8)",
        "from_host Pass(None)",
    ] {
        assert!(
            kinds.get(rule).copied().unwrap_or(0) > 100,
            "{rule} rarely reached: {kinds:#?}"
        );
    }
    Ok(())
}
