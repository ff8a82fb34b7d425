//! The agent's configuration: parsed once from the command line into [`AgentConfig`], validated,
//! and logged at start.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_identity::CryptoProvider;

use nix::sys::statfs::{statfs, BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC};

use crate::telemetry::AccessLogTarget;
use mesh_cluster::{EnrollmentOptions, FileLimits, LimitError};

/// Default directory under which the agent pins its maps (one subdirectory per node name).
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/mesh-agent";

pub use mesh_cluster::{DEFAULT_LABEL_KEY, DEFAULT_TRUST_DOMAIN};

/// Where the agent learns the cluster: both feed the one `ClusterState::build`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterSource {
    /// A directory of Kubernetes-style YAML (Namespaces, Pods, Services, Istio policies),
    /// watched for changes: one machine, the testbed.
    Files {
        dir: PathBuf,
        /// Size and nesting depth limits of each file (`--config-max-file-bytes`,
        /// `--config-max-depth`): a file beyond them is refused before it is parsed.
        limits: FileLimits,
    },
    /// The Kubernetes API server: the kubeconfig named (`--kubeconfig`), else the in-cluster
    /// service account (or `$KUBECONFIG`).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// The hand-over socket `mesh-cni` calls (`--cni-socket`).
        cni_socket: PathBuf,
        /// Below it, the kubelet's `kubepods` tree of pod cgroups (`--kubepods-cgroup`).
        kubepods_cgroup: PathBuf,
    },
}

impl fmt::Display for ClusterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterSource::Files { dir, limits } => {
                write!(f, "source=files config_dir={} {limits}", dir.display())
            }
            ClusterSource::Kubernetes {
                kubeconfig,
                cni_socket,
                kubepods_cgroup,
            } => write!(
                f,
                "source=kubernetes kubeconfig={} cni_socket={} kubepods_cgroup={}",
                kubeconfig
                    .as_ref()
                    .map_or_else(|| "in-cluster".into(), |p| p.display().to_string()),
                cni_socket.display(),
                kubepods_cgroup.display()
            ),
        }
    }
}

/// Validated agent configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Name of the node this agent serves (Kubernetes node name).
    pub node_name: String,
    /// bpffs directory that holds this agent's pinned maps. Created at start.
    pub bpffs_dir: PathBuf,
    /// Where the agent learns the cluster.
    pub source: ClusterSource,
    /// The agent's own cgroup v2 directory: its sockets are the other end of every pod-local
    /// leg, so `sockops` is attached there too.
    pub agent_cgroup: PathBuf,
    /// Offer the `sk_msg` short-cut to the pods that opt in (`mesh.local/sockmap-shortcut`);
    /// `false` keeps every leg on the TCP path.
    pub sockmap: bool,
    /// Bytes a short-cut sender may leave unread at its peer before it takes the TCP path.
    pub shortcut_budget: u32,
    /// Same-node connections the policy allows go straight from pod to pod in the kernel once
    /// the agent authorized a first one (`--kernel-direct`).
    pub kernel_direct: bool,
    /// Label key whose value `ambient` enrolls a namespace or pod (`none` opts a pod out).
    pub label_key: String,
    pub trust_domain: String,
    /// Namespace whose selector-less `PeerAuthentication` is mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// The cluster's DNS domain: services are `<name>.<namespace>.svc.<cluster_domain>`.
    pub cluster_domain: String,
    /// What a clean shutdown does with the node's pods and pins.
    pub on_exit: OnExit,
    /// Threads of the async runtime that carries every connection (default:
    /// [`default_worker_threads`]; ztunnel's is 2).
    pub worker_threads: usize,
    /// Identity and HBONE transport.
    pub transport: TransportConfig,
    /// Metrics, access log, admin and readiness endpoints.
    pub telemetry: TelemetryConfig,
}

