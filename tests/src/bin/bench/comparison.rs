//! What the clusterip and latency benches share: nodes with a client pod and backend
//! pods ([`BenchNode`]), and [`Setups::prepare`], which loads one size of Services
//! (the measured one in the middle of `count`) into every setup of a comparison:
//! Ferrite's agents and maps, and kube-proxy's layouts as
//! `ferrite_tests::kube_proxy_layout` writes them (the take-over tests load the same).
//!
//! Filler Services are written straight into Ferrite's maps (one backend each, never
//! reached): through the agent 100,000 of them would need maps sized past the
//! defaults (`--map-capacity`), and loading them would dominate the run. The
//! kube-proxy layouts stop at [`KUBE_PROXY_MAX`] Services: restoring 100,000 takes
//! many minutes.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::Result;
use ferrite_agent::{
    model::{L4Addr, Protocol},
    plan::{self, FrontendEntries, MapContents},
};
use ferrite_common::{ServiceKey, PROTO_TCP, PROTO_UDP};
use ferrite_tests::{
    kube_proxy_layout::{self, ServicePort},
    lab::{pod_ip, sh, wait_until, Netns, Node, Pod, CLUSTER_CIDR},
};

use crate::iptables_restore;

/// kube-proxy layouts are measured up to this many Services.
pub(crate) const KUBE_PROXY_MAX: u32 = 10_000;
pub(crate) const HTTP_PORT: u16 = 8080;
/// The measured Service's port (to HTTP_PORT on its backends).
const SERVICE_PORT: u16 = 80;
const BACKENDS: usize = 3;
/// The one-backend Service next to the measured one: outside the fillers' range.
pub(crate) const SINGLE_BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 111, 0, 1);

/// Filler Service `index` (of `count`): the measured one takes the middle index.
pub(crate) fn service_ip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + index)
}

fn filler_backend(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + index)
}

/// A socket of `kind` bound to `address` (listening, for a stream): an IPv6 one
/// takes IPv6 alone, so a server can have one of each family on the same port.
pub(crate) fn listen(address: SocketAddr, kind: socket2::Type) -> Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), kind, None)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    if kind == socket2::Type::STREAM {
        // What std's TcpListener::bind gives, as the servers had before.
        socket.listen(128)?;
    }
    Ok(socket)
}

/// What the backend pods' kernels do with the connections their servers close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimeWait {
    /// `net.ipv4.tcp_max_tw_buckets` as a new network namespace has it.
    KernelDefault,
    /// `tcp_max_tw_buckets=0`: no TIME_WAIT, so no run depends on the ones before.
    Off,
}

impl TimeWait {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            TimeWait::KernelDefault => "backends keep TIME_WAIT (kernel default)",
            TimeWait::Off => "backends without TIME_WAIT (tcp_max_tw_buckets=0)",
        }
    }
}

/// One node of a comparison: `clients` client pods and BACKENDS backend pods with
/// servers. With Ferrite an agent runs on it; else plain routing, and a rule set
/// does NAT.
pub(crate) struct BenchNode {
    pub(crate) node: Node,
    clients: usize,
    _servers: Vec<Box<dyn Send>>,
}

impl BenchNode {
    /// The node, its backends' servers started by `serve` (on HTTP_PORT).
    pub(crate) fn serving(
        label: &str,
        index: usize,
        clients: usize,
        time_wait: TimeWait,
        serve: impl Fn(&Netns) -> Result<Box<dyn Send>>,
    ) -> Result<Self> {
        let mut node = Node::new(label)?;
        for c in 0..clients {
            node.add_pod(&format!("client-{c}"), pod_ip(index, c))?;
        }
        let mut servers = Vec::new();
        for b in 0..BACKENDS {
            node.add_pod(&format!("web-{b}"), pod_ip(index, 10 + b))?;
            let netns = &node.pods[clients + b].netns;
            // The server closes first, so TIME_WAIT lands on it.
            if time_wait == TimeWait::Off {
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &netns.name,
                        "sysctl",
                        "-qw",
                        "net.ipv4.tcp_max_tw_buckets=0",
                    ],
                )?;
            }
            servers.push(serve(netns)?);
        }
        Ok(Self {
            node,
            clients,
            _servers: servers,
        })
    }

    pub(crate) fn backends(&self) -> Vec<Ipv4Addr> {
        self.node.pods[self.clients..]
            .iter()
            .map(|p| p.ip)
            .collect()
    }

    /// Client pod `index` (of `clients`).
    pub(crate) fn client(&self, index: usize) -> &Pod {
        &self.node.pods[..self.clients][index]
    }

    /// Pods reached by plain routing (no Ferrite): /32 routes to the host veths and
    /// forwarding, as a bridge-less CNI wires them.
    pub(crate) fn route_plainly(&self) -> Result<()> {
        for pod in &self.node.pods {
            sh(
                "ip",
                &[
                    "-n",
                    &self.node.netns.name,
                    "route",
                    "add",
                    &format!("{}/32", pod.ip),
                    "dev",
                    &pod.host_interface,
                ],
            )?;
        }
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.node.netns.name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        Ok(())
    }

    /// kube-proxy in `mode` on this plainly routed node.
    pub(crate) fn kube_proxy_setup(&self, mode: KubeProxyMode) -> KubeProxySetup<'_> {
        KubeProxySetup {
            mode,
            netns: &self.node.netns,
            backends: self.backends(),
            cluster_cidr: CLUSTER_CIDR,
        }
    }

    /// Start the agent on the node's pods alone; [`Setups::prepare`] adds Services.
    pub(crate) fn start_agent(&mut self) -> Result<()> {
        self.node.resync_seconds = 3600;
        self.node.write_config(&self.node.pods_yaml())?;
        self.node.start_agent()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KubeProxyMode {
    Iptables,
    Nftables,
}

impl KubeProxyMode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            KubeProxyMode::Iptables => "kube-proxy iptables",
            KubeProxyMode::Nftables => "kube-proxy nftables",
        }
    }
}

