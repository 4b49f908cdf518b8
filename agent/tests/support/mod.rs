//! A node's control plane without a kernel: the objects a source holds, the map
//! image the agent's writes leave, and the agent's own pure steps (`plan::FullPlan`
//! for full syncs, `plan::NodeState::plan_services` for Service updates,
//! `plan_policy` for Pod, Namespace and NetworkPolicy changes), driven as the
//! Kubernetes source drives them: a Node change is a full sync, a Service or
//! EndpointSlice change an update of the Services it names, a Pod, Namespace or
//! NetworkPolicy change a policy update (a full sync when it changes more, or comes
//! with Service changes).
#![allow(dead_code)] // each test binary uses part of it

mod render;

pub use render::render;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ferrite_agent::{
    limits::Limits,
    model::{
        self,
        objects::EndpointSlice,
        policy::{ObjectKey as PolicyObject, PolicyChanges},
        ClusterObjects, ServiceRef,
    },
    objects_yaml::parse_objects,
    plan::{FullPlan, Interface, LbFamily, MapContents, NodeSettings, NodeState, Op},
};
use ferrite_common::{
    pod_mac_for, service_scope, Endpoint6Key, EndpointInfo, EndpointKey, Service6Key,
    HOST_VETH_MAC, VXLAN_DEVICE,
};

/// Which way the last change was synced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Synced {
    Full,
    /// An update of these Services.
    Services(BTreeSet<ServiceRef>),
    /// These Services changed, but one shares a claim: done as a full sync.
    FullForServices(BTreeSet<ServiceRef>),
    /// A policy update for these objects (`Kind namespace/name`).
    Policy(Vec<String>),
    /// These objects changed more than policy: done as a full sync.
    FullForPolicy(Vec<String>),
}

/// One node's agent over a map image.
pub struct SimNode {
    pub settings: NodeSettings,
    /// What the source holds, each kind in the order objects first appeared.
    pub objects: ClusterObjects,
    /// What the maps hold.
    pub maps: MapContents,
    state: Option<NodeState>,
    pub last_ops: Vec<Op>,
    pub last_sync: Option<Synced>,
    /// What the last sync left out, and why (as the agent logs it).
    pub last_skipped: Vec<String>,
    /// Host veths of pods the CNI plugin wired (namespace/name), whether or not a
    /// Pod object names them.
    pub cni_pods: BTreeSet<(String, String)>,
    /// Each host veth's index, given when it first appears (kept while it exists).
    ifindexes: BTreeMap<String, u32>,
}

/// An object's identity: kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

