//! Replies of Service flows, and ICMP errors about their packets, shared by the
//! entries that see them.
use ferrite_common::{CtValue, CT_FLAG_EXTERNAL, CT_FLAG_REPLY, CT_FLAG_SNAT, CT_FLAG_VIA_STACK};

use crate::{
    conntrack,
    headers::Headers,
    icmp, nat,
    packet::{Packet, Verdict},
    policy, routing,
};

/// Where an ICMP error goes after [`reverse_icmp_error`].
pub enum ErrorTo {
    /// Not about a flow conntrack holds, or about one its policy denies: a packet
    /// like any other, to its destination, judged on its own.
    Unrelated,
    /// About a flow conntrack holds whose policy lets it pass, with nothing to
    /// translate (its Service gone, or not translated at all, or an error a router
    /// sent): to its destination, not judged again.
    Allowed,
    /// About a flow this node holds no state of, from the quoted packet's destination
    /// to its source: routed as the flow's replies are, by the quoted source port
    /// (this one), so an error about a NodePort flow another node SNATed to a port of
    /// its range goes back over the overlay to that node, which translates it.
    Untracked(u16),
    /// About a flow the stack forwarded (a hostPort's): back through the stack, whose
    /// netfilter state translates it.
    Stack,
    /// Translated, for a client outside the cluster: out of the uplink.
    World,
    /// Translated, for the client at this address (raw network order).
    Client(u32),
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) the
/// backend of a translated flow sent about one of its packets, translated back like
/// the flow's replies (`icmp::reverse_error`: a connected UDP socket of the client
/// then gets ECONNREFUSED for a closed target port, as with kube-proxy). Only an
/// error from the quoted packet's destination to its source is translated: a pod
/// cannot forge errors about flows it is not the backend of. Any error to the
/// quoted packet's source (a router's "time exceeded" or "fragmentation needed"
/// too) is judged as the flow it is about (`policy::check_related`, at route epoch
/// `epoch`), like Linux conntrack's RELATED: an allowed flow's errors pass whatever
/// the isolation of either end.
#[inline(always)]
pub fn reverse_icmp_error<P: Packet>(pkt: &P, h: &Headers, epoch: u32) -> Result<ErrorTo, ()> {
    let Some(quoted) = icmp::quoted(pkt, h) else {
        return Ok(ErrorTo::Unrelated);
    };
    if quoted.saddr != h.daddr {
        return Ok(ErrorTo::Unrelated);
    }
    let from_destination = quoted.daddr == h.saddr;
    let Some(entry) = conntrack::lookup_related(&quoted) else {
        return Ok(if from_destination {
            ErrorTo::Untracked(quoted.sport)
        } else {
            ErrorTo::Unrelated
        });
    };
    if policy::check_related(entry, epoch, h, &quoted).is_err() {
        return Ok(ErrorTo::Unrelated);
    }
    // SAFETY: a value of `ferrite_ct` found by this packet's lookup.
    let ct = unsafe { entry.as_ref() };
    if !from_destination {
        return Ok(ErrorTo::Allowed);
    }
    if ct.flags & CT_FLAG_VIA_STACK != 0 {
        return Ok(ErrorTo::Stack);
    }
    if ct.flags & CT_FLAG_REPLY == 0 || !icmp::reverse_error(pkt, h, &quoted, ct)? {
        return Ok(ErrorTo::Allowed);
    }
    Ok(if ct.flags & CT_FLAG_EXTERNAL != 0 {
        ErrorTo::World
    } else if ct.flags & CT_FLAG_SNAT != 0 {
        ErrorTo::Client(u32::from_ne_bytes(ct.nat_address))
    } else {
        ErrorTo::Client(h.daddr)
    })
}

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
