//! Addresses, routes (main table) and neighbours of either IP family: typed
//! structs, the messages that add, replace or delete them, and dumps read back into
//! them. One implementation, generic over the family ([`NetlinkFamily`]).
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

#[cfg(test)]
use ipnet::Ipv4Net;
use ipnet::Ipv6Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteIpTunnel, RouteLwEnCapType,
        RouteLwTunnelEncap, RouteMessage, RouteProtocol, RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};

pub use netlink_packet_route::route::RouteScope;

use super::{Netlink, Result};
use crate::family::Family;

/// How rtnetlink tags and carries an IP family's addresses.
pub trait NetlinkFamily: Family {
    const ADDRESS_FAMILY: AddressFamily;
    /// The header flags of an address we add. IPv6: no duplicate address detection
    /// (the addresses are the pod's alone: DAD would only hold them tentative for a
    /// second).
    const NEW_ADDRESS_FLAGS: AddressHeaderFlags;

    fn route_address(self) -> RouteAddress;
    fn from_route_address(address: &RouteAddress) -> Option<Self>;
    fn neighbour_address(self) -> NeighbourAddress;
    fn from_neighbour_address(address: &NeighbourAddress) -> Option<Self>;
}

impl NetlinkFamily for Ipv4Addr {
    const ADDRESS_FAMILY: AddressFamily = AddressFamily::Inet;
    const NEW_ADDRESS_FLAGS: AddressHeaderFlags = AddressHeaderFlags::empty();

    fn route_address(self) -> RouteAddress {
        RouteAddress::Inet(self)
    }

    fn from_route_address(address: &RouteAddress) -> Option<Self> {
        match address {
            RouteAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }

    fn neighbour_address(self) -> NeighbourAddress {
        NeighbourAddress::Inet(self)
    }

    fn from_neighbour_address(address: &NeighbourAddress) -> Option<Self> {
        match address {
            NeighbourAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }
}

impl NetlinkFamily for Ipv6Addr {
    const ADDRESS_FAMILY: AddressFamily = AddressFamily::Inet6;
    const NEW_ADDRESS_FLAGS: AddressHeaderFlags = AddressHeaderFlags::Nodad;

    fn route_address(self) -> RouteAddress {
        RouteAddress::Inet6(self)
    }

    fn from_route_address(address: &RouteAddress) -> Option<Self> {
        match address {
            RouteAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }

    fn neighbour_address(self) -> NeighbourAddress {
        NeighbourAddress::Inet6(self)
    }

    fn from_neighbour_address(address: &NeighbourAddress) -> Option<Self> {
        match address {
            NeighbourAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }
}

/// How a request treats an object that exists already.
#[derive(Clone, Copy)]
enum Write {
    /// Fail with EEXIST (`ip ... add`).
    Add,
    /// Overwrite it (`ip ... replace`).
    Replace,
}

impl Write {
    fn flags(self) -> u16 {
        match self {
            Write::Add => NLM_F_CREATE | NLM_F_EXCL,
            Write::Replace => NLM_F_CREATE | NLM_F_REPLACE,
        }
    }
}

/// An address of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressOf<A> {
    pub device: u32,
    pub ip: A,
    pub prefix_len: u8,
}

/// An IPv4 address of a link.
pub type Address = AddressOf<Ipv4Addr>;
/// An IPv6 address of a link.
pub type Address6 = AddressOf<Ipv6Addr>;

impl<A: fmt::Display> fmt::Display for AddressOf<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} dev #{}", self.ip, self.prefix_len, self.device)
    }
}

impl<A: NetlinkFamily> AddressOf<A> {
    /// The message adding or deleting it, as `ip addr` sends it: local and address
    /// both the IP, global scope.
    pub fn message(&self) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = A::ADDRESS_FAMILY;
        message.header.prefix_len = self.prefix_len;
        message.header.index = self.device;
        message.header.flags = A::NEW_ADDRESS_FLAGS;
        message.attributes = vec![
            AddressAttribute::Local(self.ip.into()),
            AddressAttribute::Address(self.ip.into()),
        ];
        message
    }

    /// The typed view of an address message; `None` for other families.
    pub fn from_message(message: &AddressMessage) -> Option<Self> {
        let ip = |wanted: fn(&AddressAttribute) -> bool| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) if wanted(a) => {
                    A::from_ip(*ip)
                }
                _ => None,
            })
        };
        // The local address is the interface's own (the other is a peer's, if any).
        let ip = ip(|a| matches!(a, AddressAttribute::Local(_)))
            .or_else(|| ip(|a| matches!(a, AddressAttribute::Address(_))))?;
        Some(Self {
            device: message.header.index,
            ip,
            prefix_len: message.header.prefix_len,
        })
    }
}