/// Where the agent reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Where the JSON access log goes.
    pub access_log: AccessLogTarget,
    /// Admin endpoint (`/config_dump`, `/logging`); Istio's is `localhost:15000`.
    pub admin_addr: SocketAddr,
    /// Prometheus endpoint (`/metrics`); Istio's is port 15020.
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`); Istio's is port 15021.
    pub readiness_addr: SocketAddr,
    /// Where spans go.
    pub tracing: crate::tracing_flags::TracingSettings,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            access_log: AccessLogTarget::Stdout,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], READINESS_PORT)),
            tracing: crate::tracing_flags::TracingSettings::default(),
        }
    }
}

/// Istio's admin port (localhost only).
pub const ADMIN_PORT: u16 = 15000;
/// Istio's metrics port.
pub const METRICS_PORT: u16 = 15020;
/// Istio's readiness port.
pub const READINESS_PORT: u16 = 15021;

/// Workload identity and the HBONE transport between nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// Directory of the built-in certificate authority (root certificate and key). On one
    /// machine every agent points at the same directory and so shares one trust bundle.
    pub ca_dir: PathBuf,
    /// A remote CA speaking Istio's certificate API (`--ca-address`) instead of the built-in one.
    pub remote_ca: Option<RemoteCa>,
    /// rustls crypto provider for every handshake.
    pub crypto_provider: CryptoProvider,
    /// Lifetime asked for each workload certificate; it is rotated at about half of it.
    pub cert_lifetime: Duration,
    /// Streams one pooled HBONE connection carries at most (ztunnel: 100).
    pub max_streams_per_connection: u32,
    /// A pooled HBONE connection without streams for this long is closed (ztunnel: 5 min).
    pub pool_idle_timeout: Duration,
    /// An HBONE tunnel (one CONNECT stream) that moves no byte either way for this long is
    /// closed, at both ends; `None`: never. Default 1 h (Envoy's TCP proxy idle timeout).
    pub stream_idle_timeout: Option<Duration>,
}

/// A CA reached over Istio's certificate API: the mesh's CA Deployment, or istiod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteCa {
    /// `https://<host>:<port>` (`--ca-address`).
    pub address: String,
    /// The roots: trust bundle of the mesh, and what the CA's certificate is verified against
    /// (`--ca-root-cert`).
    pub root_cert: PathBuf,
    /// The projected token the agent authenticates with, read at every request
    /// (`--ca-token-file`).
    pub token_file: PathBuf,
}

/// Default of [`RemoteCa::token_file`].
pub const DEFAULT_CA_TOKEN_FILE: &str = mesh_ca::client::DEFAULT_TOKEN_FILE;

