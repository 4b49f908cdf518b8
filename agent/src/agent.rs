//! The node agent: load and attach the datapath and prepare the node, then make its
//! maps, program attachments and host side match the objects the driver hands it
//! (see `driver`): the whole model, or only some Services.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use ferrite_common::{program_names, VXLAN_DEVICE};
use ipnet::Ipv4Net;
use tracing::{debug, error, info, warn};

use aya::programs::TcAttachType;

use crate::{
    datapath::{self, Attachment, Datapath},
    driver::{FullSync, PolicyObjectChanges, ServiceChanges, Snapshot, SyncTarget, Synced},
    files, host,
    maps::{self, NodeMaps},
    model::{self, policy::PolicyChanges, ClusterObjects, ServiceRef},
    plan,
    telemetry::{PodNames, ServiceNames, SkipLog, Telemetry},
};

/// How the node's datapath is loaded and what it accepts.
pub struct AgentOptions {
    pub node: String,
    pub object: PathBuf,
    pub datapath_log: datapath::DatapathLog,
    pub vni: u32,
    pub vxlan_port: u16,
    /// Pod traffic leaving this CIDR is masqueraded to the node's address.
    pub cluster_cidr: Option<Ipv4Net>,
    /// `max_entries` of maps whose default does not suit (by map name); applies when
    /// the maps are created (first start, or after `ferrite uninstall`).
    pub map_capacities: BTreeMap<String, u32>,
    /// Socket-level load balancing on `cgroup_root`.
    pub socket_lb: bool,
    /// The cgroup v2 directory whose processes (pods and host processes alike) get
    /// socket-level load balancing; `None`: the cgroup v2 mount.
    pub cgroup_root: Option<PathBuf>,
    /// The node's /proc/sys/net, where the agent sets the sysctls it relies on.
    pub proc_sys_net: PathBuf,
    /// Whether the uplink gets the XDP program.
    pub uplink_xdp: plan::UplinkXdp,
    /// How pod traffic reaches other nodes (`--routing`).
    pub routing: plan::Routing,
    /// What the node accepts from objects (`--service-cidr`, `--external-ip-cidr`,
    /// `--node-port-range`; `cluster_cidr` too).
    pub limits: crate::limits::Limits,
    /// `--take-over-from-kube-proxy`: the first sync seeds conntrack from the
    /// kernel's before attaching the programs, then removes kube-proxy's rules (see
    /// `takeover`).
    pub take_over_from_kube_proxy: bool,
}

impl AgentOptions {
    /// The capacity of map `name`: the configured one, else the default (0: a map
    /// without a capacity of its own).
    pub fn capacity(&self, name: &str) -> u32 {
        self.map_capacities
            .get(name)
            .copied()
            .or_else(|| ferrite_common::capacity::default_for(name))
            .unwrap_or(0)
    }
}

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub services: usize,
    pub endpoints: usize,
    pub purged_flows: usize,
    pub skipped: Vec<model::Skipped>,
    /// Pods whose interface is not there yet: worth retrying soon.
    pub waiting_for_interfaces: bool,
    /// Service port names by frontend (ip, port), for the per-backend metrics.
    pub service_names: Arc<ServiceNames>,
    /// This node's pods by address, for monitors (full syncs only: an update of
    /// some Services knows no pods).
    pub pod_names: Option<Arc<PodNames>>,
    /// Why the overlay is not wired (no VXLAN device, or its program attached
    /// elsewhere), if it is not.
    pub overlay_problem: Option<String>,
    /// `--take-over-from-kube-proxy`: the kernel's open flows and how many of them
    /// this sync seeded into `ferrite_ct` (or why that failed), if it did.
    pub seeded_flows: Option<std::result::Result<(usize, usize), String>>,
}

impl SyncReport {
    /// The Services of `state`: their count and names.
    fn of_services(state: &model::DesiredState) -> Self {
        Self {
            services: state.services.len(),
            service_names: Arc::new(
                state
                    .services
                    .iter()
                    .map(|(frontend, service)| {
                        ((frontend.ip.octets(), frontend.port), service.name.clone())
                    })
                    .collect(),
            ),
            ..Self::default()
        }
    }
}

/// The loaded datapath of this node and everything a sync needs.
pub struct NodeAgent {
    pub settings: plan::NodeSettings,
    pub telemetry: Arc<Telemetry>,
    parts: NodeParts,
    /// What the last successful sync left in the maps and from what: event-driven
    /// syncs diff against it instead of re-reading every map (110k entries at 10k
    /// Services), and Service updates build in its node context.
    node: Option<plan::NodeState>,
    health_checks: crate::healthcheck::HealthChecks,
    /// Skipped objects already logged: each is logged when first skipped or changed.
    skip_log: SkipLog,
}

/// What a sync writes to: the loaded datapath, its pinned maps, and the node's host
/// side around them.
pub struct NodeParts {
    pub datapath: Datapath,
    pub maps: NodeMaps,
    pub host: HostSide,
    /// `--take-over-from-kube-proxy`, until a sync has done it.
    pub take_over_pending: bool,
}

impl NodeAgent {
    /// Load/attach the datapath (reusing what is pinned) and prepare the node.
    /// The agent's metrics, for the sources to report into before the agent starts.
    pub fn telemetry(options: &AgentOptions) -> Arc<Telemetry> {
        let capacities = ferrite_common::map_names::ALL
            .iter()
            .map(|name| (name.to_string(), options.capacity(name)))
            .collect();
        Telemetry::new(datapath::pin_dir(&options.node), capacities)
    }

