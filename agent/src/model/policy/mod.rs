//! NetworkPolicy (`networking.k8s.io/v1`) -> what the datapath enforces: an identity
//! for every address (the class of addresses the same policy peers select: pods by
//! their namespace's and their own labels, and `ipBlock`s), and for each pod of this
//! node whether it is isolated per direction and which (peer identity, protocol,
//! port range) it allows. Lookups by identity keep the datapath's new-flow cost
//! independent of how many policies and pods there are.
//!
//! Semantics as the Kubernetes API defines them: a pod is isolated for a direction
//! once a policy of its namespace selects it for that direction (`policyTypes`,
//! defaulting to Ingress, plus Egress when egress rules exist); what the policies
//! selecting it allow adds up; an empty peer list allows every peer, an empty port
//! list every port and protocol; a peer with both selectors needs both; named ports
//! resolve through the pods' container ports (a pod's own for ingress, the peer
//! pods' for egress). hostNetwork pods are not policed and count as their node.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    fields::{object_name, parse_ipv4, truncated},
    namespace_of,
    selector::Selector,
    NodeContext, SkipReason, Skipped,
};

/// Which addresses a datapath identity stands for; `WORLD` is every address no
/// policy peer selects, `ANY` (in allow rules only) every peer there is.
pub type Identity = u32;
pub use ferrite_common::policy::{IDENTITY_ANY, IDENTITY_FIRST, IDENTITY_WORLD};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Traffic one pod allows in one direction: with peers of `identity`, over
/// `protocol` (0: any) on ports `ports` (`None`: any).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allow {
    pub direction: Direction,
    pub identity: Identity,
    pub protocol: u8,
    pub ports: Option<(u16, u16)>,
}

/// The policies of one pod of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub allows: BTreeSet<Allow>,
    /// The policies selecting the pod, `namespace/name` (for inspect and explain).
    pub policies: BTreeSet<String>,
}

/// What the datapath enforces for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyModel {
    /// Address prefixes and the identity of their addresses (longest prefix wins;
    /// addresses under no prefix are `IDENTITY_WORLD`).
    pub ipcache: BTreeMap<Ipv4Net, Identity>,
    /// This node's pods that at least one policy selects, by IP.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
}

/// A pod as policies see it.
struct PolicyPod {
    namespace: String,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
    node: Option<String>,
    /// Named container ports: (name, protocol) -> port.
    named_ports: BTreeMap<(String, u8), u16>,
}

/// A policy peer, as checked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Peer {
    /// Pods of the namespaces `namespaces` selects (`None`: the policy's own) that
    /// `pods` selects.
    Pods {
        namespaces: Option<Selector>,
        own_namespace: String,
        pods: Selector,
    },
    /// `cidr` but not `except`.
    Block { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

/// Every distinct peer of every policy, each once, by index.
#[derive(Default)]
struct PeerTable {
    list: Vec<Peer>,
    index: std::collections::HashMap<Peer, usize>,
}

impl PeerTable {
    fn intern(&mut self, peer: Peer) -> usize {
        if let Some(index) = self.index.get(&peer) {
            return *index;
        }
        self.list.push(peer.clone());
        self.index.insert(peer, self.list.len() - 1);
        self.list.len() - 1
    }
}

/// A port of a rule, as checked.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PortMatch {
    /// Any port of `protocol` (0: any protocol).
    Any(u8),
    Range(u8, u16, u16),
    Named(u8, String),
}

/// A rule, as checked: its peers (`None`: every peer) and ports (empty: all).
struct Rule {
    peers: Option<Vec<usize>>,
    ports: Vec<PortMatch>,
}

struct CheckedPolicy {
    name: String,
    namespace: String,
    pods: Selector,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

/// Namespace name -> labels (with `kubernetes.io/metadata.name`, which the API
/// server sets on every namespace, also for namespaces the source does not list).
fn namespace_labels(namespaces: &[Arc<Namespace>]) -> BTreeMap<String, BTreeMap<String, String>> {
    namespaces
        .iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            Some((name, labels))
        })
        .collect()
}

