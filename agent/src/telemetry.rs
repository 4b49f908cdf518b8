//! What the agent tells operators and kubelet: `/healthz` (alive: the sync loop is
//! not stuck), `/readyz` (the first full sync is done, the config is accepted and the
//! loop keeps turning) and Prometheus `/metrics` (prometheus-client): datapath
//! counters by reason and map fill levels read from the pinned maps at scrape time,
//! sync durations, skipped objects and watch restarts from the agent.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use ferrite_common::{map_names, stat, CtKey, CtValue, CT_FLAG_REPLY, REV_NAT_NONE};
use futures::FutureExt;
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

use crate::model::Skipped;

use crate::{
    http::{Handler, Reply},
    maps::NodeMaps,
    plan::{MapContents, SharedPolicy},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// Service port names (`namespace/name:port`) by frontend (address, port).
pub type ServiceNames = BTreeMap<([u8; 4], u16), String>;

/// This node's pods (`namespace/name`) by address.
pub type PodNames = BTreeMap<[u8; 4], String>;

/// One Service frontend and one of its backends.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `namespace/name:port-name` (empty if the agent has not synced it yet).
    pub service: String,
    /// `ip:port` of the Service port.
    pub frontend: String,
    /// `ip:port` of the backend.
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

/// Metrics and readiness shared by the agent loop and the HTTP endpoint.
pub struct Telemetry {
    ready: AtomicBool,
    /// When the sync loop last went round, and how often it must.
    heartbeat: Mutex<Heartbeat>,
    /// Why the config file was refused, while it is (the last applied state stays).
    config_rejected: Mutex<Option<String>>,
    /// Why the overlay is not wired, as the last full sync found it.
    overlay_problem: Mutex<Option<String>>,
    pub config_rejections: Counter,
    /// Times the config file was read (only when it changed, or at start).
    pub config_reads: Counter,
    pin_dir: PathBuf,
    registry: Mutex<Registry>,
    pub sync_duration: Histogram,
    /// From the oldest Kubernetes event of a batch arriving to its sync being written.
    pub event_lag: Histogram,
    /// Service names by frontend (ip, port), set by the agent after each sync.
    service_names: Mutex<Arc<ServiceNames>>,
    /// This node's pod names by address, set by the agent after each full sync.
    pod_names: Mutex<Arc<PodNames>>,
    /// The policy index the maps were last written from (`None`: no sync holds).
    policy: Mutex<Option<SharedPolicy>>,
    backend_packets: Family<BackendLabels, Gauge>,
    backend_bytes: Family<BackendLabels, Gauge>,
    backend_flows: Family<BackendLabels, Gauge>,
    /// Packets and bytes of the Service flows conntrack GC removed, per (rev-NAT
    /// index, backend id): with the live entries' they make the per-backend totals.
    retired_flows: Mutex<BTreeMap<(u32, u32), ferrite_common::Counter>>,
    pub syncs: Counter,
    /// Syncs of Pod, Namespace and NetworkPolicy changes that updated only the
    /// policy maps (no full sync).
    pub policy_updates: Counter,
    pub sync_errors: Counter,
    pub map_writes: Counter,
    pub conntrack_gc_removed: Counter,
    /// Flows of the kernel's conntrack table seeded into `ferrite_ct` when the agent
    /// took the node over from kube-proxy (`--take-over-from-kube-proxy`).
    pub takeover_flows: Counter,
    /// kube-proxy's rules (iptables, nftables) removed by that take-over.
    pub takeover_rules_removed: Counter,
    /// Pods whose host side (veth up, /32 route, neighbour) a full sync restored.
    pub pod_wiring_repairs: Counter,
    pub skipped_objects: Gauge,
    pub watch_restarts: Family<ResourceLabel, Counter>,
    drift_repairs: Family<MapLabel, Counter>,
    datapath_packets: Family<ReasonLabel, Gauge>,
    datapath_bytes: Family<ReasonLabel, Gauge>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    map_pressure: Family<MapLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    capacities: BTreeMap<String, u32>,
    /// kube-proxy's health endpoint (`--healthz-bind-address`).
    pub proxy_health: Arc<crate::proxy_health::ProxyHealth>,
}

impl Telemetry {
    /// `capacities`: `max_entries` of each map, by name.
    pub fn new(pin_dir: PathBuf, capacities: BTreeMap<String, u32>) -> Arc<Self> {
        let telemetry = Self {
            ready: AtomicBool::new(false),
            heartbeat: Mutex::default(),
            config_rejected: Mutex::default(),
            overlay_problem: Mutex::default(),
            config_rejections: Counter::default(),
            config_reads: Counter::default(),
            pin_dir,
            registry: Mutex::new(Registry::with_prefix("ferrite")),
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            event_lag: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            service_names: Mutex::default(),
            pod_names: Mutex::default(),
            policy: Mutex::default(),
            backend_packets: Family::default(),
            backend_bytes: Family::default(),
            backend_flows: Family::default(),
            retired_flows: Mutex::default(),
            syncs: Counter::default(),
            policy_updates: Counter::default(),
            sync_errors: Counter::default(),
            map_writes: Counter::default(),
            conntrack_gc_removed: Counter::default(),
            takeover_flows: Counter::default(),
            takeover_rules_removed: Counter::default(),
            pod_wiring_repairs: Counter::default(),
            skipped_objects: Gauge::default(),
            proxy_health: Arc::default(),
            watch_restarts: Family::default(),
            drift_repairs: Family::default(),
            datapath_packets: Family::default(),
            datapath_bytes: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_pressure: Family::default(),
            capacities,
        };
        {
            let mut r = telemetry.registry.lock().expect("registry");
            r.register(
                "sync_duration_seconds",
                "Time to diff and apply one sync",
                telemetry.sync_duration.clone(),
            );
            r.register(
                "event_to_map_seconds",
                "Lag from a Kubernetes event arriving to the maps reflecting it",
                telemetry.event_lag.clone(),
            );
            r.register(
                "service_backend_packets",
                "Packets clients sent to a Service port that went to a backend (per-packet \
                 path: from the flows' conntrack entries)",
                telemetry.backend_packets.clone(),
            );
            r.register(
                "service_backend_flows",
                "Flows clients opened to a Service port that went to a backend (per-packet \
                 and socket-level, ferrite_lbstats)",
                telemetry.backend_flows.clone(),
            );
            r.register(
                "service_backend_bytes",
                "Bytes clients sent to a Service port that went to a backend",
                telemetry.backend_bytes.clone(),
            );
            r.register("syncs", "Reconciliations run", telemetry.syncs.clone());
            r.register(
                "policy_updates",
                "Pod, Namespace and NetworkPolicy changes synced as an update of the policy maps, without a full sync",
                telemetry.policy_updates.clone(),
            );
            r.register(
                "pod_wiring_repairs",
                "Pods whose host veth, /32 route or neighbour entry a full sync restored",
                telemetry.pod_wiring_repairs.clone(),
            );
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
                "conntrack_gc_removed",
                "Conntrack entries of finished or idle flows removed",
                telemetry.conntrack_gc_removed.clone(),
            );
            r.register(
                "takeover_flows",
                "Open flows of kube-proxy's (kernel conntrack) seeded into Ferrite's conntrack by --take-over-from-kube-proxy",
                telemetry.takeover_flows.clone(),
            );
            r.register(
                "takeover_rules_removed",
                "kube-proxy's iptables and nftables rules removed by --take-over-from-kube-proxy",
                telemetry.takeover_rules_removed.clone(),
            );
            r.register(
                "skipped_objects",
                "Objects (or parts) skipped in the last sync, each with a logged reason",
                telemetry.skipped_objects.clone(),
            );
            r.register(
                "drift_repairs",
                "Map entries found different from what the agent wrote, and repaired",
                telemetry.drift_repairs.clone(),
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
            r.register(
                "config_rejections",
                "Config files refused whole (not YAML, or empty): the last applied state stayed",
                telemetry.config_rejections.clone(),
            );
            r.register(
                "config_reads",
                "Times the config file was read (it is watched: read when it changed)",
                telemetry.config_reads.clone(),
            );
            r.register(
                "map_pressure",
                "Fill level of each pinned map, 0 to 1 (Services that do not fit are skipped)",
                telemetry.map_pressure.clone(),
            );
        }
        Arc::new(telemetry)
    }

    /// One series with empty label values in every labelled family, so that an
    /// encoding shows every metric with its label names (an empty family is not
    /// encoded): for `docs/reference/metrics.md`, never called by the agent.
    pub fn add_a_series_to_every_family(&self) {
        let backend = BackendLabels {
            service: String::new(),
            frontend: String::new(),
            backend: String::new(),
        };
        for family in [
            &self.backend_packets,
            &self.backend_bytes,
            &self.backend_flows,
        ] {
            let _ = family.get_or_create(&backend);
        }
        let _ = self.watch_restarts.get_or_create(&ResourceLabel {
            resource: String::new(),
        });
        let reason = ReasonLabel {
            reason: String::new(),
        };
        let _ = self.datapath_packets.get_or_create(&reason);
        let _ = self.datapath_bytes.get_or_create(&reason);
        let map = MapLabel { map: String::new() };
        let _ = self.drift_repairs.get_or_create(&map);
        let _ = self.map_entries.get_or_create(&map);
        let _ = self.map_capacity.get_or_create(&map);
        let _ = self.map_pressure.get_or_create(&map);
    }

    pub fn set_service_names(&self, names: Arc<ServiceNames>) {
        *self.service_names.lock().expect("names") = names;
    }

    pub fn set_pod_names(&self, names: Arc<PodNames>) {
        *self.pod_names.lock().expect("names") = names;
    }

    pub fn set_policy(&self, policy: Option<SharedPolicy>) {
        *self.policy.lock().expect("policy") = policy;
    }

    /// The policy index the maps were last written from, while a sync holds.
    pub fn policy(&self) -> Option<SharedPolicy> {
        self.policy.lock().expect("policy").clone()
    }

    /// This node's pod names by address, as of the last full sync.
    pub fn pod_names(&self) -> Arc<PodNames> {
        self.pod_names.lock().expect("names").clone()
    }

    /// Service port names by frontend, as of the last sync.
    pub fn service_names(&self) -> Arc<ServiceNames> {
        self.service_names.lock().expect("names").clone()
    }

    pub fn count_drift(&self, map: &str) {
        self.drift_repairs
            .get_or_create(&MapLabel { map: map.into() })
            .inc();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The config file was refused (`Some(why)`), or accepted again (`None`).
    pub fn set_config_rejected(&self, why: Option<String>) {
        if why.is_some() {
            self.config_rejections.inc();
        }
        *self.config_rejected.lock().expect("config state") = why;
    }

    /// The overlay is not wired (`Some(why)`), or is again (`None`).
    pub fn set_overlay_problem(&self, why: Option<String>) {
        *self.overlay_problem.lock().expect("overlay state") = why;
    }

    /// The sync loop turns at least once per `resync` (it waits for events with the
    /// next resync as deadline): from now on a loop that stops turning is reported.
    pub fn expect_turns_every(&self, resync: Duration) {
        self.heartbeat.lock().expect("heartbeat").resync = Some(resync);
    }

    /// The sync loop went round at `now`.
    pub fn loop_turned(&self, now: Instant) {
        self.heartbeat.lock().expect("heartbeat").last_turn = Some(now);
    }

    /// `/healthz` at `now`: alive unless the sync loop has not turned for longer than
    /// [`Heartbeat::live_bound`] (so kubelet's liveness probe restarts a stuck agent).
    pub fn liveness(&self, now: Instant) -> (u16, String) {
        let heartbeat = self.heartbeat.lock().expect("heartbeat");
        match heartbeat.stalled(now, Heartbeat::live_bound) {
            Some(stall) => (503, format!("sync loop stuck: {stall}\n")),
            None => (200, "ok\n".into()),
        }
    }

    /// `/readyz` at `now`: ready after the first full sync, while the config is
    /// accepted, the overlay wired and the sync loop keeps turning
    /// ([`Heartbeat::ready_bound`]).
    pub fn readiness(&self, now: Instant) -> (u16, String) {
        let stall = self
            .heartbeat
            .lock()
            .expect("heartbeat")
            .stalled(now, Heartbeat::ready_bound);
        if let Some(stall) = stall {
            return (503, format!("sync loop stalled: {stall}\n"));
        }
        if let Some(why) = self.config_rejected.lock().expect("config state").as_ref() {
            return (
                503,
                format!("config rejected ({why}): serving the last applied state\n"),
            );
        }
        if let Some(why) = self.overlay_problem.lock().expect("overlay state").as_ref() {
            return (503, format!("overlay not wired: {why}\n"));
        }
        if self.is_ready() {
            (200, "ready\n".into())
        } else {
            (503, "waiting for the first full sync\n".into())
        }
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
            if let Ok(contents) = maps.contents_without_maglev() {
                let conntrack = maps.conntrack_entries().unwrap_or_default();
                self.render_backend_counters(&maps, &contents, &conntrack);
                let ct = conntrack.len();
                for (map, entries) in [
                    (map_names::SERVICES, contents.services.len()),
                    (map_names::BACKENDS, contents.backends.len()),
                    (map_names::REV_NAT, contents.rev_nat.len()),
                    (map_names::SERVICES6, contents.services6.len()),
                    (map_names::BACKENDS6, contents.backends6.len()),
                    (map_names::REV_NAT6, contents.rev_nat6.len()),
                    (map_names::ENDPOINTS, contents.endpoints.len()),
                    (map_names::ENDPOINTS6, contents.endpoints6.len()),
                    (map_names::ROUTES, contents.routes.len()),
                    (map_names::ROUTES6, contents.routes6.len()),
                    (map_names::CONNTRACK, ct),
                    (map_names::MAGLEV, maps.maglev.keys().count()),
                    (map_names::SOURCE_RANGES, contents.source_ranges.len()),
                ] {
                    let cap = self.capacities.get(map).copied().unwrap_or(0);
                    let label = MapLabel {
                        map: map.to_string(),
                    };
                    self.map_entries.get_or_create(&label).set(entries as i64);
                    self.map_capacity.get_or_create(&label).set(cap as i64);
                    if cap > 0 {
                        self.map_pressure
                            .get_or_create(&label)
                            .set(entries as f64 / cap as f64);
                    }
                }
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry"))?;
        Ok(out)
    }

    /// Remember the packets and bytes of Service flows whose conntrack entries GC
    /// removed (forward entries count the client's packets).
    pub fn retire_flows(&self, removed: &[(CtKey, CtValue)]) {
        let mut retired = self.retired_flows.lock().expect("retired flows");
        for (_, value) in removed.iter().filter(|(_, v)| is_service_forward(v)) {
            let total = retired
                .entry((value.rev_nat_index, value.backend_id))
                .or_default();
            total.packets += value.packets;
            total.bytes += value.bytes;
        }
    }

    /// Per Service port and backend: packets and bytes of the per-packet path's flows
    /// (their conntrack forward entries, live and retired), and flows opened
    /// (`ferrite_lbstats`, which socket-level balancing counts too). Pairs whose
    /// frontend or backend is no longer in the maps are left out (their series
    /// disappear, and their retired totals are forgotten: ids are reused).
    fn render_backend_counters(
        &self,
        maps: &NodeMaps,
        contents: &MapContents,
        conntrack: &[(CtKey, CtValue)],
    ) {
        let names = self.service_names.lock().expect("names").clone();
        for family in [
            &self.backend_packets,
            &self.backend_bytes,
            &self.backend_flows,
        ] {
            family.clear();
        }
        let exists = |(rev_nat, backend): &(u32, u32)| {
            contents.rev_nat.contains_key(rev_nat) && contents.backends.contains_key(backend)
        };
        let mut traffic = {
            let mut retired = self.retired_flows.lock().expect("retired flows");
            retired.retain(|pair, _| exists(pair));
            retired.clone()
        };
        for (_, value) in conntrack.iter().filter(|(_, v)| is_service_forward(v)) {
            let total = traffic
                .entry((value.rev_nat_index, value.backend_id))
                .or_default();
            total.packets += value.packets;
            total.bytes += value.bytes;
        }
        let flows: BTreeMap<(u32, u32), u64> = maps
            .lb_counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(key, counter)| ((key.rev_nat_index, key.backend_id), counter.packets))
            .collect();
        let labels = |(rev_nat, backend): &(u32, u32)| {
            let (frontend, backend) = (&contents.rev_nat[rev_nat], &contents.backends[backend]);
            BackendLabels {
                service: names
                    .get(&(frontend.address, frontend.port))
                    .cloned()
                    .unwrap_or_default(),
                frontend: format!("{}:{}", Ipv4Addr::from(frontend.address), frontend.port),
                backend: format!("{}:{}", Ipv4Addr::from(backend.address), backend.port),
            }
        };
        for (pair, counter) in traffic.iter().filter(|(pair, _)| exists(pair)) {
            let labels = labels(pair);
            self.backend_packets
                .get_or_create(&labels)
                .set(counter.packets as i64);
            self.backend_bytes
                .get_or_create(&labels)
                .set(counter.bytes as i64);
        }
        for (pair, count) in flows.iter().filter(|(pair, _)| exists(pair)) {
            self.backend_flows
                .get_or_create(&labels(pair))
                .set(*count as i64);
        }
    }
}

/// A Service flow's forward entry (client -> frontend): it counts the client's
/// packets to that backend.
fn is_service_forward(value: &CtValue) -> bool {
    value.flags & CT_FLAG_REPLY == 0 && value.rev_nat_index != REV_NAT_NONE
}

/// `/healthz`, `/readyz` and `/metrics`, for [`crate::http::HttpRuntime::serve`].
/// `/metrics` reads the pinned maps (a full conntrack table takes a while): it is
/// rendered on the runtime's blocking pool, one scrape at a time, so that probes are
/// answered meanwhile.
pub fn endpoint(telemetry: Arc<Telemetry>) -> Handler {
    let scrapes = Arc::new(tokio::sync::Semaphore::new(1));
    Arc::new(move |path: &str| {
        let now = Instant::now();
        let (status, body) = match path {
            "/healthz" => telemetry.liveness(now),
            "/readyz" => telemetry.readiness(now),
            "/metrics" => {
                let (telemetry, scrapes) = (telemetry.clone(), scrapes.clone());
                return async move {
                    let Ok(_turn) = scrapes.acquire_owned().await else {
                        return Reply::text(503, "shutting down\n");
                    };
                    let rendered = tokio::task::spawn_blocking(move || telemetry.render()).await;
                    match rendered {
                        Ok(Ok(text)) => Reply {
                            status: 200,
                            headers: vec![(
                                "Content-Type",
                                "text/plain; version=0.0.4; charset=utf-8".into(),
                            )],
                            body: text,
                        },
                        Ok(Err(e)) => Reply::text(500, format!("{e:#}\n")),
                        Err(e) => Reply::text(500, format!("rendering the metrics: {e}\n")),
                    }
                }
                .boxed();
            }
            _ => (404, "not found\n".to_string()),
        };
        std::future::ready(Reply::text(status, body)).boxed()
    })
}

/// The sync loop's last turn, judged against its resync period: the loop waits for
/// events with the next full resync as its deadline, so it turns at least once per
/// period plus one sync. Before the first turn (the first snapshot may wait for the
/// initial lists: readiness already says so) nothing is judged.
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// `None`: no period given (the loop is not running yet): never stalled.
    resync: Option<Duration>,
    last_turn: Option<Instant>,
}

/// How long the loop has not turned, against which bound.
#[derive(Debug, PartialEq, Eq)]
pub struct Stall {
    pub since: Duration,
    pub bound: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its last turn was {}s ago (bound {}s, from --resync-seconds)",
            self.since.as_secs(),
            self.bound.as_secs()
        )
    }
}

