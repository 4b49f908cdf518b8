//! A lab of network namespaces: a "node" is a netns with its own agent and pin
//! directory; a "pod" is a netns wired to its node with a veth pair exactly as the
//! CNI plugin does it (eth0 with a /32, default route via 169.254.1.1 with a permanent
//! neighbour entry, no bridge). Nothing here touches the root namespace's network:
//! all traffic stays between namespaces the lab made. Every object removes what it
//! created when dropped, so a failing test leaves nothing behind.
mod basics;
mod cluster;
mod commands;
mod isolation;
mod node;
mod pod;
mod probe;
mod traffic;
mod underlay;

pub use basics::{require_root, sh, unique, wait_until, SETTLE};
pub use cluster::{Cluster, ObjectSource, ObjectStore, Routing};
pub use isolation::{Cgroup, Netns};
pub use node::{bpf_object, ferrite_bin, Agent, Node};
pub use pod::Pod;
pub use probe::{probe_bin, HeldConnection, PingPong, Probe, ProbeOutcome};
pub use traffic::{
    answered_by, bulk_transfer, bulk_transfer_to, connection_loop, exchange, http_get,
    parse_answer, tcp_from_port, udp_ask, Server,
};
pub use underlay::{
    node_ip, node_ip6, node_yaml, node_yaml_dual_stack, pod_cidr6, pod_ip, pod_ip6, Underlay,
    CLUSTER_CIDR, CLUSTER_CIDR6, SERVICE_CIDR, SERVICE_CIDR6, UNDERLAY_PREFIX, UNDERLAY_PREFIX6,
    WORLD_GATEWAY, WORLD_GATEWAY6, WORLD_IP, WORLD_IP6,
};