fn policy_pod(pod: &Pod) -> Option<PolicyPod> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ip = parse_ipv4(status.pod_ip.as_deref()?, "status.podIP").ok()?;
    let mut named_ports = BTreeMap::new();
    for container in &spec.containers {
        for port in container.ports.iter().flatten() {
            let (Some(name), Ok(number)) = (port.name.clone(), u16::try_from(port.container_port))
            else {
                continue;
            };
            if let Some(protocol) = protocol_number(port.protocol.as_deref()) {
                named_ports.insert((name, protocol), number);
            }
        }
    }
    Some(PolicyPod {
        namespace: namespace_of(&pod.metadata).to_string(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip,
        node: spec.node_name.clone(),
        named_ports,
    })
}

/// TCP (the default), UDP or SCTP.
fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}

/// The policy's peers and ports checked; peers go to `peers` (shared by all
/// policies). An unusable peer or port makes its rule allow nothing (fail closed).
fn check_rules<'a>(
    rules: impl Iterator<
        Item = (
            Option<&'a Vec<NetworkPolicyPeer>>,
            Option<&'a Vec<NetworkPolicyPort>>,
        ),
    >,
    namespace: &str,
    peers: &mut PeerTable,
    what: &str,
    skipped: &mut Vec<Skipped>,
) -> Vec<Rule> {
    let mut checked = Vec::new();
    for (index, (rule_peers, rule_ports)) in rules.enumerate() {
        let refuse = |reason: String, skipped: &mut Vec<Skipped>| {
            skipped.push(Skipped {
                object: format!("{what} rule {}", index + 1),
                reason: SkipReason::Invalid(format!("{reason}: the rule allows nothing")),
            });
        };
        let ports = match rule_ports.map(|p| check_ports(p)).transpose() {
            Ok(ports) => ports.unwrap_or_default(),
            Err(reason) => {
                refuse(reason, skipped);
                continue;
            }
        };
        let peer_indexes = match rule_peers.filter(|p| !p.is_empty()) {
            None => None,
            Some(list) => {
                let mut indexes = Vec::new();
                let mut failed = None;
                for peer in list {
                    match check_peer(peer, namespace) {
                        Ok(peer) => {
                            indexes.push(peers.intern(peer));
                        }
                        Err(reason) => failed = Some(reason),
                    }
                }
                if let Some(reason) = failed {
                    refuse(reason, skipped);
                    continue;
                }
                Some(indexes)
            }
        };
        checked.push(Rule {
            peers: peer_indexes,
            ports,
        });
    }
    checked
}

fn check_peer(peer: &NetworkPolicyPeer, namespace: &str) -> Result<Peer, String> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            return Err("a peer with ipBlock and selectors".into());
        }
        if block.cidr.contains(':') {
            return Err(format!(
                "ipBlock {} is IPv6 (not supported yet)",
                truncated(&block.cidr)
            ));
        }
        let cidr: Ipv4Net = block.cidr.parse().map_err(|_| {
            format!(
                "ipBlock cidr {:?} is not an IPv4 CIDR",
                truncated(&block.cidr)
            )
        })?;
        let cidr = cidr.trunc();
        let mut except = Vec::new();
        for e in block.except.iter().flatten() {
            let e: Ipv4Net = e
                .parse()
                .map_err(|_| format!("ipBlock except {:?} is not an IPv4 CIDR", truncated(e)))?;
            let e = e.trunc();
            if !cidr.contains(&e) {
                return Err(format!("ipBlock except {e} is not inside {cidr}"));
            }
            except.push(e);
        }
        except.sort();
        except.dedup();
        return Ok(Peer::Block { cidr, except });
    }
    let selector = |s: &Option<LabelSelector>| s.as_ref().map(Selector::parse).transpose();
    let namespaces = selector(&peer.namespace_selector)?;
    let pods = selector(&peer.pod_selector)?.unwrap_or_default();
    if peer.namespace_selector.is_none() && peer.pod_selector.is_none() {
        return Err("a peer with neither selectors nor ipBlock".into());
    }
    Ok(Peer::Pods {
        namespaces,
        own_namespace: namespace.to_string(),
        pods,
    })
}

