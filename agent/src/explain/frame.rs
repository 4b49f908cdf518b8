//! The frames `ferrite explain` sends through the datapath (as a sender on each side
//! would send them) and what it reads back out of them, every checksum checked.
//! IPv4 and IPv6 alike: only the IP header and the checksums' pseudo-header differ.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, ensure, Result};
use ferrite_common::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use serde::Serialize;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const IP_DF: u16 = 0x4000;
const TCP_SYN: u8 = 0x02;
/// The TTL (IPv4) or hop limit (IPv6) a sender starts with.
const INITIAL_HOPS: u8 = 64;
/// What the UDP datagram carries (a sender's payload; its content does not matter).
const UDP_PAYLOAD: &[u8] = b"ferrite explain\n";

/// One packet's addresses: from `source` to `destination` over `protocol`, both of
/// one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: u8,
}

/// The internet checksum (RFC 1071) of `chunks`, as if concatenated (each but the
/// last of even length).
fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut words = chunk.chunks_exact(2);
        for word in &mut words {
            sum += u16::from_be_bytes([word[0], word[1]]) as u32;
        }
        if let [last] = words.remainder() {
            sum += (*last as u32) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header an upper-layer checksum covers: RFC 793's for IPv4, RFC 8200
/// section 8.1's for IPv6 (32-bit length, the next header last).
fn pseudo_header(source: IpAddr, destination: IpAddr, protocol: u8, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(40);
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            pseudo.extend(source.octets());
            pseudo.extend(destination.octets());
            pseudo.extend([0, protocol]);
            pseudo.extend((len as u16).to_be_bytes());
        }
        (source, destination) => {
            pseudo.extend(ipv6_octets(source));
            pseudo.extend(ipv6_octets(destination));
            pseudo.extend((len as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, protocol]);
        }
    }
    pseudo
}

