//! What a node accepts from objects it did not write: the addresses a Service may
//! claim, the pod CIDRs a Node may, and how much of the shared maps one Service may
//! take. The API server validates some of this (clusterIPs against its service CIDR,
//! nodePorts against its range), a YAML file nothing, and `externalIPs` nobody
//! (CVE-2020-8554): a Service that claims the node's address, a pod's, loopback or the
//! cloud metadata address would capture the traffic meant for it.
mod ipv6;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use ferrite_common::MAGLEV_TABLE_SIZE;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::family::{net_holds, net_holds_net, nets_overlap, Family};

pub use ipv6::{special6, ClusterCidrs, MAX_POD_CIDR6_PREFIX, MIN_POD_CIDR6_PREFIX};

/// Backends (ready and terminating) one Service port may have: what its Maglev table
/// can spread over (a slot count is 16-bit; a larger count wrapped).
pub const MAX_BACKENDS_PER_PORT: usize = MAGLEV_TABLE_SIZE;
/// Service map entries (a master and a slot per backend, for every frontend) one
/// Service may take: a quarter of the default `ferrite_service`, so one hostile
/// Service cannot crowd out the others.
pub const MAX_SERVICE_ENTRIES: usize = 65_536;
/// The shortest pod CIDR prefix a node may claim (a /16 holds 65,534 pods; Kubernetes
/// runs at most a few hundred per node).
pub const MIN_POD_CIDR_PREFIX: u8 = 16;

/// The share of each Service map only small frontends and kube-system's may take
/// (1/`RESERVE_DIVISOR`): a few huge Services can fill most of a map, never the room
/// DNS and ordinary Services need.
pub const RESERVE_DIVISOR: usize = 8;
/// A frontend with at most this many backends is small: it may use the reserve.
pub const SMALL_FRONTEND_BACKENDS: usize = 64;

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The Service CIDR(s) (`--service-cidr`): clusterIPs outside are refused.
    /// Empty: any address that is no other rule's.
    pub service_cidrs: Vec<Ipv4Net>,
    /// Addresses `externalIPs` may claim (`--external-ip-cidr`). Empty: none, as the
    /// DenyServiceExternalIPs admission plugin recommends.
    pub external_ip_cidrs: Vec<Ipv4Net>,
    /// The IPv6 addresses `externalIPs` may claim (`--external-ip-cidr` too).
    pub external_ip_cidrs6: Vec<Ipv6Net>,
    pub node_port_range: RangeInclusive<u16>,
    /// The cluster's pod CIDR (`--cluster-cidr`): node pod CIDRs must lie in it.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The IPv6 Service CIDR(s) (`--service-cidr` too): no node's IPv6 pod CIDR or
    /// address may be in them.
    pub service_cidrs6: Vec<Ipv6Net>,
    /// The cluster's IPv6 pod CIDR (`--cluster-cidr`'s IPv6 member): node IPv6 pod
    /// CIDRs must lie in it.
    pub cluster_cidr6: Option<Ipv6Net>,
    /// `--service-proxy-name`: the value of `service.kubernetes.io/service-proxy-name`
    /// this node serves (unlabelled Services only, without it).
    pub service_proxy_name: Option<String>,
    /// `--nodeport-addresses`: which of the node's addresses answer NodePorts.
    pub node_port_addresses: NodePortAddresses,
}

/// Which node addresses serve NodePorts (kube-proxy's `--nodeport-addresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's InternalIP only (kube-proxy's nftables default).
    #[default]
    Primary,
    /// Every address of the node inside one of these CIDRs (several interfaces,
    /// secondary addresses), loopback never.
    Cidrs(Vec<Ipv4Net>),
}

