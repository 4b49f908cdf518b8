//! The baseline the overlay bench compares with: the same two-node pod network wired
//! the way flannel's vxlan backend does it - a Linux bridge `cni0` per node, a kernel
//! vxlan device `flannel.1` (no learning) with per-node routes, permanent neighbour
//! entries and FDB entries for the remote VTEP, and no BPF; or its host-gw backend
//! (native routing's baseline): the bridge, and a route per other node's pod CIDR
//! via that node's address on the shared link. The vxlan wiring can be dual-stack:
//! IPv6 pod CIDRs on the same bridges, routed through the same IPv4 `flannel.1` to
//! the other node's VTEP (IPv6 inside IPv4 VXLAN, as Ferrite's lab does it).
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::lab::{node_ip, sh, unique, Netns, Pod, Underlay};

pub struct FlannelCluster {
    /// One pod per node: `pods[n]` lives on node `n`.
    pub pods: Vec<Pod>,
    pub nodes: Vec<Netns>,
    pub underlay: Underlay,
}

fn ip(ns: &str, args: &str) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend(args.split_whitespace());
    sh("ip", &full).map(drop)
}

fn vtep_mac(node: usize) -> String {
    format!("02:fa:00:00:00:{:02x}", node + 1)
}

/// Node `node`'s IPv6 pod CIDR, its first address (on `flannel.1`, flannel's ".0"),
/// the bridge's (the pods' gateway) and its pod's.
fn pod_cidr6(node: usize) -> String {
    format!("fd00:10:245:{node:x}::/64")
}

fn vtep_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x245, node as u16, 0, 0, 0, 0)
}

fn gateway6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x245, node as u16, 0, 0, 0, 1)
}

pub fn pod_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x245, node as u16, 0, 0, 0, 2)
}

impl FlannelCluster {
    /// flannel's vxlan backend.
    pub fn new(nodes: usize, pod_mtu: u32) -> Result<Self> {
        Self::build(nodes, pod_mtu, false, false)
    }

    /// flannel's vxlan backend, dual-stack: each pod also has [`pod_ip6`], its node's
    /// IPv6 pod CIDR fd00:10:245:<node>::/64 on `cni0` and the other nodes' routed
    /// through `flannel.1` (a permanent neighbour per VTEP, as for IPv4).
    pub fn dual_stack(nodes: usize, pod_mtu: u32) -> Result<Self> {
        Self::build(nodes, pod_mtu, false, true)
    }

    /// flannel's host-gw backend: no encapsulation, pods at the uplink's MTU.
    pub fn host_gw(nodes: usize) -> Result<Self> {
        Self::build(nodes, 1500, true, false)
    }

    fn build(nodes: usize, pod_mtu: u32, host_gw: bool, ipv6: bool) -> Result<Self> {
        let underlay = Underlay::new()?;
        let mut node_ns = Vec::new();
        let mut pods = Vec::new();
        for n in 0..nodes {
            let netns = Netns::new(&unique(&format!("fl{n}")))?;
            underlay.plug(&netns, node_ip(n))?;
            let ns = netns.name.as_str();
            netns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))??;
            // flannel's --ip-masq rule (kube-flannel enables it by default).
            let masquerade = "add table ip flannel\n\
                add chain ip flannel postrouting { type nat hook postrouting priority srcnat; }\n\
                add rule ip flannel postrouting ip saddr 10.245.0.0/16 ip daddr != 10.245.0.0/16 masquerade\n";
            netns.run_with_input(&["nft", "-f", "-"], masquerade)?;
            ip(ns, "link add cni0 type bridge")?;
            ip(ns, &format!("addr add 10.245.{n}.1/24 dev cni0"))?;
            if ipv6 {
                netns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1"))??;
                let masquerade = "add table ip6 flannel\n\
                    add chain ip6 flannel postrouting { type nat hook postrouting priority srcnat; }\n\
                    add rule ip6 flannel postrouting ip6 saddr fd00:10:245::/48 ip6 daddr != fd00:10:245::/48 masquerade\n";
                netns.run_with_input(&["nft", "-f", "-"], masquerade)?;
                ip(
                    ns,
                    &format!("-6 addr add {}/64 dev cni0 nodad", gateway6(n)),
                )?;
            }
            ip(ns, "link set cni0 up")?;
            if !host_gw {
                let local = node_ip(n);
                ip(ns, &format!("link add flannel.1 type vxlan id 1 dstport 4789 local {local} dev ul0 nolearning"))?;
                ip(
                    ns,
                    &format!("link set flannel.1 address {} up", vtep_mac(n)),
                )?;
                ip(ns, &format!("addr add 10.245.{n}.0/32 dev flannel.1"))?;
                if ipv6 {
                    ip(
                        ns,
                        &format!("-6 addr add {}/128 dev flannel.1 nodad", vtep_ip6(n)),
                    )?;
                }
            }

