//! The VXLAN device (external, collect_md: the datapath picks the remote per packet)
//! and the node's own place on the overlay: its address, VTEP MAC, and routes to the
//! other nodes' pod CIDRs, kept as wanted by a pure diff of what the device holds.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use anyhow::{Context, Result};
use ferrite_common::VXLAN_DEVICE;
use ipnet::Ipv4Net;

use crate::netlink::{self, mac_string, Address, IpEncap, Neighbour, Netlink, Route, RouteScope};

/// Create the VXLAN device in external (collect_md) mode if it is missing: the
/// datapath sets the remote node per packet, the kernel builds outer headers.
pub fn ensure_vxlan_device(port: u16, exists: bool) -> Result<()> {
    let mut netlink = Netlink::open()?;
    if !exists {
        netlink.add_vxlan(VXLAN_DEVICE, port)?;
    }
    let index = netlink.link_index(VXLAN_DEVICE)?;
    Ok(netlink.set_up((index, VXLAN_DEVICE))?)
}

/// Give the VXLAN device the uplink's MTU minus the encapsulation (as flannel does),
/// so what it carries never needs outer fragmentation; pods get the same MTU (the
/// CNI conflist's `mtu`) and the datapath answers larger DF packets with ICMP.
pub fn set_vxlan_mtu(mtu: u32) -> Result<()> {
    let mut netlink = Netlink::open()?;
    let index = netlink.link_index(VXLAN_DEVICE)?;
    Ok(netlink.set_mtu((index, VXLAN_DEVICE), mtu)?)
}

/// Remove the VXLAN device (uninstall); nothing to do when it is not there.
pub fn remove_vxlan_device() {
    let _ = Netlink::open().and_then(|mut netlink| netlink.delete_link(VXLAN_DEVICE));
}

/// Another node's pod CIDR as the node's own processes reach it: through that
/// node's overlay address (`gateway`, a permanent neighbour with its VTEP MAC) and a
/// lightweight-tunnel encap to its node IP on the collect_md VXLAN device; or, for a
/// node routed natively, via its node IP (`gateway`) on the uplink
/// (`native_device`), as flannel's host-gw routes, with a managed neighbour entry
/// for the node (the kernel keeps its MAC resolved, as Cilium's L2 neighbour
/// discovery does): the uplink program checks that what comes from that node's pod
/// CIDR comes from that MAC, which it can only look up in a resolved entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayRoute {
    pub node_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    /// The uplink's interface index, for a node routed natively.
    pub native_device: Option<u32>,
}

impl OverlayRoute {
    /// The route to a node reached natively through the uplink `device`.
    pub fn native(node_ip: Ipv4Addr, device: u32) -> Self {
        Self {
            node_ip,
            gateway: node_ip,
            vtep_mac: [0; 6],
            native_device: Some(device),
        }
    }
}

/// The node's own place on the overlay (flannel's `flannel.1`, Calico's
/// `vxlan.calico` do the same): an address of its own pod CIDR and its VTEP MAC on
/// the VXLAN device, and a kernel route per other node's pod CIDR from that address,
/// so the node reaches every pod and the answers come back over the overlay (never
/// masqueraded: the rule spares the overlay device).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayHost {
    pub address: Option<Ipv4Addr>,
    pub vtep_mac: Option<[u8; 6]>,
    pub routes: BTreeMap<ipnet::Ipv4Net, OverlayRoute>,
}

/// One step that brings the VXLAN device's host side towards what is wanted; shown
/// as the `ip` command that would do the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayChange {
    SetMac([u8; 6]),
    ReplaceAddress(Ipv4Addr),
    ReplaceNeighbour(Ipv4Addr, [u8; 6]),
    /// A managed neighbour entry for a natively routed node on the uplink (index).
    ManageNeighbour(Ipv4Addr, u32),
    ReplaceRoute {
        cidr: Ipv4Net,
        route: OverlayRoute,
        vni: u32,
        src: Ipv4Addr,
    },
    /// A route on the VXLAN device, or (`Some`) on the uplink with that index.
    DeleteRoute(Ipv4Net, Option<u32>),
    /// A neighbour on the VXLAN device, or (`Some`) on the uplink with that index.
    DeleteNeighbour(Ipv4Addr, Option<u32>),
    DeleteAddress(Ipv4Addr),
}

