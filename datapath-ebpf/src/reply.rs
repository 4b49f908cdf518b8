//! Replies of Service flows, shared by the entries that see them.
use ferrite_common::CtValue;

use crate::{
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
