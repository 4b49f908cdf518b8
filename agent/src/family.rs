//! What code serving both IP families needs to know of each: one trait,
//! implemented for [`Ipv4Addr`] and [`Ipv6Addr`], so that netlink messages and the
//! limits on node ranges are written once and typed per family.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An IP family, as its address type.
pub trait Family: Copy + Ord + fmt::Debug + fmt::Display + Into<IpAddr> + 'static {
    /// Its CIDRs.
    type Net: Copy + Ord + fmt::Debug + fmt::Display + Default + Into<IpNet>;
    /// "IPv4" or "IPv6", for messages.
    const NAME: &'static str;
    /// The address unspecified (`0.0.0.0`, `::`).
    const UNSPECIFIED: Self;

    /// `ip` if it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    /// The CIDR `ip/prefix_len`, if the prefix fits the family.
    fn net(ip: Self, prefix_len: u8) -> Option<Self::Net>;
}

impl Family for Ipv4Addr {
    type Net = Ipv4Net;
    const NAME: &'static str = "IPv4";
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;

    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }

    fn net(ip: Self, prefix_len: u8) -> Option<Self::Net> {
        Ipv4Net::new(ip, prefix_len).ok()
    }
}

impl Family for Ipv6Addr {
    type Net = Ipv6Net;
    const NAME: &'static str = "IPv6";
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;

    fn from_ip(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        }
    }

    fn net(ip: Self, prefix_len: u8) -> Option<Self::Net> {
        Ipv6Net::new(ip, prefix_len).ok()
    }
}

/// Whether CIDR `net` holds address `ip`.
pub fn net_holds<A: Family>(net: A::Net, ip: A) -> bool {
    net.into().contains(&ip.into())
}

/// Whether CIDR `outer` holds all of CIDR `inner`.
pub fn net_holds_net<A: Family>(outer: A::Net, inner: A::Net) -> bool {
    outer.into().contains(&inner.into())
}

/// Whether CIDRs `a` and `b` share an address (one holds the other).
pub fn nets_overlap<A: Family>(a: A::Net, b: A::Net) -> bool {
    net_holds_net::<A>(a, b) || net_holds_net::<A>(b, a)
}
