//! Ferrite's eBPF datapath, as a stack read from the bottom up: checksum arithmetic
//! (`csum`), maps and counters, the explain runs' trace (`trace`), packet access
//! (`packet`), header parsing (`fragments`, `headers`), the monitor's events
//! (`events`), rewrites (`nat`, `icmp`), state and decisions
//! (`conntrack`, `lb`, `routing`, `policy`, `external`, `reply`, `peer`), the verdict-to-return-code
//! mapping (`action`), then one thin file per attach point (`from_pod`,
//! `from_overlay`, `from_world` (XDP), `from_uplink`, `from_host`, `to_pod`, and the
//! socket programs in `sock`). No module uses one above it; entries use no entry.
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
mod from_host;
mod from_overlay;
mod from_pod;
mod from_uplink;
mod from_world;
mod sock;
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

/// Never attached: the bench's floor of an established translated packet. Only what
/// any datapath must do for one (a conntrack hit on the flow's 16-byte key, the DNAT
/// with a port change and its checksum fixes, the Ethernet rewrite and
/// `bpf_redirect_peer`), on the frames of the bench's ClusterIP flows (Ethernet,
/// IPv4 without options, TCP), with the delivery `ferrite_from_pod` cached in the
/// entry: the same frame out, none of the checks, counters or other cases.
#[classifier]
pub fn ferrite_floor(ctx: TcContext) -> i32 {
    match floor(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn floor(ctx: &TcContext) -> Result<i32, ()> {
    use ferrite_common::{CtKey, PROTO_TCP};
    use packet::Packet;
    const DADDR: usize = 30;
    const DPORT: usize = 36;
    const TCP_CHECK: usize = 50;
    let addrs: [u32; 2] = Packet::load(ctx, 26)?;
    let ports: [u16; 2] = Packet::load(ctx, 34)?;
    let key = CtKey {
        saddr: addrs[0].to_ne_bytes(),
        daddr: addrs[1].to_ne_bytes(),
        sport: u16::from_be(ports[0]),
        dport: u16::from_be(ports[1]),
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    };
    let ct = unsafe { maps::CONNTRACK.get(key) }.ok_or(())?;
    let (daddr, dport) = (
        u32::from_ne_bytes(ct.backend_address),
        ct.backend_port.to_be(),
    );
    ctx.replace_l4_csum(TCP_CHECK, addrs[1], daddr, 4, true, false)?;
    ctx.replace_l4_csum(TCP_CHECK, ports[1] as u32, dport as u32, 2, false, false)?;
    let check: u16 = Packet::load(ctx, 24)?;
    Packet::store(ctx, 24, &csum::replace4(check, addrs[1], daddr))?;
    Packet::store(ctx, DADDR, &daddr)?;
    Packet::store(ctx, DPORT, &dport)?;
    let macs = unsafe { *(ct.route_macs.as_ptr() as *const [u32; 3]) };
    Packet::store(ctx, 0, &macs)?;
    Ok(unsafe { aya_ebpf::helpers::bpf_redirect_peer(ct.route_target, 0) } as i32)
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
