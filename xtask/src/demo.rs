//! `cargo xtask demo [--keep]`: builds the release binaries and runs ferrite-demo.
use std::process::Command;

use anyhow::Result;

use crate::{
    build,
    prerequisites::{check, Need},
    process::{require_root, root, run},
};

pub fn command(keep: bool) -> Result<()> {
    require_root("the demo")?;
    check("demo", Need::Run);
    build::release()?;
    let mut demo = Command::new(root().join("target/release/ferrite-demo"));
    if keep {
        demo.arg("--keep");
    }
    run(build::with_artifacts(&mut demo, "release"))
}
