//! `mesh-agent`: the node agent. `run` serves; `stats` prints the kernel counters.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    agent, cni_installer,
    config::{
        default_worker_threads, own_cgroup, AgentConfig, ClusterSource, OnExit, TelemetryConfig,
        TransportConfig, DEFAULT_BPFFS_ROOT, DEFAULT_LABEL_KEY, DEFAULT_TRUST_DOMAIN,
    },
    logging::{self, LogFormat},
    stats,
    telemetry::AccessLogTarget,
};

#[derive(Debug, Parser)]
#[command(version, about = "Node agent of the eBPF-accelerated sidecarless mesh")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and dropped: the size of the `Run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Load the kernel programs, capture the pods the config enrolls on this node, and serve
    /// until SIGTERM or SIGINT.
    Run {
        /// Name of this node.
        #[arg(long, env = "MESH_NODE_NAME")]
        node_name: String,
        /// Directory of Kubernetes-style YAML (Namespaces, Pods, Services, Istio policies),
        /// watched for changes. Without it the agent reads the Kubernetes API.
        #[arg(long, env = "MESH_CONFIG_DIR")]
        config_dir: Option<PathBuf>,
        /// Kubeconfig of the Kubernetes API server to read the cluster from; without it (and
        /// without `--config-dir`) the in-cluster service account, or `$KUBECONFIG`.
        #[arg(long, env = "MESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// On Kubernetes: the socket on which `mesh-cni` hands new pods over.
        #[arg(long, default_value = mesh_cni::handover::DEFAULT_SOCKET)]
        cni_socket: PathBuf,
        /// On Kubernetes: the cgroup directory holding the kubelet's `kubepods` tree (default:
        /// the cgroup2 mount).
        #[arg(long)]
        kubepods_cgroup: Option<PathBuf>,
        /// Largest config file read, in bytes (4 KiB to 64 MiB); a larger one is refused unread.
        #[arg(long, default_value_t = mesh_cluster::limits::DEFAULT_MAX_FILE_BYTES)]
        config_max_file_bytes: u64,
        /// Deepest nesting of mappings and sequences in a config file (16 to 128); a deeper one
        /// is refused before it is parsed.
        #[arg(long, default_value_t = mesh_cluster::limits::DEFAULT_MAX_DEPTH)]
        config_max_depth: usize,
        /// bpffs directory for this agent's pins [default: /sys/fs/bpf/mesh-agent/<node-name>].
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
        /// The agent's own cgroup v2 directory [default: the one it runs in].
        #[arg(long)]
        agent_cgroup: Option<PathBuf>,
        /// Never short-cut pod-local legs with sockmap, even for pods that opt in.
        #[arg(long)]
        no_sockmap: bool,
        /// Bytes a short-cut sender may leave unread at its peer before its messages take the
        /// TCP path (64 KiB to 4 MiB).
        #[arg(long, default_value_t = mesh_agent::config::MAX_SHORTCUT_BUDGET)]
        shortcut_budget_bytes: u32,
        /// Connect same-node connections the policy allows straight from pod to pod in the
        /// kernel, once the agent has authorized a first one (see ARCHITECTURE.md,
        /// "Kernel-direct").
        #[arg(long)]
        kernel_direct: bool,
        /// Label whose value `ambient` enrolls a namespace or pod.
        #[arg(long, default_value = DEFAULT_LABEL_KEY)]
        label_key: String,
        /// SPIFFE trust domain.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Namespace whose `PeerAuthentication` without selector applies mesh-wide.
        #[arg(long, default_value = mesh_cluster::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        /// The cluster's DNS domain (services are `<name>.<namespace>.svc.<domain>`), as
        /// kubelet's `--cluster-domain`.
        #[arg(long, default_value = mesh_cluster::DEFAULT_CLUSTER_DOMAIN)]
        cluster_domain: String,
        /// Keep the pods captured and the pinned maps at a clean shutdown.
        #[arg(long, conflicts_with = "owner_daemonset")]
        keep_pins: bool,
        /// The `DaemonSet` running this agent (`<namespace>/<name>`): at a clean shutdown the
        /// agent releases the node only if it is gone or being deleted (an uninstall), and
        /// otherwise leaves the pods captured for the next agent.
        #[arg(long)]
        owner_daemonset: Option<mesh_agent::departure::Owner>,
        /// Threads of the async runtime that carries the connections. Default: 1 when fewer
        /// than 4 CPUs are available to the agent, otherwise 2 (ztunnel's).
        #[arg(long, env = "MESH_WORKER_THREADS")]
        worker_threads: Option<usize>,
        #[command(flatten)]
        identity: mesh_agent::identity_flags::IdentityFlags,
        #[command(flatten)]
        tracing: mesh_agent::tracing_flags::TracingFlags,
        /// Streams one pooled HBONE connection carries at most (h2's stream slab grows by
        /// doubling: a power of two uses every slot it allocates).
        #[arg(long, default_value_t = mesh_hbone::DEFAULT_MAX_STREAMS)]
        hbone_max_streams: u32,
        /// Seconds an HBONE connection without streams stays open.
        #[arg(long, default_value_t = 300)]
        hbone_idle_timeout_secs: u64,
        /// Seconds an HBONE tunnel may move no byte either way before it is closed (0: never).
        #[arg(long, default_value_t = 3600)]
        hbone_stream_idle_timeout_secs: u64,
        /// Where the JSON access log goes: `-` (standard output), `off`, or a file.
        #[arg(long, env = "MESH_ACCESS_LOG", default_value = "-")]
        access_log: AccessLogTarget,
        /// Admin endpoint (`/config_dump`, `/logging`).
        #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Prometheus endpoint (`/metrics`).
        #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
        metrics_addr: SocketAddr,
        /// Readiness endpoint (`/healthz/ready`).
        #[arg(long, env = "MESH_READINESS_ADDR", default_value = "0.0.0.0:15021")]
        readiness_addr: SocketAddr,
    },
    /// Install the `mesh-cni` plugin (the binary beside this one) and its entry in the CNI
    /// configuration, keep the entry in place, and at SIGTERM remove the entry if the mesh is
    /// being uninstalled (the chart's CNI installer container).
    InstallCni(InstallCniArgs),
    /// Serve the mesh's certificate authority (Istio's certificate API) as its own Deployment:
    /// token reviews, node authorization, the root kept in a Secret, the trust bundle published
    /// in a config map.
    Ca(mesh_agent::ca_command::CaArgs),
    /// Run the waypoint controller: every `Gateway` of class `istio-waypoint` gets the
    /// `ServiceAccount`, `Deployment` and `Service` that run it.
    WaypointController(mesh_agent::controller_command::ControllerArgs),
    /// Serve an L7 waypoint (HTTP routing by Gateway API `HTTPRoutes`) in a waypoint's pod,
    /// under the waypoint's identity.
    Waypoint(mesh_agent::waypoint_command::WaypointArgs),
    /// Print the per-cgroup counters and the sockmap fast-path totals from an agent's pinned
    /// maps.
    Stats {
        /// bpffs directory of the agent.
        #[arg(long)]
        bpffs_dir: PathBuf,
        /// One JSON object per cgroup, then `{"fastpath":{...}}`, instead of a table.
        #[arg(long)]
        json: bool,
        /// Also list the sockets in the short-cut now (namespace cookie, local and remote
        /// address), after the totals.
        #[arg(long)]
        sockets: bool,
    },
}

