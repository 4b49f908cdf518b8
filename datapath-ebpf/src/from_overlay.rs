//! What other nodes send, seen at tcx ingress of this node's VXLAN device after the
//! kernel decapsulated it: check the VNI, reverse-NAT replies of Service flows whose
//! client is here (the DNAT happened on this node), deliver to the pod. Inner packets
//! for pods that are not on this node are dropped and counted.
use ferrite_common::{stat, CT_FLAG_REPLY};

use crate::{
    conntrack,
    headers::{parse, Parsed},
    maps::{CONFIG, REV_NAT},
    nat,
    packet::{Packet, Verdict},
    routing,
    stats::count,
};

#[inline(always)]
pub fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let vni = CONFIG.get(0).map(|c| c.vni).ok_or(())?;
    if pkt.tunnel_vni()? != vni {
        return Ok(Verdict::Drop(stat::DROP_WRONG_VNI));
    }
    let h = match parse(pkt) {
        Parsed::Ipv4(h) => h,
        Parsed::Pass(reason) => {
            count(reason, pkt.len());
            return Ok(Verdict::Pass);
        }
        Parsed::Drop(reason) => return Ok(Verdict::Drop(reason)),
    };
    if h.has_ports {
        if let Some(ct) = conntrack::lookup_and_touch(&h, pkt.len()) {
            if ct.flags & CT_FLAG_REPLY != 0 {
                if let Some(frontend) = unsafe { REV_NAT.get(ct.rev_nat_index) } {
                    let (addr, port) = (u32::from_ne_bytes(frontend.address), frontend.port);
                    nat::snat(pkt, &h, addr, port)?;
                    count(stat::REVERSE_NAT, pkt.len());
                }
            }
        }
    }
    let Some(ep) = routing::local_endpoint(h.daddr) else {
        return Ok(Verdict::Drop(stat::DROP_UNKNOWN_POD));
    };
    count(stat::RECEIVED_FROM_NODE, pkt.len());
    routing::deliver_local(pkt, &ep)
}
