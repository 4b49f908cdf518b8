//! ICMP errors the datapath answers itself, built in place of the packet they answer
//! and quoting it as the client sent it (before any NAT), which is what the client's
//! stack matches against its socket:
//! - "fragmentation needed" (type 3, code 4): an external packet with DF set that is
//!   larger than pods can take, as a router on the path would answer, so the
//!   client's path MTU discovery works;
//! - "port unreachable" (type 3, code 3): a new flow to a Service without ready
//!   backends, as kube-proxy's REJECT answers (a TCP connect fails with ECONNREFUSED
//!   at once, a connected UDP socket gets ECONNREFUSED).
use crate::{
    csum,
    headers::{Headers, ETH_HLEN, IP_OFF},
    packet::{Packet, Verdict},
};

const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// The original IP header and the first 8 bytes of its payload (RFC 792).
const QUOTED_LEN: usize = IPV4_HLEN + 8;
const ERROR_IP_LEN: usize = IPV4_HLEN + ICMP_HLEN + QUOTED_LEN;
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The smallest MTU IPv4 allows (RFC 791); below it a limit is a misconfiguration,
/// and the error (56 bytes of IP) would not fit in the packet it replaces.
const MIN_IPV4_MTU: u16 = 68;

/// Whether `h` (an IPv4 packet without options) must be answered with
/// [`frag_needed`] rather than forwarded to a pod: DF set and larger than `mtu`.
#[inline(always)]
pub fn too_big_for(h: &Headers, mtu: u16) -> bool {
    mtu >= MIN_IPV4_MTU && h.dont_fragment && h.tot_len > mtu && h.l4_offset == ETH_HLEN + IPV4_HLEN
}

/// Rewrite the packet into ICMP "fragmentation needed, next-hop MTU `mtu`" from its
/// destination to its source, and send it back out of the interface it came in on.
#[inline(always)]
pub fn frag_needed<P: Packet>(pkt: &P, h: &Headers, mtu: u16) -> Result<Verdict, ()> {
    unreachable(pkt, h, ICMP_FRAG_NEEDED, mtu)?;
    Ok(Verdict::Bounce)
}

/// Rewrite the packet into ICMP "port unreachable" from its destination to its
/// source (the caller sends it back where the packet came from).
#[inline(always)]
pub fn port_unreachable<P: Packet>(pkt: &P, h: &Headers) -> Result<(), ()> {
    unreachable(pkt, h, ICMP_PORT_UNREACH, 0)
}

/// Rewrite the packet into ICMP "destination unreachable" with `code` (and the
/// next-hop MTU for "fragmentation needed"), addresses and MACs swapped.
#[inline(always)]
fn unreachable<P: Packet>(pkt: &P, h: &Headers, code: u8, mtu: u16) -> Result<(), ()> {
    let quoted = unsafe { *pkt.ptr_at::<[u8; QUOTED_LEN]>(IP_OFF)? };
    let macs = unsafe { *pkt.ptr_at::<[u8; 12]>(0)? };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);

    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ERROR_IP_LEN as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = PROTO_ICMP;
    ip[12..16].copy_from_slice(&h.daddr.to_ne_bytes());
    ip[16..20].copy_from_slice(&h.saddr.to_ne_bytes());
    let ip_check = csum::of_bytes(&ip);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());

    let mut icmp = [0u8; ICMP_HLEN + QUOTED_LEN];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = code;
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HLEN..].copy_from_slice(&quoted);
    let icmp_check = csum::of_bytes(&icmp);
    icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());

    // Cut (or grow: a small datagram is shorter than the error) to the error's size.
    let len = (ETH_HLEN + ERROR_IP_LEN) as u32;
    pkt.truncate(len)?;
    pkt.ensure_linear(len)?;
    pkt.store(0, &swapped)?;
    pkt.store(IP_OFF, &ip)?;
    pkt.store(IP_OFF + IPV4_HLEN, &icmp)
}
