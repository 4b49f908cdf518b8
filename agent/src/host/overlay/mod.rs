//! The VXLAN device (external, collect_md: the datapath picks the remote per packet)
//! and the node's own place on the overlay: its address, VTEP MAC, and routes to the
//! other nodes' pod CIDRs, kept as wanted by a pure diff of what the device holds.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use ferrite_common::VXLAN_DEVICE;
use ipnet::IpNet;

use crate::{
    family::Family,
    netlink::{
        self, mac_string, AddressOf, IpEncap, NeighbourOf, Netlink, NetlinkFamily, RouteOf,
        RouteScope,
    },
};

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
/// CIDR comes from that MAC, which it can only look up in a resolved entry. Of
/// either family `A` of pod CIDRs: the tunnel (`node_ip`) is IPv4 for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayRouteOf<A> {
    pub node_ip: Ipv4Addr,
    pub gateway: A,
    pub vtep_mac: [u8; 6],
    /// The uplink's interface index, for a node routed natively.
    pub native_device: Option<u32>,
}

/// A route to another node's IPv4 pod CIDR.
pub type OverlayRoute = OverlayRouteOf<Ipv4Addr>;
/// A route to another node's IPv6 pod CIDR (IPv6 inside the IPv4 tunnel).
pub type OverlayRoute6 = OverlayRouteOf<Ipv6Addr>;

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

/// One family's part of the node's place on the overlay: its own address of that
/// family on the VXLAN device and its routes to the other nodes' pod CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayFamily<A: Family> {
    pub address: Option<A>,
    pub routes: BTreeMap<A::Net, OverlayRouteOf<A>>,
}

impl<A: Family> Default for OverlayFamily<A> {
    fn default() -> Self {
        Self {
            address: None,
            routes: BTreeMap::new(),
        }
    }
}

/// The node's own place on the overlay (flannel's `flannel.1`, Calico's
/// `vxlan.calico` do the same): an address of its own pod CIDR and its VTEP MAC on
/// the VXLAN device, and a kernel route per other node's pod CIDR from that address,
/// so the node reaches every pod and the answers come back over the overlay (never
/// masqueraded: the rule spares the overlay device). A dual-stack node has the same
/// for IPv6 (its address of its IPv6 pod CIDR, the IPv6 pod CIDRs of the others),
/// carried inside the same IPv4 VXLAN.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayHost {
    pub vtep_mac: Option<[u8; 6]>,
    pub ipv4: OverlayFamily<Ipv4Addr>,
    pub ipv6: OverlayFamily<Ipv6Addr>,
}

/// One step that brings the VXLAN device's host side towards what is wanted; shown
/// as the `ip` command that would do the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlayChange {
    SetMac([u8; 6]),
    Ipv4(FamilyChange<Ipv4Addr>),
    Ipv6(FamilyChange<Ipv6Addr>),
}

/// One step of one family's addresses, neighbours and routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyChange<A: Family> {
    ReplaceAddress(A),
    ReplaceNeighbour(A, [u8; 6]),
    /// A managed neighbour entry for a natively routed node on the uplink (index).
    ManageNeighbour(A, u32),
    ReplaceRoute {
        cidr: A::Net,
        route: OverlayRouteOf<A>,
        vni: u32,
        src: A,
    },
    /// A route on the VXLAN device, or (`Some`) on the uplink with that index.
    DeleteRoute(A::Net, Option<u32>),
    /// A neighbour on the VXLAN device, or (`Some`) on the uplink with that index.
    DeleteNeighbour(A, Option<u32>),
    DeleteAddress(A),
}

impl fmt::Display for OverlayChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SetMac(mac) => write!(
                f,
                "link set dev {VXLAN_DEVICE} address {}",
                mac_string(*mac)
            ),
            Self::Ipv4(change) => change.fmt(f),
            Self::Ipv6(change) => change.fmt(f),
        }
    }
}

/// The prefix length of a single address of `ip`'s family (32, 128).
fn host_prefix_len<A: Family>(ip: A) -> u8 {
    IpNet::from(ip.into()).prefix_len()
}

impl<A: Family> fmt::Display for FamilyChange<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = VXLAN_DEVICE;
        match self {
            Self::ReplaceAddress(ip) => {
                write!(f, "addr replace {ip}/{} dev {dev}", host_prefix_len(*ip))
            }
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
                    OverlayRouteOf {
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
            Self::DeleteAddress(ip) => {
                write!(f, "addr del {ip}/{} dev {dev}", host_prefix_len(*ip))
            }
        }
    }
}