impl NodePortAddresses {
    /// `primary`, or CIDRs separated by commas, as kube-proxy takes them. An address
    /// without a prefix is taken as /32.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value == "primary" {
            return Ok(Self::Primary);
        }
        let mut cidrs = Vec::new();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<Ipv4Net>() {
                Ok(net) => net.trunc(),
                Err(_) => part
                    .parse::<Ipv4Addr>()
                    .map(Ipv4Net::from)
                    .map_err(|_| format!("{part:?} is neither `primary` nor an IPv4 CIDR"))?,
            };
            cidrs.push(net);
        }
        if cidrs.is_empty() {
            return Err("expected `primary` or CIDR,...".into());
        }
        cidrs.sort();
        cidrs.dedup();
        Ok(Self::Cidrs(cidrs))
    }

    /// The addresses NodePorts answer on: of `primary` (the InternalIP, if known)
    /// and `host` (the node's interface addresses), those selected; never loopback
    /// (kube-proxy's iptables mode answers there through `route_localnet`, which
    /// exposes the node's 127.0.0.1 services to its neighbours).
    pub fn select(&self, primary: Option<Ipv4Addr>, host: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = match self {
            Self::Primary => primary.into_iter().collect(),
            Self::Cidrs(cidrs) => primary
                .iter()
                .chain(host)
                .copied()
                .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
                .collect(),
        };
        out.retain(|ip| special(*ip).is_none());
        out.sort();
        out.dedup();
        out
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            service_cidrs: Vec::new(),
            external_ip_cidrs: Vec::new(),
            external_ip_cidrs6: Vec::new(),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            cluster_cidr: None,
            service_cidrs6: Vec::new(),
            cluster_cidr6: None,
            service_proxy_name: None,
            node_port_addresses: NodePortAddresses::Primary,
        }
    }
}

/// Addresses that are never a Service's or a pod's: loopback, link-local (the cloud
/// metadata service, the pods' gateway 169.254.1.1, the hairpin address), 0.0.0.0/8,
/// multicast and broadcast.
pub(crate) fn special(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata, the pods' gateway)")
    } else if ip.octets()[0] == 0 {
        Some("in 0.0.0.0/8")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("multicast or broadcast")
    } else {
        None
    }
}

/// The special range a CIDR overlaps, if any.
fn special_net(net: &Ipv4Net) -> Option<&'static str> {
    const SPECIAL: [(&str, &str); 5] = [
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("0.0.0.0/8", "0.0.0.0/8"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved or broadcast"),
    ];
    SPECIAL.iter().find_map(|(range, what)| {
        let range: Ipv4Net = range.parse().expect("constant");
        (range.contains(net) || net.contains(&range)).then_some(*what)
    })
}

/// The label naming the proxy that serves a Service (kube-proxy's rule).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label marking a Service no proxy serves.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

impl Limits {
    /// Whether this node serves a Service with these labels, as kube-proxy selects
    /// them: not labelled headless, and labelled for this proxy's name (or, without
    /// `--service-proxy-name`, not labelled for any proxy). Others are left alone,
    /// unreported: another proxy serves them.
    pub fn serves(&self, labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
        let label = |name: &str| labels.and_then(|l| l.get(name));
        label(HEADLESS_LABEL).is_none()
            && label(SERVICE_PROXY_NAME_LABEL) == self.service_proxy_name.as_ref()
    }

    /// Why `ip` cannot be a Service frontend of kind `field` (`spec.clusterIP`,
    /// `spec.externalIPs`, `status.loadBalancer.ingress`), if it cannot. Checked
    /// against the node's own ranges of `ip`'s family and, for the addresses a
    /// Service may pick (externalIPs, load-balancer IPs), the nodes' addresses
    /// (`node_ips`): a Service there would capture traffic meant for a node. A Node's
    /// claim never refuses a clusterIP (the API server allocates those; Nodes are
    /// checked against the Service CIDR instead).
    pub fn refuse_frontend<A: FrontendFamily>(
        &self,
        ip: A,
        field: &str,
        node_ips: &[IpAddr],
    ) -> Option<String> {
        if let Some(what) = A::special(ip) {
            return Some(format!("{field} {ip} is {what}"));
        }
        if let Some(net) = A::cluster_cidr(self).filter(|net| net_holds(*net, ip)) {
            return Some(format!("{field} {ip} is a pod address (in {net})"));
        }
        let (services, external) = (A::service_cidrs(self), A::external_ip_cidrs(self));
        match field {
            "spec.clusterIP"
                if !services.is_empty() && !services.iter().any(|net| net_holds(*net, ip)) =>
            {
                Some(format!(
                    "{field} {ip} is outside the service CIDR ({})",
                    list(services)
                ))
            }
            "spec.clusterIP" => None,
            _ if node_ips.contains(&ip.into()) => Some(format!("{field} {ip} is a node's address")),
            "spec.externalIPs" if !external.iter().any(|net| net_holds(*net, ip)) => {
                Some(if external.is_empty() {
                    format!(
                        "{field} {ip}: no {} externalIPs are allowed (--external-ip-cidr)",
                        A::NAME
                    )
                } else {
                    format!(
                        "{field} {ip} is outside the allowed externalIP ranges ({})",
                        list(external)
                    )
                })
            }
            _ => None,
        }
    }