/// Default of [`TransportConfig::stream_idle_timeout`].
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Default lifetime of workload certificates (Istio's default is 24 h).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Shortest certificate lifetime accepted (rotation at half of it must stay practical).
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(2);

/// What is wrong with a configuration. Each variant names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("node name {0:?} is not a valid DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')")]
    NodeName(String),
    #[error("bpffs directory {path}: no part of this path is on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`, or run `cargo xtask setup`)")]
    NotBpffs { path: PathBuf },
    #[error("cgroup {path}: {source}")]
    CgroupUnreadable { path: PathBuf, source: nix::Error },
    #[error(
        "cgroup {path} is not a cgroup v2 directory (mount cgroup2 and give a directory inside it)"
    )]
    NotCgroup2 { path: PathBuf },
    #[error("config directory {path}: {reason}")]
    ConfigDir { path: PathBuf, reason: String },
    #[error("kubeconfig {path}: not a file (or missing)")]
    Kubeconfig { path: PathBuf },
    #[error(
        "choose one cluster source: --config-dir (files) or --kubeconfig (Kubernetes), not both"
    )]
    TwoSources,
    #[error(transparent)]
    ConfigLimits(#[from] LimitError),
    #[error("finding the agent's own cgroup: {0}")]
    OwnCgroup(String),
    #[error("enrollment: {0}")]
    Enrollment(String),
    #[error("short-cut budget: {0} bytes is out of range ({MIN_SHORTCUT_BUDGET} to {MAX_SHORTCUT_BUDGET})")]
    ShortcutBudget(u32),
    #[error("worker threads: {0} is out of range (1 to {MAX_WORKER_THREADS})")]
    WorkerThreads(usize),
    #[error("certificate lifetime: {0:?} is shorter than {MIN_CERT_LIFETIME:?}")]
    CertLifetime(Duration),
    #[error("HBONE streams per connection: {0} is out of range (1 to 10000)")]
    MaxStreams(u32),
    #[error("HBONE pool idle timeout must be positive")]
    PoolIdleTimeout,
    #[error("--ca-address: {0}")]
    CaAddress(#[source] mesh_ca::client::ClientError),
    #[error("--ca-root-cert {path}: not a file (or missing)")]
    CaRootCert { path: PathBuf },
    #[error("access log {path}: the directory {dir} does not exist")]
    AccessLogDir { path: PathBuf, dir: PathBuf },
    #[error("{what} and {other} both listen on {addr}")]
    SameAddress {
        what: &'static str,
        other: &'static str,
        addr: SocketAddr,
    },
}

/// Upper bound of `worker_threads`: a node agent has no use for more.
pub const MAX_WORKER_THREADS: usize = 64;

/// The runtime's threads when none are configured: see [`worker_threads_for`], for the CPUs
/// available to the agent (its affinity and cgroup quota).
pub fn default_worker_threads() -> usize {
    worker_threads_for(std::thread::available_parallelism().map_or(1, usize::from))
}

/// The runtime's threads for `cpus` CPUs: 1 below 4 CPUs, otherwise 2 (ztunnel's default).
///
/// The agent shares the node's CPUs with the workloads it relays for: every byte it moves has
/// a client and a server running too. With two CPUs a second worker brings no parallelism, only
/// hand-overs between the threads (wake-ups of the other worker, tasks stolen back and forth):
/// measured on 2 vCPUs, one worker moved 6–15 % more bytes across nodes and opened 9–18 % more
/// connections per second than two (BENCHMARKS.md, "One worker thread on two CPUs").
fn worker_threads_for(cpus: usize) -> usize {
    if cpus < 4 {
        1
    } else {
        2
    }
}

pub use mesh_common::MAX_SHORTCUT_BUDGET;
/// Smallest short-cut budget: one large message must fit.
pub const MIN_SHORTCUT_BUDGET: u32 = 64 << 10;

impl AgentConfig {
    /// Checks every field against the machine: names, file systems, directories.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if !is_dns_label(&self.node_name) {
            return Err(ConfigError::NodeName(self.node_name));
        }
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            return Err(ConfigError::WorkerThreads(self.worker_threads));
        }
        if !(MIN_SHORTCUT_BUDGET..=MAX_SHORTCUT_BUDGET).contains(&self.shortcut_budget) {
            return Err(ConfigError::ShortcutBudget(self.shortcut_budget));
        }
        if let ClusterSource::Files { limits, .. } = &self.source {
            limits.validate()?;
        }
        let t = &self.transport;
        if t.cert_lifetime < MIN_CERT_LIFETIME {
            return Err(ConfigError::CertLifetime(t.cert_lifetime));
        }
        if !(1..=10_000).contains(&t.max_streams_per_connection) {
            return Err(ConfigError::MaxStreams(t.max_streams_per_connection));
        }
        if t.pool_idle_timeout.is_zero() {
            return Err(ConfigError::PoolIdleTimeout);
        }
        if let Some(remote) = &t.remote_ca {
            mesh_ca::client::parse_address(&remote.address).map_err(ConfigError::CaAddress)?;
            if !remote.root_cert.is_file() {
                return Err(ConfigError::CaRootCert {
                    path: remote.root_cert.clone(),
                });
            }
        }
        if let AccessLogTarget::File(path) = &self.telemetry.access_log {
            let dir = path.parent().unwrap_or(Path::new("."));
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if !dir.is_dir() {
                return Err(ConfigError::AccessLogDir {
                    path: path.clone(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        let t = &self.telemetry;
        let listeners = [
            ("admin", t.admin_addr),
            ("metrics", t.metrics_addr),
            ("readiness", t.readiness_addr),
        ];
        for (i, (what, addr)) in listeners.iter().enumerate() {
            for (other, other_addr) in &listeners[i + 1..] {
                if addr.port() != 0 && addr.port() == other_addr.port() {
                    return Err(ConfigError::SameAddress {
                        what,
                        other,
                        addr: *addr,
                    });
                }
            }
        }
        if !on_bpffs(&self.bpffs_dir) {
            return Err(ConfigError::NotBpffs {
                path: self.bpffs_dir,
            });
        }
        match &self.source {
            ClusterSource::Files { dir, .. } if !dir.is_dir() => {
                return Err(ConfigError::ConfigDir {
                    path: dir.clone(),
                    reason: "not a directory (or missing)".into(),
                });
            }
            ClusterSource::Kubernetes {
                kubeconfig: Some(path),
                ..
            } if !path.is_file() => {
                return Err(ConfigError::Kubeconfig { path: path.clone() });
            }
            _ => {}
        }
        let fs = statfs(&self.agent_cgroup).map_err(|source| ConfigError::CgroupUnreadable {
            path: self.agent_cgroup.clone(),
            source,
        })?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(ConfigError::NotCgroup2 {
                path: self.agent_cgroup,
            });
        }
        self.enrollment()
            .validate()
            .map_err(|e| ConfigError::Enrollment(e.to_string()))?;
        Ok(self)
    }
}

impl AgentConfig {
    /// The options every build of the cluster model takes, from this configuration.
    pub fn enrollment(&self) -> EnrollmentOptions {
        EnrollmentOptions {
            label_key: self.label_key.clone(),
            trust_domain: self.trust_domain.clone(),
            node_name: self.node_name.clone(),
            root_namespace: self.root_namespace.clone(),
            cluster_domain: self.cluster_domain.clone(),
            runtime_handles: mesh_cluster::RuntimeHandles::Annotations,
            endpoints: mesh_cluster::EndpointsFrom::Selectors,
        }
    }
}

/// What a clean shutdown (SIGTERM, SIGINT) does with the node's pods and pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnExit {
    /// Release the pods (programs detached, traffic direct again) and remove the pins.
    Release,
    /// Leave the pods captured and the pins in place, for the next agent to adopt
    /// (`--keep-pins`).
    Keep,
    /// Ask the API server about the agent's `DaemonSet` (`--owner-daemonset`): release when it
    /// is gone or being deleted (an uninstall), keep otherwise ([`crate::departure`]).
    AskOwner(crate::departure::Owner),
}

impl OnExit {
    /// From `--owner-daemonset` (wins) and `--keep-pins`.
    pub fn from_flags(owner: Option<crate::departure::Owner>, keep_pins: bool) -> Self {
        match (owner, keep_pins) {
            (Some(owner), _) => Self::AskOwner(owner),
            (None, true) => Self::Keep,
            (None, false) => Self::Release,
        }
    }
}

impl fmt::Display for OnExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Release => f.write_str("release"),
            Self::Keep => f.write_str("keep"),
            Self::AskOwner(owner) => write!(f, "ask-daemonset:{owner}"),
        }
    }
}