fn check_ports(ports: &[NetworkPolicyPort]) -> Result<Vec<PortMatch>, String> {
    let mut checked = Vec::new();
    for port in ports {
        let protocol = protocol_number(port.protocol.as_deref()).ok_or_else(|| {
            format!(
                "protocol {:?} is not TCP, UDP or SCTP",
                truncated(port.protocol.as_deref().unwrap_or(""))
            )
        })?;
        let valid = |n: i32| u16::try_from(n).ok().filter(|n| *n != 0);
        checked.push(match (&port.port, port.end_port) {
            (None, None) => PortMatch::Any(protocol),
            (None, Some(_)) => return Err("endPort without port".into()),
            (Some(IntOrString::Int(n)), end) => {
                let start = valid(*n).ok_or_else(|| format!("port {n} is out of range"))?;
                let end = match end {
                    None => start,
                    Some(e) => valid(e).filter(|e| *e >= start).ok_or_else(|| {
                        format!("endPort {e} is below port {start} or out of range")
                    })?,
                };
                PortMatch::Range(protocol, start, end)
            }
            (Some(IntOrString::String(name)), None) => PortMatch::Named(protocol, name.clone()),
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err("endPort with a named port".into())
            }
        });
    }
    Ok(checked)
}

impl Peer {
    /// Whether this peer selects the pod (namespace labels from `namespaces`).
    /// Whether a pod of `namespace` can be one of this peer's (its namespace part).
    fn admits_namespace(
        &self,
        namespace: &str,
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> bool {
        match self {
            Peer::Pods {
                namespaces: None,
                own_namespace,
                ..
            } => namespace == own_namespace,
            Peer::Pods {
                namespaces: Some(selector),
                ..
            } => {
                let fallback = BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    namespace.to_string(),
                )]);
                selector.matches(namespaces.get(namespace).unwrap_or(&fallback))
            }
            Peer::Block { .. } => true,
        }
    }

    fn selects_pod(
        &self,
        pod: &PolicyPod,
        namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> bool {
        match self {
            Peer::Pods {
                namespaces: namespace_selector,
                own_namespace,
                pods,
            } => {
                let namespace_ok = match namespace_selector {
                    None => pod.namespace == *own_namespace,
                    Some(selector) => {
                        let fallback = BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_string(),
                            pod.namespace.clone(),
                        )]);
                        selector.matches(namespaces.get(&pod.namespace).unwrap_or(&fallback))
                    }
                };
                namespace_ok && pods.matches(&pod.labels)
            }
            Peer::Block { .. } => self.contains(&Ipv4Net::from(pod.ip)),
        }
    }

    /// Whether an ipBlock peer selects every address of `prefix`.
    fn contains(&self, prefix: &Ipv4Net) -> bool {
        match self {
            Peer::Block { cidr, except } => {
                cidr.contains(prefix) && !except.iter().any(|e| e.contains(prefix))
            }
            Peer::Pods { .. } => false,
        }
    }
}

