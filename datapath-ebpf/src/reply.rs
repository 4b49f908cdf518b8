//! Replies of Service flows, shared by the entries that see them.
use ferrite_common::{CtValue, CT_FLAG_EXTERNAL, CT_FLAG_REPLY};

use crate::{
    conntrack,
    headers::Headers,
    nat,
    packet::{Packet, Verdict},
    routing,
};

/// The reply of an external flow (`ct` is its reply entry), translated back, leaves
/// through the uplink; without the rev-NAT entry (the Service is gone) it passes
/// untranslated.
#[inline(always)]
pub fn reply_to_world<P: Packet>(pkt: &P, h: &Headers, ct: &CtValue) -> Result<Verdict, ()> {
    if nat::reverse(pkt, h, ct)? {
        routing::to_world(pkt, h)
    } else {
        Ok(Verdict::Pass)
    }
}

/// A reply to a Service flow opened inside the cluster (a reply entry, not an external
/// flow's) that reaches the stack's path rather than the datapath's own delivery,
/// translated back to the Service address; anything else is left as it is. Returns
/// whether the packet's tuple has an entry.
#[inline(always)]
pub fn reverse_in_cluster_reply<P: Packet>(pkt: &P, h: &Headers) -> Result<bool, ()> {
    let Some(ct) = conntrack::lookup_and_touch(h, pkt.len()) else {
        return Ok(false);
    };
    if ct.flags & (CT_FLAG_EXTERNAL | CT_FLAG_REPLY) == CT_FLAG_REPLY {
        nat::reverse(pkt, h, ct)?;
    }
    Ok(true)
}
