//! How a pod is wired to its node, the way the datapath expects it (used by the CNI
//! plugin, and by the tests' static pods): a veth pair, host end `fer…` with MAC
//! ee:ee:ee:ee:ee:ee in the node's namespace, pod end in the pod's namespace with
//! MAC `0a:58:<ip>`, the pod IP as a /32, `default via 169.254.1.1 onlink` and a
//! permanent neighbour entry for that gateway. An IPv4-only pod has IPv6 disabled
//! on its interface (no router solicitations into the datapath). A dual-stack pod
//! has its IPv6 address as a /128 too, `default via fe80::ecee:eeff:feee:eeee dev
//! eth0` and a permanent neighbour entry for that gateway ([`POD_GATEWAY_IP6`]),
//! duplicate address detection off: no neighbour discovery to the node.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ferrite_common::{pod_mac_for, HOST_VETH_MAC, POD_GATEWAY_IP};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{interfaces, netns::in_netns};
use crate::netlink::{
    mac_string, Address, Address6, Neighbour, Neighbour6, Netlink, Route, Route6, RouteScope, Veth,
};

/// A dual-stack pod's IPv6 gateway: the link-local address the host veth's MAC
/// (ee:ee:ee:ee:ee:ee) makes by EUI-64, as Calico's pods use. It is the host veth's
/// own address once IPv6 is up on it, so what the pod sends it (a ping, an NDP
/// probe should the entry ever go) is the node's to answer, and every pod's is the
/// same (a link-local address names nothing beyond its link).
pub const POD_GATEWAY_IP6: Ipv6Addr =
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// A pod interface to create or remove.
#[derive(Clone, Debug)]
pub struct PodInterface {
    /// The pod's network namespace (a path, e.g. /var/run/netns/NAME).
    pub netns: PathBuf,
    /// Name inside the pod (CNI_IFNAME, usually eth0).
    pub name: String,
    /// Name of the host end in the node's namespace.
    pub host_name: String,
    pub ip: Ipv4Addr,
    /// Dual-stack: its IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// Set an IPv6 sysctl of `interface` in the calling thread's namespace.
fn ipv6_sysctl(interface: &str, name: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys/net/ipv6/conf")
        .join(interface)
        .join(name);
    fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

/// The node's side of a dual-stack pod: IPv6 on its host veth (no DAD, no router
/// advertisements taken), a /128 route to the pod and its permanent neighbour entry.
pub fn add_pod_route6(ip: Ipv6Addr, mac: [u8; 6], interface: &str) -> Result<()> {
    let mut netlink = Netlink::open()?;
    let index = netlink.link_index(interface)?;
    let route = Route6 {
        destination: Ipv6Net::from(ip),
        device: Some(index),
        gateway: None,
    };
    netlink
        .replace_route(&route.into())
        .with_context(|| format!("the route to {ip} via {interface}"))?;
    netlink
        .replace_neighbour(&Neighbour6::permanent(index, ip, mac))
        .with_context(|| format!("the neighbour {ip} on {interface}"))?;
    Ok(())
}

/// Pods are routed, not bridged: packets the host stack sends to a pod (replies to
/// its masqueraded egress traffic) need a /32 route and, as the pod MAC is known, a
/// permanent neighbour entry instead of ARP.
pub fn add_pod_route(ip: Ipv4Addr, interface: &str) -> Result<()> {
    let mut netlink = Netlink::open()?;
    let index = netlink.link_index(interface)?;
    let route = Route::new(Ipv4Net::from(ip), index, RouteScope::Link);
    netlink
        .replace_route(&route)
        .with_context(|| format!("the route to {ip} via {interface}"))?;
    let neighbour = Neighbour::permanent(index, ip, pod_mac_for(ip));
    netlink
        .replace_neighbour(&neighbour)
        .with_context(|| format!("the neighbour {ip} on {interface}"))?;
    Ok(())
}

/// Create and configure the veth pair (run in the node's namespace). On error the
/// pair is removed again.
pub fn create(pod: &PodInterface) -> Result<()> {
    let netns = fs::File::open(&pod.netns)
        .with_context(|| format!("opening netns {}", pod.netns.display()))?;
    let mut netlink = Netlink::open()?;
    netlink.add_veth(&Veth {
        name: &pod.host_name,
        mac: HOST_VETH_MAC,
        peer_name: &pod.name,
        peer_mac: pod_mac_for(pod.ip),
        peer_netns: netns.as_fd(),
        mtu: pod.mtu,
    })?;
    let configured = configure_pod_side(pod).and_then(|_| {
        if pod.ip6.is_some() {
            // Before it goes up: its link-local address (the pods' gateway) is then
            // usable at once.
            for (name, value) in [
                ("accept_dad", "0"),
                ("accept_ra", "0"),
                ("disable_ipv6", "0"),
            ] {
                ipv6_sysctl(&pod.host_name, name, value)?;
            }
        }
        let index = netlink.link_index(&pod.host_name)?;
        Ok(netlink.set_up((index, &pod.host_name))?)
    });
    if configured.is_err() {
        let _ = delete_host_end(&pod.host_name);
    }
    configured
}

/// In the pod's namespace: IPv6 only for a dual-stack pod, the pod IP as a /32, the
/// link up, the gateway a permanent neighbour at the host veth's MAC, and the
/// default route through it; the same for IPv6 (a /128, [`POD_GATEWAY_IP6`]).
fn configure_pod_side(pod: &PodInterface) -> Result<()> {
    in_netns(&pod.netns, || {
        let ipv6 = Path::new("/proc/sys/net/ipv6/conf").join(&pod.name);
        match pod.ip6 {
            Some(_) => {
                // DAD off before IPv6 comes up: the link-local address and the
                // pod's are usable at once (the pod's is its alone).
                ipv6_sysctl(&pod.name, "accept_dad", "0")?;
                ipv6_sysctl(&pod.name, "disable_ipv6", "0")?;
            }
            None if ipv6.exists() => {
                fs::write(ipv6.join("disable_ipv6"), "1").context("disabling IPv6")?
            }
            None => {}
        }
        let name = pod.name.as_str();
        let mut netlink = Netlink::open()?;
        let index = netlink.link_index(name)?;
        netlink.add_address(&Address {
            device: index,
            ip: pod.ip,
            prefix_len: 32,
        })?;
        netlink.set_up((index, name))?;
        let gateway = Neighbour::permanent(index, POD_GATEWAY_IP, HOST_VETH_MAC);
        netlink.add_neighbour(&gateway)?;
        let mut default = Route::new(Ipv4Net::default(), index, RouteScope::Universe);
        default.gateway = Some(POD_GATEWAY_IP);
        default.onlink = true;
        netlink.add_route(&default)?;
        if let Some(ip6) = pod.ip6 {
            netlink.add_address(&Address6 {
                device: index,
                ip: ip6,
                prefix_len: 128,
            })?;
            netlink.replace_neighbour(&Neighbour6::permanent(
                index,
                POD_GATEWAY_IP6,
                HOST_VETH_MAC,
            ))?;
            let default6 = Route6 {
                destination: Ipv6Net::default(),
                device: Some(index),
                gateway: Some(POD_GATEWAY_IP6),
            };
            netlink.add_route(&default6.into())?;
        }
        Ok(())
    })
    .with_context(|| format!("configuring {} in {}", pod.name, pod.netns.display()))
}

/// Delete the pod end of a pair (and so the pair) from inside the pod's namespace,
/// if it is the interface wired for `ip` (its MAC says so): an interface of that name
/// that the plugin did not create stays. Returns whether it was deleted.
pub fn delete_pod_end(netns: &Path, name: &str, ip: Ipv4Addr) -> Result<bool> {
    in_netns(netns, || {
        let mut netlink = Netlink::open()?;
        match netlink.link(name)? {
            Some(link) if link.mac == Some(pod_mac_for(ip)) => Ok(netlink.delete_link(name)?),
            _ => Ok(false),
        }
    })
}

/// Delete a host end (and so the pair) in the current namespace, if it exists; one
/// that vanishes meanwhile (the kernel destroys the pairs of a deleted netns
/// asynchronously) is gone: fine.
pub fn delete_host_end(host_name: &str) -> Result<bool> {
    Ok(Netlink::open()?.delete_link(host_name)?)
}

/// The host side of the node's pods as the kernel has it now: which links are up,
/// the /32 link routes and the permanent neighbours (read once, for every pod).
#[derive(Debug, Default)]
pub struct HostWiring {
    up: std::collections::BTreeSet<String>,
    /// The /32 scope-link routes: (pod IP, device).
    routes: std::collections::BTreeSet<(Ipv4Addr, String)>,
    /// The permanent neighbours: (IP, device, MAC).
    neighbours: std::collections::BTreeSet<(Ipv4Addr, String, [u8; 6])>,
}

impl HostWiring {
    /// Read the calling thread's namespace.
    pub fn read() -> Result<Self> {
        let mut netlink = Netlink::open()?;
        let links = netlink.links()?;
        let names: std::collections::BTreeMap<u32, String> =
            links.iter().map(|l| (l.index, l.name.clone())).collect();
        let name = |index: Option<u32>| names.get(&index?).cloned();
        let mut wiring = Self {
            up: links
                .iter()
                .filter(|l| l.up)
                .map(|l| l.name.clone())
                .collect(),
            ..Self::default()
        };
        for route in netlink.routes()? {
            if let (RouteScope::Link, 32, Some(device)) = (
                route.scope,
                route.destination.prefix_len(),
                name(route.device),
            ) {
                wiring.routes.insert((route.destination.addr(), device));
            }
        }
        for neighbour in netlink.neighbours()? {
            if let (true, Some(mac), Some(device)) = (
                neighbour.permanent,
                neighbour.mac,
                name(Some(neighbour.device)),
            ) {
                wiring.neighbours.insert((neighbour.ip, device, mac));
            }
        }
        Ok(wiring)
    }

    /// What the host side of pod `ip` behind `interface` lacks: the link up, the
    /// node's /32 route and its permanent neighbour entry.
    pub fn missing(&self, ip: Ipv4Addr, interface: &str) -> Vec<String> {
        let mut missing = Vec::new();
        if !self.up.contains(interface) {
            missing.push(format!("host veth {interface} is down"));
        }
        if !self.routes.contains(&(ip, interface.into())) {
            missing.push(format!("the node has no route {ip}/32 dev {interface}"));
        }
        let mac = pod_mac_for(ip);
        if !self.neighbours.contains(&(ip, interface.into(), mac)) {
            missing.push(format!(
                "the node has no permanent neighbour {ip} lladdr {} dev {interface}",
                mac_string(mac)
            ));
        }
        missing
    }
}

/// Set a pod's host veth up and restore its /32 route and neighbour (a link taken
/// down loses both, and taking it up again restores neither).
pub fn repair_host_side(ip: Ipv4Addr, interface: &str) -> Result<()> {
    let mut netlink = Netlink::open()?;
    let index = netlink.link_index(interface)?;
    netlink.set_up((index, interface))?;
    add_pod_route(ip, interface)
}

/// Repair the host side of every pod of `endpoints` whose veth exists (a veth taken
/// down and up again loses its route and neighbour, and nothing else restores
/// them); returns what was missing, one line per pod repaired.
pub fn repair_host_sides(
    endpoints: &std::collections::BTreeMap<
        ferrite_common::EndpointKey,
        ferrite_common::EndpointInfo,
    >,
) -> Result<Vec<String>> {
    let interfaces = interfaces::interfaces()?;
    let names: std::collections::BTreeMap<u32, &String> =
        interfaces.iter().map(|(n, i)| (i.ifindex, n)).collect();
    let wiring = HostWiring::read()?;
    let mut repaired = Vec::new();
    for (key, endpoint) in endpoints {
        let Some(interface) = names.get(&endpoint.ifindex) else {
            continue; // its pod is going: nothing to repair
        };
        let ip = Ipv4Addr::from(key.address);
        let missing = wiring.missing(ip, interface);
        if !missing.is_empty() {
            repair_host_side(ip, interface)?;
            repaired.push(format!("{ip} on {interface}: {}", missing.join("; ")));
        }
    }
    Ok(repaired)
}
