//! One pure desired-state model, built from Kubernetes objects whatever their source
//! (the YAML file or the Kubernetes API). No BPF, no I/O: unit-tested on its own.
//!
//! Semantics follow kube-proxy:
//! - a Service port's backends come from the EndpointSlices labelled
//!   `kubernetes.io/service-name`, matching the slice port by name and protocol (the
//!   EndpointSlice controller has already resolved named targetPorts to numbers);
//! - only endpoints whose `conditions.ready` is true or unset are used; when none is,
//!   serving terminating ones are (kube-proxy's ProxyTerminatingEndpoints); serving
//!   terminating endpoints otherwise take no new flows but keep their established ones;
//! - a Service has a frontend per port on its ClusterIP, each externalIP, and for
//!   NodePort/LoadBalancer types this node's IP at the nodePort and each
//!   `status.loadBalancer.ingress` IP; `externalTrafficPolicy: Local` (external
//!   frontends) and `internalTrafficPolicy: Local` (the ClusterIP) keep only this
//!   node's endpoints (by `nodeName`, else by this node's pod CIDR);
//! - headless and ExternalName Services have no frontend and are skipped;
//! - an invalid object is skipped with a reason; everything else still applies.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use sha2::{Digest, Sha256};

use crate::limits::{Claimed, Limits, MAX_BACKENDS_PER_PORT, MAX_SERVICE_ENTRIES};

pub use ferrite_common::{PROTO_TCP, PROTO_UDP};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node annotation a VTEP of another implementation uses to announce its MAC.
pub const VTEP_MAC_ANNOTATION: &str = "ferrite.dev/vtep-mac";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Kubernetes' protocol field: unset means TCP. `Err` carries the unsupported name.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(other.to_string()),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            PROTO_TCP => Some(Self::Tcp),
            PROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An address:port/protocol: a Service frontend or a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for L4Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// A Service by (namespace, name).
pub type ServiceRef = (String, String);

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceRef> {
    let meta = &slice.metadata;
    let service = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        service.clone(),
    ))
}

/// How a frontend is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrontendKind {
    #[default]
    ClusterIp,
    /// This node's IP at the Service port's nodePort.
    NodePort,
    /// A `status.loadBalancer.ingress` IP.
    LoadBalancer,
    /// A `spec.externalIPs` address.
    ExternalIp,
}

impl FrontendKind {
    /// Reached from outside the cluster: the XDP program and Maglev handle it.
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }
}

