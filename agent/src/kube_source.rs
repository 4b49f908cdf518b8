//! The Kubernetes source: kube-rs watchers with reflectors for Services,
//! EndpointSlices, Nodes and this node's Pods feed the same model as the file source.
//! The watcher does the API semantics (initial list, resourceVersion, bookmarks,
//! reconnect with backoff, 410 Gone -> relist); a reflector store swaps in a relisted
//! set atomically at `InitDone`, so an object deleted while the watch was down simply
//! is not in the next model, and the diff removes exactly that - the maps are never
//! flushed. A burst of events becomes one sync: a sync starts at once, and whatever
//! arrives while it runs is batched into the next one (no fixed delay).
//!
//! Events about Services and EndpointSlices only update the Services they name
//! (`NodeAgent::sync_services`, O(those Services)); Node and Pod events, relists and
//! the periodic resync run the full model and diff.
use std::{
    collections::{BTreeSet, HashMap},
    fmt::Debug,
    hash::Hash,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
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
    agent::NodeAgent,
    driver::{FullSync, SyncTarget},
    model::{self, ClusterObjects, ServiceRef},
    telemetry::{ResourceLabel, Telemetry},
};

pub fn run(agent: NodeAgent, resync: Duration) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run_async(agent, resync))
}

async fn run_async(mut agent: NodeAgent, resync: Duration) -> Result<()> {
    let client = Client::try_default()
        .await
        .context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let changed = Arc::new(Changed::default());
    let telemetry = agent.telemetry.clone();
    let all = watcher::Config::default();
    let this_node =
        watcher::Config::default().fields(&format!("spec.nodeName={}", agent.settings.node));
    let services = watch::<Service>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("services", &changed, &telemetry, |service: &Service| {
            let meta = &service.metadata;
            Some((
                meta.namespace.clone().unwrap_or_else(|| "default".into()),
                meta.name.clone()?,
            ))
        }),
    );
    let slices = watch::<EndpointSlice>(
        Api::all(client.clone()),
        all.clone(),
        Watched::new("endpointslices", &changed, &telemetry, model::slice_service)
            .shrinking(model::compact_slice)
            .tracking(Changed::track_slice),
    );
    let nodes = watch::<Node>(
        Api::all(client.clone()),
        all,
        Watched::new("nodes", &changed, &telemetry, |_| None),
    );
    let pods = watch::<Pod>(
        Api::all(client),
        this_node,
        Watched::new("pods", &changed, &telemetry, |_| None),
    );
    for (store_ready, resource) in [
        (services.wait_until_ready().await, "services"),
        (slices.wait_until_ready().await, "endpointslices"),
        (nodes.wait_until_ready().await, "nodes"),
        (pods.wait_until_ready().await, "pods"),
    ] {
        store_ready.with_context(|| format!("the {resource} watch ended"))?;
    }
    info!("initial lists complete");
    // The first sync reads the maps (restart: reuse what is pinned, repair drift).
    let mut triggered_by_event = false;
    // Full syncs (drift repair, conntrack collection) come every `resync` even while
    // events keep arriving: a deadline, not a timer restarted by each event.
    let mut next_full_sync = tokio::time::Instant::now();
    loop {
        if !triggered_by_event {
            next_full_sync = tokio::time::Instant::now() + resync;
        }
        // Events that arrive from here on are picked up by the next sync.
        let pending = changed.take();
        let synced = if triggered_by_event && !pending.full {
            // Only Services changed: update just those.
            pending.services.is_empty() || {
                let objects = ClusterObjects {
                    services: pending
                        .services
                        .iter()
                        .filter_map(|(namespace, name)| {
                            services.get(&ObjectRef::new(name).within(namespace))
                        })
                        .collect(),
                    endpoint_slices: pending
                        .services
                        .iter()
                        .flat_map(|service| changed.slices_of(service))
                        .filter_map(|(service, slice)| {
                            let slice = slices.get(&ObjectRef::new(&slice).within(&service.0))?;
                            // Its label may have moved to another Service since.
                            (model::slice_service(&slice).as_ref() == Some(&service))
                                .then_some(slice)
                        })
                        .collect(),
                    ..ClusterObjects::default()
                };
                agent.sync_services(&pending.services, &objects)
            }
        } else {
            false
        };
        let synced = synced || {
            let objects = ClusterObjects {
                services: snapshot(&services),
                endpoint_slices: snapshot(&slices),
                pods: snapshot(&pods),
                nodes: snapshot(&nodes),
            };
            let how = if triggered_by_event {
                FullSync::AfterChange
            } else {
                FullSync::Resync
            };
            agent.sync(&objects, Vec::new(), how).is_some()
        };
        if synced {
            if let Some(received) = pending.oldest {
                telemetry
                    .event_lag
                    .observe(received.elapsed().as_secs_f64());
            }
        }
        agent.flush_logs();
        tokio::select! {
            _ = changed.notify.notified() => {
                triggered_by_event = tokio::time::Instant::now() < next_full_sync
            }
            _ = tokio::time::sleep_until(next_full_sync) => triggered_by_event = false,
        }
    }
}

