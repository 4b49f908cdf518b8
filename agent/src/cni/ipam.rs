//! Host-local IPAM for one node's pod CIDRs (an IPv4 one and, dual-stack, an IPv6
//! one): one file per allocated address under the data directory, named by the
//! address and holding its owner as JSON (a dual-stack attachment has two). A `lock` file
//! (flock) serialises plugin runs, and `last_reserved_ip` makes allocation
//! round-robin so a released address is not handed out again at once
//! (`last_reserved_ip6` for the IPv6 range; the reference host-local plugin's layout
//! and behaviour).
//!
//! The data directory comes from the network configuration, so it is checked before
//! anything in it is touched: a real directory (never a symbolic link), owned by the
//! plugin's user, writable by nobody else. Files inside are opened without following
//! links, and one that cannot be read is skipped (its address stays taken) instead of
//! stopping every other pod's ADD and DEL.
use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{files::write_private, host::netns::NetnsId};

/// Who holds an address: the attachment (container id + interface), the host veth
/// it was wired with, and the pod's namespace (absent in files of older versions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    #[serde(rename = "hostInterface")]
    pub host_interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsRecord>,
}

/// The CNI_NETNS an attachment was made in, and the namespace it named then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRecord {
    pub path: String,
    pub id: NetnsId,
}

/// The data directory cannot be trusted; nothing in it was touched.
#[derive(Debug)]
pub struct Untrusted(pub String);

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untrusted {}

/// The allocation state of one node, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

/// An address file: its owner, or why it cannot be read.
pub type Allocation = (IpAddr, Result<Owner, String>);

/// An attachment's addresses (at most one per family) and its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub owner: Owner,
    /// Absent only in a record an interrupted run left.
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Held {
    /// Every address it holds.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }

    /// Its addresses for a message: `10.244.0.2`, `10.244.0.2 fd00::2`.
    pub fn shown(&self) -> String {
        self.addresses()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn is(&self, container_id: &str, ifname: &str) -> bool {
        self.owner.container_id == container_id && self.owner.ifname == ifname
    }
}

const LOCK_FILE: &str = "lock";
const LAST_RESERVED: &str = "last_reserved_ip";
const LAST_RESERVED6: &str = "last_reserved_ip6";
/// Owner files are a few hundred bytes; a larger one is not ours.
const MAX_FILE: u64 = 64 * 1024;

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

fn read_small(path: &Path) -> Result<Vec<u8>> {
    let file = open_nofollow(path)?;
    anyhow::ensure!(file.metadata()?.is_file(), "not a regular file");
    let mut content = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut content)?;
    anyhow::ensure!(
        content.len() as u64 <= MAX_FILE,
        "larger than {MAX_FILE} bytes"
    );
    Ok(content)
}

