//! Explain runs (`ferrite explain`): the never-attached `ferrite_explain_*` programs
//! run the attached programs' logic on the tool's packet, compiled for an explain
//! context (`packet::Explaining`), so it takes the same decisions against the same
//! maps, but each write it would make is skipped and noted here, in its CPU's slot of
//! `ferrite_trace`, with the steps and the verdict, for the tool to read back. In the
//! attached programs `explain` is the constant `false`: no explain code is left in
//! them, and real packets pay nothing for it.
use ferrite_common::{explain, ExplainTrace};

use crate::{maps::TRACE, stats};

/// Note something in this CPU's trace, in an explain run only.
#[inline(always)]
pub fn record(explain: bool, note: impl FnOnce(&mut ExplainTrace)) {
    if explain {
        if let Some(trace) = TRACE.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; an explain run is the only writer.
            note(unsafe { &mut *trace });
        }
    }
}

/// Start the trace of the explain run marked `word`: cleared, with its nonce.
#[inline(always)]
pub fn begin(word: u32) {
    record(true, |trace| {
        *trace = ExplainTrace::default();
        trace.nonce = word & !explain::MAGIC_MASK;
    });
}

/// `explain::step::*` bits the packet went through.
#[inline(always)]
pub fn step(explain: bool, bits: u32) {
    record(explain, |trace| trace.steps |= bits);
}

/// Whether to make a write (`explain::write::*`): always for a real packet; never in
/// an explain run, which notes it skipped it.
#[inline(always)]
pub fn writes(explain: bool, write: u32) -> bool {
    record(explain, |trace| trace.skipped |= write);
    !explain
}

/// Count an event (`stat` index) of a packet `bytes` long; an explain run notes it.
#[inline(always)]
pub fn count(explain: bool, index: u32, bytes: u32) {
    if explain {
        record(true, |trace| trace.counted |= 1u64 << (index & 63));
    } else {
        stats::count(index, bytes);
    }
}
