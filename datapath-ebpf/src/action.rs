//! From a [`Verdict`] to a program's return code: the one place drops are counted,
//! logged and reported to monitors for every packet entry (TC and XDP), and where
//! the explain copies of the programs note their verdict instead.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use ferrite_common::{
    explain::{self, verdict, write},
    stat,
};

use crate::{
    events::{self, Seen},
    packet::{Explaining, Packet, Verdict},
    stats, trace,
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

/// The entry of a TC program's explain copy (`ferrite_explain_*`, never attached):
/// `process` run on the packet as an explain run; its verdict noted in the trace and
/// mapped to the code the real program would return (nothing sent). A packet without
/// the explain mark is not run.
#[inline(always)]
pub fn explain_tc(
    ctx: TcContext,
    process: impl FnOnce(&Explaining<TcContext>) -> Result<Verdict, ()>,
) -> i32 {
    let pkt = Explaining(ctx);
    let word = pkt.word();
    if !explain::is_explain(word) {
        return TC_ACT_SHOT;
    }
    trace::begin(word);
    match note_verdict(process(&pkt)) {
        verdict::PASS => TC_ACT_OK,
        verdict::DROP => TC_ACT_SHOT,
        _ => TC_ACT_REDIRECT,
    }
}

/// Note an explain run's verdict in its trace; returns its `explain::verdict` kind.
#[inline(always)]
pub fn note_verdict(result: Result<Verdict, ()>) -> u32 {
    let (kind, target) = match result.unwrap_or(Verdict::Drop(stat::DROP_INTERNAL)) {
        Verdict::Pass => (verdict::PASS, 0),
        Verdict::Drop(reason) => (verdict::DROP, reason),
        Verdict::RedirectPeer(ifindex) => (verdict::TO_POD, ifindex),
        Verdict::Redirect(ifindex) => (verdict::REDIRECT, ifindex),
        Verdict::RedirectNeigh(ifindex) => (verdict::REDIRECT_NEIGH, ifindex),
        Verdict::Bounce => (verdict::BOUNCE, 0),
        Verdict::RedirectIngress(ifindex) => (verdict::TO_HOST, ifindex),
    };
    trace::record(true, |trace| {
        trace.verdict = kind;
        if kind == verdict::DROP {
            trace.drop_reason = target;
            trace.counted |= 1u64 << (target & 63);
            trace.skipped |= write::DROP_LOG;
        } else {
            trace.verdict_target = target;
        }
    });
    kind
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