    /// Why a Node's InternalIP `ip` cannot be a node's address, if it cannot: special
    /// addresses, and the ranges the node hands to Services and pods.
    pub fn refuse_node_ip(&self, ip: Ipv4Addr) -> Option<String> {
        self.ranges4().refuse_node_ip(ip)
    }

    /// Why a Service may not have `node_port`, if it may not.
    pub fn refuse_node_port(&self, node_port: u16) -> Option<String> {
        (!self.node_port_range.contains(&node_port)).then(|| {
            format!(
                "nodePort {node_port} is outside the node port range {}-{}",
                self.node_port_range.start(),
                self.node_port_range.end()
            )
        })
    }

    /// Why node `node` (at `node_ip`) may not have pod CIDR `cidr`, given the CIDRs
    /// accepted so far (by node name order, so every node decides alike) and every
    /// node's address.
    pub fn refuse_pod_cidr(
        &self,
        cidr: &Ipv4Net,
        accepted: &[(Ipv4Net, String)],
        node_ips: &[Ipv4Addr],
    ) -> Option<String> {
        if cidr.prefix_len() < MIN_POD_CIDR_PREFIX {
            return Some(format!(
                "prefix /{} is shorter than /{MIN_POD_CIDR_PREFIX}",
                cidr.prefix_len()
            ));
        }
        if cidr.prefix_len() > 30 {
            return Some(format!("prefix /{} holds no pod", cidr.prefix_len()));
        }
        self.ranges4().refuse_pod_cidr(cidr, accepted, node_ips)
    }

    fn ranges4(&self) -> NodeRanges<'_, Ipv4Addr> {
        NodeRanges {
            services: &self.service_cidrs,
            cluster: self.cluster_cidr,
            special_ip: special,
            special_net,
        }
    }
}

/// One family's ranges a node's address and pod CIDRs are held against, and what
/// is special in it: the rules are the same for both families.
struct NodeRanges<'a, A: Family> {
    services: &'a [A::Net],
    cluster: Option<A::Net>,
    special_ip: fn(A) -> Option<&'static str>,
    special_net: fn(&A::Net) -> Option<&'static str>,
}

