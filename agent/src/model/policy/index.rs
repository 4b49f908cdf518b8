//! The policy model kept up to date object by object: what each Namespace, Pod and
//! NetworkPolicy contributes is indexed (pods grouped by namespace and labels, each
//! group's matching peers, every address's class of peers), so a change recomputes
//! only what it can touch: the groups of a changed namespace or of a changed peer,
//! the addresses of changed pods and groups, the endpoints of this node whose
//! policies or peers moved. A full build is the same update with every object
//! changed, on an empty index: both compute the same model from the same objects.
//!
//! Identities are named by their class (a hash of the set of peers selecting its
//! addresses), not by the order classes were met, so an unchanged class keeps its
//! identity through any change (its addresses' ipcache entries do not move) and
//! after a restart. Two classes hashing alike (about one in 2^32 per pair) are told
//! apart in a full build; an update that meets one asks for a full build.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    allow_ports, check_policy, fnv1a, namespace_labels, policy_pod, Allow, CheckedPolicy,
    Direction, EndpointPolicy, Identity, NamedPorts, Peer, PeerRef, PolicyModel, PolicyPod,
    IDENTITY_ANY, IDENTITY_FIRST, IDENTITY_WORLD,
};
use crate::model::{namespace_of, NodeContext, Skipped};

mod query;

pub use query::{
    EndpointSources, NoPolicyNames, PodAddress, PolicyNames, PolicySource, MAX_SOURCE_ALLOWS,
};

type Labels = BTreeMap<String, String>;
/// The peers selecting an address: addresses with the same class share an identity.
type Class = BTreeSet<PeerRef>;

/// A namespaced object's name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: namespace_of(meta).to_string(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Changed objects that policies read, each as it is now (`None`: gone).
#[derive(Clone, Debug, Default)]
pub struct PolicyChanges {
    pub pods: Vec<(ObjectKey, Option<Arc<Pod>>)>,
    /// By name.
    pub namespaces: Vec<(String, Option<Arc<Namespace>>)>,
    pub network_policies: Vec<(ObjectKey, Option<Arc<NetworkPolicy>>)>,
}

impl PolicyChanges {
    /// Every object, as a change from nothing.
    pub fn everything(
        policies: &[Arc<NetworkPolicy>],
        namespaces: &[Arc<Namespace>],
        pods: &[Arc<Pod>],
    ) -> Self {
        Self {
            pods: pods
                .iter()
                .map(|p| (ObjectKey::of(&p.metadata), Some(p.clone())))
                .collect(),
            namespaces: namespaces
                .iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, Some(n.clone()))))
                .collect(),
            network_policies: policies
                .iter()
                .map(|p| (ObjectKey::of(&p.metadata), Some(p.clone())))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.namespaces.is_empty() && self.network_policies.is_empty()
    }
}

/// What an update changed in the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDelta {
    /// Prefixes whose ipcache entry changed: the identity now (`None`: no entry).
    pub ipcache: BTreeMap<Ipv4Net, Option<Identity>>,
    /// This node's policed pods whose policy changed: before, now (`None`: not policed).
    pub endpoints: BTreeMap<Ipv4Addr, (Option<EndpointPolicy>, Option<EndpointPolicy>)>,
}

/// Pods of one namespace with the same labels, and the selector peers that select
/// them (selectors are matched once per group, not per replica).
#[derive(Debug, Default)]
struct Group {
    members: BTreeSet<ObjectKey>,
    peers: Class,
}

