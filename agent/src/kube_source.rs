//! The Kubernetes source: kube-rs watchers with reflectors for Services,
//! EndpointSlices, Nodes and this node's Pods feed the same model as the file source.
//! The watcher does the API semantics (initial list, resourceVersion, bookmarks,
//! reconnect with backoff, 410 Gone -> relist); a reflector store swaps in a relisted
//! set atomically at `InitDone`, so an object deleted while the watch was down simply
//! is not in the next model, and the diff removes exactly that - the maps are never
//! flushed. A burst of events becomes one event for the driver: the driver gets what
//! is pending when it asks, and whatever arrives while it syncs is batched into the
//! next one (no fixed delay).
//!
//! Events about Services and EndpointSlices only name the Services they concern
//! (`SourceEvent::ServicesChanged`, synced in O(those Services)); events about
//! Pods, Namespaces and NetworkPolicies name those objects
//! (`SourceEvent::PolicyObjectsChanged`, a policy update); Node events, relists
//! and a batch holding both kinds of change make a snapshot of everything.
use std::{
    collections::{BTreeSet, HashMap},
    fmt::Debug,
    hash::Hash,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
        WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    driver::{PolicyObjectChanges, ServiceChanges, Snapshot, Source, SourceEvent},
    model::{
        self,
        objects::{EndpointSlice, Service},
        policy::{ObjectKey, PolicyChanges},
        ClusterObjects, ServiceRef,
    },
    telemetry::{ResourceLabel, Telemetry},
};

/// The watches of one node's agent, as a source of events.
pub struct KubeSource {
    /// Runs the watches, also while the driver syncs.
    runtime: tokio::runtime::Runtime,
    stores: Stores,
    changed: Arc<Changed>,
    /// Whether every initial list is in (the first snapshot waits for them).
    listed: bool,
}

impl KubeSource {
    /// Start the watches for the agent of `node` and return at once: the lists run
    /// while the caller does other work (the datapath loads meanwhile), and the first
    /// snapshot or event waits for them, so it is the whole cluster.
    pub fn start(node: &str, telemetry: Arc<Telemetry>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let changed = Arc::new(Changed::default());
        let stores = runtime.block_on(start_watches(node, &changed, &telemetry))?;
        Ok(Self {
            runtime,
            stores,
            changed,
            listed: false,
        })
    }

    /// Wait until every initial list is in (once).
    fn wait_for_lists(&mut self) -> Result<()> {
        if !self.listed {
            self.runtime.block_on(self.stores.wait_until_ready())?;
            self.listed = true;
            info!("initial lists complete");
        }
        Ok(())
    }
}

impl Source for KubeSource {
    fn next_event(&mut self, deadline: Instant) -> Result<Option<SourceEvent>> {
        self.wait_for_lists()?;
        loop {
            // What arrives after the deadline goes into the full sync that is due.
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let notified = self.runtime.block_on(async {
                tokio::select! {
                    _ = self.changed.notify.notified() => true,
                    _ = tokio::time::sleep_until(deadline.into()) => false,
                }
            });
            if !notified {
                return Ok(None);
            }
            // Empty when a snapshot already took what the notification was about.
            if let Some(event) = self.stores.event_for(self.changed.take(), &self.changed) {
                return Ok(Some(event));
            }
        }
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        self.wait_for_lists()?;
        // Whatever is pending is in this snapshot.
        let pending = self.changed.take();
        Ok(Some(self.stores.snapshot(pending.oldest)))
    }
}

/// The reflectors' caches of the watched objects.
struct Stores {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    network_policies: Store<NetworkPolicy>,
    namespaces: Store<Namespace>,
}

