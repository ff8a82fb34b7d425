//! What the admin endpoints show about a running agent: the Prometheus metrics (Istio's TCP
//! metrics, the agent's health, the kernel fast path's counters, the process) and the
//! configuration dump (workloads, services, policies, certificates).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use mesh_identity::{CertManager, CertSnapshot};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::debug;

use crate::{
    admin::AdminSource,
    config::AgentConfig,
    proxy::ProxyCtx,
    telemetry::{
        exposition::{Exposition, Kind},
        rfc3339,
    },
};
use mesh_cluster::{ClusterState, TargetPort};

/// The agent's state, as the admin endpoints read it.
pub struct AgentStatus {
    pub config: AgentConfig,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub certs: Arc<CertManager>,
    pub ctx: Arc<ProxyCtx>,
    /// Pods of this node the agent should capture and does not (or does not serve), and why.
    pub uncaptured: watch::Receiver<crate::pods::Uncaptured>,
    /// The Kubernetes source's watches, when the agent reads the API.
    pub api: Option<watch::Receiver<mesh_cluster::ApiStatus>>,
    pub started: SystemTime,
}

impl std::fmt::Debug for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStatus")
            .field("node", &self.config.node_name)
            .finish_non_exhaustive()
    }
}

impl AdminSource for AgentStatus {
    fn metrics(&self) -> String {
        let mut out = Exposition::default();
        self.ctx.telemetry.metrics.write_prometheus(&mut out);
        self.write_agent(&mut out);
        self.write_api(&mut out);
        self.write_fastpath(&mut out);
        self.write_kernel_direct(&mut out);
        write_process(&mut out, self.started);
        out.encode()
    }

    fn config_dump(&self) -> Value {
        let state = Arc::clone(&self.state.borrow());
        let wanted: Vec<String> = self
            .certs
            .wanted()
            .iter()
            .map(|i| i.as_str().to_owned())
            .collect();
        let snapshot = self.certs.snapshot();
        json!({
            "node": self.config.node_name,
            "version": env!("CARGO_PKG_VERSION"),
            "config": self.config.to_string(),
            "cluster": {
                "generation": state.generation(),
                "errors": state.errors().iter().map(|e| json!({"source": e.source, "message": e.message})).collect::<Vec<_>>(),
                "warnings": state.warnings(),
            },
            "workloads": self.workloads_json(&state),
            "services": services_json(&state),
            "policies": policies_json(&state),
            "certificates": {
                "wanted": wanted,
                "issued": certificates_json(&snapshot),
                "generation": snapshot.generation,
            },
            "connections": {
                "authorized_open": self.ctx.tracker.len(),
                "hbone_pool": {
                    "connections": self.ctx.transport.pool.connections(),
                    "active_streams": self.ctx.transport.pool.active_streams(),
                    "connections_opened": self.ctx.transport.pool.connections_opened(),
                },
            },
        })
    }
}

impl AgentStatus {
    fn workloads_json(&self, state: &ClusterState) -> Vec<Value> {
        let local = Arc::clone(&self.ctx.local.borrow());
        let served: BTreeSet<&str> = local.values().map(|p| p.name.as_str()).collect();
        let uncaptured = Arc::clone(&self.uncaptured.borrow());
        state
            .workloads()
            .iter()
            .map(|w| {
                let name = format!("{}/{}", w.namespace, w.name);
                let mut entry = json!({
                    "namespace": w.namespace,
                    "name": w.name,
                    "node": w.node,
                    "service_account": w.service_account,
                    "identity": w.identity.as_str(),
                    "ips": w.ips,
                    "labels": w.labels,
                    "ready": w.readiness.serving(),
                    "terminating": w.readiness == mesh_cluster::Readiness::Terminating,
                    "enrolled": w.enrolled,
                    "locality": {
                        "region": w.locality.region,
                        "zone": w.locality.zone,
                        "subzone": w.locality.subzone,
                    },
                    "captured_by_this_agent": served.contains(name.as_str()),
                });
                if let Some(reason) = uncaptured.get(&name) {
                    entry["not_captured_because"] = json!(reason);
                }
                entry
            })
            .collect()
    }
}

