//! The node's state as the agent last wrote it, and the two ways it moves on: a full
//! sync of every object, and an update of some Services. Both build Services with
//! the same `model::build_services` against the same node context (the last full
//! sync's, kept here), and both write through the same ordered diff, so an update
//! writes what a full sync of the same objects would (the golden tests check it).
//! Pure: the agent reads the maps and interfaces, writes the ops, then commits.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use super::{
    desired_contents_keeping_ids, diff, policy::policy_update, service_update, settle_pod_claims,
    update::Changed, Capacities, Interface, MapContents, NodeSettings, Op, Written,
};
use crate::model::{
    self,
    policy::{ObjectKey, PolicyChanges, PolicyIndex},
    service_ref_of, ClusterObjects, DesiredState, FrontendIndex, FrontendKind, HealthCheck, L4Addr,
    L4Addr6, LocalPod, NodeContext, Protocol, ServiceFrontend6, ServiceRef, ServicesModel, Skipped,
};

/// A node's policy index, shared with the readers that answer queries from it.
pub type SharedPolicy = Arc<RwLock<PolicyIndex>>;

/// What the node last wrote, from what, and who owns each Service entry.
#[derive(Debug)]
pub struct NodeState {
    /// The last full sync's node context: every update builds its Services in it.
    pub context: NodeContext,
    /// The maps as last written.
    pub written: Written,
    /// The Service each frontend belongs to, and each Service's frontends.
    owner_of: HashMap<L4Addr, ServiceRef>,
    frontends_of: HashMap<ServiceRef, Vec<L4Addr>>,
    /// The IPv6 frontends, by Service (`owner_of` and `frontends_of` for IPv6).
    services6: FrontendIndex<std::net::Ipv6Addr>,
    /// Health-check ports served, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Services that share a claim with another: changing one needs a full sync.
    contenders: BTreeSet<ServiceRef>,
    /// The TCP ports pods have as hostPorts: a Service asking for one as its
    /// healthCheckNodePort needs a full sync (which keeps it the Service's).
    host_port_ports: BTreeSet<u16>,
    /// The policy model and its indexes: Pod, Namespace and NetworkPolicy changes
    /// update it; `ferrite explain` and `inspect policy` ask it (through the
    /// monitor socket) which policies give what.
    policy: SharedPolicy,
    /// This node's pods as the last full sync wired them (also those refused an
    /// address another pod has), by name: a Pod change that leaves its wiring as it
    /// is changes only policy.
    local_pods: HashMap<ObjectKey, LocalPod>,
    /// This node's pods the last full sync refused (as the model's `refused_pods`).
    refused_pods: BTreeSet<(String, String)>,
    /// The IPv6 address of each of this node's pods with one, by its IPv4 address
    /// (as the last full sync wired them): a policy update isolates both entries.
    pod_ip6: HashMap<Ipv4Addr, Ipv6Addr>,
}

/// A full sync's plan: the model of every object in the context their Nodes make,
/// and the ordered writes that take the maps from what they hold to it.
#[derive(Debug)]
pub struct FullPlan {
    pub context: NodeContext,
    pub state: DesiredState,
    /// The index the state's policy part comes from (shared from the start: readers
    /// get it before the maps are written from it).
    pub policy: SharedPolicy,
    pub ops: Vec<Op>,
    /// What the maps hold once `ops` are written.
    pub written: MapContents,
    pub skipped: Vec<Skipped>,
}

impl FullPlan {
    /// Plan a full sync of `objects` in `context` (made from their Nodes), from the
    /// maps' `current` contents, keeping the ids `ids_from` gives values (the agent's
    /// own last write, else `current`).
    pub fn new(
        objects: &ClusterObjects,
        context: NodeContext,
        interfaces: &BTreeMap<String, Interface>,
        current: &MapContents,
        ids_from: Option<&MapContents>,
        settings: &NodeSettings,
    ) -> Self {
        let (mut state, policy, mut skipped) = model::build_with_policy_index(objects, &context);
        settle_pod_claims(&mut state, &mut skipped, interfaces, current);
        let (mut written, more) = desired_contents_keeping_ids(
            &state,
            interfaces,
            current,
            ids_from.unwrap_or(current),
            settings,
        );
        skipped.extend(more);
        let ops = diff(current, &written);
        // The desired contents plus what the diff adds of its own (the route epoch).
        written.apply(&ops);
        Self {
            context,
            state,
            policy: Arc::new(RwLock::new(policy)),
            ops,
            written,
            skipped,
        }
    }

