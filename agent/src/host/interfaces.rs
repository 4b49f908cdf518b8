//! The interfaces of the calling thread's network namespace: index, MAC, MTU,
//! driver, addresses and aliases (read with socket ioctls and netlink: /sys/class/net
//! shows the namespace sysfs was mounted in, which need not be this one).
use std::{collections::BTreeMap, os::fd::AsRawFd};

use anyhow::{Context, Result};
use tracing::warn;

use crate::{netlink::Netlink, plan::Interface};

/// The network interfaces of the current network namespace, by name.
pub fn interfaces() -> Result<BTreeMap<String, Interface>> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut out = BTreeMap::new();
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        let Some(link) = ifaddr.address.as_ref().and_then(|a| a.as_link_addr()) else {
            continue;
        };
        let Some(mac) = link.addr() else { continue };
        out.insert(
            ifaddr.interface_name.clone(),
            Interface {
                ifindex: link.ifindex() as u32,
                mac,
                mtu: interface_mtu(&socket, &ifaddr.interface_name)?,
            },
        );
    }
    if out.is_empty() {
        warn!("no network interfaces with a link-layer address found");
    }
    Ok(out)
}

/// The MTU of interface `name` (SIOCGIFMTU: /sys/class/net shows the devices of the
/// mount namespace's network namespace, which need not be this one).
fn interface_mtu(socket: &impl std::os::fd::AsRawFd, name: &str) -> Result<u32> {
    nix::ioctl_read_bad!(get_mtu, nix::libc::SIOCGIFMTU, nix::libc::ifreq);
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    let name_room = request.ifr_name.len() - 1; // keep the terminating NUL
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(name_room))
    {
        *slot = byte as nix::libc::c_char;
    }
    // SAFETY: the request names an interface; the kernel fills `ifru_mtu` only.
    unsafe { get_mtu(socket.as_raw_fd(), &mut request) }
        .with_context(|| format!("reading the MTU of {name}"))?;
    Ok(unsafe { request.ifr_ifru.ifru_mtu } as u32)
}

/// The driver of interface `name` in the calling thread's network namespace
/// (ETHTOOL_GDRVINFO), e.g. `veth`; `None` if the device does not say.
pub fn driver(name: &str) -> Option<String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    #[repr(C)]
    struct DriverInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    nix::ioctl_readwrite_bad!(ethtool, nix::libc::SIOCETHTOOL, nix::libc::ifreq);
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    // SAFETY: plain old data; all zeroes is a valid value of both.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    let name_room = request.ifr_name.len() - 1;
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(name_room))
    {
        *slot = byte as nix::libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut DriverInfo).cast();
    // SAFETY: the request names an interface and points at a drvinfo buffer.
    unsafe { ethtool(socket.as_raw_fd(), &mut request) }.ok()?;
    let end = info
        .driver
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The interface of the current network namespace that has `address`, if any.
pub fn interface_with_address(address: std::net::Ipv4Addr) -> Result<Option<String>> {
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        let found = ifaddr
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .is_some_and(|a| a.ip() == address);
        if found {
            return Ok(Some(ifaddr.interface_name));
        }
    }
    Ok(None)
}

/// The subnets of interface `name`'s IPv4 addresses (address and netmask): the
/// hosts on-link there.
pub fn subnets_of(name: &str) -> Result<Vec<ipnet::Ipv4Net>> {
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        if ifaddr.interface_name != name {
            continue;
        }
        let address = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in());
        let mask = ifaddr.netmask.as_ref().and_then(|a| a.as_sockaddr_in());
        if let (Some(address), Some(mask)) = (address, mask) {
            let prefix = u32::from(mask.ip()).leading_ones() as u8;
            if let Ok(net) = ipnet::Ipv4Net::new(address.ip(), prefix) {
                out.push(net.trunc());
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Every IPv4 address of the current network namespace's interfaces, with the
/// interface holding it.
pub fn ipv4_addresses() -> Result<Vec<(String, std::net::Ipv4Addr)>> {
    let mut out = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs()? {
        if let Some(address) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.push((ifaddr.interface_name, address.ip()));
        }
    }
    Ok(out)
}

/// The index of interface `name` in the calling thread's network namespace (a
/// socket ioctl, unlike /sys/class/net which shows the namespace sysfs was mounted in).
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

pub fn link_exists(name: &str) -> bool {
    ifindex(name).is_some()
}

/// The alias of link `name` (the plugin records the owning container id there),
/// `None` if the link has none or does not exist.
pub fn link_alias(name: &str) -> Option<String> {
    Netlink::open().ok()?.link(name).ok()??.alias
}

/// Record who wired a host veth in its alias (one the IPAM files cannot forge).
pub fn set_link_alias(name: &str, alias: &str) -> Result<()> {
    let mut netlink = Netlink::open()?;
    let index = netlink.link_index(name)?;
    Ok(netlink.set_alias((index, name), alias)?)
}
