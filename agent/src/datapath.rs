//! Loading the eBPF object and attaching it so it outlives the agent: maps, the
//! programs and every link are pinned under /sys/fs/bpf/ferrite/<node>/. A restart
//! (or an upgrade: a new object) reuses the pinned maps, their entries untouched, and
//! keeps the pinned links, moving each to the newly loaded program with one
//! BPF_LINK_UPDATE: no moment without a program, no packet seen by neither.
//! A pinned map whose layout the new object does not share is re-created.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::MapInfo,
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use ferrite_common::{map_names, program_names, VXLAN_DEVICE};
use tracing::{info, warn};

use crate::{files::create_private_dir, plan::Interface};

pub const BPF_FS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub const OBJECT_FILE_NAME: &str = "ferrite-datapath.bpf.o";

/// Where a node's maps, program and links are pinned.
pub fn pin_dir(node: &str) -> PathBuf {
    Path::new(BPF_FS_ROOT).join("ferrite").join(node)
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// The eBPF object: `--bpf-object`, else $FERRITE_BPF_OBJECT, else next to the
/// executable, else `target/bpf/` (where `cargo xtask build-ebpf` puts it).
pub fn find_object(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("FERRITE_BPF_OBJECT") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let candidates = [
        dir.join(OBJECT_FILE_NAME),
        dir.join("../bpf").join(OBJECT_FILE_NAME),
        dir.join("../../bpf").join(OBJECT_FILE_NAME),
        PathBuf::from("/usr/lib/ferrite").join(OBJECT_FILE_NAME),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "{OBJECT_FILE_NAME} not found (run `cargo xtask build-ebpf` or pass --bpf-object)"
            )
        })
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

/// How much the datapath logs through aya-log (its `AYA_LOG_LEVEL`, set at load).
/// Drops are logged at `debug`, so the default `off` keeps logging off the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl DatapathLog {
    /// aya-log-common's level numbering (Error = 1 ... Debug = 4).
    fn level(self) -> u8 {
        self as u8
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    /// Whether the links pinned before this agent started run its programs now.
    links_adopted: bool,
}

