//! The node context: what every Service is built against besides its own objects.
//! A full sync makes it from the Node objects; an update of some Services reuses the
//! last full sync's (a Node change always brings a full sync), so a Service means
//! the same whichever path builds it.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;

use super::{nodes::cluster_nodes, ClusterNode, Skipped};
use crate::limits::Limits;

/// This node (its name and, once known, its Node object), every node of the cluster
/// (whose addresses and pod CIDRs no Service may claim), and the node's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    pub limits: Limits,
    /// Every node with an InternalIP, this one included, by name.
    pub nodes: BTreeMap<String, ClusterNode>,
    /// Every node's InternalIPs, of both families.
    node_ips: Vec<IpAddr>,
    /// The addresses of this node's interfaces, as the last full sync read them
    /// (`--nodeport-addresses` selects among them).
    host_addresses: Vec<Ipv4Addr>,
}

impl NodeContext {
    /// The context of node `name` in a cluster of `nodes`; Nodes that cannot be used
    /// (or pod CIDRs of them) are returned with their reason. `previous` (the last
    /// full sync's context) says which nodes are incumbents: what they hold they keep.
    pub fn new(
        name: &str,
        limits: &Limits,
        nodes: &[Arc<Node>],
        previous: Option<&NodeContext>,
    ) -> (Self, Vec<Skipped>) {
        let mut skipped = Vec::new();
        let nodes = cluster_nodes(
            nodes,
            name,
            limits,
            previous.map(|p| &p.nodes),
            &mut skipped,
        );
        let node_ips = nodes
            .values()
            .flat_map(|n| [Some(IpAddr::V4(n.ip)), n.ip6.map(IpAddr::V6)])
            .flatten()
            .collect();
        let context = Self {
            name: name.to_string(),
            limits: limits.clone(),
            nodes,
            node_ips,
            host_addresses: Vec::new(),
        };
        (context, skipped)
    }

    /// This context with the addresses of the node's interfaces (read at each full
    /// sync; updates between full syncs reuse them, so both paths plan alike).
    pub fn with_host_addresses(mut self, mut addresses: Vec<Ipv4Addr>) -> Self {
        addresses.sort();
        addresses.dedup();
        self.host_addresses = addresses;
        self
    }

    /// The addresses NodePorts answer on: `--nodeport-addresses` over this node's
    /// InternalIP and its interfaces' addresses.
    pub fn node_port_ips(&self) -> Vec<Ipv4Addr> {
        self.limits
            .node_port_addresses
            .select(self.node_ip(), &self.host_addresses)
    }

    /// This node's Node object, once it is known (its IP serves the NodePorts).
    pub fn this_node(&self) -> Option<&ClusterNode> {
        self.nodes.get(&self.name)
    }

    /// This node's zone (its Node's `topology.kubernetes.io/zone` label), if any.
    pub fn zone(&self) -> Option<&str> {
        self.this_node().and_then(|n| n.zone.as_deref())
    }

    /// This node's IP, once its Node object is known.
    pub fn node_ip(&self) -> Option<Ipv4Addr> {
        self.this_node().map(|n| n.ip)
    }

    /// The addresses IPv6 NodePorts answer on: this node's IPv6 InternalIP (with
    /// `--nodeport-addresses primary`; its CIDRs are IPv4 ones, which select none).
    pub fn node_port_ips6(&self) -> Vec<Ipv6Addr> {
        match self.limits.node_port_addresses {
            crate::limits::NodePortAddresses::Primary => {
                self.this_node().and_then(|n| n.ip6).into_iter().collect()
            }
            crate::limits::NodePortAddresses::Cidrs(_) => Vec::new(),
        }
    }

    /// Whether an endpoint runs here: its `nodeName`, else its address in one of
    /// this node's pod CIDRs (endpoints written by hand often lack `nodeName`).
    pub(super) fn owns(&self, node_name: Option<&str>, ip: IpAddr) -> bool {
        match node_name {
            Some(name) => name == self.name,
            None => self.this_node().is_some_and(|n| match ip {
                IpAddr::V4(ip) => n.pod_cidrs.iter().any(|c| c.contains(&ip)),
                IpAddr::V6(ip) => n.pod_cidrs6.iter().any(|c| c.contains(&ip)),
            }),
        }
    }