impl OverlayChange {
    /// Make the change on the VXLAN device (link index `device`).
    fn apply(&self, netlink: &mut Netlink, device: u32) -> netlink::Result<()> {
        match self {
            Self::SetMac(mac) => netlink.set_mac((device, VXLAN_DEVICE), *mac),
            Self::Ipv4(change) => change.apply(netlink, device),
            Self::Ipv6(change) => change.apply(netlink, device),
        }
    }
}

impl<A: NetlinkFamily> FamilyChange<A> {
    /// Make the change on the VXLAN device (link index `device`).
    fn apply(&self, netlink: &mut Netlink, device: u32) -> netlink::Result<()> {
        let address = |ip: A| AddressOf {
            device,
            ip,
            prefix_len: host_prefix_len(ip),
        };
        let neighbour = |ip, mac: Option<[u8; 6]>| NeighbourOf {
            device,
            ip,
            mac,
            permanent: mac.is_some(),
            managed: false,
        };
        match *self {
            Self::ReplaceAddress(ip) => netlink.replace_address(&address(ip)),
            Self::ReplaceNeighbour(ip, mac) => netlink.replace_neighbour(&neighbour(ip, Some(mac))),
            Self::ManageNeighbour(ip, uplink) => {
                netlink.replace_neighbour(&NeighbourOf::managed(uplink, ip))
            }
            Self::ReplaceRoute {
                cidr,
                route:
                    OverlayRouteOf {
                        native_device: Some(uplink),
                        gateway,
                        ..
                    },
                src,
                ..
            } => {
                let mut wanted = RouteOf::new(cidr, uplink, RouteScope::Universe);
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
                let mut wanted = RouteOf::new(cidr, device, RouteScope::Universe);
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
            Self::DeleteRoute(cidr, on) => netlink.delete_route(&RouteOf::<A>::new(
                cidr,
                on.unwrap_or(device),
                RouteScope::NoWhere,
            )),
            Self::DeleteNeighbour(ip, None) => netlink.delete_neighbour(&neighbour(ip, None)),
            // Gone already (the kernel forgets unmanaged entries by itself): done.
            Self::DeleteNeighbour(ip, Some(uplink)) => {
                match netlink.delete_neighbour(&NeighbourOf::managed(uplink, ip)) {
                    Err(e) if e.is_not_found() => Ok(()),
                    done => done,
                }
            }
            Self::DeleteAddress(ip) => netlink.delete_address(&address(ip)),
        }
    }
}

/// The changes that turn `current` into `desired` (pure): the device MAC first,
/// then each family's (IPv4, then IPv6; see [`family_changes`]).
pub fn overlay_changes(
    current: &OverlayHost,
    desired: &OverlayHost,
    vni: u32,
) -> Vec<OverlayChange> {
    let mut changes = Vec::new();
    if let Some(mac) = desired.vtep_mac.filter(|m| current.vtep_mac != Some(*m)) {
        changes.push(OverlayChange::SetMac(mac));
    }
    let ipv4 = family_changes(&current.ipv4, &desired.ipv4, vni);
    changes.extend(ipv4.into_iter().map(OverlayChange::Ipv4));
    let ipv6 = family_changes(&current.ipv6, &desired.ipv6, vni);
    changes.extend(ipv6.into_iter().map(OverlayChange::Ipv6));
    changes
}

/// One family's changes (pure): the address first (routes take their source from
/// it), neighbours before routes, removals last. Without an own address there are
/// no routes (they need a source).
pub fn family_changes<A: Family>(
    current: &OverlayFamily<A>,
    desired: &OverlayFamily<A>,
    vni: u32,
) -> Vec<FamilyChange<A>> {
    let mut changes = Vec::new();
    if let Some(address) = desired.address.filter(|a| current.address != Some(*a)) {
        changes.push(FamilyChange::ReplaceAddress(address));
    }
    let wanted = |cidr: &A::Net| desired.address.is_some() && desired.routes.contains_key(cidr);
    for (cidr, route) in &desired.routes {
        let (Some(src), true) = (desired.address, wanted(cidr)) else {
            continue;
        };
        let same = current.routes.get(cidr) == Some(route) && current.address == desired.address;
        if !same {
            match route.native_device {
                None => changes.push(FamilyChange::ReplaceNeighbour(
                    route.gateway,
                    route.vtep_mac,
                )),
                Some(uplink) => changes.push(FamilyChange::ManageNeighbour(route.gateway, uplink)),
            }
            changes.push(FamilyChange::ReplaceRoute {
                cidr: *cidr,
                route: *route,
                vni,
                src,
            });
        }
    }
    for (cidr, route) in &current.routes {
        if !wanted(cidr) {
            changes.push(FamilyChange::DeleteRoute(*cidr, route.native_device));
            // Unused once no route that stays goes through it (none stays without
            // an own address).
            let overlay_gateway_unused = route.native_device.is_none()
                && !desired.routes.iter().any(|(cidr, r)| {
                    wanted(cidr) && r.native_device.is_none() && r.gateway == route.gateway
                });
            if overlay_gateway_unused {
                changes.push(FamilyChange::DeleteNeighbour(route.gateway, None));
            }
        }
    }
    // A node no longer routed natively (gone, or over VXLAN now): its managed entry
    // goes, or the kernel would keep probing it.
    let native_gateways = |routes: Vec<&OverlayRouteOf<A>>| -> BTreeSet<(A, u32)> {
        routes
            .into_iter()
            .filter_map(|r| Some((r.gateway, r.native_device?)))
            .filter(|(gateway, _)| *gateway != A::UNSPECIFIED)
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
            changes.push(FamilyChange::DeleteNeighbour(gateway, Some(uplink)));
        }
    }
    if let Some(old) = current.address.filter(|a| desired.address != Some(*a)) {
        changes.push(FamilyChange::DeleteAddress(old));
    }
    changes
}

