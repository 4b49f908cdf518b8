//! What other nodes send, seen at tcx ingress of this node's VXLAN device after the
//! kernel decapsulated it: check the VNI and that the inner source belongs to the
//! sending node's pod CIDR, then (`peer`, shared with native routing) reverse-NAT
//! replies of Service flows whose client is here (the DNAT happened on this node),
//! deliver to the pod, or to the
//! node's own processes (replies to their Service flows and to what they send other
//! nodes' pods from the node's overlay address), and ICMP errors backends there
//! send about packets of such flows. Inner packets for pods that are not on this
//! node are dropped and counted. IPv6 continues in `ferrite_from_overlay6`
//! (`from_overlay6`), by a tail call; the explain copy takes its own to the explain
//! copy of that one.
use ferrite_common::{stat, tail_call};

use crate::{
    action, conntrack,
    headers::{parse, Parsed},
    headers6::is_ipv6,
    maps::TAIL_CALLS,
    packet::{Packet, Verdict},
    peer, routing,
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 =
    ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_OVERLAY);

/// tcx ingress of the node's VXLAN device.
#[classifier]
pub fn ferrite_from_overlay(ctx: TcContext) -> i32 {
    if is_ipv6(&ctx) {
        // SAFETY: a jump to a TC program of the same object; it returns only if the
        // slot is empty (no agent filled it), and the frame is then dropped below
        // as unsupported.
        unsafe { TAIL_CALLS.tail_call(&ctx, tail_call::FROM_OVERLAY6) };
    }
    action::tc(&ctx, PROGRAM, process(&ctx))
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_overlay`: the same logic,
/// compiled for explain runs (every write skipped and noted in `ferrite_trace`).
/// IPv6 frames go to `ferrite_explain_overlay6`, as the real ones go to
/// `ferrite_from_overlay6`.
#[classifier]
pub fn ferrite_explain_overlay(ctx: TcContext) -> i32 {
    if is_ipv6(&ctx) {
        // SAFETY: as in `ferrite_from_overlay`; an empty slot leaves the frame to be
        // explained as unsupported below.
        unsafe { TAIL_CALLS.tail_call(&ctx, tail_call::EXPLAIN_OVERLAY6) };
    }
    action::explain_tc(ctx, process)
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let Some(tunnel) = peer::cluster_tunnel(pkt)? else {
        return Ok(Verdict::Drop(stat::DROP_WRONG_VNI));
    };
    let h = match parse(pkt) {
        Parsed::Ipv4(h) => h,
        Parsed::Pass(reason) => {
            pkt.count(reason);
            return Ok(Verdict::Pass);
        }
        Parsed::Drop(reason) => return Ok(Verdict::Drop(reason)),
    };
    // Read before any lookup: what is cached at this epoch was resolved after it began.
    let epoch = routing::epoch();
    let entry = if h.has_ports {
        conntrack::find(&h)
    } else {
        None
    };
    // A node may only send from its own pod CIDR: the inner source must route back
    // to the node the outer header came from (cross-node anti-spoofing).
    let sender = tunnel.remote_ipv4;
    if !peer::sender_checked(&h, entry, epoch, sender, || {
        peer::source_is_senders(h.saddr, sender)
    }) {
        return Ok(Verdict::Drop(stat::DROP_SPOOFED));
    }
    peer::receive(pkt, &h, epoch, entry)
}