/// A Ferrite setup: agents on `nodes`, all reading one config (`objects`: their Node
/// and Pod objects, to which the Services are added). The client's node, `nodes[0]`,
/// also gets the fillers.
pub(crate) struct FerriteSetup<'a> {
    pub(crate) nodes: Vec<&'a Node>,
    pub(crate) objects: String,
    pub(crate) backends: Vec<Ipv4Addr>,
}

/// A kube-proxy setup: its rules loaded into `netns` (the client's node), the
/// measured Service on `backends`; `cluster_cidr` is its `--cluster-cidr`.
pub(crate) struct KubeProxySetup<'a> {
    pub(crate) mode: KubeProxyMode,
    pub(crate) netns: &'a Netns,
    pub(crate) backends: Vec<Ipv4Addr>,
    pub(crate) cluster_cidr: &'static str,
}

/// Every setup of a comparison. The measured Service serves `protocols` (`tcp`,
/// `udp`); with `single_backend`, a second Service at [`SINGLE_BACKEND_IP`] has only
/// the first backend.
pub(crate) struct Setups<'a> {
    pub(crate) ferrite: Vec<FerriteSetup<'a>>,
    pub(crate) kube_proxy: Vec<KubeProxySetup<'a>>,
    pub(crate) protocols: &'static [&'static str],
    pub(crate) single_backend: bool,
}

/// One size, loaded.
pub(crate) struct Prepared {
    /// The measured Service's address and port.
    pub(crate) frontend: SocketAddrV4,
    /// Whether the kube-proxy layouts hold this size (else they are not measured).
    pub(crate) kube_proxy: bool,
    /// How long each kube-proxy setup took to load its rules.
    pub(crate) load_times: Vec<(KubeProxyMode, Duration)>,
}

/// A Service of `protocols`, port 80 -> HTTP_PORT on `backends`, for the agent.
fn service_yaml(name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr], protocols: &[&str]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    let ports = |port: u16, target: Option<u16>| -> String {
        let entries: Vec<String> = protocols
            .iter()
            .map(|p| {
                let target = target
                    .map(|t| format!(", targetPort: {t}"))
                    .unwrap_or_default();
                format!(
                    "{{name: {p}, port: {port}, protocol: {}{target}}}",
                    p.to_uppercase()
                )
            })
            .collect();
        entries.join(", ")
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{}]\nendpoints:\n{endpoints}",
        ports(SERVICE_PORT, Some(HTTP_PORT)),
        ports(HTTP_PORT, None),
    )
}

fn proto_number(protocol: &str) -> u8 {
    match protocol {
        "udp" => PROTO_UDP,
        _ => PROTO_TCP,
    }
}

/// Filler Services `0..count` but `measured`, written into the pinned maps as the
/// agent lays them out (no rev-NAT entry: no reply of theirs is ever translated).
fn fill_ferrite(node: &Node, count: u32, measured: u32) -> Result<()> {
    let mut entries = MapContents::default();
    let tcp = |ip, port| L4Addr {
        ip,
        port,
        protocol: Protocol::Tcp,
    };
    for index in (0..count).filter(|i| *i != measured) {
        let id = 1_000_000 + index;
        let backend = tcp(filler_backend(index), HTTP_PORT);
        entries.backends.insert(id, plan::backend_value(&backend));
        FrontendEntries {
            frontend: tcp(service_ip(index), SERVICE_PORT),
            scope: ferrite_common::service_scope::ALL,
            rev_nat_index: u32::from(u16::MAX),
            backend_ids: &[id],
            ready: 1,
            flags: 0,
            affinity_timeout_s: 0,
        }
        .write_into(&mut entries);
    }
    let ops = plan::diff(&MapContents::default(), &entries);
    node.maps()?.apply(&ops)
}

