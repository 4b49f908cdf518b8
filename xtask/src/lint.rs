//! `cargo xtask lint`: rustfmt check and clippy -D warnings on the workspace (stable)
//! and on the eBPF crate (nightly).
use anyhow::Result;

use crate::{
    build::nightly_cargo_in_ebpf_crate,
    process::{cargo, run},
};

pub fn command() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(nightly_cargo_in_ebpf_crate().args([
        "clippy",
        "--release",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(nightly_cargo_in_ebpf_crate().args(["fmt", "--", "--check"]))
}
