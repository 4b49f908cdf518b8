//! Crafting Ethernet/IPv6 frames byte by byte, extension headers included (what
//! `frames` does for IPv4 with etherparse, which builds no extension header chain).
use std::net::{Ipv6Addr, SocketAddrV6};

pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DESTINATION_OPTIONS: u8 = 60;
pub const NEXT_NONE: u8 = 59;
const ETH_P_IPV6: u16 = 0x86dd;

/// An extension header: its type and its bytes (the first, its next header, is
/// filled in by [`Ipv6Frame::build`]).
#[derive(Clone, Debug)]
pub struct Extension {
    pub kind: u8,
    pub bytes: Vec<u8>,
}

/// A hop-by-hop, routing or destination options header `units` x 8 bytes beyond
/// its first 8, its options one PadN.
pub fn options_header(kind: u8, units: u8) -> Extension {
    let len = (units as usize + 1) * 8;
    let mut bytes = vec![0u8; len];
    bytes[1] = units;
    // PadN over the rest: type 1, then the length of its zeroes.
    bytes[2] = 1;
    bytes[3] = (len - 4) as u8;
    Extension { kind, bytes }
}

/// A fragment header: `offset` in 8-byte units, `more` fragments to come, `id`.
pub fn fragment_header(offset: u16, more: bool, id: u32) -> Extension {
    let mut bytes = vec![0u8; 8];
    bytes[2..4].copy_from_slice(&((offset << 3) | more as u16).to_be_bytes());
    bytes[4..8].copy_from_slice(&id.to_be_bytes());
    Extension {
        kind: NEXT_FRAGMENT,
        bytes,
    }
}

/// An Ethernet/IPv6 frame to build.
#[derive(Clone, Debug)]
pub struct Ipv6Frame {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub source: Ipv6Addr,
    pub destination: Ipv6Addr,
    pub hop_limit: u8,
    pub extensions: Vec<Extension>,
    /// The upper-layer protocol and its bytes (header and payload).
    pub proto: u8,
    pub upper: Vec<u8>,
}

impl Ipv6Frame {
    /// The frame, its payload length counting every extension header and the
    /// upper layer.
    pub fn build(&self) -> Vec<u8> {
        let kinds: Vec<u8> = self
            .extensions
            .iter()
            .map(|e| e.kind)
            .chain([self.proto])
            .collect();
        let payload_len: usize =
            self.extensions.iter().map(|e| e.bytes.len()).sum::<usize>() + self.upper.len();
        let mut frame = Vec::new();
        frame.extend(self.eth_dst);
        frame.extend(self.eth_src);
        frame.extend(ETH_P_IPV6.to_be_bytes());
        frame.extend([0x60, 0, 0, 0]);
        frame.extend((payload_len as u16).to_be_bytes());
        frame.extend([kinds[0], self.hop_limit]);
        frame.extend(self.source.octets());
        frame.extend(self.destination.octets());
        for (extension, next) in self.extensions.iter().zip(&kinds[1..]) {
            frame.push(*next);
            frame.extend(&extension.bytes[1..]);
        }
        frame.extend(&self.upper);
        frame
    }
}

/// The sum RFC 8200 section 8.1 gives an upper-layer checksum over: the pseudo-header
/// (`upper`'s length and `proto`) and `upper`, with its checksum field zero.
fn upper_checksum(source: Ipv6Addr, destination: Ipv6Addr, proto: u8, upper: &[u8]) -> u16 {
    let mut bytes = Vec::new();
    bytes.extend(source.octets());
    bytes.extend(destination.octets());
    bytes.extend((upper.len() as u32).to_be_bytes());
    bytes.extend([0, 0, 0, proto]);
    bytes.extend(upper);
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP header and `payload` from `sport` to `dport`, its checksum over the
/// addresses `source` and `destination`.
pub fn udp(
    source: Ipv6Addr,
    sport: u16,
    destination: Ipv6Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut upper = Vec::new();
    upper.extend(sport.to_be_bytes());
    upper.extend(dport.to_be_bytes());
    upper.extend(((8 + payload.len()) as u16).to_be_bytes());
    upper.extend([0, 0]);
    upper.extend(payload);
    let checksum = match upper_checksum(source, destination, 17, &upper) {
        0 => 0xffff,
        sum => sum,
    };
    upper[6..8].copy_from_slice(&checksum.to_be_bytes());
    upper
}

/// An ICMPv6 message of `icmp_type` (code 0) with `body`, its checksum set.
pub fn icmpv6(source: Ipv6Addr, destination: Ipv6Addr, icmp_type: u8, body: &[u8]) -> Vec<u8> {
    let mut upper = vec![icmp_type, 0, 0, 0];
    upper.extend(body);
    let checksum = upper_checksum(source, destination, 58, &upper);
    upper[2..4].copy_from_slice(&checksum.to_be_bytes());
    upper
}

pub const TCP_ACK: u8 = 0x10;

/// A TCP header (20 bytes, no options) from `from` to `to` with `flags`, sequence
/// `seq`, acknowledging `ack`, and `payload`, its checksum over both addresses.
pub fn tcp(
    from: SocketAddrV6,
    to: SocketAddrV6,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut upper = Vec::new();
    upper.extend(from.port().to_be_bytes());
    upper.extend(to.port().to_be_bytes());
    upper.extend(seq.to_be_bytes());
    upper.extend(ack.to_be_bytes());
    // Data offset 5 words; the window `frames` gives IPv4's.
    upper.extend([5 << 4, flags]);
    upper.extend(64240u16.to_be_bytes());
    upper.extend([0, 0, 0, 0]);
    upper.extend(payload);
    let checksum = upper_checksum(*from.ip(), *to.ip(), 6, &upper);
    upper[16..18].copy_from_slice(&checksum.to_be_bytes());
    upper
}