impl Stores {
    async fn wait_until_ready(&self) -> Result<()> {
        for (ready, resource) in [
            (self.services.wait_until_ready().await, "services"),
            (
                self.endpoint_slices.wait_until_ready().await,
                "endpointslices",
            ),
            (self.nodes.wait_until_ready().await, "nodes"),
            (self.pods.wait_until_ready().await, "pods"),
            (
                self.network_policies.wait_until_ready().await,
                "networkpolicies",
            ),
            (self.namespaces.wait_until_ready().await, "namespaces"),
        ] {
            ready.with_context(|| format!("the {resource} watch ended"))?;
        }
        Ok(())
    }

    /// The event `pending` changes make: everything, or only the Services they name
    /// (with their objects as the stores hold them now); `None` for no change.
    fn event_for(&self, pending: Pending, changed: &Changed) -> Option<SourceEvent> {
        let policy = !(pending.pods.is_empty()
            && pending.namespaces.is_empty()
            && pending.network_policies.is_empty());
        // Service and policy changes in one batch: one full sync of both.
        if pending.full || (policy && !pending.services.is_empty()) {
            return Some(SourceEvent::Snapshot(self.snapshot(pending.oldest)));
        }
        if policy {
            return Some(SourceEvent::PolicyObjectsChanged(PolicyObjectChanges {
                changes: self.policy_objects_of(&pending),
                oldest_change: pending.oldest,
            }));
        }
        if pending.services.is_empty() {
            return None;
        }
        Some(SourceEvent::ServicesChanged(ServiceChanges {
            objects: self.objects_of(&pending.services, changed),
            services: pending.services,
            oldest_change: pending.oldest,
        }))
    }

    /// Every cached object, shared: no deep copy. Services oldest first, as the
    /// model wants them.
    fn snapshot(&self, oldest_change: Option<Instant>) -> Snapshot {
        let mut services = self.services.state();
        model::oldest_first(&mut services);
        Snapshot {
            objects: ClusterObjects {
                services,
                endpoint_slices: self.endpoint_slices.state(),
                pods: self.pods.state(),
                nodes: self.nodes.state(),
                network_policies: self.network_policies.state(),
                namespaces: self.namespaces.state(),
            },
            skipped: Vec::new(),
            oldest_change,
        }
    }

    /// The Pods, Namespaces and NetworkPolicies named, as the stores hold them now
    /// (`None`: gone).
    fn policy_objects_of(&self, pending: &Pending) -> PolicyChanges {
        fn namespaced<K: Resource<DynamicType = ()>>(key: &ObjectKey) -> ObjectRef<K> {
            ObjectRef::new(&key.name).within(&key.namespace)
        }
        PolicyChanges {
            pods: pending
                .pods
                .iter()
                .map(|key| (key.clone(), self.pods.get(&namespaced(key))))
                .collect(),
            namespaces: pending
                .namespaces
                .iter()
                .map(|name| (name.clone(), self.namespaces.get(&ObjectRef::new(name))))
                .collect(),
            network_policies: pending
                .network_policies
                .iter()
                .map(|key| (key.clone(), self.network_policies.get(&namespaced(key))))
                .collect(),
        }
    }

    /// The Services named (oldest first, as in a snapshot) and the EndpointSlices
    /// labelled for them now.
    fn objects_of(&self, services: &BTreeSet<ServiceRef>, changed: &Changed) -> ClusterObjects {
        let mut found: Vec<_> = services
            .iter()
            .filter_map(|service| {
                self.services
                    .get(&ObjectRef::new(&service.name).within(&service.namespace))
            })
            .collect();
        model::oldest_first(&mut found);
        ClusterObjects {
            services: found,
            endpoint_slices: services
                .iter()
                .flat_map(|service| changed.slices_of(service))
                .filter_map(|(service, slice)| {
                    let slice = self
                        .endpoint_slices
                        .get(&ObjectRef::new(&slice).within(&service.namespace))?;
                    // Its label may have moved to another Service since.
                    (model::slice_service(&slice).as_ref() == Some(&service)).then_some(slice)
                })
                .collect(),
            ..ClusterObjects::default()
        }
    }
}

