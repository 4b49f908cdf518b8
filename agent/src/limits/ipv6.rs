//! The IPv6 half of a dual-stack node's limits: its pod CIDRs and InternalIPs are
//! held to the rules the IPv4 ones are, with IPv6's special ranges. The datapath does
//! not carry IPv6 yet; the model keeps what it accepts for the CNI plugin's IPAM.
use std::net::Ipv6Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Limits, NodeRanges};

/// The widest IPv6 pod CIDR a node may claim: a /64, kube-controller-manager's
/// default `--node-cidr-mask-size-ipv6` (wider gives one node more than a subnet).
pub const MIN_POD_CIDR6_PREFIX: u8 = 64;
/// The narrowest: a /120 holds 254 pods, as a /24 does for IPv4 (narrower ranges run
/// out before a node's pods do).
pub const MAX_POD_CIDR6_PREFIX: u8 = 120;

/// IPv6 ranges that are never a pod's or a node's.
const SPECIAL6: [(&str, &str); 5] = [
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("fe80::/10", "link-local (the pods' IPv6 gateway)"),
    ("ff00::/8", "multicast"),
];

fn special_ranges() -> impl Iterator<Item = (Ipv6Net, &'static str)> {
    SPECIAL6
        .iter()
        .map(|(range, what)| (range.parse().expect("constant"), *what))
}

/// What is special about an IPv6 address, if anything.
pub fn special6(ip: Ipv6Addr) -> Option<&'static str> {
    special_ranges().find_map(|(range, what)| range.contains(&ip).then_some(what))
}

/// The special IPv6 range a CIDR overlaps, if any.
fn special_net6(net: &Ipv6Net) -> Option<&'static str> {
    special_ranges()
        .find_map(|(range, what)| (range.contains(net) || net.contains(&range)).then_some(what))
}

/// `--cluster-cidr`: the cluster's pod CIDR, one per family (comma-separated, as
/// kube-controller-manager takes it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl ClusterCidrs {
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut cidrs = Self::default();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net: IpNet = part
                .parse()
                .map_err(|_| format!("{part:?} is not a CIDR"))?;
            let twice = match net.trunc() {
                IpNet::V4(v4) => cidrs.v4.replace(v4).is_some(),
                IpNet::V6(v6) => cidrs.v6.replace(v6).is_some(),
            };
            if twice {
                return Err(format!("{value:?}: at most one CIDR per IP family"));
            }
        }
        if cidrs == Self::default() {
            return Err("expected CIDR[,CIDR], one per IP family".into());
        }
        Ok(cidrs)
    }
}

impl Limits {
    /// Why a Node's IPv6 InternalIP `ip` cannot be a node's address, if it cannot.
    pub fn refuse_node_ip6(&self, ip: Ipv6Addr) -> Option<String> {
        self.ranges6().refuse_node_ip(ip)
    }

    /// Why a node may not have IPv6 pod CIDR `cidr`, given the IPv6 CIDRs accepted so
    /// far and every node's IPv6 address (as [`Limits::refuse_pod_cidr`]).
    pub fn refuse_pod_cidr6(
        &self,
        cidr: &Ipv6Net,
        accepted: &[(Ipv6Net, String)],
        node_ips: &[Ipv6Addr],
    ) -> Option<String> {
        let prefix = cidr.prefix_len();
        if !(MIN_POD_CIDR6_PREFIX..=MAX_POD_CIDR6_PREFIX).contains(&prefix) {
            return Some(format!(
                "prefix /{prefix} is outside /{MIN_POD_CIDR6_PREFIX}../{MAX_POD_CIDR6_PREFIX}"
            ));
        }
        self.ranges6().refuse_pod_cidr(cidr, accepted, node_ips)
    }

    fn ranges6(&self) -> NodeRanges<'_, Ipv6Addr> {
        NodeRanges {
            services: &self.service_cidrs6,
            cluster: self.cluster_cidr6,
            special_ip: special6,
            special_net: special_net6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn cluster_cidr_takes_one_cidr_per_family() {
        assert_eq!(
            ClusterCidrs::parse("10.244.0.0/16,fd00:10:244::/56"),
            Ok(ClusterCidrs {
                v4: Some("10.244.0.0/16".parse().unwrap()),
                v6: Some(net("fd00:10:244::/56")),
            })
        );
        assert_eq!(ClusterCidrs::parse("10.244.0.0/16").map(|c| c.v6), Ok(None));
        for bad in [
            "10.0.0.0/8,10.244.0.0/16",
            "fd00::/48,fd01::/48",
            "",
            "nope",
        ] {
            assert!(ClusterCidrs::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_pod_cidrs_that_would_swallow_other_traffic_are_refused() {
        let limits = Limits {
            cluster_cidr6: Some(net("fd00:10:244::/56")),
            service_cidrs6: vec![net("fd00:10:96::/112")],
            ..Limits::default()
        };
        let accepted = [(net("fd00:10:244:1::/64"), "b".to_string())];
        let node_ips = ["fd00:10:244:9::5".parse().unwrap()];
        for (cidr, says) in [
            ("::/0", "outside /64../120"),
            ("fd00:10:244::/48", "outside /64../120"),
            ("fd00:10:244:7::/124", "outside /64../120"),
            ("::/64", "unspecified"),
            ("::1/128", "outside"),
            ("::ffff:10.0.0.0/120", "IPv4-mapped"),
            ("fe80::/64", "link-local"),
            ("ff02::/64", "multicast"),
            ("fd00:20::/64", "outside the cluster CIDR"),
            (
                "fd00:10:244:1::/80",
                "overlaps fd00:10:244:1::/64, node b's",
            ),
            ("fd00:10:244:9::/64", "node address"),
        ] {
            let reason = limits
                .refuse_pod_cidr6(&net(cidr), &accepted, &node_ips)
                .unwrap_or_else(|| panic!("{cidr} accepted"));
            assert!(reason.contains(says), "{cidr}: {reason}");
        }
        assert_eq!(
            limits.refuse_pod_cidr6(&net("fd00:10:244:2::/64"), &accepted, &node_ips),
            None
        );
        // Without a cluster CIDR, ULA ranges that clash with the Service CIDR stay
        // refused.
        let services_only = Limits {
            service_cidrs6: vec![net("fd00:10:96::/112")],
            ..Limits::default()
        };
        let reason = services_only.refuse_pod_cidr6(&net("fd00:10:96::/120"), &[], &[]);
        assert!(reason.is_some_and(|r| r.contains("service CIDR")));
        for (ip, says) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:198.51.100.1", "IPv4-mapped"),
            ("fd00:10:244:3::9", "cluster CIDR"),
            ("fd00:10:96::10", "service CIDR"),
        ] {
            let reason = limits
                .refuse_node_ip6(ip.parse().unwrap())
                .unwrap_or_else(|| panic!("{ip} accepted"));
            assert!(reason.contains(says), "{ip}: {reason}");
        }
        assert_eq!(limits.refuse_node_ip6("2001:db8::1".parse().unwrap()), None);
    }
}
