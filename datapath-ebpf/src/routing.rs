//! Forwarding after NAT: pods on this node get the frame straight into their eth0
//! (bpf_redirect_peer); pods of other nodes are reached through the VXLAN device with
//! the owning node in the tunnel metadata (routes from `ferrite_routes`), or, for
//! nodes routed natively (`ROUTE_NATIVE`), out of the uplink unencapsulated to the
//! node (`bpf_redirect_neigh`); anything
//! else continues into the host stack (and is masqueraded there when it leaves), as do
//! the answers of flows the stack forwarded between pods (`CT_FLAG_VIA_STACK`).
//! Replies of external flows leave through the uplink the kernel's FIB names.
//! Translated packets for the node's own processes re-enter the stack through `lo`.
//! A packet the datapath would hand to a pod or send over the overlay itself with a
//! TTL a router would let expire (0 or 1) is dropped (`drop_ttl_exceeded`): the
//! datapath does not decrement TTL, and what goes to the stack is the stack's to
//! decrement and answer.
use core::ptr::NonNull;

use aya_ebpf::bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS};
use ferrite_common::{
    explain::{step, write},
    stat, CtValue, Endpoint6Key, EndpointInfo, EndpointKey, RouteInfo, CT_FLAG_VIA_STACK,
    CT_ROUTE_LOCAL, CT_ROUTE_NATIVE, CT_ROUTE_REMOTE, CT_ROUTE_STACK, ROUTE_NATIVE, ROUTE_NODE,
    ROUTE_REMOTE, SNAT_PORT_MIN,
};

use crate::{
    conntrack,
    headers::{Headers, IP_OFF},
    maps::{route_key, CONFIG, ENDPOINTS, ENDPOINTS6, ROUTES},
    packet::{Packet, Verdict},
    trace,
};

#[inline(always)]
pub fn local_endpoint(addr: u32) -> Option<EndpointInfo> {
    unsafe {
        ENDPOINTS
            .get(EndpointKey {
                address: addr.to_ne_bytes(),
            })
            .copied()
    }
}

/// The pod of this node with the IPv6 address `addr` (the packet's four words).
#[inline(always)]
pub fn local_endpoint6(addr: &[u32; 4]) -> Option<EndpointInfo> {
    // SAFETY: 16 bytes of plain integers either way; the words hold the packet's
    // bytes in order.
    let address = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*addr) };
    unsafe { ENDPOINTS6.get(Endpoint6Key { address }).copied() }
}

/// Rewrite the Ethernet header: `dst`, then `src`.
#[inline(always)]
fn set_macs<P: Packet>(pkt: &P, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
    pkt.store(0, dst)?;
    pkt.store(6, src)
}

/// Rewrite the Ethernet header to the pod's MAC from its gateway's, as three word
/// stores: `pod_mac` and `host_mac` are the 12 bytes after `ifindex` in
/// [`EndpointInfo`], the Ethernet header's own order (destination, source).
#[inline(always)]
fn set_pod_macs<P: Packet>(pkt: &P, ep: &EndpointInfo) -> Result<(), ()> {
    const _: () = assert!(
        core::mem::offset_of!(EndpointInfo, pod_mac) == 4
            && core::mem::offset_of!(EndpointInfo, host_mac) == 10
    );
    // Aligned: offset 4 of a 4-aligned struct.
    let macs = unsafe { *((ep as *const EndpointInfo as *const u8).add(4) as *const [u32; 3]) };
    pkt.store(0, &macs)
}

/// Deliver to a pod of this node, as a router would: dst = the pod's eth0, src = its
/// gateway (the host veth).
#[inline(always)]
pub fn deliver_local<P: Packet>(pkt: &P, ep: &EndpointInfo) -> Result<Verdict, ()> {
    set_pod_macs(pkt, ep)?;
    Ok(Verdict::RedirectPeer(ep.ifindex))
}