/// Refuse `path` unless it is a directory (not a link to one) of the plugin's user
/// that nobody else may write.
fn check_dir(path: &Path) -> Result<std::fs::Metadata> {
    let untrusted =
        |why: String| anyhow::Error::new(Untrusted(format!("{}: {why}", path.display())));
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("inspecting {}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Err(untrusted("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(untrusted("is not a directory".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(untrusted(format!(
            "is owned by uid {}, not {uid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    Ok(meta)
}

impl Store {
    /// Open and lock the store in `dir` (one node's directory inside the data
    /// directory), creating both with mode 0700 if missing; blocks while another
    /// plugin run holds it. Fails with [`Untrusted`] before touching anything when
    /// either directory is a symbolic link, someone else's or writable by others.
    pub fn lock(dir: &Path) -> Result<Self> {
        let data_dir = dir.parent().context("the store has no parent directory")?;
        if fs::symlink_metadata(data_dir).is_err() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
        }
        check_dir(data_dir)?;
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("creating {}", dir.display()))
            }
            _ => {}
        }
        let meta = check_dir(dir)?;
        if meta.mode() & 0o777 != 0o700 {
            // Not a link (checked), in a directory only we may change.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(dir.join(LOCK_FILE))
            .context("opening the IPAM lock")?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .context("locking the IPAM store")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Every address file, in address order, with its owner or why it cannot be
    /// read.
    pub fn allocations(&self) -> Result<Vec<Allocation>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(ip) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let owner = read_small(&path)
                .and_then(|content| Ok(serde_json::from_slice::<Owner>(&content)?))
                .map_err(|e| format!("{}: {e:#}", path.display()));
            out.push((ip, owner));
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    /// The readable allocations; unreadable files are reported on stderr (the
    /// runtime's log) and skipped, their addresses stay taken.
    pub fn owners(&self) -> Result<Vec<(IpAddr, Owner)>> {
        Ok(self
            .allocations()?
            .into_iter()
            .filter_map(|(ip, owner)| match owner {
                Ok(owner) => Some((ip, owner)),
                Err(why) => {
                    eprintln!("ferrite-cni: skipping unreadable IPAM file {why}");
                    None
                }
            })
            .collect())
    }

    /// The attachments, each with its addresses (in owner order). A second address
    /// of a family for one attachment (never written by this plugin) is reported
    /// and left taken.
    pub fn attachments(&self) -> Result<Vec<Held>> {
        let mut held: Vec<Held> = Vec::new();
        for (ip, owner) in self.owners()? {
            let index = match held
                .iter()
                .position(|h| h.is(&owner.container_id, &owner.ifname))
            {
                Some(index) => index,
                None => {
                    held.push(Held {
                        owner,
                        v4: None,
                        v6: None,
                    });
                    held.len() - 1
                }
            };
            let slot = &mut held[index];
            let doubled = match ip {
                IpAddr::V4(v4) => slot.v4.replace(v4).is_some(),
                IpAddr::V6(v6) => slot.v6.replace(v6).is_some(),
            };
            if doubled {
                eprintln!(
                    "ferrite-cni: {}/{} holds two addresses of a family; keeping {ip} taken",
                    slot.owner.container_id, slot.owner.ifname
                );
            }
        }
        Ok(held)
    }

    /// The addresses held by an attachment, if any.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Option<Held>> {
        Ok(self
            .attachments()?
            .into_iter()
            .find(|h| h.is(container_id, ifname)))
    }

    /// Claim the next free address of `cidr` after the last one handed out
    /// (skipping the network, broadcast and first address, which is left for a
    /// gateway as host-local does), never one with a file here or one `in_use`
    /// says is taken elsewhere. `None` when the range is full. Walks the range
    /// lazily: memory does not grow with the prefix.
    pub fn allocate(
        &self,
        cidr: Ipv4Net,
        owner: &Owner,
        in_use: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Option<Ipv4Addr>> {
        if cidr.prefix_len() > 30 {
            return Ok(None);
        }
        let first = u32::from(cidr.network()) + 2;
        let last = u32::from(cidr.broadcast()) - 1;
        let claimed = self.claim(
            u128::from(first)..=u128::from(last),
            self.last_reserved().map(|ip| u128::from(u32::from(ip))),
            owner,
            |n| IpAddr::V4(Ipv4Addr::from(n as u32)),
            |ip| matches!(ip, IpAddr::V4(v4) if in_use(v4)),
        )?;
        Ok(claimed.map(|ip| match ip {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => unreachable!("made from the IPv4 range"),
        }))
    }

    /// [`Store::allocate`] for an IPv6 range: from its third address (the network's
    /// is the subnet-router anycast address, the next left for the node as in IPv4)
    /// to its last (IPv6 has no broadcast).
    pub fn allocate6(
        &self,
        cidr: Ipv6Net,
        owner: &Owner,
        in_use: impl Fn(Ipv6Addr) -> bool,
    ) -> Result<Option<Ipv6Addr>> {
        if cidr.prefix_len() > 126 {
            return Ok(None);
        }
        let first = u128::from(cidr.network()) + 2;
        let last = u128::from(cidr.broadcast());
        let claimed = self.claim(
            first..=last,
            self.last_reserved6().map(u128::from),
            owner,
            |n| IpAddr::V6(Ipv6Addr::from(n)),
            |ip| matches!(ip, IpAddr::V6(v6) if in_use(v6)),
        )?;
        Ok(claimed.map(|ip| match ip {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("made from the IPv6 range"),
        }))
    }

    /// The first address of `range` after `last_reserved` (wrapping), as `to_ip`
    /// makes them, that has no file and is not `in_use`: its file written.
    fn claim(
        &self,
        range: RangeInclusive<u128>,
        last_reserved: Option<u128>,
        owner: &Owner,
        to_ip: impl Fn(u128) -> IpAddr,
        in_use: impl Fn(IpAddr) -> bool,
    ) -> Result<Option<IpAddr>> {
        // Never write a file this store could not read back (its DEL would find
        // nothing to release).
        let record = serde_json::to_vec(owner)?;
        anyhow::ensure!(
            record.len() as u64 <= MAX_FILE,
            "the allocation record is {} bytes, more than the {MAX_FILE} a store file may hold",
            record.len()
        );
        let (first, last) = (*range.start(), *range.end());
        let taken: BTreeSet<IpAddr> = self.allocations()?.into_iter().map(|(ip, _)| ip).collect();
        let start = last_reserved
            .filter(|last_ip| range.contains(last_ip))
            .map_or(
                first,
                |last_ip| if last_ip == last { first } else { last_ip + 1 },
            );
        let Some(ip) = (start..=last)
            .chain(first..start)
            .map(to_ip)
            .find(|ip| !taken.contains(ip) && !in_use(*ip))
        else {
            return Ok(None);
        };
        write_private(&self.dir.join(ip.to_string()), &record)?;
        Ok(Some(ip))
    }

    /// The IPv4 address handed out last (where the next search starts).
    pub fn last_reserved(&self) -> Option<Ipv4Addr> {
        self.read_last(LAST_RESERVED)
    }

    /// The IPv6 address handed out last.
    pub fn last_reserved6(&self) -> Option<Ipv6Addr> {
        self.read_last(LAST_RESERVED6)
    }

    fn read_last<T: std::str::FromStr>(&self, file: &str) -> Option<T> {
        read_small(&self.dir.join(file))
            .ok()
            .and_then(|s| String::from_utf8(s).ok())
            .and_then(|s| s.trim().parse().ok())
    }

    /// Record `ip` as handed out last in its family, once its attachment is
    /// complete (a failed ADD leaves the round-robin position as it was).
    pub fn remember_last(&self, ip: impl Into<IpAddr>) -> Result<()> {
        let ip = ip.into();
        let file = match ip {
            IpAddr::V4(_) => LAST_RESERVED,
            IpAddr::V6(_) => LAST_RESERVED6,
        };
        write_private(&self.dir.join(file), ip.to_string().as_bytes())
    }

    /// Release an address; releasing a free one is fine (DEL is idempotent).
    pub fn release(&self, ip: impl Into<IpAddr>) -> Result<()> {
        match fs::remove_file(self.dir.join(ip.into().to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Release every address of an attachment.
    pub fn release_all(&self, held: &Held) -> Result<()> {
        held.addresses().try_for_each(|ip| self.release(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
            host_interface: format!("fer{id}"),
            netns: None,
        }
    }

    fn temp_store(label: &str) -> (PathBuf, Store) {
        let base =
            std::env::temp_dir().join(format!("ferrite-ipam-{label}-{}", std::process::id()));
        if base.exists() {
            fs::remove_dir_all(&base).unwrap();
        }
        let store = Store::lock(&base.join("node")).unwrap();
        (base, store)
    }

    fn allocate(store: &Store, cidr: Ipv4Net, id: &str) -> Option<Ipv4Addr> {
        let ip = store.allocate(cidr, &owner(id), |_| false).unwrap();
        if let Some(ip) = ip {
            store.remember_last(ip).unwrap();
        }
        ip
    }

    #[test]
    fn allocates_round_robin_and_never_twice() {
        let (dir, store) = temp_store("rr");
        let cidr: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        // .0 network, .1 gateway, .7 broadcast: .2 to .6 are usable.
        let a = allocate(&store, cidr, "a").unwrap();
        let b = allocate(&store, cidr, "b").unwrap();
        assert_eq!(
            (a, b),
            ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap())
        );
        store.release(a).unwrap();
        // A released address is not reused at once.
        let c = allocate(&store, cidr, "c").unwrap();
        assert_eq!(c, "10.0.0.4".parse::<Ipv4Addr>().unwrap());
        for id in ["d", "e", "f"] {
            assert!(allocate(&store, cidr, id).is_some());
        }
        assert_eq!(allocate(&store, cidr, "g"), None);
        let found = store.find("c", "eth0").unwrap().unwrap();
        assert_eq!(found.owner, owner("c"));
        store.release(c).unwrap();
        store.release(c).unwrap();
        assert!(store.find("c", "eth0").unwrap().is_none());
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn addresses_in_use_elsewhere_and_unreadable_files_are_never_handed_out() {
        let (dir, store) = temp_store("taken");
        let cidr: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        fs::write(dir.join("node/10.0.0.2"), b"{not json").unwrap();
        fs::create_dir(dir.join("node/10.0.0.3")).unwrap();
        let elsewhere: Ipv4Addr = "10.0.0.4".parse().unwrap();
        let ip = store
            .allocate(cidr, &owner("a"), |ip| ip == elsewhere)
            .unwrap();
        assert_eq!(ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(
            store.owners().unwrap(),
            vec![(IpAddr::V4(ip.unwrap()), owner("a"))]
        );
        let bad = store.allocations().unwrap();
        assert_eq!(bad.iter().filter(|(_, o)| o.is_err()).count(), 2);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_record_too_large_to_read_back_is_never_written() {
        let (dir, store) = temp_store("large");
        let cidr: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let huge = owner(&"c".repeat(MAX_FILE as usize));
        assert!(store.allocate(cidr, &huge, |_| false).is_err());
        assert!(store.allocations().unwrap().is_empty());
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn memory_does_not_grow_with_the_prefix() {
        let (dir, store) = temp_store("wide");
        let before = crate::alloc_meter::allocated_on_this_thread();
        // A /8: sixteen million addresses.
        let ip = store
            .allocate("10.0.0.0/8".parse().unwrap(), &owner("a"), |_| false)
            .unwrap();
        let used = crate::alloc_meter::allocated_on_this_thread() - before;
        assert_eq!(ip, Some("10.0.0.2".parse().unwrap()));
        assert!(used < 1 << 20, "allocating took {used} bytes of heap");
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ipv6_ranges_allocate_round_robin_beside_ipv4_and_lazily() {
        let (dir, store) = temp_store("dual");
        let cidr4: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let cidr6: Ipv6Net = "fd00::/125".parse().unwrap();
        let dual = |id: &str| {
            let v4 = store.allocate(cidr4, &owner(id), |_| false).unwrap();
            let v6 = store.allocate6(cidr6, &owner(id), |_| false).unwrap();
            for ip in v4.map(IpAddr::V4).into_iter().chain(v6.map(IpAddr::V6)) {
                store.remember_last(ip).unwrap();
            }
            v6
        };
        // ::0 anycast, ::1 the node's: ::2 to ::7 are usable.
        assert_eq!(dual("a"), Some("fd00::2".parse().unwrap()));
        assert_eq!(dual("b"), Some("fd00::3".parse().unwrap()));
        let held = store.find("a", "eth0").unwrap().unwrap();
        assert_eq!(held.v4, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(held.v6, Some("fd00::2".parse().unwrap()));
        assert_eq!(held.shown(), "10.0.0.2 fd00::2");
        store.release_all(&held).unwrap();
        store.release_all(&held).unwrap();
        assert!(store.find("a", "eth0").unwrap().is_none());
        // Round robin: the released ::2 is not reused at once.
        let elsewhere: Ipv6Addr = "fd00::5".parse().unwrap();
        let next = store
            .allocate6(cidr6, &owner("c"), |ip| ip == elsewhere)
            .unwrap();
        assert_eq!(next, Some("fd00::4".parse().unwrap()));
        store.remember_last(next.unwrap()).unwrap();
        assert_eq!(store.last_reserved(), Some("10.0.0.3".parse().unwrap()));
        assert_eq!(store.last_reserved6(), next);
        for expected in ["fd00::6", "fd00::7", "fd00::2"] {
            let ip = store
                .allocate6(cidr6, &owner("x"), |ip| ip == elsewhere)
                .unwrap();
            assert_eq!(ip, Some(expected.parse().unwrap()));
            store.remember_last(ip.unwrap()).unwrap();
        }
        assert_eq!(
            store
                .allocate6(cidr6, &owner("y"), |ip| ip == elsewhere)
                .unwrap(),
            None
        );
        drop(store);
        fs::remove_dir_all(&dir).unwrap();

        // A /64 (2^64 addresses) walks lazily too.
        let (dir, store) = temp_store("wide6");
        let before = crate::alloc_meter::allocated_on_this_thread();
        let ip = store
            .allocate6("fd00::/64".parse().unwrap(), &owner("a"), |_| false)
            .unwrap();
        let used = crate::alloc_meter::allocated_on_this_thread() - before;
        assert_eq!(ip, Some("fd00::2".parse().unwrap()));
        assert!(used < 1 << 20, "allocating took {used} bytes of heap");
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_linked_or_foreign_data_directory_is_refused_untouched() {
        use std::os::unix::fs::symlink;
        let base =
            std::env::temp_dir().join(format!("ferrite-ipam-untrusted-{}", std::process::id()));
        if base.exists() {
            fs::remove_dir_all(&base).unwrap();
        }
        let target = base.join("elsewhere");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&target)
            .unwrap();
        let data = base.join("data");
        fs::DirBuilder::new().mode(0o700).create(&data).unwrap();
        symlink(&target, data.join("node")).unwrap();
        let error = Store::lock(&data.join("node")).err().unwrap();
        assert!(error.downcast_ref::<Untrusted>().is_some(), "{error:#}");
        let mode = fs::metadata(&target).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o755, "the link's target was not changed");
        assert!(!target.join(LOCK_FILE).exists());

        let foreign = base.join("foreign");
        fs::DirBuilder::new().mode(0o700).create(&foreign).unwrap();
        fs::DirBuilder::new()
            .mode(0o755)
            .create(foreign.join("node"))
            .unwrap();
        nix::unistd::chown(&foreign.join("node"), Some(1234.into()), None).unwrap();
        let error = Store::lock(&foreign.join("node")).err().unwrap();
        assert!(error.downcast_ref::<Untrusted>().is_some(), "{error:#}");
        assert_eq!(
            fs::metadata(foreign.join("node")).unwrap().mode() & 0o777,
            0o755
        );
        fs::remove_dir_all(base).unwrap();
    }
}