/// Watch every Service, EndpointSlice, Node, Pod (policies select pods of every
/// node), NetworkPolicy and Namespace (the stores fill as the lists come in).
async fn start_watches(
    _node: &str,
    changed: &Arc<Changed>,
    telemetry: &Arc<Telemetry>,
) -> Result<Stores> {
    let client = Client::try_default()
        .await
        .context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let all = watcher::Config::default();
    let services = watch::<Service>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("services", changed, telemetry, |s| {
            model::service_ref_of(s).map_or(Scope::Everything, Scope::Service)
        }),
    );
    let endpoint_slices = watch::<EndpointSlice>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("endpointslices", changed, telemetry, slice_scope)
            .shrinking(model::compact_slice)
            .tracking(Changed::track_slice),
    );
    let nodes = watch::<Node>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("nodes", changed, telemetry, |_| Scope::Everything),
    );
    let pods = watch::<Pod>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("pods", changed, telemetry, pod_scope).shrinking(model::slim_pod),
    );
    let network_policies = watch::<NetworkPolicy>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("networkpolicies", changed, telemetry, |p| {
            Scope::NetworkPolicy(ObjectKey::of(&p.metadata))
        }),
    );
    let namespaces = watch::<Namespace>(
        Api::all(client),
        all,
        Watched::new("namespaces", changed, telemetry, |n| {
            n.metadata
                .name
                .clone()
                .map_or(Scope::Everything, Scope::Namespace)
        }),
    );
    Ok(Stores {
        services,
        endpoint_slices,
        nodes,
        pods,
        network_policies,
        namespaces,
    })
}

/// The objects the agent of `node` would see, listed once (for `ferrite inspect diff`).
pub fn list_once(_node: &str) -> Result<ClusterObjects> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = Client::try_default()
                .await
                .context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
            let all = kube::api::ListParams::default();
            Ok(ClusterObjects {
                services: arcs_of(Api::<Service>::all(client.clone()).list(&all).await?.items),
                endpoint_slices: arcs_of(
                    Api::<EndpointSlice>::all(client.clone())
                        .list(&all)
                        .await?
                        .items,
                ),
                nodes: arcs_of(Api::<Node>::all(client.clone()).list(&all).await?.items),
                pods: arcs_of(Api::<Pod>::all(client.clone()).list(&all).await?.items),
                network_policies: arcs_of(
                    Api::<NetworkPolicy>::all(client.clone())
                        .list(&all)
                        .await?
                        .items,
                ),
                namespaces: arcs_of(Api::<Namespace>::all(client).list(&all).await?.items),
            })
        })
}

fn arcs_of<K>(items: Vec<K>) -> Vec<Arc<K>> {
    items.into_iter().map(Arc::new).collect()
}

fn slice_scope(slice: &EndpointSlice) -> Scope {
    model::slice_service(slice).map_or(Scope::Everything, Scope::Service)
}

fn pod_scope(pod: &Pod) -> Scope {
    Scope::Pod(ObjectKey::of(&pod.metadata))
}

/// What one object's change concerns.
#[derive(Debug)]
enum Scope {
    Service(ServiceRef),
    Pod(ObjectKey),
    Namespace(String),
    NetworkPolicy(ObjectKey),
    /// Only a full sync handles it.
    Everything,
}

/// What changed since the driver last took it: the Services, Pods, Namespaces and
/// NetworkPolicies named by events, or anything else (`full`), and when the oldest
/// of these events arrived (for the lag metric).
#[derive(Default)]
struct Pending {
    full: bool,
    services: BTreeSet<ServiceRef>,
    pods: BTreeSet<ObjectKey>,
    namespaces: BTreeSet<String>,
    network_policies: BTreeSet<ObjectKey>,
    oldest: Option<Instant>,
}