/// Like [`deliver_local`], from an egress hook (where `bpf_redirect_peer` is not
/// allowed): out of the pod's host veth, into the pod.
#[inline(always)]
pub fn deliver_local_from_egress<P: Packet>(pkt: &P, ep: &EndpointInfo) -> Result<Verdict, ()> {
    set_pod_macs(pkt, ep)?;
    Ok(Verdict::Redirect(ep.ifindex))
}

/// Whether the packet's TTL would expire at a router forwarding it (0 or 1): the
/// datapath forwards it itself, as one hop, without decrementing TTL. Dropped rather
/// than answered with ICMP "time exceeded": by the time the datapath knows it
/// forwards a packet, the packet is translated, and the answer must quote it as the
/// client sent it.
#[inline(always)]
pub fn ttl_expires<P: Packet>(pkt: &P) -> bool {
    pkt.load::<u8>(IP_OFF + 8).is_ok_and(|ttl| ttl <= 1)
}

/// `lo`'s ifindex in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// This node's own addresses: its node IP and its overlay address.
#[inline(always)]
pub fn is_host_address(addr: u32) -> bool {
    CONFIG.get(0).is_some_and(|c| {
        addr != 0
            && (addr == u32::from_ne_bytes(c.node_ip) || addr == u32::from_ne_bytes(c.overlay_ip))
    })
}

/// Hand a translated packet to the node's own processes: it enters the stack on `lo`
/// (MACs zeroed, as `lo` frames carry them), where its source may be one of the
/// node's own addresses (a NodePort frontend, a host-network backend): the agent
/// sets `accept_local` on `lo` for that. Arriving on a pod's veth or the uplink,
/// such a packet would be dropped as a martian.
#[inline(always)]
pub fn to_host<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    set_macs(pkt, &[0; 6], &[0; 6])?;
    pkt.count(stat::PASSED_TO_STACK);
    Ok(Verdict::RedirectIngress(LOOPBACK_IFINDEX))
}

/// The pod CIDR route of `addr`, if it is in one (not a node's /32).
#[inline(always)]
pub fn pod_route(addr: u32) -> Option<RouteInfo> {
    ROUTES
        .get(&route_key(addr))
        .filter(|r| r.flags & ROUTE_NODE == 0)
        .copied()
}

/// The pod of this node a packet of the conntrack entry `entry` goes to: cached in
/// the entry at `epoch`, or looked up for `daddr` (and cached). `None`: no pod here.
#[inline(always)]
pub fn flow_local_endpoint(
    entry: NonNull<CtValue>,
    epoch: u32,
    daddr: u32,
    explain: bool,
) -> Option<EndpointInfo> {
    // SAFETY: a value of `ferrite_ct` found by this packet's lookup (see `route_flow`).
    let cached = unsafe { entry.as_ref() };
    if cached.cache_epoch == epoch && cached.route_kind == CT_ROUTE_LOCAL {
        let mut ep = EndpointInfo {
            ifindex: cached.route_target,
            ..EndpointInfo::default()
        };
        ep.pod_mac.copy_from_slice(&cached.route_macs[..6]);
        ep.host_mac.copy_from_slice(&cached.route_macs[6..]);
        return Some(ep);
    }
    trace::step(explain, step::ROUTE_RESOLVED);
    let ep = local_endpoint(daddr)?;
    if trace::writes(explain, write::CT_CACHE) {
        cache_route(
            entry,
            epoch,
            CT_ROUTE_LOCAL,
            ep.ifindex,
            &ep.pod_mac,
            &ep.host_mac,
        );
    }
    Some(ep)
}

#[inline(always)]
fn cache_route(
    entry: NonNull<CtValue>,
    epoch: u32,
    kind: u8,
    target: u32,
    first_mac: &[u8; 6],
    second_mac: &[u8; 6],
) {
    conntrack::claim_epoch(entry, epoch);
    let entry = entry.as_ptr();
    // SAFETY: as in `flow_local_endpoint`.
    unsafe {
        (*entry).route_target = target;
        let macs = &mut (*entry).route_macs;
        macs[..6].copy_from_slice(first_mac);
        macs[6..].copy_from_slice(second_mac);
        (*entry).route_kind = kind;
    }
}

