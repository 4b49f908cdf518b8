//! The node's own processes (kubelet, host-network pods, anything outside the
//! cgroup subtree socket-level load balancing covers, or with it turned off, and
//! connected UDP sockets, which it leaves to this path), seen at tcx egress of the
//! uplink (where the default route takes a Service address) and of `lo` (the node's
//! own NodePorts, and backends on the node's own address). Per packet, like a pod's:
//! - established flows are re-translated from their conntrack entry;
//! - a new flow from the node to a Service frontend gets a backend: a pod of this
//!   node (delivered into it), a pod of another node (SNATed to this node's overlay
//!   address, so the answer comes back through the overlay, and sent there), this
//!   node's own address (back into the stack through `lo`), or another address
//!   (routed by the kernel's FIB);
//! - no ready backend: ICMP port unreachable, handed back to the stack;
//! - a backend on this node's address answering through `lo` is translated back;
//! - everything else (the overlay's datagrams, traffic not from this node, no
//!   Service) passes untouched. Nothing is dropped here but for lack of SNAT ports.
use ferrite_common::{
    explain::write, stat, NodeConfig, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT, PROTO_UDP,
    REV_NAT_NONE, ROUTE_REMOTE,
};

use crate::{
    action,
    conntrack::{self, NewFlow},
    events::{self, FlowTarget, Seen, Tuple},
    headers::{parse, Headers, Parsed},
    icmp,
    lb::{self, Chosen},
    maps::CONFIG,
    nat,
    packet::{Packet, Verdict},
    routing::{self, LOOPBACK_IFINDEX},
    stats::count_lb,
    trace::{self, count},
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 =
    ferrite_common::monitor::program_index(ferrite_common::program_names::FROM_HOST);

/// tcx egress of the node's uplink and of `lo`: the node's own Service traffic.
#[classifier]
pub fn ferrite_from_host(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed::Ipv4(h) if h.has_ports => h,
        _ => return Ok(Verdict::Pass),
    };
    let Some(config) = CONFIG.get(0).copied() else {
        return Ok(Verdict::Pass);
    };
    if h.proto == PROTO_UDP && h.dport == config.vxlan_port {
        return Ok(Verdict::Pass);
    }
    let on_lo = pkt.ifindex() == LOOPBACK_IFINDEX;
    // On the uplink only the node's own flows concern this program: pods' packets
    // routed natively to other nodes leave here too, untouched.
    let node_ip = u32::from_ne_bytes(config.node_ip);
    if !on_lo && h.saddr != node_ip && h.saddr != u32::from_ne_bytes(config.overlay_ip) {
        return Ok(Verdict::Pass);
    }
    if let Some(ct) = conntrack::lookup_and_touch(&h, pkt.len()) {
        if ct.flags & CT_FLAG_EXTERNAL != 0 || ct.rev_nat_index == REV_NAT_NONE {
            return Ok(Verdict::Pass);
        }
        if ct.flags & CT_FLAG_REPLY != 0 {
            // A backend on this node's address answering on `lo`.
            nat::reverse(pkt, &h, ct)?;
            return Ok(Verdict::Pass);
        }
        let backend = u32::from_ne_bytes(ct.backend_address);
        nat::dnat(pkt, &h, backend, ct.backend_port)?;
        if ct.flags & CT_FLAG_SNAT != 0 {
            nat::snat(pkt, &h, u32::from_ne_bytes(ct.nat_address), ct.nat_port)?;
        }
        count(h.explain, stat::SERVICE_ESTABLISHED, pkt.len());
        return forward(pkt, &h, backend, ct.backend_port, on_lo);
    }
    // New flows of the node's own processes only: on the uplink, from its address.
    if !on_lo && (node_ip == 0 || h.saddr != node_ip) {
        return Ok(Verdict::Pass);
    }
    let Some((master, svc)) = lb::lookup_in_cluster(&h) else {
        return Ok(Verdict::Pass);
    };
    let Some(chosen) = lb::choose_backend(&h, master, &svc, false) else {
        if !h.l4_present {
            return Ok(Verdict::Drop(stat::DROP_NO_BACKEND));
        }
        count(h.explain, stat::SERVICE_REJECTED, pkt.len());
        icmp::port_unreachable(pkt, &h)?;
        return routing::to_host(pkt);
    };
    if !record_new_flow(pkt, &h, svc.rev_nat_index, &chosen, &config)? {
        return Ok(Verdict::Drop(stat::DROP_NO_SNAT_PORT));
    }
    count(h.explain, stat::HOST_SERVICE_FLOW, pkt.len());
    if trace::writes(h.explain, write::LB_STATS) {
        count_lb(svc.rev_nat_index, chosen.id, pkt.len());
    }
    if trace::writes(h.explain, write::MONITOR_EVENT) {
        events::new_flow(
            &Seen::packet(pkt, PROGRAM),
            stat::HOST_SERVICE_FLOW,
            &Tuple::of(&h),
            &FlowTarget {
                backend_address: chosen.address(),
                backend_port: chosen.backend.port,
                rev_nat_index: svc.rev_nat_index,
                backend_id: chosen.id,
            },
        );
    }
    forward(pkt, &h, chosen.address(), chosen.backend.port, on_lo)
}

