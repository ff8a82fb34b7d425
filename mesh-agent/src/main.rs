//! `mesh-agent`: the node agent. `run` serves; `stats` prints the kernel counters.

use std::{io::IsTerminal as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{
    agent,
    config::{
        own_cgroup, AgentConfig, TransportConfig, DEFAULT_BPFFS_ROOT, DEFAULT_LABEL_KEY,
        DEFAULT_TRUST_DOMAIN,
    },
    stats,
};
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
    /// Load the kernel programs, capture the pods the config enrolls on this node, and serve
    /// until SIGTERM or SIGINT.
    Run {
        /// Name of this node.
        #[arg(long, env = "MESH_NODE_NAME")]
        node_name: String,
        /// Directory of Kubernetes-style YAML (Namespaces, Pods, Services), watched for changes.
        #[arg(long, env = "MESH_CONFIG_DIR")]
        config_dir: PathBuf,
        /// bpffs directory for this agent's pins [default: /sys/fs/bpf/mesh-agent/<node-name>].
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
        /// The agent's own cgroup v2 directory [default: the one it runs in].
        #[arg(long)]
        agent_cgroup: Option<PathBuf>,
        /// Do not short-cut pod-local legs with sockmap (for measurement).
        #[arg(long)]
        no_sockmap: bool,
        /// Label whose value `ambient` enrolls a namespace or pod.
        #[arg(long, default_value = DEFAULT_LABEL_KEY)]
        label_key: String,
        /// SPIFFE trust domain.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Namespace whose `PeerAuthentication` without selector applies mesh-wide.
        #[arg(long, default_value = mesh_agent::cluster::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        /// Keep the pinned maps at a clean shutdown.
        #[arg(long)]
        keep_pins: bool,
        /// Threads of the async runtime that carries the connections.
        #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 2)]
        worker_threads: usize,
        /// Directory of the built-in certificate authority (created on first use; agents on
        /// one machine share it).
        #[arg(long, env = "MESH_CA_DIR", default_value = "/var/lib/mesh-agent/ca")]
        ca_dir: PathBuf,
        /// rustls crypto provider: aws-lc-rs or ring.
        #[arg(long, env = "MESH_CRYPTO_PROVIDER", default_value = "aws-lc-rs")]
        crypto_provider: mesh_identity::CryptoProvider,
        /// Lifetime of workload certificates, in seconds (rotated at about half of it).
        #[arg(long, env = "MESH_CERT_LIFETIME_SECS", default_value_t = 86_400)]
        cert_lifetime_secs: u64,
        /// Streams one pooled HBONE connection carries at most.
        #[arg(long, default_value_t = 100)]
        hbone_max_streams: u32,
        /// Seconds an HBONE connection without streams stays open.
        #[arg(long, default_value_t = 300)]
        hbone_idle_timeout_secs: u64,
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
            config_dir,
            bpffs_dir,
            agent_cgroup,
            no_sockmap,
            label_key,
            trust_domain,
            root_namespace,
            keep_pins,
            worker_threads,
            ca_dir,
            crypto_provider,
            cert_lifetime_secs,
            hbone_max_streams,
            hbone_idle_timeout_secs,
        } => {
            let bpffs_dir =
                bpffs_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_ROOT).join(&node_name));
            let agent_cgroup = match agent_cgroup {
                Some(c) => c,
                None => own_cgroup().context("invalid configuration")?,
            };
            let config = AgentConfig {
                node_name,
                bpffs_dir,
                config_dir,
                agent_cgroup,
                sockmap: !no_sockmap,
                label_key,
                trust_domain,
                root_namespace,
                keep_pins,
                worker_threads,
                transport: TransportConfig {
                    ca_dir,
                    crypto_provider,
                    cert_lifetime: Duration::from_secs(cert_lifetime_secs),
                    max_streams_per_connection: hbone_max_streams,
                    pool_idle_timeout: Duration::from_secs(hbone_idle_timeout_secs),
                },
            }
            .validate()
            .context("invalid configuration")?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads)
                .enable_all()
                .build()
                .context("starting the Tokio runtime")?
                .block_on(agent::run(config))?;
            Ok(())
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