impl Heartbeat {
    /// Not ready past three periods and 30 s: two resyncs missed, with room for a
    /// full resync of a large cluster (seconds) on a busy node.
    pub fn ready_bound(resync: Duration) -> Duration {
        resync * 3 + Duration::from_secs(30)
    }

    /// Not alive past twice the readiness bound and a minute (180 s at the default
    /// 10 s): readiness has long taken the node out of rotation by then, and a
    /// restart is what is left.
    pub fn live_bound(resync: Duration) -> Duration {
        Self::ready_bound(resync) * 2 + Duration::from_secs(60)
    }

    /// The stall at `now`, if the last turn is older than `bound(resync)`.
    pub fn stalled(&self, now: Instant, bound: fn(Duration) -> Duration) -> Option<Stall> {
        let (resync, last_turn) = (self.resync?, self.last_turn?);
        let since = now.saturating_duration_since(last_turn);
        let bound = bound(resync);
        (since > bound).then_some(Stall { since, bound })
    }
}

/// Skipped objects as last logged: a skip is logged when it first appears or its
/// reason changes, not again on every sync (kube-proxy logs events, not states);
/// `ferrite_skipped_objects` carries the level. A sync that skips many new objects
/// logs the first [`SkipLog::SHOWN`] and one summary line of the rest, by reason.
#[derive(Debug, Default)]
pub struct SkipLog {
    logged: std::collections::HashSet<String>,
}

