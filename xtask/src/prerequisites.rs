//! What the build, tests and demo need from the machine, in one list. `cargo xtask
//! setup` installs what is missing from it; every other command only checks it and
//! says what is missing, so none of them changes the machine behind the user's back.
use std::process::Command;

use crate::process::{is_root, stdout_of};

/// Which commands need a prerequisite.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Need {
    /// Building the eBPF object: every command that builds.
    Build,
    /// Only running the tests, the demo, the benchmark or the soak.
    Run,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Item {
    /// A Debian package.
    Apt(&'static str),
    /// A PyPI package at this version.
    Pip {
        package: &'static str,
        version: &'static str,
    },
    /// A rustup component of the nightly toolchain.
    NightlyComponent(&'static str),
    /// bpf-linker at this version, built against LLVM 22.
    BpfLinker(&'static str),
    /// bpffs mounted at /sys/fs/bpf, where the agent pins its maps.
    Bpffs,
}

#[derive(Clone, Copy, Debug)]
pub struct Prerequisite {
    pub need: Need,
    pub item: Item,
}

const fn build(item: Item) -> Prerequisite {
    Prerequisite {
        need: Need::Build,
        item,
    }
}

const fn run(item: Item) -> Prerequisite {
    Prerequisite {
        need: Need::Run,
        item,
    }
}

/// Everything, in the order `setup` installs it (bpf-linker builds against LLVM).
pub const PREREQUISITES: &[Prerequisite] = &[
    // LLVM 22 for bpf-linker, which links the eBPF object.
    build(Item::Apt("llvm-22-dev")),
    build(Item::Apt("libpolly-22-dev")),
    build(Item::Apt("libclang-22-dev")),
    build(Item::Apt("clang-22")),
    run(Item::Apt("bpftool")),
    run(Item::Apt("iproute2")),
    run(Item::Apt("iperf3")),
    run(Item::Apt("iptables")),
    run(Item::Apt("nftables")),
    run(Item::Apt("tcpdump")),
    run(Item::Apt("util-linux")),
    // checksum offload on/off in the overlay reliability test.
    run(Item::Apt("ethtool")),
    // portmap/bandwidth/tuning: the CNI chaining tests.
    run(Item::Apt("containernetworking-plugins")),
    // The CRI API for the image's end-to-end test (k8s-cri compiles its protos).
    build(Item::Apt("protobuf-compiler")),
    // The image (`cargo xtask image`): the Debian part unpacked by mmdebstrap, packed
    // into an OCI layout by umoci. Its end-to-end test runs it under containerd (its
    // CRI plugin, as kubelet drives it) with runc.
    run(Item::Apt("mmdebstrap")),
    run(Item::Apt("umoci")),
    run(Item::Apt("containerd")),
    run(Item::Apt("runc")),
    // objcopy: the test image's debug binaries without their debug info.
    run(Item::Apt("binutils")),
    // HTTP connection rates in `cargo xtask bench clusterip`.
    run(Item::Apt("wrk")),
    // The deploy manifests' schema validator.
    run(Item::Pip {
        package: "kubernetes-validate",
        version: "1.37.0",
    }),
    // The eBPF crate builds `core` itself (build-std).
    build(Item::NightlyComponent("rust-src")),
    build(Item::BpfLinker("0.13.0")),
    run(Item::Bpffs),
];

impl Prerequisite {
    /// Whether a command needing `need` needs this.
    fn needed_for(&self, need: Need) -> bool {
        self.need == Need::Build || need == Need::Run
    }
}

impl Item {
    fn is_missing(&self) -> bool {
        match *self {
            Item::Apt(package) => {
                stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                    != "install ok installed"
            }
            Item::Pip { package, version } => {
                !stdout_of(Command::new("python3").args(["-m", "pip", "show", package]))
                    .contains(&format!("Version: {version}"))
            }
            Item::NightlyComponent(component) => !stdout_of(Command::new("rustup").args([
                "component",
                "list",
                "--toolchain",
                "nightly",
                "--installed",
            ]))
            .lines()
            .any(|l| l.starts_with(component)),
            Item::BpfLinker(version) => {
                !stdout_of(Command::new("bpf-linker").arg("--version")).contains(version)
            }
            // Only root can mount it or use it, so it is not asked of anyone else
            // (`test` then warns that the BPF tests will fail).
            Item::Bpffs => is_root() && !bpffs_mounted(),
        }
    }

    /// What it is, as the user would look for it.
    pub fn describe(&self) -> String {
        match *self {
            Item::Apt(package) => format!("apt package {package}"),
            Item::Pip { package, version } => format!("PyPI package {package}=={version}"),
            Item::NightlyComponent(component) => {
                format!("rustup component {component} of the nightly toolchain")
            }
            Item::BpfLinker(version) => format!("bpf-linker {version} (cargo install, LLVM 22)"),
            Item::Bpffs => "bpffs mounted at /sys/fs/bpf".into(),
        }
    }
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
}

/// The prerequisites in `list` a command needing `need` needs and the machine lacks.
pub fn missing(list: &[Prerequisite], need: Need) -> Vec<Item> {
    list.iter()
        .filter(|p| p.needed_for(need) && p.item.is_missing())
        .map(|p| p.item)
        .collect()
}

/// Exit non-zero, naming each missing prerequisite and the command that installs it,
/// if the machine lacks any that `command` needs. Installs nothing.
pub fn check(command: &str, need: Need) {
    let missing = missing(PREREQUISITES, need);
    if !missing.is_empty() {
        // Printed as is and exiting: this is the message for the user, not an error
        // to wrap or to show with a backtrace.
        eprintln!("{}", report(command, &missing));
        std::process::exit(1);
    }
}

fn report(command: &str, missing: &[Item]) -> String {
    let mut text = format!("{command}: missing prerequisites (nothing was installed):\n");
    for item in missing {
        text += &format!("  - {}\n", item.describe());
    }
    text += "install them with `cargo xtask setup` (as root), then run this again";
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_apt_package_is_named_with_the_command_that_installs_it() {
        let list = [
            run(Item::Apt("ferrite-no-such-package")),
            build(Item::Pip {
                package: "ferrite-no-such-package",
                version: "0.0.0",
            }),
        ];
        let missing = missing(&list, Need::Run);
        assert_eq!(
            missing,
            [
                Item::Apt("ferrite-no-such-package"),
                Item::Pip {
                    package: "ferrite-no-such-package",
                    version: "0.0.0"
                }
            ]
        );
        assert_eq!(
            report("test", &missing),
            "test: missing prerequisites (nothing was installed):\n  \
             - apt package ferrite-no-such-package\n  \
             - PyPI package ferrite-no-such-package==0.0.0\n\
             install them with `cargo xtask setup` (as root), then run this again"
        );
    }

    #[test]
    fn building_asks_only_for_what_the_build_needs() {
        let list = [
            run(Item::Apt("ferrite-no-such-package")),
            build(Item::BpfLinker("0.0.0-no-such-version")),
        ];
        assert_eq!(
            missing(&list, Need::Build),
            [Item::BpfLinker("0.0.0-no-such-version")]
        );
    }

    #[test]
    fn the_list_names_each_prerequisite_once() {
        for (i, p) in PREREQUISITES.iter().enumerate() {
            assert!(
                !PREREQUISITES[..i].iter().any(|q| q.item == p.item),
                "{} twice",
                p.item.describe()
            );
        }
    }
}
