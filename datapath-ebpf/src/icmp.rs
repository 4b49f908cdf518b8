//! ICMP errors the datapath answers itself, built in place of the packet they answer
//! and quoting it as the client sent it (before any NAT), which is what the client's
//! stack matches against its socket:
//! - "fragmentation needed" (type 3, code 4): an external packet with DF set that is
//!   larger than pods can take, as a router on the path would answer, so the
//!   client's path MTU discovery works;
//! - "port unreachable" (type 3, code 3): a new flow to a Service without ready
//!   backends, as kube-proxy's REJECT answers (a TCP connect fails with ECONNREFUSED
//!   at once, a connected UDP socket gets ECONNREFUSED).
//!
//! And ICMP errors others send about a packet of a translated flow (a backend's port
//! unreachable for a Service's closed target port), translated back as the flow's
//! replies are ([`reverse_error`]), so the client's stack matches them to its socket.
use ferrite_common::{stat, CtValue, CT_FLAG_SNAT, PROTO_ICMP, PROTO_TCP, PROTO_UDP, REV_NAT_NONE};

use crate::{
    csum,
    headers::{Headers, ETH_HLEN, IP_DADDR_OFF, IP_OFF, IP_SADDR_OFF},
    maps::REV_NAT,
    nat,
    packet::{Packet, Verdict},
    trace::count,
};

const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// The original IP header and the first 8 bytes of its payload (RFC 792).
const QUOTED_LEN: usize = IPV4_HLEN + 8;
const ERROR_IP_LEN: usize = IPV4_HLEN + ICMP_HLEN + QUOTED_LEN;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
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

/// The ports an ICMP echo stands in for in its conntrack tuple (Cilium's way: the
/// identifier in place of a port): a request's identifier is its source port, its
/// reply's the destination port, so a reply's tuple is its request's reversed and
/// finds the request's reply entry. `None` for anything else, and for a fragment
/// after the first (no ICMP header) or one with IP options (fixed offsets, which the
/// verifier follows without doubt; such pings are judged one by one). (Identifier 0
/// makes (0, 0) both ways: the caller tells a request from a reply by its source
/// port alone otherwise.)
#[inline(always)]
pub fn echo_ports<P: Packet>(pkt: &P, h: &Headers) -> Option<Echo> {
    const ECHO_OFF: usize = IP_OFF + IPV4_HLEN;
    if h.proto != PROTO_ICMP
        || h.l4_offset != ECHO_OFF
        || ECHO_OFF + ICMP_HLEN > ETH_HLEN + h.tot_len as usize
    {
        return None;
    }
    let frags: u16 = pkt.load(IP_OFF + 6).ok()?;
    if u16::from_be(frags) & 0x1fff != 0 {
        return None;
    }
    pkt.ensure_linear((ECHO_OFF + ICMP_HLEN) as u32).ok()?;
    let header: [u8; ICMP_HLEN] = pkt.load(ECHO_OFF).ok()?;
    let identifier = u16::from_be_bytes([header[4], header[5]]);
    match header[0] {
        ICMP_ECHO_REQUEST => Some(Echo {
            sport: identifier,
            dport: 0,
            request: true,
        }),
        ICMP_ECHO_REPLY => Some(Echo {
            sport: 0,
            dport: identifier,
            request: false,
        }),
        _ => None,
    }
}

/// An ICMP echo's conntrack ports (see [`echo_ports`]), host order.
pub struct Echo {
    pub sport: u16,
    pub dport: u16,
    pub request: bool,
}

/// Where an ICMP error's parts are, for one whose IP header has no options (Linux
/// sends its errors so): fixed offsets, which the verifier follows without doubt.
const ERROR_ICMP_OFF: usize = IP_OFF + IPV4_HLEN;
const ERROR_ICMP_CSUM_OFF: usize = ERROR_ICMP_OFF + 2;
/// The quoted IP header (without options) and TCP/UDP header.
const QUOTED_IP_OFF: usize = ERROR_ICMP_OFF + ICMP_HLEN;
const QUOTED_L4_OFF: usize = QUOTED_IP_OFF + IPV4_HLEN;
const QUOTED_UDP_CSUM_OFF: usize = QUOTED_L4_OFF + 6;
const QUOTED_TCP_CSUM_OFF: usize = QUOTED_L4_OFF + 16;