impl Datapath {
    /// Load the object with its maps pinned in `pin_dir` (reused when already there)
    /// and pin the from-pod program so the CNI plugin can attach it too.
    pub fn load(
        object: &Path,
        pin_dir: &Path,
        log: DatapathLog,
        capacities: &BTreeMap<String, u32>,
    ) -> Result<Self> {
        ensure_bpffs()?;
        create_private_dir(pin_dir)?;
        create_private_dir(&links_dir(pin_dir))?;
        let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
        let parsed = aya_obj::Object::parse(&bytes)
            .with_context(|| format!("parsing {}", object.display()))?;
        recreate_incompatible_maps(&parsed, pin_dir, capacities)?;
        let map_paths: Vec<(&str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, entries) in capacities {
            loader.map_max_entries(name, *entries);
        }
        let level = log.level();
        loader.override_global("AYA_LOG_LEVEL", &level, true);
        let mut ebpf = loader
            .load(&bytes)
            .with_context(|| format!("loading {}", object.display()))?;
        for name in [
            program_names::FROM_POD,
            program_names::FROM_OVERLAY,
            program_names::FROM_UPLINK,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifier rejected {name}"))?;
            let program_pin = pin_dir.join(name);
            // Existing links keep the program they run; new attachments use this one.
            let _ = fs::remove_file(&program_pin);
            program.pin(&program_pin)?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::FROM_WORLD)
            .context("ferrite_from_world missing from the object")?
            .try_into()?;
        xdp.load()
            .with_context(|| format!("verifier rejected {}", program_names::FROM_WORLD))?;
        let logger = match log {
            DatapathLog::Off => None,
            _ => EbpfLogger::init(&mut ebpf)
                .map_err(|e| warn!("datapath logs unavailable: {e}"))
                .ok(),
        };
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            logger,
            links_adopted: false,
        })
    }

    /// Forward what the datapath logged since the last call to the agent's log.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Interfaces that have a pinned link (the datapath is attached to them).
    pub fn attached(&self) -> Result<Vec<String>> {
        attached_interfaces(&self.pin_dir)
    }

    /// Unpin (and so detach) the link of `interface`.
    pub fn detach(&self, interface: &str) -> Result<()> {
        detach(&self.pin_dir, interface)
    }

    /// Attach `program` to `interface`'s tcx ingress and pin the link, unless a link
    /// is pinned there already. Returns whether a new attachment was made.
    pub fn ensure_attached(&mut self, interface: &str, program: &str) -> Result<bool> {
        if pinned_link(&links_dir(&self.pin_dir).join(interface))?.is_some() {
            return Ok(false);
        }
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .context("program missing")?
            .try_into()?;
        attach_and_pin(program, interface, &self.pin_dir)
    }

    /// Once per agent: move every link pinned by an earlier agent (or by the CNI
    /// plugin from its program pin) to this agent's copy of its program, in place.
    /// Links of interfaces that are gone are left to the caller's cleanup.
    pub fn adopt_pinned_links(
        &mut self,
        uplink: Option<&str>,
        interfaces: &BTreeMap<String, Interface>,
    ) -> Result<()> {
        if self.links_adopted {
            return Ok(());
        }
        for link in self.attached()? {
            let program = if link.starts_with(XDP_LINK_PREFIX) {
                program_names::FROM_WORLD
            } else if link == VXLAN_DEVICE {
                program_names::FROM_OVERLAY
            } else if uplink == Some(link.as_str()) {
                program_names::FROM_UPLINK
            } else {
                program_names::FROM_POD
            };
            if interfaces.contains_key(link_device(&link))
                && self.replace_program(&link, program)?
            {
                info!(link, program, "link moved to this agent's program");
            }
        }
        self.links_adopted = true;
        Ok(())
    }

    /// Move the link pinned as `link_name` to this agent's copy of `program`, with one
    /// BPF_LINK_UPDATE (after a restart or an upgrade). Returns whether it changed.
    fn replace_program(&mut self, link_name: &str, program: &str) -> Result<bool> {
        let Some(link) = pinned_link(&links_dir(&self.pin_dir).join(link_name))? else {
            return Ok(false);
        };
        let program = self.ebpf.program_mut(program).context("program missing")?;
        if link.info()?.program_id() == program.info()?.id() {
            return Ok(false);
        }
        let context = || format!("replacing the program of link {link_name}");
        // Closing our handle afterwards leaves the link to its pin.
        match program {
            Program::SchedClassifier(program) => {
                let id = program
                    .attach_to_link(SchedClassifierLink::try_from(link)?)
                    .with_context(context)?;
                drop(program.take_link(id)?);
            }
            Program::Xdp(program) => {
                let id = program
                    .attach_to_link(XdpLink::try_from(link)?)
                    .with_context(context)?;
                drop(program.take_link(id)?);
            }
            _ => bail!("{link_name}: unexpected program type"),
        }
        Ok(true)
    }
}

/// The link pinned at `link_pin`, if there is a live one; a stale pin is removed.
fn pinned_link(link_pin: &Path) -> Result<Option<FdLink>> {
    if !link_pin.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(link_pin) {
        // The FdLink holds the link open; the pin stays.
        Ok(link) => Ok(Some(FdLink::from(link))),
        Err(_) => {
            let _ = fs::remove_file(link_pin);
            Ok(None)
        }
    }
}

impl Datapath {
    /// Attach the XDP program to `interface` (the uplink) and pin the link as
    /// `xdp:<interface>`, unless already pinned. Returns whether it attached now.
    pub fn ensure_xdp_attached(&mut self, interface: &str) -> Result<bool> {
        let link_pin = links_dir(&self.pin_dir).join(xdp_link_name(interface));
        if pinned_link(&link_pin)?.is_some() {
            return Ok(false);
        }
        let program: &mut Xdp = self
            .ebpf
            .program_mut(program_names::FROM_WORLD)
            .context("program missing")?
            .try_into()?;
        let link_id = program
            .attach(interface, XdpMode::default())
            .with_context(|| format!("attaching XDP to {interface}"))?;
        let fd_link: FdLink = program
            .take_link(link_id)?
            .try_into()
            .context("XDP link is not a bpf_link (kernel < 5.9?)")?;
        fd_link
            .pin(&link_pin)
            .with_context(|| format!("pinning {}", link_pin.display()))?;
        Ok(true)
    }
}

