//! XDP on the node's uplink: external traffic to NodePort, LoadBalancer and
//! externalIP frontends, balanced before the stack (see `external`).
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use ferrite_common::{explain, stat};

use crate::{
    action::{self, log_drop},
    external,
    packet::{Explaining, Verdict},
    trace,
};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 =
    ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_WORLD);

#[xdp]
pub fn ferrite_from_world(ctx: XdpContext) -> u32 {
    match external::balance(&ctx, PROGRAM).unwrap_or(Verdict::Drop(stat::DROP_INTERNAL)) {
        Verdict::Drop(reason) => {
            log_drop(&ctx, PROGRAM, reason);
            xdp_action::XDP_DROP
        }
        Verdict::Bounce => xdp_action::XDP_TX,
        // Translated packets continue to the uplink's TC program, which forwards.
        _ => xdp_action::XDP_PASS,
    }
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_world` (the run's word in
/// its XDP metadata), every write skipped and noted in `ferrite_trace`.
#[xdp]
pub fn ferrite_explain_world(ctx: XdpContext) -> u32 {
    let pkt = Explaining(ctx);
    let word = pkt.word();
    if !explain::is_explain(word) {
        return xdp_action::XDP_DROP;
    }
    trace::begin(word);
    match action::note_verdict(external::balance(&pkt, PROGRAM)) {
        explain::verdict::DROP => xdp_action::XDP_DROP,
        explain::verdict::BOUNCE => xdp_action::XDP_TX,
        _ => xdp_action::XDP_PASS,
    }
}
