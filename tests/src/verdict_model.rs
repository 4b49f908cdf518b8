//! A reference model of the datapath's documented rules for what a frame gets,
//! written from the rules (`datapath-ebpf/src/headers.rs` for parsing, `from_pod.rs`
//! for a pod's frames), independently of the datapath's code: the packet tests and
//! the fuzz test compare the programs' verdicts, frames and counters with it.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use ferrite_common::{stat, PROTO_TCP, PROTO_UDP};

use crate::testbed::{RunResult, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

/// What a frame should get, by the documented rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Expected {
    /// Passed on unchanged (counted under this `stat`, if any).
    Pass(Option<u32>),
    /// Dropped and counted.
    Drop(u32),
    /// Delivered to a local pod (TC redirect), translated when it was a Service flow.
    Deliver { translated: bool },
    /// XDP: passed on translated (DNAT to a backend).
    Translated,
    /// Answered with ICMP "fragmentation needed" sent back out (TC redirect).
    FragNeeded,
    /// A new flow to a Service without backends, answered with ICMP port
    /// unreachable sent back into the pod (TC redirect).
    Rejected,
}

/// The counters `NodeModel::from_pod` predicts: after each frame, every one of them
/// has moved by exactly as much as the model said (most by nothing).
pub const FROM_POD_COUNTERS: [u32; 11] = [
    stat::DROP_TTL_EXCEEDED,
    stat::PASSED_ARP,
    stat::DROP_UNSUPPORTED_L3,
    stat::DROP_MALFORMED,
    stat::DROP_SPOOFED,
    stat::DROP_NO_BACKEND,
    stat::SERVICE_REJECTED,
    stat::FRAGMENT_ROUTED,
    stat::FRAGMENT_TRACKED,
    stat::PASSED_TO_STACK,
    stat::DROP_INTERNAL,
];

/// The IPv4 header and ports of a frame as the rules read them.
pub struct Parsed {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub proto: u8,
    /// A fragment after the first (no L4 header in it).
    pub later_fragment: bool,
    /// A later fragment that got its ports from its first fragment.
    pub tracked: bool,
    /// (source port, destination port) when the rules give the frame ports.
    pub ports: Option<(u16, u16)>,
    /// What a router forwarding it would let expire (TTL 0 or 1).
    pub ttl_expires: bool,
    dont_fragment: bool,
    header_len: usize,
    total_len: usize,
}

impl Parsed {
    /// DF set, no IP options, and larger than pods take (`pod_mtu`).
    pub fn too_big_with_df(&self, pod_mtu: usize) -> bool {
        self.dont_fragment && self.header_len == 20 && self.total_len > pod_mtu
    }
}

/// The ports first fragments recorded, by (source, destination, identification,
/// protocol): `ferrite_frags` of one program's test bed.
pub type Fragments = HashMap<([u8; 4], [u8; 4], [u8; 2], u8), (u16, u16)>;

