//! `cargo xtask soak [--minutes N]`: builds the release binaries and runs ferrite-soak.
use std::process::Command;

use anyhow::Result;

use crate::{
    build,
    prerequisites::{check, Need},
    process::{require_root, root, run},
};

pub fn command(minutes: f64) -> Result<()> {
    require_root("the soak")?;
    check("soak", Need::Run);
    build::release()?;
    run(build::with_artifacts(
        Command::new(root().join("target/release/ferrite-soak"))
            .args(["--minutes", &minutes.to_string()]),
        "release",
    ))
}