/// The overlay routes among the routes of the VXLAN device (link index `device`):
/// an IP encapsulation, a gateway and a source (others are ignored); and the native
/// routes on other devices: an IPv4 gateway (the node), no encapsulation and the
/// source `own` (the node's overlay address: no route of anyone else's has it).
/// Pure.
pub fn overlay_routes<A: Family>(
    routes: &[RouteOf<A>],
    device: u32,
    own: Option<A>,
) -> BTreeMap<A::Net, (OverlayRouteOf<A>, A)> {
    routes
        .iter()
        .filter_map(|route| {
            let on = route.device?;
            let gateway = route.gateway?;
            let overlay = if on == device {
                OverlayRouteOf {
                    node_ip: route.encap?.destination,
                    gateway,
                    vtep_mac: [0; 6],
                    native_device: None,
                }
            } else if route.encap.is_none() && own.is_some() && route.source == own {
                OverlayRouteOf {
                    node_ip: Ipv4Addr::from_ip(gateway.into())?,
                    gateway,
                    vtep_mac: [0; 6],
                    native_device: Some(on),
                }
            } else {
                return None;
            };
            Some((route.destination, (overlay, route.source?)))
        })
        .collect()
}

/// Whether `ip` is link-local: the kernel gives the VXLAN device an IPv6 one of
/// its own, which is not the node's overlay address.
fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.is_link_local(),
        IpAddr::V6(ip) => ip.is_unicast_link_local(),
    }
}

/// What the VXLAN device holds now: its MAC, and of each family its address and the
/// overlay routes with their neighbours' MACs.
pub fn read_overlay(device_mac: [u8; 6]) -> Result<OverlayHost> {
    let mut netlink = Netlink::open()?;
    let device = netlink.link_index(VXLAN_DEVICE)?;
    Ok(OverlayHost {
        vtep_mac: Some(device_mac),
        ipv4: read_family(&mut netlink, device)?,
        ipv6: read_family(&mut netlink, device)?,
    })
}

/// One family's address on the VXLAN device (link index `device`) and its routes.
fn read_family<A: NetlinkFamily>(netlink: &mut Netlink, device: u32) -> Result<OverlayFamily<A>> {
    let address = netlink
        .addresses_of::<A>()?
        .into_iter()
        .find(|a| a.device == device && !link_local(a.ip.into()))
        .map(|a| a.ip);
    let all_neighbours = netlink.neighbours_of::<A>()?;
    let neighbours: BTreeMap<A, [u8; 6]> = all_neighbours
        .iter()
        .filter(|n| n.device == device && n.permanent)
        .filter_map(|n| Some((n.ip, n.mac?)))
        .collect();
    let managed: BTreeSet<(A, u32)> = all_neighbours
        .iter()
        .filter(|n| n.managed)
        .map(|n| (n.ip, n.device))
        .collect();
    let routes = overlay_routes(&netlink.routes_of::<A>()?, device, address)
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
                route.gateway = A::UNSPECIFIED;
            }
            (cidr, route)
        })
        .collect();
    Ok(OverlayFamily { address, routes })
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
mod tests;
