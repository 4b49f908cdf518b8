//! From a [`Verdict`] to a program's return code: the one place drops are counted,
//! logged and reported to monitors for every packet entry (TC and XDP).
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use ferrite_common::stat;

use crate::{
    events::{self, Seen},
    packet::{Packet, Verdict},
    stats,
};

/// Count a drop, report it to monitors and, at debug level only (the agent's
/// `--datapath-log`), log it: drops are the one datapath event worth a log line, and
/// they are off the hot path. `program`: the entry's `monitor::program_index`.
#[inline(always)]
pub fn log_drop<P: Packet>(pkt: &P, program: u8, reason: u32) {
    let (len, ifindex) = (pkt.len(), pkt.ifindex());
    stats::count(reason, len);
    let seen = Seen {
        program,
        ifindex,
        len,
    };
    events::packet_dropped(pkt, &seen, reason);
    debug!(
        pkt,
        "drop: reason {} ({} bytes) on ifindex {}",
        stats::drop_name(reason),
        len,
        ifindex
    );
}

/// The TC return code for `verdict` (an `Err` is an internal drop) of the entry
/// `program` (`monitor::program_index`).
#[inline(always)]
pub fn tc(ctx: &TcContext, program: u8, verdict: Result<Verdict, ()>) -> i32 {
    match verdict.unwrap_or(Verdict::Drop(stat::DROP_INTERNAL)) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(reason) => {
            log_drop(ctx, program, reason);
            TC_ACT_SHOT
        }
        Verdict::RedirectPeer(ifindex) => unsafe { bpf_redirect_peer(ifindex, 0) as i32 },
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        Verdict::RedirectNeigh(ifindex) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        Verdict::Bounce => unsafe { bpf_redirect(Packet::ifindex(ctx), 0) as i32 },
        Verdict::RedirectIngress(ifindex) => unsafe {
            bpf_redirect(ifindex, BPF_F_INGRESS as u64) as i32
        },
    }
}
