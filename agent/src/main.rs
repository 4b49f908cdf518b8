use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use ferrite_agent::{agent, datapath, inspect, maps::NodeMaps};

/// Ferrite: Kubernetes pod networking and Service load balancing in eBPF.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: load/attach the datapath and keep its maps in sync.
    Agent {
        /// This node's name (spec.nodeName of its pods).
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Multi-document YAML of Kubernetes objects (Service, EndpointSlice, Pod).
        #[arg(long)]
        config: PathBuf,
        /// The eBPF object (default: next to this binary or target/bpf/).
        #[arg(long)]
        bpf_object: Option<PathBuf>,
        /// Full resync period in seconds (also repairs drift).
        #[arg(long, default_value_t = 10)]
        resync_seconds: u64,
        /// Datapath log level (aya-log); `debug` logs every drop with its reason.
        #[arg(long, value_enum, default_value_t)]
        datapath_log: datapath::DatapathLog,
    },
    /// Show a node's datapath state from its pinned maps.
    Inspect {
        #[arg(long, env = "NODE_NAME")]
        node: String,
        #[arg(value_enum)]
        table: inspect::Table,
    },
    /// Detach and unpin everything Ferrite installed for a node.
    Uninstall {
        #[arg(long, env = "NODE_NAME")]
        node: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Datapath records are already filtered in the kernel by --datapath-log.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,ferrite_datapath=trace")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Agent {
            node,
            config,
            bpf_object,
            resync_seconds,
            datapath_log,
        } => agent::run(&agent::AgentOptions {
            datapath_log,
            object: datapath::find_object(bpf_object.as_deref())?,
            node,
            config,
            poll: Duration::from_millis(200),
            resync: Duration::from_secs(resync_seconds),
        }),
        Command::Inspect { node, table } => {
            let maps = NodeMaps::open(&datapath::pin_dir(&node))?;
            print!("{}", inspect::render(&maps, table)?);
            Ok(())
        }
        Command::Uninstall { node } => datapath::uninstall(&datapath::pin_dir(&node)),
    }
}
