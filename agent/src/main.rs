use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use ferrite_agent::{
    agent,
    cli::{Cli, Command, MonitorOutput},
    datapath::{self, OBJECT_FILE_NAME},
    driver::{Driver, Source},
    explain, files, host, http, inspect, install_cni, kube_source,
    maps::NodeMaps,
    monitor::{self, client, hub::MonitorHub},
    objects_yaml, plan, proxy_health, source, telemetry,
};
use tracing::{info, warn};

/// `ferrite monitor`: print the agent's lines until it or the reader goes away.
fn run_monitor(node: &str, request: &monitor::Request, output: MonitorOutput) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let MonitorOutput::Table = output {
        writeln!(stdout, "{}", client::TABLE_HEADER)?;
    }
    for line in client::connect(node, request)? {
        let mut line = line?;
        match &mut line {
            monitor::Line::Listening { node } => {
                eprintln!("ferrite monitor: listening on node {node}");
                continue;
            }
            monitor::Line::Error { message } => anyhow::bail!("the agent refused: {message}"),
            monitor::Line::Drop(event) | monitor::Line::Flow(event) => {
                client::name_interface(event)
            }
            monitor::Line::Missed { .. } => {}
        }
        let text = match output {
            MonitorOutput::Json => serde_json::to_string(&line)?,
            MonitorOutput::Table => {
                let time = match &line {
                    monitor::Line::Drop(e) | monitor::Line::Flow(e) => {
                        client::wall_clock_of(e.time_ns)
                    }
                    _ => None,
                };
                let time = client::time_of_day(time.unwrap_or_else(std::time::SystemTime::now));
                let Some(row) = client::table_row(&line, &time) else {
                    continue;
                };
                row
            }
        };
        // The reader went away (`| head`): done.
        if writeln!(stdout, "{text}").is_err() {
            return Ok(());
        }
    }
    anyhow::bail!("the agent closed the connection (did it exit?)")
}

/// SIGTERM and SIGINT, blocked for the calling thread and every thread it starts
/// afterwards: one thread waits for them ([`clear_monitor_on_exit`]).
fn block_exit_signals() -> Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    Ok(signals)
}

/// On SIGTERM or SIGINT the monitor entry is cleared before the process exits, so
/// the datapath stops writing events nobody reads.
fn clear_monitor_on_exit(
    signals: nix::sys::signal::SigSet,
    hub: std::sync::Arc<MonitorHub>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = signals.wait();
            hub.stop();
            info!(?signal, "exiting");
            std::process::exit(0);
        })?;
    Ok(())
}

/// The eBPF object: `--bpf-object` (or $FERRITE_BPF_OBJECT), else next to the
/// executable, else `target/bpf/` (where `cargo xtask build-ebpf` puts it).
fn find_object(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let candidates = [
        dir.join(OBJECT_FILE_NAME),
        dir.join("../bpf").join(OBJECT_FILE_NAME),
        dir.join("../../bpf").join(OBJECT_FILE_NAME),
        PathBuf::from("/usr/lib/ferrite").join(OBJECT_FILE_NAME),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "{OBJECT_FILE_NAME} not found (run `cargo xtask build-ebpf` or pass --bpf-object)"
            )
        })
}

/// glibc gives each thread that allocates an arena of its own; with the watch
/// threads that fragments tens of MB of object caches: one arena (measured: 89-98
/// MB at 10k Services, against 102-106 MB with two and 110-128 MB unlimited).
fn use_one_malloc_arena() {
    // SAFETY: mallopt only tunes the allocator; called before other threads start.
    unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1) };
}

/// Capabilities the agent keeps once the datapath is loaded and the node prepared:
/// BPF (map and link syscalls, with unprivileged BPF disabled) and NET_ADMIN (tcx
/// attachments, `ip`, `nft`). Loading programs (PERFMON) and mounting bpffs
/// (SYS_ADMIN) happen before.
const RUNTIME_CAPABILITIES: [caps::Capability; 2] =
    [caps::Capability::CAP_BPF, caps::Capability::CAP_NET_ADMIN];