/// `mesh-agent install-cni`'s flags.
#[derive(Debug, clap::Args)]
struct InstallCniArgs {
    /// The runtime's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The runtime's CNI plugin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The agent's hand-over socket, written into the entry.
    #[arg(long, default_value = mesh_cni::handover::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// How often the entry is checked, in milliseconds (10 to 600000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    watch_ms: u64,
    /// The `DaemonSet` running the installer (`<namespace>/<name>`): the entry is removed at
    /// SIGTERM only if it is gone or being deleted. Without it the entry always stays.
    #[arg(long)]
    owner_daemonset: Option<mesh_agent::departure::Owner>,
    /// Kubeconfig for the API [default: in-cluster].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Remove this `NoSchedule` taint from `--node-name` once the agent answers ready at
    /// `--agent-readiness` and the entry is installed (nodes that join with it get ordinary
    /// pods only once they are meshed from their first packet).
    #[arg(long, requires = "node_name")]
    not_ready_taint: Option<String>,
    /// This node (with `--not-ready-taint`).
    #[arg(long, env = "MESH_NODE_NAME")]
    node_name: Option<String>,
    /// The agent's readiness endpoint.
    #[arg(long, default_value = "127.0.0.1:15021")]
    agent_readiness: SocketAddr,
}

/// jemalloc, chosen by measurement (BENCHMARKS.md, "Allocator"): with its background threads
/// it hands freed memory back to the kernel within seconds, where glibc's arenas kept a loaded
/// agent at twice its resting size, and mimalloc rested at twice jemalloc's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Also installs the `log` bridge aya-log needs; `log` changes the level at run time.
    let log = logging::init(cli.log_format);
    match cli.command {
        Command::Run {
            node_name,
            config_dir,
            kubeconfig,
            cni_socket,
            kubepods_cgroup,
            config_max_file_bytes,
            config_max_depth,
            bpffs_dir,
            agent_cgroup,
            no_sockmap,
            shortcut_budget_bytes,
            kernel_direct,
            label_key,
            trust_domain,
            root_namespace,
            cluster_domain,
            keep_pins,
            owner_daemonset,
            worker_threads,
            identity,
            tracing,
            hbone_max_streams,
            hbone_idle_timeout_secs,
            hbone_stream_idle_timeout_secs,
            access_log,
            admin_addr,
            metrics_addr,
            readiness_addr,
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
                source: cluster_source(
                    config_dir,
                    kubeconfig,
                    cni_socket,
                    kubepods_cgroup,
                    (config_max_file_bytes, config_max_depth),
                )?,
                agent_cgroup,
                sockmap: !no_sockmap,
                shortcut_budget: shortcut_budget_bytes,
                kernel_direct,
                label_key,
                trust_domain,
                root_namespace,
                cluster_domain,
                on_exit: OnExit::from_flags(owner_daemonset, keep_pins),
                worker_threads: worker_threads.unwrap_or_else(default_worker_threads),
                transport: TransportConfig {
                    remote_ca: identity.remote_ca(),
                    cert_lifetime: identity.cert_lifetime(),
                    crypto_provider: identity.crypto_provider,
                    ca_dir: identity.ca_dir,
                    max_streams_per_connection: hbone_max_streams,
                    pool_idle_timeout: Duration::from_secs(hbone_idle_timeout_secs),
                    stream_idle_timeout: (hbone_stream_idle_timeout_secs > 0)
                        .then(|| Duration::from_secs(hbone_stream_idle_timeout_secs)),
                },
                telemetry: TelemetryConfig {
                    access_log,
                    admin_addr,
                    metrics_addr,
                    readiness_addr,
                    tracing: tracing.settings().context("invalid configuration")?,
                },
            }
            .validate()
            .context("invalid configuration")?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.worker_threads)
                .enable_all()
                .build()
                .context("starting the Tokio runtime")?
                .block_on(agent::run(config, log))?;
            Ok(())
        }
        other => run_other(other),
    }
}