impl<A: Family> NodeRanges<'_, A> {
    /// Why a Node's InternalIP `ip` cannot be a node's address, if it cannot.
    fn refuse_node_ip(&self, ip: A) -> Option<String> {
        if let Some(what) = (self.special_ip)(ip) {
            return Some(format!("InternalIP {ip} is {what}"));
        }
        let service = self.services.iter().find(|n| net_holds(**n, ip));
        let service = service.map(|n| (*n, "the service CIDR"));
        let pods = self.cluster.filter(|n| net_holds(*n, ip));
        let pods = pods.map(|n| (n, "the cluster CIDR (pod addresses)"));
        service
            .or(pods)
            .map(|(net, what)| format!("InternalIP {ip} is in {what} {net}"))
    }

    /// Why a node may not have pod CIDR `cidr` (its prefix checked already), given
    /// the CIDRs accepted so far and every node's address.
    fn refuse_pod_cidr(
        &self,
        cidr: &A::Net,
        accepted: &[(A::Net, String)],
        node_ips: &[A],
    ) -> Option<String> {
        if let Some(what) = (self.special_net)(cidr) {
            return Some(format!("it overlaps the {what} range"));
        }
        if let Some(cluster) = self.cluster {
            if !net_holds_net::<A>(cluster, *cidr) {
                return Some(format!("it is outside the cluster CIDR {cluster}"));
            }
        }
        let service = self.services.iter().find(|n| nets_overlap::<A>(**n, *cidr));
        if let Some(net) = service {
            return Some(format!("it overlaps the service CIDR {net}"));
        }
        if let Some(ip) = node_ips.iter().find(|ip| net_holds(*cidr, **ip)) {
            return Some(format!("it holds the node address {ip}"));
        }
        accepted
            .iter()
            .find(|(other, _)| nets_overlap::<A>(*other, *cidr))
            .map(|(other, owner)| format!("it overlaps {other}, node {owner}'s"))
    }
}

/// One family's ranges a Service frontend is held against, and what is special in
/// it: [`Limits::refuse_frontend`] applies the same rules to both.
pub trait FrontendFamily: Family {
    /// What is special about `ip` (never a Service's or a pod's), if anything.
    fn special(ip: Self) -> Option<&'static str>;
    fn service_cidrs(limits: &Limits) -> &[Self::Net];
    fn external_ip_cidrs(limits: &Limits) -> &[Self::Net];
    fn cluster_cidr(limits: &Limits) -> Option<Self::Net>;
}

impl FrontendFamily for Ipv4Addr {
    fn special(ip: Self) -> Option<&'static str> {
        special(ip)
    }

    fn service_cidrs(limits: &Limits) -> &[Ipv4Net] {
        &limits.service_cidrs
    }

    fn external_ip_cidrs(limits: &Limits) -> &[Ipv4Net] {
        &limits.external_ip_cidrs
    }

    fn cluster_cidr(limits: &Limits) -> Option<Ipv4Net> {
        limits.cluster_cidr
    }
}

impl FrontendFamily for Ipv6Addr {
    fn special(ip: Self) -> Option<&'static str> {
        special6(ip)
    }

    fn service_cidrs(limits: &Limits) -> &[Ipv6Net] {
        &limits.service_cidrs6
    }

    fn external_ip_cidrs(limits: &Limits) -> &[Ipv6Net] {
        &limits.external_ip_cidrs6
    }

    fn cluster_cidr(limits: &Limits) -> Option<Ipv6Net> {
        limits.cluster_cidr6
    }
}

