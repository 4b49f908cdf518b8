//! Crafting Ethernet/IPv4/TCP/UDP frames and checking what the datapath made of them,
//! with checksums recomputed independently (etherparse).
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Context, Result};
use etherparse::{
    EtherType, Ethernet2Header, Ipv4Header, PacketBuilder, SlicedPacket, TcpHeader, TransportSlice,
    UdpHeader,
};

pub const CLIENT_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 2];
pub use ferrite_common::HOST_VETH_MAC as GATEWAY_MAC;

pub fn tcp_syn(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(from.ip().octets(), to.ip().octets(), 64)
        .tcp(from.port(), to.port(), 1000, 64240)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("write frame");
    frame
}

pub fn tcp_ack(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(from.ip().octets(), to.ip().octets(), 64)
        .tcp(from.port(), to.port(), 2000, 64240)
        .ack(1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("write frame");
    frame
}

/// A SYN-ACK: the answer to a SYN that opens a connection.
pub fn tcp_syn_ack(from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(from.ip().octets(), to.ip().octets(), 64)
        .tcp(from.port(), to.port(), 5000, 64240)
        .syn()
        .ack(1001);
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).expect("write frame");
    frame
}

/// A RST (with ACK): the sender aborts the connection.
pub fn tcp_rst(from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(from.ip().octets(), to.ip().octets(), 64)
        .tcp(from.port(), to.port(), 1001, 0)
        .ack(5001)
        .rst();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).expect("write frame");
    frame
}

/// `frame` with its IPv4 TTL set to `ttl` (header checksum fixed).
pub fn with_ttl(frame: &[u8], ttl: u8) -> Result<Vec<u8>> {
    let (mut ip, rest) = Ipv4Header::from_slice(&frame[14..])?;
    ip.time_to_live = ttl;
    ip.header_checksum = ip.calc_header_checksum();
    Ok([&frame[..14], &ip.to_bytes()[..], rest].concat())
}

/// A FIN (with ACK): the sender closes its side.
pub fn tcp_fin(from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(from.ip().octets(), to.ip().octets(), 64)
        .tcp(from.port(), to.port(), 3000, 64240)
        .ack(1)
        .fin();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).expect("write frame");
    frame
}

pub fn udp(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(from.ip().octets(), to.ip().octets(), 64)
        .udp(from.port(), to.port());
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("write frame");
    frame
}

/// The same UDP datagram with checksum 0 ("no checksum", legal over IPv4).
pub fn udp_without_checksum(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut frame = udp(from, to, payload);
    frame[14 + 20 + 6] = 0;
    frame[14 + 20 + 7] = 0;
    frame
}

/// An ICMP echo request (`request`) or reply from `from` to `to`, with its identifier
/// and sequence number and a few bytes of payload.
pub fn icmp_echo(from: Ipv4Addr, to: Ipv4Addr, request: bool, id: u16, seq: u16) -> Vec<u8> {
    let builder =
        PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC).ipv4(from.octets(), to.octets(), 64);
    let builder = if request {
        builder.icmpv4_echo_request(id, seq)
    } else {
        builder.icmpv4_echo_reply(id, seq)
    };
    let payload = b"ping";
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("write frame");
    frame
}

/// The ICMP "destination unreachable" a router (or kube-proxy's REJECT) sends back for
/// `frame`: from the address it was sent to, MACs swapped, quoting its IP header and
/// first 8 payload bytes. `next_hop_mtu` is for "fragmentation needed" (code 4); the
/// others (code 3, port unreachable) carry 0 there.
pub fn icmp_unreachable_for(frame: &[u8], code: u8, next_hop_mtu: u16) -> Result<Vec<u8>> {
    use etherparse::icmpv4::DestUnreachableHeader;
    let unreachable = match code {
        4 => DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
        3 => DestUnreachableHeader::Port,
        other => bail!("no builder for ICMP unreachable code {other}"),
    };
    icmp_error_for(
        frame,
        etherparse::Icmpv4Type::DestinationUnreachable(unreachable),
        28,
    )
}

/// The ICMP error `kind` the destination of `frame` sends back for it: from the
/// address it was sent to, MACs swapped, quoting the first `quoted` bytes of its IP
/// packet (28, RFC 792's minimum, or more: Linux quotes up to 576 bytes in all).
pub fn icmp_error_for(
    frame: &[u8],
    kind: etherparse::Icmpv4Type,
    quoted: usize,
) -> Result<Vec<u8>> {
    use etherparse::{IpHeaders, IpNumber};
    let (original, _) = Ipv4Header::from_slice(&frame[14..])?;
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, original.destination, original.source)?;
    ip.dont_fragment = false;
    let (mut to, mut from) = ([0u8; 6], [0u8; 6]);
    to.copy_from_slice(&frame[6..12]);
    from.copy_from_slice(&frame[..6]);
    let builder = PacketBuilder::ethernet2(from, to)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(kind);
    let quoted = &frame[14..14 + quoted];
    let mut out = Vec::new();
    builder.write(&mut out, quoted)?;
    Ok(out)
}

