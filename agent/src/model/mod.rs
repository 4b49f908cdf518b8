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
//! - a `hostPort` of this node's pod is a frontend on the node's NodePort addresses
//!   (or its `hostIP`) with the pod as its one backend; Services keep contested ports;
//! - a Service has these frontends for each IP family it has a clusterIP of
//!   (`clusterIPs`, `ipFamilies` and `ipFamilyPolicy` checked as the API server
//!   checks them), each with backends from that family's EndpointSlices
//!   (`addressType` IPv4 or IPv6) only; the IPv6 ones go to the lb6 maps (no
//!   Maglev tables or source ranges: no IPv6 path for clients from outside yet);
//! - headless and ExternalName Services have no frontend and are skipped;
//! - an invalid object is skipped with a reason; everything else still applies.
mod build;
mod context;
mod endpoints;
mod fields;
mod frontend_index;
pub use frontend_index::FrontendIndex;
mod frontends;
mod host_ports;
pub use host_ports::has_host_ports;
mod ip_families;
mod nodes;
pub mod objects;
mod pods;
pub mod policy;
mod selector;
mod service;
mod skipped;
#[cfg(test)]
mod test_support;
mod types;

pub use build::{build, build_services, build_with_policy_index, ServicesModel};
pub use context::NodeContext;
pub use endpoints::{compact_slice, slice_service, COMPACTED_LABEL, SERVICE_NAME_LABEL};
pub use nodes::VTEP_MAC_ANNOTATION;
pub use pods::{local_pod, pod_attachment_interface_name, pod_interface_name, slim_pod};
pub use service::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_SERVICE_PORTS};
pub use skipped::{SkipReason, Skipped};
pub use types::*;