/// What the node knows about a destination address: a pod of this node, or else
/// the route covering it (a pod CIDR or another node's own address), if any.
pub struct Found {
    pub endpoint: Option<EndpointInfo>,
    pub route: Option<&'static RouteInfo>,
}

impl Found {
    /// Whether the address is a pod's (of this node, or in a node's pod CIDR). The
    /// agent refuses Service frontends at pod addresses, so such packets need no
    /// Service lookup.
    #[inline(always)]
    pub fn is_pod(&self) -> bool {
        self.endpoint.is_some() || self.route.is_some_and(|r| r.flags & ROUTE_NODE == 0)
    }
}

/// Look `daddr` up: the endpoint map, then (if no pod of this node) the routes.
#[inline(always)]
pub fn find(daddr: u32) -> Found {
    let endpoint = local_endpoint(daddr);
    let route = if endpoint.is_none() {
        ROUTES.get(&route_key(daddr))
    } else {
        None
    };
    Found { endpoint, route }
}

/// Forward a packet to `daddr` (after any NAT); `dport` is its destination port (0
/// without ports).
#[inline(always)]
pub fn route<P: Packet>(pkt: &P, daddr: u32, dport: u16) -> Result<Verdict, ()> {
    route_found(pkt, &find(daddr), daddr, dport)
}

/// [`route`] with `daddr` already looked up.
#[inline(always)]
pub fn route_found<P: Packet>(
    pkt: &P,
    found: &Found,
    daddr: u32,
    dport: u16,
) -> Result<Verdict, ()> {
    if let Some(ep) = &found.endpoint {
        if ttl_expires(pkt) {
            return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
        }
        pkt.count(stat::DELIVERED_LOCAL);
        return deliver_local(pkt, ep);
    }
    let Some(route) = found.route else {
        pkt.count(stat::PASSED_TO_STACK);
        return Ok(Verdict::Pass);
    };
    if goes_to_stack(route, daddr, dport) {
        pkt.count(stat::PASSED_TO_STACK);
        return Ok(Verdict::Pass);
    }
    if route.flags & (ROUTE_REMOTE | ROUTE_NODE) == 0 {
        return Ok(Verdict::Drop(stat::DROP_UNKNOWN_POD));
    }
    let native = route.flags & ROUTE_NATIVE != 0;
    to_node(pkt, route.node_ip, &route.vtep_mac, native)
}

/// Whether a packet to `daddr:dport`, not a local pod, in `route`, is for the stack.
#[inline(always)]
fn goes_to_stack(route: &RouteInfo, daddr: u32, dport: u16) -> bool {
    // Another node's own address: only replies to the NodePort flows it SNATed
    // (ports of its SNAT range) go back through the overlay, to the node holding
    // their state; the rest is ordinary traffic for the stack.
    if route.flags & ROUTE_NODE != 0 {
        return dport < SNAT_PORT_MIN;
    }
    // This node's pod CIDR: its own overlay address is the host's (else no such pod).
    route.flags & ROUTE_REMOTE == 0 && is_host_address(daddr)
}

