//! The bench node's paths that exist in both IP families, so `cargo xtask bench
//! datapath` measures IPv6 next to IPv4 on the same node: a dual-stack pod to a pod
//! of the node (`ferrite_from_pod`, for IPv6 a tail call into `ferrite_from_pod6`),
//! to a pod of the other node (IPv4: the tunnel key and a redirect to the VXLAN
//! device; IPv6: handed to the stack, whose LWT route encapsulates it), and a pod of
//! the other node's packet arriving over the overlay (`ferrite_from_overlay`, for
//! IPv6 a tail call into `ferrite_from_overlay6`). One list, each path's frame,
//! verdict and counters per family; `tests/tests/bench_paths.rs` checks them.
//!
//! IPv6 delivery decrements the hop limit (IPv4 leaves the TTL), so a test run's
//! repeat over one IPv6 frame ends when it expires: both families are measured in
//! runs of [`FAMILY_REPEAT`] passes from a hop limit of 255.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use anyhow::Result;
use ferrite_common::{pod_mac_for, stat, EndpointInfo, ROUTE_LOCAL, ROUTE_REMOTE};

use crate::{
    bench_node::{Hook, CLIENT, LOCAL_POD, NODE_IP, REMOTE_NODE_IP, REMOTE_POD},
    frames::{self, CLIENT_MAC, GATEWAY_MAC},
    frames6::{self, Ipv6Frame, TCP_ACK},
    testbed::{Testbed, TC_ACT_OK, TC_ACT_REDIRECT, TEST_RUN_IFINDEX},
};

/// Passes per test run: below the 254 an IPv6 frame's hop limit of 255 allows.
pub const FAMILY_REPEAT: u32 = 250;
/// The IPv6 frames' hop limit.
pub const HOP_LIMIT: u8 = 255;

/// The IPv6 pod CIDRs of this node and of the other (`lab::pod_cidr6`'s).
pub const POD_CIDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0);
pub const REMOTE_POD_CIDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0);

/// The IPv6 address of the dual-stack pod whose IPv4 address is `ip` (10.244.n.h
/// -> fd00:10:244:n::h).
pub fn ipv6_of(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, node, host] = ip.octets();
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node.into(), 0, 0, 0, host.into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Self; 2] = [Self::Ipv4, Self::Ipv6];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }
}

/// A path measured in both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyPath {
    PodToPodLocal,
    PodToPodRemote,
    FromOverlay,
}

impl FamilyPath {
    pub const ALL: [Self; 3] = [Self::PodToPodLocal, Self::PodToPodRemote, Self::FromOverlay];

    pub fn label(self) -> &'static str {
        match self {
            Self::PodToPodLocal => "pod -> pod, same node",
            Self::PodToPodRemote => "pod -> pod, other node",
            Self::FromOverlay => "from the overlay -> pod",
        }
    }

    pub fn hook(self) -> Hook {
        match self {
            Self::FromOverlay => Hook::FromOverlay,
            _ => Hook::FromPod,
        }
    }

    /// Whether the datapath does the whole path in both families: to the other node,
    /// IPv6 leaves the program for the stack's route lookup and encapsulation, which
    /// a test run does not see (`bench overlay` measures it end to end).
    pub fn whole_in_both(self) -> bool {
        self != Self::PodToPodRemote
    }

    /// The verdict every pass of the path gives.
    pub fn verdict(self, family: Family) -> u32 {
        match (self, family) {
            (Self::PodToPodRemote, Family::Ipv6) => TC_ACT_OK,
            _ => TC_ACT_REDIRECT,
        }
    }

    /// Counters every pass of the path bumps exactly once.
    pub fn counters(self, family: Family) -> &'static [u32] {
        match (self, family) {
            (Self::PodToPodLocal, _) => &[stat::DELIVERED_LOCAL],
            (Self::PodToPodRemote, Family::Ipv4) => &[stat::SENT_TO_NODE],
            (Self::PodToPodRemote, Family::Ipv6) => &[stat::PASSED_TO_STACK],
            (Self::FromOverlay, _) => &[stat::RECEIVED_FROM_NODE],
        }
    }

    /// Its flow's ends, as IPv4 addresses (the IPv6 frame's are their [`ipv6_of`]).
    pub fn ends(self) -> (SocketAddrV4, SocketAddrV4) {
        let local = SocketAddrV4::new(LOCAL_POD, 8080);
        match self {
            Self::PodToPodLocal => (SocketAddrV4::new(CLIENT, 41000), local),
            Self::PodToPodRemote => (
                SocketAddrV4::new(CLIENT, 41001),
                SocketAddrV4::new(REMOTE_POD, 8080),
            ),
            Self::FromOverlay => (SocketAddrV4::new(REMOTE_POD, 41006), local),
        }
    }

    /// The frame measured: a TCP ACK of the flow, with the MACs and ports of
    /// `frames::tcp_ack` in both families.
    pub fn frame(self, family: Family) -> Vec<u8> {
        let (from, to) = self.ends();
        match family {
            Family::Ipv4 => frames::tcp_ack(from, to, b""),
            Family::Ipv6 => self.frame6().build(),
        }
    }

    /// The IPv6 frame, to build changed variants of (hop limit, MACs).
    pub fn frame6(self) -> Ipv6Frame {
        let (from, to) = self.ends();
        let [from, to] = [from, to].map(|a| SocketAddrV6::new(ipv6_of(*a.ip()), a.port(), 0, 0));
        Ipv6Frame {
            eth_dst: GATEWAY_MAC,
            eth_src: CLIENT_MAC,
            source: *from.ip(),
            destination: *to.ip(),
            hop_limit: HOP_LIMIT,
            extensions: vec![],
            proto: ferrite_common::PROTO_TCP,
            upper: frames6::tcp(from, to, TCP_ACK, 2000, 1, b""),
        }
    }
}

/// The IPv6 half of the bench node, as the agent writes it for dual-stack pods and
/// nodes: the pods' `ferrite_endpnt6` entries (their MACs their IPv4 addresses'),
/// both IPv6 pod CIDRs in `ferrite_routes6`, and `ferrite_progs` filled.
pub fn add_ipv6(bed: &mut Testbed) -> Result<()> {
    for pod in [CLIENT, LOCAL_POD] {
        bed.add_endpoint6(
            ipv6_of(pod),
            EndpointInfo {
                ifindex: TEST_RUN_IFINDEX,
                pod_mac: pod_mac_for(pod),
                host_mac: GATEWAY_MAC,
                flags: 0,
            },
        )?;
    }
    bed.add_route6(POD_CIDR6, 64, NODE_IP, ROUTE_LOCAL)?;
    bed.add_route6(REMOTE_POD_CIDR6, 64, REMOTE_NODE_IP, ROUTE_REMOTE)?;
    bed.fill_tail_calls()
}