            let pod_ns = Netns::new(&format!("{ns}-pod"))?;
            let pod_ip = Ipv4Addr::new(10, 245, n as u8, 2);
            ip(
                ns,
                &format!(
                    "link add vethpod type veth peer name eth0 netns {}",
                    pod_ns.name
                ),
            )?;
            ip(
                ns,
                &format!("link set vethpod master cni0 mtu {pod_mtu} up"),
            )?;
            ip(&pod_ns.name, &format!("link set eth0 mtu {pod_mtu} up"))?;
            ip(&pod_ns.name, &format!("addr add {pod_ip}/24 dev eth0"))?;
            ip(&pod_ns.name, &format!("route add default via 10.245.{n}.1"))?;
            if ipv6 {
                let pod = &pod_ns.name;
                ip(
                    pod,
                    &format!("-6 addr add {}/64 dev eth0 nodad", pod_ip6(n)),
                )?;
                ip(pod, &format!("-6 route add default via {}", gateway6(n)))?;
            }
            pods.push(Pod {
                name: format!("flannel-pod-{n}"),
                namespace: "default".into(),
                ip: pod_ip,
                ip6: ipv6.then(|| pod_ip6(n)),
                host_interface: "vethpod".into(),
                netns: pod_ns,
                cgroup: None,
            });
            node_ns.push(netns);
        }
        // What flanneld writes for every other node.
        for (n, netns) in node_ns.iter().enumerate() {
            for m in (0..nodes).filter(|m| *m != n) {
                let ns = netns.name.as_str();
                if host_gw {
                    ip(
                        ns,
                        &format!("route add 10.245.{m}.0/24 via {} dev ul0", node_ip(m)),
                    )?;
                    continue;
                }
                ip(
                    ns,
                    &format!("route add 10.245.{m}.0/24 via 10.245.{m}.0 dev flannel.1 onlink"),
                )?;
                ip(
                    ns,
                    &format!(
                        "neigh add 10.245.{m}.0 lladdr {} dev flannel.1 nud permanent",
                        vtep_mac(m)
                    ),
                )?;
                if ipv6 {
                    let (cidr, vtep) = (pod_cidr6(m), vtep_ip6(m));
                    ip(
                        ns,
                        &format!("-6 route add {cidr} via {vtep} dev flannel.1 onlink"),
                    )?;
                    ip(
                        ns,
                        &format!(
                            "-6 neigh add {vtep} lladdr {} dev flannel.1 nud permanent",
                            vtep_mac(m)
                        ),
                    )?;
                }
                sh(
                    "bridge",
                    &[
                        "-n",
                        ns,
                        "fdb",
                        "append",
                        &vtep_mac(m),
                        "dev",
                        "flannel.1",
                        "dst",
                        &node_ip(m).to_string(),
                    ],
                )?;
            }
        }
        Ok(Self {
            pods,
            nodes: node_ns,
            underlay,
        })
    }
}
