//! Forwarding after NAT: pods on this node get the frame straight into their eth0
//! (bpf_redirect_peer); anything else continues into the host stack.
use ferrite_common::{stat, EndpointInfo, EndpointKey};

use crate::{
    maps::ENDPOINTS,
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

#[inline(always)]
pub fn route<P: Packet>(pkt: &P, daddr: u32) -> Result<Verdict, ()> {
    let Some(ep) = local_endpoint(daddr) else {
        count(stat::PASSED_TO_STACK, pkt.len());
        return Ok(Verdict::Pass);
    };
    // dst = the pod's eth0, src = its gateway (host veth): what a router would write.
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.pod_mac);
    macs[6..].copy_from_slice(&ep.host_mac);
    pkt.store(0, &macs)?;
    count(stat::DELIVERED_LOCAL, pkt.len());
    Ok(Verdict::RedirectPeer(ep.ifindex))
}