    /// The node's state once the plan is written.
    pub fn into_state(mut self) -> NodeState {
        let mut node = NodeState {
            context: self.context,
            written: Written::new(self.written),
            owner_of: HashMap::new(),
            frontends_of: HashMap::new(),
            services6: FrontendIndex::new(self.state.services6),
            health_checks: BTreeMap::new(),
            contenders: BTreeSet::new(),
            host_port_ports: BTreeSet::new(),
            policy: self.policy,
            refused_pods: std::mem::take(&mut self.state.refused_pods),
            local_pods: self
                .state
                .pods
                .values()
                .chain(&self.state.pod_rivals)
                .map(|pod| {
                    let key = ObjectKey {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                    };
                    (key, pod.clone())
                })
                .collect(),
            pod_ip6: self
                .state
                .pods
                .iter()
                .filter_map(|(ip, pod)| Some((*ip, pod.ip6?)))
                .collect(),
        };
        node.record(ServicesModel {
            frontends: self.state.services,
            frontends6: BTreeMap::new(),
            health_checks: self.state.health_checks,
            contenders: self.state.contenders,
        });
        node
    }
}

/// The writes that update some Services, and what they become.
#[derive(Debug)]
pub struct ServicesPlan {
    pub ops: Vec<Op>,
    pub skipped: Vec<Skipped>,
    changed: BTreeSet<ServiceRef>,
    model: ServicesModel,
}

impl ServicesPlan {
    /// The health checks the changed Services have now.
    pub fn health_checks(&self) -> &BTreeMap<u16, HealthCheck> {
        &self.model.health_checks
    }
}

/// The writes of a change of Pods, Namespaces or NetworkPolicies that only policy
/// reads.
#[derive(Debug)]
pub struct PolicyPlan {
    pub ops: Vec<Op>,
    pub skipped: Vec<Skipped>,
}

impl NodeState {
    /// The writes that bring the policy maps to what `changes` make of them, in time
    /// proportional to what the changes touch. `None`: a full sync must do it (a
    /// changed Pod of this node is wired differently, or is refused; or identities
    /// need renumbering, after which only a full sync plans policy again).
    /// Updates the policy index: the plan must be committed, or the node's state
    /// dropped.
    pub fn plan_policy(&mut self, changes: &PolicyChanges) -> Option<PolicyPlan> {
        for (key, pod) in &changes.pods {
            if self
                .refused_pods
                .contains(&(key.namespace.clone(), key.name.clone()))
            {
                return None;
            }
            let wired = match pod.as_deref().map(|p| model::local_pod(p, &self.context)) {
                None | Some(Ok(None)) => None,
                Some(Ok(Some(local))) => Some(local),
                Some(Err(_)) => return None,
            };
            if wired.as_ref() != self.local_pods.get(key) {
                return None;
            }
            // A hostPort of this node's pod, asked for or held: its frontends are
            // the full sync's to settle (which pod keeps a contested port).
            let holds_host_ports = self.frontends_of.contains_key(&ServiceRef {
                namespace: key.namespace.clone(),
                name: format!("pod/{}", key.name),
            });
            let asks_for_host_ports =
                wired.is_some() && pod.as_deref().is_some_and(model::has_host_ports);
            if holds_host_ports || asks_for_host_ports {
                return None;
            }
        }
        let mut skipped = Vec::new();
        let mut policy = self.policy.write().unwrap_or_else(|e| e.into_inner());
        let delta = policy.update(changes, &mut skipped)?;
        drop(policy);
        let ops = policy_update(&self.written.contents, &delta, |ip| {
            self.pod_ip6.get(&ip).copied()
        });
        Some(PolicyPlan { ops, skipped })
    }

