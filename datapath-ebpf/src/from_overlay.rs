//! What other nodes send, seen at tcx ingress of this node's VXLAN device after the
//! kernel decapsulated it: check the VNI and that the inner source belongs to the
//! sending node's pod CIDR, reverse-NAT replies of Service flows whose
//! client is here (the DNAT happened on this node), deliver to the pod, or to the
//! node's own processes (replies to their Service flows and to what they send other
//! nodes' pods from the node's overlay address), and ICMP errors backends there
//! send about packets of such flows. Inner packets for pods that are not on this
//! node are dropped and counted.
use ferrite_common::{
    explain::{step, write},
    stat, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT, CT_VERIFIED_NODE, PROTO_ICMP,
};

use crate::{
    action, conntrack,
    headers::{parse, Parsed},
    maps::{route_key, CONFIG, ROUTES},
    nat,
    packet::{Packet, Verdict},
    policy,
    reply::{self, ErrorTo},
    routing,
    trace::{self, count},
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 =
    ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_OVERLAY);

/// tcx ingress of the node's VXLAN device.
#[classifier]
pub fn ferrite_from_overlay(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_overlay`: the same logic,
/// compiled for explain runs (every write skipped and noted in `ferrite_trace`).
#[classifier]
pub fn ferrite_explain_overlay(ctx: TcContext) -> i32 {
    action::explain_tc(ctx, process)
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let vni = CONFIG.get(0).map(|c| c.vni).ok_or(())?;
    let tunnel = pkt.tunnel_key()?;
    if tunnel.vni != vni {
        return Ok(Verdict::Drop(stat::DROP_WRONG_VNI));
    }
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
    // A node may only send from its own pod CIDR: the inner source must route back
    // to the node the outer header came from (cross-node anti-spoofing). A flow
    // checked to come from that node at this epoch skips the route lookup.
    let sender = tunnel.remote_ipv4;
    if !entry.is_some_and(|e| conntrack::source_verified(e, CT_VERIFIED_NODE, sender, epoch)) {
        match ROUTES.get(&route_key(h.saddr)) {
            Some(route) if u32::from_be_bytes(route.node_ip) == sender => {}
            _ => return Ok(Verdict::Drop(stat::DROP_SPOOFED)),
        }
        trace::step(h.explain, step::SOURCE_CHECKED);
        if let Some(entry) = entry {
            if trace::writes(h.explain, write::CT_CACHE) {
                conntrack::record_verified(entry, CT_VERIFIED_NODE, sender, epoch);
            }
        }
    } else {
        trace::step(h.explain, step::SOURCE_CACHED);
    }
    let mut daddr = h.daddr;
    // An ICMP error about a flow the datapath translated follows that flow.
    let mut related_error = false;
    if h.proto == PROTO_ICMP {
        match reply::reverse_icmp_error(pkt, &h)? {
            ErrorTo::Unrelated | ErrorTo::Stack => {}
            ErrorTo::World => return routing::to_world(pkt, &h),
            ErrorTo::Client(client) if routing::is_host_address(client) => {
                return routing::to_host(pkt)
            }
            ErrorTo::Client(client) => {
                daddr = client;
                related_error = true;
            }
        }
    }
    // Whether the destination is the flow's usual one, which its entry may cache.
    let mut cacheable = entry.is_some();
    if let Some(entry) = entry {
        let ct = conntrack::touch(entry, &h, pkt.len());
        if let Err(reason) = policy::check_flow(entry, epoch, &h) {
            return Ok(Verdict::Drop(reason));
        }
        if ct.flags & CT_FLAG_REPLY != 0 {
            if ct.flags & CT_FLAG_EXTERNAL != 0 {
                // A backend on that node answering a NodePort flow this node SNATed.
                return reply::reply_to_world(pkt, &h, ct);
            }
            if !nat::reverse(pkt, &h, ct)? {
                cacheable = false;
            } else if ct.flags & CT_FLAG_SNAT != 0 {
                // A Service flow of the node's own process, SNATed to its overlay
                // address: back to the process.
                daddr = u32::from_ne_bytes(ct.nat_address);
                if routing::is_host_address(daddr) {
                    return routing::to_host(pkt);
                }
            }
        }
    }
    let local = match entry {
        Some(entry) if cacheable => routing::flow_local_endpoint(entry, epoch, daddr, h.explain),
        _ => routing::local_endpoint(daddr),
    };
    let Some(ep) = local else {
        // This node's own overlay address: the node's processes talking to pods of
        // other nodes (through its kernel routes over the overlay).
        if routing::is_host_address(daddr) {
            count(h.explain, stat::PASSED_TO_STACK, pkt.len());
            return Ok(Verdict::Pass);
        }
        return Ok(Verdict::Drop(stat::DROP_UNKNOWN_POD));
    };
    if routing::ttl_expires(pkt) {
        return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
    }
    // A new flow to a policed pod: judged, and recorded if allowed.
    if entry.is_none() && !related_error && ep.flags & policy::ISOLATED != 0 {
        let verdict = policy::verdict_of_new(&h);
        if let Some(reason) = policy::denied(verdict) {
            return Ok(Verdict::Drop(reason));
        }
        if h.has_ports {
            conntrack::create_policed(&h, epoch, verdict, pkt.len());
        }
    }
    count(h.explain, stat::RECEIVED_FROM_NODE, pkt.len());
    routing::deliver_local(pkt, &ep)
}
