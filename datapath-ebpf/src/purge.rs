//! `ferrite_purge`, never attached: the agent runs it with BPF_PROG_TEST_RUN after a
//! Service change to delete the flows the change ended (see `ferrite_common::purge`).
//! Deleting the entry being visited is allowed in a `bpf_for_each_map_elem`
//! callback of a hash map: the kernel holds no bucket lock while it calls back.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::TC_ACT_SHOT, helpers::bpf_for_each_map_elem, macros::classifier, programs::TcContext,
};
use ferrite_common::{
    purge::{
        PurgeCounts, PurgePair, PurgeRequest, DONE, INLINE_BACKENDS, LOOKUP_BACKENDS, LOOKUP_PAIRS,
    },
    AffinityKey, AffinityValue, CtKey, CtValue,
};

use crate::{
    maps::{AFFINITY, CONNTRACK, PURGE_BACKENDS, PURGE_PAIRS},
    packet::Packet,
};

/// What the callbacks share: the request, and what they deleted.
struct Walk {
    request: PurgeRequest,
    counts: PurgeCounts,
}

/// Walk `ferrite_ct`, then `ferrite_affin`, deleting what the request (the test
/// frame) and the purge maps name; the counts go over the frame's first bytes.
#[classifier]
pub fn ferrite_purge(ctx: TcContext) -> i32 {
    let Ok(request) = Packet::load::<PurgeRequest>(&ctx, 0) else {
        return TC_ACT_SHOT;
    };
    let mut walk = Walk {
        request,
        counts: PurgeCounts::default(),
    };
    let walk_ptr = core::ptr::from_mut(&mut walk).cast::<c_void>();
    // SAFETY: both maps are this object's hash maps, each callback takes the
    // (map, key, value, context) of its map's types, and the context outlives the walk.
    let walked = unsafe {
        (
            bpf_for_each_map_elem(
                core::ptr::from_ref(&CONNTRACK).cast_mut().cast(),
                conntrack_entry as *mut c_void,
                walk_ptr,
                0,
            ),
            bpf_for_each_map_elem(
                core::ptr::from_ref(&AFFINITY).cast_mut().cast(),
                affinity_pin as *mut c_void,
                walk_ptr,
                0,
            ),
        )
    };
    if walked.0 < 0 || walked.1 < 0 {
        return TC_ACT_SHOT;
    }
    match Packet::store(&ctx, 0, &walk.counts) {
        Ok(()) => DONE,
        Err(()) => TC_ACT_SHOT,
    }
}

/// Whether the agent asked for the flows of `backend_id` (behind every frontend, or
/// behind the frontend of `rev_nat_index` only) to go.
#[inline(always)]
fn ended(walk: &Walk, rev_nat_index: impl Into<u32>, backend_id: u32) -> bool {
    let request = &walk.request;
    for (i, removed) in request.backends.iter().enumerate().take(INLINE_BACKENDS) {
        if (i as u32) < request.inline_backends && *removed == backend_id {
            return true;
        }
    }
    // SAFETY: only whether an entry exists is read.
    unsafe {
        (request.lookups & LOOKUP_BACKENDS != 0 && PURGE_BACKENDS.get(backend_id).is_some())
            || (request.lookups & LOOKUP_PAIRS != 0
                && PURGE_PAIRS
                    .get(PurgePair::new(rev_nat_index, backend_id))
                    .is_some())
    }
}

/// One conntrack entry, forward or reply: each names its flow's backend and frontend.
#[inline(never)]
extern "C" fn conntrack_entry(
    _map: *mut c_void,
    key: *const CtKey,
    value: *const CtValue,
    walk: *mut Walk,
) -> i64 {
    // SAFETY: the kernel passes the visited entry and our context.
    unsafe {
        if ended(&*walk, (*value).rev_nat_index, (*value).backend_id)
            && CONNTRACK.remove(*key).is_ok()
        {
            (*walk).counts.conntrack += 1;
        }
    }
    0 // go on
}

/// One session-affinity pin.
#[inline(never)]
extern "C" fn affinity_pin(
    _map: *mut c_void,
    key: *const AffinityKey,
    value: *const AffinityValue,
    walk: *mut Walk,
) -> i64 {
    // SAFETY: the kernel passes the visited entry and our context.
    unsafe {
        if ended(&*walk, (*key).rev_nat_index, (*value).backend_id) && AFFINITY.remove(*key).is_ok()
        {
            (*walk).counts.affinity += 1;
        }
    }
    0
}