/// Remove the pins of maps the `parsed` object defines differently (type, key or
/// value size, flags, or capacity after `capacities`), so loading creates them anew.
/// Programs still running keep the old map until their link is moved to the new
/// program; the agent refills Service maps before that (see `agent::reconcile`).
/// Conntrack or affinity entries of a re-created map are lost: those flows re-balance.
fn recreate_incompatible_maps(
    parsed: &aya_obj::Object,
    pin_dir: &Path,
    capacities: &BTreeMap<String, u32>,
) -> Result<()> {
    for name in map_names::ALL {
        let pin = pin_dir.join(name);
        let (Some(wanted), Ok(pinned)) = (parsed.maps.get(name), MapInfo::from_pin(&pin)) else {
            continue;
        };
        let capacity = capacities
            .get(name)
            .copied()
            .unwrap_or(wanted.max_entries());
        let layout = |map_type: u32, key: u32, value: u32, flags: u32, entries: u32| {
            format!("type {map_type}, key {key} B, value {value} B, flags {flags:#x}, {entries} entries")
        };
        let pinned_layout = layout(
            pinned.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            pinned.key_size(),
            pinned.value_size(),
            pinned.map_flags(),
            pinned.max_entries(),
        );
        let wanted_layout = layout(
            wanted.map_type(),
            wanted.key_size(),
            wanted.value_size(),
            wanted.map_flags(),
            capacity,
        );
        if pinned_layout != wanted_layout {
            warn!(
                map = name,
                pinned = %pinned_layout,
                wanted = %wanted_layout,
                "pinned map does not match the new object: re-creating it"
            );
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
    }
    Ok(())
}

/// Pin name of the XDP link of `interface` (its tcx link is pinned as `interface`).
/// bpffs refuses dots in names; interface names cannot contain ':'.
pub fn xdp_link_name(interface: &str) -> String {
    format!("{XDP_LINK_PREFIX}{interface}")
}

pub const XDP_LINK_PREFIX: &str = "xdp:";

/// The interface a link pin belongs to.
pub fn link_device(link_name: &str) -> &str {
    link_name.strip_prefix(XDP_LINK_PREFIX).unwrap_or(link_name)
}

/// Attach `program` to `interface`'s tcx ingress and pin the link in `pin_dir`.
/// The agent and the CNI plugin may race to attach to a new pod's veth: the pin
/// decides. The loser's link is dropped (detached) and it returns `false`; while
/// both are attached only the first runs to a verdict, so no packet is seen twice.
pub fn attach_and_pin(
    program: &mut SchedClassifier,
    interface: &str,
    pin_dir: &Path,
) -> Result<bool> {
    let link_pin = links_dir(pin_dir).join(interface);
    let link_id = program
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching to {interface} (tcx ingress)"))?;
    let link = program.take_link(link_id)?;
    let fd_link: FdLink = link.try_into().context("tcx link is not an fd link")?;
    match fd_link.pin(&link_pin) {
        Ok(_) => Ok(true),
        Err(aya::pin::PinError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(nix::libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("pinning {}", link_pin.display())),
    }
}

/// Attach the pinned from-pod program of the node whose pins are in `pin_dir` to a
/// pod's host veth (what the CNI plugin does, with or without a running agent).
/// A pin left by an earlier interface of the same name is replaced.
pub fn attach_pinned_from_pod(pin_dir: &Path, interface: &str) -> Result<()> {
    let program_pin = pin_dir.join(program_names::FROM_POD);
    let mut program = SchedClassifier::from_pin(&program_pin)
        .with_context(|| format!("opening {}", program_pin.display()))?;
    let link_pin = links_dir(pin_dir).join(interface);
    if link_pin.exists() {
        detach(pin_dir, interface)?;
    }
    attach_and_pin(&mut program, interface, pin_dir)?;
    Ok(())
}

pub fn attached_interfaces(pin_dir: &Path) -> Result<Vec<String>> {
    let dir = links_dir(pin_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Unpin (and so detach) the link of `interface`.
pub fn detach(pin_dir: &Path, interface: &str) -> Result<()> {
    let path = links_dir(pin_dir).join(interface);
    match PinnedLink::from_pin(&path) {
        // Dropping the unpinned fd link detaches it.
        Ok(link) => drop(link.unpin()?),
        Err(_) => fs::remove_file(&path)?,
    }
    Ok(())
}

/// Remove everything Ferrite pinned for a node: links (detaching them), the program
/// and the maps. The node is back to plain Linux networking afterwards.
pub fn uninstall(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    for interface in attached_interfaces(pin_dir)? {
        detach(pin_dir, &interface)?;
    }
    let _ = fs::remove_dir(links_dir(pin_dir));
    for entry in fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            bail!(
                "unexpected directory {} in the pin directory",
                path.display()
            );
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    fs::remove_dir(pin_dir)?;
    if let Some(parent) = pin_dir.parent() {
        // The shared ferrite/ directory goes when its last node is gone.
        let _ = fs::remove_dir(parent);
    }
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