/// The parsing rules: `Err` is the verdict of a frame that never reaches the logic.
/// A first fragment records its ports in `fragments`; a later one takes them there.
pub fn parse(frame: &[u8], fragments: &mut Fragments) -> Result<Parsed, Expected> {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {}
        0x0806 => return Err(Expected::Pass(Some(stat::PASSED_ARP))),
        _ => return Err(Expected::Drop(stat::DROP_UNSUPPORTED_L3)),
    }
    if frame.len() < 14 + 20 {
        return Err(Expected::Drop(stat::DROP_MALFORMED));
    }
    let ip = &frame[14..];
    let (version, ihl) = (ip[0] >> 4, (ip[0] & 0x0f) as usize * 4);
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if version != 4 || ihl < 20 || total < ihl || 14 + total > frame.len() {
        return Err(Expected::Drop(stat::DROP_MALFORMED));
    }
    let flags = u16::from_be_bytes([ip[6], ip[7]]);
    let (fragment, later_fragment) = (flags & 0x3fff != 0, flags & 0x1fff != 0);
    let proto = ip[9];
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let mut parsed = Parsed {
        saddr: addr(12),
        daddr: addr(16),
        proto,
        later_fragment,
        tracked: false,
        ports: None,
        ttl_expires: ip[8] <= 1,
        dont_fragment: flags & 0x4000 != 0,
        header_len: ihl,
        total_len: total,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(parsed);
    }
    let datagram = (
        parsed.saddr.octets(),
        parsed.daddr.octets(),
        [ip[4], ip[5]],
        proto,
    );
    if later_fragment {
        parsed.ports = fragments.get(&datagram).copied();
        parsed.tracked = parsed.ports.is_some();
        return Ok(parsed);
    }
    let l4 = if proto == PROTO_TCP { 20 } else { 8 };
    if ihl + l4 > total {
        return Err(Expected::Drop(stat::DROP_MALFORMED));
    }
    let p = &ip[ihl..];
    let ports = (
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    );
    parsed.ports = Some(ports);
    if fragment {
        fragments.insert(datagram, ports);
    }
    Ok(parsed)
}

/// Where a frame goes: its destination address and, unless it is a later fragment (no
/// L4 header), its destination port.
pub fn destination(frame: &[u8]) -> Option<(Ipv4Addr, Option<u16>)> {
    let h = parse(frame, &mut Fragments::new()).ok()?;
    if h.later_fragment {
        return Some((h.daddr, None));
    }
    Some((h.daddr, Some(h.ports?.1)))
}

/// An ICMP "destination unreachable" with `code` answering `frame`: back to its
/// sender, quoting its first 28 IP bytes, with `mtu` as next-hop MTU (checksums are
/// checked byte for byte in external_packets and datapath_packets).
pub fn is_unreachable_for(out: &[u8], frame: &[u8], code: u8, mtu: usize) -> bool {
    out.len() == 14 + 56
        && out[..6] == frame[6..12]
        && out[6..12] == frame[..6]
        && is_unreachable_ip_for(out, frame, code, mtu)
}

/// The same, MACs aside (an answer handed to the node's stack on `lo` has none).
pub fn is_unreachable_ip_for(out: &[u8], frame: &[u8], code: u8, mtu: usize) -> bool {
    out.len() == 14 + 56
        && out[14 + 9] == 1
        && out[14 + 12..14 + 16] == frame[14 + 16..14 + 20]
        && out[14 + 16..14 + 20] == frame[14 + 12..14 + 16]
        && out[34..36] == [3, code]
        && u16::from_be_bytes([out[40], out[41]]) as usize == mtu
        && out[42..] == frame[14..42]
}

/// A Service frontend of the modelled node.
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub backends: Vec<SocketAddrV4>,
}

/// What the model knows of a node: its pods (all on the veth BPF_PROG_TEST_RUN runs
/// on) and its frontends.
pub struct NodeModel {
    pub pods: Vec<Ipv4Addr>,
    pub frontends: Vec<Frontend>,
}

impl NodeModel {
    pub fn is_pod(&self, ip: Ipv4Addr) -> bool {
        self.pods.contains(&ip)
    }

    /// Whether `h` is addressed to a frontend (at `dport`), with backends (`true`) or
    /// without.
    pub fn service(&self, h: &Parsed, dport: u16) -> Option<bool> {
        self.frontends
            .iter()
            .find(|f| f.address == h.daddr && f.port == dport && f.proto == h.proto)
            .map(|f| !f.backends.is_empty())
    }

    /// A backend of any frontend (`port`: unless unknown, as in a later fragment).
    fn is_backend(&self, ip: Ipv4Addr, port: Option<u16>) -> bool {
        self.frontends.iter().any(|f| {
            f.backends
                .iter()
                .any(|b| *b.ip() == ip && port.is_none_or(|p| p == b.port()))
        })
    }

