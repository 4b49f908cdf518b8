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

mod index;

pub use index::{
    EndpointSources, NoPolicyNames, ObjectKey, PodAddress, PolicyChanges, PolicyDelta, PolicyIndex,
    PolicyNames, PolicySource, MAX_SOURCE_ALLOWS,
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

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// Traffic one pod allows in one direction: with peers of `identity`, over
/// `protocol` (0: any) on ports `ports` (`None`: any).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
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

/// Named container ports: (name, protocol) -> port.
type NamedPorts = BTreeMap<(String, u8), u16>;

/// A pod as policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PolicyPod {
    namespace: String,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
    node: Option<String>,
    named_ports: NamedPorts,
}

/// A policy peer, as checked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Peer {
    /// Pods of the namespaces `namespaces` admits that `pods` selects.
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    /// `cidr` but not `except`.
    Block { cidr: Ipv4Net, except: Vec<Ipv4Net> },
}

/// The namespaces a pod peer admits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Namespaces {
    /// The policy's own (a peer without `namespaceSelector`).
    Own(String),
    /// Those the `namespaceSelector` selects, whichever namespace the policy is in:
    /// equal selectors of policies in different namespaces are one peer, so a
    /// policy taking up a selector other policies use changes no address's class.
    Selected(Selector),
}

/// A peer and its fingerprint (a hash of its description): peers hash and order by
/// the fingerprint first, so sets of peers (address classes) hash and compare at
/// the cost of integers. Equal peers are equal whatever their fingerprint's order.
#[derive(Clone, Debug)]
struct PeerRef(Arc<(u64, Peer)>);

impl PeerRef {
    fn new(peer: Peer) -> Self {
        let fingerprint = fnv1a(0xcbf2_9ce4_8422_2325, format!("{peer:?}").as_bytes());
        Self(Arc::new((fingerprint, peer)))
    }

    fn fingerprint(&self) -> u64 {
        self.0 .0
    }
}

/// FNV-1a, continued from `hash`: stable across runs and builds.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl std::ops::Deref for PeerRef {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.0 .1
    }
}

impl PartialEq for PeerRef {
    fn eq(&self, other: &Self) -> bool {
        self.0 .0 == other.0 .0 && (Arc::ptr_eq(&self.0, &other.0) || self.0 .1 == other.0 .1)
    }
}

impl Eq for PeerRef {}

impl std::hash::Hash for PeerRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 .0);
    }
}

impl PartialOrd for PeerRef {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PeerRef {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0 .0.cmp(&other.0 .0).then_with(|| {
            if Arc::ptr_eq(&self.0, &other.0) {
                std::cmp::Ordering::Equal
            } else {
                self.0 .1.cmp(&other.0 .1)
            }
        })
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
#[derive(Clone, Debug)]
struct Rule {
    peers: Option<Vec<PeerRef>>,
    ports: Vec<PortMatch>,
}

#[derive(Clone, Debug)]
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

/// A namespace's labels as selectors see them: with `kubernetes.io/metadata.name`,
/// which the API server sets on every namespace (also on namespaces the source does
/// not list, `None` here).
fn namespace_labels(name: &str, namespace: Option<&Namespace>) -> BTreeMap<String, String> {
    let mut labels = namespace
        .and_then(|ns| ns.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), name.to_string());
    labels
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
                        Ok(peer) => indexes.push(PeerRef::new(peer)),
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
    let namespaces = match selector(&peer.namespace_selector)? {
        Some(selector) => Namespaces::Selected(selector),
        None => Namespaces::Own(namespace.to_string()),
    };
    let pods = selector(&peer.pod_selector)?.unwrap_or_default();
    if peer.namespace_selector.is_none() && peer.pod_selector.is_none() {
        return Err("a peer with neither selectors nor ipBlock".into());
    }
    Ok(Peer::Pods { namespaces, pods })
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
    /// Whether a pod of `namespace` (whose labels are `labels`) can be one of this
    /// peer's: its namespace part (an ipBlock admits every namespace).
    fn admits_namespace(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Peer::Pods {
                namespaces: Namespaces::Own(own),
                ..
            } => namespace == own,
            Peer::Pods {
                namespaces: Namespaces::Selected(selector),
                ..
            } => selector.matches(labels),
            Peer::Block { .. } => true,
        }
    }

