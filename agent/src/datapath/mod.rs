//! Loading the eBPF object and attaching it so it outlives the agent: maps, the
//! programs and every link are pinned under /sys/fs/bpf/ferrite/<node>/. A restart
//! (or an upgrade: a new object) reuses the pinned maps, their entries untouched, and
//! keeps the pinned links, moving each to the newly loaded program with one
//! BPF_LINK_UPDATE: no moment without a program, no packet seen by neither.
//! A pinned map whose layout the new object does not share is re-created.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, MapInfo, ProgramArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, LinkOrder, Program, SchedClassifier, TcAttachType,
        TestRun, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use ferrite_common::{map_names, program_names, tail_call, VXLAN_DEVICE};
use tracing::{info, warn};

use crate::{
    bpf_syscall::{bpf, bpf_obj_get},
    files::create_private_dir,
    plan::Interface,
};

mod mounts;
pub use mounts::{cgroup2_directory, default_cgroup_root, ensure_bpffs};

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

/// Where a pinned link attaches a program; its pin name under `links/` says it:
/// `<device>` (tcx ingress), `egress:<device>` (tcx egress), `xdp:<device>`,
/// `cgroup:<hook>` (a socket-level hook on the node's cgroup subtree). bpffs refuses
/// dots in names; interface names cannot contain ':'.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attachment {
    Ingress(String),
    Egress(String),
    Xdp(String),
    Cgroup(String),
}

const EGRESS_PREFIX: &str = "egress:";
const XDP_PREFIX: &str = "xdp:";
const CGROUP_PREFIX: &str = "cgroup:";

impl Attachment {
    pub fn from_pin_name(name: &str) -> Self {
        if let Some(device) = name.strip_prefix(XDP_PREFIX) {
            Self::Xdp(device.into())
        } else if let Some(device) = name.strip_prefix(EGRESS_PREFIX) {
            Self::Egress(device.into())
        } else if let Some(hook) = name.strip_prefix(CGROUP_PREFIX) {
            Self::Cgroup(hook.into())
        } else {
            Self::Ingress(name.into())
        }
    }

    pub fn pin_name(&self) -> String {
        match self {
            Self::Ingress(device) => device.clone(),
            Self::Egress(device) => format!("{EGRESS_PREFIX}{device}"),
            Self::Xdp(device) => format!("{XDP_PREFIX}{device}"),
            Self::Cgroup(hook) => format!("{CGROUP_PREFIX}{hook}"),
        }
    }

    /// The network device it is attached to (none for cgroup hooks).
    pub fn device(&self) -> Option<&str> {
        match self {
            Self::Ingress(device) | Self::Egress(device) | Self::Xdp(device) => Some(device),
            Self::Cgroup(_) => None,
        }
    }
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
    /// The datapath's clock and CLOCK_MONOTONIC read together at load: the kernel's
    /// HZ is measured against them once a second has passed.
    clock_origin: (u64, std::time::Instant),
    /// The kernel's HZ (jiffies a second), once measured.
    hz: std::cell::OnceCell<u64>,
}

/// The TC programs loaded, and the ones pinned by name in the node's pin directory:
/// the CNI plugin attaches the pod programs from their pins; `ferrite explain` runs
/// the explain copies loaded with the node's programs (their XDP one is pinned too).
const TC_PROGRAMS: [(&str, bool); 14] = [
    (program_names::FROM_POD, true),
    // Held by its `ferrite_progs` slot (`fill_tail_calls`).
    (program_names::FROM_POD6, false),
    (program_names::TO_POD, true),
    (program_names::FROM_OVERLAY, false),
    (program_names::FROM_OVERLAY6, false),
    (program_names::FROM_UPLINK, false),
    (program_names::FROM_HOST, false),
    (program_names::EXPLAIN_POD, true),
    (program_names::EXPLAIN_OVERLAY, true),
    // Held by their `ferrite_progs` slots, as the programs they explain.
    (program_names::EXPLAIN_POD6, false),
    (program_names::EXPLAIN_OVERLAY6, false),
    (program_names::EXPLAIN_UPLINK, true),
    (program_names::EXPLAIN_SOCK, true),
    // Pinned for the node's maps to find (`maps::NodeMaps::open`).
    (program_names::PURGE, true),
];

