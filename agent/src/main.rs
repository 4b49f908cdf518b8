use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferrite_agent::{
    agent,
    datapath::{self, OBJECT_FILE_NAME},
    driver::{Driver, Source},
    explain, files, host, http, inspect, install_cni, kube_source,
    maps::NodeMaps,
    monitor::{self, client, hub::MonitorHub},
    objects_yaml, plan, proxy_health, source, telemetry,
};
use tracing::{info, warn};

/// Ferrite: Kubernetes pod networking and Service load balancing in eBPF.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load/attach the datapath and keep its maps in sync.
    Agent {
        /// This node's name (spec.nodeName of its pods).
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        /// Multi-document YAML of Kubernetes objects (Service, EndpointSlice, Pod,
        /// Node). Without it the agent watches the Kubernetes API (in-cluster config
        /// or $KUBECONFIG).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The eBPF object (default: next to this binary or target/bpf/).
        #[arg(long, env = "FERRITE_BPF_OBJECT")]
        bpf_object: Option<PathBuf>,
        /// Full resync period in seconds (also repairs drift).
        #[arg(long, default_value_t = 10)]
        resync_seconds: u64,
        /// Datapath log level (aya-log); `debug` logs every drop with its reason.
        #[arg(long, value_enum, default_value_t)]
        datapath_log: datapath::DatapathLog,
        /// VXLAN network identifier of the cluster overlay.
        #[arg(long, default_value_t = ferrite_common::DEFAULT_VNI)]
        vni: u32,
        /// UDP port of the overlay (IANA 4789; Linux's and flannel's default is 8472).
        #[arg(long, default_value_t = ferrite_common::DEFAULT_VXLAN_PORT)]
        vxlan_port: u16,
        /// Cluster pod CIDR: pod traffic leaving it is masqueraded to the node IP.
        #[arg(long)]
        cluster_cidr: Option<ipnet::Ipv4Net>,
        /// Where to serve /healthz, /readyz and /metrics. Loopback by default: kubelet
        /// probes a hostNetwork pod there, and /metrics (Service names, backend
        /// addresses) is not for every pod that can reach the node; give the node's
        /// address or 0.0.0.0 for Prometheus to scrape it.
        #[arg(long, default_value = "127.0.0.1:9965")]
        http_addr: std::net::SocketAddr,
        /// kube-proxy's health endpoint (`/healthz`, `/livez`), which cloud load
        /// balancers and cluster autoscalers probe; kube-proxy's flag and default.
        /// Empty: not served.
        #[arg(long, default_value = proxy_health::DEFAULT_BIND_ADDRESS)]
        healthz_bind_address: String,
        /// `MAP=ENTRIES`, e.g. `ferrite_service=524288` (repeatable): capacity of a
        /// map when it is created. Defaults fit 10k Services x 10 endpoints.
        #[arg(long = "map-capacity", value_parser = parse_map_capacity)]
        map_capacities: Vec<(String, u32)>,
        /// Socket-level load balancing: Service addresses are translated to a backend
        /// when a socket connects (TCP) or sends (unconnected UDP), for pods and host
        /// processes in the cgroup subtree. `false`: per-packet only.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        socket_lb: bool,
        /// The cgroup v2 directory whose processes get socket-level load balancing
        /// (default: the cgroup v2 mount from /proc/mounts; without one, Ferrite
        /// mounts its own under /run/ferrite). On a hybrid host, `unified/` below the
        /// path given is used.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// The node's /proc/sys/net, where the agent turns on net.ipv4.ip_forward and
        /// net.ipv4.conf.lo.accept_local if they are off: a container's own /proc/sys
        /// is read-only unless it is privileged, so the DaemonSet mounts the host's
        /// at /host/proc/sys/net (with hostNetwork it shows the node's settings).
        #[arg(long, default_value = "/proc/sys/net")]
        proc_sys_net: PathBuf,
        /// External traffic (NodePort, LoadBalancer IPs, externalIPs) in XDP on the
        /// uplink: `auto` on every uplink but a veth (where XDP saves nothing and
        /// costs GSO; its tcx program then balances it), `always`, `never`.
        #[arg(long, value_enum, default_value_t)]
        xdp: plan::UplinkXdp,
        #[command(flatten)]
        admission: AdmissionArgs,
    },
    /// Show a node's datapath state from its pinned maps; `diff` lists the writes a
    /// sync would make now (drift between the objects and the maps).
    Inspect {
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        #[arg(value_enum)]
        table: inspect::Table,
        /// `table`: aligned columns; `json`: an array of objects with the same fields.
        #[arg(short, long, value_enum, default_value_t)]
        output: inspect::Output,
        /// For `diff`: the objects from this YAML file instead of the Kubernetes API.
        #[arg(long)]
        config: Option<PathBuf>,
        /// For `diff`: the cluster's VXLAN network identifier, if the node's maps do
        /// not hold it yet.
        #[arg(long, default_value_t = ferrite_common::DEFAULT_VNI)]
        vni: u32,
        /// For `diff`: the agent's cluster pod CIDR.
        #[arg(long)]
        cluster_cidr: Option<ipnet::Ipv4Net>,
        /// For `diff`: the agent's admission flags.
        #[command(flatten)]
        admission: AdmissionArgs,
        /// For `policy`: only the pod with this address.
        #[arg(long)]
        pod: Option<std::net::Ipv4Addr>,
    },
    /// Stream the datapath's drops (with their reason) and new Service flows (with
    /// the backend chosen) as they happen, from the node's agent. Run it in the
    /// node's network namespace to see device names.
    Monitor {
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        /// Which events.
        #[arg(long = "type", value_enum, default_value_t)]
        kind: monitor::Kind,
        /// Only events with this address on either side (or as the backend).
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
        /// Only events with this port on either side (or as the backend's).
        #[arg(long)]
        port: Option<u16>,
        /// Only events to or from this Service's frontends (NAMESPACE/NAME).
        #[arg(long)]
        service: Option<String>,
        /// `table`, or `json`: one JSON object per line.
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: MonitorOutput,
    },
    /// Say what the node's loaded datapath does with a packet, against its live maps,
    /// changing nothing: the steps (anti-spoofing, conntrack, Service frontend, backend
    /// and why, rewrite), the verdict and where the packet goes. Run it in the node's
    /// network namespace.
    Explain {
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        /// The sender: ADDRESS[:PORT] (an ephemeral port when none is given).
        #[arg(long, value_parser = explain::parse_source)]
        from: std::net::SocketAddrV4,
        /// The destination: ADDRESS:PORT/tcp or ADDRESS:PORT/udp.
        #[arg(long, value_parser = explain::parse_destination)]
        to: (std::net::SocketAddrV4, u8),
        /// Where the packet comes from: a pod of this node, a pod of another node
        /// (over the overlay), or outside the cluster (the uplink).
        #[arg(long, value_enum, default_value = "pod")]
        ingress: explain::Ingress,
        /// For `--ingress pod`: the host veth the frame enters (default: the source
        /// pod's own), e.g. to see a spoofed source dropped.
        #[arg(long)]
        veth: Option<String>,
        /// For `--ingress overlay`: the node the tunnel comes from (default: the node
        /// whose pod CIDR holds the source).
        #[arg(long)]
        sender_node: Option<std::net::Ipv4Addr>,
        /// Explain a socket's connect() (TCP) or sendmsg() (UDP) to a Service: the
        /// socket-level load balancer's choice instead of a packet's.
        #[arg(long)]
        socket: bool,
        /// With --socket: the socket cookie the backend is hashed over.
        #[arg(long, default_value_t = 1)]
        cookie: u64,
        /// Print each program's output frame as hex.
        #[arg(long)]
        hex: bool,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: inspect::Output,
    },
    /// Install the CNI plugin on this node (the DaemonSet's init container): every
    /// plugin the conflist chains and `loopback` (the runtime runs it for every
    /// sandbox) that the host lacks, from --plugins-from; a host's own plugin is kept
    /// once it answers that it speaks the conflist's cniVersion. Then `ferrite-cni`
    /// (from next to this binary) and last the conflist, with the node's name. Fails,
    /// naming them and writing nothing, when plugins can be neither found nor
    /// installed.
    InstallCni {
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        /// The host's CNI plugin directory, as mounted (e.g. /host/opt/cni/bin).
        #[arg(long)]
        bin_dir: PathBuf,
        /// The host's CNI configuration directory, as mounted (e.g. /host/etc/cni/net.d).
        #[arg(long)]
        conf_dir: PathBuf,
        /// The conflist, with `__NODE_NAME__` for the node's name; written to
        /// --conf-dir under its own file name.
        #[arg(long)]
        conflist: PathBuf,
        /// Plugins to install where the host lacks them (the image ships those
        /// deploy/cni-plugins lists in /usr/lib/ferrite/cni).
        #[arg(long)]
        plugins_from: Option<PathBuf>,
    },
    /// Detach and unpin everything Ferrite installed for a node.
    Uninstall {
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
    },
}