fn list<N: std::fmt::Display>(nets: &[N]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn nodeport_addresses_take_primary_or_cidrs_as_kube_proxy_does() {
        assert_eq!(
            NodePortAddresses::parse("primary"),
            Ok(NodePortAddresses::Primary)
        );
        assert_eq!(
            NodePortAddresses::parse("10.0.0.0/8, 192.0.2.7"),
            Ok(NodePortAddresses::Cidrs(vec![
                net("10.0.0.0/8"),
                net("192.0.2.7/32")
            ]))
        );
        assert!(NodePortAddresses::parse("primary,10.0.0.0/8").is_err());
        assert!(NodePortAddresses::parse("").is_err());
    }

    #[test]
    fn frontends_that_would_capture_others_traffic_are_refused() {
        let limits = Limits {
            service_cidrs: vec![net("10.96.0.0/12")],
            external_ip_cidrs: vec![net("192.0.2.0/24"), net("198.51.100.0/24")],
            cluster_cidr: Some(net("10.244.0.0/16")),
            ..Limits::default()
        };
        let node_ips: [IpAddr; 2] = [
            "198.51.100.1".parse().unwrap(),
            "10.96.0.10".parse().unwrap(),
        ];
        let refused = |ip: &str, field: &str| {
            limits.refuse_frontend::<Ipv4Addr>(ip.parse().unwrap(), field, &node_ips)
        };
        for (ip, field, says) in [
            ("127.0.0.1", "spec.clusterIP", "loopback"),
            ("169.254.169.254", "spec.clusterIP", "link-local"),
            ("169.254.1.1", "spec.externalIPs", "link-local"),
            ("198.51.100.1", "spec.externalIPs", "node's address"),
            (
                "198.51.100.1",
                "status.loadBalancer.ingress",
                "node's address",
            ),
            ("10.244.3.7", "spec.clusterIP", "pod address"),
            ("10.244.0.9", "status.loadBalancer.ingress", "pod address"),
            ("172.16.0.1", "spec.clusterIP", "outside the service CIDR"),
            ("203.0.113.5", "spec.externalIPs", "outside the allowed"),
        ] {
            let reason = refused(ip, field).unwrap_or_else(|| panic!("{ip} accepted"));
            assert!(reason.contains(says), "{ip}: {reason}");
        }
        // A Node claiming a clusterIP's address takes nothing from the Service.
        assert_eq!(refused("10.96.0.10", "spec.clusterIP"), None);
        assert_eq!(refused("192.0.2.7", "spec.externalIPs"), None);
        assert_eq!(refused("203.0.113.5", "status.loadBalancer.ingress"), None);
        let closed = Limits::default();
        assert!(closed
            .refuse_frontend::<Ipv4Addr>(
                "192.0.2.7".parse().unwrap(),
                "spec.externalIPs",
                &node_ips
            )
            .is_some_and(|r| r.contains("no IPv4 externalIPs are allowed")));
        assert!(limits.refuse_node_port(80).is_some());
        assert!(limits.refuse_node_port(30080).is_none());
    }

    #[test]
    fn node_addresses_in_the_nodes_own_ranges_or_special_are_refused() {
        let limits = Limits {
            service_cidrs: vec![net("10.96.0.0/12")],
            cluster_cidr: Some(net("10.244.0.0/16")),
            ..Limits::default()
        };
        for (ip, says) in [
            ("0.0.0.0", "0.0.0.0/8"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("10.96.0.10", "service CIDR"),
            ("10.244.1.5", "cluster CIDR"),
        ] {
            let reason = limits
                .refuse_node_ip(ip.parse().unwrap())
                .unwrap_or_else(|| panic!("{ip} accepted"));
            assert!(reason.contains(says), "{ip}: {reason}");
        }
        assert_eq!(limits.refuse_node_ip("198.51.100.7".parse().unwrap()), None);
    }

    #[test]
    fn pod_cidrs_that_would_swallow_other_traffic_are_refused() {
        let limits = Limits {
            cluster_cidr: Some(net("10.244.0.0/16")),
            ..Limits::default()
        };
        let accepted = [(net("10.244.1.0/24"), "b".to_string())];
        let node_ips = ["10.244.9.5".parse().unwrap()];
        for (cidr, says) in [
            ("0.0.0.0/0", "shorter"),
            ("10.0.0.0/8", "shorter"),
            ("10.244.7.0/31", "holds no pod"),
            ("127.0.0.0/24", "loopback"),
            ("10.245.0.0/24", "outside the cluster CIDR"),
            ("10.244.1.128/25", "overlaps 10.244.1.0/24"),
            ("10.244.9.0/24", "node address"),
        ] {
            let reason = limits
                .refuse_pod_cidr(&net(cidr), &accepted, &node_ips)
                .unwrap_or_else(|| panic!("{cidr} accepted"));
            assert!(reason.contains(says), "{cidr}: {reason}");
        }
        assert_eq!(
            limits.refuse_pod_cidr(&net("10.244.2.0/24"), &accepted, &node_ips),
            None
        );
        // Without a cluster CIDR, the Service CIDR is still no pod's.
        let services_only = Limits {
            service_cidrs: vec![net("10.96.0.0/12")],
            ..Limits::default()
        };
        let reason = services_only.refuse_pod_cidr(&net("10.96.4.0/24"), &[], &[]);
        assert!(reason.is_some_and(|r| r.contains("service CIDR")));
    }
}
