//! Address/port rewrites with incremental checksum fixes (IP header + TCP/UDP,
//! including the pseudo-header for address changes).
use ferrite_common::{stat, CtValue, CT_FLAG_SNAT, PROTO_UDP, REV_NAT_NONE};

use crate::{
    csum,
    headers::{Headers, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF},
    maps::REV_NAT,
    packet::Packet,
    trace::count,
};

/// Rewrite destination to `addr:port` (address raw network order, port host order).
#[inline(always)]
pub fn dnat<P: Packet>(pkt: &P, h: &Headers, addr: u32, port: u16) -> Result<(), ()> {
    rewrite_addr(pkt, h, IP_DADDR_OFF, h.daddr, addr)?;
    rewrite_port(pkt, h, h.l4_offset + 2, h.dport, port)
}

/// Rewrite source to `addr:port` (address raw network order, port host order).
#[inline(always)]
pub fn snat<P: Packet>(pkt: &P, h: &Headers, addr: u32, port: u16) -> Result<(), ()> {
    rewrite_addr(pkt, h, IP_SADDR_OFF, h.saddr, addr)?;
    rewrite_port(pkt, h, h.l4_offset, h.sport, port)
}

/// Translate the reply of a Service flow (`ct` is its reply entry): source back to
/// the frontend, and destination back to the client if the flow was SNATed (a
/// remapped direct flow has only the latter). Returns whether it did: without the
/// rev-NAT entry (the Service is gone) the reply is left untranslated.
#[inline(always)]
pub fn reverse<P: Packet>(pkt: &P, h: &Headers, ct: &CtValue) -> Result<bool, ()> {
    if ct.rev_nat_index == REV_NAT_NONE {
        dnat(pkt, h, u32::from_ne_bytes(ct.nat_address), ct.nat_port)?;
        return Ok(true);
    }
    let Some(frontend) = (unsafe { REV_NAT.get(ct.rev_nat_index) }) else {
        return Ok(false);
    };
    snat(pkt, h, u32::from_ne_bytes(frontend.address), frontend.port)?;
    if ct.flags & CT_FLAG_SNAT != 0 {
        dnat(pkt, h, u32::from_ne_bytes(ct.nat_address), ct.nat_port)?;
    }
    count(h.explain, stat::REVERSE_NAT, pkt.len());
    Ok(true)
}

#[inline(always)]
fn rewrite_addr<P: Packet>(
    pkt: &P,
    h: &Headers,
    offset: usize,
    old: u32,
    new: u32,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    // A later fragment has no L4 checksum: its first fragment's covers the datagram.
    if h.l4_present {
        pkt.replace_l4_csum(h.l4_csum_offset(), old, new, 4, true, h.proto == PROTO_UDP)?;
    }
    rewrite_ip_addr(pkt, offset, old, new)
}

/// Rewrite the IPv4 address at `offset` (source or destination) from `old` to `new`
/// (raw network order) with the IP header checksum, nothing else: what a packet
/// without a pseudo-header checksum (ICMP) needs.
#[inline(always)]
pub fn rewrite_ip_addr<P: Packet>(pkt: &P, offset: usize, old: u32, new: u32) -> Result<(), ()> {
    // The IP header checksum is always complete: fixed here without a helper call.
    let check = unsafe { *pkt.ptr_at::<u16>(IP_CSUM_OFF)? };
    pkt.store(IP_CSUM_OFF, &csum::replace4(check, old, new))?;
    pkt.store(offset, &new)
}

#[inline(always)]
fn rewrite_port<P: Packet>(
    pkt: &P,
    h: &Headers,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    // Ports live in the first fragment only.
    if old == new || !h.l4_present {
        return Ok(());
    }
    let (old, new) = (old.to_be(), new.to_be());
    pkt.replace_l4_csum(
        h.l4_csum_offset(),
        old as u32,
        new as u32,
        2,
        false,
        h.proto == PROTO_UDP,
    )?;
    pkt.store(offset, &new)
}