    /// Load the datapath and prepare the node; `telemetry` from [`Self::telemetry`].
    pub fn start(options: &AgentOptions, telemetry: Arc<Telemetry>) -> Result<Self> {
        let pin_dir = datapath::pin_dir(&options.node);
        let datapath = Datapath::load(
            &options.object,
            &pin_dir,
            options.datapath_log,
            &options.map_capacities,
        )?;
        let maps = NodeMaps::open(&pin_dir)?;
        host::sysctl::enable_forwarding(&options.proc_sys_net)?;
        if options.limits.cluster_cidr6.is_some() {
            host::sysctl::enable_forwarding6(&options.proc_sys_net)?;
        }
        host::sysctl::accept_local_sources_on_lo(&options.proc_sys_net)?;
        let socket_lb_root = match (options.socket_lb, &options.cgroup_root) {
            (false, _) => None,
            (true, Some(root)) => Some(datapath::cgroup2_directory(root)?),
            (true, None) => Some(datapath::default_cgroup_root()?),
        };
        let host_side = HostSide {
            socket_lb_root,
            overlay: None,
            vxlan_port: options.vxlan_port,
            cluster_cidr: options.cluster_cidr,
            cluster_cidr6: options.limits.cluster_cidr6,
        };
        host_side.ensure_device_and_rules(&host::interfaces::interfaces()?)?;
        info!(node = %options.node, pins = %pin_dir.display(), "datapath loaded");
        Ok(Self {
            settings: plan::NodeSettings {
                node: options.node.clone(),
                vni: options.vni,
                vxlan_port: options.vxlan_port,
                uplink_xdp: options.uplink_xdp,
                external_in_tc: false,
                routing: options.routing,
                uplink: None,
                limits: options.limits.clone(),
                capacities: plan::Capacities::of(|name| options.capacity(name) as usize),
            },
            telemetry,
            parts: NodeParts {
                datapath,
                maps,
                host: host_side,
                take_over_pending: options.take_over_from_kube_proxy,
            },
            node: None,
            health_checks: Default::default(),
            skip_log: SkipLog::default(),
        })
    }

    /// Serve the Services' healthCheckNodePorts on `http` (before this, none is).
    pub fn serve_health_checks(&mut self, http: Arc<crate::http::HttpRuntime>) {
        self.health_checks = crate::healthcheck::HealthChecks::new(http);
    }

    /// Reconcile, record metrics and log; the first success makes the agent ready.
    /// Errors are logged: the maps keep their last good state and the next sync retries.
    /// Syncs after a change diff against what the agent last wrote; resyncs (start,
    /// periodic) read the maps, which also repairs drift.
    pub fn sync(
        &mut self,
        objects: &ClusterObjects,
        skipped: Vec<model::Skipped>,
        how: FullSync,
    ) -> Option<SyncReport> {
        let start = Instant::now();
        let event_driven = how == FullSync::AfterChange;
        // After a change, what the agent last wrote stands for the maps (taken: if
        // the sync fails, the next one reads them back).
        let cached = match &mut self.node {
            Some(node) if event_driven => Some(std::mem::take(&mut node.written).contents),
            _ => None,
        };
        let current = match cached {
            Some(mut contents) => (|| {
                contents.endpoints = self.parts.maps.endpoint_entries()?;
                contents.endpoints6 = self.parts.maps.endpoint6_entries()?;
                Ok(contents)
            })(),
            None => self.parts.maps.contents(),
        };
        let last_written = self
            .node
            .as_ref()
            .filter(|_| !event_driven)
            .map(|node| &node.written.contents);
        if let (Ok(actual), Some(expected)) = (&current, last_written) {
            self.report_drift(expected, actual);
        }
        if !event_driven {
            // Full syncs read the host side back too, repairing drift there.
            self.parts.host.overlay = None;
        }
        let result = current.and_then(|current| {
            reconcile(
                objects,
                skipped,
                current,
                last_written,
                self.node.as_ref().map(|node| &node.context),
                &self.settings,
                &mut self.parts,
                &|policy, names| {
                    self.telemetry.set_policy(Some(policy));
                    self.telemetry.set_service_names(names);
                },
            )
        });
        let first = self.telemetry.syncs.get() == 0;
        self.telemetry
            .sync_duration
            .observe(start.elapsed().as_secs_f64());
        self.telemetry.syncs.inc();
        match result {
            Ok((report, node)) => {
                self.telemetry.map_writes.inc_by(report.writes as u64);
                self.telemetry
                    .skipped_objects
                    .set(report.skipped.len() as i64);
                self.skip_log.full_sync(&report.skipped);
                if event_driven || first || report.writes > 0 {
                    info!(
                        services = report.services,
                        endpoints = report.endpoints,
                        writes = report.writes,
                        purged_flows = report.purged_flows,
                        "synced"
                    );
                }
                if let Some(pods) = &report.pod_names {
                    self.telemetry.set_pod_names(pods.clone());
                }
                if let Some(problem) = &report.overlay_problem {
                    warn!("overlay not wired: {problem}");
                }
                self.telemetry
                    .set_overlay_problem(report.overlay_problem.clone());
                self.health_checks.set(&node.health_checks);
                self.node = Some(node);
                if let Some(seeded) = &report.seeded_flows {
                    self.parts.take_over_pending = false;
                    self.take_over_from_kube_proxy(seeded);
                }
                self.telemetry.set_ready();
                self.report_proxy_health(objects);
                if !event_driven {
                    self.collect_conntrack_garbage();
                    self.repair_pod_wiring();
                }
                // A full sync allocates and frees the whole desired state: hand the
                // freed pages back instead of keeping the peak as resident memory.
                // SAFETY: malloc_trim only releases free heap memory.
                unsafe { nix::libc::malloc_trim(0) };
                Some(report)
            }
            Err(e) => {
                // The maps may hold part of the writes: the next sync reads them back.
                self.node = None;
                self.telemetry.set_policy(None);
                self.telemetry.sync_errors.inc();
                error!("sync failed: {e:#}");
                None
            }
        }
    }

