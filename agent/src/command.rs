//! Running the few programs the agent still needs (`nft`, the `iptables-*-restore`
//! of the take-over): their input on stdin, their complaint in the error.
use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// Run `program args` with `input` on its stdin (`nft -f -`, `iptables-restore`):
/// what it wrote to stdout; a failure carries what it wrote to stderr.
pub fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
