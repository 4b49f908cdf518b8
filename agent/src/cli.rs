//! The `ferrite` command line (clap): every subcommand and flag, with its help.
//! The binary parses it; `docs/reference/flags.md` is rendered from it
//! (`tests/docs_reference.rs` checks that file is current).
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{datapath, explain, files, inspect, monitor, plan, proxy_health};

/// Ferrite: Kubernetes pod networking and Service load balancing in eBPF.
#[derive(Parser)]
#[command(version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Cluster pod CIDR, one per IP family (`10.244.0.0/16,fd00:10:244::/56`):
        /// pod traffic leaving the IPv4 one is masqueraded to the node IP; nodes'
        /// pod CIDRs must lie in them.
        #[arg(long, value_parser = crate::limits::ClusterCidrs::parse)]
        cluster_cidr: Option<crate::limits::ClusterCidrs>,
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
        /// How pod traffic reaches other nodes: `vxlan` (encapsulated; any underlay
        /// that routes between the nodes' InternalIPs; pod MTU = uplink MTU - 50) or
        /// `native` (no encapsulation: out of the uplink straight to the other node's
        /// MAC, as flannel's host-gw; the nodes must share an L2 segment, and pods get
        /// the uplink's MTU: set the CNI conflist's "mtu" to it). With `native`, a
        /// node whose InternalIP is not on-link on the uplink is refused native
        /// routing with a logged reason and reached over VXLAN.
        #[arg(long, value_enum, default_value_t)]
        routing: plan::Routing,
        /// Take the node over from kube-proxy without breaking open connections: in
        /// the first sync, before attaching its programs, seed Ferrite's conntrack
        /// with every flow of the kernel's conntrack table to a Service frontend
        /// Ferrite serves (keeping the backend kube-proxy's rules chose); once every
        /// frontend is written, remove kube-proxy's rules (iptables `KUBE-*` chains,
        /// nft and legacy; nftables `kube-proxy` tables). Stop kube-proxy first, or
        /// it writes them again. See "Migrating from kube-proxy" in
        /// docs/operations.md.
        #[arg(long)]
        take_over_from_kube_proxy: bool,
        #[command(flatten)]
        admission: AdmissionArgs,
    },
    /// Show a node's datapath state from its pinned maps; `diff` lists the writes a
    /// sync would make now (drift between the objects and the maps).
    Inspect {
        /// The node whose pinned datapath to read (the agent's --node).
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
        /// For `diff`: the agent's cluster pod CIDR(s).
        #[arg(long, value_parser = crate::limits::ClusterCidrs::parse)]
        cluster_cidr: Option<crate::limits::ClusterCidrs>,
        /// For `diff`: the agent's admission flags.
        #[command(flatten)]
        admission: AdmissionArgs,
        /// For `policy`: only this pod, by ADDRESS or NAMESPACE/NAME (a name needs
        /// the node's agent running).
        #[arg(long, value_parser = inspect::parse_pod)]
        pod: Option<inspect::PodChoice>,
    },
    /// Stream the datapath's drops (with their reason) and new Service flows (with
    /// the backend chosen) as they happen, from the node's agent. Run it in the
    /// node's network namespace to see device names.
    Monitor {
        /// The node whose agent to listen to (the agent's --node).
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        /// Which events.
        #[arg(long = "type", value_enum, default_value_t)]
        kind: monitor::Kind,
        /// Only events with this address (IPv4 or IPv6) on either side (or as the
        /// backend).
        #[arg(long)]
        address: Option<std::net::IpAddr>,
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
        /// The node whose loaded datapath runs the packet (the agent's --node).
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
        /// The sender: ADDRESS[:PORT] (an ephemeral port when none is given); IPv6 as
        /// ADDRESS or [ADDRESS]:PORT.
        #[arg(long, value_parser = explain::parse_source)]
        from: std::net::SocketAddr,
        /// The destination: ADDRESS:PORT/tcp or ADDRESS:PORT/udp ([ADDRESS]:PORT/tcp
        /// for IPv6), of the sender's family.
        #[arg(long, value_parser = explain::parse_destination)]
        to: (std::net::SocketAddr, u8),
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
        /// IPv4 only.
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
        /// This node's name, written into the conflist.
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
        /// The node whose datapath to remove (the agent's --node).
        #[arg(long, env = "NODE_NAME", value_parser = files::node_name_arg)]
        node: String,
    },
}