/// The policy model of this node (`context`) from every NetworkPolicy, Namespace
/// and Pod (of every node).
pub fn build_policy(
    policies: &[Arc<NetworkPolicy>],
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
    context: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> PolicyModel {
    let namespace_labels = namespace_labels(namespaces);
    let mut peer_table = PeerTable::default();
    let mut checked = Vec::new();
    for policy in policies {
        let what = object_name("NetworkPolicy", &policy.metadata);
        let namespace = namespace_of(&policy.metadata).to_string();
        let Some(spec) = policy.spec.as_ref() else {
            skipped.push(Skipped {
                object: what,
                reason: SkipReason::Invalid("spec is missing".into()),
            });
            continue;
        };
        let pods = match Selector::parse(&spec.pod_selector.clone().unwrap_or_default()) {
            Ok(pods) => pods,
            Err(reason) => {
                // Which pods it means is unknown: refused (logged and counted).
                skipped.push(Skipped {
                    object: what,
                    reason: SkipReason::Invalid(format!("podSelector: {reason}")),
                });
                continue;
            }
        };
        let types: Vec<&str> = match &spec.policy_types {
            Some(types) => types.iter().map(String::as_str).collect(),
            None if spec.egress.is_some() => vec!["Ingress", "Egress"],
            None => vec!["Ingress"],
        };
        let ingress = types.contains(&"Ingress").then(|| {
            let rules = spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()));
            check_rules(
                rules,
                &namespace,
                &mut peer_table,
                &format!("{what} ingress"),
                skipped,
            )
        });
        let egress = types.contains(&"Egress").then(|| {
            let rules = spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()));
            check_rules(
                rules,
                &namespace,
                &mut peer_table,
                &format!("{what} egress"),
                skipped,
            )
        });
        checked.push(CheckedPolicy {
            name: format!(
                "{namespace}/{}",
                policy.metadata.name.as_deref().unwrap_or("")
            ),
            namespace,
            pods,
            ingress,
            egress,
        });
    }

    let peers = peer_table.list;
    let all_pods: Vec<PolicyPod> = pods.iter().filter_map(|p| policy_pod(p)).collect();

    // Every address class: the set of peers selecting it, interned as an identity.
    let mut identity_of_set: BTreeMap<BTreeSet<usize>, Identity> = BTreeMap::new();
    let mut classes: Vec<(Ipv4Net, BTreeSet<usize>)> = Vec::new();
    // Replicas share their namespace and labels: selectors are matched once per
    // such pair, ipBlocks per address.
    let (block_peers, label_peers): (Vec<usize>, Vec<usize>) =
        (0..peers.len()).partition(|i| matches!(peers[*i], Peer::Block { .. }));
    let mut peers_admitting: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut by_labels: BTreeMap<(&str, &BTreeMap<String, String>), BTreeSet<usize>> =
        BTreeMap::new();
    for pod in &all_pods {
        // The peers whose namespace part admits the pod's namespace: decided once
        // per namespace.
        let candidates = peers_admitting
            .entry(pod.namespace.as_str())
            .or_insert_with(|| {
                label_peers
                    .iter()
                    .copied()
                    .filter(|i| peers[*i].admits_namespace(&pod.namespace, &namespace_labels))
                    .collect()
            });
        let mut set = by_labels
            .entry((pod.namespace.as_str(), &pod.labels))
            .or_insert_with(|| {
                candidates
                    .iter()
                    .copied()
                    .filter(|i| peers[*i].selects_pod(pod, &namespace_labels))
                    .collect()
            })
            .clone();
        set.extend(
            block_peers
                .iter()
                .copied()
                .filter(|i| peers[*i].selects_pod(pod, &namespace_labels)),
        );
        classes.push((Ipv4Net::from(pod.ip), set));
    }
    let pod_ips: BTreeSet<Ipv4Addr> = all_pods.iter().map(|p| p.ip).collect();
    let mut prefixes: BTreeSet<Ipv4Net> = context
        .nodes
        .values()
        .map(|n| Ipv4Net::from(n.ip))
        .filter(|n| !pod_ips.contains(&n.addr()))
        .collect();
    for peer in &peers {
        if let Peer::Block { cidr, except } = peer {
            prefixes.insert(*cidr);
            prefixes.extend(except.iter().copied());
        }
    }
    for prefix in prefixes {
        if prefix.prefix_len() == 32 && pod_ips.contains(&prefix.addr()) {
            continue;
        }
        let set = (0..peers.len())
            .filter(|i| peers[*i].contains(&prefix))
            .collect();
        classes.push((prefix, set));
    }
    let mut sets: Vec<BTreeSet<usize>> = classes.iter().map(|(_, s)| s.clone()).collect();
    sets.sort();
    sets.dedup();
    let mut next = IDENTITY_FIRST;
    for set in sets {
        let identity = if set.is_empty() {
            IDENTITY_WORLD
        } else {
            next += 1;
            next - 1
        };
        identity_of_set.insert(set, identity);
    }
    let identity_of_prefix: BTreeMap<Ipv4Net, Identity> = classes
        .iter()
        .map(|(prefix, set)| (*prefix, identity_of_set[set]))
        .collect();
    // A world entry only matters inside a shorter prefix of another identity (an
    // `except`, a pod in an ipBlock the pod's own peers do not select): without
    // one, a missing entry already means the world.
    let blocks: Vec<Ipv4Net> = identity_of_prefix
        .iter()
        .filter(|(prefix, identity)| **identity != IDENTITY_WORLD && prefix.prefix_len() < 32)
        .map(|(prefix, _)| *prefix)
        .collect();
    let mut ipcache = identity_of_prefix.clone();
    ipcache.retain(|prefix, identity| {
        *identity != IDENTITY_WORLD
            || blocks
                .iter()
                .any(|outer| outer.prefix_len() < prefix.prefix_len() && outer.contains(prefix))
    });
    // The identities each peer selects, and the pods behind each identity.
    let mut identities_of_peer: Vec<BTreeSet<Identity>> = vec![BTreeSet::new(); peers.len()];
    for (set, identity) in &identity_of_set {
        for peer in set {
            identities_of_peer[*peer].insert(*identity);
        }
    }
    let mut pods_of_identity: BTreeMap<Identity, Vec<&PolicyPod>> = BTreeMap::new();
    for pod in &all_pods {
        pods_of_identity
            .entry(identity_of_prefix[&Ipv4Net::from(pod.ip)])
            .or_default()
            .push(pod);
    }

    let mut endpoints = BTreeMap::new();
    let local = all_pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(context.name.as_str()));
    for pod in local {
        let mut endpoint = EndpointPolicy::default();
        for policy in &checked {
            if policy.namespace != pod.namespace || !policy.pods.matches(&pod.labels) {
                continue;
            }
            endpoint.policies.insert(policy.name.clone());
            for (direction, rules) in [
                (Direction::Ingress, &policy.ingress),
                (Direction::Egress, &policy.egress),
            ] {
                let Some(rules) = rules else { continue };
                match direction {
                    Direction::Ingress => endpoint.ingress_isolated = true,
                    Direction::Egress => endpoint.egress_isolated = true,
                }
                for rule in rules {
                    let identities: Vec<Identity> = match &rule.peers {
                        None => vec![IDENTITY_ANY],
                        Some(indexes) => indexes
                            .iter()
                            .flat_map(|i| identities_of_peer[*i].iter().copied())
                            .collect(),
                    };
                    for identity in identities {
                        allow_ports(
                            direction,
                            identity,
                            rule,
                            pod,
                            &pods_of_identity,
                            &mut endpoint.allows,
                        );
                    }
                }
            }
        }
        if !endpoint.policies.is_empty() {
            endpoints.insert(pod.ip, endpoint);
        }
    }
    PolicyModel { ipcache, endpoints }
}