impl fmt::Display for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node={} {} bpffs_dir={} agent_cgroup={} sockmap={} shortcut_budget={} kernel_direct={} label_key={} \
             trust_domain={} root_namespace={} cluster_domain={} on_exit={} worker_threads={} ca_dir={} ca_address={} crypto_provider={} \
             cert_lifetime={}s max_streams_per_connection={} pool_idle_timeout={}s \
             stream_idle_timeout={} access_log={} \
             admin={} metrics={} readiness={} tracing={}",
            self.node_name,
            self.source,
            self.bpffs_dir.display(),
            self.agent_cgroup.display(),
            self.sockmap,
            self.shortcut_budget,
            self.kernel_direct,
            self.label_key,
            self.trust_domain,
            self.root_namespace,
            self.cluster_domain,
            self.on_exit,
            self.worker_threads,
            self.transport.ca_dir.display(),
            self.transport
                .remote_ca
                .as_ref()
                .map_or("none", |r| r.address.as_str()),
            self.transport.crypto_provider,
            self.transport.cert_lifetime.as_secs(),
            self.transport.max_streams_per_connection,
            self.transport.pool_idle_timeout.as_secs(),
            self.transport
                .stream_idle_timeout
                .map_or_else(|| "never".to_owned(), |t| format!("{}s", t.as_secs())),
            self.telemetry.access_log,
            self.telemetry.admin_addr,
            self.telemetry.metrics_addr,
            self.telemetry.readiness_addr,
            self.telemetry.tracing,
        )
    }
}

/// RFC 1123 label, as Kubernetes requires for node names' components.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The calling process's cgroup v2 directory: `/proc/self/cgroup`'s `0::<path>` under the
/// cgroup2 mount point found in `/proc/self/mountinfo`.
pub fn own_cgroup() -> Result<PathBuf, ConfigError> {
    let read = |p: &str| {
        std::fs::read_to_string(p).map_err(|e| ConfigError::OwnCgroup(format!("reading {p}: {e}")))
    };
    let cgroup = read("/proc/self/cgroup")?;
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| ConfigError::OwnCgroup("no cgroup v2 entry in /proc/self/cgroup".into()))?;
    let mountinfo = read("/proc/self/mountinfo")?;
    let mount = cgroup2_mount(&mountinfo)
        .ok_or_else(|| ConfigError::OwnCgroup("no cgroup2 file system is mounted".into()))?;
    Ok(Path::new(&mount).join(rel.trim_start_matches('/')))
}

