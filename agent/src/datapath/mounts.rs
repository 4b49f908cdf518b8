//! The host filesystems the datapath needs: cgroup v2 (the socket-level programs
//! attach to a directory of it) and the BPF filesystem (pins), mounted when missing.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use tracing::info;

use super::{BPF_FS_MAGIC, BPF_FS_ROOT};

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
    let own = Path::new(crate::files::RUN_DIR).join("cgroupv2");
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
