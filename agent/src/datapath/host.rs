//! What the datapath needs to know of the host it runs on: its cgroup v2 and BPF
//! filesystems (mounted when missing) and its network interfaces (index, MTU,
//! driver, addresses), read from the current network namespace.
use std::{
    collections::BTreeMap,
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use super::{BPF_FS_MAGIC, BPF_FS_ROOT};
use crate::plan::Interface;

/// The cgroup v2 hierarchy the socket-level programs attach to by default: where it
/// is mounted (/proc/mounts); without one, a cgroup2 mount of Ferrite's own under
/// /run/ferrite/cgroupv2, as Cilium mounts one under /run/cilium.
pub fn default_cgroup_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if let Some(path) = mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    }) {
        return Ok(path);
    }
    let own = Path::new(crate::hostnet::RUN_DIR).join("cgroupv2");
    fs::create_dir_all(&own)?;
    nix::mount::mount(
        Some("none"),
        &own,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting cgroup2 at {}", own.display()))?;
    info!(path = %own.display(), "mounted a cgroup2 hierarchy for socket-level load balancing");
    Ok(own)
}

const CGROUP2_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_MAGIC)
}

/// The cgroup v2 directory `--cgroup-root` names: the path itself, or on a hybrid
/// hierarchy (cgroup v1 controllers at /sys/fs/cgroup, v2 under `unified/`, as on
/// this project's machines) the `unified` directory below it, so `/sys/fs/cgroup`
/// works on either kind of host.
pub fn cgroup2_directory(path: &Path) -> Result<PathBuf> {
    if is_cgroup2(path) {
        return Ok(path.to_path_buf());
    }
    let unified = path.join("unified");
    if is_cgroup2(&unified) {
        return Ok(unified);
    }
    bail!(
        "{} is not in a cgroup v2 hierarchy (nor is {}): socket-level load balancing \
         needs one (or --socket-lb=false)",
        path.display(),
        unified.display()
    )
}

/// Make sure a BPF filesystem is mounted at /sys/fs/bpf (pins live there).
pub fn ensure_bpffs() -> Result<()> {
    let root = Path::new(BPF_FS_ROOT);
    if let Ok(stat) = nix::sys::statfs::statfs(root) {
        if stat.filesystem_type().0 == BPF_FS_MAGIC {
            return Ok(());
        }
    }
    fs::create_dir_all(root)?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting the BPF filesystem at /sys/fs/bpf")?;
    info!("mounted bpffs at {BPF_FS_ROOT}");
    Ok(())
}

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
