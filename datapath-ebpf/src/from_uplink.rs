//! tcx ingress of the node's uplink: delivers what XDP translated (or balances
//! external traffic itself where the uplink runs no XDP), answers DF packets too
//! large for pods, translates replies of the node's own Service flows whose
//! backend is another node's address, and receives what other nodes route here
//! natively (no encapsulation: `--routing native`), after checking it comes from
//! the node whose pod CIDR or address its source is in (that node's MAC).
use aya_ebpf::{macros::classifier, programs::TcContext};
use ferrite_common::{config_flag, stat, RouteInfo, SNAT_PORT_MIN};

use crate::{
    action, conntrack, external,
    headers::{parse, Headers, Parsed},
    icmp,
    maps::CONFIG,
    packet::{Packet, Verdict},
    peer, policy, reply, routing,
    trace::count,
};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 =
    ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_UPLINK);

#[classifier]
pub fn ferrite_from_uplink(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

/// Never attached: `ferrite explain`'s copy of `ferrite_from_uplink`: the same logic,
/// compiled for explain runs (every write skipped and noted in `ferrite_trace`).
#[classifier]
pub fn ferrite_explain_uplink(ctx: TcContext) -> i32 {
    action::explain_tc(ctx, process)
}

/// After the XDP program (if any): packets now addressed to a pod
/// (translated external flows, or sent to a pod IP directly) are delivered or
/// encapsulated here; DF packets of external flows too large for pods are answered
/// with ICMP "fragmentation needed"; packets from other nodes (natively routed) go
/// to their checks and delivery; everything else goes on into the stack.
#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    // Without XDP on this uplink, its logic runs here first (on the skb, whose
    // checksum helpers also handle a local sender's CHECKSUM_PARTIAL packets).
    let external_in_tc = CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flag::EXTERNAL_IN_TC != 0);
    if external_in_tc {
        if let Verdict::Drop(reason) = external::balance(pkt, PROGRAM)? {
            return Ok(Verdict::Drop(reason));
        }
    }
    let h = match parse(pkt) {
        Parsed::Ipv4(h) => h,
        _ => return Ok(Verdict::Pass),
    };
    // The overlay's datagrams to this node (most of a busy node's traffic) are the
    // kernel's VXLAN device's: nothing below applies to them (a full-sized one would even
    // look like a DF packet too large for pods, costing two lookups).
    if external::is_overlay(&h) && routing::is_host_address(h.daddr) {
        return Ok(Verdict::Pass);
    }
    // GRO may have merged segments after XDP saw them: only whole packets count.
    if h.has_ports && !pkt.is_gso() {
        if let Some(mtu) = external::frag_needed_mtu(&h) {
            count(h.explain, stat::ICMP_FRAG_NEEDED, pkt.len());
            return icmp::frag_needed(pkt, &h, mtu);
        }
    }
    let to_pod =
        routing::local_endpoint(h.daddr).is_some() || routing::pod_route(h.daddr).is_some();
    // From another node's pod CIDR or address, unencapsulated: a node routing
    // natively (whatever this node's own mode), or a host pretending to be one.
    if to_pod || is_snat_reply(&h) {
        if let Some(route) = peer::other_node_route(h.saddr) {
            return from_other_node(pkt, &h, route);
        }
    }
    if !to_pod {
        if h.has_ports && routing::is_host_address(h.daddr) {
            // A reply to the node's own process whose backend is another node's
            // address (a host-network endpoint there). (XDP leaves it alone: from a
            // sender on the same machine it may carry a partial checksum, which only
            // the skb helpers update correctly.)
            reply::reverse_in_cluster_reply(pkt, &h)?;
        }
        return Ok(Verdict::Pass);
    }
    // Sent to a pod's address from outside the cluster (a router with a route to the
    // pod CIDR via this node): judged by the pod's ingress policy as from the world.
    let found = routing::find(h.daddr);
    if let Some(ep) = &found.endpoint {
        if let Err(reason) = policy::judge_from_outside(pkt, &h, ep.flags) {
            return Ok(Verdict::Drop(reason));
        }
    }
    routing::route_found(pkt, &found, h.daddr, h.dport)
}

/// A reply to a NodePort flow this node SNATed to a backend of another node (its
/// destination port in the SNAT range, on this node's address).
#[inline(always)]
fn is_snat_reply(h: &Headers) -> bool {
    h.has_ports && h.dport >= SNAT_PORT_MIN && routing::is_host_address(h.daddr)
}

/// A packet from the node of `route` (its pod CIDR or address holds the source),
/// natively routed: it must come from that node's MAC; then it is received as what
/// arrives over the overlay is.
#[inline(always)]
fn from_other_node<P: Packet>(pkt: &P, h: &Headers, route: &RouteInfo) -> Result<Verdict, ()> {
    // Read before any lookup: what is cached at this epoch was resolved after it began.
    let epoch = routing::epoch();
    let entry = if h.has_ports {
        conntrack::find(h)
    } else {
        None
    };
    let node_ip = route.node_ip;
    let sender = u32::from_be_bytes(node_ip);
    if !peer::sender_checked(h, entry, epoch, sender, || {
        peer::from_nodes_mac(pkt, node_ip)
    }) {
        return Ok(Verdict::Drop(stat::DROP_SPOOFED));
    }
    peer::receive(pkt, h, epoch, entry)
}
