//! What other nodes send over IPv6, at tcx ingress of this node's VXLAN device after
//! the kernel decapsulated it: `ferrite_from_overlay` jumps here (a tail call
//! through `ferrite_progs`, slot `tail_call::FROM_OVERLAY6`) with every IPv6 frame.
//! The VNI must be the cluster's and the inner source an address of the sending
//! node's IPv6 pod CIDR (`ferrite_routes6`, cross-node anti-spoofing); NetworkPolicy
//! fails closed for an isolated destination pod; a pod of this node gets the packet
//! straight into its eth0 (hop limit decremented, as a router does); anything else
//! (the node's own overlay address) continues into the host stack. No Services for
//! IPv6 yet.
use aya_ebpf::{macros::classifier, programs::TcContext};
use ferrite_common::{explain::step, stat};

use crate::{
    action,
    headers6::{parse, Parsed6, IP6_HOP_LIMIT_OFF},
    packet::{Packet, Verdict},
    peer, policy, routing, trace,
};

/// Drops are reported as the attach point's: `ferrite_from_overlay`'s.
const PROGRAM: u8 =
    ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_OVERLAY);

/// Never attached: reached by tail call from `ferrite_from_overlay` (tcx ingress of
/// the node's VXLAN device).
#[classifier]
pub fn ferrite_from_overlay6(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_overlay6`, reached by tail call
/// from `ferrite_explain_overlay` (the same logic, every write skipped and noted).
#[classifier]
pub fn ferrite_explain_overlay6(ctx: TcContext) -> i32 {
    action::explain_tc(ctx, process)
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let Some(tunnel) = peer::cluster_tunnel(pkt)? else {
        return Ok(Verdict::Drop(stat::DROP_WRONG_VNI));
    };
    let h = match parse(pkt) {
        Parsed6::Ipv6(h) => h,
        Parsed6::Drop(reason) => return Ok(Verdict::Drop(reason)),
    };
    // A node may only send from its own IPv6 pod CIDR.
    if !peer::source6_is_senders(&h.saddr, tunnel.remote_ipv4) {
        return Ok(Verdict::Drop(stat::DROP_SPOOFED));
    }
    trace::step(pkt.explain(), step::SOURCE_CHECKED);
    let Some(ep) = routing::local_endpoint6(&h.daddr) else {
        pkt.count(stat::PASSED_TO_STACK);
        return Ok(Verdict::Pass);
    };
    if let Some(reason) = policy::ipv6_denied(0, ep.flags) {
        return Ok(Verdict::Drop(reason));
    }
    let hop_limit = pkt.load::<u8>(IP6_HOP_LIMIT_OFF)?;
    if hop_limit <= 1 {
        return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
    }
    // IPv6 has no header checksum to fix.
    pkt.store(IP6_HOP_LIMIT_OFF, &(hop_limit - 1))?;
    pkt.count(stat::RECEIVED_FROM_NODE);
    routing::deliver_local(pkt, &ep)
}