/// One Service port on one address, as the datapath sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFrontend {
    /// The Service this port belongs to.
    pub service: ServiceRef,
    /// `namespace/name:port-name` for logs and inspect.
    pub name: String,
    /// Backends for new flows, sorted and deduplicated (so the model is deterministic).
    pub backends: Vec<L4Addr>,
    /// Serving but terminating backends that take no new flows: kept in the maps so
    /// their established flows finish.
    pub terminating: Vec<L4Addr>,
    pub kind: FrontendKind,
    /// Traffic policy `Local`: `backends` are this node's only.
    pub local_only: bool,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` (LoadBalancer frontends only); empty = everyone.
    pub source_ranges: Vec<Ipv4Net>,
}

/// `spec.healthCheckNodePort` of an `externalTrafficPolicy: Local` LoadBalancer:
/// answered 200 when this node has a local endpoint, 503 when not (kube-proxy's way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceRef,
    pub local_endpoints: usize,
}

/// A pod on this node: where its traffic enters the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Host-side veth name, derived from the pod's identity (see [`pod_interface_name`]).
    pub interface: String,
}

/// A node of the cluster as the overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// InternalIP: where its VXLAN endpoint listens.
    pub ip: Ipv4Addr,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub vtep_mac: [u8; 6],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<L4Addr, ServiceFrontend>,
    /// Health-check ports this node serves, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    pub pods: BTreeMap<Ipv4Addr, LocalPod>,
    /// Every node with an InternalIP, this one included, by name.
    pub nodes: BTreeMap<String, ClusterNode>,
}

/// An object (or part of one) left out of the model, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// The Kubernetes objects the model is built from. Shared (`Arc`), so a snapshot of
/// the watch caches costs no deep copy.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
}

/// Host-side veth name of a pod: `fer` + 12 hex digits of SHA-256("namespace/name"),
/// 15 characters (IFNAMSIZ - 1), stable across restarts. The CNI plugin and the agent
/// both derive it, as Calico does with its `cali…` names.
pub fn pod_interface_name(namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("fer{hex}")
}

/// Host-side veth name of a pod's interface `ifname`: the pod's name for `eth0`
/// (the one the agent derives from the Pod object), a name of its own for any other
/// (`net1`, as Multus adds), so a second attachment never takes over the first's.
pub fn pod_attachment_interface_name(namespace: &str, name: &str, ifname: &str) -> String {
    if ifname == "eth0" {
        return pod_interface_name(namespace, name);
    }
    let digest = Sha256::digest(format!("{namespace}/{name}/{ifname}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("fer{hex}")
}

fn object_name(kind: &str, namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{kind} {}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or("<unnamed>")
    )
}

/// Build the desired state for `node`. Never fails: what cannot be used is returned
/// in the skipped list with a reason.
pub fn build(
    objects: &ClusterObjects,
    node: &str,
    limits: &Limits,
) -> (DesiredState, Vec<Skipped>) {
    let mut skipped = Vec::new();
    // Nodes first: every Service frontend is checked against their addresses.
    let mut state = DesiredState {
        nodes: cluster_nodes(objects, limits, &mut skipped),
        ..DesiredState::default()
    };
    let node_ips: Vec<Ipv4Addr> = state.nodes.values().map(|n| n.ip).collect();
    let pod_cidrs: Vec<Ipv4Net> = state
        .nodes
        .values()
        .flat_map(|n| n.pod_cidrs.iter().copied())
        .collect();
    let claimed = Claimed {
        node_ips: &node_ips,
        pod_cidrs: &pod_cidrs,
    };

    let mut slices_by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objects.endpoint_slices {
        let meta = &slice.metadata;
        let what = object_name(
            "EndpointSlice",
            meta.namespace.as_deref(),
            meta.name.as_deref(),
        );
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            skipped.push(Skipped {
                object: what,
                reason: format!("no {SERVICE_NAME_LABEL} label"),
            });
            continue;
        };
        if slice.address_type != "IPv4" {
            skipped.push(Skipped {
                object: what,
                reason: format!(
                    "addressType {} is not supported (IPv4 only)",
                    slice.address_type
                ),
            });
            continue;
        }
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        slices_by_service
            .entry((namespace, service.clone()))
            .or_default()
            .push(slice);
    }

    let here = ThisNode {
        name: node,
        node: state.nodes.get(node),
    };
    let mut services: BTreeMap<L4Addr, ServiceFrontend> = BTreeMap::new();
    let mut health_checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
    for service in &objects.services {
        let admission = Admission {
            limits,
            claimed: &claimed,
        };
        match service_frontends(service, &slices_by_service, &here, &admission, &mut skipped) {
            Ok((frontends, health_check)) => {
                if let Some((port, check)) = health_check {
                    if let Some(existing) = health_checks.get(&port) {
                        skipped.push(Skipped {
                            object: format!("Service {}/{}", check.service.0, check.service.1),
                            reason: format!(
                                "healthCheckNodePort {port} already used by {}/{}",
                                existing.service.0, existing.service.1
                            ),
                        });
                    } else {
                        health_checks.insert(port, check);
                    }
                }
                for (frontend, entry) in frontends {
                    if let Some(existing) = services.get(&frontend) {
                        skipped.push(Skipped {
                            object: entry.name.clone(),
                            reason: format!(
                                "frontend {frontend} already used by {}",
                                existing.name
                            ),
                        });
                        continue;
                    }
                    services.insert(frontend, entry);
                }
            }
            Err(reason) => skipped.push(Skipped {
                object: object_name(
                    "Service",
                    service.metadata.namespace.as_deref(),
                    service.metadata.name.as_deref(),
                ),
                reason,
            }),
        }
    }

    state.services = services;
    state.health_checks = health_checks;
    for pod in &objects.pods {
        match local_pod(pod, node) {
            Ok(Some(local)) => {
                if let Some(existing) = state.pods.get(&local.ip) {
                    skipped.push(Skipped {
                        object: object_name("Pod", Some(&local.namespace), Some(&local.name)),
                        reason: format!(
                            "pod IP {} already used by {}/{}",
                            local.ip, existing.namespace, existing.name
                        ),
                    });
                    continue;
                }
                state.pods.insert(local.ip, local);
            }
            Ok(None) => {}
            Err(reason) => skipped.push(Skipped {
                object: object_name(
                    "Pod",
                    pod.metadata.namespace.as_deref(),
                    pod.metadata.name.as_deref(),
                ),
                reason,
            }),
        }
    }
    (state, skipped)
}

/// Every Node with an InternalIP, by name, each with the pod CIDRs it may have:
/// decided in name order, so every node's agent agrees on who owns what.
fn cluster_nodes(
    objects: &ClusterObjects,
    limits: &Limits,
    skipped: &mut Vec<Skipped>,
) -> BTreeMap<String, ClusterNode> {
    let mut nodes = BTreeMap::new();
    for node in &objects.nodes {
        match cluster_node(node) {
            Ok(parsed) => {
                if let Some(existing) = nodes.insert(parsed.name.clone(), parsed) {
                    skipped.push(Skipped {
                        object: format!("Node {}", existing.name),
                        reason: "listed twice: the later one applies".into(),
                    });
                }
            }
            Err(reason) => skipped.push(Skipped {
                object: format!(
                    "Node {}",
                    node.metadata.name.as_deref().unwrap_or("<unnamed>")
                ),
                reason,
            }),
        }
    }
    let node_ips: Vec<Ipv4Addr> = nodes.values().map(|n: &ClusterNode| n.ip).collect();
    let mut accepted: Vec<(Ipv4Net, String)> = Vec::new();
    for node in nodes.values_mut() {
        node.pod_cidrs.retain(
            |cidr| match limits.refuse_pod_cidr(cidr, &accepted, &node_ips) {
                Some(reason) => {
                    skipped.push(Skipped {
                        object: format!("Node {} podCIDR {cidr}", node.name),
                        reason,
                    });
                    false
                }
                None => {
                    accepted.push((*cidr, node.name.clone()));
                    true
                }
            },
        );
    }
    nodes
}

/// What a Service's addresses and size are checked against.
struct Admission<'a> {
    limits: &'a Limits,
    claimed: &'a Claimed<'a>,
}

fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn cluster_node(node: &Node) -> Result<ClusterNode, String> {
    let name = node
        .metadata
        .name
        .clone()
        .ok_or("metadata.name is missing")?;
    let ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or("no IPv4 InternalIP in status.addresses")?;
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<&String> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec.and_then(|s| s.pod_cidr.as_ref()));
    }
    let mut pod_cidrs = Vec::new();
    for cidr in cidrs {
        // Dual-stack nodes list an IPv6 CIDR too: Ferrite routes the IPv4 one.
        if cidr.contains(':') {
            continue;
        }
        let net: Ipv4Net = cidr
            .parse()
            .map_err(|_| format!("podCIDR {cidr:?} is not an IPv4 CIDR"))?;
        pod_cidrs.push(net.trunc());
    }
    let vtep_mac = match node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(VTEP_MAC_ANNOTATION))
    {
        Some(value) => parse_mac(value)
            .ok_or_else(|| format!("annotation {VTEP_MAC_ANNOTATION} {value:?} is not a MAC"))?,
        None => ferrite_common::vtep_mac_for(ip),
    };
    Ok(ClusterNode {
        name,
        ip,
        pod_cidrs,
        vtep_mac,
    })
}

/// Ports one Service may have (Kubernetes sets no limit; a hostile Service with
/// thousands would take map space from every other one).
pub const MAX_SERVICE_PORTS: usize = 1024;

/// RFC 1035 label, as Kubernetes requires of Service names.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A hostile value, shortened for a log line.
fn truncated(value: &str) -> String {
    match value.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_string(),
    }
}

fn parse_ipv4(value: &str, field: &str) -> Result<Ipv4Addr, String> {
    value
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("{field} {:?} is not an IPv4 address", truncated(value)))
}

fn valid_port(port: i32, field: &str) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{field} {port} is out of range 1-65535")),
    }
}

type SlicesByService<'a> = BTreeMap<(String, String), Vec<&'a EndpointSlice>>;

/// The node the model is built for.
pub struct ThisNode<'a> {
    name: &'a str,
    /// Its Node object, once known (IP for NodePorts, pod CIDRs for locality).
    node: Option<&'a ClusterNode>,
}

impl ThisNode<'_> {
    /// Whether an endpoint runs here: its `nodeName`, else its address in this
    /// node's pod CIDR (endpoints written by hand often lack `nodeName`).
    fn owns(&self, node_name: Option<&str>, ip: Ipv4Addr) -> bool {
        match node_name {
            Some(name) => name == self.name,
            None => self
                .node
                .is_some_and(|n| n.pod_cidrs.iter().any(|c| c.contains(&ip))),
        }
    }
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours), and the most
/// Kubernetes accepts (1 day).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// What a Service's spec says about every one of its frontends.
struct Policies {
    external_local: bool,
    internal_local: bool,
    affinity_timeout_s: u32,
    source_ranges: Vec<Ipv4Net>,
}

fn policies(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<Policies, String> {
    let affinity_timeout_s = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => 0,
        "ClientIP" => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S as i32);
            if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&timeout) {
                return Err(format!(
                    "sessionAffinityConfig timeoutSeconds {timeout} is out of range 1-{MAX_AFFINITY_TIMEOUT_S}"
                ));
            }
            timeout as u32
        }
        other => return Err(format!("unknown sessionAffinity {:?}", truncated(other))),
    };
    let mut source_ranges = Vec::new();
    for range in spec.load_balancer_source_ranges.iter().flatten() {
        if range.contains(':') {
            continue; // IPv6 ranges: Ferrite's frontends are IPv4
        }
        let net: Ipv4Net = range.trim().parse().map_err(|_| {
            format!(
                "loadBalancerSourceRanges {:?} is not an IPv4 CIDR",
                truncated(range)
            )
        })?;
        source_ranges.push(net.trunc());
    }
    source_ranges.sort();
    source_ranges.dedup();
    Ok(Policies {
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout_s,
        source_ranges,
    })
}

type Frontends = Vec<(L4Addr, ServiceFrontend)>;

fn service_frontends(
    service: &Service,
    slices_by_service: &SlicesByService,
    here: &ThisNode,
    admission: &Admission,
    skipped: &mut Vec<Skipped>,
) -> Result<(Frontends, Option<(u16, HealthCheck)>), String> {
    let name = service
        .metadata
        .name
        .as_deref()
        .ok_or("metadata.name is missing")?;
    if !is_dns_label(name) {
        return Err(format!(
            "metadata.name {:?} is not a DNS label (1-63 lowercase letters, digits, '-')",
            truncated(name)
        ));
    }
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let spec = service.spec.as_ref().ok_or("spec is missing")?;
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Err("ExternalName Services are resolved by DNS, not load-balanced".into());
    }
    if !matches!(service_type, "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(format!("unknown Service type {service_type:?}"));
    }
    let cluster_ip = spec
        .cluster_ip
        .as_deref()
        .ok_or("spec.clusterIP is missing")?;
    if cluster_ip == "None" {
        return Err("headless Service (clusterIP None): DNS returns pod IPs directly".into());
    }
    let vip = parse_ipv4(cluster_ip, "spec.clusterIP")?;
    if vip.is_unspecified() || vip.is_broadcast() || vip.is_multicast() {
        return Err(format!("spec.clusterIP {vip} cannot be a Service address"));
    }
    let limits = admission.limits;
    if let Some(reason) = limits.refuse_frontend(vip, "spec.clusterIP", admission.claimed) {
        return Err(reason);
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        return Err("spec.ports is empty".into());
    }
    if ports.len() > MAX_SERVICE_PORTS {
        // One Service must not fill the maps every other Service shares.
        return Err(format!(
            "{} ports (more than {MAX_SERVICE_PORTS})",
            ports.len()
        ));
    }
    let policy = policies(spec)?;
    let with_node_ports = service_type != "ClusterIP";
    // Validate every port first so a bad Service is skipped whole, never half-applied.
    let mut parsed = Vec::with_capacity(ports.len());
    for port in ports {
        let number = valid_port(port.port, "port")?;
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(other) if other == "SCTP" => {
                skipped.push(Skipped {
                    object: format!("Service {namespace}/{name} port {number}/SCTP"),
                    reason: "SCTP is not supported; the other ports still apply".into(),
                });
                continue;
            }
            Err(other) => return Err(format!("unknown protocol {other:?} on port {number}")),
        };
        if let Some(IntOrString::Int(target)) = &port.target_port {
            valid_port(*target, "targetPort")?;
        }
        let node_port = match (with_node_ports, port.node_port) {
            (true, Some(n)) => {
                let node_port = valid_port(n, "nodePort")?;
                if let Some(reason) = limits.refuse_node_port(node_port) {
                    return Err(reason);
                }
                Some(node_port)
            }
            (true, None) => {
                // The API server allocates one; without it only the other frontends apply.
                skipped.push(Skipped {
                    object: format!("Service {namespace}/{name} port {number}"),
                    reason: "no nodePort allocated".into(),
                });
                None
            }
            (false, _) => None,
        };
        parsed.push((port, number, protocol, node_port));
    }
    // A frontend address the node refuses leaves the Service's other frontends.
    let admitted = |ip: Ipv4Addr, field: &str, skipped: &mut Vec<Skipped>| match limits
        .refuse_frontend(ip, field, admission.claimed)
    {
        Some(reason) => {
            skipped.push(Skipped {
                object: format!("Service {namespace}/{name} {field} {ip}"),
                reason,
            });
            false
        }
        None => true,
    };
    let mut external_ips = Vec::new();
    for ip in spec.external_ips.iter().flatten() {
        if ip.contains(':') {
            continue; // IPv6
        }
        let ip = parse_ipv4(ip, "spec.externalIPs")?;
        if admitted(ip, "spec.externalIPs", skipped) {
            external_ips.push(ip);
        }
    }
    let mut ingress_ips = Vec::new();
    if service_type == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for entry in ingress.into_iter().flatten() {
            match entry.ip.as_deref() {
                Some(ip) if !ip.contains(':') => {
                    let ip = parse_ipv4(ip, "status.loadBalancer.ingress ip")?;
                    if admitted(ip, "status.loadBalancer.ingress", skipped) {
                        ingress_ips.push(ip);
                    }
                }
                _ => {} // hostname-only or IPv6 ingress: nothing to serve here
            }
        }
    }
    let node_ip = here.node.map(|n| n.ip);
    let slices = slices_by_service
        .get(&(namespace.to_string(), name.to_string()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let service_ref = (namespace.to_string(), name.to_string());
    let mut frontends = Vec::new();
    let mut local_endpoints = 0;
    for (port, number, protocol, node_port) in parsed {
        let port_name = port.name.as_deref().unwrap_or("");
        let display = if port_name.is_empty() {
            format!("{namespace}/{name}:{number}")
        } else {
            format!("{namespace}/{name}:{port_name}")
        };
        let endpoints = port_backends(port, protocol, slices, here, &display, skipped);
        local_endpoints = local_endpoints.max(endpoints.local_ready);
        let mut add = |ip: Ipv4Addr, port: u16, kind: FrontendKind| {
            let local_only = if kind.is_external() {
                policy.external_local
            } else {
                policy.internal_local
            };
            let (backends, terminating) = endpoints.for_policy(local_only);
            let source_ranges = if kind == FrontendKind::LoadBalancer {
                policy.source_ranges.clone()
            } else {
                Vec::new()
            };
            let suffix = match kind {
                FrontendKind::ClusterIp => "",
                FrontendKind::NodePort => " (NodePort)",
                FrontendKind::LoadBalancer => " (LoadBalancer)",
                FrontendKind::ExternalIp => " (externalIP)",
            };
            frontends.push((
                L4Addr { ip, port, protocol },
                ServiceFrontend {
                    service: service_ref.clone(),
                    name: format!("{display}{suffix}"),
                    backends,
                    terminating,
                    kind,
                    local_only,
                    affinity_timeout_s: policy.affinity_timeout_s,
                    source_ranges,
                },
            ));
        };
        add(vip, number, FrontendKind::ClusterIp);
        if let (Some(node_port), Some(node_ip)) = (node_port, node_ip) {
            add(node_ip, node_port, FrontendKind::NodePort);
        }
        for ip in &ingress_ips {
            add(*ip, number, FrontendKind::LoadBalancer);
        }
        for ip in &external_ips {
            add(*ip, number, FrontendKind::ExternalIp);
        }
    }
    // Bounded, so one Service can neither wrap a slot count nor fill the shared maps.
    let mut entries = 0;
    for (frontend, entry) in &frontends {
        let backends = entry.backends.len() + entry.terminating.len();
        if backends > MAX_BACKENDS_PER_PORT {
            return Err(format!(
                "{frontend} has {backends} endpoints (more than {MAX_BACKENDS_PER_PORT} a port may have)"
            ));
        }
        entries += 1 + backends;
    }
    if entries > MAX_SERVICE_ENTRIES {
        return Err(format!(
            "{entries} Service map entries (more than {MAX_SERVICE_ENTRIES} one Service may take)"
        ));
    }
    let health_check = match spec.health_check_node_port {
        Some(port) if service_type == "LoadBalancer" && policy.external_local => Some((
            valid_port(port, "healthCheckNodePort")?,
            HealthCheck {
                service: service_ref.clone(),
                local_endpoints,
            },
        )),
        _ => None,
    };
    Ok((frontends, health_check))
}

/// The endpoints of one Service port, sorted into what each policy uses.
#[derive(Default)]
struct PortEndpoints {
    ready: BTreeSet<L4Addr>,
    local_ready: usize,
    /// Serving and terminating: (address, on this node).
    terminating: BTreeSet<(L4Addr, bool)>,
    local: BTreeSet<L4Addr>,
}

impl PortEndpoints {
    /// (backends for new flows, terminating ones kept for established flows).
    fn for_policy(&self, local_only: bool) -> (Vec<L4Addr>, Vec<L4Addr>) {
        let eligible = |a: &L4Addr| !local_only || self.local.contains(a);
        let ready: Vec<L4Addr> = self.ready.iter().copied().filter(eligible).collect();
        let terminating: Vec<L4Addr> = self
            .terminating
            .iter()
            .filter(|(a, local)| !local_only || *local || self.local.contains(a))
            .map(|(a, _)| *a)
            .collect();
        if ready.is_empty() {
            // Nothing ready: serving terminating endpoints take new flows rather than
            // none (kube-proxy does the same since Kubernetes 1.26).
            (terminating, Vec::new())
        } else {
            (ready, terminating)
        }
    }
}

fn port_backends(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    here: &ThisNode,
    display: &str,
    skipped: &mut Vec<Skipped>,
) -> PortEndpoints {
    let port_name = port.name.as_deref().unwrap_or("");
    let mut out = PortEndpoints::default();
    for slice in slices {
        let slice_name = object_name(
            "EndpointSlice",
            slice.metadata.namespace.as_deref(),
            slice.metadata.name.as_deref(),
        );
        let slice_port = slice.ports.as_deref().unwrap_or_default().iter().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && Protocol::parse(p.protocol.as_deref()) == Ok(protocol)
        });
        let target = match (slice_port.and_then(|p| p.port), &port.target_port) {
            (Some(n), _) => valid_port(n, "port"),
            // No slice port: a numeric (or absent) targetPort still says where to go.
            (None, Some(IntOrString::Int(n))) => valid_port(*n, "targetPort"),
            (None, None) => Ok(port.port as u16),
            (None, Some(IntOrString::String(named))) => Err(format!(
                "named targetPort {named:?} has no matching port {port_name:?} in the slice"
            )),
        };
        let target = match target {
            Ok(t) => t,
            Err(reason) => {
                skipped.push(Skipped {
                    object: format!("{slice_name} for {display}"),
                    reason,
                });
                continue;
            }
        };
        let compacted = is_compacted(slice);
        for endpoint in slice.endpoints.iter().flatten() {
            let state = endpoint_state(endpoint);
            if state == EndpointState::Unused {
                continue;
            }
            // All addresses of an endpoint are fungible; kube-proxy uses the first.
            // A compacted slice holds the addresses of alike endpoints comma-separated.
            let addresses: Vec<&str> = match endpoint.addresses.first() {
                Some(first) if compacted => first.split(',').collect(),
                Some(first) => vec![first.as_str()],
                None => Vec::new(),
            };
            if addresses.is_empty() {
                skipped.push(Skipped {
                    object: slice_name.clone(),
                    reason: "endpoint without addresses".into(),
                });
                continue;
            }
            for address in addresses {
                let Some(backend) = backend(address, target, protocol, &slice_name, skipped) else {
                    continue;
                };
                let local = here.owns(endpoint.node_name.as_deref(), backend.ip);
                if local {
                    out.local.insert(backend);
                }
                match state {
                    EndpointState::Ready => {
                        if out.ready.insert(backend) && local {
                            out.local_ready += 1;
                        }
                    }
                    _ => {
                        out.terminating.insert((backend, local));
                    }
                }
            }
        }
    }
    // An address both ready (in one slice) and terminating (in another) is ready.
    let ready = out.ready.clone();
    out.terminating.retain(|(a, _)| !ready.contains(a));
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndpointState {
    Ready,
    /// Not ready, but serving and terminating: finishes its flows.
    Terminating,
    Unused,
}

fn endpoint_state(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> EndpointState {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        EndpointState::Ready
    } else if serving && terminating {
        EndpointState::Terminating
    } else {
        EndpointState::Unused
    }
}

fn backend(
    address: &str,
    port: u16,
    protocol: Protocol,
    slice_name: &str,
    skipped: &mut Vec<Skipped>,
) -> Option<L4Addr> {
    match parse_ipv4(address, "endpoint address") {
        // What the API server itself refuses as an endpoint (and a hostile object
        // could point a Service at): loopback, link-local (cloud metadata), multicast.
        Ok(ip)
            if ip.is_loopback()
                || ip.is_link_local()
                || ip.is_multicast()
                || ip.is_unspecified()
                || ip.is_broadcast() =>
        {
            skipped.push(Skipped {
                object: slice_name.to_string(),
                reason: format!("endpoint address {ip} is loopback, link-local or multicast"),
            });
            None
        }
        Ok(ip) => Some(L4Addr { ip, port, protocol }),
        Err(reason) => {
            skipped.push(Skipped {
                object: slice_name.to_string(),
                reason,
            });
            None
        }
    }
}

/// Label marking an EndpointSlice compacted by [`compact_slice`].
pub const COMPACTED_LABEL: &str = "ferrite.dev/compacted";

fn is_compacted(slice: &EndpointSlice) -> bool {
    slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.get(COMPACTED_LABEL).is_some_and(|v| v == "true"))
}

/// Shrink an EndpointSlice to what the model reads, for the watch cache: the first
/// addresses of the endpoints alike for the model (same state, same node),
/// comma-separated, become the one address of one endpoint per such group (one
/// 352-byte `Endpoint` and one string instead of one of each per pod); other
/// endpoint fields go. The model reads the result exactly as the original.
pub fn compact_slice(slice: &mut EndpointSlice) {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    if is_compacted(slice) {
        return;
    }
    let mut groups: BTreeMap<(bool, Option<String>), Vec<String>> = BTreeMap::new();
    for endpoint in slice.endpoints.iter().flatten() {
        let state = endpoint_state(endpoint);
        if state == EndpointState::Unused {
            continue;
        }
        let Some(first) = endpoint.addresses.first() else {
            return; // keep it as is: the model reports such endpoints
        };
        if first.contains(',') {
            return;
        }
        groups
            .entry((state == EndpointState::Ready, endpoint.node_name.clone()))
            .or_default()
            .push(first.clone());
    }
    let endpoints: Vec<Endpoint> = groups
        .into_iter()
        .map(|((ready, node_name), addresses)| Endpoint {
            addresses: vec![addresses.join(",")],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(true),
                terminating: Some(!ready),
            }),
            node_name,
            ..Default::default()
        })
        .collect();
    slice.endpoints = (!endpoints.is_empty()).then_some(endpoints);
    slice
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(COMPACTED_LABEL.into(), "true".into());
}

fn local_pod(pod: &Pod, node: &str) -> Result<Option<LocalPod>, String> {
    let spec = pod.spec.as_ref().ok_or("spec is missing")?;
    if spec.node_name.as_deref() != Some(node) {
        return Ok(None);
    }
    if spec.host_network == Some(true) {
        return Ok(None); // uses the node's network: nothing to wire
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let name = pod
        .metadata
        .name
        .clone()
        .ok_or("metadata.name is missing")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) else {
        return Ok(None); // not wired yet
    };
    let ip = parse_ipv4(ip, "status.podIP")?;
    Ok(Some(LocalPod {
        interface: pod_interface_name(&namespace, &name),
        namespace,
        name,
        ip,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects_yaml::parse_objects;

    const NODE: &str = "node-a";

    /// Limits that let every externalIP through (the default allows none).
    fn open_limits() -> Limits {
        Limits {
            external_ip_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            ..Limits::default()
        }
    }

    fn build_yaml(yaml: &str) -> (DesiredState, Vec<Skipped>) {
        let (objects, mut skipped) = parse_objects(yaml).unwrap();
        let (state, more) = build(&objects, NODE, &open_limits());
        skipped.extend(more);
        (state, skipped)
    }

    #[test]
    fn compacted_slices_mean_exactly_what_the_originals_mean() {
        let yaml = format!(
            "{WEB}---\n{}",
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.1, 10.244.9.9]
  conditions: {ready: true}
- addresses: [not-an-ip]
- addresses: [10.244.1.2]
  conditions: {ready: false}
"#
        );
        let (objects, _) = parse_objects(&yaml).unwrap();
        let original = build(&objects, NODE, &open_limits());
        let mut compacted = objects.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
            assert!(slice.endpoints.iter().flatten().count() <= 1);
        }
        assert_eq!(build(&compacted, NODE, &open_limits()), original);
        // Compacting twice changes nothing.
        let again = compacted.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
        }
        assert_eq!(
            build(&again, NODE, &open_limits()),
            build(&compacted, NODE, &open_limits())
        );
    }

    const SHOP_NODE: &str = "apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.1}]}
";

    /// A LoadBalancer `shop/lb` with `spec_extra` (flow-style entries), one ready
    /// endpoint here, one ready on node-b, one terminating here.
    fn load_balancer(spec_extra: &str) -> String {
        format!(
            "{SHOP_NODE}---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: shop}}
spec: {{type: LoadBalancer, clusterIP: 10.96.0.5, externalIPs: [192.0.2.200], ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]{spec_extra}}}
status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.100}}, {{hostname: lb.example}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.244.0.11], nodeName: node-a}}
- {{addresses: [10.244.1.11], nodeName: node-b, conditions: {{ready: true}}}}
- {{addresses: [10.244.0.12], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.244.0.13], nodeName: node-a, conditions: {{ready: false, serving: false, terminating: true}}}}
"
        )
    }

    fn tcp(s: &str, port: u16) -> L4Addr {
        addr(s, port, Protocol::Tcp)
    }

    #[test]
    fn a_load_balancer_has_clusterip_nodeport_ingress_and_external_ip_frontends() {
        let (state, skipped) = build_yaml(&load_balancer(
            ", externalTrafficPolicy: Local, healthCheckNodePort: 32000, sessionAffinity: ClientIP, loadBalancerSourceRanges: [203.0.113.0/24, \"2001:db8::/32\"]",
        ));
        assert!(skipped.is_empty(), "{skipped:?}");
        let all = vec![tcp("10.244.0.11", 8080), tcp("10.244.1.11", 8080)];
        let local = vec![tcp("10.244.0.11", 8080)];
        let terminating = vec![tcp("10.244.0.12", 8080)];
        let expect = |frontend: L4Addr, kind, backends: &Vec<L4Addr>, ranges: &[&str]| {
            let f = &state.services[&frontend];
            assert_eq!(f.kind, kind, "{frontend}");
            assert_eq!(&f.backends, backends, "{frontend}");
            assert_eq!(f.terminating, terminating, "{frontend}");
            assert_eq!(f.local_only, kind.is_external(), "{frontend}");
            assert_eq!(f.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
            let ranges: Vec<Ipv4Net> = ranges.iter().map(|r| r.parse().unwrap()).collect();
            assert_eq!(f.source_ranges, ranges, "{frontend}");
        };
        expect(tcp("10.96.0.5", 80), FrontendKind::ClusterIp, &all, &[]);
        expect(
            tcp("198.51.100.1", 30080),
            FrontendKind::NodePort,
            &local,
            &[],
        );
        expect(
            tcp("192.0.2.100", 80),
            FrontendKind::LoadBalancer,
            &local,
            &["203.0.113.0/24"],
        );
        expect(
            tcp("192.0.2.200", 80),
            FrontendKind::ExternalIp,
            &local,
            &[],
        );
        assert_eq!(state.services.len(), 4);
        assert_eq!(
            state.health_checks[&32000],
            HealthCheck {
                service: ("shop".into(), "lb".into()),
                local_endpoints: 1
            }
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints_for_the_cluster_ip() {
        let (state, _) = build_yaml(&load_balancer(", internalTrafficPolicy: Local"));
        let cluster_ip = &state.services[&tcp("10.96.0.5", 80)];
        assert_eq!(cluster_ip.backends, vec![tcp("10.244.0.11", 8080)]);
        assert!(cluster_ip.local_only);
        // External frontends keep every endpoint (externalTrafficPolicy: Cluster).
        let node_port = &state.services[&tcp("198.51.100.1", 30080)];
        assert_eq!(node_port.backends.len(), 2);
        assert!(!node_port.local_only);
        assert!(state.health_checks.is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let yaml = load_balancer("").replace(
            "- {addresses: [10.244.0.11], nodeName: node-a}\n- {addresses: [10.244.1.11], nodeName: node-b, conditions: {ready: true}}\n",
            "",
        );
        let (state, _) = build_yaml(&yaml);
        let f = &state.services[&tcp("10.96.0.5", 80)];
        assert_eq!(f.backends, vec![tcp("10.244.0.12", 8080)]);
        assert!(f.terminating.is_empty());
    }

    #[test]
    fn bad_affinity_and_source_ranges_skip_the_service_with_a_reason() {
        for (extra, reason) in [
            (
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
                "timeoutSeconds 0",
            ),
            (", sessionAffinity: Sticky", "unknown sessionAffinity"),
            (", loadBalancerSourceRanges: [everyone]", "not an IPv4 CIDR"),
        ] {
            let (state, skipped) = build_yaml(&load_balancer(extra));
            assert!(state.services.is_empty(), "{extra}");
            assert!(
                skipped.iter().any(|s| s.reason.contains(reason)),
                "{extra}: {skipped:?}"
            );
        }
    }

    #[test]
    fn compaction_keeps_node_names_and_terminating_endpoints() {
        let yaml = load_balancer(", externalTrafficPolicy: Local");
        let (objects, _) = parse_objects(&yaml).unwrap();
        let original = build(&objects, NODE, &open_limits());
        let mut compacted = objects.clone();
        for slice in &mut compacted.endpoint_slices {
            compact_slice(Arc::make_mut(slice));
            // Groups: ready on node-a, ready on node-b, terminating on node-a.
            assert_eq!(slice.endpoints.iter().flatten().count(), 3);
        }
        assert_eq!(build(&compacted, NODE, &open_limits()), original);
    }

    fn addr(s: &str, port: u16, protocol: Protocol) -> L4Addr {
        L4Addr {
            ip: s.parse().unwrap(),
            port,
            protocol,
        }
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
- addresses: [10.244.0.12]
- addresses: [10.244.0.13]
  conditions: {ready: false}
"#;

    fn svc(name: &str, spec: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n")
    }

    fn slice(name: &str, body: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: bad}}}}\n{body}\n"
        )
    }

    const GOOD_PORT: &str = "{clusterIP: 10.96.7.7, ports: [{port: 80}]}";

    /// Every hostile object is skipped with a reason naming it, and
    /// the example Service keeps working; nothing panics.
    #[test]
    fn thirty_hostile_objects_are_each_skipped_with_a_reason_and_the_rest_applies() {
        let long = "a".repeat(253);
        let many_ports: String = (1..=10_000)
            .map(|p| format!("{{name: p{p}, port: {p}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cases: Vec<(&str, String, &str)> = vec![
            ("no name", "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\nspec: {clusterIP: 10.96.7.1, ports: [{port: 80}]}\n".into(), "<unnamed>"),
            ("no spec", "apiVersion: v1\nkind: Service\nmetadata: {name: nospec}\n".into(), "nospec"),
            ("no clusterIP", svc("noip", "{ports: [{port: 80}]}"), "noip"),
            ("IPv6 clusterIP", svc("v6", "{clusterIP: 'fd00::1', ports: [{port: 80}]}"), "v6"),
            ("bad clusterIP", svc("badip", "{clusterIP: 999.1.1.1, ports: [{port: 80}]}"), "badip"),
            ("0.0.0.0 clusterIP", svc("zero", "{clusterIP: 0.0.0.0, ports: [{port: 80}]}"), "zero"),
            ("port 0", svc("port0", "{clusterIP: 10.96.7.2, ports: [{port: 0}]}"), "port0"),
            ("port 70000", svc("bigport", "{clusterIP: 10.96.7.3, ports: [{port: 70000}]}"), "bigport"),
            ("unknown protocol", svc("quic", "{clusterIP: 10.96.7.4, ports: [{port: 80, protocol: QUIC}]}"), "quic"),
            ("SCTP port", svc("sctp", "{clusterIP: 10.96.7.5, ports: [{port: 80, protocol: SCTP}, {name: b, port: 81}]}"), "SCTP"),
            ("negative targetPort", svc("negtarget", "{clusterIP: 10.96.7.6, ports: [{port: 80, targetPort: -1}]}"), "negtarget"),
            ("ExternalName", svc("extname", "{type: ExternalName, externalName: example.com}"), "extname"),
            ("unknown type", svc("weird", "{type: Weird, clusterIP: 10.96.7.8, ports: [{port: 80}]}"), "weird"),
            ("no ports", svc("noports", "{clusterIP: 10.96.7.9, ports: []}"), "noports"),
            ("10,000 ports", svc("manyports", &format!("{{clusterIP: 10.96.7.10, ports: [{many_ports}]}}")), "manyports"),
            ("253-char name", svc(&long, GOOD_PORT), "aaaaaaaaaa"),
            ("uppercase name", svc("Upper", GOOD_PORT), "Upper"),
            ("duplicate clusterIP:port", svc("copycat", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}"), "already used"),
            ("headless", svc("headless", "{clusterIP: None, ports: [{port: 80}]}"), "headless"),
            ("slice without label", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan, namespace: shop}\naddressType: IPv4\n".into(), "orphan"),
            ("IPv6 slice", slice("six", "addressType: IPv6\nendpoints: [{addresses: ['fd00::2']}]"), "six"),
            ("FQDN slice", slice("fqdn", "addressType: FQDN\nendpoints: [{addresses: [example.com]}]"), "fqdn"),
            ("IPv6 address in IPv4 slice", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("mixed", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: ['fd00::3']}]")), "mixed"),
            ("garbage address", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("garbage", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [not-an-address]}]")), "garbage"),
            ("endpoint without addresses", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("empty", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: []}]")), "empty"),
            ("loopback endpoint", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("loop", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [127.0.0.1]}]")), "loop"),
            ("cloud metadata endpoint", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("metadata", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [169.254.169.254]}]")), "metadata"),
            ("slice port 0", format!("{}---\n{}", svc("bad", GOOD_PORT), slice("sport", "addressType: IPv4\nports: [{port: 0}]\nendpoints: [{addresses: [10.244.3.3]}]")), "sport"),
            ("pod with garbage IP", "apiVersion: v1\nkind: Pod\nmetadata: {name: badpod, namespace: shop}\nspec: {nodeName: node-a, containers: []}\nstatus: {podIP: 10.244.0.300}\n".into(), "badpod"),
            ("pod with IPv6 IP", "apiVersion: v1\nkind: Pod\nmetadata: {name: v6pod, namespace: shop}\nspec: {nodeName: node-a, containers: []}\nstatus: {podIP: 'fd00::5'}\n".into(), "v6pod"),
            ("node without InternalIP", "apiVersion: v1\nkind: Node\nmetadata: {name: noaddr}\nspec: {podCIDR: 10.244.9.0/24}\n".into(), "noaddr"),
            ("node with garbage podCIDR", "apiVersion: v1\nkind: Node\nmetadata: {name: badcidr}\nspec: {podCIDR: 10.244.9.0/99}\nstatus: {addresses: [{type: InternalIP, address: 198.51.100.9}]}\n".into(), "badcidr"),
            ("node with a bad VTEP MAC", "apiVersion: v1\nkind: Node\nmetadata: {name: badmac, annotations: {ferrite.dev/vtep-mac: zz}}\nspec: {podCIDR: 10.244.8.0/24}\nstatus: {addresses: [{type: InternalIP, address: 198.51.100.8}]}\n".into(), "badmac"),
            ("unknown kind", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: deploy}\n".into(), "deploy"),
            ("not a mapping", "just a string\n".into(), ""),
            ("wrong field type", "apiVersion: v1\nkind: Service\nmetadata: {name: typed, namespace: shop}\nspec: {ports: 80}\n".into(), "typed"),
        ];
        assert!(cases.len() >= 30);
        for (what, yaml, marker) in &cases {
            let (state, skipped) = build_yaml(&format!("{WEB}---\n{yaml}"));
            assert!(
                skipped
                    .iter()
                    .any(|s| s.object.contains(marker) || s.reason.contains(marker)),
                "{what}: no reason naming {marker:?} in {skipped:?}"
            );
            let http = &state.services[&addr("10.96.0.10", 80, Protocol::Tcp)];
            assert_eq!(http.name, "shop/web:http", "{what}");
            assert_eq!(http.backends.len(), 2, "{what}");
        }
        // Legitimate if unusual: a 253-character Pod name and an endpoint outside
        // the cluster (a Service without selector pointing elsewhere) both apply.
        let (state, _) = build_yaml(&format!(
            "{}---\n{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {long}, namespace: shop}}\nspec: {{nodeName: node-a, containers: []}}\nstatus: {{podIP: 10.244.0.77}}\n",
            svc("bad", GOOD_PORT),
            slice("outside", "addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [203.0.113.5]}]")
        ));
        assert_eq!(
            state.pods[&"10.244.0.77".parse().unwrap()].interface.len(),
            15
        );
        assert_eq!(
            state.services[&addr("10.96.7.7", 80, Protocol::Tcp)].backends,
            vec![addr("203.0.113.5", 8080, Protocol::Tcp)]
        );
    }

    #[test]
    fn named_target_port_resolves_through_the_slice_and_not_ready_is_left_out() {
        let (state, skipped) = build_yaml(WEB);
        assert!(skipped.is_empty(), "{skipped:?}");
        let http = &state.services[&addr("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(http.name, "shop/web:http");
        assert_eq!(
            http.backends,
            vec![
                addr("10.244.0.11", 8080, Protocol::Tcp),
                addr("10.244.0.12", 8080, Protocol::Tcp)
            ]
        );
        let dns = &state.services[&addr("10.96.0.10", 53, Protocol::Udp)];
        assert_eq!(dns.backends.len(), 2);
        assert!(dns.backends.iter().all(|b| b.port == 5353));
    }

    #[test]
    fn numeric_target_port_applies_without_slice_ports() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {clusterIP: 10.96.0.20, ports: [{port: 443, targetPort: 8443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.5]}]
"#,
        );
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            state.services[&addr("10.96.0.20", 443, Protocol::Tcp)].backends,
            vec![addr("10.244.0.5", 8443, Protocol::Tcp)]
        );
    }

    #[test]
    fn headless_and_external_name_are_skipped_with_reasons() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
"#,
        );
        assert!(state.services.is_empty());
        assert_eq!(skipped.len(), 2);
        assert!(skipped[0].reason.contains("headless"), "{}", skipped[0]);
        assert!(skipped[1].reason.contains("ExternalName"), "{}", skipped[1]);
    }

    #[test]
    fn invalid_objects_are_skipped_and_the_rest_applies() {
        let yaml = format!(
            r#"{WEB}
---
apiVersion: v1
kind: Service
metadata: {{name: bad-ip}}
spec: {{clusterIP: 10.96.0.300, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: port-zero}}
spec: {{clusterIP: 10.96.0.31, ports: [{{port: 0}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: weird-proto}}
spec: {{clusterIP: 10.96.0.32, ports: [{{port: 80, protocol: QUIC}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: no-spec}}
---
apiVersion: v1
kind: Service
spec: {{clusterIP: 10.96.0.33, ports: [{{port: 80}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: v6}}
spec: {{clusterIP: "fd00::10", ports: [{{port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: v6-slice, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv6
endpoints: [{{addresses: ["fd00::1"]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: orphan}}
addressType: IPv4
endpoints: []
---
apiVersion: v1
kind: Service
metadata: [this is not a mapping]
---
kind: Gizmo
apiVersion: example.com/v1
metadata: {{name: g}}
"#
        );
        let (state, skipped) = build_yaml(&yaml);
        // web still applies in full.
        assert_eq!(state.services.len(), 2);
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        let expect = [
            "not an IPv4 address",
            "out of range",
            "unknown protocol \"QUIC\"",
            "spec is missing",
            "metadata.name is missing",
            "fd00::10",
            "IPv6 is not supported",
            "no kubernetes.io/service-name label",
            "Gizmo",
        ];
        for needle in expect {
            assert!(
                reasons.iter().any(|r| r.contains(needle)),
                "no reason mentions {needle:?}: {reasons:#?}"
            );
        }
        // The malformed metadata is reported too. (A document that is not YAML at all
        // refuses the whole file instead: see the source tests.)
        assert!(reasons.len() > expect.len(), "{reasons:#?}");
    }

    #[test]
    fn sctp_port_is_skipped_but_other_ports_apply() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec: {clusterIP: 10.96.0.40, ports: [{name: a, port: 80}, {name: b, port: 9, protocol: SCTP}]}
"#,
        );
        assert_eq!(state.services.len(), 1);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("SCTP"));
    }

    #[test]
    fn duplicate_frontend_keeps_the_first_service() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Service
metadata: {name: one}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: two}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
"#,
        );
        assert_eq!(
            state.services[&addr("10.96.0.50", 80, Protocol::Tcp)].name,
            "default/one:80"
        );
        assert!(skipped[0].reason.contains("already used by default/one:80"));
    }

    #[test]
    fn only_this_nodes_running_pods_with_an_ip_are_local() {
        let (state, skipped) = build_yaml(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere}
spec: {nodeName: node-b, containers: []}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: pending}
spec: {nodeName: node-a, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: done}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.0.12, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: bad}
spec: {nodeName: node-a, containers: []}
status: {podIP: 10.244.0.999}
"#,
        );
        assert_eq!(state.pods.len(), 1);
        let pod = &state.pods[&"10.244.0.11".parse().unwrap()];
        assert_eq!(pod.interface, pod_interface_name("shop", "a"));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
    }

    #[test]
    fn interface_names_are_stable_and_fit_ifnamsiz() {
        let name = pod_interface_name("shop", "web-0");
        assert_eq!(name.len(), 15);
        assert!(name.starts_with("fer"));
        assert_eq!(name, pod_interface_name("shop", "web-0"));
        assert_ne!(name, pod_interface_name("shop", "web-1"));
        assert_eq!(pod_attachment_interface_name("shop", "web-0", "eth0"), name);
        let second = pod_attachment_interface_name("shop", "web-0", "net1");
        assert_eq!(second.len(), 15);
        assert!(second.starts_with("fer"));
        assert_ne!(second, name);
    }

    const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.0.0/24, podCIDRs: [10.244.0.0/24, "fd00:10:244::/64"]}
status: {addresses: [{type: Hostname, address: node-a}, {type: InternalIP, address: 198.51.100.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, annotations: {ferrite.dev/vtep-mac: "02:00:00:00:00:0b"}}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: no-ip}
spec: {podCIDR: 10.244.2.0/24}
---
apiVersion: v1
kind: Node
metadata: {name: thief}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.9}]}
---
apiVersion: v1
kind: Node
metadata: {name: bad-cidr}
spec: {podCIDR: 10.244.300.0/24}
status: {addresses: [{type: InternalIP, address: 198.51.100.8}]}
"#;

    #[test]
    fn nodes_give_their_ipv4_pod_cidrs_ip_and_vtep_mac() {
        let (state, skipped) = build_yaml(NODES);
        let a = &state.nodes["node-a"];
        assert_eq!(a.ip, "198.51.100.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(a.pod_cidrs, vec!["10.244.0.0/24".parse().unwrap()]);
        assert_eq!(a.vtep_mac, ferrite_common::vtep_mac_for(a.ip));
        assert_eq!(state.nodes["node-b"].vtep_mac, [2, 0, 0, 0, 0, 0x0b]);
        // A CIDR claimed twice stays with its first owner.
        assert!(state.nodes["thief"].pod_cidrs.is_empty());
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        for needle in [
            "no IPv4 InternalIP",
            "overlaps 10.244.1.0/24, node node-b's",
            "not an IPv4 CIDR",
        ] {
            assert!(
                reasons.iter().any(|r| r.contains(needle)),
                "{needle}: {reasons:#?}"
            );
        }
    }
}
