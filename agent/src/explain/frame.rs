//! The frames `ferrite explain` sends through the datapath (as a sender on each side
//! would send them) and what it reads back out of them, every checksum checked.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Result};
use ferrite_common::{PROTO_TCP, PROTO_UDP};
use serde::Serialize;

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const PROTO_ICMP: u8 = 1;
const IP_DF: u16 = 0x4000;
const TCP_SYN: u8 = 0x02;
/// What the UDP datagram carries (a sender's payload; its content does not matter).
const UDP_PAYLOAD: &[u8] = b"ferrite explain\n";

/// One packet's addresses: from `source` to `destination` over `protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
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

fn pseudo_header(source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, len: usize) -> [u8; 12] {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&source.octets());
    pseudo[4..8].copy_from_slice(&destination.octets());
    pseudo[9] = protocol;
    pseudo[10..].copy_from_slice(&(len as u16).to_be_bytes());
    pseudo
}

/// The first packet of `flow` as its sender puts it on the wire: Ethernet from
/// `src_mac` to `dst_mac`, IPv4 (DF set, TTL 64), a TCP SYN or a small UDP datagram,
/// every checksum complete.
pub fn first_packet(flow: &Flow, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Result<Vec<u8>> {
    let l4 = match flow.protocol {
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
    let (source, destination) = (*flow.source.ip(), *flow.destination.ip());
    let pseudo = pseudo_header(source, destination, flow.protocol, l4.len());
    let mut l4 = l4;
    let check = checksum(&[&pseudo, &l4]);
    let check_offset = if flow.protocol == PROTO_TCP { 16 } else { 6 };
    // UDP sends a computed 0 as 0xffff (0 means "no checksum").
    let check = if flow.protocol == PROTO_UDP && check == 0 {
        0xffff
    } else {
        check
    };
    l4[check_offset..check_offset + 2].copy_from_slice(&check.to_be_bytes());

    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IPV4_HLEN + l4.len()) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    ip[8] = 64;
    ip[9] = flow.protocol;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&destination.octets());
    let ip_check = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());

    let mut frame = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + l4.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    Ok(frame)
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
    /// Whether the IPv4 header checksum and the TCP/UDP/ICMP checksum are valid.
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

/// Read an Ethernet/IPv4 frame back; `Err` for anything the datapath should never
/// leave (not IPv4, cut short).
pub fn summarize(frame: &[u8]) -> Result<FrameSummary> {
    ensure!(
        frame.len() >= ETH_HLEN + IPV4_HLEN,
        "frame of {} bytes",
        frame.len()
    );
    ensure!(
        u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IP,
        "not IPv4"
    );
    let ip = &frame[ETH_HLEN..];
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    ensure!(
        header_len >= IPV4_HLEN && total_len >= header_len && total_len <= ip.len(),
        "malformed IPv4 header"
    );
    let protocol = ip[9];
    let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let destination = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let mut valid = checksum(&[&ip[..header_len]]) == 0;
    let l4 = &ip[header_len..total_len];
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
            let carries_checksum = l4[6..8] != [0, 0];
            valid &= !carries_checksum || checksum(&[&pseudo, l4]) == 0;
            sport = Some(u16::from_be_bytes([l4[0], l4[1]]));
            dport = Some(u16::from_be_bytes([l4[2], l4[3]]));
            "udp"
        }
        PROTO_ICMP if l4.len() >= 8 => {
            valid &= checksum(&[l4]) == 0;
            icmp = Some(icmp_name(l4[0], l4[1]));
            "icmp"
        }
        _ => bail!("protocol {protocol} cut short"),
    };
    let with_port = |address: Ipv4Addr, port: Option<u16>| match port {
        Some(port) => format!("{address}:{port}"),
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

/// The IPv4 destination of a frame (after any NAT), if it has one.
pub fn destination(frame: &[u8]) -> Option<Ipv4Addr> {
    let ip = frame.get(ETH_HLEN..ETH_HLEN + IPV4_HLEN)?;
    Some(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]))
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
}