impl fmt::Display for OverlayChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = VXLAN_DEVICE;
        match self {
            Self::SetMac(mac) => write!(f, "link set dev {dev} address {}", mac_string(*mac)),
            Self::ReplaceAddress(ip) => write!(f, "addr replace {ip}/32 dev {dev}"),
            Self::ReplaceNeighbour(ip, mac) => write!(
                f,
                "neigh replace {ip} lladdr {} dev {dev} nud permanent",
                mac_string(*mac)
            ),
            Self::ManageNeighbour(ip, uplink) => {
                write!(f, "neigh replace {ip} dev <uplink ifindex {uplink}> managed")
            }
            Self::ReplaceRoute {
                cidr,
                route:
                    OverlayRoute {
                        native_device: Some(uplink),
                        gateway,
                        ..
                    },
                src,
                ..
            } => write!(
                f,
                "route replace {cidr} via {gateway} dev <uplink ifindex {uplink}> src {src}"
            ),
            Self::ReplaceRoute {
                cidr,
                route,
                vni,
                src,
            } => write!(
                f,
                "route replace {cidr} encap ip id {vni} dst {} ttl 64 via {} dev {dev} onlink src {src}",
                route.node_ip, route.gateway
            ),
            Self::DeleteRoute(cidr, Some(uplink)) => {
                write!(f, "route del {cidr} dev <uplink ifindex {uplink}>")
            }
            Self::DeleteRoute(cidr, None) => write!(f, "route del {cidr} dev {dev}"),
            Self::DeleteNeighbour(ip, Some(uplink)) => {
                write!(f, "neigh del {ip} dev <uplink ifindex {uplink}>")
            }
            Self::DeleteNeighbour(ip, None) => write!(f, "neigh del {ip} dev {dev}"),
            Self::DeleteAddress(ip) => write!(f, "addr del {ip}/32 dev {dev}"),
        }
    }
}

impl OverlayChange {
    /// Make the change on the VXLAN device (link index `device`).
    fn apply(&self, netlink: &mut Netlink, device: u32) -> netlink::Result<()> {
        let address = |ip| Address {
            device,
            ip,
            prefix_len: 32,
        };
        let neighbour = |ip, mac: Option<[u8; 6]>| Neighbour {
            device,
            ip,
            mac,
            permanent: mac.is_some(),
            managed: false,
        };
        match *self {
            Self::SetMac(mac) => netlink.set_mac((device, VXLAN_DEVICE), mac),
            Self::ReplaceAddress(ip) => netlink.replace_address(&address(ip)),
            Self::ReplaceNeighbour(ip, mac) => netlink.replace_neighbour(&neighbour(ip, Some(mac))),
            Self::ManageNeighbour(ip, uplink) => {
                netlink.replace_neighbour(&Neighbour::managed(uplink, ip))
            }
            Self::ReplaceRoute {
                cidr,
                route:
                    OverlayRoute {
                        native_device: Some(uplink),
                        gateway,
                        ..
                    },
                src,
                ..
            } => {
                let mut wanted = Route::new(cidr, uplink, RouteScope::Universe);
                wanted.gateway = Some(gateway);
                wanted.source = Some(src);
                netlink.replace_route(&wanted)
            }
            Self::ReplaceRoute {
                cidr,
                route,
                vni,
                src,
            } => {
                let mut wanted = Route::new(cidr, device, RouteScope::Universe);
                wanted.gateway = Some(route.gateway);
                wanted.source = Some(src);
                wanted.onlink = true;
                wanted.encap = Some(IpEncap {
                    id: u64::from(vni),
                    destination: route.node_ip,
                    ttl: 64,
                });
                netlink.replace_route(&wanted)
            }
            Self::DeleteRoute(cidr, on) => {
                netlink.delete_route(&Route::new(cidr, on.unwrap_or(device), RouteScope::NoWhere))
            }
            Self::DeleteNeighbour(ip, None) => netlink.delete_neighbour(&neighbour(ip, None)),
            // Gone already (the kernel forgets unmanaged entries by itself): done.
            Self::DeleteNeighbour(ip, Some(uplink)) => {
                match netlink.delete_neighbour(&Neighbour::managed(uplink, ip)) {
                    Err(e) if e.is_not_found() => Ok(()),
                    done => done,
                }
            }
            Self::DeleteAddress(ip) => netlink.delete_address(&address(ip)),
        }
    }
}