/// An address as IPv6 (an IPv4 one mapped: only reached for a mixed pair, refused
/// before a frame is built).
fn ipv6_octets(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The first packet of `flow` as its sender puts it on the wire: Ethernet from
/// `src_mac` to `dst_mac`, IPv4 (DF set, TTL 64) or IPv6 (hop limit 64, no
/// extension headers), a TCP SYN or a small UDP datagram, every checksum complete.
pub fn first_packet(flow: &Flow, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Result<Vec<u8>> {
    let (source, destination) = (flow.source.ip(), flow.destination.ip());
    ensure!(
        source.is_ipv4() == destination.is_ipv4(),
        "{source} and {destination} are of different families"
    );
    let mut l4 = match flow.protocol {
        PROTO_TCP => {
            let mut tcp = vec![0u8; TCP_HLEN];
            tcp[0..2].copy_from_slice(&flow.source.port().to_be_bytes());
            tcp[2..4].copy_from_slice(&flow.destination.port().to_be_bytes());
            tcp[4..8].copy_from_slice(&1u32.to_be_bytes()); // sequence number
            tcp[12] = ((TCP_HLEN / 4) as u8) << 4;
            tcp[13] = TCP_SYN;
            tcp[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
            tcp
        }
        PROTO_UDP => {
            let len = UDP_HLEN + UDP_PAYLOAD.len();
            let mut udp = vec![0u8; UDP_HLEN];
            udp[0..2].copy_from_slice(&flow.source.port().to_be_bytes());
            udp[2..4].copy_from_slice(&flow.destination.port().to_be_bytes());
            udp[4..6].copy_from_slice(&(len as u16).to_be_bytes());
            udp.extend_from_slice(UDP_PAYLOAD);
            udp
        }
        other => bail!("protocol {other}: only TCP and UDP are explained"),
    };
    let pseudo = pseudo_header(source, destination, flow.protocol, l4.len());
    let check = checksum(&[&pseudo, &l4]);
    let check_offset = if flow.protocol == PROTO_TCP { 16 } else { 6 };
    // UDP sends a computed 0 as 0xffff (0 means "no checksum"; IPv6 requires one).
    let check = if flow.protocol == PROTO_UDP && check == 0 {
        0xffff
    } else {
        check
    };
    l4[check_offset..check_offset + 2].copy_from_slice(&check.to_be_bytes());

    let (ethertype, ip) = match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => (
            ETH_P_IP,
            ipv4_header(source, destination, flow.protocol, l4.len()),
        ),
        (IpAddr::V6(source), IpAddr::V6(destination)) => (
            ETH_P_IPV6,
            ipv6_header(source, destination, flow.protocol, l4.len()),
        ),
        _ => unreachable!("one family, checked above"),
    };
    let mut frame = Vec::with_capacity(ETH_HLEN + ip.len() + l4.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    Ok(frame)
}

fn ipv4_header(source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, l4_len: usize) -> Vec<u8> {
    let mut ip = vec![0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IPV4_HLEN + l4_len) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = INITIAL_HOPS;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&destination.octets());
    let ip_check = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());
    ip
}

/// IPv6 has no header checksum.
fn ipv6_header(source: Ipv6Addr, destination: Ipv6Addr, protocol: u8, l4_len: usize) -> Vec<u8> {
    let mut ip = vec![0u8; IPV6_HLEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    ip[6] = protocol;
    ip[7] = INITIAL_HOPS;
    ip[8..24].copy_from_slice(&source.octets());
    ip[24..40].copy_from_slice(&destination.octets());
    ip
}

/// What a frame the datapath left says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrameSummary {
    pub eth_destination: String,
    pub eth_source: String,
    /// `address:port` (no port for ICMP).
    pub source: String,
    pub destination: String,
    pub protocol: String,
    /// An ICMP message: its type and code, e.g. "destination unreachable (port)".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<String>,
    /// Whether the IPv4 header checksum (IPv6 has none) and the TCP/UDP/ICMP
    /// checksum are valid.
    pub checksums_valid: bool,
    pub length: usize,
}

pub fn mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn icmp_name(kind: u8, code: u8) -> String {
    match (kind, code) {
        (3, 3) => "destination unreachable (port unreachable)".into(),
        (3, 4) => "destination unreachable (fragmentation needed)".into(),
        (3, code) => format!("destination unreachable (code {code})"),
        (0, _) => "echo reply".into(),
        (8, _) => "echo request".into(),
        (kind, code) => format!("type {kind} code {code}"),
    }
}

fn icmpv6_name(kind: u8, code: u8) -> String {
    match (kind, code) {
        (1, 4) => "destination unreachable (port unreachable)".into(),
        (1, code) => format!("destination unreachable (code {code})"),
        (2, _) => "packet too big".into(),
        (3, _) => "time exceeded".into(),
        (128, _) => "echo request".into(),
        (129, _) => "echo reply".into(),
        (kind, code) => format!("type {kind} code {code}"),
    }
}

/// The IP layer of a frame: its addresses, upper-layer protocol and bytes, and
/// whether its own header checksum (IPv4 only) holds.
struct IpLayer<'a> {
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    l4: &'a [u8],
    header_valid: bool,
}

fn ipv4_layer(ip: &[u8]) -> Result<IpLayer<'_>> {
    ensure!(ip.len() >= IPV4_HLEN, "IPv4 header cut short");
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    ensure!(
        header_len >= IPV4_HLEN && total_len >= header_len && total_len <= ip.len(),
        "malformed IPv4 header"
    );
    Ok(IpLayer {
        source: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]).into(),
        destination: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]).into(),
        protocol: ip[9],
        l4: &ip[header_len..total_len],
        header_valid: checksum(&[&ip[..header_len]]) == 0,
    })
}

/// The datapath adds no extension headers: a frame it leaves with one is read as
/// its protocol, cut short.
fn ipv6_layer(ip: &[u8]) -> Result<IpLayer<'_>> {
    ensure!(ip.len() >= IPV6_HLEN, "IPv6 header cut short");
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    ensure!(
        ip[0] >> 4 == 6 && IPV6_HLEN + payload_len <= ip.len(),
        "malformed IPv6 header"
    );
    let address = |at: usize| -> IpAddr {
        let octets: [u8; 16] = ip[at..at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(octets).into()
    };
    Ok(IpLayer {
        source: address(8),
        destination: address(24),
        protocol: ip[6],
        l4: &ip[IPV6_HLEN..IPV6_HLEN + payload_len],
        header_valid: true,
    })
}

