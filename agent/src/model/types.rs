//! The model's types: what the datapath needs of Services, pods and nodes, and what
//! was left out.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use ferrite_common::{PROTO_TCP, PROTO_UDP};

use super::objects::{EndpointSlice, Service};
use crate::family::Family;

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

/// An address:port/protocol: a Service frontend or a backend, of either family
/// (IPv4 unless named).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L4Addr<A = Ipv4Addr> {
    pub ip: A,
    pub port: u16,
    pub protocol: Protocol,
}

/// An IPv6 frontend or backend.
pub type L4Addr6 = L4Addr<Ipv6Addr>;

/// Shown as `10.96.0.10:80/TCP`, `[fd00::10]:80/TCP`.
impl<A: Family> fmt::Display for L4Addr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let socket = SocketAddr::new(self.ip.into(), self.port);
        write!(f, "{socket}/{}", self.protocol)
    }
}

/// A Service by namespace and name; shown as `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    /// The Service `name` in the namespace of the object `meta` describes: the
    /// Service itself, or an EndpointSlice of it.
    pub fn in_namespace_of(meta: &ObjectMeta, name: &str) -> Self {
        Self {
            namespace: namespace_of(meta).to_string(),
            name: name.to_string(),
        }
    }
}

/// The Service `service` is (its namespace and name), if it has a name.
pub fn service_ref_of(service: &Service) -> Option<ServiceRef> {
    let meta = &service.metadata;
    Some(ServiceRef::in_namespace_of(meta, meta.name.as_deref()?))
}

/// Sort Services oldest first (by `creationTimestamp`, then namespace and name): the
/// Kubernetes source's order, so that of two Services claiming one frontend the one
/// that had it keeps it, on every sync and in every agent.
pub fn oldest_first(services: &mut [Arc<Service>]) {
    services.sort_by_cached_key(|service| {
        let meta = &service.metadata;
        (
            meta.creation_timestamp.clone(),
            namespace_of(meta).to_string(),
            meta.name.clone(),
        )
    });
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The namespace of an object: unset means `default`, as the API server fills it in
/// (objects from the YAML file often leave it out).
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
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
    /// A `hostPort` of a pod of this node, on this node's NodePort addresses (or its
    /// `hostIP`): one backend, the pod at its `containerPort`.
    HostPort,
}

impl FrontendKind {
    /// Reached from outside the cluster: the XDP program and Maglev handle it.
    pub fn is_external(self) -> bool {
        self != Self::ClusterIp
    }

    /// How `inspect` and logs show a frontend of this kind, after its name.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::ClusterIp => "",
            Self::NodePort => " (NodePort)",
            Self::LoadBalancer => " (LoadBalancer)",
            Self::ExternalIp => " (externalIP)",
            Self::HostPort => " (hostPort)",
        }
    }
}

/// One Service port on one address, as the datapath sees it (IPv4 unless named).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFrontend<A: Family = Ipv4Addr> {
    /// The Service this port belongs to.
    pub service: ServiceRef,
    /// `namespace/name:port-name` for logs and inspect.
    pub name: String,
    /// Backends for new flows, sorted and deduplicated (so the model is deterministic).
    pub backends: Vec<L4Addr<A>>,
    /// Serving but terminating backends that take no new flows: kept in the maps so
    /// their established flows finish.
    pub terminating: Vec<L4Addr<A>>,
    pub kind: FrontendKind,
    /// Traffic policy `Local`: `backends` are this node's only.
    pub local_only: bool,
    /// An external frontend of `externalTrafficPolicy: Local`: the backends its
    /// in-cluster clients (pods, the node's processes) use instead, every ready
    /// endpoint as kube-proxy gives them; `None` elsewhere.
    pub in_cluster: Option<InClusterBackends<A>>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without affinity.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` of the family (LoadBalancer frontends only);
    /// empty = everyone.
    pub source_ranges: Vec<A::Net>,
}

/// An IPv6 frontend (written to the lb6 maps, `ferrite_lb6_*`).
pub type ServiceFrontend6 = ServiceFrontend<Ipv6Addr>;

impl<A: Family> Default for ServiceFrontend<A> {
    fn default() -> Self {
        Self {
            service: ServiceRef::default(),
            name: String::new(),
            backends: Vec::new(),
            terminating: Vec::new(),
            kind: FrontendKind::default(),
            local_only: false,
            in_cluster: None,
            affinity_timeout_s: 0,
            source_ranges: Vec::new(),
        }
    }
}

/// What in-cluster clients of an `externalTrafficPolicy: Local` frontend use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InClusterBackends<A = Ipv4Addr> {
    /// Backends for new flows (the `Cluster` policy's).
    pub backends: Vec<L4Addr<A>>,
    /// Kept for established flows only, as [`ServiceFrontend::terminating`].
    pub terminating: Vec<L4Addr<A>>,
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
    /// Its IPv6 address (`status.podIPs` of a dual-stack pod): the same veth.
    pub ip6: Option<Ipv6Addr>,
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
    /// Its IPv6 InternalIP (dual-stack), once accepted: this node's IPv6 NodePorts.
    pub ip6: Option<Ipv6Addr>,
    /// Its accepted IPv6 pod CIDR (dual-stack: at most one). Not in the datapath
    /// yet; the agent publishes this node's for the CNI plugin.
    pub pod_cidrs6: Vec<Ipv6Net>,
    pub vtep_mac: [u8; 6],
    /// Its `topology.kubernetes.io/zone` label (topology-aware routing).
    pub zone: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<L4Addr, ServiceFrontend>,
    /// The IPv6 frontends of Services with an IPv6 clusterIP (the IPv6 half of a
    /// dual-stack one), written to the lb6 maps.
    pub services6: BTreeMap<L4Addr6, ServiceFrontend6>,
    /// Health-check ports this node serves, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Services that claim a frontend or health-check port another Service claims
    /// too (an update of one of them is done as a full sync).
    pub contenders: BTreeSet<ServiceRef>,
    pub pods: BTreeMap<Ipv4Addr, LocalPod>,
    /// Pods claiming an address an earlier-listed pod has in `pods` (skipped as
    /// [`super::SkipReason::PodIpTaken`]): the plan gives the address to the one
    /// whose host veth holds its live endpoint entry.
    pub pod_rivals: Vec<LocalPod>,
    /// This node's pods refused as a whole (`namespace`, `name`): a change of one can
    /// hand its addresses' rivals what it claimed, so it is a full sync's.
    pub refused_pods: BTreeSet<(String, String)>,
    /// Every node with an InternalIP, this one included, by name.
    pub nodes: BTreeMap<String, ClusterNode>,
    /// NetworkPolicy: every address's identity and what this node's policed pods
    /// allow.
    pub policy: super::policy::PolicyModel,
}

/// The Kubernetes objects the model is built from. Shared (`Arc`), so a snapshot of
/// the watch caches costs no deep copy. Of two Services claiming one frontend, the
/// one listed first has it: the file source lists them in file order, the
/// Kubernetes source oldest first.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Every node's pods (policies select pods anywhere); only this node's are wired.
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
    pub network_policies: Vec<Arc<NetworkPolicy>>,
    pub namespaces: Vec<Arc<Namespace>>,
}
