//! Parse Ethernet/IPv4/TCP/UDP once, bounds-checked, into plain values. Verdict rules
//! for bad input (each counted in `ferrite_stats`):
//! - shorter than an Ethernet header: drop (`drop_malformed`);
//! - ARP: pass to the stack (`passed_arp`); other non-IPv4: drop (`drop_unsupported_l3`;
//!   IPv6 gets here only when `ferrite_from_pod`'s tail call to its IPv6 program
//!   fails, and in explain runs: `headers6` has its rules);
//! - IPv4 with version != 4, IHL < 5, total length < IHL or beyond the packet: drop
//!   (`drop_malformed`);
//! - a first fragment (MF set, offset 0) is parsed like a whole packet and records
//!   its ports; a later fragment (offset != 0) gets them from there (`fragments`),
//!   with no L4 header to rewrite; without them it is routed by destination IP only,
//!   never Service-translated (`fragment_routed`);
//! - TCP/UDP header cut short in a whole packet or first fragment: drop
//!   (`drop_malformed`);
//! - other IP protocols (ICMP, ...): routed by destination IP, no Service lookup.
use ferrite_common::{explain, stat, PROTO_TCP, PROTO_UDP};

use crate::{fragments, packet::Packet, trace};

pub const ETH_HLEN: usize = 14;
const ETH_TYPE_OFF: usize = 12;
const IPV4_HLEN: usize = 20;
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IP_DF: u16 = 0x4000;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// The parsed packet. Addresses are raw network-order words (as the packet and the
/// checksum helpers want them); ports are host order (as the maps store them).
#[derive(Clone, Copy)]
pub struct Headers {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    /// Offset of the L4 header; `has_ports` says whether ports below are valid.
    pub l4_offset: usize,
    pub has_ports: bool,
    /// Whether the L4 header (ports, checksum) is in this packet: not in a later
    /// fragment, whose ports come from its first fragment.
    pub l4_present: bool,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// IP total length and the Don't Fragment flag (path MTU discovery).
    pub tot_len: u16,
    pub dont_fragment: bool,
    /// An explain run's packet (`trace`): decide, but write nothing.
    pub explain: bool,
}

impl Headers {
    /// A TCP SYN opening a connection (not the SYN-ACK).
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP
            && self.has_ports
            && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// Offset of the L4 checksum (only meaningful when `has_ports`).
    #[inline(always)]
    pub fn l4_csum_offset(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_offset + 16
        } else {
            self.l4_offset + 6
        }
    }
}

/// What parsing found: headers to act on, or a counted early verdict.
pub enum Parsed {
    Ipv4(Headers),
    /// Not for the IPv4 logic: pass to the stack with this counter.
    Pass(u32),
    /// Drop with this counter.
    Drop(u32),
}

#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Parsed {
    // Pointers are taken only after each pull (a pull invalidates them).
    if pkt.ensure_linear((ETH_HLEN + IPV4_HLEN) as u32).is_err() {
        return Parsed::Drop(stat::DROP_INTERNAL);
    }
    let Ok(ether_type) = pkt.load::<u16>(ETH_TYPE_OFF) else {
        return Parsed::Drop(stat::DROP_MALFORMED);
    };
    match u16::from_be(ether_type) {
        ETH_P_IP => {}
        ETH_P_ARP => return Parsed::Pass(stat::PASSED_ARP),
        _ => return Parsed::Drop(stat::DROP_UNSUPPORTED_L3),
    }
    // Each field read as one load (see `Packet::load`); the whole header is in the
    // linear area (pulled above) or the packet is too short.
    let Ok(vihl) = pkt.load::<u8>(IP_OFF) else {
        return Parsed::Drop(stat::DROP_MALFORMED);
    };
    let Ok(addresses) = pkt.load::<[u32; 2]>(IP_SADDR_OFF) else {
        return Parsed::Drop(stat::DROP_MALFORMED);
    };
    let (Ok(tot_len), Ok(id), Ok(frags), Ok(proto)) = (
        pkt.load::<u16>(IP_OFF + 2),
        pkt.load::<u16>(IP_OFF + 4),
        pkt.load::<u16>(IP_OFF + 6),
        pkt.load::<u8>(IP_OFF + 9),
    ) else {
        return Parsed::Drop(stat::DROP_MALFORMED);
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(tot_len) as u32;
    if vihl >> 4 != 4
        || header_len < IPV4_HLEN
        || tot_len < header_len as u32
        || ETH_HLEN as u32 + tot_len > pkt.len()
    {
        return Parsed::Drop(stat::DROP_MALFORMED);
    }
    let frags = u16::from_be(frags);
    let is_fragment = frags & 0x3fff != 0; // MF flag or a non-zero offset
    let later_fragment = frags & 0x1fff != 0;
    let mut headers = Headers {
        saddr: addresses[0],
        daddr: addresses[1],
        proto,
        l4_offset: ETH_HLEN + header_len,
        has_ports: false,
        l4_present: false,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        tot_len: tot_len as u16,
        dont_fragment: frags & IP_DF != 0,
        explain: pkt.explain(),
    };
    if headers.proto != PROTO_TCP && headers.proto != PROTO_UDP {
        return Parsed::Ipv4(headers);
    }
    if later_fragment {
        let (saddr, daddr, explain) = (headers.saddr, headers.daddr, headers.explain);
        if let Some((sport, dport)) =
            fragments::ports_of(saddr, daddr, id.to_ne_bytes(), proto, pkt.len(), explain)
        {
            headers.sport = sport;
            headers.dport = dport;
            headers.has_ports = true;
        }
        return Parsed::Ipv4(headers);
    }
    let l4_len = if headers.proto == PROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if (header_len + l4_len) as u32 > tot_len {
        return Parsed::Drop(stat::DROP_MALFORMED);
    }
    if pkt
        .ensure_linear((headers.l4_offset + l4_len) as u32)
        .is_err()
    {
        return Parsed::Drop(stat::DROP_INTERNAL);
    }
    // Ports (first 4 bytes) and, for TCP, the flags byte at offset 13.
    let Ok(ports) = pkt.load::<[u16; 2]>(headers.l4_offset) else {
        return Parsed::Drop(stat::DROP_MALFORMED);
    };
    headers.sport = u16::from_be(ports[0]);
    headers.dport = u16::from_be(ports[1]);
    if headers.proto == PROTO_TCP {
        let Ok(flags) = pkt.load::<u8>(headers.l4_offset + 13) else {
            return Parsed::Drop(stat::DROP_MALFORMED);
        };
        headers.tcp_flags = flags;
    }
    headers.has_ports = true;
    headers.l4_present = true;
    if is_fragment {
        let (saddr, daddr, sport, dport) =
            (headers.saddr, headers.daddr, headers.sport, headers.dport);
        if trace::writes(headers.explain, explain::write::FRAGMENT) {
            fragments::remember(saddr, daddr, id.to_ne_bytes(), proto, sport, dport);
        }
    }
    Parsed::Ipv4(headers)
}

#[inline(always)]
pub fn is_fragment_routed(h: &Headers) -> bool {
    !h.has_ports && (h.proto == PROTO_TCP || h.proto == PROTO_UDP)
}
