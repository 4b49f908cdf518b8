//! What the host stack delivers to a pod, seen at tcx egress of its host-side veth.
//! Traffic the datapath delivers itself (redirect_peer) never passes here; what does
//! is the stack's: answers to the pod's masqueraded egress, the node's own traffic,
//! the replies of Service flows whose backend is a node address (a host-network
//! endpoint, such as the API server): those are translated back to the Service
//! address here; and what pods send this pod through the stack, such as a pod's
//! connection to a hostPort on a node address that netfilter (portmap) DNATed to this
//! pod: such a flow is recorded so that its replies go back through the stack too;
//! ICMP errors about Service flows are translated back too. What a pod's
//! NetworkPolicy does not allow is dropped here (the node's own traffic never is);
//! an ICMP echo reply or error of a flow it allows passes as that flow's packets do.
//! IPv6 to a pod NetworkPolicy isolates is dropped (no IPv6 rules yet: fail closed).
use ferrite_common::{policy::CT_POLICY_ALLOWED, PROTO_ICMP};

use crate::{
    action, conntrack,
    headers::{parse, Headers, Parsed},
    headers6::{is_ipv6, IP6_DADDR_OFF, IP6_OFF, IPV6_HLEN},
    packet::{Packet, Verdict},
    policy,
    reply::{self, ErrorTo},
    routing,
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 = ferrite_common::monitor::program_index(ferrite_common::program_names::TO_POD);

/// tcx egress of each pod's host-side veth: what the host stack sends the pod.
#[classifier]
pub fn ferrite_to_pod(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed::Ipv4(h) if h.has_ports => h,
        // An ICMP error a host-network backend's stack sent about a packet of a
        // Service flow (a closed port): translated back, on its way to the pod.
        // An ICMP error about a flow conntrack holds is judged as that flow (about an
        // unknown flow, as a packet of its own).
        Parsed::Ipv4(h) if h.proto == PROTO_ICMP => {
            let epoch = routing::epoch();
            return match reply::reverse_icmp_error(pkt, &h, epoch)? {
                ErrorTo::Unrelated | ErrorTo::Untracked(_) => judge_unrecorded(pkt, &h, epoch),
                _ => Ok(Verdict::Pass),
            };
        }
        Parsed::Ipv4(h) => return judge_unrecorded(pkt, &h, routing::epoch()),
        _ if is_ipv6(pkt) => return ipv6_to_pod(pkt),
        _ => return Ok(Verdict::Pass),
    };
    if reply::reverse_in_cluster_reply(pkt, &h)? {
        return Ok(Verdict::Pass);
    }
    // The node's own traffic (kubelet probes, host-network clients) is never policed.
    if routing::is_host_address(h.saddr) {
        return Ok(Verdict::Pass);
    }
    let epoch = routing::epoch();
    if let Some(entry) = conntrack::find(&h) {
        if let Err(reason) = policy::check_flow(entry, epoch, &h) {
            return Ok(Verdict::Drop(reason));
        }
        return Ok(Verdict::Pass);
    }
    let verdict = policy::verdict_of_new(&h);
    if let Some(reason) = policy::denied(verdict) {
        return Ok(Verdict::Drop(reason));
    }
    // From a pod (of this node or another): the stack forwarded it between pods, maybe
    // translated by netfilter, which alone can translate the answers back. Without a
    // record the answer, a pod -> pod packet, would be redirected into the client
    // past that state (a SYN-ACK from the backend's address instead of the hostPort:
    // reset). Decided here, where only the stack's deliveries pass, rather than by
    // remembering flows a pod sends into the stack: those would have to be looked up
    // for every pod -> pod packet before its redirect, while this entry is found by
    // the conntrack lookup the reply makes anyway. (Cilium, chained with portmap,
    // masquerades such flows instead: the pod behind the hostPort would see the
    // node's address, not its client's.) Each packet pays a route lookup on the
    // stack's path only.
    if routing::pod_route(h.saddr).is_some() {
        conntrack::record_via_stack(&h, epoch, pkt.len());
    } else if verdict == CT_POLICY_ALLOWED {
        conntrack::create_policed(&h, epoch, verdict, pkt.len());
    }
    Ok(Verdict::Pass)
}

/// A packet without ports for a pod (not an error about a tracked flow): an ICMP
/// echo judged as its flow, anything else on its own (`policy::judge_portless`), the
/// node's own packets unchecked.
#[inline(always)]
fn judge_unrecorded<P: Packet>(pkt: &P, h: &Headers, epoch: u32) -> Result<Verdict, ()> {
    if routing::is_host_address(h.saddr) {
        return Ok(Verdict::Pass);
    }
    let (src_flags, dst_flags) = (policy::isolation(h.saddr), policy::isolation(h.daddr));
    match policy::judge_portless(pkt, h, epoch, src_flags, dst_flags) {
        Err(reason) => Ok(Verdict::Drop(reason)),
        Ok(()) => Ok(Verdict::Pass),
    }
}

/// IPv6 the stack sends a pod (answers to its masqueraded traffic, the node's own):
/// NetworkPolicy has no IPv6 rules yet and fails closed, as in `from_pod6`: a pod it
/// isolates gets none. Neighbour discovery to link-local and multicast addresses is
/// no pod's address, and passes.
#[inline(always)]
fn ipv6_to_pod<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    if pkt.ensure_linear((IP6_OFF + IPV6_HLEN) as u32).is_err() {
        return Ok(Verdict::Drop(ferrite_common::stat::DROP_MALFORMED));
    }
    let daddr = pkt.load::<[u32; 4]>(IP6_DADDR_OFF)?;
    let isolation = routing::local_endpoint6(&daddr).map_or(0, |ep| ep.flags);
    match policy::ipv6_denied(0, isolation) {
        Some(reason) => Ok(Verdict::Drop(reason)),
        None => Ok(Verdict::Pass),
    }
}