/// The objects the agent of `node` would see, listed once (for `ferrite inspect diff`).
pub fn list_once(node: &str) -> Result<ClusterObjects> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = Client::try_default()
                .await
                .context("Kubernetes client (in-cluster config or KUBECONFIG)")?;
            let all = kube::api::ListParams::default();
            let this_node =
                kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
            Ok(ClusterObjects {
                services: arcs_of(Api::<Service>::all(client.clone()).list(&all).await?.items),
                endpoint_slices: arcs_of(
                    Api::<EndpointSlice>::all(client.clone())
                        .list(&all)
                        .await?
                        .items,
                ),
                nodes: arcs_of(Api::<Node>::all(client.clone()).list(&all).await?.items),
                pods: arcs_of(Api::<Pod>::all(client).list(&this_node).await?.items),
            })
        })
}

fn arcs_of<K>(items: Vec<K>) -> Vec<Arc<K>> {
    items.into_iter().map(Arc::new).collect()
}

/// What changed since the last sync: the Services named by events, or anything
/// else (`full`), and when the oldest of these events arrived (for the lag metric).
#[derive(Default)]
struct Pending {
    full: bool,
    services: BTreeSet<ServiceRef>,
    oldest: Option<Instant>,
}

/// Pokes the sync loop and collects what changed.
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
    /// An event about `service`, or (None) about something only a full sync handles.
    fn event(&self, service: Option<ServiceRef>) {
        {
            let mut pending = self.pending.lock().expect("lock");
            pending.oldest.get_or_insert_with(Instant::now);
            match service {
                Some(service) => drop(pending.services.insert(service)),
                None => pending.full = true,
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

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().expect("lock"))
    }
}

/// A watched resource: its name (for metrics and logs), which Service an object's
/// change concerns (None: needs a full sync), and where to report changes.
struct Watched<K> {
    resource: &'static str,
    scope: fn(&K) -> Option<ServiceRef>,
    /// Shrinks an object for the cache (the model must read it the same).
    shrink: fn(&mut K),
    /// Sees every object applied (false) or deleted (true), for indexes.
    track: fn(&Changed, &K, bool),
    changed: Arc<Changed>,
    telemetry: Arc<Telemetry>,
}

impl<K> Watched<K> {
    fn new(
        resource: &'static str,
        changed: &Arc<Changed>,
        telemetry: &Arc<Telemetry>,
        scope: fn(&K) -> Option<ServiceRef>,
    ) -> Self {
        Self {
            resource,
            scope,
            shrink: |_| {},
            track: |_, _, _| {},
            changed: changed.clone(),
            telemetry: telemetry.clone(),
        }
    }

    fn shrinking(self, shrink: fn(&mut K)) -> Self {
        Self { shrink, ..self }
    }

    fn tracking(self, track: fn(&Changed, &K, bool)) -> Self {
        Self { track, ..self }
    }
}

/// The store's objects, shared: no deep copy per sync.
fn snapshot<K: Clone + Resource>(store: &Store<K>) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store.state()
}

/// Start a watcher + reflector for `K`; every settled change is reported.
fn watch<K>(api: Api<K>, config: watcher::Config, watched: Watched<K>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let Watched {
        resource,
        scope,
        shrink,
        track,
        changed,
        telemetry,
    } = watched;
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
        let mut lists = 0u64;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => {
                    lists += 1;
                    if lists > 1 {
                        telemetry
                            .watch_restarts
                            .get_or_create(&ResourceLabel {
                                resource: resource.into(),
                            })
                            .inc();
                        info!(resource, "relisting");
                    }
                }
                // A relist is applied as a whole at InitDone.
                Ok(Event::InitApply(object)) => track(&changed, &object, false),
                Ok(Event::Apply(object)) => {
                    track(&changed, &object, false);
                    changed.event(scope(&object));
                }
                Ok(Event::Delete(object)) => {
                    track(&changed, &object, true);
                    changed.event(scope(&object));
                }
                // A relist: anything may have changed.
                Ok(Event::InitDone) => changed.event(None),
                Err(e) => warn!(resource, "watch error (retrying with backoff): {e}"),
            }
        }
    });
    reader
}
