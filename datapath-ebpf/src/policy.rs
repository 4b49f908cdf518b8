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
//!
//! Packets without ports: an ICMP echo is a flow keyed by its identifier (see
//! `icmp::echo_ports`), recorded like a TCP/UDP flow, so the reply of an allowed
//! request passes; an ICMP error about a packet of a flow conntrack holds is judged
//! as that flow ([`check_related`]); anything else (other ICMP, untracked later
//! fragments) is judged one packet at a time.
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
    icmp::{self, Quoted},
    maps::{IPCACHE, POLICY},
    packet::Packet,
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
    if POLICY.get(&Key::new(POLICY_PREFIX_FULL, exact)).is_some() {
        return true;
    }
    let any = PolicyKey::lookup(endpoint, direction, IDENTITY_ANY, proto, port);
    POLICY.get(&Key::new(POLICY_PREFIX_FULL, any)).is_some()
}

/// The isolation flags (`EndpointInfo::flags`) of `addr`, if it is a pod of this node.
#[inline(always)]
pub fn isolation(addr: u32) -> u32 {
    routing::local_endpoint(addr)
        .map(|ep| ep.flags)
        .unwrap_or(0)
}

/// The verdict (`CT_POLICY_*`) on a flow opened from `src` to `dst:dport` over
/// `proto` (addresses as the pods see them: after Service translation).
/// `CT_POLICY_ALLOWED` whenever a pod of this node at either end is isolated in
/// either direction: its flows are recorded, or their answers would be judged as
/// new flows the other way.
#[inline(always)]
pub fn verdict(src: u32, dst: u32, proto: u8, dport: u16) -> u8 {
    verdict_with(src, isolation(src), dst, isolation(dst), proto, dport)
}