/// The changes that turn `current` into `desired` (pure): the device MAC and address
/// first (routes take their source from it), neighbours before routes, removals
/// last. Without an own address there are no routes (they need a source).
pub fn overlay_changes(
    current: &OverlayHost,
    desired: &OverlayHost,
    vni: u32,
) -> Vec<OverlayChange> {
    let mut changes = Vec::new();
    if let Some(mac) = desired.vtep_mac.filter(|m| current.vtep_mac != Some(*m)) {
        changes.push(OverlayChange::SetMac(mac));
    }
    if let Some(address) = desired.address.filter(|a| current.address != Some(*a)) {
        changes.push(OverlayChange::ReplaceAddress(address));
    }
    let wanted =
        |cidr: &ipnet::Ipv4Net| desired.address.is_some() && desired.routes.contains_key(cidr);
    for (cidr, route) in &desired.routes {
        let (Some(src), true) = (desired.address, wanted(cidr)) else {
            continue;
        };
        let same = current.routes.get(cidr) == Some(route) && current.address == desired.address;
        if !same {
            match route.native_device {
                None => changes.push(OverlayChange::ReplaceNeighbour(
                    route.gateway,
                    route.vtep_mac,
                )),
                Some(uplink) => changes.push(OverlayChange::ManageNeighbour(route.gateway, uplink)),
            }
            changes.push(OverlayChange::ReplaceRoute {
                cidr: *cidr,
                route: *route,
                vni,
                src,
            });
        }
    }
    for (cidr, route) in &current.routes {
        if !wanted(cidr) {
            changes.push(OverlayChange::DeleteRoute(*cidr, route.native_device));
            let overlay_gateway_unused = route.native_device.is_none()
                && !desired
                    .routes
                    .values()
                    .any(|r| r.native_device.is_none() && r.gateway == route.gateway);
            if overlay_gateway_unused {
                changes.push(OverlayChange::DeleteNeighbour(route.gateway, None));
            }
        }
    }
    // A node no longer routed natively (gone, or over VXLAN now): its managed entry
    // goes, or the kernel would keep probing it.
    let native_gateways = |routes: Vec<&OverlayRoute>| -> BTreeSet<(Ipv4Addr, u32)> {
        routes
            .into_iter()
            .filter_map(|r| Some((r.gateway, r.native_device?)))
            .filter(|(gateway, _)| !gateway.is_unspecified())
            .collect()
    };
    let still_native = native_gateways(
        desired
            .routes
            .iter()
            .filter(|(cidr, _)| wanted(cidr))
            .map(|(_, r)| r)
            .collect(),
    );
    for (gateway, uplink) in native_gateways(current.routes.values().collect()) {
        if !still_native.contains(&(gateway, uplink)) {
            changes.push(OverlayChange::DeleteNeighbour(gateway, Some(uplink)));
        }
    }
    if let Some(old) = current.address.filter(|a| desired.address != Some(*a)) {
        changes.push(OverlayChange::DeleteAddress(old));
    }
    changes
}

/// The overlay routes among the routes of the VXLAN device (link index `device`):
/// an IP encapsulation, a gateway and a source (others are ignored); and the native
/// routes on other devices: a gateway, no encapsulation and the source `own` (the
/// node's overlay address: no route of anyone else's has it). Pure.
pub fn overlay_routes(
    routes: &[Route],
    device: u32,
    own: Option<Ipv4Addr>,
) -> BTreeMap<ipnet::Ipv4Net, (OverlayRoute, Ipv4Addr)> {
    routes
        .iter()
        .filter_map(|route| {
            let on = route.device?;
            let overlay = if on == device {
                OverlayRoute {
                    node_ip: route.encap?.destination,
                    gateway: route.gateway?,
                    vtep_mac: [0; 6],
                    native_device: None,
                }
            } else if route.encap.is_none() && own.is_some() && route.source == own {
                OverlayRoute::native(route.gateway?, on)
            } else {
                return None;
            };
            Some((route.destination, (overlay, route.source?)))
        })
        .collect()
}