/// A lightweight-tunnel IP encapsulation (`encap ip id ID dst DST ttl TTL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpEncap {
    pub id: u64,
    pub destination: Ipv4Addr,
    pub ttl: u8,
}

/// A unicast route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteOf<A: Family> {
    pub destination: A::Net,
    pub device: Option<u32>,
    pub gateway: Option<A>,
    /// The preferred source (`src`).
    pub source: Option<A>,
    pub scope: RouteScope,
    pub onlink: bool,
    pub encap: Option<IpEncap>,
}

/// An IPv4 unicast route of the main table.
pub type Route = RouteOf<Ipv4Addr>;

/// An IPv6 route as a dual-stack pod's wiring has them (scope universe, no source,
/// onlink or encap): the short form of a [`RouteOf<Ipv6Addr>`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub destination: Ipv6Net,
    pub device: Option<u32>,
    pub gateway: Option<Ipv6Addr>,
}

impl From<Route6> for RouteOf<Ipv6Addr> {
    fn from(route: Route6) -> Self {
        Self {
            gateway: route.gateway,
            device: route.device,
            ..Self::new(route.destination, 0, RouteScope::Universe)
        }
    }
}

impl<A: NetlinkFamily> RouteOf<A> {
    /// A route to `destination` through device `device` and nothing else.
    pub fn new(destination: A::Net, device: u32, scope: RouteScope) -> Self {
        Self {
            destination,
            device: Some(device),
            gateway: None,
            source: None,
            scope,
            onlink: false,
            encap: None,
        }
    }

    fn prefix_len(&self) -> u8 {
        self.destination.into().prefix_len()
    }

    /// The destination attribute: none for a default route.
    fn destination_attribute(&self) -> Option<RouteAttribute> {
        let network = A::from_ip(self.destination.into().network())?;
        (self.prefix_len() > 0).then(|| RouteAttribute::Destination(network.route_address()))
    }

    fn header(&self) -> RouteHeader {
        RouteHeader {
            address_family: A::ADDRESS_FAMILY,
            destination_prefix_length: self.prefix_len(),
            table: RouteHeader::RT_TABLE_MAIN,
            ..Default::default()
        }
    }