/// The packet an ICMP error quotes (its IPv4 header and the ports of its TCP/UDP
/// header), as the error's sender received it.
pub struct Quoted {
    /// Addresses raw network order, ports host order (as `Headers`).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Whether the error quotes the TCP/UDP checksum too (a TCP checksum lies past
    /// the 8 bytes RFC 792 asks for; Linux quotes more).
    l4_csum_quoted: bool,
}

/// The quoted packet of `h` if it is an ICMP error about a TCP/UDP packet (destination
/// unreachable, time exceeded, parameter problem), as Linux sends them: an IP header
/// without options, not fragmented, quoting an IP header without options and at
/// least 8 bytes after it, not a later fragment's. Bounds-checked like
/// `headers::parse`; anything else is no error to translate.
#[inline(always)]
pub fn quoted<P: Packet>(pkt: &P, h: &Headers) -> Option<Quoted> {
    let end = ETH_HLEN + h.tot_len as usize;
    if h.proto != PROTO_ICMP || h.l4_offset != ERROR_ICMP_OFF || QUOTED_L4_OFF + 8 > end {
        return None;
    }
    pkt.ensure_linear((QUOTED_L4_OFF + 8) as u32).ok()?;
    let frags: u16 = pkt.load(IP_OFF + 6).ok()?;
    let kind: u8 = pkt.load(ERROR_ICMP_OFF).ok()?;
    if u16::from_be(frags) & 0x3fff != 0
        || !matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
        )
    {
        return None;
    }
    let vihl: u8 = pkt.load(QUOTED_IP_OFF).ok()?;
    let quoted_frags: u16 = pkt.load(QUOTED_IP_OFF + 6).ok()?;
    let proto: u8 = pkt.load(QUOTED_IP_OFF + 9).ok()?;
    if vihl != 0x45 || u16::from_be(quoted_frags) & 0x1fff != 0 {
        return None;
    }
    let l4_csum_quoted = match proto {
        PROTO_UDP => true,
        PROTO_TCP => {
            QUOTED_TCP_CSUM_OFF + 2 <= end
                && pkt.ensure_linear((QUOTED_TCP_CSUM_OFF + 2) as u32).is_ok()
        }
        _ => return None,
    };
    let addresses: [u32; 2] = pkt.load(QUOTED_IP_OFF + 12).ok()?;
    let ports: [u16; 2] = pkt.load(QUOTED_L4_OFF).ok()?;
    Some(Quoted {
        saddr: addresses[0],
        daddr: addresses[1],
        sport: u16::from_be(ports[0]),
        dport: u16::from_be(ports[1]),
        proto,
        l4_csum_quoted,
    })
}