/// Collects what the watches saw and wakes the driver's wait for it.
#[derive(Default)]
struct Changed {
    notify: Notify,
    pending: std::sync::Mutex<Pending>,
    /// EndpointSlice names by the Service they were labelled for when seen, so an
    /// update finds a Service's slices without scanning all of them. May hold names
    /// of slices since deleted or relabelled: lookups check the store.
    /// (A Vec: most Services have one slice, and a one-entry BTreeSet costs a whole
    /// B-tree node.)
    slices: std::sync::Mutex<HashMap<ServiceRef, Vec<String>>>,
}

impl Changed {
    /// An event about what `scope` names.
    fn event(&self, scope: Scope) {
        {
            let mut pending = self.pending.lock().expect("lock");
            pending.oldest.get_or_insert_with(Instant::now);
            match scope {
                Scope::Service(service) => drop(pending.services.insert(service)),
                Scope::Pod(pod) => drop(pending.pods.insert(pod)),
                Scope::Namespace(name) => drop(pending.namespaces.insert(name)),
                Scope::NetworkPolicy(policy) => drop(pending.network_policies.insert(policy)),
                Scope::Everything => pending.full = true,
            }
        }
        self.notify.notify_one();
    }

    fn track_slice(&self, slice: &EndpointSlice, deleted: bool) {
        let (Some(service), Some(name)) = (model::slice_service(slice), &slice.metadata.name)
        else {
            return;
        };
        let mut index = self.slices.lock().expect("lock");
        if deleted {
            if let Some(names) = index.get_mut(&service) {
                names.retain(|n| n != name);
                if names.is_empty() {
                    index.remove(&service);
                }
            }
        } else {
            let names = index.entry(service).or_default();
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }

    fn slices_of(&self, service: &ServiceRef) -> Vec<(ServiceRef, String)> {
        let index = self.slices.lock().expect("lock");
        index
            .get(service)
            .into_iter()
            .flatten()
            .map(|name| (service.clone(), name.clone()))
            .collect()
    }

    /// What is pending, leaving nothing.
    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().expect("lock"))
    }
}

/// A watched resource: its name (for metrics and logs), what an object's change
/// concerns, and where to report changes.
struct Watched<K> {
    resource: &'static str,
    scope: fn(&K) -> Scope,
    /// Shrinks an object for the cache (the model must read it the same).
    shrink: fn(&mut K),
    /// Sees every object applied (false) or deleted (true), for indexes.
    track: fn(&Changed, &K, bool),
    changed: Arc<Changed>,
    telemetry: Arc<Telemetry>,
    /// Lists started: every one after the first is a relist.
    lists: u64,
}

impl<K> Watched<K> {
    fn new(
        resource: &'static str,
        changed: &Arc<Changed>,
        telemetry: &Arc<Telemetry>,
        scope: fn(&K) -> Scope,
    ) -> Self {
        Self {
            resource,
            scope,
            shrink: |_| {},
            track: |_, _, _| {},
            changed: changed.clone(),
            telemetry: telemetry.clone(),
            lists: 0,
        }
    }

    fn shrinking(self, shrink: fn(&mut K)) -> Self {
        Self { shrink, ..self }
    }

    fn tracking(self, track: fn(&Changed, &K, bool)) -> Self {
        Self { track, ..self }
    }

    /// Report one event of the watch (already applied to the store).
    fn record(&mut self, event: &Event<K>) {
        let resource = self.resource;
        match event {
            Event::Init => {
                self.lists += 1;
                if self.lists > 1 {
                    self.telemetry
                        .watch_restarts
                        .get_or_create(&ResourceLabel {
                            resource: resource.into(),
                        })
                        .inc();
                    info!(resource, "relisting");
                }
            }
            // A relist is applied as a whole at InitDone.
            Event::InitApply(object) => (self.track)(&self.changed, object, false),
            Event::Apply(object) => {
                (self.track)(&self.changed, object, false);
                self.changed.event((self.scope)(object));
            }
            Event::Delete(object) => {
                (self.track)(&self.changed, object, true);
                self.changed.event((self.scope)(object));
            }
            // A relist: anything may have changed.
            Event::InitDone => self.changed.event(Scope::Everything),
        }
    }
}

