//! What every part of the lab uses: the root check, unique names, commands, waiting.
use std::{
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// MAC of every host-side veth (Calico's choice): pods need one static neighbour entry.
/// Long enough for any step to settle on a loaded 2-core machine; only a bound on
/// waiting, never a performance assertion.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Fails with a clear message when not root (BPF and netns need it).
pub fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this test needs root (BPF maps/programs and network namespaces): run `cargo xtask test` as root");
    }
    Ok(())
}

/// A name unique to this process and call, short enough for netns and node names.
pub fn unique(label: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "fe{}x{}-{label}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn run_ip(args: &[&str]) -> Result<()> {
    sh("ip", args).map(drop)
}

/// Poll `check` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