/// The policy model of one node and the indexes that keep it up to date.
#[derive(Debug)]
pub struct PolicyIndex {
    node: String,
    node_ips: BTreeSet<Ipv4Addr>,
    /// Listed namespaces' labels (as selectors see them).
    namespaces: HashMap<String, Labels>,
    policies: BTreeMap<ObjectKey, CheckedPolicy>,
    policies_in: HashMap<String, BTreeSet<ObjectKey>>,
    /// Every distinct peer of the policies, with how many rules name it.
    peers: BTreeMap<PeerRef, usize>,
    pods: HashMap<ObjectKey, PolicyPod>,
    pods_at: BTreeMap<Ipv4Addr, BTreeSet<ObjectKey>>,
    /// This node's pods.
    local: BTreeSet<ObjectKey>,
    /// By namespace, then labels.
    groups: HashMap<String, HashMap<Labels, Group>>,
    /// The class of every prefix with an identity to give: pod and node addresses,
    /// ipBlock prefixes.
    class_of: BTreeMap<Ipv4Net, Class>,
    /// Classes in use, with how many prefixes have each and their identity.
    classes: HashMap<Class, ClassUse>,
    /// Classes in use by the identity their hash names (more than one: a collision).
    claims: HashMap<Identity, BTreeSet<Class>>,
    /// Identities of colliding classes but the first, set by a full build.
    overrides: HashMap<Class, Identity>,
    /// The identities of the classes each peer is part of.
    identities_of_peer: HashMap<PeerRef, BTreeSet<Identity>>,
    pods_of_identity: BTreeMap<Identity, BTreeSet<ObjectKey>>,
    /// ipBlock prefixes (and their excepts), and those shorter than /32 with an
    /// identity: a world entry inside one of those must be written.
    block_prefixes: BTreeSet<Ipv4Net>,
    identified_blocks: Vec<Ipv4Net>,
    model: PolicyModel,
    /// An update met a hash collision: only a full build numbers identities now.
    stale: bool,
}

/// A class in use: by how many prefixes, and its identity (hashed once).
#[derive(Debug)]
struct ClassUse {
    prefixes: usize,
    identity: Identity,
}

/// What one update has to recompute, collected as it applies the changes.
#[derive(Default)]
struct Dirty {
    namespaces: BTreeSet<String>,
    /// Peers added or removed.
    peers: BTreeSet<PeerRef>,
    /// By namespace.
    new_groups: HashMap<String, BTreeSet<Labels>>,
    prefixes: BTreeSet<Ipv4Net>,
    every_prefix: bool,
    /// Namespaces whose local pods' endpoints are recomputed.
    endpoint_namespaces: BTreeSet<String>,
    endpoints: BTreeSet<Ipv4Addr>,
    every_endpoint: bool,
    /// A pod with named ports changed or moved identity: egress rules naming ports
    /// may resolve differently.
    named_ports: bool,
}

impl PolicyIndex {
    fn empty(context: &NodeContext) -> Self {
        Self {
            node: context.name.clone(),
            node_ips: context.nodes.values().map(|n| n.ip).collect(),
            namespaces: HashMap::new(),
            policies: BTreeMap::new(),
            policies_in: HashMap::new(),
            peers: BTreeMap::new(),
            pods: HashMap::new(),
            pods_at: BTreeMap::new(),
            local: BTreeSet::new(),
            groups: HashMap::new(),
            class_of: BTreeMap::new(),
            classes: HashMap::new(),
            claims: HashMap::new(),
            overrides: HashMap::new(),
            identities_of_peer: HashMap::new(),
            pods_of_identity: BTreeMap::new(),
            block_prefixes: BTreeSet::new(),
            identified_blocks: Vec::new(),
            model: PolicyModel::default(),
            stale: false,
        }
    }

    /// The index of every NetworkPolicy, Namespace and Pod (of every node), for
    /// the node `context` is for.
    pub fn build(
        policies: &[Arc<NetworkPolicy>],
        namespaces: &[Arc<Namespace>],
        pods: &[Arc<Pod>],
        context: &NodeContext,
        skipped: &mut Vec<Skipped>,
    ) -> Self {
        let mut index = Self::empty(context);
        let dirty = Dirty {
            every_prefix: true,
            every_endpoint: true,
            ..Dirty::default()
        };
        let changes = PolicyChanges::everything(policies, namespaces, pods);
        index.apply(&changes, dirty, skipped);
        if index.claims.values().any(|classes| classes.len() > 1) {
            index.number_collisions();
        }
        index
    }

