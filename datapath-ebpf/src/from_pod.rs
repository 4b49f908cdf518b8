//! What a pod sends, seen at its host-side veth: anti-spoofing, Service DNAT or
//! reverse NAT of a backend's reply, then local delivery or the host stack. A new flow
//! to a Service without ready backends is refused with ICMP port unreachable, sent
//! back into the pod (`service_rejected`); a later fragment of such a datagram is
//! dropped (`drop_no_backend`). An ICMP error a backend sends about a packet of a
//! translated flow is translated back like the flow's replies; one about a flow its
//! policy allows passes as that flow's packets do. IPv6 continues in
//! `ferrite_from_pod6` (`from_pod6`), by a tail call; the explain copy takes its
//! own to the explain copy of that one.
use ferrite_common::{
    explain::{step, write},
    policy::CT_POLICY_ALLOWED,
    stat, tail_call, ServiceKey, ServiceValue, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT,
    CT_VERIFIED_VETH, PROTO_ICMP, PROTO_UDP, REV_NAT_NONE,
};

use crate::{
    action,
    conntrack::{self, NewFlow},
    events::{self, FlowTarget, Seen, Tuple},
    headers::{is_fragment_routed, parse, Headers, Parsed},
    headers6::is_ipv6,
    icmp,
    lb::{self, NewFlowOutcome},
    maps::TAIL_CALLS,
    nat,
    packet::{Packet, Verdict},
    policy,
    reply::{self, ErrorTo},
    routing::{self, Found},
    trace::{self, count},
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 = ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_POD);