    /// Record `plan` as written.
    pub fn commit_policy(&mut self, plan: PolicyPlan) {
        self.written.apply(&plan.ops);
    }

    /// The writes that bring the Services `changed` to what `objects` say of them now
    /// (their Services and EndpointSlices; a Service absent there is gone), in time
    /// proportional to their entries. `None`: only a full sync can decide it (one of
    /// them shares a frontend or health-check port with another Service).
    pub fn plan_services(
        &self,
        changed: &BTreeSet<ServiceRef>,
        objects: &ClusterObjects,
        capacities: &Capacities,
    ) -> Option<ServicesPlan> {
        if changed.iter().any(|s| self.contenders.contains(s)) {
            return None;
        }
        let services: Vec<_> = objects
            .services
            .iter()
            .filter(|s| service_ref_of(s).is_some_and(|s| changed.contains(&s)))
            .cloned()
            .collect();
        let mut skipped = Vec::new();
        let model = model::build_services(
            &services,
            &objects.endpoint_slices,
            &self.context,
            &mut skipped,
        );
        let taken_elsewhere =
            |owner: Option<&ServiceRef>| owner.is_some_and(|o| !changed.contains(o));
        if model
            .frontends
            .keys()
            .any(|f| taken_elsewhere(self.owner_of.get(f)))
            || self.services6.taken_elsewhere(&model.frontends6, changed)
            || model.health_checks.keys().any(|port| {
                taken_elsewhere(self.health_checks.get(port).map(|c| &c.service))
                    || self.host_port_ports.contains(port)
            })
        {
            return None;
        }
        let mut frontends: BTreeSet<L4Addr> = changed
            .iter()
            .filter_map(|service| self.frontends_of.get(service))
            .flatten()
            .copied()
            .collect();
        frontends.extend(model.frontends.keys().copied());
        let mut frontends6: BTreeSet<L4Addr6> = changed
            .iter()
            .flat_map(|service| self.services6.of_service(service))
            .copied()
            .collect();
        frontends6.extend(model.frontends6.keys().copied());
        let (ops, more) = service_update(
            &self.written,
            Changed {
                frontends: &frontends,
                now: &model.frontends,
            },
            Changed {
                frontends: &frontends6,
                now: &model.frontends6,
            },
            capacities,
        );
        skipped.extend(more);
        Some(ServicesPlan {
            ops,
            skipped,
            changed: changed.clone(),
            model,
        })
    }

    /// Record `plan` as written.
    pub fn commit(&mut self, plan: ServicesPlan) {
        self.written.apply(&plan.ops);
        for service in &plan.changed {
            for frontend in self.frontends_of.remove(service).unwrap_or_default() {
                if self.owner_of.get(&frontend) == Some(service) {
                    self.owner_of.remove(&frontend);
                }
            }
        }
        self.health_checks
            .retain(|_, check| !plan.changed.contains(&check.service));
        let mut model = plan.model;
        self.services6
            .replace(&plan.changed, std::mem::take(&mut model.frontends6));
        self.record(model);
    }

    /// Index the Services of `model` as the owners of their frontends and checks.
    fn record(&mut self, model: ServicesModel) {
        for (frontend, entry) in model.frontends {
            if entry.kind == FrontendKind::HostPort && frontend.protocol == Protocol::Tcp {
                self.host_port_ports.insert(frontend.port);
            }
            self.frontends_of
                .entry(entry.service.clone())
                .or_default()
                .push(frontend);
            self.owner_of.insert(frontend, entry.service);
        }
        self.health_checks.extend(model.health_checks);
        self.contenders.extend(model.contenders);
    }

    /// The IPv6 frontends as the model has them (a full sync's, updated as Services
    /// change).
    pub fn services6(&self) -> &BTreeMap<L4Addr6, ServiceFrontend6> {
        self.services6.frontends()
    }

    /// The Service each frontend belongs to.
    pub fn owners(&self) -> impl Iterator<Item = (&L4Addr, &ServiceRef)> {
        self.owner_of.iter()
    }
}
