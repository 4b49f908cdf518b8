//! Which NetworkPolicies give a pod of this node what it allows: the index's own
//! per-policy computation (the one the model's endpoints are the union of), for
//! `ferrite explain` and `ferrite inspect policy` to name policies the maps do not
//! know. One pod per query: its cost is that of recomputing the pod's endpoint.
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{ObjectKey, PolicyIndex};
use crate::model::policy::{Allow, Direction, Identity, IDENTITY_ANY};

/// Allows a query answers with at most (all policies of the pod together): past
/// it, the answer says it is cut short.
pub const MAX_SOURCE_ALLOWS: usize = 16 * 1024;

/// A policy selecting a pod: the directions it isolates the pod for, and the allows
/// it gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySource {
    /// `namespace/name`.
    pub name: String,
    pub ingress: bool,
    pub egress: bool,
    pub allows: Vec<Allow>,
}

/// The policies of one pod of this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSources {
    /// `namespace/name`.
    pub pod: String,
    pub address: Ipv4Addr,
    /// By name.
    pub policies: Vec<PolicySource>,
    /// Allows were left out past [`MAX_SOURCE_ALLOWS`].
    #[serde(default)]
    pub truncated: bool,
}

impl EndpointSources {
    /// The policies selecting the pod for `direction`.
    pub fn selecting(&self, direction: Direction) -> Vec<&str> {
        self.policies
            .iter()
            .filter(|p| match direction {
                Direction::Ingress => p.ingress,
                Direction::Egress => p.egress,
            })
            .map(|p| p.name.as_str())
            .collect()
    }

    /// The policies with an allow that lets a peer of `identity` through in
    /// `direction` over `protocol` to `port`: the same match as the datapath's
    /// lookup (the peer's identity or any peer; the protocol or any; a port range
    /// holding the port, or any port).
    pub fn allowing(
        &self,
        direction: Direction,
        identity: Identity,
        protocol: u8,
        port: u16,
    ) -> Vec<&str> {
        let matches = |allow: &Allow| {
            allow.direction == direction
                && (allow.identity == identity || allow.identity == IDENTITY_ANY)
                && (allow.protocol == 0 || allow.protocol == protocol)
                && allow
                    .ports
                    .is_none_or(|(first, last)| (first..=last).contains(&port))
        };
        self.policies
            .iter()
            .filter(|p| p.allows.iter().any(matches))
            .map(|p| p.name.as_str())
            .collect()
    }
}

/// Where the pod `namespace/name` is, for policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodAddress {
    /// A pod of this node at this address.
    Here(Ipv4Addr),
    /// A pod of another node (its name), at this address.
    Elsewhere(Ipv4Addr, Option<String>),
    /// No such pod with an address policies see (unknown, not running yet, finished,
    /// or on the host's network: never policed).
    Unknown,
}

impl PolicyIndex {
    /// The policies selecting the pod of this node at `address`, each with what it
    /// gives the pod; `None` when no pod of this node is there. A policy may give an
    /// allow another gives too: each lists it.
    pub fn endpoint_sources(&self, address: Ipv4Addr) -> Option<EndpointSources> {
        let (key, pod) = self.local_pod_at(address)?;
        let mut budget = MAX_SOURCE_ALLOWS;
        let mut truncated = false;
        let mut policies = Vec::new();
        for policy in self.policies_selecting(pod) {
            let mut allows = std::collections::BTreeSet::new();
            let (ingress, egress) = self.allows_of_policy(policy, pod, &mut allows);
            let kept = allows.len().min(budget);
            truncated |= kept < allows.len();
            budget -= kept;
            policies.push(PolicySource {
                name: policy.name.clone(),
                ingress,
                egress,
                allows: allows.into_iter().take(kept).collect(),
            });
        }
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        Some(EndpointSources {
            pod: format!("{}/{}", key.namespace, key.name),
            address,
            policies,
            truncated,
        })
    }

    /// The address of the pod `namespace/name`, as policies see it.
    pub fn pod_address(&self, namespace: &str, name: &str) -> PodAddress {
        let key = ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match self.pods.get(&key) {
            None => PodAddress::Unknown,
            Some(pod) if self.local.contains(&key) => PodAddress::Here(pod.ip),
            Some(pod) => PodAddress::Elsewhere(pod.ip, pod.node.clone()),
        }
    }
}

/// Where the tools (`ferrite explain`, `inspect policy`) learn policy names: the
/// node's running agent, from its index. `Err`: why it cannot answer (not
/// reachable, no synced model); the tools then say what the maps say without names.
pub trait PolicyNames {
    /// The policies of the pod of this node at `address` (`None`: no pod of this
    /// node is there, as the agent's model has it).
    fn pod_policies(&self, address: Ipv4Addr) -> Result<Option<EndpointSources>, String>;
    /// Where the pod `namespace/name` is.
    fn pod_address(&self, namespace: &str, name: &str) -> Result<PodAddress, String>;
}

/// Policy names from nowhere: every answer is `reason`.
pub struct NoPolicyNames(pub String);

impl PolicyNames for NoPolicyNames {
    fn pod_policies(&self, _: Ipv4Addr) -> Result<Option<EndpointSources>, String> {
        Err(self.0.clone())
    }

    fn pod_address(&self, _: &str, _: &str) -> Result<PodAddress, String> {
        Err(self.0.clone())
    }
}
