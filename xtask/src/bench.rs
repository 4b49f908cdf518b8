//! `cargo xtask bench [section]...`: builds the release binaries and runs ferrite-bench.
use std::process::Command;

use anyhow::Result;

use crate::{
    build,
    process::{require_root, root, run},
    setup::setup,
};

pub fn command(sections: &[String]) -> Result<()> {
    require_root("the benchmark")?;
    setup()?;
    build::release()?;
    run(build::with_artifacts(
        Command::new(root().join("target/release/ferrite-bench")).args(sections),
        "release",
    ))
}
