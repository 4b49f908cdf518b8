//! Node objects -> the cluster's nodes as the overlay needs them.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time};

use super::{ClusterNode, SkipReason, Skipped};
use crate::limits::Limits;

/// The Node label naming its zone (topology-aware routing).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Node annotation a VTEP of another implementation uses to announce its MAC.
pub const VTEP_MAC_ANNOTATION: &str = "ferrite.dev/vtep-mac";

/// Every usable Node, by name, with the pod CIDRs it may have. Where Nodes claim the
/// same address or overlapping pod CIDRs, the incumbent keeps its own: a node the
/// agent accepted before (`previous`), then the oldest (`creationTimestamp`), then
/// by name, so every agent decides alike; this node's address is always its own.
/// A Node whose address cannot be a node's (special, in a Service, externalIP or pod
/// range, another node's, inside an accepted pod CIDR) is refused whole: its claims
/// never take anything from a Service or another node.
pub(super) fn cluster_nodes(
    objects: &[Arc<Node>],
    this: &str,
    limits: &Limits,
    previous: Option<&BTreeMap<String, ClusterNode>>,
    skipped: &mut Vec<Skipped>,
) -> BTreeMap<String, ClusterNode> {
    let mut parsed: BTreeMap<String, (ClusterNode, Option<Time>)> = BTreeMap::new();
    for node in objects {
        match cluster_node(node) {
            Ok(cluster_node) => {
                let created = node.metadata.creation_timestamp.clone();
                let name = cluster_node.name.clone();
                if parsed
                    .insert(name.clone(), (cluster_node, created))
                    .is_some()
                {
                    skipped.push(Skipped {
                        object: format!("Node {name}"),
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
    let mut claimants: Vec<(ClusterNode, Option<Time>)> = parsed.into_values().collect();
    claimants.sort_by_cached_key(|(node, created)| {
        // Held before: the same address and every pod CIDR it claims, accepted.
        let incumbent = previous.and_then(|p| p.get(&node.name)).is_some_and(|p| {
            p.ip == node.ip
                && p.pod_cidrs == node.pod_cidrs
                && p.ip6 == node.ip6
                && p.pod_cidrs6 == node.pod_cidrs6
        });
        (!incumbent, created.clone(), node.name.clone())
    });
    // This node's address is its own, whatever other Nodes say.
    let own_ip = claimants
        .iter()
        .find(|(node, _)| node.name == this)
        .map(|(node, _)| node.ip)
        .filter(|ip| limits.refuse_node_ip(*ip).is_none());

    let mut nodes: BTreeMap<String, ClusterNode> = BTreeMap::new();
    let mut accepted_cidrs: Vec<(Ipv4Net, String)> = Vec::new();
    let mut accepted_cidrs6: Vec<(Ipv6Net, String)> = Vec::new();
    for (mut node, _) in claimants {
        let refused = limits.refuse_node_ip(node.ip).or_else(|| {
            let holder = nodes
                .values()
                .find(|n| n.ip == node.ip)
                .map(|n| n.name.as_str())
                .or((own_ip == Some(node.ip) && node.name != this).then_some(this));
            let in_cidr = accepted_cidrs.iter().find(|(c, _)| c.contains(&node.ip));
            match (holder, in_cidr) {
                (Some(holder), _) => Some(format!("InternalIP {} is node {holder}'s", node.ip)),
                (None, Some((cidr, owner))) => Some(format!(
                    "InternalIP {} is in {cidr}, node {owner}'s pod CIDR",
                    node.ip
                )),
                (None, None) => None,
            }
        });
        if let Some(reason) = refused {
            skipped.push(Skipped {
                object: format!("Node {}", node.name),
                reason: SkipReason::Invalid(reason),
            });
            continue;
        }
        let node_ips: Vec<Ipv4Addr> = nodes.values().map(|n| n.ip).chain([node.ip]).collect();
        accept_pod_cidrs(
            &node.name,
            &mut node.pod_cidrs,
            &mut accepted_cidrs,
            skipped,
            |cidr, accepted| limits.refuse_pod_cidr(cidr, accepted, &node_ips),
        );
        accept_ipv6(&mut node, limits, &nodes, &mut accepted_cidrs6, skipped);
        nodes.insert(node.name.clone(), node);
    }
    nodes
}

/// The IPv6 half of a dual-stack node, held to the IPv4 rules: an IPv6 InternalIP
/// that is special, in the node's own IPv6 ranges, another node's or in an accepted
/// IPv6 pod CIDR is dropped (the node keeps its IPv4 self); then each IPv6 pod CIDR
/// against [`Limits::refuse_pod_cidr6`].
fn accept_ipv6(
    node: &mut ClusterNode,
    limits: &Limits,
    nodes: &BTreeMap<String, ClusterNode>,
    accepted_cidrs6: &mut Vec<(Ipv6Net, String)>,
    skipped: &mut Vec<Skipped>,
) {
    if let Some(ip6) = node.ip6 {
        let refused = limits.refuse_node_ip6(ip6).or_else(|| {
            if let Some(holder) = nodes.values().find(|n| n.ip6 == Some(ip6)) {
                return Some(format!("InternalIP {ip6} is node {}'s", holder.name));
            }
            accepted_cidrs6
                .iter()
                .find(|(c, _)| c.contains(&ip6))
                .map(|(cidr, owner)| {
                    format!("InternalIP {ip6} is in {cidr}, node {owner}'s pod CIDR")
                })
        });
        if let Some(reason) = refused {
            skipped.push(Skipped {
                object: format!("Node {} InternalIP {ip6}", node.name),
                reason: SkipReason::Invalid(reason),
            });
            node.ip6 = None;
        }
    }
    let node_ips6: Vec<Ipv6Addr> = nodes
        .values()
        .filter_map(|n| n.ip6)
        .chain(node.ip6)
        .collect();
    accept_pod_cidrs(
        &node.name,
        &mut node.pod_cidrs6,
        accepted_cidrs6,
        skipped,
        |cidr, accepted| limits.refuse_pod_cidr6(cidr, accepted, &node_ips6),
    );
}

/// Keep the pod CIDRs (of either family) of node `name` that `refuse` finds no
/// reason against, given the CIDRs accepted so far; each kept one is accepted, each
/// other skipped with its reason.
fn accept_pod_cidrs<N: Copy + std::fmt::Display>(
    name: &str,
    cidrs: &mut Vec<N>,
    accepted: &mut Vec<(N, String)>,
    skipped: &mut Vec<Skipped>,
    refuse: impl Fn(&N, &[(N, String)]) -> Option<String>,
) {
    cidrs.retain(|cidr| match refuse(cidr, accepted) {
        Some(reason) => {
            skipped.push(Skipped {
                object: format!("Node {name} podCIDR {cidr}"),
                reason: SkipReason::Invalid(reason),
            });
            false
        }
        None => {
            accepted.push((*cidr, name.to_string()));
            true
        }
    });
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
    let internal_ips = || {
        node.status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
    };
    let ip = internal_ips()
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or("no IPv4 InternalIP in status.addresses")?;
    let ip6 = internal_ips().find_map(|a| a.address.parse::<Ipv6Addr>().ok());
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<&String> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.as_ref()));
    }
    let mut pod_cidrs = Vec::new();
    let mut pod_cidrs6 = Vec::new();
    for cidr in cidrs {
        if cidr.contains(':') {
            let net: Ipv6Net = cidr
                .parse()
                .map_err(|_| format!("podCIDR {cidr:?} is not an IPv6 CIDR"))?;
            pod_cidrs6.push(net.trunc());
            continue;
        }
        let net: Ipv4Net = cidr
            .parse()
            .map_err(|_| format!("podCIDR {cidr:?} is not an IPv4 CIDR"))?;
        pod_cidrs.push(net.trunc());
    }
    // The API server takes one podCIDR per family from a dual-stack Node; which of
    // two IPv4 (or IPv6) ones would the pods' addresses come from?
    if !pod_cidrs6.is_empty() && (pod_cidrs.len() > 1 || pod_cidrs6.len() > 1) {
        return Err(format!(
            "spec.podCIDRs {:?} of a dual-stack node has more than one CIDR of a family",
            spec.and_then(|s| s.pod_cidrs.as_ref())
                .cloned()
                .unwrap_or_default()
        ));
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
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(ZONE_LABEL))
        .filter(|zone| !zone.is_empty())
        .cloned();
    Ok(ClusterNode {
        zone,
        name,
        ip,
        pod_cidrs,
        ip6,
        pod_cidrs6,
        vtep_mac,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::test_support::*;
    use super::super::{build, DesiredState, NodeContext, Protocol};

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
        assert_eq!(a.pod_cidrs6, vec!["fd00:10:244::/64".parse().unwrap()]);
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

    fn node(name: &str, ip: &str, cidr: &str, created: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
        )
    }

    const DNS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: kube-system}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 53, protocol: UDP}]}\n";

    /// The context node-a's agent makes of `yaml` with the lab's limits (Service and
    /// cluster CIDRs), after `previous`; and what it skipped.
    fn context(
        yaml: &str,
        previous: Option<&NodeContext>,
    ) -> (NodeContext, DesiredState, Vec<String>) {
        let (objects, _) = crate::objects_yaml::parse_objects(yaml).unwrap();
        let limits = crate::limits::Limits {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
            service_cidrs6: vec!["fd00:10:96::/112".parse().unwrap()],
            cluster_cidr6: Some("fd00:10::/32".parse().unwrap()),
            ..open_limits()
        };
        let (context, mut skipped) = NodeContext::new(NODE, &limits, &objects.nodes, previous);
        let (state, more) = build(&objects, &context);
        skipped.extend(more);
        (
            context,
            state,
            skipped.iter().map(ToString::to_string).collect(),
        )
    }

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-06-01T00:00:00Z";

    #[test]
    fn a_node_claiming_a_special_service_or_pod_address_is_refused_and_takes_nothing() {
        let base = format!(
            "{}---\n{}---\n{DNS}",
            node("node-a", "198.51.100.1", "10.244.0.0/24", T0),
            node("node-b", "198.51.100.2", "10.244.1.0/24", T0)
        );
        for (ip, says) in [
            ("10.96.0.10", "service CIDR"),
            ("10.244.1.5", "cluster CIDR"),
            ("10.244.0.7", "cluster CIDR"),
            ("0.0.0.0", "0.0.0.0/8"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("198.51.100.1", "node node-a's"),
            ("198.51.100.2", "node node-b's"),
        ] {
            // Named to sort first, created after the others (the API server sets
            // creationTimestamp): refused whole.
            let hostile = node("a0-hostile", ip, "10.244.9.0/24", T1);
            let (context, state, skipped) = context(&format!("{base}---\n{hostile}"), None);
            assert!(
                skipped
                    .iter()
                    .any(|s| s.starts_with("Node a0-hostile") && s.contains(says)),
                "{ip}: {skipped:?}"
            );
            assert!(!context.nodes.contains_key("a0-hostile"), "{ip}");
            // Everything else stands: both nodes with their pod CIDRs and addresses,
            // kube-dns on its clusterIP.
            assert_eq!(
                context.node_ip(),
                Some("198.51.100.1".parse().unwrap()),
                "{ip}"
            );
            assert_eq!(context.nodes["node-b"].pod_cidrs.len(), 1, "{ip}");
            assert_eq!(context.nodes["node-a"].pod_cidrs.len(), 1, "{ip}");
            assert!(
                state
                    .services
                    .contains_key(&addr("10.96.0.10", 53, Protocol::Udp)),
                "{ip}"
            );
        }
        // This node's own address is its own, even against an older Node.
        let older = node(
            "a0-hostile",
            "198.51.100.1",
            "10.244.9.0/24",
            "2020-01-01T00:00:00Z",
        );
        let (context, _, skipped) = context(&format!("{base}---\n{older}"), None);
        assert_eq!(context.node_ip(), Some("198.51.100.1".parse().unwrap()));
        assert!(!context.nodes.contains_key("a0-hostile"), "{skipped:?}");
    }

    #[test]
    fn without_a_service_cidr_a_node_on_a_cluster_ip_takes_nothing_from_the_service() {
        let yaml = format!(
            "{}---\n{}---\n{DNS}",
            node("node-a", "198.51.100.1", "10.244.0.0/24", T0),
            node("squatter", "10.96.0.10", "10.244.5.0/24", T1)
        );
        let (state, skipped) = build_yaml(&yaml);
        assert!(
            state
                .services
                .contains_key(&addr("10.96.0.10", 53, Protocol::Udp)),
            "{skipped:?}"
        );
    }

    #[test]
    fn the_incumbent_keeps_its_pod_cidr_and_the_newcomer_is_refused() {
        let victim = node("node-b", "198.51.100.2", "10.244.1.0/24", T0);
        // Sorts first by name, created later.
        let thief = node("a0-thief", "198.51.100.9", "10.244.1.0/24", T1);
        let this = node("node-a", "198.51.100.1", "10.244.0.0/24", T0);
        let (first, _, skipped) = context(&format!("{this}---\n{victim}---\n{thief}"), None);
        assert_eq!(
            first.nodes["node-b"].pod_cidrs,
            vec!["10.244.1.0/24".parse().unwrap()]
        );
        assert!(first.nodes["a0-thief"].pod_cidrs.is_empty());
        assert!(
            skipped
                .iter()
                .any(|s| s.contains("Node a0-thief podCIDR 10.244.1.0/24")
                    && s.contains("node node-b's")),
            "{skipped:?}"
        );
        // Seen first beats older: a node the agent accepted keeps what it has even
        // against a Node (re)created with an older timestamp.
        let ancient = node(
            "a0-thief",
            "198.51.100.9",
            "10.244.1.0/24",
            "2020-01-01T00:00:00Z",
        );
        let (again, _, _) = context(&format!("{this}---\n{victim}---\n{ancient}"), Some(&first));
        assert_eq!(again.nodes["node-b"].pod_cidrs.len(), 1);
        assert!(again.nodes["a0-thief"].pod_cidrs.is_empty());
        // Without history, the oldest wins.
        let (fresh, _, _) = context(&format!("{this}---\n{victim}---\n{ancient}"), None);
        assert!(fresh.nodes["node-b"].pod_cidrs.is_empty());
    }

    fn dual_stack_node(name: &str, ips: [&str; 2], cidrs: &str, created: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\n\
             spec: {{podCIDRs: [{cidrs}]}}\n\
             status: {{addresses: [{{type: InternalIP, address: {}}}, {{type: InternalIP, address: \"{}\"}}]}}\n",
            ips[0], ips[1]
        )
    }

    #[test]
    fn dual_stack_nodes_keep_one_pod_cidr_per_family_and_bad_ipv6_ones_are_refused() {
        let a = dual_stack_node(
            "node-a",
            ["198.51.100.1", "2001:db8::1"],
            "10.244.0.0/24, \"fd00:10:244::/64\"",
            T0,
        );
        let b = dual_stack_node(
            "node-b",
            ["198.51.100.2", "2001:db8::2"],
            "10.244.1.0/24, \"fd00:10:244:1::/64\"",
            T0,
        );
        let (both, _, skipped) = context(&format!("{a}---\n{b}"), None);
        let node_a = &both.nodes["node-a"];
        assert_eq!(node_a.ip6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(node_a.pod_cidrs6, vec!["fd00:10:244::/64".parse().unwrap()]);
        assert_eq!(both.nodes["node-b"].pod_cidrs6.len(), 1, "{skipped:?}");
        assert!(skipped.is_empty(), "{skipped:?}");
        for (cidrs, ip6, says) in [
            ("10.244.9.0/24, \"::/0\"", "2001:db8::9", "prefix /0"),
            ("10.244.9.0/24, \"::1/128\"", "2001:db8::9", "prefix /128"),
            ("10.244.9.0/24, \"fe80::/64\"", "2001:db8::9", "link-local"),
            ("10.244.9.0/24, \"ff05::/64\"", "2001:db8::9", "multicast"),
            (
                "10.244.9.0/24, \"::/48\"",
                "2001:db8::9",
                "outside /64../120",
            ),
            (
                "10.244.9.0/24, \"::ffff:10.9.0.0/120\"",
                "2001:db8::9",
                "IPv4-mapped",
            ),
            (
                "10.244.9.0/24, \"fd00:99::/64\"",
                "2001:db8::9",
                "outside the cluster CIDR",
            ),
            (
                "10.244.9.0/24, \"fd00:10:96::/112\"",
                "2001:db8::9",
                "service CIDR",
            ),
            (
                "10.244.9.0/24, \"fd00:10:244:1::/80\"",
                "2001:db8::9",
                "node node-b's",
            ),
            (
                "10.244.9.0/24, \"fd00:10:244:9::/64\"",
                "fd00:10:244:1::7",
                "the cluster CIDR (pod addresses)",
            ),
            (
                "10.244.9.0/24, \"fd00:10:244:9::/64\"",
                "2001:db8::2",
                "node node-b's",
            ),
            (
                "10.244.9.0/24, \"fd00:10:244:9::/64\"",
                "fe80::9",
                "link-local",
            ),
        ] {
            let hostile = dual_stack_node("a0-hostile", ["198.51.100.9", ip6], cidrs, T1);
            let (context, _, skipped) = context(&format!("{a}---\n{b}---\n{hostile}"), None);
            assert!(
                skipped
                    .iter()
                    .any(|s| s.starts_with("Node a0-hostile") && s.contains(says)),
                "{cidrs} {ip6}: {skipped:?}"
            );
            // Its IPv4 self stands; node-b keeps its IPv6 range and address.
            assert_eq!(context.nodes["a0-hostile"].pod_cidrs.len(), 1, "{cidrs}");
            assert_eq!(context.nodes["node-b"].pod_cidrs6.len(), 1, "{cidrs}");
            assert_eq!(
                context.nodes["node-b"].ip6,
                Some("2001:db8::2".parse().unwrap())
            );
        }
        // Two IPv4 podCIDRs (or two IPv6) on a dual-stack Node: refused whole.
        for cidrs in [
            "10.244.9.0/24, 10.244.10.0/24, \"fd00:10:244:9::/64\"",
            "10.244.9.0/24, \"fd00:10:244:9::/64\", \"fd00:10:244:10::/64\"",
        ] {
            let hostile = dual_stack_node("a0-hostile", ["198.51.100.9", "2001:db8::9"], cidrs, T1);
            let (context, _, skipped) = context(&format!("{a}---\n{b}---\n{hostile}"), None);
            assert!(!context.nodes.contains_key("a0-hostile"), "{cidrs}");
            assert!(
                skipped
                    .iter()
                    .any(|s| s.starts_with("Node a0-hostile") && s.contains("more than one CIDR")),
                "{cidrs}: {skipped:?}"
            );
        }
    }

    #[test]
    fn a_node_inside_another_nodes_pod_cidr_is_refused_not_the_cidr() {
        // No cluster CIDR configured: only the accepted pod CIDRs tell.
        let yaml = format!(
            "{}---\n{}---\n{}",
            node("node-a", "198.51.100.1", "10.244.0.0/24", T0),
            node("node-b", "198.51.100.2", "10.245.1.0/24", T0),
            node("a0-inside", "10.245.1.7", "10.245.9.0/24", T1)
        );
        let (state, skipped) = build_yaml(&yaml);
        assert!(!state.nodes.contains_key("a0-inside"), "{skipped:?}");
        assert_eq!(state.nodes["node-b"].pod_cidrs.len(), 1);
        assert!(skipped.iter().any(|s| s
            .to_string()
            .contains("10.245.1.0/24, node node-b's pod CIDR")));
    }
}
