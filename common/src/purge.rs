//! What the agent hands `program_names::PURGE` (never attached: run with
//! BPF_PROG_TEST_RUN) to forget the flows a Service change ended, in the kernel:
//! the program walks `ferrite_ct` and `ferrite_affin` with `bpf_for_each_map_elem`
//! and deletes each entry (forward and reply entries alike: both carry the flow's
//! backend id and rev-NAT index) whose backend is in `map_names::PURGE_BACKENDS`, or
//! whose (rev-NAT index, backend) pair is in `map_names::PURGE_PAIRS`. One walk in
//! the kernel instead of copying a full table (262,144 entries) to userspace.

/// The most removed backends (and, separately, ended pairs) one run takes; a change
/// that ends more is purged from userspace.
pub const CAPACITY: u32 = 4_096;

/// A Service-backend pair a sync ended (the backend lives on behind other Services).
/// The rev-NAT index is widened to 32 bits, whatever width the entries store it in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PurgePair {
    pub rev_nat_index: u32,
    pub backend_id: u32,
}

impl PurgePair {
    #[inline(always)]
    pub fn new(rev_nat_index: impl Into<u32>, backend_id: u32) -> Self {
        Self {
            rev_nat_index: rev_nat_index.into(),
            backend_id,
        }
    }
}

/// Removed backends the program compares inline, without a map lookup per entry
/// (one endpoint change removes one or a few).
pub const INLINE_BACKENDS: usize = 8;

/// The test frame the program runs on: what to purge besides the maps' contents.
/// The program writes [`PurgeCounts`] over its start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeRequest {
    /// The first `inline_backends` are removed backends.
    pub backends: [u32; INLINE_BACKENDS],
    pub inline_backends: u32,
    /// `LOOKUP_*`: which maps hold more to purge (each skipped when empty).
    pub lookups: u32,
}

/// `map_names::PURGE_BACKENDS` holds removed backends.
pub const LOOKUP_BACKENDS: u32 = 1;
/// `map_names::PURGE_PAIRS` holds ended pairs.
pub const LOOKUP_PAIRS: u32 = 2;

/// What one run deleted, written native-endian over the test frame's first bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeCounts {
    pub conntrack: u32,
    pub affinity: u32,
}

/// The program's return code when it did its work (anything else: it did not).
pub const DONE: i32 = 0;

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], Copy, u32 fields only: no padding.
unsafe impl aya::Pod for PurgePair {}
