//! Never attached: the bench's floors, one per established path `cargo xtask bench
//! datapath` measures. Each does only the work any datapath must do for that path's
//! packet, on the bench's frames (Ethernet, IPv4 without options, TCP) and the state
//! the path itself left (the route a conntrack entry caches), and leaves the same
//! frame and verdict as the path (checked by the bench and `bench_paths`), so what a
//! path costs over its floor is its checks, counters and other cases:
//! - a pod's packet to a pod of this node: the endpoint lookup, the MACs,
//!   `bpf_redirect_peer` (`ferrite_floor_pod_local`);
//! - to a pod of another node: the route lookup, the VTEP MACs, the tunnel key, the
//!   redirect to the VXLAN device (`ferrite_floor_pod_remote`);
//! - a flow whose state says it may pass (NetworkPolicy): the conntrack hit and the
//!   delivery its entry caches (`ferrite_floor_flow`);
//! - a Service flow: the conntrack hit, the DNAT with a port change and both checksum
//!   fixes, the delivery (`ferrite_floor`) or the tunnel (`ferrite_floor_service_remote`);
//! - its reply: the conntrack hit, the rev-NAT lookup, the SNAT back to the frontend,
//!   the delivery (`ferrite_floor_reply`, also behind the overlay's tunnel shim);
//! - NodePort in XDP: the conntrack hit and the DNAT (`ferrite_floor_node_port`), and
//!   the SNAT (`ferrite_floor_node_port_snat`), checksums by hand.
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use ferrite_common::{CtKey, CtValue, EndpointInfo, EndpointKey, PROTO_TCP};

use crate::{
    csum,
    maps::{route_key, CONFIG, CONNTRACK, ENDPOINTS, REV_NAT, ROUTES},
    packet::Packet,
};

const IP_CHECK: usize = 24;
const SADDR: usize = 26;
const DADDR: usize = 30;
const SPORT: usize = 34;
const DPORT: usize = 36;
const TCP_CHECK: usize = 50;

/// A TC floor's result as its return code.
#[inline(always)]
fn tc(result: Result<i32, ()>) -> i32 {
    result.unwrap_or(TC_ACT_SHOT)
}

/// An XDP floor's result: translated packets pass on, as the path's do.
#[inline(always)]
fn xdp(result: Result<(), ()>) -> u32 {
    match result {
        Ok(()) => xdp_action::XDP_PASS,
        Err(()) => xdp_action::XDP_DROP,
    }
}

/// The frame's addresses and ports (raw network order) and its flow's entry.
#[inline(always)]
fn flow<P: Packet>(pkt: &P) -> Result<([u32; 2], [u16; 2], &'static CtValue), ()> {
    let addrs: [u32; 2] = pkt.load(SADDR)?;
    let ports: [u16; 2] = pkt.load(SPORT)?;
    let key = CtKey {
        saddr: addrs[0].to_ne_bytes(),
        daddr: addrs[1].to_ne_bytes(),
        sport: u16::from_be(ports[0]),
        dport: u16::from_be(ports[1]),
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    };
    let ct = unsafe { CONNTRACK.get(key) }.ok_or(())?;
    Ok((addrs, ports, ct))
}

/// Rewrite the address at `addr_at` and the port at `port_at` (raw network order,
/// `old` to `new`) with the L4 and IP checksum fixes.
#[inline(always)]
fn rewrite<P: Packet>(
    pkt: &P,
    (addr_at, port_at): (usize, usize),
    old: (u32, u16),
    new: (u32, u16),
) -> Result<(), ()> {
    pkt.replace_l4_csum(TCP_CHECK, old.0, new.0, 4, true, false)?;
    pkt.replace_l4_csum(TCP_CHECK, old.1 as u32, new.1 as u32, 2, false, false)?;
    let check: u16 = pkt.load(IP_CHECK)?;
    pkt.store(IP_CHECK, &csum::replace4(check, old.0, new.0))?;
    pkt.store(addr_at, &new.0)?;
    pkt.store(port_at, &new.1)
}

/// DNAT to the entry's backend.
#[inline(always)]
fn dnat<P: Packet>(pkt: &P, addrs: [u32; 2], ports: [u16; 2], ct: &CtValue) -> Result<(), ()> {
    let backend = (
        u32::from_ne_bytes(ct.backend_address),
        ct.backend_port.to_be(),
    );
    rewrite(pkt, (DADDR, DPORT), (addrs[1], ports[1]), backend)
}

