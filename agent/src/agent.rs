//! The node agent's loop in file mode: read the YAML, build the model, diff it against
//! the pinned maps and apply the difference; again whenever the file changes, and
//! periodically (which also picks up new pod interfaces and repairs drift).
use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ferrite_common::{program_names, VXLAN_DEVICE};
use ipnet::Ipv4Net;
use tracing::{error, info, warn};

use crate::{
    datapath::{self, Datapath},
    hostnet,
    maps::NodeMaps,
    model, plan, source,
};

pub struct AgentOptions {
    pub node: String,
    pub config: PathBuf,
    pub object: PathBuf,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// How often a full resync runs even if nothing changed.
    pub resync: Duration,
    pub datapath_log: datapath::DatapathLog,
    pub vni: u32,
    pub vxlan_port: u16,
    /// Pod traffic leaving this CIDR is masqueraded to the node's address.
    pub cluster_cidr: Option<Ipv4Net>,
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
}

pub fn run(options: &AgentOptions) -> Result<()> {
    let pin_dir = datapath::pin_dir(&options.node);
    let mut datapath = Datapath::load(&options.object, &pin_dir, options.datapath_log)?;
    let mut maps = NodeMaps::open(&pin_dir)?;
    hostnet::enable_forwarding()?;
    let vxlan_exists = datapath::interfaces()?.contains_key(VXLAN_DEVICE);
    hostnet::ensure_vxlan_device(options.vxlan_port, vxlan_exists)?;
    if let Some(cidr) = options.cluster_cidr {
        hostnet::install_rules(cidr, options.vxlan_port)?;
    }
    let settings = plan::NodeSettings {
        node: options.node.clone(),
        vni: options.vni,
    };
    info!(node = %options.node, pins = %pin_dir.display(), "datapath loaded");
    let mut last_content: Option<String> = None;
    let mut last_sync: Option<Instant> = None;
    let mut retry_soon = false;
    loop {
        match fs::read_to_string(&options.config) {
            Ok(content) => {
                let changed = last_content.as_ref() != Some(&content);
                let due = last_sync.is_none_or(|t| t.elapsed() >= options.resync);
                if changed || due || retry_soon {
                    match reconcile(&content, &settings, &mut datapath, &mut maps) {
                        Ok(report) => {
                            log_report(&report, changed);
                            retry_soon = report.waiting_for_interfaces;
                        }
                        // Maps keep their last good state; the next tick tries again.
                        Err(e) => error!("sync failed: {e:#}"),
                    }
                    last_content = Some(content);
                    last_sync = Some(Instant::now());
                }
            }
            Err(e) => warn!(config = %options.config.display(), "cannot read config: {e}"),
        }
        datapath.flush_logs();
        std::thread::sleep(options.poll);
    }
}

fn log_report(report: &SyncReport, config_changed: bool) {
    if config_changed || report.writes > 0 {
        for skipped in &report.skipped {
            warn!("skipped {skipped}");
        }
        info!(
            services = report.services,
            endpoints = report.endpoints,
            writes = report.writes,
            purged_flows = report.purged_flows,
            "synced"
        );
    }
}

pub fn reconcile(
    content: &str,
    settings: &plan::NodeSettings,
    datapath: &mut Datapath,
    maps: &mut NodeMaps,
) -> Result<SyncReport> {
    let (objects, mut skipped) = source::parse_objects(content);
    let (state, more) = model::build(&objects, &settings.node);
    skipped.extend(more);

    let interfaces = datapath::interfaces()?;
    let mut wanted: BTreeSet<&str> = state.pods.values().map(|p| p.interface.as_str()).collect();
    for interface in &wanted {
        if interfaces.contains_key(*interface)
            && datapath.ensure_attached(interface, program_names::FROM_POD)?
        {
            info!(interface, "attached from-pod program");
        }
    }
    if interfaces.contains_key(VXLAN_DEVICE)
        && datapath.ensure_attached(VXLAN_DEVICE, program_names::FROM_OVERLAY)?
    {
        info!(interface = VXLAN_DEVICE, "attached from-overlay program");
    }
    wanted.insert(VXLAN_DEVICE);

    let current = maps.contents()?;
    let (desired, more) = plan::desired_contents(&state, &interfaces, &current, settings);
    let waiting_for_interfaces = more.iter().any(|s| s.reason.contains("does not exist"));
    skipped.extend(more);
    let ops = plan::diff(&current, &desired);
    maps.apply(&ops).context("applying map changes")?;
    let purged_flows = maps.purge_conntrack(&plan::removed_backends(&ops))?;
    for op in &ops {
        if let plan::Op::PutEndpoint(key, _) = op {
            let ip = Ipv4Addr::from(key.address);
            if let Some(pod) = state.pods.get(&ip) {
                hostnet::add_pod_route(ip, &pod.interface)?;
            }
        }
    }

    // Links of interfaces that still exist may belong to pods the CNI plugin just
    // wired: only pins of vanished interfaces are removed.
    for interface in datapath.attached()? {
        if !wanted.contains(interface.as_str()) && !interfaces.contains_key(&interface) {
            datapath.detach(&interface)?;
            info!(interface, "link pin removed (interface gone)");
        }
    }
    if let Some(cidr) = state
        .nodes
        .get(&settings.node)
        .and_then(|n| n.pod_cidrs.first())
    {
        hostnet::publish_pod_cidr(&settings.node, *cidr)?;
    }
    Ok(SyncReport {
        writes: ops.len(),
        services: state.services.len(),
        endpoints: desired.endpoints.len(),
        purged_flows,
        skipped,
        waiting_for_interfaces,
    })
}
