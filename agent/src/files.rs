//! Files only root may read: pins, IPAM state and runtime files are mode 0600 in
//! 0700 directories (they name pods and addresses, and pins give map access).
use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;

/// Node names end up in paths (pins, runtime files, IPAM state): lowercase DNS
/// subdomain characters only, as Kubernetes requires of Node names, and no leading
/// dot (`..` is no node), so a name can never climb out of or replace a base path.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
}

/// `--node` / `NODE_NAME` as the command line takes it: a valid node name.
pub fn node_name_arg(value: &str) -> Result<String, String> {
    if valid_node_name(value) {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is not a node name (lowercase letters, digits, '-' and '.', not starting with '.')"
        ))
    }
}

/// Create `path` (and missing parents) with mode 0700, and make it 0700 if it was
/// there already.
pub fn create_private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Write a file atomically (a temporary file, then rename) with mode 0600. A link
/// planted at the temporary name is not followed.
pub fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(content)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Runtime files shared with the CNI plugin: /run/ferrite/<node>/.
pub const RUN_DIR: &str = "/run/ferrite";

/// A node's runtime files (removed by `ferrite uninstall`).
pub fn run_dir(node: &str) -> std::path::PathBuf {
    std::path::Path::new(RUN_DIR).join(node)
}

/// Where the agent publishes this node's pod CIDR (from its Node object) for the CNI
/// plugin's IPAM when the network config does not set one: the IPv4 one, and on a
/// dual-stack node the IPv6 one on a second line.
pub fn pod_cidr_file(node: &str) -> std::path::PathBuf {
    run_dir(node).join("pod-cidr")
}

/// Write the pod CIDR file if it changed (atomically, mode 0600).
pub fn publish_pod_cidr(node: &str, cidr: Ipv4Net, cidr6: Option<ipnet::Ipv6Net>) -> Result<()> {
    let path = pod_cidr_file(node);
    let mut content = format!("{cidr}\n");
    if let Some(cidr6) = cidr6 {
        content.push_str(&format!("{cidr6}\n"));
    }
    if std::fs::read_to_string(&path).ok().as_deref() == Some(content.as_str()) {
        return Ok(());
    }
    create_private_dir(path.parent().context("pod-cidr path")?)?;
    write_private(&path, content.as_bytes()).context("publishing the pod CIDR")
}