    /// After a full sync: the datapath is synced, and this node's Node object says
    /// whether load balancers should still send it traffic (kube-proxy's `/healthz`).
    fn report_proxy_health(&self, objects: &ClusterObjects) {
        let health = &self.telemetry.proxy_health;
        health.synced(Instant::now(), std::time::SystemTime::now());
        let this_node = objects
            .nodes
            .iter()
            .find(|node| node.metadata.name.as_deref() == Some(self.settings.node.as_str()));
        if let Some(node) = this_node {
            let eligible = crate::proxy_health::node_eligible(node);
            if health.set_node_eligible(eligible) {
                info!(
                    eligible,
                    "this node's eligibility for load-balancer traffic changed (/healthz)"
                );
            }
        }
    }

    /// After the sync that seeded `ferrite_ct` with the kernel's open flows (`seeded`:
    /// the kernel's flow count and how many were seeded, or why it failed), now that
    /// Ferrite serves every frontend: count and log it, remove kube-proxy's rules.
    fn take_over_from_kube_proxy(&self, seeded: &std::result::Result<(usize, usize), String>) {
        match seeded {
            Ok((kernel, seeded)) => {
                self.telemetry.takeover_flows.inc_by(*seeded as u64);
                info!(
                    kernel_flows = kernel,
                    seeded, "took over kube-proxy's open Service flows (kernel conntrack)"
                );
            }
            Err(e) => error!("seeding conntrack from the kernel's failed: {e}"),
        }
        let removed = crate::takeover::remove_kube_proxy_rules();
        for (what, rules) in &removed.removed {
            info!(rules, "removed kube-proxy's rules: {what}");
        }
        for tool in &removed.missing {
            warn!("no {tool} here: kube-proxy's rules it would show are left as they are");
        }
        for failure in &removed.failed {
            error!("removing kube-proxy's rules failed: {failure}");
        }
        self.telemetry
            .takeover_rules_removed
            .inc_by(removed.total() as u64);
        info!(
            rules = removed.total(),
            "took the node over from kube-proxy"
        );
        if let Some(ipvs) = crate::takeover::ipvs_left() {
            warn!("{ipvs}");
        }
    }

    /// With every full sync (start and `--resync-seconds`): drop finished and idle
    /// flows from `ferrite_ct`.
    fn collect_conntrack_garbage(&mut self) {
        let clock = match self.parts.datapath.clock() {
            Ok(Some(clock)) => clock,
            // The first second after start: the next full sync collects.
            Ok(None) => return debug!("conntrack garbage collection waits for the clock rate"),
            Err(e) => return warn!("conntrack garbage collection: no clock: {e:#}"),
        };
        match self
            .parts
            .maps
            .collect_conntrack_garbage(clock, &Default::default())
        {
            Ok(removed) => {
                self.telemetry
                    .conntrack_gc_removed
                    .inc_by(removed.len() as u64);
                self.telemetry.retire_flows(&removed);
                debug!(removed = removed.len(), "conntrack garbage collected");
            }
            Err(e) => warn!("conntrack garbage collection failed: {e:#}"),
        }
    }

    /// With every full sync: each pod's host veth up, the node's /32 route and
    /// permanent neighbour for it (see [`host::pods::repair_host_sides`]).
    fn repair_pod_wiring(&self) {
        let Some(node) = &self.node else {
            return;
        };
        match host::pods::repair_host_sides(&node.written.contents.endpoints) {
            Ok(repaired) => {
                for pod in &repaired {
                    warn!("pod wiring repaired: {pod}");
                }
                self.telemetry
                    .pod_wiring_repairs
                    .inc_by(repaired.len() as u64);
            }
            Err(e) => warn!("checking pod wiring failed: {e:#}"),
        }
    }

    /// Entries the maps hold differently from what this agent wrote (bpftool, another
    /// process, a bug): logged and counted; the sync that follows repairs them.
    /// Endpoints are left out: the CNI plugin writes those between syncs.
    fn report_drift(&self, expected: &plan::MapContents, actual: &plan::MapContents) {
        let drift = plan::drift(expected, actual);
        if drift.is_empty() {
            return;
        }
        for op in &drift {
            self.telemetry.count_drift(plan::op_map(op));
        }
        let shown: Vec<String> = drift.iter().take(5).map(maps::describe_op).collect();
        warn!(
            entries = drift.len(),
            "maps drifted from what the agent wrote; repairing: {}{}",
            shown.join("; "),
            if drift.len() > shown.len() {
                "; ..."
            } else {
                ""
            }
        );
    }

    /// Update only the Services `changed` (present in `objects` with their
    /// EndpointSlices, or gone): O(their entries), not O(all Services), built in the
    /// node context of the last full sync. Returns `false` when a full sync must be
    /// done instead (none yet, a Service sharing a claim, or a failed write).
    pub fn sync_services(
        &mut self,
        changed: &BTreeSet<ServiceRef>,
        objects: &ClusterObjects,
    ) -> bool {
        let start = Instant::now();
        let Some(node) = &mut self.node else {
            return false;
        };
        let Some(plan) = node.plan_services(changed, objects, &self.settings.capacities) else {
            debug!(
                services = changed.len(),
                "a changed Service shares a frontend or health-check port: full sync"
            );
            return false;
        };
        if let Err(e) = write_maps(&mut self.parts.maps, &node.written.contents, &plan.ops) {
            // The maps may hold part of the ops: the next (full) sync re-reads them.
            self.node = None;
            self.telemetry.set_policy(None);
            self.telemetry.sync_errors.inc();
            error!("incremental sync failed: {e:#}");
            return false;
        }
        self.health_checks
            .update_services(changed, plan.health_checks());
        self.skip_log.update(&plan.skipped);
        let writes = plan.ops.len();
        node.commit(plan);
        self.telemetry
            .sync_duration
            .observe(start.elapsed().as_secs_f64());
        self.telemetry.syncs.inc();
        self.telemetry.map_writes.inc_by(writes as u64);
        self.telemetry
            .proxy_health
            .synced(Instant::now(), std::time::SystemTime::now());
        if writes > 0 {
            info!(
                services = changed.len(),
                writes,
                micros = start.elapsed().as_micros() as u64,
                "synced changed services"
            );
        }
        true
    }
}