    /// Whether a pod with `labels` matches the pod part of a selector peer.
    fn selects_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Peer::Pods { pods, .. } => pods.matches(labels),
            Peer::Block { .. } => false,
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

/// A NetworkPolicy checked, or `None` when it is refused whole (its `podSelector`
/// cannot be parsed: which pods it means is unknown). What cannot be used is in
/// `skipped`.
fn check_policy(policy: &NetworkPolicy, skipped: &mut Vec<Skipped>) -> Option<CheckedPolicy> {
    let what = object_name("NetworkPolicy", &policy.metadata);
    let namespace = namespace_of(&policy.metadata).to_string();
    let Some(spec) = policy.spec.as_ref() else {
        skipped.push(Skipped {
            object: what,
            reason: SkipReason::Invalid("spec is missing".into()),
        });
        return None;
    };
    let pods = match Selector::parse(&spec.pod_selector.clone().unwrap_or_default()) {
        Ok(pods) => pods,
        Err(reason) => {
            skipped.push(Skipped {
                object: what,
                reason: SkipReason::Invalid(format!("podSelector: {reason}")),
            });
            return None;
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
        check_rules(rules, &namespace, &format!("{what} ingress"), skipped)
    });
    let egress = types.contains(&"Egress").then(|| {
        let rules = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()));
        check_rules(rules, &namespace, &format!("{what} egress"), skipped)
    });
    Some(CheckedPolicy {
        name: format!(
            "{namespace}/{}",
            policy.metadata.name.as_deref().unwrap_or("")
        ),
        namespace,
        pods,
        ingress,
        egress,
    })
}

impl CheckedPolicy {
    /// Every peer its rules name (with repeats).
    fn peers(&self) -> impl Iterator<Item = &PeerRef> {
        [&self.ingress, &self.egress]
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|rule| rule.peers.iter().flatten())
    }

    fn peers_mut(&mut self) -> impl Iterator<Item = &mut PeerRef> {
        [&mut self.ingress, &mut self.egress]
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|rule| rule.peers.iter_mut().flatten())
    }

    /// Whether an egress rule names a port: its number depends on the peer pods.
    fn has_named_egress_port(&self) -> bool {
        self.egress.iter().flatten().any(|rule| {
            rule.ports
                .iter()
                .any(|port| matches!(port, PortMatch::Named(..)))
        })
    }
}

/// The policy model of this node (`context`) from every NetworkPolicy, Namespace
/// and Pod (of every node): what [`PolicyIndex::build`] computes.
pub fn build_policy(
    policies: &[Arc<NetworkPolicy>],
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
    context: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> PolicyModel {
    PolicyIndex::build(policies, namespaces, pods, context, skipped)
        .model()
        .clone()
}

/// The allows of one rule for one peer identity: its ports, named ones resolved
/// through the pod itself (ingress) or the peer pods of the identity (egress:
/// `named_ports_of` gives, per identity, the named ports of its pods).
fn allow_ports<'a, P>(
    direction: Direction,
    identity: Identity,
    rule: &Rule,
    pod: &PolicyPod,
    named_ports_of: &P,
    allows: &mut BTreeSet<Allow>,
) where
    P: Fn(Identity) -> Vec<(Identity, &'a NamedPorts)>,
{
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
                for (peer_identity, ports) in named_ports_of(identity) {
                    if let Some(number) = ports.get(&key) {
                        allows.insert(Allow {
                            identity: peer_identity,
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
