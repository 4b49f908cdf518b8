//! Ferrite's eBPF datapath: thin program entries over shared modules.
#![no_std]
#![no_main]

mod conntrack;
mod from_pod;
mod headers;
mod lb;
mod maps;
mod nat;
mod packet;
mod routing;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use ferrite_common::stat;
use packet::Verdict;

#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::RedirectPeer(ifindex) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
    }
}

/// tcx ingress of each pod's host-side veth.
#[classifier]
pub fn ferrite_from_pod(ctx: TcContext) -> i32 {
    match from_pod::process(&ctx) {
        Ok(verdict) => tc_action(verdict),
        Err(()) => {
            stats::count(stat::DROP_INTERNAL, ctx.len());
            TC_ACT_SHOT
        }
    }
}

/// The bench baseline: the cost of running any TC program at all.
#[classifier]
pub fn ferrite_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