/// The commands other than `run`.
fn run_other(command: Command) -> anyhow::Result<()> {
    match command {
        // Handled by `main`.
        Command::Run { .. } => unreachable!("`run` is handled by main"),
        Command::InstallCni(args) => install_cni(args),
        Command::Ca(args) => mesh_agent::ca_command::run(args),
        Command::WaypointController(args) => mesh_agent::controller_command::run(args),
        Command::Waypoint(args) => mesh_agent::waypoint_command::run(args),
        Command::Stats {
            bpffs_dir,
            json,
            sockets,
        } => print_stats(&bpffs_dir, json, sockets),
    }
}

/// `mesh-agent stats`: the pinned counters (and, with `sockets`, the short-cut's sockets), as a
/// table or as JSON lines.
fn print_stats(bpffs_dir: &std::path::Path, json: bool, sockets: bool) -> anyhow::Result<()> {
    let rows = stats::read(bpffs_dir)?;
    let fastpath = stats::read_fastpath(bpffs_dir)?;
    let sockets = if sockets {
        stats::read_shortcut_sockets(bpffs_dir)?
    } else {
        Vec::new()
    };
    if json {
        for row in rows {
            println!("{}", serde_json::to_string(&row)?);
        }
        println!(
            "{}",
            serde_json::to_string(&stats::FastpathLine { fastpath })?
        );
        for shortcut_socket in sockets {
            let line = stats::SocketLine { shortcut_socket };
            println!("{}", serde_json::to_string(&line)?);
        }
    } else {
        println!("{:>12} {:>10} {:>10}", "CGROUP_ID", "CONNECT4", "CONNECT6");
        for r in rows {
            println!("{:>12} {:>10} {:>10}", r.cgroup_id, r.connect4, r.connect6);
        }
        println!(
            "fastpath: redirected {} msgs {} bytes, passed {} msgs {} bytes, held {} msgs {} bytes, direct {} msgs {} bytes",
            fastpath.redirected_msgs,
            fastpath.redirected_bytes,
            fastpath.passed_msgs,
            fastpath.passed_bytes,
            fastpath.held_msgs,
            fastpath.held_bytes,
            fastpath.direct_msgs,
            fastpath.direct_bytes
        );
        for s in sockets {
            println!(
                "shortcut socket netns={} {} -> {}",
                s.netns, s.local, s.remote
            );
        }
    }
    Ok(())
}