/// Point each slot of `ferrite_progs` at `ebpf`'s (loaded) program for it. The map
/// is pinned: programs still running from an earlier agent (until their links move)
/// jump to these too, as the next agent's will.
pub fn fill_tail_calls(ebpf: &mut Ebpf) -> Result<()> {
    for (slot, name) in tail_call::PROGRAMS {
        let program: &SchedClassifier = ebpf
            .program(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        let fd = program.fd()?.try_clone()?;
        let mut slots: ProgramArray<&mut MapData> = ebpf
            .map_mut(map_names::TAIL_CALLS)
            .with_context(|| format!("{} missing", map_names::TAIL_CALLS))?
            .try_into()?;
        slots
            .set(slot, &fd, 0)
            .with_context(|| format!("putting {name} in slot {slot}"))?;
    }
    Ok(())
}

/// Run `ferrite_clock` once: the jiffies it wrote over the test packet.
fn read_clock(program: &SchedClassifier) -> Result<u64> {
    // The smallest frame test_run takes for an skb program: an Ethernet header.
    let frame = [0u8; 14];
    let mut out = [0u8; 14];
    let result = program
        .test_run(aya::programs::TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .context("running ferrite_clock")?;
    anyhow::ensure!(result.return_value == 0, "ferrite_clock failed");
    Ok(u64::from_ne_bytes(out[..8].try_into().expect("8 bytes")))
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
        for (name, pinned) in TC_PROGRAMS {
            let program: &mut SchedClassifier = program_of_object(&mut ebpf, name)?;
            program
                .load()
                .with_context(|| format!("verifier rejected {name}"))?;
            if !pinned {
                continue;
            }
            let program_pin = pin_dir.join(name);
            // Existing links keep the program they run; new attachments use this one.
            let _ = fs::remove_file(&program_pin);
            program.pin(&program_pin)?;
        }
        fill_tail_calls(&mut ebpf)?;
        for (name, _) in program_names::SOCKET_LB {
            let program: &mut CgroupSockAddr = program_of_object(&mut ebpf, name)?;
            program
                .load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        let xdp: &mut Xdp = program_of_object(&mut ebpf, program_names::FROM_WORLD)?;
        xdp.load()
            .with_context(|| format!("verifier rejected {}", program_names::FROM_WORLD))?;
        let explain: &mut Xdp = program_of_object(&mut ebpf, program_names::EXPLAIN_WORLD)?;
        explain
            .load()
            .with_context(|| format!("verifier rejected {}", program_names::EXPLAIN_WORLD))?;
        let explain_pin = pin_dir.join(program_names::EXPLAIN_WORLD);
        let _ = fs::remove_file(&explain_pin);
        explain.pin(&explain_pin)?;
        let clock: &mut SchedClassifier = program_of_object(&mut ebpf, program_names::CLOCK)?;
        clock
            .load()
            .with_context(|| format!("verifier rejected {}", program_names::CLOCK))?;
        let clock_origin = (read_clock(clock)?, std::time::Instant::now());
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
            clock_origin,
            hz: std::cell::OnceCell::new(),
        })
    }

    /// The datapath's clock now (jiffies, as conntrack entries are stamped) and the
    /// kernel's HZ; `None` during the first second after load, while HZ cannot be
    /// told yet (userspace has no other way to it: CONFIG_HZ is not exported, and
    /// `/proc/timer_list` is masked in containers).
    pub fn clock(&self) -> Result<Option<(u64, u64)>> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program_names::CLOCK)
            .context("ferrite_clock missing")?
            .try_into()?;
        let now = read_clock(program)?;
        if let Some(hz) = self.hz.get() {
            return Ok(Some((now, *hz)));
        }
        let (start, started) = self.clock_origin;
        let elapsed = started.elapsed();
        if elapsed < std::time::Duration::from_secs(1) {
            return Ok(None);
        }
        let hz = *self
            .hz
            .get_or_init(|| crate::conntrack_gc::hz_from(now.wrapping_sub(start), elapsed));
        Ok(Some((now, hz)))
    }

    /// The datapath's clock now (jiffies), as conntrack entries record it.
    pub fn jiffies(&self) -> Result<u64> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program_names::CLOCK)
            .context("ferrite_clock missing")?
            .try_into()?;
        read_clock(program)
    }

    /// Forward what the datapath logged since the last call to the agent's log.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Every pinned link of this node.
    pub fn attached(&self) -> Result<Vec<Attachment>> {
        attachments(&self.pin_dir)
    }

    /// Unpin (and so detach) a link.
    pub fn detach(&self, attachment: &Attachment) -> Result<()> {
        detach(&self.pin_dir, attachment)
    }

    /// Attach `program` to `interface`'s tcx ingress or egress and pin the link,
    /// unless a link is pinned there already. Returns whether a new attachment was made.
    /// The interface index the link of `attachment` runs on (0: its device is gone).
    pub fn attached_ifindex(&self, attachment: &Attachment) -> Result<Option<u32>> {
        attached_ifindex(&self.pin_dir, attachment)
    }

    pub fn ensure_attached(
        &mut self,
        interface: &str,
        direction: TcAttachType,
        program: &str,
    ) -> Result<bool> {
        let attachment = tc_attachment(interface, direction);
        let pin = links_dir(&self.pin_dir).join(attachment.pin_name());
        if pinned_link(&pin, Some(interface))?.is_some() {
            return Ok(false);
        }
        let program: &mut SchedClassifier = program_of_object(&mut self.ebpf, program)?;
        attach_and_pin(program, interface, direction, &self.pin_dir)
    }

    /// Attach the socket-level programs to the cgroup (v2) directory `root` and pin
    /// their links, unless they are pinned already. Links pinned for another root are
    /// detached first (`previous_root`: the root they were attached to). Returns
    /// whether it attached now.
    pub fn ensure_socket_lb(&mut self, root: &Path, previous_root: Option<&Path>) -> Result<bool> {
        let pinned: Vec<Attachment> = self
            .attached()?
            .into_iter()
            .filter(|a| matches!(a, Attachment::Cgroup(_)))
            .collect();
        // An agent that brings programs for more hooks (IPv6 came later) attaches all
        // again: the hooks an earlier agent pinned are not all there are.
        let every_hook_pinned = program_names::SOCKET_LB
            .iter()
            .all(|(_, hook)| pinned.contains(&Attachment::Cgroup((*hook).into())));
        if every_hook_pinned && previous_root == Some(root) {
            return Ok(false);
        }
        for attachment in &pinned {
            self.detach(attachment)?;
        }
        let cgroup = fs::File::open(root)
            .with_context(|| format!("opening the cgroup {}", root.display()))?;
        for (name, hook) in program_names::SOCKET_LB {
            let program: &mut CgroupSockAddr = program_of_object(&mut self.ebpf, name)?;
            // bpf_link_create takes no flags for cgroups (links always coexist).
            let link_id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", root.display()))?;
            let link: FdLink = program
                .take_link(link_id)?
                .try_into()
                .context("cgroup link is not a bpf_link (kernel < 5.7?)")?;
            let pin = links_dir(&self.pin_dir).join(Attachment::Cgroup(hook.into()).pin_name());
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
        }
        Ok(true)
    }

    /// Detach the socket-level programs (`--socket-lb=false`). Returns whether any were.
    pub fn remove_socket_lb(&self) -> Result<bool> {
        let mut removed = false;
        for attachment in self.attached()? {
            if matches!(attachment, Attachment::Cgroup(_)) {
                self.detach(&attachment)?;
                removed = true;
            }
        }
        Ok(removed)
    }

    /// Once per agent: move every link pinned by an earlier agent (or by the CNI
    /// plugin from its program pin) to this agent's copy of its program, in place.
    /// Links of interfaces that are gone are left to the caller's cleanup.
    pub fn adopt_pinned_links(
        &mut self,
        uplink: Option<&str>,
        more_external: &BTreeSet<String>,
        interfaces: &BTreeMap<String, Interface>,
    ) -> Result<()> {
        if self.links_adopted {
            return Ok(());
        }
        for attachment in self.attached()? {
            let Some(program) = program_of(&attachment, uplink, more_external) else {
                continue;
            };
            let present = attachment
                .device()
                .is_none_or(|device| interfaces.contains_key(device));
            let link = attachment.pin_name();
            if present && self.replace_program(&link, program)? {
                info!(link, program, "link moved to this agent's program");
            }
        }
        self.links_adopted = true;
        Ok(())
    }

    /// Move the link pinned as `link_name` to this agent's copy of `program`, with one
    /// BPF_LINK_UPDATE (after a restart or an upgrade). Returns whether it changed.
    fn replace_program(&mut self, link_name: &str, program: &str) -> Result<bool> {
        let attachment = Attachment::from_pin_name(link_name);
        let pin = links_dir(&self.pin_dir).join(link_name);
        let Some(link) = pinned_link(&pin, attachment.device())? else {
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
            Program::CgroupSockAddr(program) => {
                // aya has no cgroup link update: the raw BPF_LINK_UPDATE does it.
                let link_fd = bpf_obj_get(&links_dir(&self.pin_dir).join(link_name))?;
                link_update(link_fd.as_fd(), program.fd()?.as_fd()).with_context(context)?;
            }
            _ => bail!("{link_name}: unexpected program type"),
        }
        Ok(true)
    }
}