fn key_of(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: if kind == "Node" || kind == "Namespace" {
            String::new()
        } else {
            model::namespace_of(meta).to_string()
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Replace the object keyed like `new` in `list`, or append it; returns the old one.
fn upsert<T>(list: &mut Vec<Arc<T>>, new: Arc<T>, key: impl Fn(&T) -> ObjectKey) -> Option<Arc<T>> {
    let wanted = key(&new);
    match list.iter_mut().find(|o| key(o) == wanted) {
        Some(slot) => Some(std::mem::replace(slot, new)),
        None => {
            list.push(new);
            None
        }
    }
}

impl SimNode {
    pub fn new(node: &str, limits: Limits) -> Self {
        Self {
            settings: NodeSettings {
                node: node.into(),
                limits,
                ..NodeSettings::default()
            },
            objects: ClusterObjects::default(),
            maps: MapContents::default(),
            state: None,
            last_ops: Vec::new(),
            last_sync: None,
            last_skipped: Vec::new(),
            cni_pods: BTreeSet::new(),
            ifindexes: BTreeMap::new(),
        }
    }

    /// The host veths there are: one for each Pod object of this node and each pod
    /// the CNI plugin wired.
    fn veth_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self
            .cni_pods
            .iter()
            .map(|(namespace, name)| model::pod_interface_name(namespace, name))
            .collect();
        for pod in &self.objects.pods {
            let on_this_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                == Some(self.settings.node.as_str());
            if let (true, Some(name)) = (on_this_node, pod.metadata.name.as_deref()) {
                names.insert(model::pod_interface_name(
                    model::namespace_of(&pod.metadata),
                    name,
                ));
            }
        }
        names
    }

    /// Give new host veths their index (10, 11, ... in order of appearance).
    fn number_veths(&mut self) {
        for name in self.veth_names() {
            let next = 10 + self.ifindexes.len() as u32;
            self.ifindexes.entry(name).or_insert(next);
        }
    }

    /// The node's interfaces: the VXLAN device, and a veth for each pod of this node
    /// (each keeps its index while it exists).
    fn interfaces(&self) -> BTreeMap<String, Interface> {
        let names = self.veth_names();
        let mut interfaces = BTreeMap::from([(
            VXLAN_DEVICE.to_string(),
            Interface {
                ifindex: 2,
                mac: [2, 0, 0, 0, 0, 2],
                mtu: 1450,
            },
        )]);
        for name in names {
            let ifindex = self.ifindexes[&name];
            interfaces.insert(
                name,
                Interface {
                    ifindex,
                    mac: [2, 0, 0, 0, 1, ifindex as u8],
                    mtu: 1450,
                },
            );
        }
        interfaces
    }

    /// A full sync as the agent makes one: every object, against the maps, keeping
    /// the ids of its last write.
    pub fn full_sync(&mut self) {
        self.number_veths();
        let ids_from = self.state.as_ref().map(|s| s.written.contents.clone());
        let plan = self.full_plan(ids_from.as_ref());
        self.write(&plan.ops);
        self.last_skipped = plan.skipped.iter().map(ToString::to_string).collect();
        self.state = Some(plan.into_state());
        self.last_sync = Some(Synced::Full);
    }

    fn full_plan(&self, ids_from: Option<&MapContents>) -> FullPlan {
        let (context, _) = model::NodeContext::new(
            &self.settings.node,
            &self.settings.limits,
            &self.objects.nodes,
            self.state.as_ref().map(|s| &s.context),
        );
        FullPlan::new(
            &self.objects,
            context,
            &self.interfaces(),
            &self.maps,
            ids_from,
            &self.settings,
        )
    }

    /// The writes a full sync would make now (none, if the maps are right).
    pub fn full_sync_would_write(&self) -> Vec<Op> {
        let ids_from = self.state.as_ref().map(|s| &s.written.contents);
        self.full_plan(ids_from).ops
    }

    /// The maps' meaning from a full sync of the objects onto empty maps: what each
    /// frontend balances over and rewrites replies to, whatever the ids.
    pub fn meaning_from_scratch(&self) -> Meaning {
        let mut fresh = SimNode::new(&self.settings.node, self.settings.limits.clone());
        fresh.objects = self.objects.clone();
        fresh.full_sync();
        meaning(&fresh.maps)
    }

    /// Update the Services `changed` as the agent does; a full sync when it must.
    pub fn sync_services(&mut self, changed: BTreeSet<ServiceRef>) {
        let objects = self.objects_of(&changed);
        let capacities = self.settings.capacities;
        let plan = self
            .state
            .as_ref()
            .and_then(|state| state.plan_services(&changed, &objects, &capacities));
        match plan {
            Some(plan) => {
                self.write(&plan.ops);
                self.last_skipped = plan.skipped.iter().map(ToString::to_string).collect();
                self.state.as_mut().expect("planned from it").commit(plan);
                self.last_sync = Some(Synced::Services(changed));
            }
            None => {
                self.full_sync();
                self.last_sync = Some(Synced::FullForServices(changed));
            }
        }
    }

    /// What the Kubernetes source hands over for `changed`: their Services (oldest
    /// first; file order here, as no object has a creationTimestamp) and slices.
    fn objects_of(&self, changed: &BTreeSet<ServiceRef>) -> ClusterObjects {
        ClusterObjects {
            services: self
                .objects
                .services
                .iter()
                .filter(|s| model::service_ref_of(s).is_some_and(|s| changed.contains(&s)))
                .cloned()
                .collect(),
            endpoint_slices: self
                .objects
                .endpoint_slices
                .iter()
                .filter(|s| model::slice_service(s).is_some_and(|s| changed.contains(&s)))
                .cloned()
                .collect(),
            ..ClusterObjects::default()
        }
    }

    fn write(&mut self, ops: &[Op]) {
        self.maps.apply(ops);
        self.last_ops = ops.to_vec();
    }

    /// The CNI plugin wires pod `namespace/name` at `ip` (and `ip6`, dual-stack)
    /// before the agent hears of it: its host veth appears and the plugin writes its
    /// endpoint entries (not marked as the agent's). Then the agent's periodic full
    /// resync runs.
    pub fn cni_wire(&mut self, namespace: &str, name: &str, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) {
        self.cni_pods.insert((namespace.into(), name.into()));
        self.number_veths();
        let ifindex = self.ifindexes[&model::pod_interface_name(namespace, name)];
        let entry = EndpointInfo {
            ifindex,
            pod_mac: pod_mac_for(ip),
            host_mac: HOST_VETH_MAC,
            flags: 0,
        };
        self.maps.apply(&[Op::PutEndpoint(
            EndpointKey {
                address: ip.octets(),
            },
            entry,
        )]);
        if let Some(ip6) = ip6 {
            let key6 = Endpoint6Key {
                address: ip6.octets(),
            };
            self.maps.apply(&[Op::PutEndpoint6(key6, entry)]);
        }
        self.full_sync();
    }

    /// Create or replace the objects of `yaml`, then sync as the Kubernetes source
    /// would have the agent sync them.
    pub fn apply(&mut self, yaml: &str) {
        let (objects, skipped) = parse_objects(yaml).expect("objects");
        assert!(skipped.is_empty(), "unreadable objects: {skipped:?}");
        let mut changed = BTreeSet::new();
        let mut full = false;
        for service in objects.services {
            changed.extend(model::service_ref_of(&service));
            upsert(&mut self.objects.services, service, |s| {
                key_of("Service", &s.metadata)
            });
        }
        for slice in objects.endpoint_slices {
            changed.extend(model::slice_service(&slice));
            let old = upsert(&mut self.objects.endpoint_slices, slice, slice_key);
            changed.extend(old.and_then(|old| model::slice_service(&old)));
        }
        for node in objects.nodes {
            full = true;
            upsert(&mut self.objects.nodes, node, |n| {
                key_of("Node", &n.metadata)
            });
        }
        let mut policy = PolicyChanges::default();
        for pod in objects.pods {
            policy
                .pods
                .push((PolicyObject::of(&pod.metadata), Some(pod.clone())));
            upsert(&mut self.objects.pods, pod, |p| key_of("Pod", &p.metadata));
        }
        for namespace in objects.namespaces {
            let name = namespace.metadata.name.clone().unwrap_or_default();
            policy.namespaces.push((name, Some(namespace.clone())));
            upsert(&mut self.objects.namespaces, namespace, |n| {
                key_of("Namespace", &n.metadata)
            });
        }
        for network_policy in objects.network_policies {
            policy.network_policies.push((
                PolicyObject::of(&network_policy.metadata),
                Some(network_policy.clone()),
            ));
            upsert(&mut self.objects.network_policies, network_policy, |p| {
                key_of("NetworkPolicy", &p.metadata)
            });
        }
        // The Kubernetes source hands Service and policy changes over together as
        // a full sync.
        let full = full || (!changed.is_empty() && !policy.is_empty());
        self.sync_change(full, changed, policy);
    }

    /// Delete an object (`namespace` empty for a Node), then sync.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) {
        let matches = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            meta.name.as_deref() == Some(name)
                && (kind == "Node" || model::namespace_of(meta) == namespace)
        };
        let mut changed = BTreeSet::new();
        let mut full = false;
        let mut policy = PolicyChanges::default();
        let key = || PolicyObject {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match kind {
            "Service" => {
                let before = self.objects.services.len();
                self.objects.services.retain(|s| !matches(&s.metadata));
                assert_ne!(
                    before,
                    self.objects.services.len(),
                    "no Service {namespace}/{name}"
                );
                changed.insert(ServiceRef {
                    namespace: namespace.into(),
                    name: name.into(),
                });
            }
            "EndpointSlice" => {
                let gone: Vec<_> = self
                    .objects
                    .endpoint_slices
                    .iter()
                    .filter(|s| matches(&s.metadata))
                    .cloned()
                    .collect();
                assert!(!gone.is_empty(), "no EndpointSlice {namespace}/{name}");
                changed.extend(gone.iter().filter_map(|s| model::slice_service(s)));
                self.objects
                    .endpoint_slices
                    .retain(|s| !matches(&s.metadata));
            }
            "Node" => {
                full = true;
                self.objects.nodes.retain(|n| !matches(&n.metadata));
            }
            "Pod" => {
                self.objects.pods.retain(|p| !matches(&p.metadata));
                policy.pods.push((key(), None));
            }
            "NetworkPolicy" => {
                self.objects
                    .network_policies
                    .retain(|p| !matches(&p.metadata));
                policy.network_policies.push((key(), None));
            }
            "Namespace" => {
                self.objects
                    .namespaces
                    .retain(|n| n.metadata.name.as_deref() != Some(name));
                policy.namespaces.push((name.to_string(), None));
            }
            other => panic!("unknown kind {other}"),
        }
        self.sync_change(full, changed, policy);
    }

    /// Sync the changes of Pods, Namespaces and NetworkPolicies as the agent does:
    /// a policy update, or a full sync when they change more than policy.
    pub fn sync_policy(&mut self, changes: &PolicyChanges) {
        let names = describe_policy_changes(changes);
        let plan = self
            .state
            .as_mut()
            .and_then(|state| state.plan_policy(changes));
        match plan {
            Some(plan) => {
                self.write(&plan.ops);
                self.last_skipped = plan.skipped.iter().map(ToString::to_string).collect();
                self.state
                    .as_mut()
                    .expect("planned from it")
                    .commit_policy(plan);
                self.last_sync = Some(Synced::Policy(names));
            }
            None => {
                self.full_sync();
                self.last_sync = Some(Synced::FullForPolicy(names));
            }
        }
    }

    fn sync_change(&mut self, full: bool, changed: BTreeSet<ServiceRef>, policy: PolicyChanges) {
        if full || self.state.is_none() {
            self.full_sync();
        } else if !changed.is_empty() {
            self.sync_services(changed);
        } else if !policy.is_empty() {
            self.sync_policy(&policy);
        } else {
            self.last_ops.clear();
            self.last_skipped.clear();
            self.last_sync = None;
        }
    }

    /// What every sync must leave: the agent's record of the maps is the maps, and a
    /// full sync of the same objects would write nothing (an update wrote exactly
    /// what a full sync writes), and means what a full sync onto empty maps means.
    pub fn check_incremental_means_full(&self, step: &str) {
        let state = self.state.as_ref().expect("synced");
        assert!(
            state.written.contents == self.maps,
            "{step}: the agent's record of the maps is not what they hold"
        );
        let would = self.full_sync_would_write();
        assert!(
            would.is_empty(),
            "{step}: a full sync of the same objects would still write:\n{}",
            would.iter().map(render).collect::<Vec<_>>().join("\n")
        );
        assert_eq!(
            meaning(&self.maps),
            self.meaning_from_scratch(),
            "{step}: the maps mean something else than a full sync from scratch"
        );
        // The IPv6 half of the model is one truth too, and the lb6 maps hold it.
        let ids_from = Some(&state.written.contents);
        assert_eq!(
            state.services6(),
            &self.full_plan(ids_from).state.services6,
            "{step}: the IPv6 frontends differ from a full sync's"
        );
        let written6: BTreeSet<Service6Key> = self
            .maps
            .services6
            .keys()
            .filter(|k| k.backend_slot == 0 && k.scope == service_scope::ALL)
            .copied()
            .collect();
        let modelled6: BTreeSet<Service6Key> = state
            .services6()
            .keys()
            .map(|frontend| Ipv6Addr::service_key(frontend, 0))
            .collect();
        assert_eq!(
            written6, modelled6,
            "{step}: the lb6 maps do not hold the model's IPv6 frontends"
        );
    }
}

