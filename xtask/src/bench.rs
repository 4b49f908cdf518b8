//! `cargo xtask bench [section]...`: builds the release binaries and runs ferrite-bench.
use std::process::Command;

use anyhow::Result;

use crate::{
    build,
    prerequisites::{check, Need},
    process::{require_root, root, run},
};

pub fn command(sections: &[String]) -> Result<()> {
    require_root("the benchmark")?;
    check("bench", Need::Run);
    build::release()?;
    run(build::with_artifacts(
        Command::new(root().join("target/release/ferrite-bench")).args(sections),
        "release",
    ))
}
