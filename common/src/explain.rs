//! `ferrite explain`: a packet run with BPF_PROG_TEST_RUN through the explain copy of a
//! loaded program (`program_names::EXPLAIN`: the same logic, in the same object,
//! against the same live maps) takes the decisions a real packet would, but every
//! write it would make (conntrack, affinity pins, SNAT ports, fragments, counters,
//! drop logs) is skipped and recorded in the per-CPU `ferrite_trace` instead.
use crate::{Backend, ServiceKey, ServiceValue};

/// The high half of an explain run's word (TC: the skb mark; XDP: a 4-byte metadata
/// word before the frame); the low half is the run's nonce, which the run writes to
/// its trace. The explain programs run nothing without it.
pub const MAGIC: u32 = 0xfe71_0000;
pub const MAGIC_MASK: u32 = 0xffff_0000;
/// Bytes of XDP metadata an explain run carries (the kernel wants a multiple of 4).
pub const XDP_METADATA_LEN: usize = 4;

/// Whether a mark (or XDP metadata word) marks an explain run.
#[inline(always)]
pub const fn is_explain(word: u32) -> bool {
    word & MAGIC_MASK == MAGIC
}

/// `ExplainTrace::steps`: what the packet went through.
pub mod step {
    /// The source was looked up and is the sender's (pod behind this veth, or a
    /// pod CIDR of the node the tunnel came from).
    pub const SOURCE_CHECKED: u32 = 1 << 0;
    /// The flow's packets were checked to come from there before (conntrack).
    pub const SOURCE_CACHED: u32 = 1 << 1;
    /// Conntrack was consulted and held an entry for the packet's tuple.
    pub const CT_HIT: u32 = 1 << 2;
    /// Conntrack was consulted and held none.
    pub const CT_MISS: u32 = 1 << 3;
    /// A Service frontend matched (`frontend`, `service`).
    pub const FRONTEND: u32 = 1 << 4;
    /// A backend was chosen for a new flow (`choice`, `backend_*`).
    pub const BACKEND_CHOSEN: u32 = 1 << 5;
    /// A flow's destination was resolved from the endpoint and route maps (without
    /// it, a conntrack hit's destination came from the entry's route cache).
    pub const ROUTE_RESOLVED: u32 = 1 << 6;
    /// The new flow's source was SNATed (`snat_address`, `snat_port`).
    pub const SNAT: u32 = 1 << 7;
}

/// `ExplainTrace::skipped`: the writes the packet would have made.
pub mod write {
    /// A conntrack entry's packet/byte counts and last-seen time (or FIN/RST).
    pub const CT_ACCOUNTING: u32 = 1 << 0;
    /// A conntrack entry's verified source or route cache.
    pub const CT_CACHE: u32 = 1 << 1;
    /// New conntrack entries (the flow's forward and reply entries).
    pub const CT_CREATE: u32 = 1 << 2;
    /// The entries of a closing flow whose tuple a new connection takes over.
    pub const CT_REOPEN: u32 = 1 << 3;
    /// A session-affinity pin, new or refreshed.
    pub const AFFINITY: u32 = 1 << 4;
    /// A first fragment's ports, for its later fragments.
    pub const FRAGMENT: u32 = 1 << 5;
    /// A Service/backend traffic counter (`ferrite_lbstats`).
    pub const LB_STATS: u32 = 1 << 6;
    /// A drop log line (and the drop's monitor event).
    pub const DROP_LOG: u32 = 1 << 7;
    /// A new flow's event for `ferrite monitor`.
    pub const MONITOR_EVENT: u32 = 1 << 8;
    /// The entries of an unestablished TCP flow whose SNAT port a new flow takes over.
    pub const SNAT_RECLAIM: u32 = 1 << 9;
}

/// `ExplainTrace::choice`: how the backend of a new flow was chosen.
pub mod choice {
    /// The client's session-affinity pin.
    pub const AFFINITY: u16 = 1;
    /// The frontend's Maglev table (external frontends).
    pub const MAGLEV: u16 = 2;
    /// The flow hash modulo the backend count.
    pub const HASH: u16 = 3;
}

/// `ExplainTrace::verdict`: what the program returned, and `verdict_target` where.
pub mod verdict {
    /// Into the host network stack (XDP: on to the uplink's tcx program).
    pub const PASS: u32 = 1;
    /// Dropped, counted under `drop_reason`.
    pub const DROP: u32 = 2;
    /// Into the pod behind the host veth `verdict_target` (bpf_redirect_peer).
    pub const TO_POD: u32 = 3;
    /// Out of the device `verdict_target`.
    pub const REDIRECT: u32 = 4;
    /// Out of the device `verdict_target`, the kernel resolving the next hop.
    pub const REDIRECT_NEIGH: u32 = 5;
    /// Back out of the device it came in on (an answer built in place).
    pub const BOUNCE: u32 = 6;
    /// Received again as if it arrived on the device `verdict_target` (`lo`).
    pub const TO_HOST: u32 = 7;
}

/// The test packet of `program_names::EXPLAIN_SOCK`: a socket call to explain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRequest {
    /// The explain run's mark (`MAGIC` | nonce), for its trace.
    pub word: u32,
    /// The address the call names (network order), its port (host order), protocol.
    pub address: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u32,
    /// The socket's cookie (backends are hashed over it) and its network namespace's
    /// (the session-affinity client).
    pub cookie: u64,
    pub netns_cookie: u64,
}

/// Value of the per-CPU array `ferrite_trace` (one entry): what the last explain run
/// on that CPU did. Written only by explain runs, zeroed at their start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainTrace {
    /// The run's nonce (the low half of its mark): the tool checks it is its own run.
    pub nonce: u32,
    /// `explain::step::*`.
    pub steps: u32,
    /// `explain::write::*`: writes skipped.
    pub skipped: u32,
    /// `explain::verdict::*`.
    pub verdict: u32,
    /// Bit i: `stat::NAMES[i]` would have been counted.
    pub counted: u64,
    /// The device of `verdict` (ifindex), if it names one.
    pub verdict_target: u32,
    /// With `verdict::DROP`: the `stat` index it is counted under.
    pub drop_reason: u32,
    /// With `step::CT_HIT`: the entry's `CT_FLAG_*`.
    pub ct_flags: u16,
    /// `explain::choice::*`.
    pub choice: u16,
    /// With `step::FRONTEND`: the frontend's master key and entry.
    pub frontend: ServiceKey,
    pub service: ServiceValue,
    /// With `step::BACKEND_CHOSEN`: the slot (1..=count; 0 for an affinity pin) and
    /// the backend.
    pub backend_slot: u16,
    /// With `step::SNAT`: the source port (host order) and address it is SNATed to.
    pub snat_port: u16,
    pub backend_id: u32,
    pub backend: Backend,
    pub snat_address: [u8; 4],
}