fn slice_key(slice: &EndpointSlice) -> ObjectKey {
    key_of("EndpointSlice", &slice.metadata)
}

/// Frontend -> (kind flags, backend addresses in slot order, rev-NAT target,
/// affinity): what one family's Service maps mean, whatever ids they use.
pub type FamilyMeaning<A> = BTreeMap<
    <A as LbFamily>::ServiceKey,
    (
        u32,
        Vec<<A as LbFamily>::Backend>,
        <A as LbFamily>::RevNat,
        u32,
    ),
>;

/// What the Service maps of both families mean.
pub type Meaning = (FamilyMeaning<Ipv4Addr>, FamilyMeaning<Ipv6Addr>);

pub fn meaning(maps: &MapContents) -> Meaning {
    (meaning_of::<Ipv4Addr>(maps), meaning_of::<Ipv6Addr>(maps))
}

fn meaning_of<A: LbFamily>(maps: &MapContents) -> FamilyMeaning<A> {
    let services = A::services(maps);
    services
        .iter()
        .filter(|(k, _)| A::slot(k) == 0)
        .map(|(key, master)| {
            let backends = (1..=master.count)
                .map(|slot| {
                    let slot = services[&A::at(key, A::scope(key), slot)];
                    A::backends(maps)[&slot.backend_id]
                })
                .collect();
            let rev_nat = A::rev_nat(maps)[&master.rev_nat_index];
            (
                *key,
                (master.flags, backends, rev_nat, master.affinity_timeout_s),
            )
        })
        .collect()
}