#[derive(Clone, Copy, Default, clap::ValueEnum)]
enum MonitorOutput {
    #[default]
    Table,
    Json,
}

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

/// What the node accepts from objects: the agent's flags, which `inspect diff` takes
/// too so it plans as the agent does.
#[derive(clap::Args)]
struct AdmissionArgs {
    /// The Service CIDR (repeatable): clusterIPs outside it are refused. Without
    /// it any address that is not loopback, link-local, a node's or a pod's.
    #[arg(long = "service-cidr")]
    service_cidrs: Vec<ipnet::Ipv4Net>,
    /// Where `spec.externalIPs` may point (repeatable). None given: no
    /// externalIPs at all (CVE-2020-8554; the DenyServiceExternalIPs default).
    #[arg(long = "external-ip-cidr")]
    external_ip_cidrs: Vec<ipnet::Ipv4Net>,
    /// NodePorts outside this range are refused.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    node_port_range: std::ops::RangeInclusive<u16>,
    /// Serve the Services labelled `service.kubernetes.io/service-proxy-name` with
    /// this value (kube-proxy's flag); without it, only unlabelled Services.
    #[arg(long)]
    service_proxy_name: Option<String>,
}

impl AdmissionArgs {
    fn limits(self, cluster_cidr: Option<ipnet::Ipv4Net>) -> ferrite_agent::limits::Limits {
        ferrite_agent::limits::Limits {
            service_cidrs: self.service_cidrs,
            external_ip_cidrs: self.external_ip_cidrs,
            service_proxy_name: self.service_proxy_name,
            node_port_range: self.node_port_range,
            cluster_cidr,
        }
    }
}

