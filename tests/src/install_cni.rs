//! For the tests of `ferrite install-cni`: scratch directories standing for a node's
//! /opt/cni/bin and /etc/cni/net.d and for the image's plugin directory, filled as
//! deploy/Dockerfile fills it.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result};

use crate::{
    cni::SYSTEM_PLUGIN_DIR,
    lab::{ferrite_bin, unique},
};

/// The repository's deploy/ directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The plugins the image ships: deploy/cni-plugins, read as the Dockerfile reads it
/// (`#` to the end of a line is a comment, names are separated by white space).
pub fn shipped_plugins() -> Result<Vec<String>> {
    let text = fs::read_to_string(deploy_dir().join("cni-plugins"))?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .flat_map(str::split_whitespace)
        .map(String::from)
        .collect())
}

/// A directory of this test's own under the system's temporary directory, removed
/// (with everything in it) on drop.
pub struct Scratch {
    pub root: PathBuf,
}

impl Scratch {
    pub fn new(label: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(unique(label));
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self { root })
    }

    /// `root/relative`, created with its parents.
    pub fn dir(&self, relative: &str) -> Result<PathBuf> {
        let dir = self.root.join(relative.trim_start_matches('/'));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The image's plugin directory: what deploy/Dockerfile copies there (the
    /// plugins deploy/cni-plugins names, from Debian's containernetworking-plugins).
    pub fn image_plugins(&self, relative: &str) -> Result<PathBuf> {
        let dir = self.dir(relative)?;
        for plugin in shipped_plugins()? {
            let from = Path::new(SYSTEM_PLUGIN_DIR).join(&plugin);
            fs::copy(&from, dir.join(&plugin)).with_context(|| {
                format!(
                    "copying {} (apt-get install containernetworking-plugins)",
                    from.display()
                )
            })?;
        }
        Ok(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A stand-in plugin: a shell script answering `VERSION` with `supported` (and a
/// comment making its bytes its own).
pub fn script_plugin(path: &Path, supported: &[&str], tag: &str) -> Result<()> {
    let versions = supported
        .iter()
        .map(|v| format!("\\\"{v}\\\""))
        .collect::<Vec<_>>()
        .join(",");
    fs::write(
        path,
        format!(
            "#!/bin/sh\n# {tag}\n[ \"$CNI_COMMAND\" = VERSION ] && \
             echo \"{{\\\"cniVersion\\\":\\\"1.0.0\\\",\\\"supportedVersions\\\":[{versions}]}}\"\n"
        ),
    )?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Run `ferrite install-cni` (the build's binary) with `args`.
pub fn install_cni(args: &[String]) -> Result<Output> {
    Command::new(ferrite_bin())
        .arg("install-cni")
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .context("running ferrite install-cni")
}

/// stdout and stderr of a run, for assertions and failure messages.
pub fn text_of(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether `path` is a regular file someone may execute.
pub fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
