//! `cargo xtask test [-- ARGS]`: the whole suite (unit, BPF_PROG_TEST_RUN, netns
//! end-to-end) under nextest when it is installed, else `cargo test`; ARGS go to the
//! runner. Afterwards, the machine's own cgroup root must hold no Ferrite program.
use std::process::Command;

use anyhow::{bail, Result};

use crate::{
    build, image,
    prerequisites::{check, Need},
    process::{cargo, is_root, run, stdout_of, succeeds},
};

pub fn command(args: &[String]) -> Result<()> {
    check("test", Need::Run);
    build::ebpf()?;
    run(cargo().args(["build", "--locked", "-p", "ferrite-agent"]))?;
    if !is_root() {
        println!("test: not root: BPF and netns tests will fail; run as root");
    }
    // The image its end-to-end test runs under containerd (tests/tests/image.rs):
    // built as `cargo xtask image` builds it, from the debug binaries just built
    // (debug info stripped) rather than a release build of its own.
    let image = if is_root() {
        Some(image::build(image::Binaries::Debug)?)
    } else {
        None
    };
    let nextest = succeeds(cargo().args(["nextest", "--version"]));
    let mut command = cargo();
    if nextest {
        command.args([
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ]);
    } else {
        command.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
    }
    if let Some(image) = image {
        command.env("FERRITE_IMAGE", image);
    }
    let tests = run(build::with_artifacts(command.args(args), "debug"));
    // Tests and the demo attach socket-level load balancing to cgroup
    // subtrees of their own: the machine's own root must never get it.
    let root_clean = check_cgroup_root();
    tests.and(root_clean)
}

/// Fail if any Ferrite program is attached to the machine's cgroup v2 root.
fn check_cgroup_root() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let Some(root) = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].to_string())
    }) else {
        return Ok(());
    };
    let shown = stdout_of(Command::new("bpftool").args(["cgroup", "show", &root]));
    let ours: Vec<&str> = shown.lines().filter(|l| l.contains("ferrite")).collect();
    if !ours.is_empty() {
        bail!("Ferrite programs on the machine's own cgroup root {root}: {ours:?}");
    }
    println!("test: no Ferrite program on the machine's cgroup root {root}");
    Ok(())
}