/// The program a pinned link runs, by where it is attached (`None`: not Ferrite's).
/// `more_external`: interfaces besides the uplink that hold a NodePort address.
fn program_of(
    attachment: &Attachment,
    uplink: Option<&str>,
    more_external: &BTreeSet<String>,
) -> Option<&'static str> {
    let is_host_device = |device: &str| uplink == Some(device) || device == LOOPBACK_DEVICE;
    Some(match attachment {
        Attachment::Xdp(_) => program_names::FROM_WORLD,
        Attachment::Ingress(device) if device == VXLAN_DEVICE => program_names::FROM_OVERLAY,
        Attachment::Ingress(device)
            if uplink == Some(device.as_str()) || more_external.contains(device) =>
        {
            program_names::FROM_UPLINK
        }
        Attachment::Ingress(_) => program_names::FROM_POD,
        Attachment::Egress(device) if is_host_device(device) => program_names::FROM_HOST,
        Attachment::Egress(_) => program_names::TO_POD,
        Attachment::Cgroup(hook) => program_names::SOCKET_LB
            .iter()
            .find(|(_, h)| h == hook)
            .map(|(name, _)| *name)?,
    })
}

/// The loopback device: the node's own Service traffic to its own addresses.
pub const LOOPBACK_DEVICE: &str = "lo";