/// Translate the ICMP error `h` about `quoted`, a packet of the flow whose reply
/// entry is `ct`, as the flow's replies are translated (`nat::reverse`), the way
/// Linux NAT translates related errors: its source (the backend) becomes the
/// frontend, and so do the quoted destination and port; for a SNATed flow its
/// destination and the quoted source and port become the client. Every checksum
/// follows incrementally: the IP header's, the quoted IP header's, the quoted TCP/UDP
/// checksum when quoted (UDP's 0 stays 0), and the ICMP checksum over all of it.
/// Returns whether it did: without the rev-NAT entry (the Service is gone) the error
/// is left as it is. The caller checked the error comes from the quoted packet's
/// destination and goes to its source (`h.saddr == quoted.daddr`, `h.daddr ==
/// quoted.saddr`).
#[inline(always)]
pub fn reverse_error<P: Packet>(
    pkt: &P,
    h: &Headers,
    quoted: &Quoted,
    ct: &CtValue,
) -> Result<bool, ()> {
    let mut frontend = NO_ENDPOINT;
    if ct.rev_nat_index != REV_NAT_NONE {
        let Some(rev) = (unsafe { REV_NAT.get(ct.rev_nat_index) }) else {
            return Ok(false);
        };
        frontend = endpoint(u32::from_ne_bytes(rev.address), rev.port);
    }
    let client = if ct.flags & CT_FLAG_SNAT != 0 {
        endpoint(u32::from_ne_bytes(ct.nat_address), ct.nat_port)
    } else {
        NO_ENDPOINT
    };
    let l4_csum_offset = match (quoted.l4_csum_quoted, quoted.proto) {
        (false, _) => 0,
        (true, PROTO_UDP) => QUOTED_UDP_CSUM_OFF,
        (true, _) => QUOTED_TCP_CSUM_OFF,
    };
    if rewrite_error(pkt, l4_csum_offset as u32, frontend, client) != 0 {
        return Err(());
    }
    count(h.explain, stat::ICMP_ERROR_REVERSE_NAT, pkt.len());
    Ok(true)
}

/// An address (raw network order) and port (host order) for [`rewrite_error`], in
/// one register; bit 48 says it is there.
#[inline(always)]
fn endpoint(address: u32, port: u16) -> u64 {
    address as u64 | (port as u64) << 32 | 1 << 48
}

const NO_ENDPOINT: u64 = 0;

/// The rewrites of [`reverse_error`], as a function of its own (a BPF-to-BPF call
/// with a small stack frame, which fits beside `ferrite_from_pod`'s in the verifier's
/// 512 bytes): ICMP errors are rare, and the checksum arithmetic over the quoted
/// packet is long. Its arguments are plain values: the offset of the quoted TCP/UDP
/// checksum (0: not quoted, or UDP's 0, "none"); `frontend` and `client` (see
/// [`endpoint`]) what the quoted destination and source become, and with them the
/// error's source and destination. The old values are read from the packet. Returns
/// 0, or 1 when a write failed.
#[inline(never)]
fn rewrite_error<P: Packet>(pkt: &P, l4_csum_offset: u32, frontend: u64, client: u64) -> u32 {
    match rewrite_error_fields(pkt, l4_csum_offset, frontend, client) {
        Ok(()) => 0,
        Err(()) => 1,
    }
}

#[inline(always)]
fn rewrite_error_fields<P: Packet>(
    pkt: &P,
    l4_csum_offset: u32,
    frontend: u64,
    client: u64,
) -> Result<(), ()> {
    let l4_csum = match l4_csum_offset as usize {
        QUOTED_UDP_CSUM_OFF => L4Csum::Udp,
        QUOTED_TCP_CSUM_OFF => L4Csum::Tcp,
        _ => L4Csum::NotQuoted,
    };
    let mut icmp_csum: u16 = pkt.load(ERROR_ICMP_CSUM_OFF)?;
    if frontend != NO_ENDPOINT {
        let (address, port) = (frontend as u32, (frontend >> 32) as u16);
        let backend: u32 = pkt.load(QUOTED_IP_OFF + 16)?;
        let backend_port: u16 = pkt.load(QUOTED_L4_OFF + 2)?;
        // ICMP has no pseudo-header: its source changes only the IP checksum.
        nat::rewrite_ip_addr(pkt, IP_SADDR_OFF, backend, address)?;
        icmp_csum = rewrite_quoted_addr(pkt, l4_csum, 16, backend, address, icmp_csum)?;
        icmp_csum = rewrite_quoted_port(pkt, l4_csum, 2, backend_port, port.to_be(), icmp_csum)?;
    }
    if client != NO_ENDPOINT {
        let (address, port) = (client as u32, (client >> 32) as u16);
        let snat: u32 = pkt.load(QUOTED_IP_OFF + 12)?;
        let snat_port: u16 = pkt.load(QUOTED_L4_OFF)?;
        nat::rewrite_ip_addr(pkt, IP_DADDR_OFF, snat, address)?;
        icmp_csum = rewrite_quoted_addr(pkt, l4_csum, 12, snat, address, icmp_csum)?;
        icmp_csum = rewrite_quoted_port(pkt, l4_csum, 0, snat_port, port.to_be(), icmp_csum)?;
    }
    pkt.store(ERROR_ICMP_CSUM_OFF, &icmp_csum)
}

