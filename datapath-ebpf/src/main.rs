//! Ferrite's eBPF datapath: thin program entries over shared modules.
#![no_std]
#![no_main]

mod conntrack;
mod external;
mod fragments;
mod from_overlay;
mod from_pod;
mod headers;
mod host;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod routing;
mod sock;
mod stats;
mod to_pod;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use ferrite_common::stat;
use packet::Verdict;

/// Count a drop and, at debug level only (the agent's `--datapath-log`), log it:
/// drops are the one datapath event worth a log line, and they are off the hot path.
#[inline(always)]
fn drop_packet<C: EbpfContext>(ctx: &C, reason: u32, len: u32, ifindex: u32) -> i32 {
    log_drop(ctx, reason, len, ifindex);
    TC_ACT_SHOT
}

#[inline(always)]
fn log_drop<C: EbpfContext>(ctx: &C, reason: u32, len: u32, ifindex: u32) {
    stats::count(reason, len);
    debug!(
        ctx,
        "drop: reason {} ({} bytes) on ifindex {}",
        stats::drop_name(reason),
        len,
        ifindex
    );
}

#[inline(always)]
fn tc_action(ctx: &TcContext, verdict: Result<Verdict, ()>) -> i32 {
    use packet::Packet;
    match verdict.unwrap_or(Verdict::Drop(stat::DROP_INTERNAL)) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(reason) => drop_packet(ctx, reason, ctx.len(), ctx.ifindex()),
        Verdict::RedirectPeer(ifindex) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Verdict::RedirectNeigh(ifindex) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        Verdict::Bounce => unsafe { bpf_redirect(ctx.ifindex(), 0) as i32 },
        Verdict::RedirectIngress(ifindex) => unsafe {
            bpf_redirect(ifindex, BPF_F_INGRESS as u64) as i32
        },
    }
}

/// tcx ingress of each pod's host-side veth.
#[classifier]
pub fn ferrite_from_pod(ctx: TcContext) -> i32 {
    tc_action(&ctx, from_pod::process(&ctx))
}

/// tcx ingress of the node's VXLAN device.
#[classifier]
pub fn ferrite_from_overlay(ctx: TcContext) -> i32 {
    tc_action(&ctx, from_overlay::process(&ctx))
}

/// tcx ingress of the node's uplink (after the XDP program).
#[classifier]
pub fn ferrite_from_uplink(ctx: TcContext) -> i32 {
    tc_action(&ctx, external::from_uplink(&ctx))
}

/// tcx egress of each pod's host-side veth: what the host stack sends the pod.
#[classifier]
pub fn ferrite_to_pod(ctx: TcContext) -> i32 {
    tc_action(&ctx, to_pod::process(&ctx))
}

/// tcx egress of the node's uplink and of `lo`: the node's own Service traffic.
#[classifier]
pub fn ferrite_from_host(ctx: TcContext) -> i32 {
    tc_action(&ctx, host::process(&ctx))
}

/// Socket-level load balancing (cgroup hooks of the node's cgroup subtree).
#[cgroup_sock_addr(connect4)]
pub fn ferrite_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ferrite_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::sendmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ferrite_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferrite_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// XDP on the node's uplink: external traffic to NodePort/LoadBalancer/externalIPs.
#[xdp]
pub fn ferrite_from_world(ctx: XdpContext) -> u32 {
    use packet::Packet;
    match external::from_world(&ctx).unwrap_or(Verdict::Drop(stat::DROP_INTERNAL)) {
        Verdict::Drop(reason) => {
            log_drop(&ctx, reason, ctx.len(), ctx.ifindex());
            xdp_action::XDP_DROP
        }
        Verdict::Bounce => xdp_action::XDP_TX,
        // Translated packets continue to the uplink's TC program, which forwards.
        _ => xdp_action::XDP_PASS,
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
