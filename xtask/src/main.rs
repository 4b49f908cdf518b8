//! `cargo xtask …`: set up a fresh machine, build the eBPF object and the agent, run
//! the demo, the tests and the benchmark. `setup` installs the prerequisites; the
//! commands that build or run check them and say what is missing. One module per
//! command; this file only parses the command line and dispatches.
mod audit;
mod bench;
mod build;
mod demo;
mod image;
mod lint;
mod prerequisites;
mod process;
mod setup;
mod soak;
mod test;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build, tests and demo need and the machine is missing (apt and
    /// PyPI packages, rust-src, bpf-linker, bpffs), printing each.
    Setup,
    /// Build the eBPF object into target/bpf/ferrite-datapath.bpf.o.
    BuildEbpf,
    /// Build the eBPF object and the userspace binaries (release).
    Build,
    /// Build the OCI image from the release binaries on a Debian bookworm base made
    /// from Debian packages (deploy/image-contents; no registry): an archive in
    /// target/image/ for `ctr images import`. Prints its size.
    Image {
        /// From the debug binaries (debug info stripped) instead: the image `cargo
        /// xtask test` runs in tests/tests/image.rs (target/image/*-debug.oci.tar).
        #[arg(long)]
        debug: bool,
    },
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

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::command(),
        Cmd::BuildEbpf => build::ebpf_command(),
        Cmd::Build => build::release_command(),
        Cmd::Image { debug } => image::command(debug),
        Cmd::Demo { keep } => demo::command(keep),
        Cmd::Test { args } => test::command(&args),
        Cmd::Bench { sections } => bench::command(&sections),
        Cmd::Soak { minutes } => soak::command(minutes),
        Cmd::Audit { advisory_db } => audit::command(advisory_db),
        Cmd::Lint => lint::command(),
    }
}
