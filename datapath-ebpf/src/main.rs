//! Ferrite's eBPF datapath, as a stack read from the bottom up: checksum arithmetic
//! (`csum`), maps and counters, the explain runs' trace (`trace`), packet access
//! (`packet`), header parsing (`fragments`, `headers`, `headers6`), the monitor's events
//! (`events`), rewrites (`nat`, `icmp`), state and decisions
//! (`conntrack`, `lb`, `routing`, `policy`, `external`, `reply`, `peer`), the verdict-to-return-code
//! mapping (`action`), then one thin file per attach point (`from_pod`, with its
//! IPv6 half `from_pod6` reached by tail call through `ferrite_progs`,
//! `from_overlay`, with `from_overlay6` likewise, `from_world` (XDP), `from_uplink`, `from_host`, `to_pod`, and the
//! socket programs in `sock` and `sock6`), and the bench's never-attached floors (`floor`). No
//! module uses one above it; entries use no entry (a tail call goes through the
//! map, by slot, not through the module).
//! The files of the programs `ferrite explain` runs also hold their never-attached
//! explain copies (`ferrite_explain_*`: the same logic, see `trace`).
#![no_std]
#![no_main]

// The bottom: no packet access.
mod csum;
mod maps;
mod stats;
mod trace;
// Packets and their headers.
mod fragments;
mod headers;
mod headers6;
mod packet;
// What the monitor is told (drops, new flows).
mod events;
// Rewrites, state and decisions over them.
mod conntrack;
mod external;
mod icmp;
mod lb;
mod nat;
mod peer;
mod policy;
mod reply;
mod routing;
// Program entries.
mod action;
mod floor;
mod from_host;
mod from_overlay;
mod from_overlay6;
mod from_pod;
mod from_pod6;
mod from_uplink;
mod from_world;
mod sock;
mod sock6;
mod to_pod;
// Never attached: the agent's in-kernel purge of ended flows.
mod purge;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_jiffies64,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// The bench baseline: the cost of running any TC program at all.
#[classifier]
pub fn ferrite_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Never attached: the agent runs it with BPF_PROG_TEST_RUN to read the clock
/// conntrack entries are stamped with, written over the test packet's first 8 bytes.
#[classifier]
pub fn ferrite_clock(ctx: TcContext) -> i32 {
    use packet::Packet;
    let now = unsafe { bpf_jiffies64() };
    match Packet::store(&ctx, 0, &now) {
        Ok(()) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}

/// The bench baseline for the XDP program: the cost of running any XDP program.
#[xdp]
pub fn ferrite_noop_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