/// Read an Ethernet/IPv4 or Ethernet/IPv6 frame back; `Err` for anything the
/// datapath should never leave (neither, cut short).
pub fn summarize(frame: &[u8]) -> Result<FrameSummary> {
    ensure!(frame.len() >= ETH_HLEN, "frame of {} bytes", frame.len());
    let ip = &frame[ETH_HLEN..];
    let layer = match u16::from_be_bytes([frame[12], frame[13]]) {
        ETH_P_IP => ipv4_layer(ip)?,
        ETH_P_IPV6 => ipv6_layer(ip)?,
        other => bail!("EtherType {other:#06x}: neither IPv4 nor IPv6"),
    };
    let IpLayer {
        source,
        destination,
        protocol,
        l4,
        header_valid,
    } = layer;
    let mut valid = header_valid;
    let pseudo = pseudo_header(source, destination, protocol, l4.len());
    let (mut sport, mut dport, mut icmp) = (None, None, None);
    let name = match protocol {
        PROTO_TCP if l4.len() >= TCP_HLEN => {
            valid &= checksum(&[&pseudo, l4]) == 0;
            sport = Some(u16::from_be_bytes([l4[0], l4[1]]));
            dport = Some(u16::from_be_bytes([l4[2], l4[3]]));
            "tcp"
        }
        PROTO_UDP if l4.len() >= UDP_HLEN => {
            // IPv4 may leave a UDP checksum out (0); IPv6 may not.
            let carries_checksum = l4[6..8] != [0, 0];
            valid &= if carries_checksum {
                checksum(&[&pseudo, l4]) == 0
            } else {
                source.is_ipv4()
            };
            sport = Some(u16::from_be_bytes([l4[0], l4[1]]));
            dport = Some(u16::from_be_bytes([l4[2], l4[3]]));
            "udp"
        }
        PROTO_ICMP if source.is_ipv4() && l4.len() >= 8 => {
            valid &= checksum(&[l4]) == 0;
            icmp = Some(icmp_name(l4[0], l4[1]));
            "icmp"
        }
        // ICMPv6's checksum covers the pseudo-header too.
        PROTO_ICMPV6 if source.is_ipv6() && l4.len() >= 8 => {
            valid &= checksum(&[&pseudo, l4]) == 0;
            icmp = Some(icmpv6_name(l4[0], l4[1]));
            "icmpv6"
        }
        _ => bail!("protocol {protocol} cut short"),
    };
    let with_port = |address: IpAddr, port: Option<u16>| match port {
        Some(port) => SocketAddr::new(address, port).to_string(),
        None => address.to_string(),
    };
    Ok(FrameSummary {
        eth_destination: mac(&frame[..6]),
        eth_source: mac(&frame[6..12]),
        source: with_port(source, sport),
        destination: with_port(destination, dport),
        protocol: name.into(),
        icmp,
        checksums_valid: valid,
        length: frame.len(),
    })
}

/// The IP destination of a frame (after any NAT), if it has one.
pub fn destination(frame: &[u8]) -> Option<IpAddr> {
    let ip = frame.get(ETH_HLEN..)?;
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        ETH_P_IP => ipv4_layer(ip).ok().map(|layer| layer.destination),
        ETH_P_IPV6 => ipv6_layer(ip).ok().map(|layer| layer.destination),
        _ => None,
    }
}