    /// The model: every address's identity, this node's policed pods.
    pub fn model(&self) -> &PolicyModel {
        &self.model
    }

    /// Apply `changes` and return what they changed in the model; `None` when only
    /// a full build can number the identities (a hash collision), after which the
    /// index must be rebuilt.
    pub fn update(
        &mut self,
        changes: &PolicyChanges,
        skipped: &mut Vec<Skipped>,
    ) -> Option<PolicyDelta> {
        if self.stale || !self.overrides.is_empty() {
            return None;
        }
        let delta = self.apply(changes, Dirty::default(), skipped);
        if self.stale {
            return None;
        }
        Some(delta)
    }

    fn apply(
        &mut self,
        changes: &PolicyChanges,
        mut dirty: Dirty,
        skipped: &mut Vec<Skipped>,
    ) -> PolicyDelta {
        for (name, namespace) in &changes.namespaces {
            self.set_namespace(name, namespace.as_deref(), &mut dirty);
        }
        for (key, policy) in &changes.network_policies {
            self.set_policy(key, policy.as_deref(), &mut dirty, skipped);
        }
        for (key, pod) in &changes.pods {
            self.set_pod(key, pod.as_deref(), &mut dirty);
        }
        if dirty
            .peers
            .iter()
            .any(|p| matches!(**p, Peer::Block { .. }))
        {
            dirty.every_prefix = true;
        }
        self.regroup(&mut dirty);
        let mut ipcache_before = BTreeMap::new();
        let mut classes_before = HashMap::new();
        self.reclassify(&mut dirty, &mut ipcache_before, &mut classes_before);
        self.renumber(&classes_before, &mut dirty);
        let mut endpoints_before = BTreeMap::new();
        self.recompute_endpoints(&dirty, &mut endpoints_before);
        let mut delta = PolicyDelta::default();
        for (prefix, before) in ipcache_before {
            let now = self.model.ipcache.get(&prefix).copied();
            if now != before {
                delta.ipcache.insert(prefix, now);
            }
        }
        for (ip, before) in endpoints_before {
            let now = self.model.endpoints.get(&ip).cloned();
            if now != before {
                delta.endpoints.insert(ip, (before, now));
            }
        }
        delta
    }

