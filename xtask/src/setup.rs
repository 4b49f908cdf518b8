//! `cargo xtask setup`: install what the build, tests and demo need and the machine
//! is missing (apt packages, PyPI packages, rust-src, bpf-linker, bpffs).
use std::process::Command;

use anyhow::Result;

use crate::process::{is_root, run, stdout_of};

/// Debian packages the build, tests and demo use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libclang-22-dev",
    "clang-22",
    "bpftool",
    "iproute2",
    "iperf3",
    "iptables",
    "nftables",
    "tcpdump",
    "util-linux",
    // checksum offload on/off in the overlay reliability test.
    "ethtool",
    // portmap/bandwidth/tuning: the CNI chaining tests.
    "containernetworking-plugins",
    // HTTP connection rates in `cargo xtask bench clusterip`.
    "wrk",
];
/// PyPI packages the tests use: the manifest schema validator.
const PIP_PACKAGES: &[(&str, &str)] = &[("kubernetes-validate", "1.37.0")];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                != "install ok installed"
        })
        .collect();
    if !missing.is_empty() {
        println!("setup: installing apt packages: {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    for (package, version) in PIP_PACKAGES {
        let installed = stdout_of(Command::new("python3").args(["-m", "pip", "show", package]));
        if !installed.contains(&format!("Version: {version}")) {
            println!("setup: installing {package}=={version} from PyPI");
            run(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "-q",
                &format!("{package}=={version}"),
            ]))?;
        }
    }
    let components = stdout_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = stdout_of(Command::new("bpf-linker").arg("--version"));
    if !linker.contains(BPF_LINKER_VERSION) {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} (takes a few minutes)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("PATH", path))?;
    }
    if is_root() {
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
        if !mounted {
            println!("setup: mounting bpffs at /sys/fs/bpf");
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
    }
    Ok(())
}
