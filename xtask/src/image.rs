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

pub fn command(debug: bool) -> Result<()> {
    check("image", Need::Run);
    require_root("cargo xtask image")?;
    build::ebpf()?;
    let binaries = if debug {
        run(cargo().args(["build", "--locked", "-p", "ferrite-agent", "--bins"]))?;
        Binaries::Debug
    } else {
        run(cargo().args([
            "build",
            "--release",
            "--locked",
            "-p",
            "ferrite-agent",
            "--bins",
        ]))?;
        Binaries::Release
    };
    let archive = build(binaries)?;
    println!("image: {}", archive.display());
    Ok(())
}

/// The binaries an image holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Binaries {
    /// target/release: the image users run (`cargo xtask image`).
    Release,
    /// target/debug with its debug info stripped: the image `cargo xtask test` runs
    /// in its end-to-end test, from the build the suite makes anyway (a release
    /// build would add minutes on a fresh clone). Same files otherwise.
    Debug,
}

impl Binaries {
    fn suffix(self) -> &'static str {
        match self {
            Binaries::Release => "",
            Binaries::Debug => "-debug",
        }
    }
}

/// The tag: the workspace's version.
pub fn tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn image_dir() -> PathBuf {
    root().join("target/image")
}

/// The OCI archive `build` writes.
pub fn archive_path(binaries: Binaries) -> PathBuf {
    image_dir().join(format!("ferrite-{}{}.oci.tar", tag(), binaries.suffix()))
}

/// Pack the binaries (already built) into the image; returns the OCI archive (an OCI
/// image layout in a tar, its index naming the tag). The Debian part is cached in
/// target/image/cache/ under a name made from the package list.
pub fn build(binaries: Binaries) -> Result<PathBuf> {
    let dir = image_dir();
    let suffix = binaries.suffix();
    let rootfs = dir.join(format!("rootfs{suffix}"));
    let layout = dir.join(format!("oci{suffix}"));
    let stripped = dir.join("debug-bin");
    for old in [&rootfs, &layout, &stripped] {
        if old.exists() {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    std::fs::create_dir_all(&dir)?;
    let mut assemble = Command::new(root().join("deploy/assemble-rootfs"));
    assemble.arg(root()).arg(&rootfs).arg(dir.join("cache"));
    if binaries == Binaries::Debug {
        std::fs::create_dir_all(&stripped)?;
        for binary in ["ferrite", "ferrite-cni"] {
            run(Command::new("objcopy")
                .arg("--strip-debug")
                .arg(root().join("target/debug").join(binary))
                .arg(stripped.join(binary)))?;
        }
        assemble.env("FERRITE_BINARIES", &stripped);
    }
    run(&mut assemble)?;
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
    let archive = archive_path(binaries);
    run(Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout)
        .args(["oci-layout", "index.json", "blobs"]))?;
    report(binaries, &rootfs, &layout, &archive)?;
    std::fs::remove_dir_all(&rootfs)?;
    if stripped.exists() {
        std::fs::remove_dir_all(&stripped)?;
    }
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
fn report(binaries: Binaries, rootfs: &Path, layout: &Path, archive: &Path) -> Result<()> {
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
    detail.push(format!(
        "Debian (nftables, iptables, glibc) {}",
        mib(unpacked - ours)
    ));
    if binaries == Binaries::Debug {
        detail.insert(0, "debug binaries, debug info stripped".into());
    }
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