/// Start a watcher + reflector for `K`; every settled change is reported.
fn watch<K>(api: Api<K>, config: watcher::Config, mut watched: Watched<K>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let shrink = watched.shrink;
    let (reader, writer) = reflector::store();
    let events = watcher::watcher(api, config)
        .default_backoff()
        // Cached objects keep only what a model could read: managedFields, owner
        // references and the last-applied copy are often most of an object's size.
        .modify(move |object: &mut K| {
            let meta = object.meta_mut();
            meta.managed_fields = None;
            meta.owner_references = None;
            if let Some(annotations) = meta.annotations.as_mut() {
                annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
            shrink(object);
        });
    let stream = reflector::reflector(writer, events);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => watched.record(&event),
                Err(e) => warn!(
                    resource = watched.resource,
                    "watch error (retrying with backoff): {e}"
                ),
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, path::PathBuf, time::Duration};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::reflector::store::Writer;

    use super::*;

    /// The four watches as `start_watches` sets them up, without an API server: each
    /// event goes to the store, then to `Watched::record`, as the reflector does.
    struct Watches {
        changed: Arc<Changed>,
        telemetry: Arc<Telemetry>,
        services: (Writer<Service>, Watched<Service>),
        endpoint_slices: (Writer<EndpointSlice>, Watched<EndpointSlice>),
        nodes: (Writer<Node>, Watched<Node>),
        pods: (Writer<Pod>, Watched<Pod>),
        stores: Stores,
    }

    fn watches() -> Watches {
        let changed = Arc::new(Changed::default());
        let telemetry = Telemetry::new(PathBuf::new(), BTreeMap::new());
        let (services, services_writer) = reflector::store();
        let (endpoint_slices, slices_writer) = reflector::store();
        let (nodes, nodes_writer) = reflector::store();
        let (pods, pods_writer) = reflector::store();
        Watches {
            services: (
                services_writer,
                Watched::new("services", &changed, &telemetry, |s| {
                    model::service_ref_of(s).map_or(Scope::Everything, Scope::Service)
                }),
            ),
            endpoint_slices: (
                slices_writer,
                Watched::new("endpointslices", &changed, &telemetry, slice_scope)
                    .tracking(Changed::track_slice),
            ),
            nodes: (
                nodes_writer,
                Watched::new("nodes", &changed, &telemetry, |_| Scope::Everything),
            ),
            pods: (
                pods_writer,
                Watched::new("pods", &changed, &telemetry, pod_scope),
            ),
            stores: Stores {
                services,
                endpoint_slices,
                nodes,
                pods,
                // Kinds these tests do not feed: empty.
                network_policies: reflector::store().0,
                namespaces: reflector::store().0,
            },
            changed,
            telemetry,
        }
    }

    fn see<K>((store, watched): &mut (Writer<K>, Watched<K>), event: Event<K>)
    where
        K: Resource + Clone,
        K::DynamicType: Eq + Hash + Clone,
    {
        store.apply_watcher_event(&event);
        watched.record(&event);
    }

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        }
    }

    fn service(name: &str) -> Service {
        Service {
            metadata: meta(name),
            ..Service::default()
        }
    }

    fn slice(name: &str, service: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                labels: Some([(model::SERVICE_NAME_LABEL.into(), service.into())].into()),
                ..meta(name)
            },
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        }
    }

    fn node(name: &str) -> Node {
        Node {
            metadata: meta(name),
            ..Node::default()
        }
    }

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: meta(name),
            ..Pod::default()
        }
    }

    fn names<K: Resource>(objects: &[Arc<K>]) -> BTreeSet<String> {
        objects
            .iter()
            .filter_map(|o| o.meta().name.clone())
            .collect()
    }

    fn refs(services: &[&str]) -> BTreeSet<ServiceRef> {
        services
            .iter()
            .filter_map(|name| model::service_ref_of(&service(name)))
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// The event for what is pending, as `KubeSource::next_event` makes it.
    fn next_event(watches: &Watches) -> Option<SourceEvent> {
        watches
            .stores
            .event_for(watches.changed.take(), &watches.changed)
    }

    #[test]
    fn many_service_and_endpointslice_events_become_one_event_naming_those_services() {
        let mut w = watches();
        see(&mut w.services, Event::Apply(service("untouched")));
        see(
            &mut w.endpoint_slices,
            Event::Apply(slice("untouched-1", "untouched")),
        );
        next_event(&w).expect("the first events");

        for round in 0..50 {
            see(&mut w.services, Event::Apply(service("web")));
            see(&mut w.endpoint_slices, Event::Apply(slice("web-1", "web")));
            see(&mut w.endpoint_slices, Event::Apply(slice("web-2", "web")));
            see(&mut w.endpoint_slices, Event::Apply(slice("db-1", "db")));
            if round == 49 {
                see(&mut w.endpoint_slices, Event::Delete(slice("web-2", "web")));
                see(&mut w.services, Event::Delete(service("gone")));
            }
        }
        let Some(SourceEvent::ServicesChanged(changes)) = next_event(&w) else {
            panic!("one event naming the Services");
        };
        assert_eq!(changes.services, refs(&["db", "gone", "web"]));
        // Their objects as the stores hold them now; "db" has a slice, no Service yet.
        assert_eq!(names(&changes.objects.services), set(&["web"]));
        assert_eq!(
            names(&changes.objects.endpoint_slices),
            set(&["db-1", "web-1"])
        );
        assert!(changes.objects.nodes.is_empty() && changes.objects.pods.is_empty());
        assert!(changes.oldest_change.is_some());
        assert!(next_event(&w).is_none(), "all of it in that one event");
    }

    #[test]
    fn a_slice_relabelled_to_another_service_counts_only_for_that_service() {
        let mut w = watches();
        see(&mut w.services, Event::Apply(service("a")));
        see(&mut w.services, Event::Apply(service("b")));
        see(&mut w.endpoint_slices, Event::Apply(slice("moving", "a")));
        next_event(&w);
        see(&mut w.endpoint_slices, Event::Apply(slice("moving", "b")));
        // The event names b only; a's index entry is stale. Both, asked for together:
        w.changed
            .event(model::service_ref_of(&service("a")).map_or(Scope::Everything, Scope::Service));
        let Some(SourceEvent::ServicesChanged(changes)) = next_event(&w) else {
            panic!("a Service-only event");
        };
        assert_eq!(changes.services, refs(&["a", "b"]));
        assert_eq!(
            changes.objects.endpoint_slices.len(),
            1,
            "the slice, once, for b"
        );
    }

    #[test]
    fn a_node_event_a_relist_or_pod_and_service_events_together_become_a_snapshot_of_everything() {
        let mut w = watches();
        see(&mut w.services, Event::Apply(service("web")));
        see(&mut w.endpoint_slices, Event::Apply(slice("web-1", "web")));
        see(&mut w.nodes, Event::Apply(node("node-a")));
        see(&mut w.pods, Event::Apply(pod("client")));
        next_event(&w);

        let everything = |event: Option<SourceEvent>| match event {
            Some(SourceEvent::Snapshot(snapshot)) => {
                let objects = &snapshot.objects;
                (
                    names(&objects.services),
                    names(&objects.endpoint_slices),
                    names(&objects.nodes),
                    names(&objects.pods),
                )
            }
            other => panic!("expected a snapshot, got {other:?}"),
        };
        see(&mut w.services, Event::Apply(service("api")));
        see(&mut w.nodes, Event::Apply(node("node-b")));
        assert_eq!(
            everything(next_event(&w)),
            (
                set(&["api", "web"]),
                set(&["web-1"]),
                set(&["node-a", "node-b"]),
                set(&["client"])
            ),
            "a Node event, with a Service event pending"
        );

        see(&mut w.pods, Event::Delete(pod("client")));
        match next_event(&w) {
            Some(SourceEvent::PolicyObjectsChanged(changes)) => {
                let pods: Vec<_> = changes
                    .changes
                    .pods
                    .iter()
                    .map(|(k, p)| (k.name.clone(), p.is_some()))
                    .collect();
                assert_eq!(
                    pods,
                    [("client".to_string(), false)],
                    "a Pod event names the Pod, gone"
                );
            }
            other => panic!("expected the Pod's change, got {other:?}"),
        }
        see(&mut w.pods, Event::Apply(pod("client")));
        see(&mut w.services, Event::Apply(service("api")));
        assert_eq!(
            everything(next_event(&w)).3,
            set(&["client"]),
            "a Pod event with a Service event pending"
        );

        // A relist of Services: "api" was deleted while the watch was down.
        see(&mut w.services, Event::Init);
        see(&mut w.services, Event::InitApply(service("web")));
        assert!(
            next_event(&w).is_none(),
            "nothing before the relist is whole"
        );
        see(&mut w.services, Event::InitDone);
        assert_eq!(everything(next_event(&w)).0, set(&["web"]), "a relist");
        let restarts = w
            .telemetry
            .watch_restarts
            .get_or_create(&ResourceLabel {
                resource: "services".into(),
            })
            .get();
        assert_eq!(restarts, 0, "the first list of the watch is no restart");
        see(&mut w.services, Event::Init);
        let restarts = w
            .telemetry
            .watch_restarts
            .get_or_create(&ResourceLabel {
                resource: "services".into(),
            })
            .get();
        assert_eq!(restarts, 1);
    }

    /// A source on the fake watches, as `KubeSource::start` makes one.
    fn source(watches: Watches) -> (KubeSource, Watches) {
        let stores = Stores {
            services: watches.stores.services.clone(),
            endpoint_slices: watches.stores.endpoint_slices.clone(),
            nodes: watches.stores.nodes.clone(),
            pods: watches.stores.pods.clone(),
            network_policies: watches.stores.network_policies.clone(),
            namespaces: watches.stores.namespaces.clone(),
        };
        let source = KubeSource {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            stores,
            changed: watches.changed.clone(),
            // The tests feed the stores themselves, initial lists included.
            listed: true,
        };
        (source, watches)
    }

    #[test]
    fn events_pending_at_a_resync_are_in_its_snapshot_and_not_reported_again() {
        let (mut source, mut w) = source(watches());
        see(&mut w.services, Event::Apply(service("web")));
        let snapshot = source.snapshot().unwrap().expect("always a snapshot");
        assert_eq!(names(&snapshot.objects.services), set(&["web"]));
        assert!(snapshot.oldest_change.is_some(), "the event's lag counts");
        // The event's wake-up is still there: the wait goes on to the deadline.
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(source.next_event(deadline).unwrap().is_none());
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn a_wait_ends_with_the_first_event_and_hands_over_everything_pending_by_then() {
        let (mut source, mut w) = source(watches());
        see(&mut w.services, Event::Apply(service("web")));
        see(&mut w.services, Event::Apply(service("api")));
        let far = Instant::now() + Duration::from_secs(3600);
        let Some(SourceEvent::ServicesChanged(changes)) = source.next_event(far).unwrap() else {
            panic!("a Service-only event");
        };
        assert_eq!(changes.services, refs(&["api", "web"]));
        // Past the deadline, events wait for the full sync that is due.
        see(&mut w.nodes, Event::Apply(node("node-a")));
        assert!(source.next_event(Instant::now()).unwrap().is_none());
        let snapshot = source.snapshot().unwrap().expect("always a snapshot");
        assert_eq!(names(&snapshot.objects.nodes), set(&["node-a"]));
    }
}
