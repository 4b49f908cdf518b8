//! The Kubernetes source: kube-rs watchers with reflectors for Services,
//! EndpointSlices, Nodes and this node's Pods feed the same model as the file source.
//! The watcher does the API semantics (initial list, resourceVersion, bookmarks,
//! reconnect with backoff, 410 Gone -> relist); a reflector store swaps in a relisted
//! set atomically at `InitDone`, so an object deleted while the watch was down simply
//! is not in the next model, and the diff removes exactly that - the maps are never
//! flushed. A burst of events becomes one sync: a sync starts at once, and whatever
//! arrives while it runs is batched into the next one (no fixed delay).
use std::{
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
        reflector::{self, Store},
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
    model::ClusterObjects,
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
        "services",
        &changed,
        &telemetry,
    );
    let slices = watch::<EndpointSlice>(
        Api::all(client.clone()),
        all.clone(),
        "endpointslices",
        &changed,
        &telemetry,
    );
    let nodes = watch::<Node>(Api::all(client.clone()), all, "nodes", &changed, &telemetry);
    let pods = watch::<Pod>(Api::all(client), this_node, "pods", &changed, &telemetry);
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
    loop {
        // Events that arrive from here on are picked up by the next sync.
        let oldest_event = changed.take_oldest();
        let objects = ClusterObjects {
            services: snapshot(&services),
            endpoint_slices: snapshot(&slices),
            pods: snapshot(&pods),
            nodes: snapshot(&nodes),
        };
        if agent
            .sync(&objects, Vec::new(), triggered_by_event)
            .is_some()
        {
            if let Some(received) = oldest_event {
                telemetry
                    .event_lag
                    .observe(received.elapsed().as_secs_f64());
            }
        }
        agent.flush_logs();
        tokio::select! {
            _ = changed.notify.notified() => triggered_by_event = true,
            _ = tokio::time::sleep(resync) => triggered_by_event = false,
        }
    }
}

/// Pokes the sync loop, remembering when the oldest unsynced event arrived (for the
/// event-to-map lag metric).
#[derive(Default)]
struct Changed {
    notify: Notify,
    oldest: std::sync::Mutex<Option<Instant>>,
}

impl Changed {
    fn event(&self) {
        self.oldest
            .lock()
            .expect("lock")
            .get_or_insert_with(Instant::now);
        self.notify.notify_one();
    }

    fn take_oldest(&self) -> Option<Instant> {
        self.oldest.lock().expect("lock").take()
    }
}

/// The store's objects, shared: no deep copy per sync.
fn snapshot<K: Clone + Resource>(store: &Store<K>) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store.state()
}

/// Start a watcher + reflector for `K`; every settled change pokes `changed`.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &'static str,
    changed: &Arc<Changed>,
    telemetry: &Arc<Telemetry>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, config).default_backoff());
    let (changed, telemetry) = (changed.clone(), telemetry.clone());
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
                Ok(Event::InitApply(_)) => {}
                Ok(_) => changed.event(),
                Err(e) => warn!(resource, "watch error (retrying with backoff): {e}"),
            }
        }
    });
    reader
}