impl SkipLog {
    /// New skips one sync logs a line each.
    pub const SHOWN: usize = 20;

    /// A full sync's skips (all there are now): log the new ones, forget the gone.
    /// Returns how many were new.
    pub fn full_sync(&mut self, skipped: &[Skipped]) -> usize {
        let before = std::mem::take(&mut self.logged);
        let mut new = Vec::new();
        for skip in skipped {
            let line = skip.to_string();
            if !before.contains(&line) && !self.logged.contains(&line) {
                new.push(skip);
            }
            self.logged.insert(line);
        }
        log_skips(&new);
        new.len()
    }

    /// An update's skips (of the Services it changed): log the new ones.
    pub fn update(&mut self, skipped: &[Skipped]) -> usize {
        let new: Vec<&Skipped> = skipped
            .iter()
            .filter(|skip| self.logged.insert(skip.to_string()))
            .collect();
        log_skips(&new);
        new.len()
    }
}

/// One line per skip up to [`SkipLog::SHOWN`], then one for the rest by reason.
/// Object names are not trusted: control characters in them are escaped, so a
/// name cannot forge a log line.
fn log_skips(new: &[&Skipped]) {
    for skip in new.iter().take(SkipLog::SHOWN) {
        warn!("skipped {}", escape_controls(&skip.to_string()));
    }
    if new.len() > SkipLog::SHOWN {
        let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
        for skip in &new[SkipLog::SHOWN..] {
            *by_reason
                .entry(reason_shape(&skip.reason.to_string()))
                .or_default() += 1;
        }
        let mut reasons: Vec<(String, usize)> = by_reason.into_iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let shown: Vec<String> = reasons
            .iter()
            .take(5)
            .map(|(reason, count)| format!("{count} x {}", escape_controls(reason)))
            .collect();
        warn!(
            more = new.len() - SkipLog::SHOWN,
            "skipped {} more objects: {}{}",
            new.len() - SkipLog::SHOWN,
            shown.join("; "),
            if reasons.len() > shown.len() {
                "; ..."
            } else {
                ""
            }
        );
    }
}

