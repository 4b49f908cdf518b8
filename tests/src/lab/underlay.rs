//! The node network and the lab's address plan.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::Result;

use super::{basics::run_ip, require_root, sh, unique, Netns};

/// The node network: a bridge in a namespace of its own; nodes, the world and
/// non-Ferrite hosts plug into it with a veth called `ul0`.
pub struct Underlay {
    pub netns: Netns,
    ports: AtomicUsize,
}

pub const UNDERLAY_PREFIX: &str = "198.51.100";
/// A host "outside the cluster", reached through the node's default route.
pub const WORLD_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const WORLD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// A dual-stack lab's IPv6 side (`Cluster::dual_stack`): the node network, the
/// world's gateway on it and the world host, and the cluster's IPv6 pod CIDR.
pub const UNDERLAY_PREFIX6: &str = "fd00:ffff::";
pub const WORLD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, 0xc8);
pub const WORLD_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/56";
/// The lab's Service CIDR (Kubernetes' default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The IPv6 Service CIDR of a dual-stack lab (the widest kube-apiserver takes).
pub const SERVICE_CIDR6: &str = "fd00:10:96::/108";

impl Underlay {
    pub fn new() -> Result<Self> {
        Self::named(&unique("ul"))
    }

    pub fn named(name: &str) -> Result<Self> {
        require_root()?;
        let netns = Netns::new(name)?;
        run_ip(&["-n", &netns.name, "link", "add", "br0", "type", "bridge"])?;
        run_ip(&["-n", &netns.name, "link", "set", "br0", "up"])?;
        Ok(Self {
            netns,
            ports: AtomicUsize::new(0),
        })
    }

    /// Plug `netns` in as `ul0` with `address`/24.
    pub fn plug(&self, netns: &Netns, address: Ipv4Addr) -> Result<()> {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        let ul = self.netns.name.as_str();
        run_ip(&[
            "-n",
            ul,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            &netns.name,
        ])?;
        run_ip(&["-n", ul, "link", "set", &port, "master", "br0", "up"])?;
        run_ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "ul0",
        ])?;
        run_ip(&["-n", &netns.name, "link", "set", "ul0", "up"])
    }

    /// Give `netns`'s `ul0` the IPv6 `address`/64 too (no duplicate address detection:
    /// the lab's addresses are unique and usable at once).
    pub fn plug6(netns: &Netns, address: Ipv6Addr) -> Result<()> {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &netns.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.ul0.disable_ipv6=0",
            ],
        )?;
        run_ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{address}/64"),
            "dev",
            "ul0",
            "nodad",
        ])
    }
}

/// Node `index`'s underlay address and pod CIDR (10.244.<index>.0/24).
pub fn node_ip(index: usize) -> Ipv4Addr {
    format!("{UNDERLAY_PREFIX}.{}", index + 1).parse().unwrap()
}

pub fn pod_ip(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8, pod as u8 + 2)
}

/// Node `index`'s IPv6 underlay address and IPv6 pod CIDR (fd00:10:244:<index>::/64)
/// in a dual-stack lab.
pub fn node_ip6(index: usize) -> Ipv6Addr {
    format!("{UNDERLAY_PREFIX6}{:x}", index + 1)
        .parse()
        .unwrap()
}

pub fn pod_cidr6(node: usize) -> String {
    format!("fd00:10:244:{node:x}::/64")
}

pub fn pod_ip6(node: usize, pod: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, pod as u16 + 2)
}

/// The v1 Node object of a dual-stack node: a pod CIDR and an InternalIP per family.
pub fn node_yaml_dual_stack(name: &str, ips: (Ipv4Addr, Ipv6Addr), cidrs: (&str, &str)) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {}, podCIDRs: [{}, \"{}\"]}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}, {{type: InternalIP, address: \"{}\"}}]}}\n",
        cidrs.0, cidrs.0, cidrs.1, ips.0, ips.1
    )
}

/// The v1 Node object of a node.
pub fn node_yaml(name: &str, ip: Ipv4Addr, pod_cidr: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {pod_cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}
