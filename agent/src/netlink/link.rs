//! Links: read one by name or all, create a veth pair or the VXLAN device, set one
//! up, its MTU, MAC or alias, delete one.
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    link::{
        InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    },
    RouteNetlinkMessage,
};

use super::{Netlink, Result};

/// A link as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (IFF_UP).
    pub up: bool,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub alias: Option<String>,
}

impl Link {
    /// The typed view of a link message (pure).
    pub fn from_message(message: &LinkMessage) -> Self {
        let mut link = Link {
            index: message.header.index,
            up: message.header.flags.contains(LinkFlags::Up),
            ..Default::default()
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Address(mac) => link.mac = mac.as_slice().try_into().ok(),
                LinkAttribute::IfAlias(alias) => link.alias = Some(alias.clone()),
                _ => {}
            }
        }
        link
    }
}

/// A veth pair to create: the host end in the calling thread's namespace, the peer
/// moved into the namespace `peer_netns` refers to, both with their MAC and MTU set.
pub struct Veth<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
    pub peer_name: &'a str,
    pub peer_mac: [u8; 6],
    pub peer_netns: BorrowedFd<'a>,
    pub mtu: u32,
}

impl Veth<'_> {
    /// The RTM_NEWLINK message creating the pair (pure).
    pub fn message(&self) -> LinkMessage {
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(self.peer_name.into()),
            LinkAttribute::Mtu(self.mtu),
            LinkAttribute::Address(self.peer_mac.to_vec()),
            LinkAttribute::NetNsFd(self.peer_netns.as_raw_fd()),
        ];
        let mut message = LinkMessage::default();
        message.attributes = vec![
            LinkAttribute::IfName(self.name.into()),
            LinkAttribute::Mtu(self.mtu),
            LinkAttribute::Address(self.mac.to_vec()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        message
    }
}

/// The RTM_NEWLINK message creating a VXLAN device in external (collect_md) mode
/// with UDP port `port`, as `ip link add NAME type vxlan external dstport PORT` sends
/// it (which turns learning off too).
pub fn vxlan_message(name: &str, port: u16) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.attributes = vec![
        LinkAttribute::IfName(name.into()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Learning(false),
                InfoVxlan::Port(port),
            ])),
        ]),
    ];
    message
}

/// A message about link `index` (to change it).
fn about(index: u32) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.header.index = index;
    message
}

/// A message about the link named `name` (to read or delete it).
fn named(name: &str) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.attributes.push(LinkAttribute::IfName(name.into()));
    message
}

impl Netlink {
    /// Link `name`; an error (ENODEV) when there is none.
    pub fn existing_link(&mut self, name: &str) -> Result<Link> {
        let answer = self.get(RouteNetlinkMessage::GetLink(named(name)), name)?;
        match answer {
            RouteNetlinkMessage::NewLink(message) => Ok(Link::from_message(&message)),
            _ => Err(super::Error::unexpected("RTM_GETLINK", name)),
        }
    }

