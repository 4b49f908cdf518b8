//! The baseline the overlay bench compares with: the same two-node pod network wired
//! the way flannel's vxlan backend does it - a Linux bridge `cni0` per node, a kernel
//! vxlan device `flannel.1` (no learning) with per-node routes, permanent neighbour
//! entries and FDB entries for the remote VTEP, and no BPF; or its host-gw backend
//! (native routing's baseline): the bridge, and a route per other node's pod CIDR
//! via that node's address on the shared link.
use std::net::Ipv4Addr;

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

impl FlannelCluster {
    /// flannel's vxlan backend.
    pub fn new(nodes: usize, pod_mtu: u32) -> Result<Self> {
        Self::build(nodes, pod_mtu, false)
    }

    /// flannel's host-gw backend: no encapsulation, pods at the uplink's MTU.
    pub fn host_gw(nodes: usize) -> Result<Self> {
        Self::build(nodes, 1500, true)
    }

    fn build(nodes: usize, pod_mtu: u32, host_gw: bool) -> Result<Self> {
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
            ip(ns, "link set cni0 up")?;
            if !host_gw {
                let local = node_ip(n);
                ip(ns, &format!("link add flannel.1 type vxlan id 1 dstport 4789 local {local} dev ul0 nolearning"))?;
                ip(
                    ns,
                    &format!("link set flannel.1 address {} up", vtep_mac(n)),
                )?;
                ip(ns, &format!("addr add 10.245.{n}.0/32 dev flannel.1"))?;
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
            pods.push(Pod {
                name: format!("flannel-pod-{n}"),
                namespace: "default".into(),
                ip: pod_ip,
                ip6: None,
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