/// The allows of one rule for one peer identity: its ports, named ones resolved
/// through the pod itself (ingress) or the peer pods of the identity (egress).
fn allow_ports(
    direction: Direction,
    identity: Identity,
    rule: &Rule,
    pod: &PolicyPod,
    pods_of_identity: &BTreeMap<Identity, Vec<&PolicyPod>>,
    allows: &mut BTreeSet<Allow>,
) {
    let allow = |protocol: u8, ports: Option<(u16, u16)>| Allow {
        direction,
        identity,
        protocol,
        ports,
    };
    if rule.ports.is_empty() {
        allows.insert(allow(0, None));
        return;
    }
    for port in &rule.ports {
        match port {
            PortMatch::Any(protocol) => {
                allows.insert(allow(*protocol, None));
            }
            PortMatch::Range(protocol, start, end) => {
                allows.insert(allow(*protocol, Some((*start, *end))));
            }
            PortMatch::Named(protocol, name) => {
                let key = (name.clone(), *protocol);
                if direction == Direction::Ingress {
                    if let Some(number) = pod.named_ports.get(&key) {
                        allows.insert(allow(*protocol, Some((*number, *number))));
                    }
                    continue;
                }
                // Egress: the port each peer pod gives the name (every pod's, for
                // every peer), per identity.
                for (peer_identity, peer_pods) in pods_of_identity {
                    if identity != IDENTITY_ANY && identity != *peer_identity {
                        continue;
                    }
                    for number in peer_pods.iter().filter_map(|p| p.named_ports.get(&key)) {
                        allows.insert(Allow {
                            identity: *peer_identity,
                            ..allow(*protocol, Some((*number, *number)))
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