/// A reason with its numbers as `#`, so alike refusals count together.
fn reason_shape(reason: &str) -> String {
    let mut shape = String::with_capacity(reason.len());
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !shape.ends_with('#') {
                shape.push('#');
            }
        } else {
            shape.push(c);
        }
    }
    shape
}

/// `text` with control characters (newlines, escapes) written as `\u{..}`.
pub fn escape_controls(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_unicode().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod heartbeat_tests {
    use super::*;

    fn telemetry() -> Arc<Telemetry> {
        Telemetry::new(PathBuf::from("/nonexistent"), BTreeMap::new())
    }

    #[test]
    fn a_loop_that_stops_turning_turns_readyz_then_healthz_503() {
        let t = telemetry();
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        // Before the loop runs (the first snapshot may wait for the lists): alive.
        assert_eq!(t.liveness(at(10_000)).0, 200);
        t.expect_turns_every(Duration::from_secs(10));
        assert_eq!(t.liveness(at(10_000)).0, 200, "no turn yet");
        t.loop_turned(start);
        t.set_ready();
        assert_eq!(t.readiness(at(60)), (200, "ready\n".into()));
        assert_eq!(t.liveness(at(60)).0, 200);
        // 3 x 10 s + 30 s: not ready.
        let (status, body) = t.readiness(at(61));
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "sync loop stalled: its last turn was 61s ago (bound 60s, from --resync-seconds)\n"
        );
        assert_eq!(t.liveness(at(61)).0, 200, "alive still");
        // 2 x 60 s + 60 s: not alive.
        assert_eq!(t.liveness(at(180)).0, 200);
        let (status, body) = t.liveness(at(181));
        assert_eq!(status, 503);
        assert!(body.starts_with("sync loop stuck: its last turn was 181s ago (bound 180s"));
        // It turns again: both recover.
        t.loop_turned(at(200));
        assert_eq!(t.readiness(at(201)).0, 200);
        assert_eq!(t.liveness(at(201)).0, 200);
    }

    #[test]
    fn the_bounds_follow_the_resync_period() {
        let resync = Duration::from_secs(300);
        assert_eq!(Heartbeat::ready_bound(resync), Duration::from_secs(930));
        assert_eq!(Heartbeat::live_bound(resync), Duration::from_secs(1920));
        let heartbeat = Heartbeat {
            resync: Some(resync),
            last_turn: Some(Instant::now()),
        };
        let now = heartbeat.last_turn.unwrap() + Duration::from_secs(900);
        assert_eq!(heartbeat.stalled(now, Heartbeat::ready_bound), None);
    }
}