/// `frame` as hex, 16 bytes a line.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .map(|line| {
            line.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(protocol: u8) -> Flow {
        Flow {
            source: "10.244.0.2:40000".parse().unwrap(),
            destination: "10.96.0.10:80".parse().unwrap(),
            protocol,
        }
    }

    #[test]
    fn a_built_packet_reads_back_with_valid_checksums() {
        for protocol in [PROTO_TCP, PROTO_UDP] {
            let frame = first_packet(&flow(protocol), [0xee; 6], [0x0a; 6]).unwrap();
            let summary = summarize(&frame).unwrap();
            assert!(summary.checksums_valid, "{summary:?}");
            assert_eq!(summary.source, "10.244.0.2:40000");
            assert_eq!(summary.destination, "10.96.0.10:80");
            assert_eq!(summary.eth_destination, "ee:ee:ee:ee:ee:ee");
        }
    }

    #[test]
    fn a_changed_byte_breaks_the_checksum() {
        let mut frame = first_packet(&flow(PROTO_TCP), [0xee; 6], [0x0a; 6]).unwrap();
        frame[ETH_HLEN + 16] ^= 1; // destination address
        assert!(!summarize(&frame).unwrap().checksums_valid);
    }

    #[test]
    fn other_protocols_and_short_frames_are_refused() {
        assert!(first_packet(&flow(1), [0; 6], [0; 6]).is_err());
        assert!(summarize(&[0u8; 20]).is_err());
    }

    const CLIENT6: &str = "[fd00:10:244::2]:40000";
    const SERVER6: &str = "[fd00:10:244::1:3]:8080";

    fn flow6(protocol: u8) -> Flow {
        Flow {
            source: CLIENT6.parse().unwrap(),
            destination: SERVER6.parse().unwrap(),
            protocol,
        }
    }

    /// The same packets built by etherparse: byte for byte, so every checksum over
    /// the IPv6 pseudo-header is an independent implementation's.
    #[test]
    fn ipv6_packets_are_what_another_builder_makes_of_them() {
        let (source, destination) = (flow6(PROTO_TCP).source, flow6(PROTO_TCP).destination);
        let (IpAddr::V6(src), IpAddr::V6(dst)) = (source.ip(), destination.ip()) else {
            unreachable!()
        };
        let ip = || {
            etherparse::PacketBuilder::ethernet2([0x0a; 6], [0xee; 6]).ipv6(
                src.octets(),
                dst.octets(),
                INITIAL_HOPS,
            )
        };
        let syn = ip().tcp(source.port(), destination.port(), 1, 64240).syn();
        let mut expected = Vec::new();
        syn.write(&mut expected, &[]).unwrap();
        assert_eq!(
            first_packet(&flow6(PROTO_TCP), [0xee; 6], [0x0a; 6]).unwrap(),
            expected
        );
        let udp = ip().udp(source.port(), destination.port());
        let mut expected = Vec::new();
        udp.write(&mut expected, UDP_PAYLOAD).unwrap();
        assert_eq!(
            first_packet(&flow6(PROTO_UDP), [0xee; 6], [0x0a; 6]).unwrap(),
            expected
        );
    }

    #[test]
    fn an_ipv6_packet_reads_back_and_a_changed_address_breaks_its_checksum() {
        for protocol in [PROTO_TCP, PROTO_UDP] {
            let mut frame = first_packet(&flow6(protocol), [0xee; 6], [0x0a; 6]).unwrap();
            let summary = summarize(&frame).unwrap();
            assert!(summary.checksums_valid, "{summary:?}");
            assert_eq!(summary.source, CLIENT6);
            assert_eq!(summary.destination, SERVER6);
            assert_eq!(
                destination(&frame),
                Some("fd00:10:244::1:3".parse().unwrap())
            );
            // The last byte of the destination address: covered by the pseudo-header.
            frame[ETH_HLEN + IPV6_HLEN - 1] ^= 1;
            assert!(!summarize(&frame).unwrap().checksums_valid);
        }
    }

    #[test]
    fn an_ipv6_udp_datagram_without_a_checksum_is_invalid() {
        let mut frame = first_packet(&flow6(PROTO_UDP), [0xee; 6], [0x0a; 6]).unwrap();
        frame[ETH_HLEN + IPV6_HLEN + 6..ETH_HLEN + IPV6_HLEN + 8].fill(0);
        assert!(!summarize(&frame).unwrap().checksums_valid);
    }

    #[test]
    fn a_flow_mixing_families_is_refused() {
        let mixed = Flow {
            source: "10.244.0.2:40000".parse().unwrap(),
            ..flow6(PROTO_TCP)
        };
        assert!(first_packet(&mixed, [0; 6], [0; 6]).is_err());
    }
}