/// Program `name` of the loaded object, as its type `P`.
fn program_of_object<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the object"))?;
    Ok(program.try_into()?)
}

/// BPF_LINK_UPDATE: run `program` in the link, in place (same link, no gap).
fn link_update(link: BorrowedFd, program: BorrowedFd) -> Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: nix::libc::c_long = 29;
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_LINK_UPDATE.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// The link pinned at `link_pin`, if there is a live one on `device` (for links of
/// a device); a stale pin is removed. A tcx or XDP link outlives its device, defunct
/// (attached nowhere), and a new device of the same name is another interface: such
/// a pin is removed too, so the program is attached anew.
fn pinned_link(link_pin: &Path, device: Option<&str>) -> Result<Option<FdLink>> {
    if !link_pin.exists() {
        return Ok(None);
    }
    let link = match PinnedLink::from_pin(link_pin) {
        // The FdLink holds the link open; the pin stays.
        Ok(link) => FdLink::from(link),
        Err(_) => {
            let _ = fs::remove_file(link_pin);
            return Ok(None);
        }
    };
    let Some(device) = device else {
        return Ok(Some(link));
    };
    let wanted = nix::net::if_::if_nametoindex(device).ok();
    match link_ifindex(bpf_obj_get(link_pin)?.as_fd())? {
        Some(attached) if Some(attached) != wanted => {
            warn!(
                link = %link_pin.display(),
                attached,
                device,
                "pinned link is not on the device (gone or re-created): attaching anew"
            );
            fs::remove_file(link_pin)
                .with_context(|| format!("removing {}", link_pin.display()))?;
            Ok(None)
        }
        _ => Ok(Some(link)),
    }
}

/// The interface index a tcx or XDP link is attached to (BPF_OBJ_GET_INFO_BY_FD):
/// 0 once its device is gone; `None` for links of no device (cgroup hooks).
pub fn link_ifindex(link: BorrowedFd) -> Result<Option<u32>> {
    /// `struct bpf_link_info` up to its union (8-byte aligned), whose tcx and xdp
    /// members start with the ifindex; room for the rest of the union.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        ifindex: u32,
        _rest: [u32; 31],
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: nix::libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET_INFO_BY_FD and
    // points at a buffer of `info_len` bytes that outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(matches!(info.link_type, BPF_LINK_TYPE_XDP | BPF_LINK_TYPE_TCX).then_some(info.ifindex))
}

/// The interface index the link pinned for `attachment` is attached to (0: its
/// device is gone), if it is pinned and has a device.
pub fn attached_ifindex(pin_dir: &Path, attachment: &Attachment) -> Result<Option<u32>> {
    let pin = links_dir(pin_dir).join(attachment.pin_name());
    if !pin.exists() {
        return Ok(None);
    }
    link_ifindex(bpf_obj_get(&pin)?.as_fd())
}

