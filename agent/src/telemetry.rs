//! What the agent tells operators and kubelet: `/healthz` (alive), `/readyz` (the
//! first full sync is done) and Prometheus `/metrics` (prometheus-client): datapath
//! counters by reason and map fill levels read from the pinned maps at scrape time,
//! sync durations, skipped objects and watch restarts from the agent.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{Context, Result};
use ferrite_common::{capacity, map_names, stat};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tracing::warn;

use crate::maps::NodeMaps;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

/// Metrics and readiness shared by the agent loop and the HTTP endpoint.
pub struct Telemetry {
    ready: AtomicBool,
    pin_dir: PathBuf,
    registry: Mutex<Registry>,
    pub sync_duration: Histogram,
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub map_writes: Counter,
    pub skipped_objects: Gauge,
    pub watch_restarts: Family<ResourceLabel, Counter>,
    datapath_packets: Family<ReasonLabel, Gauge>,
    datapath_bytes: Family<ReasonLabel, Gauge>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
}

impl Telemetry {
    pub fn new(pin_dir: PathBuf) -> Arc<Self> {
        let telemetry = Self {
            ready: AtomicBool::new(false),
            pin_dir,
            registry: Mutex::new(Registry::with_prefix("ferrite")),
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            map_writes: Counter::default(),
            skipped_objects: Gauge::default(),
            watch_restarts: Family::default(),
            datapath_packets: Family::default(),
            datapath_bytes: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
        };
        {
            let mut r = telemetry.registry.lock().expect("registry");
            r.register(
                "sync_duration_seconds",
                "Time to diff and apply one sync",
                telemetry.sync_duration.clone(),
            );
            r.register("syncs", "Reconciliations run", telemetry.syncs.clone());
            r.register(
                "sync_errors",
                "Reconciliations that failed (maps keep their last good state)",
                telemetry.sync_errors.clone(),
            );
            r.register(
                "map_writes",
                "Map entries written or removed by syncs",
                telemetry.map_writes.clone(),
            );
            r.register(
                "skipped_objects",
                "Objects (or parts) skipped in the last sync, each with a logged reason",
                telemetry.skipped_objects.clone(),
            );
            r.register(
                "watch_restarts",
                "Kubernetes watches restarted (relists, e.g. after 410 Gone)",
                telemetry.watch_restarts.clone(),
            );
            r.register(
                "datapath_packets",
                "Datapath events by counter, from the per-CPU ferrite_stats map",
                telemetry.datapath_packets.clone(),
            );
            r.register(
                "datapath_bytes",
                "Bytes by datapath counter",
                telemetry.datapath_bytes.clone(),
            );
            r.register(
                "map_entries",
                "Entries in each pinned map",
                telemetry.map_entries.clone(),
            );
            r.register(
                "map_capacity",
                "Capacity of each pinned map",
                telemetry.map_capacity.clone(),
            );
        }
        Arc::new(telemetry)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Refresh the values that live in the maps, then encode everything.
    pub fn render(&self) -> Result<String> {
        if let Ok(maps) = NodeMaps::open(&self.pin_dir) {
            if let Ok(counters) = maps.counters() {
                for (index, counter) in counters.iter().enumerate() {
                    let label = ReasonLabel {
                        reason: stat::NAMES[index].to_string(),
                    };
                    self.datapath_packets
                        .get_or_create(&label)
                        .set(counter.packets as i64);
                    self.datapath_bytes
                        .get_or_create(&label)
                        .set(counter.bytes as i64);
                }
            }
            if let Ok(contents) = maps.contents() {
                let ct = maps.conntrack_entries().map(|e| e.len()).unwrap_or(0);
                for (map, entries, cap) in [
                    (
                        map_names::SERVICES,
                        contents.services.len(),
                        capacity::SERVICES,
                    ),
                    (
                        map_names::BACKENDS,
                        contents.backends.len(),
                        capacity::BACKENDS,
                    ),
                    (
                        map_names::REV_NAT,
                        contents.rev_nat.len(),
                        capacity::REV_NAT,
                    ),
                    (
                        map_names::ENDPOINTS,
                        contents.endpoints.len(),
                        capacity::ENDPOINTS,
                    ),
                    (map_names::ROUTES, contents.routes.len(), capacity::ROUTES),
                    (map_names::CONNTRACK, ct, capacity::CONNTRACK),
                ] {
                    let label = MapLabel {
                        map: map.to_string(),
                    };
                    self.map_entries.get_or_create(&label).set(entries as i64);
                    self.map_capacity.get_or_create(&label).set(cap as i64);
                }
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry"))?;
        Ok(out)
    }
}

/// Serve `/healthz`, `/readyz` and `/metrics` on `addr` from a background thread.
pub fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<()> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("listening on {addr}"))?;
    std::thread::spawn(move || {
        for request in server.incoming_requests() {
            let (status, body) = match request.url() {
                "/healthz" => (200, "ok\n".to_string()),
                "/readyz" if telemetry.is_ready() => (200, "ready\n".to_string()),
                "/readyz" => (503, "waiting for the first full sync\n".to_string()),
                "/metrics" => match telemetry.render() {
                    Ok(text) => (200, text),
                    Err(e) => (500, format!("{e:#}\n")),
                },
                _ => (404, "not found\n".to_string()),
            };
            let response = tiny_http::Response::from_string(body).with_status_code(status);
            if let Err(e) = request.respond(response) {
                warn!("http: {e}");
            }
        }
    });
    Ok(())
}
