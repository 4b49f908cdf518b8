//! The kernel settings the datapath relies on, written only when not set already (a
//! container with a read-only /proc/sys then still works where they are). `net` is
//! the node's /proc/sys/net: the agent's own, or the host's mounted elsewhere where
//! the container's /proc/sys is read-only (deploy/daemonset.yaml mounts it at
//! /host/proc/sys/net; the files answer for the network namespace of whoever reads
//! them, the node's with hostNetwork).
use std::path::Path;

use anyhow::{Context, Result};

/// Write `1` to `file` under `net` unless it holds it already.
fn ensure_on(net: &Path, file: &str, what: &str) -> Result<()> {
    let path = net.join(file);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(&path, "1").with_context(|| format!("{what} ({})", path.display()))
}

/// Let `lo` accept packets whose source is one of the node's own addresses: the
/// datapath hands the node's processes the answers of their per-packet Service flows
/// there, and the source of a NodePort's answer is the node's own address (which
/// the stack otherwise drops as a martian). Only the node itself can send on `lo`.
pub fn accept_local_sources_on_lo(net: &Path) -> Result<()> {
    ensure_on(
        net,
        "ipv4/conf/lo/accept_local",
        "setting net.ipv4.conf.lo.accept_local",
    )
}

/// Make sure IPv4 forwarding is on. Already on (kubeadm's preflight requires it) needs
/// no write.
pub fn enable_forwarding(net: &Path) -> Result<()> {
    ensure_on(
        net,
        "ipv4/ip_forward",
        "enabling IPv4 forwarding (net.ipv4.ip_forward)",
    )
}

/// Make sure IPv6 forwarding is on (dual-stack clusters: IPv6 pods' traffic leaves
/// through the node). Kubernetes' dual-stack preflight requires it too.
pub fn enable_forwarding6(net: &Path) -> Result<()> {
    ensure_on(
        net,
        "ipv6/conf/all/forwarding",
        "enabling IPv6 forwarding (net.ipv6.conf.all.forwarding)",
    )
}