/// The cgroup v2 mount point (from `/proc/self/mountinfo`).
pub fn cgroup2_root() -> Result<PathBuf, ConfigError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| ConfigError::OwnCgroup(format!("reading /proc/self/mountinfo: {e}")))?;
    cgroup2_mount(&mountinfo)
        .map(PathBuf::from)
        .ok_or_else(|| ConfigError::OwnCgroup("no cgroup2 file system is mounted".into()))
}

/// Mount point of the first cgroup2 mount of the hierarchy's root in a mountinfo text (field 5;
/// field 4 is the mounted directory, `/` for the root: a bind mount of a cgroup below it, as a
/// container may have, does not count; the type follows the ` - ` separator).
fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let sep = 6 + fields.iter().skip(6).position(|f| *f == "-")?;
        (fields.get(sep + 1) == Some(&"cgroup2") && fields.get(3) == Some(&"/"))
            .then(|| fields[4].replace("\\040", " "))
    })
}

/// True when `path`, or its closest existing ancestor, is on bpffs (the directory itself may not
/// exist yet; the agent creates it).
fn on_bpffs(path: &Path) -> bool {
    path.ancestors()
        .find(|p| p.exists())
        .and_then(|p| statfs(p).ok())
        .is_some_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node: &str) -> AgentConfig {
        AgentConfig {
            node_name: node.into(),
            bpffs_dir: "/nonexistent".into(),
            source: ClusterSource::Files {
                dir: "/nonexistent-config".into(),
                limits: FileLimits::default(),
            },
            agent_cgroup: "/nonexistent-cgroup".into(),
            sockmap: true,
            shortcut_budget: MAX_SHORTCUT_BUDGET,
            kernel_direct: false,
            label_key: DEFAULT_LABEL_KEY.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            root_namespace: "istio-system".into(),
            cluster_domain: "cluster.local".into(),
            on_exit: OnExit::Release,
            worker_threads: 2,
            transport: TransportConfig {
                ca_dir: "/nonexistent-ca".into(),
                remote_ca: None,
                crypto_provider: CryptoProvider::AwsLcRs,
                cert_lifetime: DEFAULT_CERT_LIFETIME,
                max_streams_per_connection: mesh_hbone::DEFAULT_MAX_STREAMS,
                pool_idle_timeout: Duration::from_secs(300),
                stream_idle_timeout: Some(DEFAULT_STREAM_IDLE_TIMEOUT),
            },
            telemetry: TelemetryConfig::default(),
        }
    }

    #[test]
    fn telemetry_listeners_and_access_log_are_checked() {
        let mut c = config("n0");
        c.telemetry.readiness_addr = "127.0.0.1:15020".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(
            e, "metrics and readiness both listen on 0.0.0.0:15020",
            "{e}"
        );
        let mut c = config("n0");
        c.telemetry.access_log = AccessLogTarget::File("/nonexistent-dir/access.log".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("/nonexistent-dir does not exist"), "{e}");
    }

    #[test]
    fn dns_labels() {
        for ok in ["n0", "node-1", "a", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Node", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn bad_node_name_is_named_in_the_error() {
        let err = config("Bad_Name").validate().unwrap_err();
        assert!(err.to_string().contains("\"Bad_Name\""), "{err}");
    }

    #[test]
    fn one_worker_below_four_cpus_then_ztunnels_two() {
        let threads: Vec<usize> = (1..=8).map(worker_threads_for).collect();
        assert_eq!(threads, [1, 1, 1, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn worker_threads_out_of_range_are_named() {
        for bad in [0, MAX_WORKER_THREADS + 1] {
            let mut c = config("n0");
            c.worker_threads = bad;
            let err = c.validate().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad} is out of range")),
                "{err}"
            );
        }
    }

    #[test]
    fn shortcut_budget_out_of_range_is_named() {
        for bad in [0, MIN_SHORTCUT_BUDGET - 1, MAX_SHORTCUT_BUDGET + 1] {
            let mut c = config("n0");
            c.shortcut_budget = bad;
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("{bad} bytes is out of range")),
                "{err}"
            );
        }
    }

    #[test]
    fn config_file_limits_out_of_range_are_named_with_their_range() {
        let mut c = config("n0");
        c.source = ClusterSource::Files {
            dir: "/nonexistent-config".into(),
            limits: FileLimits {
                max_file_bytes: 1,
                ..FileLimits::default()
            },
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("--config-max-file-bytes): 1 bytes is out of range (4096 to 67108864)"),
            "{err}"
        );
        let mut c = config("n0");
        c.source = ClusterSource::Files {
            dir: "/nonexistent-config".into(),
            limits: FileLimits {
                max_depth: 1000,
                ..FileLimits::default()
            },
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("--config-max-depth): 1000 is out of range (16 to 128)"),
            "{err}"
        );
    }

    #[test]
    fn transport_limits_are_checked() {
        let mut c = config("n0");
        c.transport.cert_lifetime = Duration::from_secs(1);
        assert!(matches!(c.validate(), Err(ConfigError::CertLifetime(_))));
        let mut c = config("n0");
        c.transport.max_streams_per_connection = 0;
        assert!(matches!(c.validate(), Err(ConfigError::MaxStreams(0))));
        let mut c = config("n0");
        c.transport.pool_idle_timeout = Duration::ZERO;
        assert!(matches!(c.validate(), Err(ConfigError::PoolIdleTimeout)));
    }

    #[test]
    fn a_remote_ca_needs_an_https_address_and_its_roots_file() {
        let remote = |address: &str, root_cert: &str| RemoteCa {
            address: address.into(),
            root_cert: root_cert.into(),
            token_file: DEFAULT_CA_TOKEN_FILE.into(),
        };
        let mut c = config("n0");
        c.transport.remote_ca = Some(remote(
            "http://mesh-ca.mesh-system.svc:15012",
            "/etc/hostname",
        ));
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("--ca-address: "), "{err}");
        let mut c = config("n0");
        c.transport.remote_ca = Some(remote(
            "https://mesh-ca.mesh-system.svc:15012",
            "/nonexistent/root.pem",
        ));
        let err = c.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "--ca-root-cert /nonexistent/root.pem: not a file (or missing)"
        );
    }

    #[test]
    fn bpffs_dir_off_bpffs_is_rejected() {
        // `/tmp` is never a bpf filesystem.
        let mut c = config("n0");
        c.bpffs_dir = "/tmp/mesh-agent-config-test/does-not-exist".into();
        let err = c.validate().unwrap_err();
        assert!(matches!(err, ConfigError::NotBpffs { .. }), "{err}");
        assert!(
            err.to_string().contains("/tmp/mesh-agent-config-test"),
            "{err}"
        );
    }

    #[test]
    fn display_lists_every_field() {
        assert_eq!(
            config("n0").to_string(),
            "node=n0 source=files config_dir=/nonexistent-config config_max_file_bytes=4194304 \
             config_max_depth=64 bpffs_dir=/nonexistent \
             agent_cgroup=/nonexistent-cgroup sockmap=true shortcut_budget=4194304 kernel_direct=false label_key=istio.io/dataplane-mode \
             trust_domain=cluster.local root_namespace=istio-system cluster_domain=cluster.local on_exit=release worker_threads=2 \
             ca_dir=/nonexistent-ca ca_address=none crypto_provider=aws-lc-rs cert_lifetime=86400s \
             max_streams_per_connection=128 pool_idle_timeout=300s stream_idle_timeout=3600s access_log=stdout admin=127.0.0.1:15000 metrics=0.0.0.0:15020 readiness=0.0.0.0:15021 tracing=off"
        );
    }

    #[test]
    fn cgroup2_mount_point_from_mountinfo() {
        // A bind mount of a cgroup below the root (a node's kubepods, in a container) first.
        let text = "22 1 0:21 / /sys rw - sysfs sysfs rw\n\
                    34 22 0:30 /t/kubepods /n/cgroup rw - cgroup2 cgroup2 rw\n\
                    35 22 0:30 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(text).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            cgroup2_mount("22 1 0:21 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn own_cgroup_is_a_directory() {
        // Every process has a cgroup v2 entry once cgroup2 is mounted (setup mounts it).
        let path = own_cgroup().expect("cgroup2 is mounted (cargo xtask setup)");
        assert!(path.is_dir(), "{}", path.display());
    }
}