/// Send over the overlay to the node `node_ip` (network order) whose VTEP is
/// `vtep_mac`; or, `native`, unencapsulated out of the uplink: `bpf_redirect_neigh`
/// lets the kernel's FIB pick the next hop from the agent's route for the node's pod
/// CIDR (`via <node IP> dev <uplink>`, flannel host-gw's route) and resolve its MAC;
/// GSO packets stay whole. The receiving node's uplink program checks the sender.
#[inline(always)]
fn to_node<P: Packet>(
    pkt: &P,
    node_ip: [u8; 4],
    vtep_mac: &[u8; 6],
    native: bool,
) -> Result<Verdict, ()> {
    if ttl_expires(pkt) {
        return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(Verdict::Drop(stat::DROP_NO_OVERLAY));
    };
    if native {
        if config.uplink_ifindex == 0 {
            return Ok(Verdict::Drop(stat::DROP_NO_OVERLAY));
        }
        pkt.count(stat::SENT_TO_NODE);
        return Ok(Verdict::RedirectNeigh(config.uplink_ifindex));
    }
    if config.vxlan_ifindex == 0 {
        return Ok(Verdict::Drop(stat::DROP_NO_OVERLAY));
    }
    // The inner frame goes to the remote VTEP as-is: the kernel vxlan device adds
    // outer headers, handles GSO and checksums and picks the UDP source port from the
    // flow hash.
    set_macs(pkt, vtep_mac, &config.vtep_mac)?;
    pkt.set_tunnel(u32::from_be_bytes(node_ip), config.vni)?;
    pkt.count(stat::SENT_TO_NODE);
    Ok(Verdict::Redirect(config.vxlan_ifindex))
}

/// The node's route epoch (see `NodeConfig::route_epoch`).
#[inline(always)]
pub fn epoch() -> u32 {
    CONFIG.get(0).map(|c| c.route_epoch).unwrap_or(0)
}

/// Whether the flow of `entry` is one the stack forwarded (`CT_FLAG_VIA_STACK`): its
/// packets go back through the stack, wherever their destination is.
#[inline(always)]
fn via_stack(entry: NonNull<CtValue>) -> bool {
    // SAFETY: a value of `ferrite_ct` found by this packet's lookup.
    unsafe { entry.as_ref() }.flags & CT_FLAG_VIA_STACK != 0
}

/// Record in `entry` at `epoch` where packets to `daddr:dport` go (as [`route`]
/// decides, or the stack for a flow it forwarded), written straight into the entry.
/// `Err`: nowhere, dropped for this `stat` reason (not cached: rare and final).
#[inline(always)]
fn resolve_into(entry: NonNull<CtValue>, epoch: u32, daddr: u32, dport: u16) -> Result<(), u32> {
    // Only here, when the cache is stale: the stack's route is cached with the entry,
    // so established packets pay nothing for the check.
    if via_stack(entry) {
        cache_route(entry, epoch, CT_ROUTE_STACK, 0, &[0; 6], &[0; 6]);
        return Ok(());
    }
    if let Some(ep) = ENDPOINTS.get_ptr(EndpointKey {
        address: daddr.to_ne_bytes(),
    }) {
        // SAFETY: a value of `ferrite_endpnt`, read once.
        let ep = unsafe { &*ep };
        cache_route(
            entry,
            epoch,
            CT_ROUTE_LOCAL,
            ep.ifindex,
            &ep.pod_mac,
            &ep.host_mac,
        );
        return Ok(());
    }
    let Some(route) = ROUTES.get(&route_key(daddr)) else {
        cache_route(entry, epoch, CT_ROUTE_STACK, 0, &[0; 6], &[0; 6]);
        return Ok(());
    };
    if goes_to_stack(route, daddr, dport) {
        cache_route(entry, epoch, CT_ROUTE_STACK, 0, &[0; 6], &[0; 6]);
        return Ok(());
    }
    if route.flags & (ROUTE_REMOTE | ROUTE_NODE) == 0 {
        return Err(stat::DROP_UNKNOWN_POD);
    }
    let node_ip = u32::from_ne_bytes(route.node_ip);
    let kind = if route.flags & ROUTE_NATIVE != 0 {
        CT_ROUTE_NATIVE
    } else {
        CT_ROUTE_REMOTE
    };
    cache_route(entry, epoch, kind, node_ip, &route.vtep_mac, &[0; 6]);
    Ok(())
}