fn parse_port_range(value: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = value
        .split_once('-')
        .ok_or("expected FIRST-LAST, e.g. 30000-32767")?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first == 0 || first > last {
        return Err(format!("{value:?} is not a range of ports"));
    }
    Ok(first..=last)
}

fn parse_map_capacity(value: &str) -> Result<(String, u32), String> {
    let (name, entries) = value
        .split_once('=')
        .ok_or("expected MAP=ENTRIES, e.g. ferrite_service=524288")?;
    use ferrite_common::capacity;
    if capacity::default_for(name).is_none() {
        let sized: Vec<&str> = capacity::DEFAULTS.iter().map(|(map, _)| *map).collect();
        return Err(format!(
            "{name:?} is not a sized map (maps: {})",
            sized.join(", ")
        ));
    }
    let entries: u32 = entries
        .parse()
        .map_err(|_| format!("{entries:?} is not a number of entries"))?;
    if entries == 0 {
        return Err("a map needs at least one entry".into());
    }
    Ok((name.to_string(), entries))
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
fn drop_capabilities() -> Result<()> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = RUNTIME_CAPABILITIES.into_iter().collect();
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
    info!(kept = ?RUNTIME_CAPABILITIES, "dropped all other capabilities");
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
        let source = drop_capabilities().and_then(|()| start_source(options, config, &telemetry));
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
            admission,
        } => {
            let options = agent::AgentOptions {
                limits: admission.limits(cluster_cidr),
                socket_lb,
                cgroup_root,
                proc_sys_net,
                uplink_xdp: xdp,
                map_capacities: map_capacities.into_iter().collect(),
                datapath_log,
                vni,
                vxlan_port,
                cluster_cidr,
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
            print!("{}", inspect::render_for_pod(&maps, table, output, pod)?);
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
            let explanation = explain::explain(&node, &datapath::pin_dir(&node), &request)?;
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
