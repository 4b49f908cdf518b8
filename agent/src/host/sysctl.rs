//! The kernel settings the datapath relies on, written only when not set already (a
//! container with a read-only /proc/sys then still works where they are).
use anyhow::{Context, Result};

/// Let `lo` accept packets whose source is one of the node's own addresses: the
/// datapath hands the node's processes the answers of their per-packet Service flows
/// there, and the source of a NodePort's answer is the node's own address (which
/// the stack otherwise drops as a martian). Only the node itself can send on `lo`.
pub fn accept_local_sources_on_lo() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").context("setting net.ipv4.conf.lo.accept_local")
}

/// Make sure IPv4 forwarding is on. Already on (kubeadm's preflight requires it) needs
/// no write, so a container with a read-only /proc/sys works.
pub fn enable_forwarding() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").context("enabling IPv4 forwarding (net.ipv4.ip_forward)")
}