/// Where the agent reads the cluster: `--config-dir` (files) or the Kubernetes API (the
/// kubeconfig named, or in-cluster), never both.
fn cluster_source(
    config_dir: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    cni_socket: PathBuf,
    kubepods_cgroup: Option<PathBuf>,
    (max_file_bytes, max_depth): (u64, usize),
) -> anyhow::Result<ClusterSource> {
    Ok(match (config_dir, kubeconfig) {
        (Some(_), Some(_)) => {
            return Err(mesh_agent::config::ConfigError::TwoSources)
                .context("invalid configuration")
        }
        (Some(dir), None) => ClusterSource::Files {
            dir,
            limits: mesh_cluster::FileLimits {
                max_file_bytes,
                max_depth,
            },
        },
        (None, kubeconfig) => ClusterSource::Kubernetes {
            kubeconfig,
            cni_socket,
            kubepods_cgroup: match kubepods_cgroup {
                Some(dir) => dir,
                None => mesh_agent::config::cgroup2_root().context("invalid configuration")?,
            },
        },
    })
}

/// `mesh-agent install-cni`: the chart's CNI installer container.
fn install_cni(args: InstallCniArgs) -> anyhow::Result<()> {
    let InstallCniArgs {
        conf_dir,
        bin_dir,
        socket,
        watch_ms,
        owner_daemonset,
        kubeconfig,
        not_ready_taint,
        node_name,
        agent_readiness,
    } = args;
    let exe = std::env::current_exe().context("locating this binary")?;
    let config = cni_installer::InstallerConfig {
        conf_dir,
        bin_dir,
        binary: cni_installer::plugin_beside(&exe),
        entry: mesh_cni::install::PluginEntry {
            agent_socket: socket,
            ..mesh_cni::install::PluginEntry::default()
        },
        period: Duration::from_millis(watch_ms),
        owner: owner_daemonset,
        kubeconfig,
        untaint: not_ready_taint
            .zip(node_name)
            .map(|(key, node)| cni_installer::Untaint {
                node,
                key,
                readiness: agent_readiness,
            }),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(cni_installer::run(config))?;
    Ok(())
}
