//! What other nodes send, once it is known which node claims to send it: the check
//! that it does (anti-spoofing across nodes), then reverse NAT of replies of Service
//! flows whose client is here (the DNAT happened on this node), NodePort replies of
//! flows this node SNATed, policy for new flows to isolated pods, and delivery to the
//! pod or to the node's own processes. Shared by the VXLAN device's program (the
//! sender is the tunnel's outer source) and the uplink's (native routing: the sender
//! is the node whose pod CIDR or address the source is in, and the frame must come
//! from that node's MAC).
use core::ptr::NonNull;

use aya_ebpf::bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_SUCCESS};
use ferrite_common::{
    explain::{step, write},
    stat, CtValue, RouteInfo, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT, CT_VERIFIED_NODE,
    PROTO_ICMP, ROUTE_NODE, ROUTE_REMOTE,
};

use crate::{
    conntrack,
    headers::Headers,
    maps::{route6_key, route_key, CONFIG, ROUTES, ROUTES6},
    nat,
    packet::{Packet, TunnelKey, Verdict},
    policy,
    reply::{self, ErrorTo},
    routing,
    trace::{self, count},
};

/// Whether the packet comes from the node `sender` (its IP, host order), as
/// `check` finds: a flow whose packets were checked to come from that node at this
/// route epoch skips the check; a checked flow remembers it.
#[inline(always)]
pub fn sender_checked(
    h: &Headers,
    entry: Option<NonNull<CtValue>>,
    epoch: u32,
    sender: u32,
    check: impl FnOnce() -> bool,
) -> bool {
    if entry.is_some_and(|e| conntrack::source_verified(e, CT_VERIFIED_NODE, sender, epoch)) {
        trace::step(h.explain, step::SOURCE_CACHED);
        return true;
    }
    if !check() {
        return false;
    }
    trace::step(h.explain, step::SOURCE_CHECKED);
    if let Some(entry) = entry {
        if trace::writes(h.explain, write::CT_CACHE) {
            conntrack::record_verified(entry, CT_VERIFIED_NODE, sender, epoch);
        }
    }
    true
}

/// Over the overlay: the inner source must route back to the node the outer header
/// came from (`sender`, host order): a node may only send from its own pod CIDR and
/// address.
#[inline(always)]
pub fn source_is_senders(saddr: u32, sender: u32) -> bool {
    ROUTES
        .get(&route_key(saddr))
        .is_some_and(|route| u32::from_be_bytes(route.node_ip) == sender)
}

/// Whether the IPv6 `saddr` is in the IPv6 pod CIDR of the node at `sender` (the
/// outer source of the tunnel it came through). Not its IPv6 address (a
/// `ROUTE_NODE` /128, there for the socket programs): the IPv6 overlay carries only
/// pods' traffic and the node's from its overlay address.
#[inline(always)]
pub fn source6_is_senders(saddr: &[u32; 4], sender: u32) -> bool {
    ROUTES6.get(&route6_key(saddr)).is_some_and(|route| {
        route.flags & ROUTE_NODE == 0 && u32::from_be_bytes(route.node_ip) == sender
    })
}

/// The other node whose pod CIDR (or own address) `saddr` is in, if any.
#[inline(always)]
pub fn other_node_route(saddr: u32) -> Option<&'static RouteInfo> {
    ROUTES
        .get(&route_key(saddr))
        .filter(|route| route.flags & (ROUTE_REMOTE | ROUTE_NODE) != 0)
}

const AF_INET: u8 = 2;

/// Native routing: whether the frame's Ethernet source is the MAC this node reaches
/// `node_ip` through on the interface the frame arrived on (the kernel's FIB and
/// neighbour table: the node itself on a shared link). A host elsewhere on the link
/// claiming a pod source is not that node.
#[inline(always)]
pub fn from_nodes_mac<P: Packet>(pkt: &P, node_ip: [u8; 4]) -> bool {
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = pkt.ifindex();
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(node_ip);
    if pkt.fib_lookup(&mut params) as u32 != BPF_FIB_LKUP_RET_SUCCESS
        || params.ifindex != pkt.ifindex()
    {
        return false;
    }
    pkt.load::<[u8; 6]>(6) == Ok(params.dmac)
}

/// A packet from another node whose sender was checked: reverse NAT, policy and
/// delivery. `entry`: its conntrack entry, looked up at route epoch `epoch`.
#[inline(always)]
pub fn receive<P: Packet>(
    pkt: &P,
    h: &Headers,
    epoch: u32,
    entry: Option<NonNull<CtValue>>,
) -> Result<Verdict, ()> {
    let mut daddr = h.daddr;
    // An ICMP error about a flow the datapath translated follows that flow.
    let mut related_error = false;
    if h.proto == PROTO_ICMP {
        match reply::reverse_icmp_error(pkt, h, epoch)? {
            ErrorTo::Unrelated | ErrorTo::Untracked(_) | ErrorTo::Stack => {}
            // About a flow its policy allows: passes as the flow's packets do.
            ErrorTo::Allowed => related_error = true,
            ErrorTo::World => return routing::to_world(pkt, h),
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
        let ct = conntrack::touch(entry, h, pkt.len());
        if let Err(reason) = policy::check_flow(entry, epoch, h) {
            return Ok(Verdict::Drop(reason));
        }
        if ct.flags & CT_FLAG_REPLY != 0 {
            if ct.flags & CT_FLAG_EXTERNAL != 0 {
                // A backend on that node answering a NodePort flow this node SNATed.
                return reply::reply_to_world(pkt, h, ct);
            }
            if !nat::reverse(pkt, h, ct)? {
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
        // This node's own addresses: the node's processes talking to pods of other
        // nodes (from its overlay address).
        if routing::is_host_address(daddr) {
            count(h.explain, stat::PASSED_TO_STACK, pkt.len());
            return Ok(Verdict::Pass);
        }
        return Ok(Verdict::Drop(stat::DROP_UNKNOWN_POD));
    };
    if routing::ttl_expires(pkt) {
        return Ok(Verdict::Drop(stat::DROP_TTL_EXCEEDED));
    }
    // A new flow to a policed pod: judged, and recorded if allowed (without ports:
    // an ICMP echo, see `policy::judge_portless`).
    if entry.is_none() && !related_error && ep.flags & policy::ISOLATED != 0 {
        if h.has_ports {
            let verdict = policy::verdict_of_new(h);
            if let Some(reason) = policy::denied(verdict) {
                return Ok(Verdict::Drop(reason));
            }
            conntrack::create_policed(h, epoch, verdict, pkt.len());
        } else if let Err(reason) =
            policy::judge_portless(pkt, h, epoch, policy::isolation(h.saddr), ep.flags)
        {
            return Ok(Verdict::Drop(reason));
        }
    }
    count(h.explain, stat::RECEIVED_FROM_NODE, pkt.len());
    routing::deliver_local(pkt, &ep)
}

/// The tunnel a frame from the overlay came through, if it carries the cluster's VNI
/// (`None`: another VXLAN network's, dropped as `drop_wrong_vni`), for both families.
#[inline(always)]
pub fn cluster_tunnel<P: Packet>(pkt: &P) -> Result<Option<TunnelKey>, ()> {
    let vni = CONFIG.get(0).map(|c| c.vni).ok_or(())?;
    let tunnel = pkt.tunnel_key()?;
    Ok((tunnel.vni == vni).then_some(tunnel))
}