impl NodeAgent {
    /// Update only what changed Pods, Namespaces and NetworkPolicies change in the
    /// policy maps (and endpoints' isolation flags), in time proportional to what
    /// they touch. Returns `false` when a full sync must be done instead (none yet,
    /// a changed Pod of this node wired differently, or a failed write).
    pub fn sync_policy(&mut self, changes: &PolicyChanges) -> bool {
        let start = Instant::now();
        let Some(node) = &mut self.node else {
            return false;
        };
        let Some(plan) = node.plan_policy(changes) else {
            debug!(
                pods = changes.pods.len(),
                "a changed Pod of this node is wired differently: full sync"
            );
            // The full sync that follows builds the node's state afresh (a policy
            // index that gave up stays stale until then).
            return false;
        };
        if let Err(e) = write_maps(&mut self.parts.maps, &node.written.contents, &plan.ops) {
            self.node = None;
            self.telemetry.set_policy(None);
            self.telemetry.sync_errors.inc();
            error!("incremental policy sync failed: {e:#}");
            return false;
        }
        self.skip_log.update(&plan.skipped);
        let writes = plan.ops.len();
        node.commit_policy(plan);
        self.telemetry
            .sync_duration
            .observe(start.elapsed().as_secs_f64());
        self.telemetry.syncs.inc();
        self.telemetry.policy_updates.inc();
        self.telemetry.map_writes.inc_by(writes as u64);
        if writes > 0 {
            info!(
                pods = changes.pods.len(),
                namespaces = changes.namespaces.len(),
                network_policies = changes.network_policies.len(),
                writes,
                micros = start.elapsed().as_micros() as u64,
                "synced changed policy objects"
            );
        }
        true
    }
}

impl SyncTarget for NodeAgent {
    fn sync_all(&mut self, snapshot: &Snapshot, how: FullSync) -> Synced {
        match self.sync(&snapshot.objects, snapshot.skipped.clone(), how) {
            None => Synced::Failed,
            Some(report) if report.waiting_for_interfaces => Synced::WaitingForInterfaces,
            Some(_) => Synced::Done,
        }
    }

    fn sync_services(&mut self, changes: &ServiceChanges) -> bool {
        NodeAgent::sync_services(self, &changes.services, &changes.objects)
    }

    fn sync_policy(&mut self, changes: &PolicyObjectChanges) -> bool {
        NodeAgent::sync_policy(self, &changes.changes)
    }

    fn flush_logs(&mut self) {
        self.parts.datapath.flush_logs();
    }

    fn record_event_lag(&self, lag: Duration) {
        self.telemetry.event_lag.observe(lag.as_secs_f64());
    }

    fn loop_turned(&self) {
        self.telemetry.loop_turned(std::time::Instant::now());
    }
}

/// Attach the programs of the node's devices that are not attached yet: from-pod and
/// to-pod on every pod veth, from-overlay on the VXLAN device, and on the uplink the
/// XDP program, from-uplink (ingress) and from-host (egress, as on `lo`). Returns the
/// attachments the node wants.
fn attach_programs(
    datapath: &mut Datapath,
    state: &model::DesiredState,
    interfaces: &BTreeMap<String, plan::Interface>,
    external: &ExternalInterfaces,
    use_xdp: bool,
) -> Result<BTreeSet<Attachment>> {
    let uplink = external.uplink.as_deref();
    let tc_programs = wanted_tc_programs(state, external);
    for (attachment, (program, direction)) in &tc_programs {
        let Some(device) = attachment.device().filter(|d| interfaces.contains_key(*d)) else {
            continue;
        };
        if datapath.ensure_attached(device, *direction, program)? {
            info!(interface = device, program, "attached");
        }
    }
    let mut wanted: BTreeSet<Attachment> = tc_programs.into_keys().collect();
    for device in uplink
        .into_iter()
        .chain(external.more.iter().map(String::as_str))
    {
        if attach_or_detach_uplink_xdp(datapath, device, use_xdp)? {
            wanted.insert(Attachment::Xdp(device.into()));
        }
    }
    // An interface that held a NodePort address and holds none now gets its
    // external programs removed (pod interfaces hold no address of the node's).
    for attachment in datapath.attached()? {
        let stale = match &attachment {
            Attachment::Xdp(device) | Attachment::Ingress(device) => {
                !wanted.contains(&attachment) && external.addressed.contains(device)
            }
            _ => false,
        };
        if stale {
            datapath.detach(&attachment)?;
            info!(
                link = attachment.pin_name(),
                "external program detached (no NodePort address on the interface)"
            );
        }
    }
    Ok(wanted)
}

/// The interfaces external traffic enters by: the uplink (holding this node's
/// InternalIP) and the others holding an address NodePorts answer on.
#[derive(Debug, Default)]
struct ExternalInterfaces {
    uplink: Option<String>,
    /// Besides the uplink.
    more: BTreeSet<String>,
    /// Every interface holding a routable IPv4 address, but `lo` and the overlay's
    /// (pods' veths hold none: their gateway is link-local).
    addressed: BTreeSet<String>,
}

