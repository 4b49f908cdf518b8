//! Per-CPU event counters (`ferrite_stats`); indexes and names in `ferrite_common::stat`.
//! Counters are events, not exclusive verdicts: a DNATed packet delivered to a local
//! pod bumps both `service_*` and `delivered_local`.
use ferrite_common::{stat, Counter, LbStatKey};

use crate::maps::{LB_STATS, STATS};

/// A counter's name, for log lines (the names `ferrite inspect stats` shows), derived
/// from `stat::NAMES` alone: one arm per index, each a constant index into the
/// `const` table, so each folds into a string literal (a variable index would load a
/// pointer the verifier cannot follow). Indexes past the table are `drop_internal`.
#[inline(always)]
pub fn drop_name(reason: u32) -> &'static str {
    const fn name(index: u32) -> &'static str {
        if index < stat::COUNT {
            stat::NAMES[index as usize]
        } else {
            stat::NAMES[stat::DROP_INTERNAL as usize]
        }
    }
    macro_rules! by_index {
        ($($index:literal)*) => {
            match reason {
                $($index => const { name($index) },)*
                _ => const { name(stat::DROP_INTERNAL) },
            }
        };
    }
    // Covers every index the table can grow to (checked below).
    const _: () = assert!(stat::COUNT <= 48, "extend drop_name's arms");
    by_index!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23
              24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47)
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
pub fn count_lb(rev_nat_index: u32, backend_id: u32, bytes: u32) {
    let key = LbStatKey {
        rev_nat_index,
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