impl Datapath {
    /// Attach the XDP program to `interface` (the uplink) and pin the link as
    /// `xdp:<interface>`, unless already pinned. Returns whether it attached now.
    pub fn ensure_xdp_attached(&mut self, interface: &str) -> Result<bool> {
        let link_pin = links_dir(&self.pin_dir).join(Attachment::Xdp(interface.into()).pin_name());
        if pinned_link(&link_pin, Some(interface))?.is_some() {
            return Ok(false);
        }
        let program: &mut Xdp = program_of_object(&mut self.ebpf, program_names::FROM_WORLD)?;
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

fn tc_attachment(interface: &str, direction: TcAttachType) -> Attachment {
    match direction {
        TcAttachType::Egress => Attachment::Egress(interface.into()),
        _ => Attachment::Ingress(interface.into()),
    }
}

/// Attach `program` to `interface`'s tcx ingress or egress and pin the link in
/// `pin_dir`. The agent and the CNI plugin may race to attach to a new pod's veth:
/// the pin decides. The loser's link is dropped (detached) and it returns `false`;
/// while both are attached only the first runs to a verdict, so no packet is seen twice.
pub fn attach_and_pin(
    program: &mut SchedClassifier,
    interface: &str,
    direction: TcAttachType,
    pin_dir: &Path,
) -> Result<bool> {
    let link_pin = links_dir(pin_dir).join(tc_attachment(interface, direction).pin_name());
    let link_id = program
        .attach_with_options(
            interface,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching to {interface} (tcx {direction:?})"))?;
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

/// The pod programs and where each attaches on a pod's host veth: from-pod at
/// ingress (what the pod sends), to-pod at egress (what the stack sends it).
pub const POD_PROGRAMS: [(&str, TcAttachType); 2] = [
    (program_names::FROM_POD, TcAttachType::Ingress),
    (program_names::TO_POD, TcAttachType::Egress),
];

/// The links of a pod's host veth.
pub fn pod_attachments(interface: &str) -> [Attachment; 2] {
    POD_PROGRAMS.map(|(_, direction)| tc_attachment(interface, direction))
}

/// Attach the pinned pod programs of the node whose pins are in `pin_dir` to a pod's
/// host veth (what the CNI plugin does, with or without a running agent). Pins left
/// by an earlier interface of the same name are replaced. On error, what this call
/// attached is detached again.
pub fn attach_pinned_pod_programs(pin_dir: &Path, interface: &str) -> Result<()> {
    let mut attached = Vec::new();
    let result = POD_PROGRAMS.iter().try_for_each(|(name, direction)| {
        let program_pin = pin_dir.join(name);
        let mut program = SchedClassifier::from_pin(&program_pin)
            .with_context(|| format!("opening {}", program_pin.display()))?;
        let attachment = tc_attachment(interface, *direction);
        if links_dir(pin_dir).join(attachment.pin_name()).exists() {
            detach(pin_dir, &attachment)?;
        }
        attach_and_pin(&mut program, interface, *direction, pin_dir)?;
        attached.push(attachment);
        Ok(())
    });
    if result.is_err() {
        for attachment in &attached {
            let _ = detach(pin_dir, attachment);
        }
    }
    result
}

/// Every link pinned in `pin_dir`, sorted by pin name.
pub fn attachments(pin_dir: &Path) -> Result<Vec<Attachment>> {
    let dir = links_dir(pin_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names.iter().map(|n| Attachment::from_pin_name(n)).collect())
}

/// Unpin (and so detach) a link. A pin already gone is detached: the agent and the
/// CNI plugin both clean up the links of vanished interfaces, and may race to it.
pub fn detach(pin_dir: &Path, attachment: &Attachment) -> Result<()> {
    let path = links_dir(pin_dir).join(attachment.pin_name());
    let removed = match PinnedLink::from_pin(&path) {
        // Dropping the unpinned fd link detaches it.
        Ok(link) => link.unpin().map(drop).map_err(anyhow::Error::from),
        Err(_) => fs::remove_file(&path).map_err(anyhow::Error::from),
    };
    match removed {
        Err(_) if !path.exists() => Ok(()),
        other => other.with_context(|| format!("removing {}", path.display())),
    }
}

/// Remove everything Ferrite pinned for a node: links (detaching them), the program
/// and the maps. The node is back to plain Linux networking afterwards.
pub fn uninstall(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    for attachment in attachments(pin_dir)? {
        detach(pin_dir, &attachment)?;
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