    /// `ferrite_from_pod` on a pod's veth: the verdict and the counters it bumps (of
    /// `FROM_POD_COUNTERS`).
    pub fn from_pod(&self, frame: &[u8], fragments: &mut Fragments) -> (Expected, Vec<u32>) {
        let h = match parse(frame, fragments) {
            Ok(h) => h,
            Err(expected @ Expected::Drop(reason)) => return (expected, vec![reason]),
            Err(expected @ Expected::Pass(Some(counter))) => return (expected, vec![counter]),
            Err(expected) => return (expected, vec![]),
        };
        let mut counters = Vec::new();
        if h.tracked {
            counters.push(stat::FRAGMENT_TRACKED);
        }
        if !self.is_pod(h.saddr) {
            counters.push(stat::DROP_SPOOFED);
            return (Expected::Drop(stat::DROP_SPOOFED), counters);
        }
        // What the datapath hands to a pod itself, a router would let expire at TTL 0
        // or 1 (translated first, if it was a Service flow).
        let deliver = |translated: bool, mut counters: Vec<u32>| {
            if h.ttl_expires {
                counters.push(stat::DROP_TTL_EXCEEDED);
                (Expected::Drop(stat::DROP_TTL_EXCEEDED), counters)
            } else {
                (Expected::Deliver { translated }, counters)
            }
        };
        if let Some((_, dport)) = h.ports {
            // Pods reach every frontend in the maps, a NodePort on this node's IP too.
            match self.service(&h, dport) {
                Some(true) => return deliver(true, counters),
                // A later fragment has no L4 header to quote: dropped, its first one
                // was answered.
                Some(false) if h.later_fragment => {
                    counters.push(stat::DROP_NO_BACKEND);
                    return (Expected::Drop(stat::DROP_NO_BACKEND), counters);
                }
                Some(false) => {
                    counters.push(stat::SERVICE_REJECTED);
                    return (Expected::Rejected, counters);
                }
                None => {}
            }
        }
        if h.later_fragment && h.ports.is_none() && (h.proto == PROTO_TCP || h.proto == PROTO_UDP) {
            // No ports: routed by destination only, never translated.
            counters.push(stat::FRAGMENT_ROUTED);
        }
        if self.is_pod(h.daddr) {
            deliver(false, counters)
        } else {
            counters.push(stat::PASSED_TO_STACK);
            (Expected::Pass(Some(stat::PASSED_TO_STACK)), counters)
        }
    }

    /// Whether `out`, what `ferrite_from_pod` made of `frame`, is what the model
    /// `expected`: passed and dropped frames unchanged, deliveries to a backend when
    /// translated and to the same destination when not, refusals answered with ICMP.
    pub fn from_pod_output_fits(&self, expected: Expected, frame: &[u8], out: &RunResult) -> bool {
        match expected {
            Expected::Pass(_) => out.verdict == TC_ACT_OK && out.frame == frame,
            // Dropped at delivery, after any translation.
            Expected::Drop(stat::DROP_TTL_EXCEEDED) => {
                out.verdict == TC_ACT_SHOT && out.frame.len() == frame.len()
            }
            Expected::Drop(_) => out.verdict == TC_ACT_SHOT && out.frame == frame,
            Expected::Deliver { translated } => {
                let to_backend =
                    destination(&out.frame).is_some_and(|(ip, port)| self.is_backend(ip, port));
                // Untranslated: same destination (a backend's reply may get its
                // source turned back into the Service's, by conntrack).
                out.verdict == TC_ACT_REDIRECT
                    && out.frame.len() == frame.len()
                    && (!translated || to_backend)
                    && (translated || out.frame[30..34] == frame[30..34])
            }
            Expected::Rejected => {
                out.verdict == TC_ACT_REDIRECT && is_unreachable_for(&out.frame, frame, 3, 0)
            }
            Expected::Translated | Expected::FragNeeded => false,
        }
    }
}
