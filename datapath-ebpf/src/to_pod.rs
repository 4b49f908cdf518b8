//! What the host stack delivers to a pod, seen at tcx egress of its host-side veth.
//! Traffic the datapath delivers itself (redirect_peer) never passes here; what does
//! is the stack's: answers to the pod's masqueraded egress, the node's own traffic,
//! and the replies of Service flows whose backend is a node address (a host-network
//! endpoint, such as the API server): those are translated back to the Service
//! address here. Everything passes; nothing is dropped at this hook.
use crate::{
    action,
    headers::{parse, Parsed},
    packet::{Packet, Verdict},
    reply,
};
use aya_ebpf::{macros::classifier, programs::TcContext};

/// This entry in `monitor::PROGRAMS`.
const PROGRAM: u8 = ferrite_common::monitor::program_index(ferrite_common::program_names::TO_POD);

/// tcx egress of each pod's host-side veth: what the host stack sends the pod.
#[classifier]
pub fn ferrite_to_pod(ctx: TcContext) -> i32 {
    action::tc(&ctx, PROGRAM, process(&ctx))
}

#[inline(always)]
fn process<P: Packet>(pkt: &P) -> Result<Verdict, ()> {
    let h = match parse(pkt) {
        Parsed::Ipv4(h) if h.has_ports => h,
        _ => return Ok(Verdict::Pass),
    };
    reply::reverse_in_cluster_reply(pkt, &h)?;
    Ok(Verdict::Pass)
}
