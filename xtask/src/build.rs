//! `cargo xtask build-ebpf` and `cargo xtask build`: the eBPF object (nightly,
//! bpfel) and the release binaries, and the environment telling the tests, demo and
//! bench where they are.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{
    prerequisites::{check, Need},
    process::{cargo, root, run},
};

const OBJECT_NAME: &str = "ferrite-datapath.bpf.o";

/// Environment the outer cargo sets that must not leak into the nightly eBPF build.
const CARGO_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

pub fn ebpf_command() -> Result<()> {
    check("build-ebpf", Need::Build);
    ebpf()
}

pub fn release_command() -> Result<()> {
    check("build", Need::Build);
    release()
}

/// Nightly cargo in the eBPF crate, without the outer cargo's environment.
pub fn nightly_cargo_in_ebpf_crate() -> Command {
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo"])
        .current_dir(root().join("datapath-ebpf"));
    for var in CARGO_ENV {
        cargo.env_remove(var);
    }
    cargo
}

fn object_path() -> PathBuf {
    root().join("target/bpf").join(OBJECT_NAME)
}

/// Build the eBPF object into target/bpf/.
pub fn ebpf() -> Result<()> {
    // Target, build-std, linker and `-C debuginfo=2 -C link-arg=--btf` (BTF is what
    // makes bpftool print named fields) come from datapath-ebpf/.cargo/config.toml.
    run(nightly_cargo_in_ebpf_crate().args(["build", "--release", "--locked"]))?;
    let built = root().join("datapath-ebpf/target/bpfel-unknown-none/release/ferrite-datapath");
    let out = object_path();
    std::fs::create_dir_all(out.parent().unwrap())?;
    // Into a new file renamed over the old one: a reader never sees half an object, and
    // a hard-linked copy of the target directory (another checkout's) keeps its own.
    let partial = out.with_extension("o.partial");
    std::fs::copy(&built, &partial).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&partial, &out).with_context(|| format!("renaming to {}", out.display()))?;
    println!("build-ebpf: {}", out.display());
    Ok(())
}

/// The eBPF object and the userspace binaries, release.
pub fn release() -> Result<()> {
    ebpf()?;
    run(cargo().args(["build", "--release", "--locked", "--bins"]))
}

/// Environment telling tests, demo and bench where the binaries are.
pub fn with_artifacts<'a>(command: &'a mut Command, profile: &str) -> &'a mut Command {
    command.env("FERRITE_BPF_OBJECT", object_path()).env(
        "FERRITE_BIN",
        root().join("target").join(profile).join("ferrite"),
    )
}
