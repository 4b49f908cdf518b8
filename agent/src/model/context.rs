//! The node context: what every Service is built against besides its own objects.
//! A full sync makes it from the Node objects; an update of some Services reuses the
//! last full sync's (a Node change always brings a full sync), so a Service means
//! the same whichever path builds it.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

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
    node_ips: Vec<Ipv4Addr>,
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
        let node_ips = nodes.values().map(|n| n.ip).collect();
        let context = Self {
            name: name.to_string(),
            limits: limits.clone(),
            nodes,
            node_ips,
        };
        (context, skipped)
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

    /// Whether an endpoint runs here: its `nodeName`, else its address in this
    /// node's pod CIDR (endpoints written by hand often lack `nodeName`).
    pub(super) fn owns(&self, node_name: Option<&str>, ip: Ipv4Addr) -> bool {
        match node_name {
            Some(name) => name == self.name,
            None => self
                .this_node()
                .is_some_and(|n| n.pod_cidrs.iter().any(|c| c.contains(&ip))),
        }
    }

    /// The nodes' addresses, which no externalIP or load-balancer IP may take.
    pub(super) fn node_ips(&self) -> &[Ipv4Addr] {
        &self.node_ips
    }
}