/// The delivery to a local pod the entry caches (its MACs, `bpf_redirect_peer`).
#[inline(always)]
fn deliver_cached(ctx: &TcContext, ct: &CtValue) -> Result<i32, ()> {
    // Aligned: a multiple of 4 into an 8-aligned value (see `routing::route_flow`).
    let macs = unsafe { *(ct.route_macs.as_ptr() as *const [u32; 3]) };
    Packet::store(ctx, 0, &macs)?;
    Ok(unsafe { bpf_redirect_peer(ct.route_target, 0) } as i32)
}

/// To the VXLAN device for the node `node_ip` (network order) whose VTEP is `vtep_mac`.
#[inline(always)]
fn to_vtep(ctx: &TcContext, node_ip: [u8; 4], vtep_mac: &[u8; 6]) -> Result<i32, ()> {
    let config = CONFIG.get(0).ok_or(())?;
    Packet::store(ctx, 0, vtep_mac)?;
    Packet::store(ctx, 6, &config.vtep_mac)?;
    ctx.set_tunnel(u32::from_be_bytes(node_ip), config.vni)?;
    Ok(unsafe { bpf_redirect(config.vxlan_ifindex, 0) } as i32)
}

/// The floor of an established Service flow to a local backend.
#[classifier]
pub fn ferrite_floor(ctx: TcContext) -> i32 {
    tc(flow(&ctx).and_then(|(addrs, ports, ct)| {
        dnat(&ctx, addrs, ports, ct)?;
        deliver_cached(&ctx, ct)
    }))
}

/// The floor of an established Service flow to a backend on another node.
#[classifier]
pub fn ferrite_floor_service_remote(ctx: TcContext) -> i32 {
    tc(flow(&ctx).and_then(|(addrs, ports, ct)| {
        dnat(&ctx, addrs, ports, ct)?;
        let mut vtep_mac = [0u8; 6];
        vtep_mac.copy_from_slice(&ct.route_macs[..6]);
        to_vtep(&ctx, ct.route_target.to_ne_bytes(), &vtep_mac)
    }))
}

/// The floor of a pod's packet to a pod of this node (no conntrack entry).
#[classifier]
pub fn ferrite_floor_pod_local(ctx: TcContext) -> i32 {
    tc((|| {
        let daddr: [u8; 4] = Packet::load(&ctx, DADDR)?;
        let key = EndpointKey { address: daddr };
        let ep = unsafe { ENDPOINTS.get(key) }.ok_or(())?;
        // The MACs follow `ifindex` in the Ethernet header's order (see
        // `routing::set_pod_macs`): three word stores. Aligned: offset 4 of a
        // 4-aligned value.
        let macs = unsafe { *((ep as *const EndpointInfo as *const u8).add(4) as *const [u32; 3]) };
        Packet::store(&ctx, 0, &macs)?;
        Ok(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
    })())
}

/// The floor of a pod's packet to a pod of another node (no conntrack entry).
#[classifier]
pub fn ferrite_floor_pod_remote(ctx: TcContext) -> i32 {
    tc((|| {
        let daddr: u32 = Packet::load(&ctx, DADDR)?;
        let route = ROUTES.get(&route_key(daddr)).ok_or(())?;
        to_vtep(&ctx, route.node_ip, &route.vtep_mac)
    })())
}

/// The floor of a flow delivered as its conntrack entry says (NetworkPolicy's).
#[classifier]
pub fn ferrite_floor_flow(ctx: TcContext) -> i32 {
    tc(flow(&ctx).and_then(|(_, _, ct)| deliver_cached(&ctx, ct)))
}

/// The floor of a Service flow's reply to a client on this node.
#[classifier]
pub fn ferrite_floor_reply(ctx: TcContext) -> i32 {
    tc(flow(&ctx).and_then(|(addrs, ports, ct)| {
        let frontend = unsafe { REV_NAT.get(ct.rev_nat_index) }.ok_or(())?;
        let to = (u32::from_ne_bytes(frontend.address), frontend.port.to_be());
        rewrite(&ctx, (SADDR, SPORT), (addrs[0], ports[0]), to)?;
        deliver_cached(&ctx, ct)
    }))
}

/// The floor of an established NodePort flow to a local backend (XDP).
#[xdp]
pub fn ferrite_floor_node_port(ctx: XdpContext) -> u32 {
    xdp(flow(&ctx).and_then(|(addrs, ports, ct)| dnat(&ctx, addrs, ports, ct)))
}

/// The floor of an established NodePort flow SNATed to a remote backend (XDP).
#[xdp]
pub fn ferrite_floor_node_port_snat(ctx: XdpContext) -> u32 {
    xdp(flow(&ctx).and_then(|(addrs, ports, ct)| {
        dnat(&ctx, addrs, ports, ct)?;
        let to = (u32::from_ne_bytes(ct.nat_address), ct.nat_port.to_be());
        rewrite(&ctx, (SADDR, SPORT), (addrs[0], ports[0]), to)
    }))
}