    fn namespace_labels_of(&self, namespace: &str) -> Labels {
        self.namespaces
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| namespace_labels(namespace, None))
    }

    fn set_namespace(&mut self, name: &str, namespace: Option<&Namespace>, dirty: &mut Dirty) {
        let before = self.namespace_labels_of(name);
        match namespace {
            Some(namespace) => {
                self.namespaces
                    .insert(name.to_string(), namespace_labels(name, Some(namespace)));
            }
            None => drop(self.namespaces.remove(name)),
        }
        if self.namespace_labels_of(name) != before {
            dirty.namespaces.insert(name.to_string());
        }
    }

    fn set_policy(
        &mut self,
        key: &ObjectKey,
        policy: Option<&NetworkPolicy>,
        dirty: &mut Dirty,
        skipped: &mut Vec<Skipped>,
    ) {
        if let Some(old) = self.policies.remove(key) {
            for peer in old.peers() {
                if let Some(count) = self.peers.get_mut(peer) {
                    *count -= 1;
                    if *count == 0 {
                        self.peers.remove(peer);
                        dirty.peers.insert(peer.clone());
                    }
                }
            }
            if let Some(keys) = self.policies_in.get_mut(&key.namespace) {
                keys.remove(key);
            }
            dirty.endpoint_namespaces.insert(old.namespace);
        }
        let Some(mut checked) = policy.and_then(|p| check_policy(p, skipped)) else {
            return;
        };
        // One allocation per distinct peer: equal peers then compare by address.
        for peer in checked.peers_mut() {
            if let Some((known, _)) = self.peers.get_key_value(peer) {
                *peer = known.clone();
            }
        }
        for peer in checked.peers() {
            let count = self.peers.entry(peer.clone()).or_default();
            *count += 1;
            if *count == 1 {
                dirty.peers.insert(peer.clone());
            }
        }
        self.policies_in
            .entry(checked.namespace.clone())
            .or_default()
            .insert(key.clone());
        dirty.endpoint_namespaces.insert(checked.namespace.clone());
        self.policies.insert(key.clone(), checked);
    }

    fn set_pod(&mut self, key: &ObjectKey, pod: Option<&Pod>, dirty: &mut Dirty) {
        let new = pod.and_then(policy_pod);
        if self.pods.get(key) == new.as_ref() {
            return;
        }
        if let Some(old) = self.pods.remove(key) {
            if let Some(groups) = self.groups.get_mut(&old.namespace) {
                if let Some(group) = groups.get_mut(&old.labels) {
                    group.members.remove(key);
                    if group.members.is_empty() {
                        groups.remove(&old.labels);
                    }
                }
                if groups.is_empty() {
                    self.groups.remove(&old.namespace);
                }
            }
            if let Some(keys) = self.pods_at.get_mut(&old.ip) {
                keys.remove(key);
                if keys.is_empty() {
                    self.pods_at.remove(&old.ip);
                }
            }
            let identity = self.identity_at(&Ipv4Net::from(old.ip));
            if let Some(keys) = self.pods_of_identity.get_mut(&identity) {
                keys.remove(key);
                if keys.is_empty() {
                    self.pods_of_identity.remove(&identity);
                }
            }
            self.local.remove(key);
            dirty.prefixes.insert(Ipv4Net::from(old.ip));
            dirty.endpoints.insert(old.ip);
            dirty.named_ports |= !old.named_ports.is_empty();
        }
        let Some(new) = new else { return };
        let group = self
            .groups
            .entry(new.namespace.clone())
            .or_default()
            .entry(new.labels.clone())
            .or_default();
        if group.members.is_empty() {
            dirty
                .new_groups
                .entry(new.namespace.clone())
                .or_default()
                .insert(new.labels.clone());
        }
        group.members.insert(key.clone());
        self.pods_at.entry(new.ip).or_default().insert(key.clone());
        if new.node.as_deref() == Some(self.node.as_str()) {
            self.local.insert(key.clone());
        }
        dirty.prefixes.insert(Ipv4Net::from(new.ip));
        dirty.endpoints.insert(new.ip);
        dirty.named_ports |= !new.named_ports.is_empty();
        self.pods.insert(key.clone(), new);
    }

    /// Recompute the selector peers of the groups the changes can touch; the
    /// addresses of a group whose peers changed are to be reclassified.
    fn regroup(&mut self, dirty: &mut Dirty) {
        let touched: Vec<PeerRef> = dirty
            .peers
            .iter()
            .filter(|p| matches!(***p, Peer::Pods { .. }))
            .cloned()
            .collect();
        for (namespace, groups) in &mut self.groups {
            let new_here = dirty.new_groups.get(namespace);
            let relabelled = dirty.namespaces.contains(namespace);
            if new_here.is_none() && !relabelled && touched.is_empty() {
                continue;
            }
            let namespace_labels = self
                .namespaces
                .get(namespace)
                .cloned()
                .unwrap_or_else(|| super::namespace_labels(namespace, None));
            // A peer's namespace part reads only the namespace's labels: unless they
            // changed, a touched peer that does not admit the namespace now never
            // did, and no group of it holds the peer.
            let touched_here: Vec<&PeerRef> = touched
                .iter()
                .filter(|p| relabelled || p.admits_namespace(namespace, &namespace_labels))
                .collect();
            if new_here.is_none() && !relabelled && touched_here.is_empty() {
                continue;
            }
            let mut candidates: Option<Vec<PeerRef>> = None;
            for (labels, group) in groups.iter_mut() {
                let new = new_here.is_some_and(|l| l.contains(labels));
                let mut changed = new;
                if new || relabelled {
                    let candidates = candidates.get_or_insert_with(|| {
                        self.peers
                            .keys()
                            .filter(|p| matches!(***p, Peer::Pods { .. }))
                            .filter(|p| p.admits_namespace(namespace, &namespace_labels))
                            .cloned()
                            .collect()
                    });
                    let peers: Class = candidates
                        .iter()
                        .filter(|p| p.selects_labels(labels))
                        .cloned()
                        .collect();
                    if peers != group.peers {
                        group.peers = peers;
                        changed = true;
                    }
                } else {
                    for peer in &touched_here {
                        let selects = self.peers.contains_key(*peer)
                            && peer.admits_namespace(namespace, &namespace_labels)
                            && peer.selects_labels(labels);
                        changed |= if selects {
                            group.peers.insert((*peer).clone())
                        } else {
                            group.peers.remove(*peer)
                        };
                    }
                }
                if changed {
                    for key in &group.members {
                        if let Some(pod) = self.pods.get(key) {
                            dirty.prefixes.insert(Ipv4Net::from(pod.ip));
                        }
                    }
                }
            }
        }
    }

    /// The class of `prefix` now (`None`: it needs no entry).
    fn class_for(&self, prefix: &Ipv4Net, block_peers: &[PeerRef]) -> Option<Class> {
        let blocks = block_peers.iter().filter(|p| p.contains(prefix)).cloned();
        let pod = (prefix.prefix_len() == 32)
            .then(|| self.pods_at.get(&prefix.addr()))
            .flatten()
            .and_then(|keys| keys.first())
            .and_then(|key| self.pods.get(key));
        if let Some(pod) = pod {
            let group = self
                .groups
                .get(&pod.namespace)
                .and_then(|groups| groups.get(&pod.labels));
            let mut class: Class = group.map(|g| g.peers.clone()).unwrap_or_default();
            class.extend(blocks);
            return Some(class);
        }
        let node = prefix.prefix_len() == 32 && self.node_ips.contains(&prefix.addr());
        (node || self.block_prefixes.contains(prefix)).then(|| blocks.collect())
    }

    fn identity_of(&self, class: &Class) -> Identity {
        if class.is_empty() {
            return IDENTITY_WORLD;
        }
        if let Some(used) = self.classes.get(class) {
            return used.identity;
        }
        self.overrides
            .get(class)
            .copied()
            .unwrap_or_else(|| class_hash(class, 0))
    }

    fn identity_at(&self, prefix: &Ipv4Net) -> Identity {
        self.class_of
            .get(prefix)
            .map_or(IDENTITY_WORLD, |class| self.identity_of(class))
    }

    /// The ipcache entry of a prefix: a world entry only matters inside a shorter
    /// prefix of another identity (an `except`, a pod in an ipBlock the pod's own
    /// peers do not select): without one, a missing entry already means the world.
    fn ipcache_entry(&self, prefix: &Ipv4Net) -> Option<Identity> {
        let class = self.class_of.get(prefix)?;
        let identity = self.identity_of(class);
        let inside_block = || {
            self.identified_blocks
                .iter()
                .any(|outer| outer.prefix_len() < prefix.prefix_len() && outer.contains(prefix))
        };
        (identity != IDENTITY_WORLD || inside_block()).then_some(identity)
    }

    /// Give every dirty prefix its class now, its pods their identity, and its
    /// ipcache entry (recording entries and classes as they were).
    fn reclassify(
        &mut self,
        dirty: &mut Dirty,
        ipcache_before: &mut BTreeMap<Ipv4Net, Option<Identity>>,
        classes_before: &mut HashMap<Class, bool>,
    ) {
        let block_peers: Vec<PeerRef> = self
            .peers
            .keys()
            .filter(|p| matches!(***p, Peer::Block { .. }))
            .cloned()
            .collect();
        if dirty.every_prefix {
            self.block_prefixes.clear();
            for peer in &block_peers {
                if let Peer::Block { cidr, except } = &**peer {
                    self.block_prefixes.insert(*cidr);
                    self.block_prefixes.extend(except.iter().copied());
                }
            }
            dirty.prefixes.extend(self.class_of.keys().copied());
            dirty
                .prefixes
                .extend(self.pods_at.keys().map(|ip| Ipv4Net::from(*ip)));
            dirty
                .prefixes
                .extend(self.node_ips.iter().map(|ip| Ipv4Net::from(*ip)));
            dirty.prefixes.extend(self.block_prefixes.iter().copied());
        }
        let prefixes = std::mem::take(&mut dirty.prefixes);
        for prefix in &prefixes {
            let new = self.class_for(prefix, &block_peers);
            let old_identity = self.identity_at(prefix);
            let old = match new {
                Some(class) => self.class_of.insert(*prefix, class),
                None => self.class_of.remove(prefix),
            };
            if old.as_ref() != self.class_of.get(prefix) {
                for class in old.iter().chain(self.class_of.get(prefix)) {
                    classes_before
                        .entry(class.clone())
                        .or_insert_with(|| self.classes.contains_key(class));
                }
                if let Some(old) = old {
                    if let Some(used) = self.classes.get_mut(&old) {
                        used.prefixes -= 1;
                        if used.prefixes == 0 {
                            self.classes.remove(&old);
                        }
                    }
                }
                if let Some(new) = self.class_of.get(prefix) {
                    match self.classes.get_mut(new) {
                        Some(used) => used.prefixes += 1,
                        None => {
                            let identity = self.identity_of(new);
                            let used = ClassUse {
                                prefixes: 1,
                                identity,
                            };
                            self.classes.insert(new.clone(), used);
                        }
                    }
                }
            }
            // Every pod at the address has its identity (the first one's class).
            let identity = self.identity_at(prefix);
            if prefix.prefix_len() == 32 {
                if let Some(keys) = self.pods_at.get(&prefix.addr()) {
                    for key in keys {
                        if let Some(set) = self.pods_of_identity.get_mut(&old_identity) {
                            set.remove(key);
                            if set.is_empty() {
                                self.pods_of_identity.remove(&old_identity);
                            }
                        }
                        self.pods_of_identity
                            .entry(identity)
                            .or_default()
                            .insert(key.clone());
                    }
                    if identity != old_identity
                        && keys
                            .iter()
                            .any(|k| self.pods.get(k).is_some_and(|p| !p.named_ports.is_empty()))
                    {
                        dirty.named_ports = true;
                    }
                }
            }
        }
        if dirty.every_prefix {
            self.identified_blocks = self
                .block_prefixes
                .iter()
                .filter(|p| p.prefix_len() < 32 && self.identity_at(p) != IDENTITY_WORLD)
                .copied()
                .collect();
        }
        let entries: Vec<Ipv4Net> = if dirty.every_prefix {
            self.model
                .ipcache
                .keys()
                .chain(self.class_of.keys())
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            prefixes.into_iter().collect()
        };
        for prefix in entries {
            ipcache_before
                .entry(prefix)
                .or_insert_with(|| self.model.ipcache.get(&prefix).copied());
            match self.ipcache_entry(&prefix) {
                Some(identity) => drop(self.model.ipcache.insert(prefix, identity)),
                None => drop(self.model.ipcache.remove(&prefix)),
            }
        }
    }

    /// Classes that came or went: their identities join or leave the peers'.
    fn renumber(&mut self, classes_before: &HashMap<Class, bool>, dirty: &mut Dirty) {
        for (class, was) in classes_before {
            let is = self.classes.contains_key(class);
            if *was == is || class.is_empty() {
                continue;
            }
            let hash = class_hash(class, 0);
            let identity = self.identity_of(class);
            if is {
                let claimants = self.claims.entry(hash).or_default();
                claimants.insert(class.clone());
                if claimants.len() > 1 {
                    self.stale = true;
                }
            } else if let Some(claimants) = self.claims.get_mut(&hash) {
                claimants.remove(class);
                if claimants.is_empty() {
                    self.claims.remove(&hash);
                }
            }
            for peer in class {
                let identities = self.identities_of_peer.entry(peer.clone()).or_default();
                if is {
                    identities.insert(identity);
                } else {
                    identities.remove(&identity);
                    if identities.is_empty() {
                        self.identities_of_peer.remove(peer);
                    }
                }
                dirty.peers.insert(peer.clone());
            }
        }
    }

    /// Recompute this node's endpoints that the changes can touch.
    fn recompute_endpoints(
        &mut self,
        dirty: &Dirty,
        before: &mut BTreeMap<Ipv4Addr, Option<EndpointPolicy>>,
    ) {
        let mut namespaces = dirty.endpoint_namespaces.clone();
        for policy in self.policies.values() {
            let names_dirty_peer = || policy.peers().any(|p| dirty.peers.contains(p));
            if (dirty.named_ports && policy.has_named_egress_port()) || names_dirty_peer() {
                namespaces.insert(policy.namespace.clone());
            }
        }
        let mut ips: BTreeSet<Ipv4Addr> = dirty.endpoints.clone();
        for key in &self.local {
            if dirty.every_endpoint || namespaces.contains(&key.namespace) {
                if let Some(pod) = self.pods.get(key) {
                    ips.insert(pod.ip);
                }
            }
        }
        if dirty.every_endpoint {
            ips.extend(self.model.endpoints.keys().copied());
        }
        for ip in ips {
            let now = self.endpoint_at(ip);
            let old = match now {
                Some(endpoint) => self.model.endpoints.insert(ip, endpoint),
                None => self.model.endpoints.remove(&ip),
            };
            before.entry(ip).or_insert(old);
        }
    }

    /// The policy of the pod of this node at `ip` (the first one listed there).
    fn endpoint_at(&self, ip: Ipv4Addr) -> Option<EndpointPolicy> {
        let (_, pod) = self.local_pod_at(ip)?;
        let mut endpoint = EndpointPolicy::default();
        for policy in self.policies_selecting(pod) {
            endpoint.policies.insert(policy.name.clone());
            let (ingress, egress) = self.allows_of_policy(policy, pod, &mut endpoint.allows);
            endpoint.ingress_isolated |= ingress;
            endpoint.egress_isolated |= egress;
        }
        (!endpoint.policies.is_empty()).then_some(endpoint)
    }

    /// The pod of this node at `ip` (the first one listed there).
    fn local_pod_at(&self, ip: Ipv4Addr) -> Option<(&ObjectKey, &PolicyPod)> {
        self.pods_at
            .get(&ip)?
            .iter()
            .find(|key| self.local.contains(*key))
            .and_then(|key| Some((key, self.pods.get(key)?)))
    }

    /// The policies of `pod`'s namespace that select it.
    fn policies_selecting<'a>(
        &'a self,
        pod: &'a PolicyPod,
    ) -> impl Iterator<Item = &'a CheckedPolicy> + 'a {
        self.policies_in
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .filter_map(|key| self.policies.get(key))
            .filter(|policy| policy.pods.matches(&pod.labels))
    }

    /// The named ports of the pods of `identity` (every pod's for `IDENTITY_ANY`).
    fn named_ports_of(&self, identity: Identity) -> Vec<(Identity, &NamedPorts)> {
        let pods_of = |(peer_identity, keys): (&Identity, &BTreeSet<ObjectKey>)| {
            keys.iter()
                .filter_map(|key| self.pods.get(key))
                .map(|pod| (*peer_identity, &pod.named_ports))
                .collect::<Vec<_>>()
        };
        if identity == IDENTITY_ANY {
            self.pods_of_identity.iter().flat_map(pods_of).collect()
        } else {
            self.pods_of_identity
                .get_key_value(&identity)
                .map(pods_of)
                .unwrap_or_default()
        }
    }

    /// What `policy` (which selects `pod`) gives it: the allows of its rules, added
    /// to `allows`; and whether it isolates the pod for ingress and for egress.
    fn allows_of_policy(
        &self,
        policy: &CheckedPolicy,
        pod: &PolicyPod,
        allows: &mut BTreeSet<Allow>,
    ) -> (bool, bool) {
        let named_ports_of = |identity: Identity| self.named_ports_of(identity);
        for (direction, rules) in [
            (Direction::Ingress, &policy.ingress),
            (Direction::Egress, &policy.egress),
        ] {
            for rule in rules.iter().flatten() {
                let identities: BTreeSet<Identity> = match &rule.peers {
                    None => BTreeSet::from([IDENTITY_ANY]),
                    Some(peers) => peers
                        .iter()
                        .filter_map(|p| self.identities_of_peer.get(p))
                        .flatten()
                        .copied()
                        .collect(),
                };
                for identity in identities {
                    allow_ports(direction, identity, rule, pod, &named_ports_of, allows);
                }
            }
        }
        (policy.ingress.is_some(), policy.egress.is_some())
    }

    /// Classes sharing a hash: the first (in class order) keeps it, the others get
    /// the next free one of their own sequence; then everything numbered by
    /// identity is redone.
    fn number_collisions(&mut self) {
        let mut taken: BTreeSet<Identity> = self.claims.keys().copied().collect();
        let mut colliding: Vec<(Identity, BTreeSet<Class>)> = self
            .claims
            .iter()
            .filter(|(_, classes)| classes.len() > 1)
            .map(|(identity, classes)| (*identity, classes.clone()))
            .collect();
        colliding.sort();
        for (_, classes) in colliding {
            for class in classes.into_iter().skip(1) {
                let identity = (1..)
                    .map(|attempt| class_hash(&class, attempt))
                    .find(|identity| !taken.contains(identity))
                    .expect("a free identity");
                taken.insert(identity);
                self.overrides.insert(class, identity);
            }
        }
        for (class, used) in &mut self.classes {
            if let Some(identity) = self.overrides.get(class) {
                used.identity = *identity;
            }
        }
        self.identities_of_peer.clear();
        for class in self.classes.keys() {
            let identity = self.identity_of(class);
            for peer in class {
                self.identities_of_peer
                    .entry(peer.clone())
                    .or_default()
                    .insert(identity);
            }
        }
        self.pods_of_identity.clear();
        for (ip, keys) in &self.pods_at {
            let identity = self.identity_at(&Ipv4Net::from(*ip));
            self.pods_of_identity
                .entry(identity)
                .or_default()
                .extend(keys.iter().cloned());
        }
        self.identified_blocks = self
            .block_prefixes
            .iter()
            .filter(|p| p.prefix_len() < 32 && self.identity_at(p) != IDENTITY_WORLD)
            .copied()
            .collect();
        let prefixes: Vec<Ipv4Net> = self.class_of.keys().copied().collect();
        self.model.ipcache.clear();
        for prefix in prefixes {
            if let Some(identity) = self.ipcache_entry(&prefix) {
                self.model.ipcache.insert(prefix, identity);
            }
        }
        let ips: Vec<Ipv4Addr> = self.model.endpoints.keys().copied().collect();
        for ip in ips {
            match self.endpoint_at(ip) {
                Some(endpoint) => drop(self.model.endpoints.insert(ip, endpoint)),
                None => drop(self.model.endpoints.remove(&ip)),
            }
        }
    }
}

/// The identity a class's hash names (`attempt` > 0: the next ones, for a
/// collision): FNV-1a over its peers' fingerprints, in the identities above the
/// reserved ones. Stable across restarts.
fn class_hash(class: &Class, attempt: u32) -> Identity {
    let mut hash = fnv1a(0xcbf2_9ce4_8422_2325, &attempt.to_le_bytes());
    for peer in class {
        hash = fnv1a(hash, &peer.fingerprint().to_le_bytes());
    }
    let span = u64::from(u32::MAX - IDENTITY_FIRST) + 1;
    IDENTITY_FIRST + u32::try_from(hash % span).expect("below the span")
}
