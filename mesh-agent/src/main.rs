//! `mesh-agent`: the node agent. `run` serves; `stats` prints the kernel counters.

use std::{io::IsTerminal as _, path::PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    config::{AgentConfig, DEFAULT_BPFFS_ROOT},
    datapath::Datapath,
    stats,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(version, about = "Node agent of the eBPF-accelerated sidecarless mesh")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the kernel programs, attach them and serve until SIGTERM or SIGINT.
    Run {
        /// Name of this node.
        #[arg(long, env = "MESH_NODE_NAME")]
        node_name: String,
        /// bpffs directory for this agent's pins [default: /sys/fs/bpf/mesh-agent/<node-name>].
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
        /// cgroup v2 directory of a meshed pod (repeatable).
        #[arg(long = "attach-cgroup")]
        cgroups: Vec<PathBuf>,
        /// Keep the pinned maps at a clean shutdown.
        #[arg(long)]
        keep_pins: bool,
    },
    /// Print the per-cgroup counters from an agent's pinned maps.
    Stats {
        /// bpffs directory of the agent.
        #[arg(long)]
        bpffs_dir: PathBuf,
        /// One JSON object per cgroup instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Run {
            node_name,
            bpffs_dir,
            cgroups,
            keep_pins,
        } => {
            let bpffs_dir =
                bpffs_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_ROOT).join(&node_name));
            let config = AgentConfig {
                node_name,
                bpffs_dir,
                cgroups,
                keep_pins,
            }
            .validate()
            .context("invalid configuration")?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the Tokio runtime")?
                .block_on(run(config))
        }
        Command::Stats { bpffs_dir, json } => {
            let rows = stats::read(&bpffs_dir)?;
            if json {
                for row in rows {
                    println!("{}", serde_json::to_string(&row)?);
                }
            } else {
                println!("{:>12} {:>10} {:>10}", "CGROUP_ID", "CONNECT4", "CONNECT6");
                for r in rows {
                    println!("{:>12} {:>10} {:>10}", r.cgroup_id, r.connect4, r.connect6);
                }
            }
            Ok(())
        }
    }
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    info!(%config, version = env!("CARGO_PKG_VERSION"), "mesh-agent starting");
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut datapath = Datapath::load(&config.bpffs_dir, config.keep_pins)?;
    for cgroup in &config.cgroups {
        datapath.attach_cgroup(cgroup)?;
    }
    info!(cgroups = datapath.attached().len(), pin_dir = %datapath.pin_dir().display(), "agent ready");
    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!(signal, "shutting down");
    drop(datapath);
    info!("shutdown complete");
    Ok(())
}

fn init_tracing(format: LogFormat) {
    // aya-log forwards kernel records through the `log` facade; `init()` installs the bridge.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
