//! Network namespaces: which one a path names, and running code inside one.
use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// A network namespace's identity: device and inode of its nsfs file (what
/// `ip netns identify` and `stat -L` compare).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// ioctl_ns(2): which kind of namespace an nsfs file refers to (a CLONE_NEW* flag).
const NS_GET_NSTYPE: u64 = 0xb703; // _IO(0xb7, 0x3)

/// The network namespace `path` names; `None` when the path is gone, is no longer
/// a namespace (a runtime unmounted it and left the empty file it was mounted on)
/// or is a namespace of another kind (`/proc/self/ns/mnt`).
pub fn netns_id(path: &Path) -> Result<Option<NetnsId>> {
    // Non-blocking: a FIFO or device at the path must not hang the plugin.
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("opening {}", path.display()))?,
    };
    let fs_type = nix::sys::statfs::fstatfs(&file)
        .with_context(|| format!("statfs {}", path.display()))?
        .filesystem_type();
    if fs_type != nix::sys::statfs::NSFS_MAGIC {
        return Ok(None);
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open file.
    let kind = unsafe { nix::libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind == -1 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("NS_GET_NSTYPE of {}", path.display()));
    }
    if kind != nix::libc::CLONE_NEWNET {
        return Ok(None);
    }
    let meta = file.metadata()?;
    Ok(Some(NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    }))
}

/// The network namespace the calling thread runs in (the node's, for the plugin).
pub fn own_netns_id() -> Result<NetnsId> {
    netns_id(Path::new("/proc/thread-self/ns/net"))?
        .context("/proc/thread-self/ns/net is not a namespace")
}

/// Run `f` on a thread inside the network namespace at `netns`; processes it spawns
/// are in that namespace too.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file =
        fs::File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("entering the pod's network namespace")?;
                f()
            })
            .join()
            .map_err(|_| anyhow!("thread in netns panicked"))?
    })
}
