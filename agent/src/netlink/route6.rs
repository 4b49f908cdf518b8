//! IPv6 addresses, routes (main table) and neighbours, as much as wiring a
//! dual-stack pod needs: the pod's /128, its default route via the link-local
//! gateway, the gateway's permanent entry, the node's /128 route to the pod.
use std::{fmt, net::Ipv6Addr};

use ipnet::Ipv6Net;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};

use super::{Netlink, Result};

/// An IPv6 address of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address6 {
    pub device: u32,
    pub ip: Ipv6Addr,
    pub prefix_len: u8,
}

impl fmt::Display for Address6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} dev #{}", self.ip, self.prefix_len, self.device)
    }
}

impl Address6 {
    /// The message adding it, `nodad` (the address is the pod's alone: duplicate
    /// address detection would only hold it tentative for a second).
    fn message(&self) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet6;
        message.header.prefix_len = self.prefix_len;
        message.header.index = self.device;
        message.header.flags = AddressHeaderFlags::Nodad;
        message.attributes = vec![AddressAttribute::Address(self.ip.into())];
        message
    }

    fn from_message(message: &AddressMessage) -> Option<Self> {
        let ip = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(std::net::IpAddr::V6(ip)) => Some(*ip),
            _ => None,
        })?;
        Some(Self {
            device: message.header.index,
            ip,
            prefix_len: message.header.prefix_len,
        })
    }
}

/// An IPv6 unicast route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub destination: Ipv6Net,
    pub device: Option<u32>,
    pub gateway: Option<Ipv6Addr>,
}

impl fmt::Display for Route6 {
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

impl Route6 {
    fn message(&self) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header = RouteHeader {
            address_family: AddressFamily::Inet6,
            destination_prefix_length: self.destination.prefix_len(),
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Boot,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
            ..Default::default()
        };
        let attributes = &mut message.attributes;
        if self.destination.prefix_len() > 0 {
            let destination = RouteAddress::Inet6(self.destination.network());
            attributes.push(RouteAttribute::Destination(destination));
        }
        if let Some(gateway) = self.gateway {
            attributes.push(RouteAttribute::Gateway(RouteAddress::Inet6(gateway)));
        }
        if let Some(device) = self.device {
            attributes.push(RouteAttribute::Oif(device));
        }
        message
    }

    fn from_message(message: &RouteMessage) -> Option<Self> {
        if message.header.address_family != AddressFamily::Inet6 {
            return None;
        }
        let mut table = u32::from(message.header.table);
        let mut destination = Ipv6Addr::UNSPECIFIED;
        let mut route = Self {
            destination: Ipv6Net::default(),
            device: None,
            gateway: None,
        };
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Table(id) => table = *id,
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => destination = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => route.gateway = Some(*ip),
                RouteAttribute::Oif(index) => route.device = Some(*index),
                _ => {}
            }
        }
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            return None;
        }
        route.destination =
            Ipv6Net::new(destination, message.header.destination_prefix_length).ok()?;
        Some(route)
    }
}

/// An IPv6 neighbour entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour6 {
    pub device: u32,
    pub ip: Ipv6Addr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

impl fmt::Display for Neighbour6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "neighbour {}", self.ip)?;
        if let Some(mac) = self.mac {
            write!(f, " lladdr {}", crate::netlink::mac_string(mac))?;
        }
        write!(f, " dev #{}", self.device)
    }
}

impl Neighbour6 {
    /// A permanent entry: `ip` is at `mac` behind `device` (no neighbour discovery).
    pub fn permanent(device: u32, ip: Ipv6Addr, mac: [u8; 6]) -> Self {
        Self {
            device,
            ip,
            mac: Some(mac),
            permanent: true,
        }
    }

    fn message(&self) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet6;
        message.header.ifindex = self.device;
        if self.permanent {
            message.header.state = NeighbourState::Permanent;
        }
        message.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet6(
            self.ip,
        ))];
        if let Some(mac) = self.mac {
            message
                .attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        message
    }

    fn from_message(message: &NeighbourMessage) -> Option<Self> {
        let ip = message.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(*ip),
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
        })
    }
}

impl Netlink {
    /// The IPv6 addresses of every link.
    pub fn addresses6(&mut self) -> Result<Vec<Address6>> {
        let mut query = AddressMessage::default();
        query.header.family = AddressFamily::Inet6;
        let messages = self.dump(RouteNetlinkMessage::GetAddress(query), "IPv6 addresses")?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Address6::from_message(a),
                _ => None,
            })
            .collect())
    }

    pub fn add_address6(&mut self, address: &Address6) -> Result<()> {
        let message = RouteNetlinkMessage::NewAddress(address.message());
        self.request(message, NLM_F_CREATE | NLM_F_EXCL, &address.to_string())
    }

    /// The IPv6 routes of the main table.
    pub fn routes6(&mut self) -> Result<Vec<Route6>> {
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet6;
        let messages = self.dump(RouteNetlinkMessage::GetRoute(query), "IPv6 routes")?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Route6::from_message(r),
                _ => None,
            })
            .collect())
    }

    pub fn add_route6(&mut self, route: &Route6) -> Result<()> {
        let message = RouteNetlinkMessage::NewRoute(route.message());
        self.request(message, NLM_F_CREATE | NLM_F_EXCL, &route.to_string())
    }

    pub fn replace_route6(&mut self, route: &Route6) -> Result<()> {
        let message = RouteNetlinkMessage::NewRoute(route.message());
        self.request(message, NLM_F_CREATE | NLM_F_REPLACE, &route.to_string())
    }

    pub fn delete_route6(&mut self, route: &Route6) -> Result<()> {
        let message = RouteNetlinkMessage::DelRoute(route.message());
        self.request(message, 0, &route.to_string())
    }

    /// The IPv6 neighbour entries of every link.
    pub fn neighbours6(&mut self) -> Result<Vec<Neighbour6>> {
        let mut query = NeighbourMessage::default();
        query.header.family = AddressFamily::Inet6;
        let messages = self.dump(RouteNetlinkMessage::GetNeighbour(query), "IPv6 neighbours")?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Neighbour6::from_message(n),
                _ => None,
            })
            .collect())
    }

    pub fn replace_neighbour6(&mut self, neighbour: &Neighbour6) -> Result<()> {
        let message = RouteNetlinkMessage::NewNeighbour(neighbour.message());
        self.request(
            message,
            NLM_F_CREATE | NLM_F_REPLACE,
            &neighbour.to_string(),
        )
    }
}
