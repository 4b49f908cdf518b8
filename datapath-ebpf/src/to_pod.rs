//! What the host stack delivers to a pod, seen at tcx egress of its host-side veth.
//! Traffic the datapath delivers itself (redirect_peer) never passes here; what does
//! is the stack's: answers to the pod's masqueraded egress, the node's own traffic,
//! and the replies of Service flows whose backend is a node address (a host-network
//! endpoint, such as the API server): those are translated back to the Service
//! address here. Everything passes; nothing is dropped at this hook.
use ferrite_common::{CT_FLAG_EXTERNAL, CT_FLAG_REPLY};

use crate::{
    action, conntrack,
    headers::{parse, Parsed},
    nat,
    packet::{Packet, Verdict},
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// tcx egress of each pod's host-side veth: what the host stack sends the pod.
#[classifier]
pub fn ferrite_to_pod(ctx: TcContext) -> i32 {
    action::tc(&ctx, process(&ctx))
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed::Ipv4(h) if h.has_ports => h,
        _ => return Ok(Verdict::Pass),
    };
    if let Some(ct) = conntrack::lookup_and_touch(&h, pkt.len()) {
        if ct.flags & (CT_FLAG_EXTERNAL | CT_FLAG_REPLY) == CT_FLAG_REPLY {
            nat::reverse(pkt, &h, &ct)?;
        }
    }
    Ok(Verdict::Pass)
}