/// Record and translate the first packet of a new flow. A pod of another node answers
/// its client through the overlay only if the client is in this node's pod CIDR: the
/// flow is SNATed to the node's overlay address (and a free port). Returns `false`
/// when no port was free.
#[inline(always)]
fn record_new_flow<P: Packet>(
    pkt: &P,
    h: &Headers,
    rev_nat_index: u32,
    chosen: &Chosen,
    config: &NodeConfig,
) -> Result<bool, ()> {
    let addr = chosen.address();
    let flow = NewFlow {
        backend_id: chosen.id,
        backend_addr: addr,
        backend_port: chosen.backend.port,
        rev_nat_index,
        flags: 0,
    };
    let overlay_ip = u32::from_ne_bytes(config.overlay_ip);
    let remote_pod = routing::local_endpoint(addr).is_none()
        && routing::pod_route(addr).is_some_and(|r| r.flags & ROUTE_REMOTE != 0);
    if remote_pod && overlay_ip != 0 {
        let Some(port) = conntrack::create_snat(h, &flow, overlay_ip, lb::flow_hash(h), pkt.len())
        else {
            return Ok(false);
        };
        nat::dnat(pkt, h, addr, chosen.backend.port)?;
        nat::snat(pkt, h, overlay_ip, port)?;
        return Ok(true);
    }
    if !conntrack::create(h, &flow, pkt.len())? && !lb::remap_client_port(pkt, h, &flow)? {
        return Ok(false);
    }
    nat::dnat(pkt, h, addr, chosen.backend.port)?;
    Ok(true)
}

/// Send a translated packet of the node's own flow to its backend at `addr`.
#[inline(always)]
fn forward<P: Packet>(
    pkt: &P,
    h: &Headers,
    addr: u32,
    port: u16,
    on_lo: bool,
) -> Result<Verdict, ()> {
    if let Some(ep) = routing::local_endpoint(addr) {
        count(h.explain, stat::DELIVERED_LOCAL, pkt.len());
        return routing::deliver_local_from_egress(pkt, &ep);
    }
    if routing::is_host_address(addr) {
        // Already on its way into the stack through `lo`; from the uplink it turns back.
        return if on_lo {
            Ok(Verdict::Pass)
        } else {
            routing::to_host(pkt)
        };
    }
    if routing::pod_route(addr).is_some() {
        return routing::route(pkt, addr, port);
    }
    // Another node's address (a host-network endpoint there), or outside the cluster.
    routing::fib_redirect(pkt, h)
}