/// kube-proxy's Service ports for one size: the fillers (TCP, one made-up endpoint
/// each) and the measured Service on `backends` for each of `protocols`.
fn kube_proxy_ports(
    count: u32,
    measured: u32,
    backends: &[Ipv4Addr],
    protocols: &'static [&'static str],
) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    for index in 0..count {
        let (endpoints, protocols): (Vec<Ipv4Addr>, &[&'static str]) = if index == measured {
            (backends.to_vec(), protocols)
        } else {
            (vec![filler_backend(index)], &["tcp"])
        };
        for proto in protocols {
            ports.push(ServicePort {
                cluster_ip: service_ip(index),
                port: SERVICE_PORT,
                proto,
                node_port: None,
                endpoints: endpoints
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
                    .collect(),
            });
        }
    }
    ports
}

/// `nft -f` of `script` in `netns`: how long it took.
fn nft(netns: &Netns, script: &str) -> Result<Duration> {
    let path = std::env::temp_dir().join(format!("{}-kube-proxy.nft", netns.name));
    std::fs::write(&path, script)?;
    let start = Instant::now();
    let result = sh(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "nft",
            "-f",
            &path.to_string_lossy(),
        ],
    );
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(start.elapsed())
}

impl Setups<'_> {
    /// `count` Services in every setup, the measured one (`count / 2`) in the middle:
    /// Ferrite's agents hold the measured Service (and the one-backend one), the
    /// fillers go straight into the client node's maps; the kube-proxy layouts are
    /// replaced whole, up to [`KUBE_PROXY_MAX`].
    pub(crate) fn prepare(&self, count: u32) -> Result<Prepared> {
        let measured = count / 2;
        let vip = service_ip(measured);
        for setup in &self.ferrite {
            let mut yaml = setup.objects.clone();
            yaml.push_str(&service_yaml(
                "measured",
                vip,
                &setup.backends,
                self.protocols,
            ));
            if self.single_backend {
                yaml.push_str(&service_yaml(
                    "single",
                    SINGLE_BACKEND_IP,
                    &setup.backends[..1],
                    self.protocols,
                ));
            }
            for node in &setup.nodes {
                node.write_config(&yaml)?;
            }
        }
        for setup in &self.ferrite {
            for node in &setup.nodes {
                let mut expected = vec![(vip, setup.backends.len() as u16)];
                if self.single_backend {
                    expected.push((SINGLE_BACKEND_IP, 1));
                }
                wait_until(
                    "the measured Services in the maps",
                    Duration::from_secs(60),
                    || {
                        node.maps().is_ok_and(|m| {
                            expected.iter().all(|(ip, backends)| {
                                self.protocols.iter().all(|p| {
                                    m.services
                                        .get(
                                            &ServiceKey::new(*ip, SERVICE_PORT, proto_number(p), 0),
                                            0,
                                        )
                                        .is_ok_and(|v| v.count == *backends)
                                })
                            })
                        })
                    },
                )?;
            }
            fill_ferrite(setup.nodes[0], count, measured)?;
        }
        let kube_proxy = count <= KUBE_PROXY_MAX;
        let mut load_times = Vec::new();
        if kube_proxy {
            for setup in &self.kube_proxy {
                let ports = kube_proxy_ports(count, measured, &setup.backends, self.protocols);
                let took = match setup.mode {
                    KubeProxyMode::Iptables => iptables_restore(
                        setup.netns,
                        &kube_proxy_layout::iptables(&ports, setup.cluster_cidr),
                        false,
                    )?,
                    // The previous size's table goes in the same transaction.
                    KubeProxyMode::Nftables => nft(
                        setup.netns,
                        &format!(
                            "table ip kube-proxy {{}}\ndelete table ip kube-proxy\n{}",
                            kube_proxy_layout::nftables(&ports, setup.cluster_cidr)
                        ),
                    )?,
                };
                load_times.push((setup.mode, took));
            }
        }
        Ok(Prepared {
            frontend: SocketAddrV4::new(vip, SERVICE_PORT),
            kube_proxy,
            load_times,
        })
    }
}