    /// Link `name`; `None` when there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>> {
        match self.existing_link(name) {
            Ok(link) => Ok(Some(link)),
            Err(e) if e.errno() == Some(nix::libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of link `name`; an error (ENODEV) when there is none.
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        Ok(self.existing_link(name)?.index)
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let messages = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "links",
        )?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(Link::from_message(link)),
                _ => None,
            })
            .collect())
    }

    pub fn add_veth(&mut self, veth: &Veth) -> Result<()> {
        let object = format!("veth {} <-> {}", veth.name, veth.peer_name);
        self.request(
            RouteNetlinkMessage::NewLink(veth.message()),
            NLM_F_CREATE | NLM_F_EXCL,
            &object,
        )
    }

    pub fn add_vxlan(&mut self, name: &str, port: u16) -> Result<()> {
        self.request(
            RouteNetlinkMessage::NewLink(vxlan_message(name, port)),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("vxlan {name} dstport {port}"),
        )
    }

    /// Set link `link` (index, name for errors) administratively up.
    pub fn set_up(&mut self, link: (u32, &str)) -> Result<()> {
        let mut message = about(link.0);
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.request(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("{} up", link.1),
        )
    }

    pub fn set_mtu(&mut self, link: (u32, &str), mtu: u32) -> Result<()> {
        let mut message = about(link.0);
        message.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("{} mtu {mtu}", link.1),
        )
    }

    pub fn set_mac(&mut self, link: (u32, &str), mac: [u8; 6]) -> Result<()> {
        let mut message = about(link.0);
        message
            .attributes
            .push(LinkAttribute::Address(mac.to_vec()));
        let object = format!("{} address {}", link.1, crate::netlink::mac_string(mac));
        self.request(RouteNetlinkMessage::SetLink(message), 0, &object)
    }

    pub fn set_alias(&mut self, link: (u32, &str), alias: &str) -> Result<()> {
        let mut message = about(link.0);
        message
            .attributes
            .push(LinkAttribute::IfAlias(alias.into()));
        self.request(
            RouteNetlinkMessage::SetLink(message),
            0,
            &format!("{} alias {alias}", link.1),
        )
    }

    /// Delete link `name` (by name, so no other link that took its index meanwhile);
    /// `false` when it was gone already.
    pub fn delete_link(&mut self, name: &str) -> Result<bool> {
        match self.request(RouteNetlinkMessage::DelLink(named(name)), 0, name) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(nix::libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    /// `message` as the kernel would read it, parsed back.
    fn round_trip(message: &LinkMessage) -> LinkMessage {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        LinkMessage::parse(bytes.as_slice()).unwrap()
    }

    #[test]
    fn a_link_message_reads_as_its_name_state_mtu_mac_and_alias() {
        let mut message = about(7);
        message.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
        message.attributes = vec![
            LinkAttribute::IfName("fer0123456789a".into()),
            LinkAttribute::Mtu(1450),
            LinkAttribute::Address(vec![0xee; 6]),
            LinkAttribute::IfAlias("ferrite:abc".into()),
        ];
        assert_eq!(
            Link::from_message(&round_trip(&message)),
            Link {
                index: 7,
                name: "fer0123456789a".into(),
                up: true,
                mtu: 1450,
                mac: Some([0xee; 6]),
                alias: Some("ferrite:abc".into()),
            }
        );
        // Down, no alias, and a hardware address that is not Ethernet's.
        message.header.flags = LinkFlags::Broadcast;
        message.attributes = vec![
            LinkAttribute::IfName("lo".into()),
            LinkAttribute::Address(vec![0; 4]),
        ];
        let link = Link::from_message(&round_trip(&message));
        assert_eq!((link.up, link.mac, link.alias), (false, None, None));
    }

    #[test]
    fn a_veth_message_names_both_ends_with_their_mac_mtu_and_the_peer_namespace() {
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let veth = Veth {
            name: "ferhost",
            mac: [0xee; 6],
            peer_name: "eth0",
            peer_mac: [0x0a, 0x58, 10, 244, 0, 5],
            peer_netns: std::os::fd::AsFd::as_fd(&netns),
            mtu: 1450,
        };
        let message = veth.message();
        assert!(message
            .attributes
            .contains(&LinkAttribute::IfName("ferhost".into())));
        assert!(message.attributes.contains(&LinkAttribute::Mtu(1450)));
        let Some(LinkAttribute::LinkInfo(info)) = message.attributes.last() else {
            panic!("no link info: {message:?}");
        };
        assert_eq!(info[0], LinkInfo::Kind(InfoKind::Veth));
        let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) = &info[1] else {
            panic!("no peer: {info:?}");
        };
        assert_eq!(
            peer.attributes,
            [
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::Mtu(1450),
                LinkAttribute::Address(vec![0x0a, 0x58, 10, 244, 0, 5]),
                LinkAttribute::NetNsFd(netns.as_raw_fd()),
            ]
        );
    }

    #[test]
    fn the_vxlan_device_is_external_with_its_port_and_no_learning() {
        let message = round_trip(&vxlan_message("ferrite_vxlan", 8472));
        let Some(LinkAttribute::LinkInfo(info)) = message.attributes.last() else {
            panic!("no link info: {message:?}");
        };
        assert_eq!(
            info[1],
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::CollectMetadata(true),
                InfoVxlan::Learning(false),
                InfoVxlan::Port(8472),
            ]))
        );
    }
}