fn services_json(state: &ClusterState) -> Vec<Value> {
    state
        .services()
        .iter()
        .map(|s| {
            let ports: Vec<Value> = s
                .ports
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name,
                        "port": p.port,
                        "protocol": p.protocol.to_string(),
                        "target_port": match &p.target_port {
                            TargetPort::Number(n) => json!(n),
                            TargetPort::Name(n) => json!(n),
                        },
                        "endpoints": p.endpoints.iter().map(|e| json!({
                            "address": e.addr,
                            "pod": e.workload.as_ref().map(|w| format!("{}/{}", w.namespace, w.name)),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "namespace": s.namespace,
                "name": s.name,
                "vips": s.vips,
                "ports": ports,
                "traffic_distribution": s.traffic_distribution.map(mesh_cluster::locality::TrafficDistribution::as_str),
                "kind": s.kind_name(),
                "entry": match &s.kind {
                    mesh_cluster::ServiceKind::Entry(facts) => json!(facts),
                    mesh_cluster::ServiceKind::Kubernetes => Value::Null,
                },
            })
        })
        .collect()
}

fn policies_json(state: &ClusterState) -> Value {
    let peer_auth: Vec<Value> = state
        .peer_authentications()
        .iter()
        .map(|p| {
            let port_level: BTreeMap<String, String> = p
                .port_level
                .iter()
                .map(|(k, v)| (k.to_string(), format!("{v:?}")))
                .collect();
            json!({
                "namespace": p.namespace,
                "name": p.name,
                "scope": format!("{:?}", p.scope),
                "selector": p.selector,
                "mode": format!("{:?}", p.mode),
                "port_level": port_level,
            })
        })
        .collect();
    let authz: Vec<Value> = state
        .authorization_policies()
        .iter()
        .map(|p| serde_json::to_value(&**p).unwrap_or_else(|e| json!({"error": e.to_string()})))
        .collect();
    json!({
        "authorization": authz,
        "peer_authentication": peer_auth,
    })
}

fn certificates_json(snapshot: &CertSnapshot) -> Vec<Value> {
    let now = SystemTime::now();
    let mut certs: Vec<Value> = snapshot
        .certs
        .values()
        .map(|c| {
            json!({
                "identity": c.identity().as_str(),
                "serial": c.serial_hex(),
                "not_before": rfc3339(c.not_before()),
                "not_after": rfc3339(c.not_after()),
                "rotate_at": rfc3339(c.rotate_at()),
                "expires_in_secs": c.not_after().duration_since(now).map_or(0, |d| d.as_secs()),
                "valid": c.is_valid_at(now),
            })
        })
        .collect();
    certs.sort_by(|a, b| a["identity"].as_str().cmp(&b["identity"].as_str()));
    certs
}

impl AgentStatus {
    /// The Kubernetes source's health, when the agent reads the API.
    fn write_api(&self, out: &mut Exposition) {
        if let Some(api) = &self.api {
            let api = api.borrow().clone();
            out.gauge("mesh_agent_kubernetes_api_reachable",
                "1 while every watch of the Kubernetes API works; 0 while the agent serves its last view",
                usize::from(api.unreachable_since.is_none()),
            );
            out.gauge("mesh_agent_kubernetes_api_unreachable_seconds",
                "Seconds since the Kubernetes API last failed, while it keeps failing (0 when reachable)",
                api.unreachable_since
                    .and_then(|since| since.elapsed().ok())
                    .map_or(0, |d| usize::try_from(d.as_secs()).unwrap_or(usize::MAX)),
            );
        }
    }

    fn write_agent(&self, out: &mut Exposition) {
        let state = Arc::clone(&self.state.borrow());
        let local = Arc::clone(&self.ctx.local.borrow());
        let served: BTreeSet<&str> = local.values().map(|p| p.name.as_str()).collect();
        out.family(
            "mesh_agent_info",
            "The agent's version and node",
            Kind::Gauge,
        )
        .sample(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("node", &self.config.node_name),
            ],
            1_u64,
        );
        out.gauge(
            "mesh_agent_captured_workloads",
            "Pods of this node whose traffic the agent captures",
            served.len(),
        );
        out.gauge("mesh_agent_uncaptured_workloads",
            "Pods of this node the agent should capture and serve but cannot (see /config_dump for why); retried",
            self.uncaptured.borrow().len(),
        );
        out.gauge(
            "mesh_agent_config_generation",
            "Generation of the cluster view in force",
            state.generation(),
        );
        out.gauge(
            "mesh_agent_config_errors",
            "Config sources rejected or failing to parse (their last good version is in force)",
            state.errors().len(),
        );
        out.gauge(
            "mesh_agent_config_warnings",
            "Warnings about valid config (conflicts, fields not enforced)",
            state.warnings().len(),
        );
        out.gauge(
            "mesh_agent_authorization_policies",
            "AuthorizationPolicies in the cluster view",
            state.authorization_policies().len(),
        );
        out.gauge("mesh_agent_authorized_connections",
            "Open connections this agent authorized as the destination's (re-checked on policy changes)",
            self.ctx.tracker.len(),
        );
        let log = &self.ctx.telemetry.access_log;
        out.counter(
            "mesh_agent_access_log_records_total",
            "Access log records written",
            log.written(),
        );
        out.counter(
            "mesh_agent_access_log_dropped_total",
            "Access log records dropped because the writer was behind",
            log.dropped(),
        );
        let snapshot = self.certs.snapshot();
        let mut certs: Vec<(&str, u64)> = snapshot
            .certs
            .values()
            .map(|c| {
                let expiry = c
                    .not_after()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                (c.identity().as_str(), expiry)
            })
            .collect();
        certs.sort_unstable();
        let family = out.family(
            "mesh_agent_certificate_expiration_timestamp_seconds",
            "When each workload certificate expires (Unix time)",
            Kind::Gauge,
        );
        for (identity, expiry) in certs {
            family.sample(&[("identity", identity)], expiry);
        }
    }

    fn write_kernel_direct(&self, out: &mut Exposition) {
        let direct = self.ctx.conn.direct();
        if !direct.enabled() {
            return;
        }
        let counts = match direct.counters() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "reading the kernel-direct counters failed");
                return;
            }
        };
        out.counter(
            "mesh_kernel_direct_connections_total",
            "Same-node connections the connect hook sent straight to the endpoint under a route the agent authorized (kernel-direct)",
            counts.connects,
        );
        out.counter(
            "mesh_kernel_direct_events_lost_total",
            "Reports of kernel-direct connections the kernel's ring had no room for (their metrics and access-log lines are missing)",
            counts.events_lost,
        );
        out.counter(
            "mesh_kernel_direct_ring_busy_total",
            "Connections a kernel-direct route would have taken that went through the agent because half the kernel's ring of reports was unread (the agent was behind)",
            counts.ring_busy,
        );
    }

    fn write_fastpath(&self, out: &mut Exposition) {
        let stats = match self.ctx.conn.fastpath() {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "reading the fast-path counters failed");
                return;
            }
        };
        let help = "Messages and bytes the kernel fast path (sockmap sk_msg) handled on pod-local legs: redirected straight to the peer socket, passed to the TCP stack (peer not in the short-cut), held to TCP (peer's budget full, or earlier TCP bytes unread), or sent direct (a same-node connection's application straight to the other application, past both legs)";
        for (name, rows) in [
            (
                "mesh_fastpath_messages_total",
                [
                    ("redirected", stats.redirected_msgs),
                    ("passed", stats.passed_msgs),
                    ("held", stats.held_msgs),
                    ("direct", stats.direct_msgs),
                ],
            ),
            (
                "mesh_fastpath_bytes_total",
                [
                    ("redirected", stats.redirected_bytes),
                    ("passed", stats.passed_bytes),
                    ("held", stats.held_bytes),
                    ("direct", stats.direct_bytes),
                ],
            ),
        ] {
            let family = out.family(name, help, Kind::Counter);
            for (outcome, v) in rows {
                family.sample(&[("outcome", outcome)], v);
            }
        }
    }
}

/// Prometheus' standard process metrics, from `/proc/self`.
fn write_process(out: &mut Exposition, started: SystemTime) {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kb = |key: &str| {
            status.lines().find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse::<u64>()
                    .ok()
            })
        };
        if let Some(rss) = kb("VmRSS:") {
            out.gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss * 1024,
            );
        }
        if let Some(vm) = kb("VmSize:") {
            out.gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vm * 1024,
            );
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(100);
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        if let (Some(utime), Some(stime)) = (field(11), field(12)) {
            #[allow(clippy::cast_precision_loss)]
            let v = (utime + stime) as f64 / ticks as f64;
            out.counter(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds",
                v,
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        out.gauge(
            "process_open_fds",
            "Number of open file descriptors",
            dir.count(),
        );
    }
    out.gauge(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds",
        started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
}
