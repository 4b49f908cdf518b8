//! `cargo xtask setup`: install every prerequisite the machine is missing, printing
//! what it installs. The commands that build or run only check (`prerequisites`).
use std::process::Command;

use anyhow::Result;

use crate::{
    prerequisites::{self, Item, Need, PREREQUISITES},
    process::run,
};

pub fn command() -> Result<()> {
    let missing = prerequisites::missing(PREREQUISITES, Need::Run);
    if missing.is_empty() {
        println!(
            "setup: nothing missing ({} prerequisites checked)",
            PREREQUISITES.len()
        );
        return Ok(());
    }
    // One apt transaction for every package.
    let apt: Vec<&str> = missing
        .iter()
        .filter_map(|item| match item {
            Item::Apt(package) => Some(*package),
            _ => None,
        })
        .collect();
    if !apt.is_empty() {
        println!("setup: installing apt packages: {}", apt.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    for item in &missing {
        install(item)?;
    }
    // Whatever an install left missing (say, bpf-linker outside $PATH) is said here,
    // not found later by a build.
    prerequisites::check("setup", Need::Run);
    Ok(())
}

fn install(item: &Item) -> Result<()> {
    match *item {
        Item::Apt(_) => Ok(()), // above, all at once
        Item::Pip { package, version } => {
            println!("setup: installing {package}=={version} from PyPI");
            run(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "-q",
                &format!("{package}=={version}"),
            ]))
        }
        Item::NightlyComponent(component) => {
            println!("setup: adding {component} to the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))
        }
        Item::BpfLinker(version) => {
            println!("setup: installing bpf-linker {version} (takes a few minutes)");
            let path = format!(
                "/usr/lib/llvm-22/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            );
            run(Command::new("cargo")
                .args(["install", "bpf-linker", "--locked", "--version", version])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("PATH", path))
        }
        Item::Bpffs => {
            println!("setup: mounting bpffs at /sys/fs/bpf");
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        }
    }
}