/// The objects of policy changes, as `Kind namespace/name`.
fn describe_policy_changes(changes: &PolicyChanges) -> Vec<String> {
    let object = |kind: &str, key: &PolicyObject| format!("{kind} {}/{}", key.namespace, key.name);
    changes
        .pods
        .iter()
        .map(|(key, _)| object("Pod", key))
        .chain(
            changes
                .namespaces
                .iter()
                .map(|(name, _)| format!("Namespace {name}")),
        )
        .chain(
            changes
                .network_policies
                .iter()
                .map(|(key, _)| object("NetworkPolicy", key)),
        )
        .collect()
}

/// How the last change was synced, as a golden file's first line shows it.
pub fn describe_sync(synced: &Option<Synced>) -> String {
    let names = |services: &BTreeSet<ServiceRef>| {
        services
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    match synced {
        None => "# nothing to sync".into(),
        Some(Synced::Full) => "# full sync".into(),
        Some(Synced::Services(s)) => format!("# update of {}", names(s)),
        Some(Synced::FullForServices(s)) => {
            format!("# full sync for {} (a shared claim)", names(s))
        }
        Some(Synced::Policy(objects)) => format!("# policy update of {}", objects.join(", ")),
        Some(Synced::FullForPolicy(objects)) => {
            format!("# full sync for {} (not only policy)", objects.join(", "))
        }
    }
}