/// Which quoted TCP/UDP checksum the error carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum L4Csum {
    NotQuoted,
    Udp,
    Tcp,
}

/// Rewrite the quoted IP header's address at `field` (12: source, 16: destination)
/// from `old` to `new` (raw network order), with the quoted IP checksum and the
/// quoted TCP/UDP checksum (its pseudo-header) following; returns the ICMP checksum
/// `icmp_csum` after all of it.
#[inline(always)]
fn rewrite_quoted_addr<P: Packet>(
    pkt: &P,
    l4_csum: L4Csum,
    field: usize,
    old: u32,
    new: u32,
    icmp_csum: u16,
) -> Result<u16, ()> {
    if old == new {
        return Ok(icmp_csum);
    }
    const QUOTED_IP_CSUM_OFF: usize = QUOTED_IP_OFF + 10;
    let ip_csum: u16 = pkt.load(QUOTED_IP_CSUM_OFF)?;
    let updated = csum::replace4(ip_csum, old, new);
    pkt.store(QUOTED_IP_CSUM_OFF, &updated)?;
    let icmp_csum = csum::replace4(icmp_csum, ip_csum as u32, updated as u32);
    let icmp_csum = rewrite_quoted_l4_csum(pkt, l4_csum, old, new, icmp_csum)?;
    pkt.store(QUOTED_IP_OFF + field, &new)?;
    Ok(csum::replace4(icmp_csum, old, new))
}

/// Rewrite the quoted port at `field` (0: source, 2: destination) from `old` to `new`
/// (both as in the packet: network order), with the quoted TCP/UDP checksum
/// following; returns the ICMP checksum `icmp_csum` after it.
#[inline(always)]
fn rewrite_quoted_port<P: Packet>(
    pkt: &P,
    l4_csum: L4Csum,
    field: usize,
    old: u16,
    new: u16,
    icmp_csum: u16,
) -> Result<u16, ()> {
    if old == new {
        return Ok(icmp_csum);
    }
    let icmp_csum = rewrite_quoted_l4_csum(pkt, l4_csum, old as u32, new as u32, icmp_csum)?;
    pkt.store(QUOTED_L4_OFF + field, &new)?;
    // A 16-bit value in the low half of a word: the zero upper halves cancel out.
    Ok(csum::replace4(icmp_csum, old as u32, new as u32))
}

/// The quoted TCP/UDP checksum after a change from `old` to `new` in what it covers
/// (if the error quotes it; a UDP checksum 0, "none", stays 0); returns the ICMP
/// checksum `icmp_csum` after it.
#[inline(always)]
fn rewrite_quoted_l4_csum<P: Packet>(
    pkt: &P,
    l4_csum: L4Csum,
    old: u32,
    new: u32,
    icmp_csum: u16,
) -> Result<u16, ()> {
    let offset = match l4_csum {
        L4Csum::NotQuoted => return Ok(icmp_csum),
        L4Csum::Udp => QUOTED_UDP_CSUM_OFF,
        L4Csum::Tcp => QUOTED_TCP_CSUM_OFF,
    };
    let check: u16 = pkt.load(offset)?;
    let udp = l4_csum == L4Csum::Udp;
    if udp && check == 0 {
        return Ok(icmp_csum);
    }
    let mut updated = csum::replace4(check, old, new);
    if udp && updated == 0 {
        updated = 0xffff;
    }
    pkt.store(offset, &updated)?;
    Ok(csum::replace4(icmp_csum, check as u32, updated as u32))
}