/// What a frame says, after checking that every checksum in it is valid.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub protocol: u8,
    pub payload: Vec<u8>,
    /// For UDP: the checksum field (0 = none).
    pub udp_checksum: Option<u16>,
}

pub fn decode_checked(frame: &[u8]) -> Result<Decoded> {
    let (eth, rest) = Ethernet2Header::from_slice(frame).context("ethernet")?;
    ensure!(eth.ether_type == EtherType::IPV4, "not IPv4");
    let (ip, _) = Ipv4Header::from_slice(rest).context("ipv4")?;
    ensure!(
        ip.header_checksum == ip.calc_header_checksum(),
        "bad IPv4 header checksum"
    );
    let sliced = SlicedPacket::from_ethernet(frame).context("slicing")?;
    let (src, dst) = (Ipv4Addr::from(ip.source), Ipv4Addr::from(ip.destination));
    let decoded = match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let header: TcpHeader = tcp.to_header();
            let payload = tcp.payload();
            let expected = header.calc_checksum_ipv4(&ip, payload)?;
            ensure!(
                header.checksum == expected,
                "bad TCP checksum {:#06x}, expected {expected:#06x}",
                header.checksum
            );
            Decoded {
                eth_src: eth.source,
                eth_dst: eth.destination,
                source: SocketAddrV4::new(src, header.source_port),
                destination: SocketAddrV4::new(dst, header.destination_port),
                protocol: 6,
                payload: payload.to_vec(),
                udp_checksum: None,
            }
        }
        Some(TransportSlice::Udp(udp)) => {
            let header: UdpHeader = udp.to_header();
            let payload = udp.payload();
            if header.checksum != 0 {
                let expected = header.calc_checksum_ipv4(&ip, payload)?;
                ensure!(
                    header.checksum == expected,
                    "bad UDP checksum {:#06x}, expected {expected:#06x}",
                    header.checksum
                );
            }
            Decoded {
                eth_src: eth.source,
                eth_dst: eth.destination,
                source: SocketAddrV4::new(src, header.source_port),
                destination: SocketAddrV4::new(dst, header.destination_port),
                protocol: 17,
                payload: payload.to_vec(),
                udp_checksum: Some(header.checksum),
            }
        }
        _ => bail!("no TCP/UDP header"),
    };
    Ok(decoded)
}

/// Split an IPv4 frame (IHL 5) in two fragments, the first carrying `first_len` bytes
/// of the IP payload (a multiple of 8), with identification `id` and checksums set.
pub fn fragment(frame: &[u8], first_len: usize, id: u16) -> Result<(Vec<u8>, Vec<u8>)> {
    ensure!(
        first_len.is_multiple_of(8),
        "fragment payloads are multiples of 8 bytes"
    );
    let (mut ip, payload) = Ipv4Header::from_slice(&frame[14..])?;
    ensure!(
        ip.options.is_empty() && first_len < payload.len(),
        "cannot split"
    );
    ip.identification = id;
    ip.dont_fragment = false;
    let piece = |ip: &mut Ipv4Header, bytes: &[u8], offset: usize, more: bool| -> Result<Vec<u8>> {
        ip.more_fragments = more;
        ip.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16)?;
        ip.total_len = (Ipv4Header::MIN_LEN + bytes.len()) as u16;
        ip.header_checksum = ip.calc_header_checksum();
        Ok([&frame[..14], &ip.to_bytes()[..], bytes].concat())
    };
    let first = piece(&mut ip, &payload[..first_len], 0, true)?;
    let second = piece(&mut ip, &payload[first_len..], first_len, false)?;
    Ok((first, second))
}

/// The frame two fragments (first, then last) of one datagram make whole again.
pub fn reassemble(first: &[u8], last: &[u8]) -> Result<Vec<u8>> {
    let (mut ip, head) = Ipv4Header::from_slice(&first[14..])?;
    let (last_ip, tail) = Ipv4Header::from_slice(&last[14..])?;
    ensure!(
        (ip.source, ip.destination, ip.identification)
            == (last_ip.source, last_ip.destination, last_ip.identification),
        "fragments of different datagrams"
    );
    ensure!(
        last_ip.fragment_offset.byte_offset() as usize == head.len(),
        "gap"
    );
    for (name, header) in [("first", &ip), ("last", &last_ip)] {
        ensure!(
            header.header_checksum == header.calc_header_checksum(),
            "bad IPv4 header checksum in the {name} fragment"
        );
    }
    ip.more_fragments = false;
    ip.total_len = (Ipv4Header::MIN_LEN + head.len() + tail.len()) as u16;
    ip.header_checksum = ip.calc_header_checksum();
    Ok([&first[..14], &ip.to_bytes()[..], head, tail].concat())
}
