//! Forwarding after NAT: pods on this node get the frame straight into their eth0
//! (bpf_redirect_peer); pods of other nodes are reached through the VXLAN device with
//! the owning node in the tunnel metadata (routes from `ferrite_routes`); anything
//! else continues into the host stack (and is masqueraded there when it leaves).
use ferrite_common::{stat, EndpointInfo, EndpointKey, ROUTE_REMOTE};

use crate::{
    maps::{route_key, CONFIG, ENDPOINTS, ROUTES},
    packet::{Packet, Verdict},
    stats::count,
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

/// Rewrite the Ethernet header: `dst`, then `src`.
#[inline(always)]
fn set_macs<P: Packet>(pkt: &P, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), ()> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dst);
    macs[6..].copy_from_slice(src);
    pkt.store(0, &macs)
}

/// Deliver to a pod of this node, as a router would: dst = the pod's eth0, src = its
/// gateway (the host veth).
#[inline(always)]
pub fn deliver_local<P: Packet>(pkt: &P, ep: &EndpointInfo) -> Result<Verdict, ()> {
    set_macs(pkt, &ep.pod_mac, &ep.host_mac)?;
    Ok(Verdict::RedirectPeer(ep.ifindex))
}

#[inline(always)]
pub fn route<P: Packet>(pkt: &P, daddr: u32) -> Result<Verdict, ()> {
    if let Some(ep) = local_endpoint(daddr) {
        count(stat::DELIVERED_LOCAL, pkt.len());
        return deliver_local(pkt, &ep);
    }
    let Some(route) = ROUTES.get(&route_key(daddr)) else {
        count(stat::PASSED_TO_STACK, pkt.len());
        return Ok(Verdict::Pass);
    };
    if route.flags & ROUTE_REMOTE == 0 {
        // This node's pod CIDR, but no such pod.
        return Ok(Verdict::Drop(stat::DROP_UNKNOWN_POD));
    }
    let (node_ip, vtep_mac) = (route.node_ip, route.vtep_mac);
    let Some(config) = CONFIG.get(0) else {
        return Ok(Verdict::Drop(stat::DROP_NO_OVERLAY));
    };
    if config.vxlan_ifindex == 0 {
        return Ok(Verdict::Drop(stat::DROP_NO_OVERLAY));
    }
    // The inner frame goes to the remote VTEP as-is: the kernel vxlan device adds
    // outer headers, handles GSO and checksums and picks the UDP source port from the
    // flow hash.
    set_macs(pkt, &vtep_mac, &config.vtep_mac)?;
    pkt.set_tunnel(u32::from_be_bytes(node_ip), config.vni)?;
    count(stat::SENT_TO_NODE, pkt.len());
    Ok(Verdict::Redirect(config.vxlan_ifindex))
}
