//! Per-CPU event counters (`ferrite_stats`); indexes and names in `ferrite_common::stat`.
//! Counters are events, not exclusive verdicts: a DNATed packet delivered to a local
//! pod bumps both `service_*` and `delivered_local`.
use ferrite_common::{stat, Counter, LbStatKey};

use crate::maps::{LB_STATS, STATS};

/// A drop reason's name, for log lines (the names `ferrite inspect stats` shows).
/// Constant indexes into the `const` table fold into string literals; a variable
/// index would load a pointer the verifier cannot follow.
#[inline(always)]
pub fn drop_name(reason: u32) -> &'static str {
    const fn name(index: u32) -> &'static str {
        stat::NAMES[index as usize]
    }
    match reason {
        stat::DROP_UNSUPPORTED_L3 => name(stat::DROP_UNSUPPORTED_L3),
        stat::DROP_MALFORMED => name(stat::DROP_MALFORMED),
        stat::DROP_SPOOFED => name(stat::DROP_SPOOFED),
        stat::DROP_NO_BACKEND => name(stat::DROP_NO_BACKEND),
        stat::DROP_WRONG_VNI => name(stat::DROP_WRONG_VNI),
        stat::DROP_UNKNOWN_POD => name(stat::DROP_UNKNOWN_POD),
        stat::DROP_NO_OVERLAY => name(stat::DROP_NO_OVERLAY),
        _ => name(stat::DROP_INTERNAL),
    }
}

#[inline(always)]
pub fn count(index: u32, bytes: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer, plain adds are exact.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Count a new flow a client opened to a Service frontend (`rev_nat_index`) that went
/// to `backend_id` (per-packet and socket-level). Packets of established flows are
/// counted in their conntrack entry, not here: an LRU per-CPU hash lookup (which the
/// kernel cannot inline) per packet cost a fifth of the established path.
#[inline(always)]
pub fn count_lb(rev_nat_index: u16, backend_id: u32, bytes: u32) {
    let key = LbStatKey {
        rev_nat_index,
        _pad: 0,
        backend_id,
    };
    if let Some(counter) = LB_STATS.get_ptr_mut(key) {
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    } else {
        let first = Counter {
            packets: 1,
            bytes: bytes as u64,
        };
        // Another CPU may insert the same pair first: this packet is then not counted
        // (the entry is per CPU, but creation is shared); BPF_NOEXIST keeps theirs.
        let _ = LB_STATS.insert(key, first, aya_ebpf::bindings::BPF_NOEXIST as u64);
    }
}