impl ExternalInterfaces {
    fn new(
        uplink: Option<String>,
        node_port_ips: &[Ipv4Addr],
        host_addresses: &[(String, Ipv4Addr)],
    ) -> Self {
        let own = |name: &str| name != datapath::LOOPBACK_DEVICE && name != VXLAN_DEVICE;
        let more = host_addresses
            .iter()
            .filter(|(name, ip)| {
                own(name) && Some(name) != uplink.as_ref() && node_port_ips.contains(ip)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let addressed = host_addresses
            .iter()
            .filter(|(name, ip)| own(name) && crate::limits::special(*ip).is_none())
            .map(|(name, _)| name.clone())
            .collect();
        Self {
            uplink,
            more,
            addressed,
        }
    }
}

/// The tcx program each attachment point of the node should run.
fn wanted_tc_programs(
    state: &model::DesiredState,
    external: &ExternalInterfaces,
) -> BTreeMap<Attachment, (&'static str, TcAttachType)> {
    let uplink = external.uplink.as_deref();
    let mut wanted = BTreeMap::new();
    for pod in state.pods.values() {
        for (program, direction) in datapath::POD_PROGRAMS {
            let attachment = match direction {
                TcAttachType::Egress => Attachment::Egress(pod.interface.clone()),
                _ => Attachment::Ingress(pod.interface.clone()),
            };
            wanted.insert(attachment, (program, direction));
        }
    }
    wanted.insert(
        Attachment::Ingress(VXLAN_DEVICE.into()),
        (program_names::FROM_OVERLAY, TcAttachType::Ingress),
    );
    wanted.insert(
        Attachment::Egress(datapath::LOOPBACK_DEVICE.into()),
        (program_names::FROM_HOST, TcAttachType::Egress),
    );
    if let Some(uplink) = uplink {
        wanted.insert(
            Attachment::Ingress(uplink.into()),
            (program_names::FROM_UPLINK, TcAttachType::Ingress),
        );
        wanted.insert(
            Attachment::Egress(uplink.into()),
            (program_names::FROM_HOST, TcAttachType::Egress),
        );
    }
    // Other interfaces holding a NodePort address balance what enters them as the
    // uplink does (the node's own traffic leaves by the uplink's route).
    for device in &external.more {
        wanted.insert(
            Attachment::Ingress(device.clone()),
            (program_names::FROM_UPLINK, TcAttachType::Ingress),
        );
    }
    wanted
}

/// Attach the XDP program to the uplink, or detach it when external traffic is to be
/// balanced at the uplink's tcx ingress instead. Returns whether it is wanted.
fn attach_or_detach_uplink_xdp(
    datapath: &mut Datapath,
    uplink: &str,
    use_xdp: bool,
) -> Result<bool> {
    let xdp = Attachment::Xdp(uplink.into());
    if use_xdp {
        if datapath.ensure_xdp_attached(uplink)? {
            info!(
                interface = uplink,
                "attached XDP program for external traffic"
            );
        }
    } else if datapath.attached()?.contains(&xdp) {
        datapath.detach(&xdp)?;
        info!(
            interface = uplink,
            "XDP detached: external traffic is balanced at the uplink's tcx ingress"
        );
    }
    Ok(use_xdp)
}

/// The node's host side beyond the maps and device programs: socket-level load
/// balancing on its cgroup subtree, and its place on the overlay, with what was
/// last applied of each.
#[derive(Debug, Default)]
pub struct HostSide {
    /// The cgroup v2 directory the socket-level programs attach to (`None`: off).
    pub socket_lb_root: Option<PathBuf>,
    /// The overlay host setup last applied; `None`: read it back from the device
    /// (on start and full syncs, which repair drift).
    pub overlay: Option<host::overlay::OverlayHost>,
    pub vxlan_port: u16,
    /// Pod traffic leaving this CIDR is masqueraded (the nftables rules).
    pub cluster_cidr: Option<Ipv4Net>,
    /// ... and IPv6 pod traffic leaving this one.
    pub cluster_cidr6: Option<ipnet::Ipv6Net>,
}

impl HostSide {
    /// The VXLAN device and the nftables rules, as at start: made again when someone
    /// removed them (cross-node pod traffic and pod egress depend on them). The rules
    /// are replaced as a whole (one nft transaction). Returns whether the device had
    /// to be made.
    fn ensure_device_and_rules(
        &self,
        interfaces: &BTreeMap<String, plan::Interface>,
    ) -> Result<bool> {
        let missing = !interfaces.contains_key(VXLAN_DEVICE);
        host::overlay::ensure_vxlan_device(self.vxlan_port, !missing)?;
        if let Some(cidr) = self.cluster_cidr {
            host::nft::install_rules(cidr, self.cluster_cidr6, self.vxlan_port)?;
        }
        Ok(missing)
    }

    /// The node's overlay address, VTEP MAC and routes to the other nodes' pod CIDRs
    /// (over the overlay, or natively through the uplink `uplink_ifindex`).
    fn sync_overlay(
        &mut self,
        state: &model::DesiredState,
        settings: &plan::NodeSettings,
        device_mac: [u8; 6],
        uplink_ifindex: Option<u32>,
    ) -> Result<()> {
        let this_node = state.nodes.get(&settings.node);
        let ipv4 = host::overlay::OverlayFamily {
            address: this_node
                .and_then(|n| n.pod_cidrs.first())
                .and_then(plan::overlay_address),
            routes: state
                .nodes
                .values()
                .filter(|n| n.name != settings.node)
                .flat_map(|n| {
                    // Natively routed nodes: via their address on the uplink.
                    let native = match (settings.routes_natively_to(n.ip), uplink_ifindex) {
                        (Ok(true), Some(uplink)) => Some(uplink),
                        _ => None,
                    };
                    n.pod_cidrs.iter().filter_map(move |cidr| {
                        let route = match native {
                            Some(uplink) => host::overlay::OverlayRoute::native(n.ip, uplink),
                            None => host::overlay::OverlayRoute {
                                node_ip: n.ip,
                                gateway: plan::overlay_address(cidr)?,
                                vtep_mac: n.vtep_mac,
                                native_device: None,
                            },
                        };
                        Some((*cidr, route))
                    })
                })
                .collect(),
        };
        // Dual-stack: the IPv6 pod CIDRs inside the same IPv4 tunnel, always over
        // VXLAN (native IPv6 routing would need the nodes' IPv6 addresses).
        let ipv6 = host::overlay::OverlayFamily {
            address: this_node
                .and_then(|n| n.pod_cidrs6.first())
                .and_then(plan::overlay_address6),
            routes: state
                .nodes
                .values()
                .filter(|n| n.name != settings.node)
                .flat_map(|n| {
                    n.pod_cidrs6.iter().filter_map(move |cidr| {
                        let route = host::overlay::OverlayRoute6 {
                            node_ip: n.ip,
                            gateway: plan::overlay_address6(cidr)?,
                            vtep_mac: n.vtep_mac,
                            native_device: None,
                        };
                        Some((*cidr, route))
                    })
                })
                .collect(),
        };
        let desired = host::overlay::OverlayHost {
            vtep_mac: this_node.map(|n| n.vtep_mac),
            ipv4,
            ipv6,
        };
        let current = match self.overlay.take() {
            Some(applied) => applied,
            None => host::overlay::read_overlay(device_mac)?,
        };
        let changes = host::overlay::apply_overlay(&current, &desired, settings.vni)?;
        if changes > 0 {
            info!(
                address = ?desired.ipv4.address,
                address6 = ?desired.ipv6.address,
                routes = desired.ipv4.routes.len(),
                routes6 = desired.ipv6.routes.len(),
                changes,
                "overlay host routes updated"
            );
        }
        self.overlay = Some(desired);
        Ok(())
    }

    /// Attach (or, when off, detach) the socket-level programs.
    fn sync_socket_lb(&mut self, datapath: &mut Datapath, node: &str) -> Result<()> {
        let state_file = files::run_dir(node).join("cgroup-root");
        match &self.socket_lb_root {
            Some(root) => {
                let previous = fs::read_to_string(&state_file).ok().map(PathBuf::from);
                if datapath.ensure_socket_lb(root, previous.as_deref())? {
                    crate::files::create_private_dir(&files::run_dir(node))?;
                    crate::files::write_private(&state_file, root.to_string_lossy().as_bytes())?;
                    info!(cgroup = %root.display(), "socket-level load balancing attached");
                }
            }
            None => {
                if datapath.remove_socket_lb()? {
                    let _ = fs::remove_file(&state_file);
                    info!("socket-level load balancing detached (--socket-lb=false)");
                }
            }
        }
        Ok(())
    }
}

/// The map writes a sync would make now (for `ferrite inspect diff`): the model of
/// `objects` against what the maps hold, without writing anything. Run in the
/// node's network namespace (pod interfaces decide which endpoints stay).
pub fn pending_writes(
    objects: &ClusterObjects,
    settings: &plan::NodeSettings,
    maps: &NodeMaps,
) -> Result<(Vec<plan::Op>, Vec<model::Skipped>)> {
    let (context, mut skipped) =
        model::NodeContext::new(&settings.node, &settings.limits, &objects.nodes, None);
    let addresses = host::interfaces::ipv4_addresses()?;
    let context = context.with_host_addresses(addresses.into_iter().map(|(_, ip)| ip).collect());
    let current = maps.contents()?;
    // What the running agent was started with, as its maps show it: where the uplink
    // balances external traffic, the overlay's VNI and port (once it has written them).
    let config = &current.config;
    let uplink = context
        .node_ip()
        .and_then(|ip| host::interfaces::interface_with_address(ip).ok().flatten());
    let settings = &plan::NodeSettings {
        external_in_tc: config.flags & ferrite_common::config_flag::EXTERNAL_IN_TC != 0,
        routing: if config.flags & ferrite_common::config_flag::NATIVE_ROUTING != 0 {
            plan::Routing::Native
        } else {
            settings.routing
        },
        uplink: uplink_reading(uplink.as_deref())?,
        vni: if config.vni != 0 {
            config.vni
        } else {
            settings.vni
        },
        vxlan_port: if config.vxlan_port != 0 {
            config.vxlan_port
        } else {
            settings.vxlan_port
        },
        ..settings.clone()
    };
    let plan = plan::FullPlan::new(
        objects,
        context,
        &host::interfaces::interfaces()?,
        &current,
        None,
        settings,
    );
    skipped.extend(plan.skipped);
    Ok((plan.ops, skipped))
}

/// One reconciliation: objects -> model -> plan -> ordered map writes, plus the
/// attachments, host routes and files around them. `skipped` carries what the source
/// already had to leave out; ids are kept as `ids_from` (the last write) has them,
/// else as the maps have them.
/// Returns the report and the map contents now written. `publish` gets the plan's
/// policy index and Service names before the maps are written from them (for the
/// tools: whoever sees the new maps asks the new index, and a monitor event about a
/// frontend the maps just made live names its Service).
#[allow(clippy::too_many_arguments)]
pub fn reconcile(
    objects: &ClusterObjects,
    mut skipped: Vec<model::Skipped>,
    current: plan::MapContents,
    ids_from: Option<&plan::MapContents>,
    previous: Option<&model::NodeContext>,
    settings: &plan::NodeSettings,
    parts: &mut NodeParts,
    publish: &dyn Fn(plan::SharedPolicy, Arc<ServiceNames>),
) -> Result<(SyncReport, plan::NodeState)> {
    let NodeParts {
        datapath,
        maps,
        host: host_side,
        take_over_pending,
    } = parts;
    let (context, more) =
        model::NodeContext::new(&settings.node, &settings.limits, &objects.nodes, previous);
    skipped.extend(more);
    // The node's addresses, read at each full sync: `--nodeport-addresses` picks
    // the ones NodePorts answer on.
    let host_addresses = host::interfaces::ipv4_addresses()?;
    let context = context.with_host_addresses(host_addresses.iter().map(|(_, ip)| *ip).collect());
    // The uplink (the interface holding this node's IP, from its Node object): XDP
    // for external traffic, tcx to forward what it translated; the overlay's MTU
    // follows it.
    let uplink = context
        .node_ip()
        .and_then(|ip| host::interfaces::interface_with_address(ip).ok().flatten());
    let mut interfaces = host::interfaces::interfaces()?;
    // Full syncs (their overlay state is read back) repair the device and the rules.
    if host_side.overlay.is_none() && host_side.ensure_device_and_rules(&interfaces)? {
        warn!("the VXLAN device {VXLAN_DEVICE} was gone: made again");
        interfaces = host::interfaces::interfaces()?;
    }
    match_overlay_mtu_to_uplink(&mut interfaces, uplink.as_deref())?;
    let use_xdp = uplink_wants_xdp(uplink.as_deref(), settings.uplink_xdp);
    let settings = &plan::NodeSettings {
        external_in_tc: !use_xdp,
        uplink: uplink_reading(uplink.as_deref())?,
        ..settings.clone()
    };
    let external = ExternalInterfaces::new(uplink, &context.node_port_ips(), &host_addresses);
    let plan = plan::FullPlan::new(objects, context, &interfaces, &current, ids_from, settings);
    // Taking over from kube-proxy: its open flows are in `ferrite_ct` before the
    // programs are attached anywhere and the frontends written, so none of their
    // packets meets Ferrite's programs without its entry.
    let seeded_flows = (*take_over_pending).then(|| {
        seed_conntrack(datapath, maps, &plan.written, host_side.cluster_cidr)
            .map_err(|e| format!("{e:#}"))
    });
    let state = &plan.state;
    let wanted = attach_programs(datapath, state, &interfaces, &external, use_xdp)?;
    let overlay_problem = overlay_problem(datapath, &interfaces);
    if let Some(vxlan) = interfaces.get(VXLAN_DEVICE) {
        let uplink_ifindex = settings
            .uplink
            .as_ref()
            .and_then(|u| interfaces.get(&u.name))
            .map(|i| i.ifindex);
        host_side.sync_overlay(state, settings, vxlan.mac, uplink_ifindex)?;
    }
    let waiting_for_interfaces = plan
        .skipped
        .iter()
        .any(|s| matches!(s.reason, model::SkipReason::InterfaceMissing { .. }));
    add_routes_to_new_endpoints(state, &plan.ops)?;
    let services = SyncReport::of_services(state);
    publish(plan.policy.clone(), services.service_names.clone());
    let purged_flows = write_maps(maps, &current, &plan.ops)?;
    // Links pinned by an earlier agent still run the programs it loaded: move them to
    // this agent's, now that the maps hold this sync's state (an upgrade may have
    // re-created some of them).
    datapath.adopt_pinned_links(external.uplink.as_deref(), &external.more, &interfaces)?;
    remove_links_of_vanished_interfaces(datapath, &wanted, &interfaces)?;
    host_side.sync_socket_lb(datapath, &settings.node)?;
    publish_pod_cidr(state, &settings.node)?;

    skipped.extend(plan.skipped.iter().cloned());
    let report = SyncReport {
        overlay_problem,
        writes: plan.ops.len(),
        endpoints: plan.written.endpoints.len(),
        purged_flows,
        skipped,
        waiting_for_interfaces,
        pod_names: Some(Arc::new(
            state
                .pods
                .values()
                .map(|pod| (pod.ip.octets(), format!("{}/{}", pod.namespace, pod.name)))
                .collect(),
        )),
        seeded_flows,
        ..services
    };
    Ok((report, plan.into_state()))
}

/// Seed `ferrite_ct` with the kernel's open flows to the frontends of `written` (what
/// the sync is about to write: the frontends' rev-NAT indexes, the backends' ids), as
/// `takeover::seed_entries` makes them. Returns the kernel's flow count and how many
/// were seeded.
fn seed_conntrack(
    datapath: &Datapath,
    maps: &mut NodeMaps,
    written: &plan::MapContents,
    cluster_cidr: Option<Ipv4Net>,
) -> Result<(usize, usize)> {
    let backends = crate::takeover::backends_by_address(&written.backends);
    let node_ip = Ipv4Addr::from(written.config.node_ip);
    let external_client =
        |ip: Ipv4Addr| ip != node_ip && !cluster_cidr.is_some_and(|cidr| cidr.contains(&ip));
    // Whether an insert wrote its entry (false: the key exists, BPF_NOEXIST).
    let inserted = |result: Result<(), aya::maps::MapError>| match result {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(nix::libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(e) => Err(anyhow::Error::new(e).context("writing ferrite_ct")),
    };
    let now = datapath.jiffies()?;
    let flows = crate::takeover::kernel_flows()?;
    let mut seeded = 0;
    for flow in &flows {
        let Some([(reply_key, reply), (forward_key, forward)]) =
            crate::takeover::seed_entries(flow, &written.services, &backends, external_client, now)
        else {
            continue;
        };
        // Reply entry first, as the datapath does. An agent restarted with the flag
        // on a node it already serves finds the programs attached: `ferrite_to_pod`
        // may have recorded the flow's packets netfilter delivered
        // (`CT_FLAG_VIA_STACK`, under the same reply tuple), which is replaced; a
        // Service flow the datapath recorded itself keeps its entries.
        let conntrack = &mut maps.conntrack;
        let replace = match conntrack.get(&reply_key, 0) {
            Ok(existing) if existing.flags & ferrite_common::CT_FLAG_VIA_STACK != 0 => true,
            Ok(_) => continue,
            Err(_) => false,
        };
        let no_exist = u64::from(!replace); // BPF_NOEXIST or BPF_ANY
        if !inserted(conntrack.insert(reply_key, reply, no_exist))? {
            continue; // the datapath recorded it meanwhile
        }
        inserted(conntrack.insert(forward_key, forward, 1 /* BPF_NOEXIST */))?;
        seeded += 1;
    }
    Ok((flows.len(), seeded))
}

/// Why cross-node traffic cannot flow, if it cannot: the VXLAN device is missing, or
/// `ferrite_from_overlay` does not run on it.
fn overlay_problem(
    datapath: &Datapath,
    interfaces: &BTreeMap<String, plan::Interface>,
) -> Option<String> {
    let Some(device) = interfaces.get(VXLAN_DEVICE) else {
        return Some(format!("the VXLAN device {VXLAN_DEVICE} is missing"));
    };
    let attachment = Attachment::Ingress(VXLAN_DEVICE.into());
    match datapath.attached_ifindex(&attachment) {
        Ok(Some(ifindex)) if ifindex == device.ifindex => None,
        Ok(other) => Some(format!(
            "{} is not attached to {VXLAN_DEVICE} (interface index {}; its link: {other:?})",
            program_names::FROM_OVERLAY,
            device.ifindex
        )),
        Err(e) => Some(format!("reading the {VXLAN_DEVICE} link: {e:#}")),
    }
}

/// The VXLAN device's MTU: the uplink's less the encapsulation, so that overlay
/// packets fit the underlay. `interfaces` is updated to match.
fn match_overlay_mtu_to_uplink(
    interfaces: &mut BTreeMap<String, plan::Interface>,
    uplink: Option<&str>,
) -> Result<()> {
    let uplink_mtu = uplink.and_then(|u| interfaces.get(u)).map(|i| i.mtu);
    if let (Some(uplink_mtu), Some(vxlan)) = (uplink_mtu, interfaces.get_mut(VXLAN_DEVICE)) {
        let overlay_mtu = uplink_mtu.saturating_sub(ferrite_common::VXLAN_OVERHEAD);
        if vxlan.mtu != overlay_mtu {
            host::overlay::set_vxlan_mtu(overlay_mtu)?;
            info!(mtu = overlay_mtu, "VXLAN device MTU set (uplink MTU - 50)");
            vxlan.mtu = overlay_mtu;
        }
    }
    Ok(())
}

/// The uplink as this sync reads it (its subnets say which nodes are on-link).
fn uplink_reading(uplink: Option<&str>) -> Result<Option<plan::Uplink>> {
    uplink
        .map(|name| {
            Ok(plan::Uplink {
                name: name.to_string(),
                subnets: host::interfaces::subnets_of(name)?,
            })
        })
        .transpose()
}

/// Whether external traffic is balanced by XDP on the uplink (else by its tcx
/// ingress program), as `--xdp` says for the uplink's driver.
fn uplink_wants_xdp(uplink: Option<&str>, setting: plan::UplinkXdp) -> bool {
    uplink.is_some_and(|u| setting.wants_xdp(host::interfaces::driver(u).as_deref()))
}

/// Host routes to the pods whose endpoints `ops` adds, before the map writes: once a
/// pod's endpoint is in the map, the stack can reach it too (replies to its
/// masqueraded traffic; plain routing if the datapath goes). IPv6 as the CNI plugin
/// routes it, a /128 and the pod's permanent neighbour entry, where the veth has
/// IPv6 (a failure is logged: the entry is written all the same).
fn add_routes_to_new_endpoints(state: &model::DesiredState, ops: &[plan::Op]) -> Result<()> {
    let mut by_ip6 = None;
    for op in ops {
        match op {
            plan::Op::PutEndpoint(key, _) => {
                let ip = Ipv4Addr::from(key.address);
                if let Some(pod) = state.pods.get(&ip) {
                    host::pods::add_pod_route(ip, &pod.interface)?;
                }
            }
            plan::Op::PutEndpoint6(key, _) => {
                let pods = by_ip6.get_or_insert_with(|| {
                    state
                        .pods
                        .values()
                        .filter_map(|pod| Some((pod.ip6?, pod)))
                        .collect::<std::collections::HashMap<_, _>>()
                });
                let ip6 = std::net::Ipv6Addr::from(key.address);
                if let Some(pod) = pods.get(&ip6) {
                    let mac = ferrite_common::pod_mac_for(pod.ip);
                    if let Err(e) = host::pods::add_pod_route6(ip6, mac, &pod.interface) {
                        warn!("no host route to pod {ip6}: {e:#}");
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Apply `ops` to maps that held `before` and purge what they ended
/// ([`NodeMaps::write`]). Returns the flows purged.
fn write_maps(maps: &mut NodeMaps, before: &plan::MapContents, ops: &[plan::Op]) -> Result<usize> {
    maps.write(before, ops)
}

/// Remove the link pins of interfaces that are gone. Links of interfaces that still
/// exist may belong to pods the CNI plugin just wired, so they stay; the cgroup
/// hooks are the socket-level step's.
fn remove_links_of_vanished_interfaces(
    datapath: &Datapath,
    wanted: &BTreeSet<Attachment>,
    interfaces: &BTreeMap<String, plan::Interface>,
) -> Result<()> {
    for attachment in datapath.attached()? {
        let Some(device) = attachment.device() else {
            continue;
        };
        if !wanted.contains(&attachment) && !interfaces.contains_key(device) {
            datapath.detach(&attachment)?;
            info!(
                link = attachment.pin_name(),
                "link pin removed (interface gone)"
            );
        }
    }
    Ok(())
}

/// Write this node's pod CIDR (from its Node object) where the CNI plugin reads it.
fn publish_pod_cidr(state: &model::DesiredState, node: &str) -> Result<()> {
    if let Some(this) = state.nodes.get(node) {
        if let Some(cidr) = this.pod_cidrs.first() {
            files::publish_pod_cidr(node, *cidr, this.pod_cidrs6.first().copied())?;
        }
    }
    Ok(())
}