/// tcx ingress of each pod's host-side veth.
#[classifier]
// The macro nests this function in the program's entry; the compiler left it a
// BPF-to-BPF call once it grew past its inlining threshold.
#[inline(always)]
pub fn ferrite_from_pod(ctx: TcContext) -> i32 {
    if is_ipv6(&ctx) {
        // SAFETY: a jump to a TC program of the same object; it returns only if the
        // slot is empty (no agent filled it), and the frame is then dropped below
        // as unsupported, as it was before the IPv6 path.
        unsafe { TAIL_CALLS.tail_call(&ctx, tail_call::FROM_POD6) };
    }
    action::tc(&ctx, PROGRAM, process(&ctx))
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_pod`: the same logic,
/// compiled for explain runs (every write skipped and noted in `ferrite_trace`),
/// IPv6 included: its frames go to `ferrite_explain_pod6` as the real ones go to
/// `ferrite_from_pod6`.
#[classifier]
pub fn ferrite_explain_pod(ctx: TcContext) -> i32 {
    if is_ipv6(&ctx) {
        // SAFETY: as in `ferrite_from_pod`; an empty slot leaves the frame to be
        // explained as unsupported below.
        unsafe { TAIL_CALLS.tail_call(&ctx, tail_call::EXPLAIN_POD6) };
    }
    action::explain_tc(ctx, process)
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed::Ipv4(h) => h,
        Parsed::Pass(reason) => {
            pkt.count(reason);
            return Ok(Verdict::Pass);
        }
        Parsed::Drop(reason) => return Ok(Verdict::Drop(reason)),
    };
    // Read before any lookup: what is cached at this epoch was resolved after it began.
    let epoch = routing::epoch();
    let entry = if h.has_ports {
        conntrack::find(&h)
    } else {
        None
    };
    // A pod may only send from its own IP, and only through its own veth. A flow
    // whose packets were checked to come from this veth at this epoch (no endpoint
    // has changed since) skips the lookup.
    let ifindex = pkt.ifindex();
    // The pod's NetworkPolicy isolation, from the same lookup (a new flow always
    // makes it).
    let mut source_isolation = 0;
    if !entry.is_some_and(|e| conntrack::source_verified(e, CT_VERIFIED_VETH, ifindex, epoch)) {
        match routing::local_endpoint(h.saddr) {
            Some(ep) if ep.ifindex == ifindex => source_isolation = ep.flags,
            _ => return Ok(Verdict::Drop(stat::DROP_SPOOFED)),
        }
        trace::step(h.explain, step::SOURCE_CHECKED);
        if let Some(entry) = entry {
            if trace::writes(h.explain, write::CT_CACHE) {
                conntrack::record_verified(entry, CT_VERIFIED_VETH, ifindex, epoch);
            }
        }
    } else {
        trace::step(h.explain, step::SOURCE_CACHED);
    }
    let (mut daddr, mut dport) = (h.daddr, h.dport);
    if h.has_ports {
        // Established flows first: one lookup, and the forward entry caches the backend
        // and where it lives.
        if let Some(entry) = entry {
            let ct = conntrack::touch(entry, &h, pkt.len());
            if let Err(reason) = policy::check_flow(entry, epoch, &h) {
                return Ok(Verdict::Drop(reason));
            }
            if ct.flags & CT_FLAG_REPLY != 0 {
                if ct.flags & CT_FLAG_EXTERNAL != 0 {
                    return reply::reply_to_world(pkt, &h, ct);
                }
                if nat::reverse(pkt, &h, ct)? {
                    if ct.flags & CT_FLAG_SNAT != 0 {
                        // Back to the client the flow was SNATed from (a hairpinned pod).
                        daddr = u32::from_ne_bytes(ct.nat_address);
                        dport = ct.nat_port;
                    }
                    // A reply to the node's own process (its per-packet Service path).
                    if routing::is_host_address(daddr) {
                        return routing::to_host(pkt);
                    }
                } else {
                    // Left untranslated (its Service is gone): not the flow's usual
                    // destination, so not the cached one either.
                    return routing::route(pkt, daddr, dport);
                }
            } else {
                if ct.rev_nat_index != REV_NAT_NONE {
                    daddr = u32::from_ne_bytes(ct.backend_address);
                    dport = ct.backend_port;
                    nat::dnat(pkt, &h, daddr, dport)?;
                    count(h.explain, stat::SERVICE_ESTABLISHED, pkt.len());
                }
                // A flow whose client port was remapped (direct, a Service flow, or
                // hairpinned).
                if ct.flags & CT_FLAG_SNAT != 0 {
                    nat::snat(pkt, &h, u32::from_ne_bytes(ct.nat_address), ct.nat_port)?;
                }
            }
            return routing::route_flow(pkt, entry, epoch, daddr, dport);
        }
        let found = routing::find(daddr);
        if !found.is_pod() {
            if let Some((master, svc)) = lb::lookup_in_cluster(&h) {
                return new_service_flow(pkt, &h, master, &svc, source_isolation);
            }
        }
        let destination_isolation = found.endpoint.map(|ep| ep.flags).unwrap_or(0);
        let verdict = policy::verdict_with(
            h.saddr,
            source_isolation,
            daddr,
            destination_isolation,
            h.proto,
            dport,
        );
        if let Some(reason) = policy::denied(verdict) {
            return Ok(Verdict::Drop(reason));
        }
        if (h.is_tcp_syn() || h.proto == PROTO_UDP) && conntrack::clashes_with_service_reply(&h) {
            return remap_source_port(pkt, &h, &found);
        }
        if verdict == CT_POLICY_ALLOWED {
            conntrack::create_policed(&h, epoch, verdict, pkt.len());
        }
        return routing::route_found(pkt, &found, daddr, dport);
    }
    // Whether policy has had its say already (an ICMP error about an allowed flow):
    // one route call site below either way (each is inlined, with its stack).
    let mut judged = false;
    if is_fragment_routed(&h) {
        count(h.explain, stat::FRAGMENT_ROUTED, pkt.len());
    } else if h.proto == PROTO_ICMP {
        match reply::reverse_icmp_error(pkt, &h, epoch)? {
            ErrorTo::Unrelated => {}
            // Passes as the flow it is about.
            ErrorTo::Allowed => judged = true,
            // Routed like the flow's replies (by the port it quotes).
            ErrorTo::Untracked(port) => dport = port,
            ErrorTo::Stack => {
                pkt.count(stat::PASSED_TO_STACK);
                return Ok(Verdict::Pass);
            }
            ErrorTo::World => return routing::to_world(pkt, &h),
            ErrorTo::Client(client) if routing::is_host_address(client) => {
                return routing::to_host(pkt)
            }
            ErrorTo::Client(client) => {
                // An error about a flow the datapath translated: it follows the flow.
                return routing::route(pkt, client, dport);
            }
        }
    }
    // Without ports only an ICMP echo is recorded; the rest is judged packet by packet.
    if !judged {
        let destination_isolation = policy::isolation(daddr);
        if let Err(reason) =
            policy::judge_portless(pkt, &h, epoch, source_isolation, destination_isolation)
        {
            return Ok(Verdict::Drop(reason));
        }
    }
    routing::route(pkt, daddr, dport)
}

/// The first packet of a flow to the Service `svc`: backend chosen, translated and
/// recorded, then delivered; or refused with ICMP port unreachable without backends.
#[inline(always)]
fn new_service_flow<P: Packet>(
    pkt: &P,
    h: &Headers,
    master: ServiceKey,
    svc: &ServiceValue,
    source_isolation: u32,
) -> Result<Verdict, ()> {
    match lb::translate_new_flow(pkt, h, master, svc)? {
        NewFlowOutcome::Translated(addr, port) => {
            // One lookup of the backend for its isolation and its delivery.
            let found = routing::find(addr);
            // Judged at the backend: a packet it drops leaves the flow's entries to
            // judge its retransmissions the same way.
            let verdict = policy::verdict_with(
                h.saddr,
                source_isolation,
                addr,
                found.endpoint.map(|ep| ep.flags).unwrap_or(0),
                h.proto,
                port,
            );
            if let Some(reason) = policy::denied(verdict) {
                return Ok(Verdict::Drop(reason));
            }
            if trace::writes(h.explain, write::MONITOR_EVENT) {
                events::new_flow(
                    &Seen::packet(pkt, PROGRAM),
                    stat::SERVICE_NEW_FLOW,
                    &Tuple::of(h),
                    &FlowTarget {
                        backend_address: addr,
                        backend_port: port,
                        rev_nat_index: svc.rev_nat_index,
                        backend_id: 0,
                    },
                );
            }
            routing::route_found(pkt, &found, addr, port)
        }
        // A later fragment of a refused datagram: its first one was answered.
        NewFlowOutcome::NoBackend if !h.l4_present => Ok(Verdict::Drop(stat::DROP_NO_BACKEND)),
        NewFlowOutcome::NoBackend => {
            count(h.explain, stat::SERVICE_REJECTED, pkt.len());
            icmp::port_unreachable(pkt, h)?;
            Ok(Verdict::Bounce)
        }
        NewFlowOutcome::NoPortLeft => Ok(Verdict::Drop(stat::DROP_NO_SNAT_PORT)),
    }
}

/// A pod's new direct flow (TCP SYN or UDP) whose reply tuple a Service flow holds
/// gets another client port, kept in conntrack like a Service flow's, so both flows'
/// answers find their socket.
#[inline(always)]
fn remap_source_port<P: Packet>(pkt: &P, h: &Headers, found: &Found) -> Result<Verdict, ()> {
    let flow = NewFlow {
        backend_id: 0,
        backend_addr: h.daddr,
        backend_port: h.dport,
        rev_nat_index: REV_NAT_NONE,
        flags: 0,
    };
    if !lb::remap_client_port(pkt, h, &flow)? {
        return Ok(Verdict::Drop(stat::DROP_NO_SNAT_PORT));
    }
    routing::route_found(pkt, found, h.daddr, h.dport)
}