    /// The nodes' addresses, which no externalIP or load-balancer IP may take.
    pub(super) fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// Why a Pod of this node may not have `ip` (its `status.podIP`), if it may not.
    /// An endpoint entry makes its address the pod's: traffic to it from this
    /// node's pods goes into the pod, and the pod may send from it. So never a
    /// node's address (the pod would take the overlay traffic meant for that node)
    /// or a special one; once this node's pod CIDR is known, only an address in it
    /// that the CNI's IPAM could have handed out (not the network, broadcast or
    /// first address, this node's overlay address); before, none in another node's
    /// pod CIDR or outside `--cluster-cidr`.
    pub(super) fn refuse_pod_ip(&self, ip: Ipv4Addr) -> Option<String> {
        let refused = |why: String| Some(format!("status.podIP {ip} is {why}"));
        if let Some(what) = crate::limits::special(ip) {
            return refused(what.to_string());
        }
        if let Some(node) = self.nodes.values().find(|n| n.ip == ip) {
            return refused(format!("node {}'s address", node.name));
        }
        let own = self
            .this_node()
            .map(|n| n.pod_cidrs.as_slice())
            .unwrap_or(&[]);
        if !own.is_empty() {
            let Some(cidr) = own.iter().find(|c| c.contains(&ip)) else {
                let cidrs: Vec<String> = own.iter().map(ToString::to_string).collect();
                return refused(format!("outside this node's pod CIDR {}", cidrs.join(", ")));
            };
            let first = cidr.hosts().next();
            if ip == cidr.network() || ip == cidr.broadcast() || Some(ip) == first {
                return refused(format!(
                    "the network, broadcast or overlay address of {cidr}, no pod's"
                ));
            }
            return None;
        }
        let other = self
            .nodes
            .values()
            .find_map(|n| n.pod_cidrs.iter().find(|c| c.contains(&ip)).map(|c| (n, c)));
        if let Some((node, cidr)) = other {
            return refused(format!("in {cidr}, node {}'s pod CIDR", node.name));
        }
        match self.limits.cluster_cidr {
            Some(cluster) if !cluster.contains(&ip) => {
                refused(format!("outside the cluster CIDR {cluster}"))
            }
            _ => None,
        }
    }

    /// Why a Pod of this node may not have `ip6` (the IPv6 address of its
    /// `status.podIPs`), if it may not: the rules of [`NodeContext::refuse_pod_ip`]
    /// for IPv6. Once this node's IPv6 pod CIDR is known, only an address the CNI's
    /// IPAM could have handed out (not the network's, the subnet-router anycast
    /// address, nor the next, left for the node); before, none in another node's
    /// IPv6 pod CIDR or outside the IPv6 `--cluster-cidr`.
    pub(super) fn refuse_pod_ip6(&self, ip6: Ipv6Addr) -> Option<String> {
        let refused = |why: String| Some(format!("status.podIPs {ip6} is {why}"));
        if let Some(what) = crate::limits::special6(ip6) {
            return refused(what.to_string());
        }
        if let Some(node) = self.nodes.values().find(|n| n.ip6 == Some(ip6)) {
            return refused(format!("node {}'s address", node.name));
        }
        let own = self
            .this_node()
            .map(|n| n.pod_cidrs6.as_slice())
            .unwrap_or(&[]);
        if !own.is_empty() {
            let Some(cidr) = own.iter().find(|c| c.contains(&ip6)) else {
                let cidrs: Vec<String> = own.iter().map(ToString::to_string).collect();
                return refused(format!(
                    "outside this node's IPv6 pod CIDR {}",
                    cidrs.join(", ")
                ));
            };
            if u128::from(ip6) - u128::from(cidr.network()) < 2 {
                return refused(format!("the network or node address of {cidr}, no pod's"));
            }
            return None;
        }
        let other = self.nodes.values().find_map(|n| {
            n.pod_cidrs6
                .iter()
                .find(|c| c.contains(&ip6))
                .map(|c| (n, c))
        });
        if let Some((node, cidr)) = other {
            return refused(format!("in {cidr}, node {}'s pod CIDR", node.name));
        }
        match self.limits.cluster_cidr6 {
            Some(cluster) if !cluster.contains(&ip6) => {
                refused(format!("outside the cluster CIDR {cluster}"))
            }
            _ => None,
        }
    }
}