/// What the VXLAN device holds now: its address(es), MAC, and the overlay routes with
/// their neighbours' MACs.
pub fn read_overlay(device_mac: [u8; 6]) -> Result<OverlayHost> {
    let mut netlink = Netlink::open()?;
    let device = netlink.link_index(VXLAN_DEVICE)?;
    let address = netlink
        .addresses()?
        .into_iter()
        .find(|a| a.device == device)
        .map(|a| a.ip);
    let all_neighbours = netlink.neighbours()?;
    let neighbours: BTreeMap<Ipv4Addr, [u8; 6]> = all_neighbours
        .iter()
        .filter(|n| n.device == device && n.permanent)
        .filter_map(|n| Some((n.ip, n.mac?)))
        .collect();
    let managed: BTreeSet<(Ipv4Addr, u32)> = all_neighbours
        .iter()
        .filter(|n| n.managed)
        .map(|n| (n.ip, n.device))
        .collect();
    let routes = overlay_routes(&netlink.routes()?, device, address)
        .into_iter()
        .map(|(cidr, (mut route, src))| {
            let managed_neighbour = match route.native_device {
                None => {
                    route.vtep_mac = neighbours.get(&route.gateway).copied().unwrap_or_default();
                    true
                }
                Some(uplink) => managed.contains(&(route.gateway, uplink)),
            };
            // A route from another source is not ours as wanted, nor a native one
            // without its node's managed neighbour: rewrite it.
            if Some(src) != address || !managed_neighbour {
                route.gateway = Ipv4Addr::UNSPECIFIED;
            }
            (cidr, route)
        })
        .collect();
    Ok(OverlayHost {
        address,
        vtep_mac: Some(device_mac),
        routes,
    })
}

