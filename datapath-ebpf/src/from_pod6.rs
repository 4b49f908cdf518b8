//! What a pod sends over IPv6, seen at its host-side veth: `ferrite_from_pod` jumps
//! here (a tail call through `ferrite_progs`, slot `tail_call::FROM_POD6`) with every
//! IPv6 frame, so this runs on a stack of its own. Neighbour and router discovery
//! and multicast listener messages to link-scoped addresses pass to the stack; otherwise the source must be the pod's own address on its own
//! veth (`ferrite_endpnt6`), NetworkPolicy fails closed (`policy::ipv6_denied`), a
//! pod of this node gets the packet straight into its eth0 (hop limit decremented,
//! as a router does), and anything else continues into the host stack. No Services
//! and no overlay for IPv6 yet.
use aya_ebpf::{macros::classifier, programs::TcContext};
use ferrite_common::{explain::step, stat};

use crate::{
    action,
    headers6::{parse, Parsed6, IP6_HOP_LIMIT_OFF},
    packet::{Packet, Verdict},
    policy, routing, trace,
};

/// Drops are reported as the attach point's: `ferrite_from_pod`'s.
const PROGRAM: u8 = ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_POD);

/// Never attached: reached by tail call from `ferrite_from_pod` (tcx ingress of
/// each pod's host-side veth).
#[classifier]
pub fn ferrite_from_pod6(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_pod6`, reached by tail call
/// from `ferrite_explain_pod` (the same logic, every write skipped and noted).
#[classifier]
pub fn ferrite_explain_pod6(ctx: TcContext) -> i32 {
    action::explain_tc(ctx, process)
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed6::Ipv6(h) => h,
        Parsed6::Drop(reason) => return Ok(Verdict::Drop(reason)),
    };
    // Before anti-spoofing: its source may be link-local or unspecified.
    if h.is_neighbour_discovery() {
        pkt.count(stat::PASSED_ND);
        return Ok(Verdict::Pass);
    }
    // A pod may only send from its own address, and only through its own veth.
    let source_isolation = match routing::local_endpoint6(&h.saddr) {
        Some(ep) if ep.ifindex == pkt.ifindex() => ep.flags,
        _ => return Ok(Verdict::Drop(stat::DROP_SPOOFED)),
    };
    trace::step(pkt.explain(), step::SOURCE_CHECKED);
    let destination = routing::local_endpoint6(&h.daddr);
    let destination_isolation = destination.map(|ep| ep.flags).unwrap_or(0);
    if let Some(reason) = policy::ipv6_denied(source_isolation, destination_isolation) {
        return Ok(Verdict::Drop(reason));
    }
    let Some(ep) = destination else {
        // Other nodes' pods and the world: the stack routes them (no IPv6 overlay yet).
        pkt.count(stat::PASSED_TO_STACK);
        return Ok(Verdict::Pass);
    };
    let hop_limit = pkt.load::<u8>(IP6_HOP_LIMIT_OFF)?;
    if hop_limit <= 1 {
        return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
    }
    // IPv6 has no header checksum to fix.
    pkt.store(IP6_HOP_LIMIT_OFF, &(hop_limit - 1))?;
    pkt.count(stat::DELIVERED_LOCAL);
    routing::deliver_local(pkt, &ep)
}
