//! `cargo xtask image`: the Ferrite OCI image from the release binaries, built here
//! without a registry: deploy/assemble-rootfs lays out what deploy/image-contents
//! lists (Debian bookworm packages unpacked by mmdebstrap, the binaries, the eBPF
//! object, the shipped CNI plugins), umoci packs it as one layer into an OCI layout,
//! and the layout is archived for `ctr images import`. deploy/Dockerfile runs the same
//! script on the same list, so both images hold the same files.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{
    build,
    prerequisites::{check, Need},
    process::{cargo, require_root, root, run, stdout_of},
};

/// The image's repository, as deploy/daemonset.yaml names it.
pub const REPOSITORY: &str = "ghcr.io/ferrite-net/ferrite";

/// $PATH in the image (Debian's, as the Dockerfile's base has it).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn command() -> Result<()> {
    check("image", Need::Run);
    require_root("cargo xtask image")?;
    build::ebpf()?;
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "ferrite-agent",
        "--bins",
    ]))?;
    let archive = build()?;
    println!("image: {}", archive.display());
    Ok(())
}

/// The tag: the workspace's version.
pub fn tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn image_dir() -> PathBuf {
    root().join("target/image")
}

/// The OCI archive `build` writes.
pub fn archive_path() -> PathBuf {
    image_dir().join(format!("ferrite-{}.oci.tar", tag()))
}

/// Pack the release binaries (already built) into the image; returns the OCI archive
/// (an OCI image layout in a tar, its index naming the tag). The Debian part is
/// cached in target/image/cache/ under a name made from the package list.
pub fn build() -> Result<PathBuf> {
    let dir = image_dir();
    let rootfs = dir.join("rootfs");
    let layout = dir.join("oci");
    for old in [&rootfs, &layout] {
        if old.exists() {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    std::fs::create_dir_all(&dir)?;
    run(Command::new(root().join("deploy/assemble-rootfs"))
        .arg(root())
        .arg(&rootfs)
        .arg(dir.join("cache")))?;
    let image = format!("{}:{}", layout.display(), tag());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(&rootfs)
        .arg("/"))?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.entrypoint",
        "ferrite",
        "--config.env",
        &format!("PATH={PATH}"),
    ]))?;
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let archive = archive_path();
    run(Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout)
        .args(["oci-layout", "index.json", "blobs"]))?;
    report(&rootfs, &layout, &archive)?;
    std::fs::remove_dir_all(&rootfs)?;
    Ok(archive)
}

fn du(path: &Path) -> u64 {
    stdout_of(Command::new("du").args(["-sb"]).arg(path))
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The image's size, unpacked and compressed, and what takes the room.
fn report(rootfs: &Path, layout: &Path, archive: &Path) -> Result<()> {
    let unpacked = du(rootfs);
    let parts = [
        ("usr/local/bin/ferrite", "ferrite"),
        ("usr/local/bin/ferrite-cni", "ferrite-cni"),
        ("usr/local/bin/ferrite-datapath.bpf.o", "eBPF object"),
        ("usr/lib/ferrite/cni", "CNI plugins"),
    ];
    let mut ours = 0;
    let mut detail = Vec::new();
    for (path, name) in parts {
        let size = du(&rootfs.join(path));
        ours += size;
        detail.push(format!("{name} {}", mib(size)));
    }
    detail.push(format!("Debian (nftables, glibc) {}", mib(unpacked - ours)));
    println!(
        "image: {REPOSITORY}:{}: {} unpacked ({}), {} compressed (layout {}, archive {})",
        tag(),
        mib(unpacked),
        detail.join(", "),
        mib(du(&layout.join("blobs"))),
        layout.display(),
        archive.display(),
    );
    Ok(())
}