    /// The message adding or replacing it, as `ip route` sends it (protocol boot).
    pub fn message(&self) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header = self.header();
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = self.scope;
        message.header.kind = RouteType::Unicast;
        if self.onlink {
            message.header.flags = RouteFlags::Onlink;
        }
        let attributes = &mut message.attributes;
        attributes.extend(self.destination_attribute());
        if let Some(encap) = self.encap {
            attributes.push(RouteAttribute::EncapType(RouteLwEnCapType::Ip));
            attributes.push(RouteAttribute::Encap(vec![
                RouteLwTunnelEncap::Ip(RouteIpTunnel::Id(encap.id)),
                RouteLwTunnelEncap::Ip(RouteIpTunnel::Destination(encap.destination)),
                RouteLwTunnelEncap::Ip(RouteIpTunnel::Ttl(encap.ttl)),
            ]));
        }
        if let Some(gateway) = self.gateway {
            attributes.push(RouteAttribute::Gateway(gateway.route_address()));
        }
        if let Some(device) = self.device {
            attributes.push(RouteAttribute::Oif(device));
        }
        if let Some(source) = self.source {
            attributes.push(RouteAttribute::PrefSource(source.route_address()));
        }
        message
    }

    /// The message deleting it: destination, device and gateway (if set), any scope
    /// and protocol (as `ip route del`).
    pub fn delete_message(&self) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header = self.header();
        message.header.scope = RouteScope::NoWhere;
        let attributes = &mut message.attributes;
        attributes.extend(self.destination_attribute());
        if let Some(gateway) = self.gateway {
            attributes.push(RouteAttribute::Gateway(gateway.route_address()));
        }
        if let Some(device) = self.device {
            attributes.push(RouteAttribute::Oif(device));
        }
        message
    }

    /// The typed view of a route message; `None` for other families and tables.
    pub fn from_message(message: &RouteMessage) -> Option<Self> {
        if message.header.address_family != A::ADDRESS_FAMILY {
            return None;
        }
        let mut table = u32::from(message.header.table);
        let mut destination = A::UNSPECIFIED;
        let mut route = Self::new(A::Net::default(), 0, message.header.scope);
        route.device = None;
        route.onlink = message.header.flags.contains(RouteFlags::Onlink);
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Table(id) => table = *id,
                RouteAttribute::Destination(ip) => {
                    destination = A::from_route_address(ip).unwrap_or(destination)
                }
                RouteAttribute::Gateway(ip) => {
                    route.gateway = A::from_route_address(ip).or(route.gateway)
                }
                RouteAttribute::PrefSource(ip) => {
                    route.source = A::from_route_address(ip).or(route.source)
                }
                RouteAttribute::Oif(index) => route.device = Some(*index),
                RouteAttribute::Encap(encaps) => route.encap = ip_encap(encaps),
                _ => {}
            }
        }
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            return None;
        }
        route.destination = A::net(destination, message.header.destination_prefix_length)?;
        Some(route)
    }
}

fn ip_encap(encaps: &[RouteLwTunnelEncap]) -> Option<IpEncap> {
    let mut encap = IpEncap {
        id: 0,
        destination: Ipv4Addr::UNSPECIFIED,
        ttl: 0,
    };
    let mut found = false;
    for part in encaps {
        let RouteLwTunnelEncap::Ip(field) = part else {
            continue;
        };
        found = true;
        match field {
            RouteIpTunnel::Id(id) => encap.id = *id,
            RouteIpTunnel::Destination(ip) => encap.destination = *ip,
            RouteIpTunnel::Ttl(ttl) => encap.ttl = *ttl,
            _ => {}
        }
    }
    found.then_some(encap)
}

impl<A: Family> fmt::Display for RouteOf<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route {}", self.destination)?;
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(device) = self.device {
            write!(f, " dev #{device}")?;
        }
        Ok(())
    }
}

/// A neighbour entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourOf<A> {
    pub device: u32,
    pub ip: A,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
    /// Kept resolved by the kernel (`ip neigh ... managed`, kernel >= 5.16): it
    /// re-probes the entry before it goes stale, with or without traffic to it.
    pub managed: bool,
}

/// An IPv4 neighbour entry.
pub type Neighbour = NeighbourOf<Ipv4Addr>;
/// An IPv6 neighbour entry.
pub type Neighbour6 = NeighbourOf<Ipv6Addr>;

impl<A: NetlinkFamily> NeighbourOf<A> {
    /// A permanent entry: `ip` is at `mac` behind `device` (no ARP or neighbour
    /// discovery).
    pub fn permanent(device: u32, ip: A, mac: [u8; 6]) -> Self {
        Self {
            device,
            ip,
            mac: Some(mac),
            permanent: true,
            managed: false,
        }
    }

    /// A managed entry for `ip` behind `device`: the kernel resolves its MAC and
    /// keeps it resolved.
    pub fn managed(device: u32, ip: A) -> Self {
        Self {
            device,
            ip,
            mac: None,
            permanent: false,
            managed: true,
        }
    }

    /// The message adding, replacing (with its state and MAC) or deleting it.
    pub fn message(&self) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = A::ADDRESS_FAMILY;
        message.header.ifindex = self.device;
        if self.permanent {
            message.header.state = NeighbourState::Permanent;
        }
        message.attributes = vec![NeighbourAttribute::Destination(self.ip.neighbour_address())];
        if let Some(mac) = self.mac {
            let address = NeighbourAttribute::LinkLayerAddress(mac.to_vec());
            message.attributes.push(address);
        }
        if self.managed {
            let managed = NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed);
            message.attributes.push(managed);
        }
        message
    }

    /// The typed view of a neighbour message; `None` for other families.
    pub fn from_message(message: &NeighbourMessage) -> Option<Self> {
        let ip = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(ip) => A::from_neighbour_address(ip),
            _ => None,
        })?;
        let mac = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
            _ => None,
        });
        Some(Self {
            device: message.header.ifindex,
            ip,
            mac,
            permanent: message.header.state == NeighbourState::Permanent,
            managed: message.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::ExtFlags(f) if f.contains(NeighbourExtFlags::Managed))
            }),
        })
    }
}