/// Bring the VXLAN device's address, MAC, routes and neighbours to `desired`.
pub fn apply_overlay(current: &OverlayHost, desired: &OverlayHost, vni: u32) -> Result<usize> {
    let changes = overlay_changes(current, desired, vni);
    if !changes.is_empty() {
        let mut netlink = Netlink::open()?;
        let device = netlink.link_index(VXLAN_DEVICE)?;
        for change in &changes {
            change
                .apply(&mut netlink, device)
                .with_context(|| format!("configuring the overlay's host routes: {change}"))?;
        }
    }
    Ok(changes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(address: &str, routes: &[(&str, &str, &str)]) -> OverlayHost {
        OverlayHost {
            address: Some(address.parse().unwrap()),
            vtep_mac: Some([0x0a, 0x58, 198, 51, 100, 1]),
            routes: routes
                .iter()
                .map(|(cidr, node, gateway)| {
                    let node_ip: Ipv4Addr = node.parse().unwrap();
                    let route = OverlayRoute {
                        node_ip,
                        gateway: gateway.parse().unwrap(),
                        vtep_mac: ferrite_common::vtep_mac_for(node_ip),
                        native_device: None,
                    };
                    (cidr.parse().unwrap(), route)
                })
                .collect(),
        }
    }

    #[test]
    fn overlay_routes_follow_nodes_and_a_removed_node_loses_only_its_route() {
        let empty = OverlayHost::default();
        let two = overlay(
            "10.244.0.1",
            &[
                ("10.244.1.0/24", "198.51.100.2", "10.244.1.1"),
                ("10.244.2.0/24", "198.51.100.3", "10.244.2.1"),
            ],
        );
        let commands = |current, desired| -> Vec<String> {
            overlay_changes(current, desired, 1)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let first = commands(&empty, &two);
        assert_eq!(
            first,
            [
                "link set dev ferrite_vxlan address 0a:58:c6:33:64:01",
                "addr replace 10.244.0.1/32 dev ferrite_vxlan",
                "neigh replace 10.244.1.1 lladdr 0a:58:c6:33:64:02 dev ferrite_vxlan nud permanent",
                "route replace 10.244.1.0/24 encap ip id 1 dst 198.51.100.2 ttl 64 via 10.244.1.1 dev ferrite_vxlan onlink src 10.244.0.1",
                "neigh replace 10.244.2.1 lladdr 0a:58:c6:33:64:03 dev ferrite_vxlan nud permanent",
                "route replace 10.244.2.0/24 encap ip id 1 dst 198.51.100.3 ttl 64 via 10.244.2.1 dev ferrite_vxlan onlink src 10.244.0.1",
            ]
        );
        assert!(
            commands(&two, &two).is_empty(),
            "nothing to do when in place"
        );
        let one = overlay(
            "10.244.0.1",
            &[("10.244.1.0/24", "198.51.100.2", "10.244.1.1")],
        );
        assert_eq!(
            commands(&two, &one),
            [
                "route del 10.244.2.0/24 dev ferrite_vxlan",
                "neigh del 10.244.2.1 dev ferrite_vxlan"
            ]
        );
        // A node that moves to another IP gets its route rewritten.
        let moved = overlay(
            "10.244.0.1",
            &[("10.244.1.0/24", "198.51.100.9", "10.244.1.1")],
        );
        assert_eq!(commands(&one, &moved).len(), 2);
    }

    #[test]
    fn overlay_routes_are_read_back_from_the_devices_routes() {
        let device = 9;
        let mut overlay = Route::new(
            "10.244.1.0/24".parse().unwrap(),
            device,
            RouteScope::Universe,
        );
        overlay.gateway = Some("10.244.1.1".parse().unwrap());
        overlay.source = Some("10.244.0.1".parse().unwrap());
        overlay.onlink = true;
        overlay.encap = Some(IpEncap {
            id: 1,
            destination: "198.51.100.2".parse().unwrap(),
            ttl: 64,
        });
        let mut elsewhere = overlay.clone();
        elsewhere.destination = "10.244.2.0/24".parse().unwrap();
        elsewhere.device = Some(device + 1);
        let mut plain = overlay.clone();
        plain.destination = "10.244.3.0/24".parse().unwrap();
        plain.encap = None;
        let kernel = Route::new("10.9.0.0/16".parse().unwrap(), device, RouteScope::Link);
        let routes = overlay_routes(&[overlay, elsewhere, plain, kernel], device, None);
        assert_eq!(routes.len(), 1, "{routes:?}");
        let (route, src) = routes[&"10.244.1.0/24".parse().unwrap()];
        assert_eq!(
            (route.node_ip, route.gateway, src),
            (
                "198.51.100.2".parse().unwrap(),
                "10.244.1.1".parse().unwrap(),
                "10.244.0.1".parse().unwrap()
            )
        );
    }

    #[test]
    fn native_routes_go_via_the_node_on_the_uplink_with_its_managed_neighbour_and_switch_both_ways()
    {
        let uplink = 4;
        let vxlan = overlay(
            "10.244.0.1",
            &[("10.244.1.0/24", "198.51.100.2", "10.244.1.1")],
        );
        let mut native = vxlan.clone();
        native.routes.insert(
            "10.244.1.0/24".parse().unwrap(),
            OverlayRoute::native("198.51.100.2".parse().unwrap(), uplink),
        );
        let commands = |current, desired| -> Vec<String> {
            overlay_changes(current, desired, 1)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            commands(&vxlan, &native),
            [
                "neigh replace 198.51.100.2 dev <uplink ifindex 4> managed",
                "route replace 10.244.1.0/24 via 198.51.100.2 dev <uplink ifindex 4> src 10.244.0.1"
            ]
        );
        assert!(commands(&native, &native).is_empty());
        assert_eq!(
            commands(&native, &vxlan),
            [
                "neigh replace 10.244.1.1 lladdr 0a:58:c6:33:64:02 dev ferrite_vxlan nud permanent",
                "route replace 10.244.1.0/24 encap ip id 1 dst 198.51.100.2 ttl 64 via 10.244.1.1 dev ferrite_vxlan onlink src 10.244.0.1",
                "neigh del 198.51.100.2 dev <uplink ifindex 4>",
            ]
        );
        let mut gone = native.clone();
        gone.routes.clear();
        assert_eq!(
            commands(&native, &gone),
            [
                "route del 10.244.1.0/24 dev <uplink ifindex 4>",
                "neigh del 198.51.100.2 dev <uplink ifindex 4>"
            ]
        );
        // A node with two pod CIDRs keeps its entry while one of them is routed.
        let mut two_cidrs = native.clone();
        two_cidrs.routes.insert(
            "10.245.1.0/24".parse().unwrap(),
            OverlayRoute::native("198.51.100.2".parse().unwrap(), uplink),
        );
        assert_eq!(
            commands(&two_cidrs, &native),
            ["route del 10.245.1.0/24 dev <uplink ifindex 4>"]
        );
    }

    #[test]
    fn native_routes_are_read_back_only_with_the_nodes_own_source() {
        let (vxlan_device, uplink) = (9, 4);
        let own: Ipv4Addr = "10.244.0.1".parse().unwrap();
        let mut native = Route::new(
            "10.244.1.0/24".parse().unwrap(),
            uplink,
            RouteScope::Universe,
        );
        native.gateway = Some("198.51.100.2".parse().unwrap());
        native.source = Some(own);
        // Someone else's route on the uplink: not the agent's to touch.
        let mut foreign = native.clone();
        foreign.destination = "10.9.0.0/16".parse().unwrap();
        foreign.source = None;
        let routes = overlay_routes(&[native, foreign], vxlan_device, Some(own));
        assert_eq!(routes.len(), 1, "{routes:?}");
        assert_eq!(
            routes[&"10.244.1.0/24".parse().unwrap()],
            (
                OverlayRoute::native("198.51.100.2".parse().unwrap(), uplink),
                own
            )
        );
    }
}