/// Like [`route`] for a packet of the conntrack entry `entry`: established packets
/// take the destination cached in the entry at `epoch` (the one read before the
/// packet's lookups began) and skip the endpoint and route lookups; otherwise the
/// destination is resolved into the entry first, for the flow's next packets too.
#[inline(always)]
pub fn route_flow<P: Packet>(
    pkt: &P,
    entry: NonNull<CtValue>,
    epoch: u32,
    daddr: u32,
    dport: u16,
) -> Result<Verdict, ()> {
    // SAFETY: a value of `ferrite_ct` found by this packet's lookup; other CPUs may
    // write it concurrently, which at worst costs a fresh resolve.
    let cached = entry.as_ptr();
    let valid = unsafe { (*cached).cache_epoch == epoch && (*cached).route_kind != 0 };
    if !valid {
        // An explain run resolves as `route` does, which is what the cache holds.
        let explain = pkt.explain();
        trace::step(explain, step::ROUTE_RESOLVED);
        if !trace::writes(explain, write::CT_CACHE) {
            if via_stack(entry) {
                pkt.count(stat::PASSED_TO_STACK);
                return Ok(Verdict::Pass);
            }
            return route(pkt, daddr, dport);
        }
        if let Err(reason) = resolve_into(entry, epoch, daddr, dport) {
            return Ok(Verdict::Drop(reason));
        }
    }
    let (kind, target) = unsafe { ((*cached).route_kind, (*cached).route_target) };
    match kind {
        CT_ROUTE_LOCAL => {
            if ttl_expires(pkt) {
                return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
            }
            pkt.count(stat::DELIVERED_LOCAL);
            const _: () = assert!(core::mem::offset_of!(CtValue, route_macs) % 4 == 0);
            // Aligned: a multiple of 4 into an 8-aligned value.
            let macs = unsafe { *((*cached).route_macs.as_ptr() as *const [u32; 3]) };
            pkt.store(0, &macs)?;
            Ok(Verdict::RedirectPeer(target))
        }
        CT_ROUTE_REMOTE | CT_ROUTE_NATIVE => {
            let mut vtep_mac = [0u8; 6];
            let macs = unsafe { &(*cached).route_macs };
            vtep_mac.copy_from_slice(&macs[..6]);
            to_node(
                pkt,
                target.to_ne_bytes(),
                &vtep_mac,
                kind == CT_ROUTE_NATIVE,
            )
        }
        _ => {
            pkt.count(stat::PASSED_TO_STACK);
            Ok(Verdict::Pass)
        }
    }
}

const AF_INET: u8 = 2;

/// Send a reply of an external flow (already translated: from the frontend to the
/// client) out of the interface the kernel's FIB routes the client through, with
/// the next hop's MAC. Not through the stack: its source is this node's own
/// address, which the stack would drop as a martian arriving from a pod.
#[inline(always)]
pub fn to_world<P: Packet>(pkt: &P, h: &Headers) -> Result<Verdict, ()> {
    pkt.count(stat::EXTERNAL_REPLY);
    fib_redirect(pkt, h)
}

/// Send the packet (already translated) out of the interface the kernel's FIB routes
/// its destination through, with the next hop's MAC; what has no route goes to the
/// stack, which decides and answers.
#[inline(always)]
pub fn fib_redirect<P: Packet>(pkt: &P, h: &Headers) -> Result<Verdict, ()> {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = h.proto;
    params.ifindex = pkt.ifindex();
    let tot_len = unsafe { *pkt.ptr_at::<[u8; 2]>(IP_OFF + 2)? };
    params.__bindgen_anon_1.tot_len = u16::from_be_bytes(tot_len);
    // Addresses as in the packet now (after the reverse translation).
    let addrs = unsafe { *pkt.ptr_at::<[u32; 2]>(IP_OFF + 12)? };
    params.__bindgen_anon_3.ipv4_src = addrs[0];
    params.__bindgen_anon_4.ipv4_dst = addrs[1];
    match pkt.fib_lookup(&mut params) as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            set_macs(pkt, &params.dmac, &params.smac)?;
            Ok(Verdict::Redirect(params.ifindex))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Verdict::RedirectNeigh(params.ifindex)),
        // No route (or blackhole/prohibit): let the stack decide and answer.
        _ => Ok(Verdict::Pass),
    }
}