/// [`verdict`] with the isolation flags of both ends already looked up (0 for an
/// address that is not a pod of this node): a flow between unpoliced pods costs
/// nothing more.
#[inline(always)]
pub fn verdict_with(
    src: u32,
    src_flags: u32,
    dst: u32,
    dst_flags: u32,
    proto: u8,
    dport: u16,
) -> u8 {
    if (src_flags | dst_flags) & ISOLATED == 0 {
        return CT_POLICY_OPEN;
    }
    if src_flags & ENDPOINT_EGRESS_ISOLATED != 0
        && !allows(src, DIRECTION_EGRESS, dst, proto, dport)
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
    verdict(
        h.saddr,
        h.daddr,
        h.proto,
        if h.has_ports { h.dport } else { 0 },
    )
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

/// IPv6 between `src_flags`' pod and `dst_flags`' (the isolation flags of each end,
/// 0 for an address that is no pod of this node). NetworkPolicy has no IPv6 rules
/// yet, so it fails closed: a pod isolated in either direction neither sends nor
/// receives IPv6 through the datapath. Isolated for ingress, its own packets are
/// dropped too: they may answer what reached it unjudged from outside the node.
/// Counted `drop_policy_egress` when the sender is isolated, else
/// `drop_policy_ingress`.
#[inline(always)]
pub fn ipv6_denied(src_flags: u32, dst_flags: u32) -> Option<u32> {
    if src_flags & ISOLATED != 0 {
        Some(stat::DROP_POLICY_EGRESS)
    } else if dst_flags & ISOLATED != 0 {
        Some(stat::DROP_POLICY_INGRESS)
    } else {
        None
    }
}

/// Judge the packet `h` of the conntrack entry `entry` (before any translation of
/// it): the entry's verdict if cached at `epoch`, else the verdict on the flow's
/// opening direction, cached. `Err`: dropped for this `stat` reason.
#[inline(always)]
pub fn check_flow(entry: NonNull<CtValue>, epoch: u32, h: &Headers) -> Result<(), u32> {
    let ports = Ports {
        sport: h.sport,
        dport: h.dport,
    };
    check_tuple(entry, epoch, h.saddr, h.daddr, ports, h.proto, h.explain)
}

/// A flow's ports as [`check_tuple`] takes them (host order): in registers, where a
/// tuple on the stack would push `ferrite_from_pod` past the verifier's 512 bytes.
#[derive(Clone, Copy)]
struct Ports {
    sport: u16,
    dport: u16,
}

/// [`check_flow`] for a packet of the flow from `saddr` to `daddr` (raw network order)
/// with `ports` over `proto` (`explain`: an explain run's).
#[inline(always)]
fn check_tuple(
    entry: NonNull<CtValue>,
    epoch: u32,
    saddr: u32,
    daddr: u32,
    ports: Ports,
    proto: u8,
    explain: bool,
) -> Result<(), u32> {
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
            verdict(daddr, saddr, proto, ports.sport)
        } else if rev_nat != REV_NAT_NONE {
            // A Service flow's client: judged at the backend it is pinned to.
            verdict(saddr, backend, proto, backend_port)
        } else {
            verdict(saddr, daddr, proto, ports.dport)
        };
        if trace::writes(explain, write::CT_CACHE) {
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

/// Judge an ICMP error `h` about `quoted`, a packet of the flow whose entry `entry` is
/// the one of the packets going the other way (`conntrack::lookup_related`), as that
/// flow's packets are judged: a port unreachable or a "fragmentation needed" about an
/// allowed flow reaches its sender whatever the isolation of either end.
#[inline(always)]
pub fn check_related(
    entry: NonNull<CtValue>,
    epoch: u32,
    h: &Headers,
    quoted: &Quoted,
) -> Result<(), u32> {
    let ports = Ports {
        sport: quoted.dport,
        dport: quoted.sport,
    };
    let (saddr, daddr) = (quoted.daddr, quoted.saddr);
    check_tuple(entry, epoch, saddr, daddr, ports, quoted.proto, h.explain)
}

/// Judge a packet `h` from outside the cluster for the pod of this node at its
/// destination (isolation flags `dst_flags`), routed rather than through a frontend
/// (a flow a frontend translated was judged when it was balanced, and its answers
/// recorded, which is how it is told apart): by its flow's entry, or as a new flow,
/// recorded if a policy had to allow it. `Err`: dropped for this `stat` reason.
#[inline(always)]
pub fn judge_from_outside<P: Packet>(pkt: &P, h: &Headers, dst_flags: u32) -> Result<(), u32> {
    if dst_flags & ISOLATED == 0 {
        return Ok(());
    }
    let epoch = routing::epoch();
    if !h.has_ports {
        return judge_portless(pkt, h, epoch, 0, dst_flags);
    }
    if let Some(entry) = conntrack::find(h) {
        return check_flow(entry, epoch, h);
    }
    if conntrack::has_reply_entry(h) {
        return Ok(());
    }
    let verdict = verdict_with(h.saddr, 0, h.daddr, dst_flags, h.proto, h.dport);
    if let Some(reason) = denied(verdict) {
        return Err(reason);
    }
    conntrack::create_policed(h, epoch, verdict, pkt.len());
    Ok(())
}

/// Judge a packet `h` without ports that is no ICMP error of a tracked flow, from a
/// source with isolation flags `src_flags` to a destination with `dst_flags` (0: not
/// a pod of this node). An ICMP echo request a policy had to allow is recorded, so
/// its reply passes as a reply; a packet of such an echo is judged as its flow (and
/// keeps it alive); everything else, a reply without its request too, on its own,
/// as a new flow without ports. `Err`: dropped for this `stat` reason.
#[inline(always)]
pub fn judge_portless<P: Packet>(
    pkt: &P,
    h: &Headers,
    epoch: u32,
    src_flags: u32,
    dst_flags: u32,
) -> Result<(), u32> {
    if (src_flags | dst_flags) & ISOLATED == 0 {
        return Ok(());
    }
    if let Some(echo) = icmp::echo_ports(pkt, h) {
        if let Some(entry) = conntrack::find_with_ports(h, echo.sport, echo.dport) {
            // ICMP: only the counters and the clock of the entry move.
            let ct = conntrack::touch(entry, h, pkt.len());
            // A request with identifier 0 has its reply's tuple: it is no reply.
            if !(echo.request && ct.flags & CT_FLAG_REPLY != 0) {
                let ports = Ports {
                    sport: echo.sport,
                    dport: echo.dport,
                };
                return check_tuple(entry, epoch, h.saddr, h.daddr, ports, h.proto, h.explain);
            }
        } else if echo.request {
            let verdict = verdict_with(h.saddr, src_flags, h.daddr, dst_flags, h.proto, 0);
            if let Some(reason) = denied(verdict) {
                return Err(reason);
            }
            if verdict == CT_POLICY_ALLOWED {
                let (sport, dport) = (echo.sport, echo.dport);
                conntrack::create_policed_with_ports(h, sport, dport, epoch, verdict, pkt.len());
            }
            return Ok(());
        }
    }
    match denied(verdict_with(
        h.saddr, src_flags, h.daddr, dst_flags, h.proto, 0,
    )) {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}
