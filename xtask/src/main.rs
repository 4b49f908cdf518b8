//! `cargo xtask …`: bootstrap a fresh machine, build the eBPF object and the agent,
//! run the demo, the tests and the benchmark. Every command bootstraps what it needs.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

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
const CARGO_DENY_VERSION: &str = "0.20.2";
/// Where cargo-deny fetches the RustSec advisory database from by default.
const ADVISORY_DB_HOST: &str = "github.com:443";
/// The directory cargo-deny (this version) keeps its clone of that database in.
const ADVISORY_DB_DIR: &str = "advisory-db-3157b0e258782691";
const OBJECT_NAME: &str = "ferrite-datapath.bpf.o";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (apt packages, rust-src, bpf-linker, bpffs).
    Setup,
    /// Build the eBPF object into target/bpf/ferrite-datapath.bpf.o.
    BuildEbpf,
    /// Build the eBPF object and the userspace binaries (release).
    Build,
    /// Run the demo: two nodes, five pods, a LoadBalancer Service over both.
    Demo {
        /// Keep the node up after the traffic (for bpftool/inspect) until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Run the whole test suite (unit, BPF_PROG_TEST_RUN, netns end-to-end).
    Test {
        /// Extra arguments for the test runner (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks, each side by side with its baseline: datapath (every per-packet path
    /// in BPF_PROG_TEST_RUN vs no-op programs), insitu (the programs' run time per
    /// packet under real traffic, bpf_stats), overlay (vs flannel-style), control-plane
    /// (vs iptables-restore), nodeport (vs kube-proxy iptables), clusterip (vs direct
    /// and kube-proxy's iptables and nftables layouts).
    Bench {
        /// Sections to run (datapath, insitu, overlay, control-plane, nodeport,
        /// clusterip); all by default.
        sections: Vec<String>,
    },
    /// Soak (not in CI): two nodes under mixed traffic (ClusterIP, cross-node,
    /// NodePort; TCP connect/close, long flows, UDP) while backends, Services and
    /// Nodes churn every second; prints failures, agent RSS and conntrack occupancy.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Dependency audit (cargo-deny, both Cargo.lock files): known vulnerabilities
    /// from the RustSec advisory database, licenses, bans, sources.
    Audit {
        /// A local clone of github.com/rustsec/advisory-db, for machines that cannot
        /// reach GitHub (also $FERRITE_ADVISORY_DB).
        #[arg(long)]
        advisory_db: Option<PathBuf>,
    },
    /// rustfmt check and clippy -D warnings on every crate.
    Lint,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(command: &mut Command) -> bool {
    command
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn stdout_of(command: &mut Command) -> String {
    command
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn is_root() -> bool {
    stdout_of(Command::new("id").arg("-u")).trim() == "0"
}

fn setup() -> Result<()> {
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

/// Environment the outer cargo sets that must not leak into the nightly eBPF build.
const CARGO_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

fn object_path() -> PathBuf {
    root().join("target/bpf").join(OBJECT_NAME)
}

fn build_ebpf() -> Result<()> {
    let crate_dir = root().join("datapath-ebpf");
    let mut cargo = Command::new("rustup");
    // Target, build-std, linker and `-C debuginfo=2 -C link-arg=--btf` (BTF is what
    // makes bpftool print named fields) come from datapath-ebpf/.cargo/config.toml.
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .current_dir(&crate_dir);
    for var in CARGO_ENV {
        cargo.env_remove(var);
    }
    run(&mut cargo)?;
    let built = crate_dir.join("target/bpfel-unknown-none/release/ferrite-datapath");
    let out = object_path();
    std::fs::create_dir_all(out.parent().unwrap())?;
    std::fs::copy(&built, &out).with_context(|| format!("copying {}", built.display()))?;
    println!("build-ebpf: {}", out.display());
    Ok(())
}

fn audit(advisory_db: Option<PathBuf>) -> Result<()> {
    if !stdout_of(cargo().args(["deny", "--version"])).contains(CARGO_DENY_VERSION) {
        println!("audit: installing cargo-deny {CARGO_DENY_VERSION} (takes a few minutes)");
        run(cargo().args([
            "install",
            "cargo-deny",
            "--locked",
            "--version",
            CARGO_DENY_VERSION,
        ]))?;
    }
    let mut config = root().join("deny.toml");
    let mut checks = vec!["bans", "licenses", "sources"];
    let mut offline = false;
    match advisory_db {
        Some(db) => {
            // cargo-deny looks for its clone of the default database here; put a clone
            // of the local copy there and tell it not to fetch.
            let dbs = root().join("target/advisory-dbs");
            let clone = dbs.join(ADVISORY_DB_DIR);
            let _ = std::fs::remove_dir_all(&clone);
            std::fs::create_dir_all(&dbs)?;
            run(Command::new("git")
                .args(["clone", "--quiet"])
                .arg(&db)
                .arg(&clone))?;
            let local = root().join("target/deny-local-db.toml");
            let rules = std::fs::read_to_string(&config)?;
            let db_path = format!("[advisories]\ndb-path = \"{}\"\n", dbs.display());
            std::fs::write(&local, rules.replace("[advisories]\n", &db_path))?;
            config = local;
            offline = true;
            checks.push("advisories");
        }
        None if reachable(ADVISORY_DB_HOST) => checks.push("advisories"),
        None => println!(
            "audit: NOT checking advisories: {ADVISORY_DB_HOST} (the RustSec database) is \
             unreachable from this machine; pass --advisory-db <clone of rustsec/advisory-db>"
        ),
    }
    for manifest in [
        root().join("Cargo.toml"),
        root().join("datapath-ebpf/Cargo.toml"),
    ] {
        println!("audit: {} ({})", manifest.display(), checks.join(", "));
        let mut deny = cargo();
        deny.arg("deny");
        if offline {
            deny.arg("--offline");
        }
        run(deny
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--config")
            .arg(&config)
            .arg("check")
            .args(&checks))?;
    }
    Ok(())
}

/// Whether a TCP connection to `host:port` opens within a few seconds.
fn reachable(address: &str) -> bool {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)).is_ok()
        })
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

/// Environment telling tests, demo and bench where the binaries are.
fn with_artifacts<'a>(command: &'a mut Command, profile: &str) -> &'a mut Command {
    command.env("FERRITE_BPF_OBJECT", object_path()).env(
        "FERRITE_BIN",
        root().join("target").join(profile).join("ferrite"),
    )
}