#[derive(Clone, Copy, Default, clap::ValueEnum)]
pub enum MonitorOutput {
    #[default]
    Table,
    Json,
}

/// What the node accepts from objects: the agent's flags, which `inspect diff` takes
/// too so it plans as the agent does.
#[derive(clap::Args)]
pub struct AdmissionArgs {
    /// The Service CIDR (repeatable, IPv4 or IPv6): clusterIPs outside the IPv4
    /// ones are refused. Without it any address that is not loopback, link-local, a
    /// node's or a pod's. IPv6 ones keep nodes' IPv6 pod CIDRs and addresses out.
    #[arg(long = "service-cidr")]
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// Where `spec.externalIPs` may point: CIDRs, IPv4 or IPv6 (repeatable or
    /// comma-separated; each family's externalIPs are held to that family's). None
    /// given for a family: no externalIPs of it at all (CVE-2020-8554; the
    /// DenyServiceExternalIPs default).
    #[arg(long = "external-ip-cidr", value_delimiter = ',')]
    pub external_ip_cidrs: Vec<ipnet::IpNet>,
    /// NodePorts outside this range are refused.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// Serve the Services labelled `service.kubernetes.io/service-proxy-name` with
    /// this value (kube-proxy's flag); without it, only unlabelled Services.
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Which node addresses answer NodePorts (kube-proxy's flag): `primary`, the
    /// node's InternalIP, or CIDR,... for every address of the node's interfaces
    /// inside them (read at each full sync). Never 127.0.0.1.
    #[arg(long, default_value = "primary", value_parser = crate::limits::NodePortAddresses::parse)]
    pub nodeport_addresses: crate::limits::NodePortAddresses,
}

impl AdmissionArgs {
    pub fn limits(
        self,
        cluster_cidr: Option<crate::limits::ClusterCidrs>,
    ) -> crate::limits::Limits {
        let cluster_cidr = cluster_cidr.unwrap_or_default();
        let (mut service_cidrs, mut service_cidrs6) = (Vec::new(), Vec::new());
        for cidr in self.service_cidrs {
            match cidr {
                ipnet::IpNet::V4(v4) => service_cidrs.push(v4),
                ipnet::IpNet::V6(v6) => service_cidrs6.push(v6),
            }
        }
        let (mut external_ip_cidrs, mut external_ip_cidrs6) = (Vec::new(), Vec::new());
        for cidr in self.external_ip_cidrs {
            match cidr.trunc() {
                ipnet::IpNet::V4(v4) => external_ip_cidrs.push(v4),
                ipnet::IpNet::V6(v6) => external_ip_cidrs6.push(v6),
            }
        }
        crate::limits::Limits {
            service_cidrs,
            service_cidrs6,
            cluster_cidr6: cluster_cidr.v6,
            external_ip_cidrs,
            external_ip_cidrs6,
            service_proxy_name: self.service_proxy_name,
            node_port_addresses: self.nodeport_addresses,
            node_port_range: self.node_port_range,
            cluster_cidr: cluster_cidr.v4,
        }
    }
}

pub fn parse_port_range(value: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
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

pub fn parse_map_capacity(value: &str) -> Result<(String, u32), String> {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Admission {
        #[command(flatten)]
        args: super::AdmissionArgs,
    }

    /// `--external-ip-cidr` takes CIDRs of both families, repeated or
    /// comma-separated, and gives each family its own.
    #[test]
    fn external_ip_cidrs_are_taken_per_family() {
        let parsed = Admission::try_parse_from([
            "ferrite",
            "--external-ip-cidr",
            "192.0.2.0/24,2001:db8:e::/48",
            "--external-ip-cidr",
            "198.51.100.7/24",
        ])
        .expect("parses");
        let limits = parsed.args.limits(None);
        assert_eq!(
            limits.external_ip_cidrs,
            [
                "192.0.2.0/24".parse::<ipnet::Ipv4Net>().unwrap(),
                "198.51.100.0/24".parse().unwrap()
            ]
        );
        assert_eq!(
            limits.external_ip_cidrs6,
            ["2001:db8:e::/48".parse::<ipnet::Ipv6Net>().unwrap()]
        );
        assert!(Admission::try_parse_from(["ferrite", "--external-ip-cidr", "nope"]).is_err());
    }
}