#[cfg(test)]
mod skip_log_tests {
    use super::*;
    use crate::model::SkipReason;

    fn skip(object: &str, reason: &str) -> Skipped {
        Skipped {
            object: object.into(),
            reason: SkipReason::Invalid(reason.into()),
        }
    }

    #[test]
    fn a_skip_is_logged_when_it_first_appears_or_changes_not_on_every_sync() {
        let mut log = SkipLog::default();
        let (a, b) = (
            skip("Service x/a", "bad port"),
            skip("Service x/b", "bad ip"),
        );
        assert_eq!(log.full_sync(&[a.clone(), b.clone()]), 2);
        assert_eq!(log.full_sync(&[a.clone(), b.clone()]), 0, "unchanged");
        let b_changed = skip("Service x/b", "another bad ip");
        assert_eq!(log.full_sync(&[a.clone(), b_changed.clone()]), 1);
        assert_eq!(
            log.update(std::slice::from_ref(&b_changed)),
            0,
            "unchanged in an update"
        );
        assert_eq!(log.update(&[skip("Service x/c", "bad")]), 1);
        // Gone, then back: logged again.
        assert_eq!(log.full_sync(std::slice::from_ref(&a)), 0);
        assert_eq!(log.full_sync(&[a, b]), 1);
    }

    #[test]
    fn names_cannot_forge_log_lines_and_alike_reasons_count_together() {
        assert_eq!(
            escape_controls("Service x/evil\n2026 INFO forged"),
            "Service x/evil\\u{a}2026 INFO forged"
        );
        assert_eq!(
            reason_shape("nodePort 31000 is outside the node port range 30000-30999"),
            "nodePort # is outside the node port range #-#"
        );
    }
}