fn build_release() -> Result<()> {
    build_ebpf()?;
    run(cargo().args(["build", "--release", "--locked", "--bins"]))
}

/// Fail if any Ferrite program is attached to the machine's cgroup v2 root.
fn check_cgroup_root() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let Some(root) = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].to_string())
    }) else {
        return Ok(());
    };
    let shown = stdout_of(Command::new("bpftool").args(["cgroup", "show", &root]));
    let ours: Vec<&str> = shown.lines().filter(|l| l.contains("ferrite")).collect();
    if !ours.is_empty() {
        bail!("Ferrite programs on the machine's own cgroup root {root}: {ours:?}");
    }
    println!("test: no Ferrite program on the machine's cgroup root {root}");
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (BPF, network namespaces): run it as root");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            build_ebpf()
        }
        Cmd::Build => {
            setup()?;
            build_release()
        }
        Cmd::Demo { keep } => {
            require_root("the demo")?;
            setup()?;
            build_release()?;
            let mut demo = Command::new(root().join("target/release/ferrite-demo"));
            if keep {
                demo.arg("--keep");
            }
            run(with_artifacts(&mut demo, "release"))
        }
        Cmd::Test { args } => {
            setup()?;
            build_ebpf()?;
            run(cargo().args(["build", "--locked", "-p", "ferrite-agent"]))?;
            if !is_root() {
                println!("test: not root: BPF and netns tests will fail; run as root");
            }
            let nextest = succeeds(cargo().args(["nextest", "--version"]));
            let mut command = cargo();
            if nextest {
                command.args([
                    "nextest",
                    "run",
                    "--workspace",
                    "--locked",
                    "--no-fail-fast",
                ]);
            } else {
                command.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
            }
            let tests = run(with_artifacts(command.args(&args), "debug"));
            // Tests and the demo attach socket-level load balancing to cgroup
            // subtrees of their own: the machine's own root must never get it.
            let root_clean = check_cgroup_root();
            tests.and(root_clean)
        }
        Cmd::Bench { sections } => {
            require_root("the benchmark")?;
            setup()?;
            build_release()?;
            run(with_artifacts(
                Command::new(root().join("target/release/ferrite-bench")).args(&sections),
                "release",
            ))
        }
        Cmd::Soak { minutes } => {
            require_root("the soak")?;
            setup()?;
            build_release()?;
            run(with_artifacts(
                Command::new(root().join("target/release/ferrite-soak"))
                    .args(["--minutes", &minutes.to_string()]),
                "release",
            ))
        }
        Cmd::Audit { advisory_db } => {
            let advisory_db =
                advisory_db.or_else(|| std::env::var_os("FERRITE_ADVISORY_DB").map(Into::into));
            audit(advisory_db)
        }
        Cmd::Lint => {
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ]))?;
            let mut ebpf = Command::new("rustup");
            ebpf.args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "--release",
                "--locked",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(root().join("datapath-ebpf"));
            for var in CARGO_ENV {
                ebpf.env_remove(var);
            }
            run(&mut ebpf)?;
            run(Command::new("rustup")
                .args(["run", "nightly", "cargo", "fmt", "--", "--check"])
                .current_dir(root().join("datapath-ebpf")))
        }
    }
}