/// Drop every other capability, from the bounding set too, so neither the agent nor
/// the tools it runs can do more. Applies to the calling thread and the threads it
/// starts afterwards.
/// `take_over`: `--take-over-from-kube-proxy` also keeps NET_RAW if the agent has
/// it, which `iptables-legacy` needs (its raw socket) to remove kube-proxy's rules.
fn drop_capabilities(take_over: bool) -> Result<()> {
    use caps::{CapSet, CapsHashSet};
    let mut keep: CapsHashSet = RUNTIME_CAPABILITIES.into_iter().collect();
    let net_raw = caps::Capability::CAP_NET_RAW;
    if take_over && caps::has_cap(None, CapSet::Permitted, net_raw).unwrap_or(false) {
        keep.insert(net_raw);
    }
    for capability in caps::all() {
        // A capability this kernel does not know is not held either.
        let held = caps::has_cap(None, CapSet::Bounding, capability).unwrap_or(false);
        if !keep.contains(&capability) && held {
            caps::drop(None, CapSet::Bounding, capability).with_context(|| {
                format!("dropping {capability} from the bounding set (needs CAP_SETPCAP)")
            })?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep).context("dropping capabilities")?;
    info!(kept = ?keep, "dropped all other capabilities");
    Ok(())
}

/// How long the file source waits for a change at most: between waits the driver
/// flushes the datapath's logs and retries pods waiting for their interface.
const FILE_POLL: Duration = Duration::from_millis(200);

/// Load and prepare the node, give up what the process no longer needs, then sync
/// the node from its source for good.
fn run_agent(
    options: &agent::AgentOptions,
    http_addr: SocketAddr,
    healthz_addr: Option<SocketAddr>,
    config: Option<PathBuf>,
    resync: Duration,
) -> Result<()> {
    use_one_malloc_arena();
    let exit_signals = block_exit_signals()?;
    let telemetry = agent::NodeAgent::telemetry(options);
    // The datapath loads (verifier time) while the source lists the cluster (API
    // round trips and parsing): the first sync needs both.
    let (mut node, mut source) = std::thread::scope(|scope| {
        // Capabilities are per thread: the loading thread keeps them all and ends with
        // the load; every thread started after the drop below inherits the few kept.
        let loading = std::thread::Builder::new()
            .name("load".into())
            .spawn_scoped(scope, || {
                agent::NodeAgent::start(options, telemetry.clone())
            })?;
        let source = drop_capabilities(options.take_over_from_kube_proxy)
            .and_then(|()| start_source(options, config, &telemetry));
        let node = loading
            .join()
            .map_err(|_| anyhow::anyhow!("loading the datapath panicked"))??;
        anyhow::Ok((node, source?))
    })?;
    let hub = std::sync::Arc::new(MonitorHub::start(
        &options.node,
        &datapath::pin_dir(&options.node),
        telemetry.clone(),
    )?);
    clear_monitor_on_exit(exit_signals, hub.clone())?;
    // Started after the capabilities were dropped: its threads hold only the few kept.
    let http = http::HttpRuntime::start()?;
    let _endpoint = http.serve(
        http_addr,
        http::Limits::DEFAULT,
        telemetry::endpoint(telemetry.clone()),
    )?;
    info!(%http_addr, "serving /healthz, /readyz and /metrics");
    let _proxy_health = healthz_addr.map(|addr| serve_proxy_health(&http, addr, &telemetry));
    node.serve_health_checks(http);
    telemetry.expect_turns_every(resync);
    telemetry
        .proxy_health
        .start(resync, std::time::Instant::now());
    let stopped = Driver::new(node, resync).run(source.as_mut());
    hub.stop();
    stopped
}

/// Serve kube-proxy's health endpoint on `addr`. A port in use (kube-proxy itself
/// still running on the node, during a migration) does not stop the agent: it warns
/// and tries again every few seconds until the listener is dropped.
fn serve_proxy_health(
    http: &std::sync::Arc<http::HttpRuntime>,
    addr: SocketAddr,
    telemetry: &std::sync::Arc<telemetry::Telemetry>,
) -> std::sync::Arc<std::sync::Mutex<Option<http::Listener>>> {
    const RETRY: Duration = Duration::from_secs(5);
    let served = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (http, health) = (http.clone(), telemetry.proxy_health.clone());
    let slot = std::sync::Arc::downgrade(&served);
    let listen = move || {
        http.serve(
            addr,
            http::Limits::DEFAULT,
            proxy_health::endpoint(health.clone()),
        )
    };
    match listen() {
        Ok(listener) => {
            info!(%addr, "serving kube-proxy's /healthz and /livez");
            *served.lock().expect("listener") = Some(listener);
        }
        Err(e) => {
            warn!(%addr, "kube-proxy's health endpoint not served yet, retrying: {e:#}");
            std::thread::spawn(move || loop {
                std::thread::sleep(RETRY);
                let Some(slot) = slot.upgrade() else { return };
                if let Ok(listener) = listen() {
                    info!(%addr, "serving kube-proxy's /healthz and /livez");
                    *slot.lock().expect("listener") = Some(listener);
                    return;
                }
            });
        }
    }
    served
}

/// The agent's source of cluster objects: the file, else the Kubernetes API (its
/// lists run in the background; the first snapshot waits for them).
fn start_source(
    options: &agent::AgentOptions,
    config: Option<PathBuf>,
    telemetry: &std::sync::Arc<telemetry::Telemetry>,
) -> Result<Box<dyn Source>> {
    Ok(match config {
        Some(path) => Box::new(source::FileSource::new(
            &path,
            FILE_POLL,
            telemetry.clone(),
        )?),
        None => Box::new(kube_source::KubeSource::start(
            &options.node,
            telemetry.clone(),
        )?),
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Datapath records are already filtered in the kernel by --datapath-log.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,ferrite_datapath=trace")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Agent {
            node,
            config,
            bpf_object,
            resync_seconds,
            datapath_log,
            vni,
            vxlan_port,
            cluster_cidr,
            http_addr,
            healthz_bind_address,
            map_capacities,
            socket_lb,
            cgroup_root,
            proc_sys_net,
            xdp,
            routing,
            take_over_from_kube_proxy,
            admission,
        } => {
            let options = agent::AgentOptions {
                routing,
                take_over_from_kube_proxy,
                limits: admission.limits(cluster_cidr),
                socket_lb,
                cgroup_root,
                proc_sys_net,
                uplink_xdp: xdp,
                map_capacities: map_capacities.into_iter().collect(),
                datapath_log,
                vni,
                vxlan_port,
                cluster_cidr: cluster_cidr.and_then(|c| c.v4),
                object: find_object(bpf_object.as_deref())?,
                node,
            };
            let healthz_addr = match healthz_bind_address.as_str() {
                "" => None,
                addr => Some(addr.parse().with_context(|| {
                    format!("--healthz-bind-address {addr:?}: not an address:port")
                })?),
            };
            run_agent(
                &options,
                http_addr,
                healthz_addr,
                config,
                Duration::from_secs(resync_seconds),
            )
        }
        Command::Inspect {
            node,
            table: inspect::Table::Diff,
            output,
            config,
            vni,
            cluster_cidr,
            admission,
            ..
        } => {
            let pin_dir = datapath::pin_dir(&node);
            let maps = NodeMaps::open(&pin_dir)?;
            let objects = match config {
                Some(path) => objects_yaml::parse_objects(&std::fs::read_to_string(path)?)?.0,
                None => kube_source::list_once(&node)?,
            };
            // Capacities, VNI and port as the running agent made them (its maps).
            let settings = plan::NodeSettings {
                node,
                vni,
                limits: admission.limits(cluster_cidr),
                capacities: ferrite_agent::maps::pinned_capacities(&pin_dir)?,
                ..plan::NodeSettings::default()
            };
            let (writes, _) = agent::pending_writes(&objects, &settings, &maps)?;
            print!("{}", inspect::render_diff(&writes, output)?);
            Ok(())
        }
        Command::Inspect {
            node,
            table,
            output,
            pod,
            ..
        } => {
            let maps = NodeMaps::open(&datapath::pin_dir(&node))?;
            let names = client::AgentPolicyNames { node };
            print!(
                "{}",
                inspect::render_for_pod(&maps, table, output, pod.as_ref(), &names)?
            );
            Ok(())
        }
        Command::Monitor {
            node,
            kind,
            address,
            port,
            service,
            output,
        } => {
            let request = monitor::Request {
                kind,
                address,
                port,
                service,
            };
            run_monitor(&node, &request, output)
        }
        Command::Explain {
            node,
            from,
            to: (destination, protocol),
            ingress,
            veth,
            sender_node,
            socket,
            cookie,
            hex,
            output,
        } => {
            let request = explain::Request {
                source: from,
                destination,
                protocol,
                ingress,
                veth,
                sender_node,
                socket,
                cookie,
                hex,
            };
            let names = client::AgentPolicyNames { node: node.clone() };
            let explanation = explain::explain(&node, &datapath::pin_dir(&node), &names, &request)?;
            match output {
                inspect::Output::Table => print!("{}", explain::render_table(&explanation)),
                inspect::Output::Json => {
                    println!("{}", serde_json::to_string_pretty(&explanation)?)
                }
            }
            Ok(())
        }
        Command::InstallCni {
            node,
            bin_dir,
            conf_dir,
            conflist,
            plugins_from,
        } => {
            let exe = std::env::current_exe()?;
            install_cni::install(&install_cni::Options {
                node,
                bin_dir,
                conf_dir,
                conflist,
                plugins_from,
                ferrite_cni: exe.with_file_name(install_cni::FERRITE_PLUGIN),
            })
        }
        Command::Uninstall { node } => {
            let pins = datapath::pin_dir(&node);
            // The device and rules are the network namespace's, not the node's: only
            // a node that is installed here (its pins exist) may take them away.
            if !pins.exists() {
                println!(
                    "no Ferrite pins for node {node} ({}): nothing removed",
                    pins.display()
                );
                return Ok(());
            }
            // Run in the node's network namespace: the device and rules are there.
            host::remove_all();
            let _ = std::fs::remove_dir_all(files::run_dir(&node));
            datapath::uninstall(&pins)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_agent::cli::parse_map_capacity;

    #[test]
    fn every_command_refuses_a_node_name_that_is_no_path_component() {
        for command in [
            "agent",
            "inspect",
            "monitor",
            "explain",
            "uninstall",
            "install-cni",
        ] {
            for node in ["..", ".", "/run", "a/b", "", "Upper", "x\ny"] {
                let mut args = vec!["ferrite", command, "--node", node];
                // Each command's other required arguments, so only --node can fail.
                match command {
                    "inspect" => args.push("services"),
                    "explain" => args.extend(["--from", "10.244.0.2", "--to", "10.96.0.10:80/tcp"]),
                    "install-cni" => {
                        args.extend(["--bin-dir", "/b", "--conf-dir", "/c", "--conflist", "/l"])
                    }
                    _ => {}
                }
                let parsed = Cli::try_parse_from(&args);
                assert!(
                    parsed
                        .as_ref()
                        .is_err_and(|e| e.to_string().contains("not a node name")),
                    "{command} --node {node:?}: {:?}",
                    parsed.err()
                );
                args[3] = "node-1.example";
                assert!(Cli::try_parse_from(&args).is_ok(), "{args:?}");
            }
        }
    }

    #[test]
    fn a_capacity_is_taken_for_sized_maps_only() {
        assert_eq!(
            parse_map_capacity("ferrite_service=524288"),
            Ok(("ferrite_service".to_string(), 524_288))
        );
        for refused in [
            "ferrite_stats=10",
            "ferrite_config=10",
            "ferrite_nomap=10",
            "ferrite_service=0",
            "ferrite_service=many",
            "ferrite_service",
        ] {
            assert!(parse_map_capacity(refused).is_err(), "{refused}");
        }
    }
}