impl<A: fmt::Display> fmt::Display for NeighbourOf<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "neighbour {}", self.ip)?;
        if let Some(mac) = self.mac {
            write!(f, " lladdr {}", crate::netlink::mac_string(mac))?;
        }
        write!(f, " dev #{}", self.device)
    }
}

impl Netlink {
    /// The IPv4 addresses of every link.
    pub fn addresses(&mut self) -> Result<Vec<Address>> {
        self.addresses_of()
    }

    /// The IPv6 addresses of every link.
    pub fn addresses6(&mut self) -> Result<Vec<Address6>> {
        self.addresses_of()
    }

    /// The addresses of family `A` of every link.
    pub fn addresses_of<A: NetlinkFamily>(&mut self) -> Result<Vec<AddressOf<A>>> {
        let mut query = AddressMessage::default();
        query.header.family = A::ADDRESS_FAMILY;
        let what = format!("{} addresses", A::NAME);
        let messages = self.dump(RouteNetlinkMessage::GetAddress(query), &what)?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => AddressOf::from_message(a),
                _ => None,
            })
            .collect())
    }

    pub fn add_address<A: NetlinkFamily>(&mut self, address: &AddressOf<A>) -> Result<()> {
        self.write_address(address, Write::Add)
    }

    pub fn replace_address<A: NetlinkFamily>(&mut self, address: &AddressOf<A>) -> Result<()> {
        self.write_address(address, Write::Replace)
    }

    fn write_address<A: NetlinkFamily>(
        &mut self,
        address: &AddressOf<A>,
        write: Write,
    ) -> Result<()> {
        let message = RouteNetlinkMessage::NewAddress(address.message());
        self.request(message, write.flags(), &address.to_string())
    }

    pub fn delete_address<A: NetlinkFamily>(&mut self, address: &AddressOf<A>) -> Result<()> {
        let message = RouteNetlinkMessage::DelAddress(address.message());
        self.request(message, 0, &address.to_string())
    }

    /// The IPv4 routes of the main table (what `ip route show` lists).
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        self.routes_of()
    }

    /// The IPv6 routes of the main table.
    pub fn routes6(&mut self) -> Result<Vec<RouteOf<Ipv6Addr>>> {
        self.routes_of()
    }

    /// The routes of family `A` of the main table.
    pub fn routes_of<A: NetlinkFamily>(&mut self) -> Result<Vec<RouteOf<A>>> {
        let mut query = RouteMessage::default();
        query.header.address_family = A::ADDRESS_FAMILY;
        let what = format!("{} routes", A::NAME);
        let messages = self.dump(RouteNetlinkMessage::GetRoute(query), &what)?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => RouteOf::from_message(r),
                _ => None,
            })
            .collect())
    }

    pub fn add_route<A: NetlinkFamily>(&mut self, route: &RouteOf<A>) -> Result<()> {
        self.write_route(route, Write::Add)
    }

    pub fn replace_route<A: NetlinkFamily>(&mut self, route: &RouteOf<A>) -> Result<()> {
        self.write_route(route, Write::Replace)
    }

    fn write_route<A: NetlinkFamily>(&mut self, route: &RouteOf<A>, write: Write) -> Result<()> {
        let message = RouteNetlinkMessage::NewRoute(route.message());
        self.request(message, write.flags(), &route.to_string())
    }

    pub fn delete_route<A: NetlinkFamily>(&mut self, route: &RouteOf<A>) -> Result<()> {
        let message = RouteNetlinkMessage::DelRoute(route.delete_message());
        self.request(message, 0, &route.to_string())
    }

    /// [`Netlink::delete_route`] of the short IPv6 form.
    pub fn delete_route6(&mut self, route: &Route6) -> Result<()> {
        self.delete_route(&RouteOf::from(*route))
    }

    /// The IPv4 neighbour entries of every link.
    pub fn neighbours(&mut self) -> Result<Vec<Neighbour>> {
        self.neighbours_of()
    }

    /// The IPv6 neighbour entries of every link.
    pub fn neighbours6(&mut self) -> Result<Vec<Neighbour6>> {
        self.neighbours_of()
    }

    /// The neighbour entries of family `A` of every link.
    pub fn neighbours_of<A: NetlinkFamily>(&mut self) -> Result<Vec<NeighbourOf<A>>> {
        let mut query = NeighbourMessage::default();
        query.header.family = A::ADDRESS_FAMILY;
        let what = format!("{} neighbours", A::NAME);
        let messages = self.dump(RouteNetlinkMessage::GetNeighbour(query), &what)?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => NeighbourOf::from_message(n),
                _ => None,
            })
            .collect())
    }

    pub fn add_neighbour<A: NetlinkFamily>(&mut self, neighbour: &NeighbourOf<A>) -> Result<()> {
        self.write_neighbour(neighbour, Write::Add)
    }

    pub fn replace_neighbour<A: NetlinkFamily>(
        &mut self,
        neighbour: &NeighbourOf<A>,
    ) -> Result<()> {
        self.write_neighbour(neighbour, Write::Replace)
    }

    fn write_neighbour<A: NetlinkFamily>(
        &mut self,
        neighbour: &NeighbourOf<A>,
        write: Write,
    ) -> Result<()> {
        let message = RouteNetlinkMessage::NewNeighbour(neighbour.message());
        self.request(message, write.flags(), &neighbour.to_string())
    }

    pub fn delete_neighbour<A: NetlinkFamily>(&mut self, neighbour: &NeighbourOf<A>) -> Result<()> {
        let message = RouteNetlinkMessage::DelNeighbour(neighbour.message());
        self.request(message, 0, &neighbour.to_string())
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    /// `message` as the kernel would read it, parsed back.
    fn round_trip<M: Emitable + Parseable<[u8]>>(message: &M) -> M {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        M::parse(bytes.as_slice()).unwrap()
    }

    #[test]
    fn an_overlay_route_reads_back_as_written_with_its_encap() {
        let mut route = Route::new("10.244.1.0/24".parse().unwrap(), 9, RouteScope::Universe);
        route.gateway = Some("10.244.1.1".parse().unwrap());
        route.source = Some("10.244.0.1".parse().unwrap());
        route.onlink = true;
        route.encap = Some(IpEncap {
            id: 1,
            destination: "198.51.100.2".parse().unwrap(),
            ttl: 64,
        });
        let message = round_trip(&route.message());
        assert_eq!(message.header.protocol, RouteProtocol::Boot);
        assert_eq!(message.header.kind, RouteType::Unicast);
        assert_eq!(Route::from_message(&message), Some(route));
    }

    #[test]
    fn a_default_route_has_no_destination_and_a_pod_route_is_scope_link() {
        let mut default = Route::new(Ipv4Net::default(), 3, RouteScope::Universe);
        default.gateway = Some("169.254.1.1".parse().unwrap());
        default.onlink = true;
        let message = default.message();
        assert!(!message
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert_eq!(Route::from_message(&round_trip(&message)), Some(default));

        let pod = Route::new("10.244.0.5/32".parse().unwrap(), 4, RouteScope::Link);
        let message = round_trip(&pod.message());
        assert_eq!(message.header.scope, RouteScope::Link);
        assert_eq!(Route::from_message(&message), Some(pod.clone()));
        // Deleting matches any scope, by destination and device.
        let delete = round_trip(&pod.delete_message());
        assert_eq!(delete.header.scope, RouteScope::NoWhere);
        assert_eq!(
            Route::from_message(&delete).map(|r| (r.destination, r.device)),
            Some((pod.destination, pod.device))
        );
    }

    #[test]
    fn routes_of_other_tables_and_families_are_not_read() {
        let pod = Route::new("10.244.0.5/32".parse().unwrap(), 4, RouteScope::Link);
        let mut local = pod.message();
        local.header.table = 255;
        assert_eq!(Route::from_message(&round_trip(&local)), None);
        let mut by_attribute = pod.message();
        by_attribute.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(Route::from_message(&round_trip(&by_attribute)), None);
        let mut ipv6 = RouteMessage::default();
        ipv6.header.address_family = AddressFamily::Inet6;
        assert_eq!(Route::from_message(&ipv6), None);
    }

    #[test]
    fn neighbours_and_addresses_read_back_as_written() {
        let gateway = Neighbour::permanent(3, "169.254.1.1".parse().unwrap(), [0xee; 6]);
        let message = round_trip(&gateway.message());
        assert_eq!(message.header.state, NeighbourState::Permanent);
        assert_eq!(Neighbour::from_message(&message), Some(gateway));
        let forget = Neighbour {
            mac: None,
            permanent: false,
            ..gateway
        };
        assert_eq!(
            Neighbour::from_message(&round_trip(&forget.message())),
            Some(forget)
        );
        let node = Neighbour::managed(2, "198.51.100.2".parse().unwrap());
        let message = round_trip(&node.message());
        assert_eq!(message.header.state, NeighbourState::None);
        assert_eq!(Neighbour::from_message(&message), Some(node));

        let address = Address {
            device: 3,
            ip: "10.244.0.5".parse().unwrap(),
            prefix_len: 32,
        };
        assert_eq!(
            Address::from_message(&round_trip(&address.message())),
            Some(address)
        );
        // A point-to-point address: the local one is the interface's.
        let mut peer = address.message();
        peer.attributes = vec![
            AddressAttribute::Address("10.0.0.2".parse().unwrap()),
            AddressAttribute::Local("10.0.0.1".parse().unwrap()),
        ];
        assert_eq!(
            Address::from_message(&round_trip(&peer)).map(|a| a.ip),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_addresses_routes_and_neighbours_read_back_as_written_by_the_same_code() {
        let address = Address6 {
            device: 3,
            ip: "fd00:10:244::5".parse().unwrap(),
            prefix_len: 128,
        };
        let message = round_trip(&address.message());
        assert_eq!(message.header.family, AddressFamily::Inet6);
        assert_eq!(message.header.flags, AddressHeaderFlags::Nodad);
        assert_eq!(Address6::from_message(&message), Some(address));
        assert_eq!(Address::from_message(&message), None);
        assert_eq!(
            address.message().header.flags,
            AddressHeaderFlags::Nodad,
            "no DAD for IPv6 only"
        );
        let ipv4 = Address {
            device: 3,
            ip: "10.244.0.5".parse().unwrap(),
            prefix_len: 32,
        };
        assert_eq!(ipv4.message().header.flags, AddressHeaderFlags::empty());

        let default = Route6 {
            destination: Ipv6Net::default(),
            device: Some(3),
            gateway: Some("fe80::ecee:eeff:feee:eeee".parse().unwrap()),
        };
        let route = RouteOf::from(default);
        let message = round_trip(&route.message());
        assert_eq!(message.header.address_family, AddressFamily::Inet6);
        assert_eq!(message.header.scope, RouteScope::Universe);
        assert!(!message
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert_eq!(RouteOf::from_message(&message), Some(route.clone()));
        assert_eq!(Route::from_message(&message), None);
        let delete = round_trip(&route.delete_message());
        assert_eq!(
            RouteOf::<Ipv6Addr>::from_message(&delete).map(|r| (r.device, r.gateway)),
            Some((default.device, default.gateway))
        );
        let pod = RouteOf::from(Route6 {
            destination: "fd00:10:244::5/128".parse().unwrap(),
            device: Some(4),
            gateway: None,
        });
        assert_eq!(
            RouteOf::from_message(&round_trip(&pod.message())),
            Some(pod)
        );

        let gateway =
            Neighbour6::permanent(3, "fe80::ecee:eeff:feee:eeee".parse().unwrap(), [0xee; 6]);
        let message = round_trip(&gateway.message());
        assert_eq!(message.header.family, AddressFamily::Inet6);
        assert_eq!(Neighbour6::from_message(&message), Some(gateway));
        assert_eq!(Neighbour::from_message(&message), None);
    }
}
