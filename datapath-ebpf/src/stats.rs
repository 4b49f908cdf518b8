//! Per-CPU event counters (`ferrite_stats`); indexes and names in `ferrite_common::stat`.
//! Counters are events, not exclusive verdicts: a DNATed packet delivered to a local
//! pod bumps both `service_*` and `delivered_local`.
use crate::maps::STATS;

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
