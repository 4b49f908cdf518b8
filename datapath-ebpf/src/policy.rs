//! NetworkPolicy verdicts. A flow is judged once per route epoch, for the direction
//! it was opened in, at every hook where a packet of it leaves or reaches a pod of
//! this node: the sending pod's egress rules (if it is here and isolated for
//! egress) and the receiving pod's ingress rules (likewise), each one lookup of the
//! peer's identity in `ferrite_ipcache` and at most two in `ferrite_policy` (the
//! peer's identity, then "any peer"), whatever the number of policies and pods.
//! Flows a policy had to allow are recorded in conntrack, both directions, so their
//! replies pass as replies; the verdict is cached in the flow's entry and redone
//! when the agent bumps the epoch (every policy change), so a connection a new
//! policy denies stops within one sync. The node's own addresses reach its pods
//! unchecked (kubelet probes), as with Cilium and Calico.
use core::ptr::NonNull;

use aya_ebpf::btf_maps::lpm_trie::Key;
use ferrite_common::{
    explain::write,
    policy::{
        PolicyKey, CT_POLICY_ALLOWED, CT_POLICY_DENIED_EGRESS, CT_POLICY_DENIED_INGRESS,
        CT_POLICY_OPEN, CT_POLICY_UNKNOWN, DIRECTION_EGRESS, DIRECTION_INGRESS,
        ENDPOINT_EGRESS_ISOLATED, ENDPOINT_INGRESS_ISOLATED, IDENTITY_ANY, IDENTITY_WORLD,
        POLICY_PREFIX_FULL,
    },
    stat, CtValue, CT_FLAG_REPLY, CT_FLAG_VIA_STACK, REV_NAT_NONE,
};

use crate::{
    conntrack,
    headers::Headers,
    maps::{IPCACHE, POLICY},
    routing, trace,
};

/// The identity of `addr`'s address class (`IDENTITY_WORLD` if no entry covers it).
#[inline(always)]
fn identity(addr: u32) -> u32 {
    IPCACHE
        .get(&Key::new(32, addr.to_ne_bytes()))
        .map(|v| v.identity)
        .unwrap_or(IDENTITY_WORLD)
}

/// Whether the pod `endpoint` allows, in `direction`, the peer `peer` over `proto`
/// to port `port` (the destination port of the flow's opening direction).
#[inline(always)]
fn allows(endpoint: u32, direction: u8, peer: u32, proto: u8, port: u16) -> bool {
    let endpoint = endpoint.to_ne_bytes();
    let exact = PolicyKey::lookup(endpoint, direction, identity(peer), proto, port);
    if POLICY
        .get(&Key::new(POLICY_PREFIX_FULL, exact))
        .is_some()
    {
        return true;
    }
    let any = PolicyKey::lookup(endpoint, direction, IDENTITY_ANY, proto, port);
    POLICY.get(&Key::new(POLICY_PREFIX_FULL, any)).is_some()
}

/// The isolation flags (`EndpointInfo::flags`) of `addr`, if it is a pod of this node.
#[inline(always)]
fn isolation(addr: u32) -> u32 {
    routing::local_endpoint(addr).map(|ep| ep.flags).unwrap_or(0)
}

/// The verdict (`CT_POLICY_*`) on a flow opened from `src` to `dst:dport` over
/// `proto` (addresses as the pods see them: after Service translation).
/// `CT_POLICY_ALLOWED` whenever a pod of this node at either end is isolated in
/// either direction: its flows are recorded, or their answers would be judged as
/// new flows the other way.
#[inline(always)]
pub fn verdict(src: u32, dst: u32, proto: u8, dport: u16) -> u8 {
    let (src_flags, dst_flags) = (isolation(src), isolation(dst));
    if src_flags & ENDPOINT_EGRESS_ISOLATED != 0 && !allows(src, DIRECTION_EGRESS, dst, proto, dport)
    {
        return CT_POLICY_DENIED_EGRESS;
    }
    if dst_flags & ENDPOINT_INGRESS_ISOLATED != 0
        && !routing::is_host_address(src)
        && !allows(dst, DIRECTION_INGRESS, src, proto, dport)
    {
        return CT_POLICY_DENIED_INGRESS;
    }
    if (src_flags | dst_flags) & ISOLATED != 0 {
        CT_POLICY_ALLOWED
    } else {
        CT_POLICY_OPEN
    }
}

/// Isolated in either direction.
pub const ISOLATED: u32 = ENDPOINT_INGRESS_ISOLATED | ENDPOINT_EGRESS_ISOLATED;

/// The verdict on the flow a packet `h` opens (no conntrack entry), judged as sent.
#[inline(always)]
pub fn verdict_of_new(h: &Headers) -> u8 {
    verdict(h.saddr, h.daddr, h.proto, if h.has_ports { h.dport } else { 0 })
}

/// The drop reason of a denying verdict.
#[inline(always)]
pub fn denied(verdict: u8) -> Option<u32> {
    match verdict {
        CT_POLICY_DENIED_INGRESS => Some(stat::DROP_POLICY_INGRESS),
        CT_POLICY_DENIED_EGRESS => Some(stat::DROP_POLICY_EGRESS),
        _ => None,
    }
}

/// Judge the packet `h` of the conntrack entry `entry` (before any translation of
/// it): the entry's verdict if cached at `epoch`, else the verdict on the flow's
/// opening direction, cached. `Err`: dropped for this `stat` reason.
#[inline(always)]
pub fn check_flow(entry: NonNull<CtValue>, epoch: u32, h: &Headers) -> Result<(), u32> {
    let ct = entry.as_ptr();
    // SAFETY: a value of `ferrite_ct` found by this packet's lookup; another CPU's
    // concurrent write at worst makes this packet judge the flow again.
    let cached = unsafe {
        if (*ct).cache_epoch == epoch {
            (*ct).policy_verdict
        } else {
            CT_POLICY_UNKNOWN
        }
    };
    let verdict = if cached != CT_POLICY_UNKNOWN {
        cached
    } else {
        let (flags, rev_nat, backend, backend_port) = unsafe {
            (
                (*ct).flags,
                (*ct).rev_nat_index,
                u32::from_ne_bytes((*ct).backend_address),
                (*ct).backend_port,
            )
        };
        let verdict = if flags & (CT_FLAG_REPLY | CT_FLAG_VIA_STACK) != 0 {
            // An answer: the flow was opened by its destination, to its source port.
            verdict(h.daddr, h.saddr, h.proto, h.sport)
        } else if rev_nat != REV_NAT_NONE {
            // A Service flow's client: judged at the backend it is pinned to.
            verdict(h.saddr, backend, h.proto, backend_port)
        } else {
            verdict(h.saddr, h.daddr, h.proto, h.dport)
        };
        if trace::writes(h.explain, write::CT_CACHE) {
            conntrack::claim_epoch(entry, epoch);
            unsafe { (*ct).policy_verdict = verdict };
        }
        verdict
    };
    match denied(verdict) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}
