//! XDP on the node's uplink: external traffic to NodePort, LoadBalancer and
//! externalIP frontends, balanced before the stack (see `external`).
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use ferrite_common::stat;

use crate::{action::log_drop, external, packet::Verdict};

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
