//! Node objects -> the cluster's nodes as the overlay needs them.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;

use super::{ClusterNode, SkipReason, Skipped};
use crate::limits::Limits;

/// Node annotation a VTEP of another implementation uses to announce its MAC.
pub const VTEP_MAC_ANNOTATION: &str = "ferrite.dev/vtep-mac";

/// Every Node with an InternalIP, by name, each with the pod CIDRs it may have:
/// decided in name order, so every node's agent agrees on who owns what.
pub(super) fn cluster_nodes(
    objects: &[Arc<Node>],
    limits: &Limits,
    skipped: &mut Vec<Skipped>,
) -> BTreeMap<String, ClusterNode> {
    let mut nodes = BTreeMap::new();
    for node in objects {
        match cluster_node(node) {
            Ok(parsed) => {
                if let Some(existing) = nodes.insert(parsed.name.clone(), parsed) {
                    skipped.push(Skipped {
                        object: format!("Node {}", existing.name),
                        reason: SkipReason::NodeListedTwice,
                    });
                }
            }
            Err(reason) => skipped.push(Skipped {
                object: format!(
                    "Node {}",
                    node.metadata.name.as_deref().unwrap_or("<unnamed>")
                ),
                reason: SkipReason::Invalid(reason),
            }),
        }
    }
    let node_ips: Vec<Ipv4Addr> = nodes.values().map(|n: &ClusterNode| n.ip).collect();
    let mut accepted: Vec<(Ipv4Net, String)> = Vec::new();
    for node in nodes.values_mut() {
        node.pod_cidrs.retain(
            |cidr| match limits.refuse_pod_cidr(cidr, &accepted, &node_ips) {
                Some(reason) => {
                    skipped.push(Skipped {
                        object: format!("Node {} podCIDR {cidr}", node.name),
                        reason: SkipReason::Invalid(reason),
                    });
                    false
                }
                None => {
                    accepted.push((*cidr, node.name.clone()));
                    true
                }
            },
        );
    }
    nodes
}

fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn cluster_node(node: &Node) -> Result<ClusterNode, String> {
    let name = node
        .metadata
        .name
        .clone()
        .ok_or("metadata.name is missing")?;
    let ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or("no IPv4 InternalIP in status.addresses")?;
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<&String> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.as_ref()));
    }
    let mut pod_cidrs = Vec::new();
    for cidr in cidrs {
        // Dual-stack nodes list an IPv6 CIDR too: Ferrite routes the IPv4 one.
        if cidr.contains(':') {
            continue;
        }
        let net: Ipv4Net = cidr
            .parse()
            .map_err(|_| format!("podCIDR {cidr:?} is not an IPv4 CIDR"))?;
        pod_cidrs.push(net.trunc());
    }
    let vtep_mac = match node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VTEP_MAC_ANNOTATION))
    {
        Some(value) => parse_mac(value)
            .ok_or_else(|| format!("annotation {VTEP_MAC_ANNOTATION} {value:?} is not a MAC"))?,
        None => ferrite_common::vtep_mac_for(ip),
    };
    Ok(ClusterNode {
        name,
        ip,
        pod_cidrs,
        vtep_mac,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::test_support::*;

    const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, "fd00:10:244::/64"]}
status: {addresses: [{type: Hostname, address: node-a}, {type: InternalIP, address: 198.51.100.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, annotations: {ferrite.dev/vtep-mac: "02:00:00:00:00:0b"}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: no-ip}
spec: {podCIDR: 10.244.2.0/24}
---
apiVersion: v1
kind: Node
metadata: {name: thief}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.9}]}
---
apiVersion: v1
kind: Node
metadata: {name: bad-cidr}
spec: {podCIDR: 10.244.300.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.8}]}
"#;

    #[test]
    fn nodes_give_their_ipv4_pod_cidrs_ip_and_vtep_mac() {
        let (state, skipped) = build_yaml(NODES);
        let a = &state.nodes["node-a"];
        assert_eq!(a.ip, "198.51.100.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.pod_cidrs, vec!["10.244.0.0/24".parse().unwrap()]);
        assert_eq!(a.vtep_mac, ferrite_common::vtep_mac_for(a.ip));
        assert_eq!(state.nodes["node-b"].vtep_mac, [2, 0, 0, 0, 0, 0x0b]);
        // A CIDR claimed twice stays with its first owner.
        assert!(state.nodes["thief"].pod_cidrs.is_empty());
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        for needle in [
            "no IPv4 InternalIP",
            "overlaps 10.244.1.0/24, node node-b's",
            "not an IPv4 CIDR",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(needle)),
                "{needle}: {reasons:#?}"
            );
        }
    }
}
