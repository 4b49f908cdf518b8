//! Network namespaces: which one a path names, and running code inside one.
use std::{
    fs,
    os::{
        fd::AsFd,
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

/// The namespace `path` names; `None` when the path is gone or is no longer a
/// namespace (a runtime unmounted it and left the empty file it was mounted on).
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
