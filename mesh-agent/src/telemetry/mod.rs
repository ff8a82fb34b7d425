//! What the agent reports about the connections it carries: Istio's TCP metrics (served on
//! port 15020 by [`crate::admin`]), the JSON access log, and the per-connection `tracing` line.
//!
//! A connection is described once, when it opens, by a [`ConnInfo`]; [`Telemetry::open`]
//! counts it under each role this agent plays for it (Istio's `reporter`: the source's agent,
//! the destination's, or both for a same-node connection), and [`Telemetry::close`] writes its
//! record. A refused connection is counted opened and closed with `response_flags="DENY"` (or
//! `CONNECT` when the upstream could not be reached), and logged with the decision.

pub mod access_log;
pub mod exposition;
pub mod labels;
pub mod metrics;

use std::{
    io,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Instant, SystemTime},
};

use mesh_identity::Identity;
use mesh_trace::{FinishedSpan, KeyValue, LogBudget, SpanKind, TraceContext, Tracer};
use tracing::{debug, warn};

use crate::local_pod::LocalPod;
use mesh_cluster::{AuthzDecision, DecisionReason, Service, Verdict, Workload};

use self::{
    access_log::{AccessRecord, Authz, Endpoint},
    labels::{workload_name, Peer, PeerLabels, ServiceLabels, TrafficLabels},
};
pub use mesh_trace::{rfc3339, AccessLog, AccessLogError, AccessLogTarget};

pub use self::{
    labels::{Reporter, ResponseFlags},
    metrics::{ConnCounters, Metrics},
};

/// Which of a pod's listeners a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured on its way out of a pod of this node.
    Outbound,
    /// On its way into a pod of this node (port 15006, or an HBONE stream on 15008).
    Inbound,
}

impl Direction {
    /// The label value in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How the connection is secured, with the peer's identity the agent vouches for; the other
/// end's is the identity of the connection's pod ([`ConnInfo::identities`]), not kept twice.
#[derive(Clone, Debug)]
pub enum Security {
    /// Plain TCP: an unmeshed peer (or a destination outside the mesh).
    None,
    /// Both pods on this node: no TLS, identities known to the agent itself. `peer`: the
    /// destination pod's.
    SameNode { peer: Identity },
    /// HBONE: mutual TLS between the agents, identities proven by certificates. `peer`: the
    /// other end's (the destination's for an outbound connection, the source's for an inbound
    /// one).
    MutualTls { peer: Identity },
}

impl Security {
    /// Istio's `connection_security_policy` label value (`same_node` is ours: no TLS, both
    /// identities known to the agent).
    pub fn policy(&self) -> &'static str {
        match self {
            Security::None => "none",
            Security::SameNode { .. } => "same_node",
            Security::MutualTls { .. } => "mutual_tls",
        }
    }

    /// The other end's identity.
    pub fn peer(&self) -> Option<&Identity> {
        match self {
            Security::None => None,
            Security::SameNode { peer } | Security::MutualTls { peer } => Some(peer),
        }
    }
}

/// Who is talking to whom, described when the connection opens.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub direction: Direction,
    /// The pod of this node whose listener accepted the connection.
    pub pod: Arc<LocalPod>,
    /// The original client.
    pub src: SocketAddr,
    /// The original destination.
    pub dst: SocketAddr,
    /// Where the agent connects (the endpoint after service resolution).
    pub upstream: SocketAddr,
    /// The service the destination was reached through.
    pub service: Option<Arc<Service>>,
    pub security: Security,
    /// The source workload, when the cluster view knows it.
    pub src_workload: Option<Arc<Workload>>,
    /// The destination workload, when the cluster view knows it.
    pub dst_workload: Option<Arc<Workload>>,
    /// The authorization decision, when this agent is the destination's.
    pub authz: Option<AuthzDecision>,
    /// The connection's span, for a connection carried over HBONE whose trace is sampled and
    /// exported ([`ConnInfo::set_trace`]). Boxed: the record of an untraced connection stays
    /// within its allocation class (`proxy::relay`'s size test).
    pub trace: Option<Box<ConnTrace>>,
}

/// A connection's span: a new trace at the source's agent (its context sent in the CONNECT),
/// the child of the CONNECT's context at the destination's.
#[derive(Clone, Copy, Debug)]
pub struct ConnTrace {
    pub context: TraceContext,
    /// The parent span's id, when the span has one.
    pub parent: Option<u64>,
}

impl ConnInfo {
    /// Keeps the connection's span when `tracer` will export it (a sampled trace, spans
    /// exported); otherwise the context was only propagated.
    pub fn set_trace(&mut self, context: TraceContext, parent: Option<u64>, tracer: &Tracer) {
        if context.sampled && tracer.exporting() {
            self.trace = Some(Box::new(ConnTrace { context, parent }));
        }
    }

    /// A connection described by its direction, pod and addresses; everything else unknown.
    pub fn new(
        direction: Direction,
        pod: &Arc<LocalPod>,
        src: SocketAddr,
        dst: SocketAddr,
        upstream: SocketAddr,
    ) -> Self {
        Self {
            direction,
            pod: Arc::clone(pod),
            src,
            dst,
            upstream,
            service: None,
            security: Security::None,
            src_workload: None,
            dst_workload: None,
            authz: None,
            trace: None,
        }
    }

    /// The source's and the destination's identity: the peer's, and the pod's own.
    pub fn identities(&self) -> (Option<&Identity>, Option<&Identity>) {
        let Some(peer) = self.security.peer() else {
            return (None, None);
        };
        let own = &self.pod.identity;
        match self.direction {
            Direction::Outbound => (Some(own), Some(peer)),
            Direction::Inbound => (Some(peer), Some(own)),
        }
    }

    /// The roles this agent reports the connection under.
    pub fn reporters(&self) -> &'static [Reporter] {
        match (self.direction, &self.security) {
            (_, Security::SameNode { .. }) => &[Reporter::Source, Reporter::Destination],
            (Direction::Inbound, _) => &[Reporter::Destination],
            _ => &[Reporter::Source],
        }
    }

    fn labels(&self, reporter: Reporter, flags: ResponseFlags) -> TrafficLabels {
        let (src_id, dst_id) = self.identities();
        TrafficLabels {
            reporter,
            source: PeerLabels::of(Peer {
                workload: self.src_workload.as_deref(),
                identity: src_id,
            }),
            destination: PeerLabels::of(Peer {
                workload: self.dst_workload.as_deref(),
                identity: dst_id,
            }),
            service: ServiceLabels::of(self.service.as_deref()),
            security: self.security.policy(),
            response_flags: flags,
        }
    }
}

/// The counters a connection adds its bytes to: one label set per reporter role.
#[derive(Debug, Default)]
pub struct Counters {
    sets: [Option<Arc<ConnCounters>>; 2],
}

impl Counters {
    /// Adds bytes moved since the last call.
    pub fn add_bytes(&self, to_destination: u64, to_source: u64) {
        for set in self.sets.iter().flatten() {
            set.add_bytes(to_destination, to_source);
        }
    }
}

/// Why a connection was refused, for its record.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// An `AuthorizationPolicy` denied it, or `PeerAuthentication` STRICT a plaintext one
    /// ([`DecisionReason::MtlsRequired`]).
    Policy(AuthzDecision),
    /// The upstream could not be reached.
    Connect(String),
    /// The destination's agent denied it (HBONE answer 401), as seen by the source's agent.
    PeerDenied(String),
}

/// The agent's metrics, access log and spans.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub tracer: Tracer,
    /// How many per-connection warnings are written each second (`mesh_trace::log_budget`).
    pub log_budget: Arc<LogBudget>,
}

impl Telemetry {
    pub fn new(access_log: AccessLog, tracer: Tracer) -> Self {
        Self {
            metrics: Metrics::default(),
            access_log,
            tracer,
            log_budget: Arc::default(),
        }
    }

    /// Whether a warning about `info`'s connection may be written now: within its source
    /// pod's share of the log budget, and all pods' (`mesh_trace::log_budget`).
    fn may_warn(&self, info: &ConnInfo) -> bool {
        self.log_budget.may_warn(info.src.ip())
    }

    /// Counts a connection that opened and will be relayed; returns its counters.
    pub fn open(&self, info: &ConnInfo) -> Counters {
        let mut counters = Counters::default();
        for (slot, &reporter) in counters.sets.iter_mut().zip(info.reporters()) {
            *slot = Some(
                self.metrics
                    .open(info.labels(reporter, ResponseFlags::None)),
            );
        }
        self.active(info).fetch_add(1, Ordering::Relaxed);
        if let Some(d) = &info.authz {
            count_decision(&self.metrics, d);
        }
        counters
    }

    fn active(&self, info: &ConnInfo) -> &std::sync::atomic::AtomicI64 {
        if info.direction == Direction::Inbound {
            &self.metrics.agent.active_inbound
        } else {
            &self.metrics.agent.active_outbound
        }
    }

    /// Records a connection refused when it opened: counted opened and closed, logged.
    pub fn refused(&self, info: &ConnInfo, started: Instant, refusal: &Refusal) {
        let agent = &self.metrics.agent;
        let (flags, authz, error) = match refusal {
            Refusal::Policy(d) if d.reason == DecisionReason::MtlsRequired => {
                agent.plaintext_refused.fetch_add(1, Ordering::Relaxed);
                let policy = d.policy.as_deref().unwrap_or("");
                if self.may_warn(info) {
                    warn!(dst = %info.dst, src = %info.src, policy, "plaintext connection refused: mTLS is STRICT");
                }
                (ResponseFlags::Denied, Some(authz_of(d, false)), None)
            }
            Refusal::Policy(d) => {
                count_decision(&self.metrics, d);
                if self.may_warn(info) {
                    warn!(
                        src = %info.src, dst = %info.dst,
                        src_identity = info.identities().0.map_or("", Identity::as_str),
                        policy = d.policy.as_deref().unwrap_or(""),
                        reason = reason_str(d.reason),
                        "connection denied by policy"
                    );
                }
                (ResponseFlags::Denied, Some(authz_of(d, false)), None)
            }
            Refusal::PeerDenied(e) => {
                if self.may_warn(info) {
                    warn!(src = %info.src, dst = %info.dst, error = %e, "the destination denied the connection");
                }
                (ResponseFlags::Denied, None, Some(e.clone()))
            }
            Refusal::Connect(e) => {
                agent.connect_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(d) = &info.authz {
                    count_decision(&self.metrics, d);
                }
                (
                    ResponseFlags::ConnectFailure,
                    info.authz.as_ref().map(|d| authz_of(d, false)),
                    Some(e.clone()),
                )
            }
        };
        for &reporter in info.reporters() {
            self.metrics.refused(info.labels(reporter, flags));
        }
        let why = error.clone().unwrap_or_else(|| flags.as_str().to_owned());
        self.span(info, started, [0, 0], Some(why));
        self.access_log
            .write(&Self::record(info, started, [0, 0], authz, flags, error));
    }

    /// Exports the connection's span when it has one and its trace is sampled.
    fn span(&self, info: &ConnInfo, started: Instant, totals: [u64; 2], error: Option<String>) {
        let Some(ConnTrace { context, parent }) = info.trace.as_deref().copied() else {
            return;
        };
        let (src_id, dst_id) = info.identities();
        let end = SystemTime::now();
        #[allow(clippy::cast_possible_wrap, reason = "byte counts far below 2^63")]
        let mut attributes = vec![
            KeyValue::new("mesh.direction", info.direction.as_str()),
            KeyValue::new("client.address", info.src.to_string()),
            KeyValue::new("server.address", info.dst.to_string()),
            KeyValue::new("upstream.address", info.upstream.to_string()),
            KeyValue::new("istio.connection_security_policy", info.security.policy()),
            KeyValue::new("mesh.bytes_to_destination", totals[0] as i64),
            KeyValue::new("mesh.bytes_to_source", totals[1] as i64),
        ];
        if let Some(id) = src_id {
            attributes.push(KeyValue::new(
                "istio.source_principal",
                id.as_str().to_owned(),
            ));
        }
        if let Some(id) = dst_id {
            attributes.push(KeyValue::new(
                "istio.destination_principal",
                id.as_str().to_owned(),
            ));
        }
        if let Some(service) = info.service.as_deref() {
            attributes.push(KeyValue::new(
                "istio.destination_service",
                service.hostname.clone(),
            ));
        }
        let target = info
            .service
            .as_deref()
            .map_or_else(|| info.dst.to_string(), |s| s.hostname.clone());
        self.tracer.record(FinishedSpan {
            name: format!("{} {target}", info.direction.as_str()),
            kind: match info.direction {
                Direction::Outbound => SpanKind::Client,
                Direction::Inbound => SpanKind::Server,
            },
            context,
            parent,
            start: end.checked_sub(started.elapsed()).unwrap_or(end),
            end,
            attributes,
            error,
        });
    }

    /// Records a relayed connection that ended: its close, the access log line and the
    /// connection's `tracing` line. `totals` are the bytes `[to destination, to source]`;
    /// `revoked` is the decision of a policy change that closed it.
    pub fn close(
        &self,
        info: &ConnInfo,
        counters: &Counters,
        started: Instant,
        totals: [u64; 2],
        result: &io::Result<()>,
        revoked: Option<&AuthzDecision>,
    ) {
        for set in counters.sets.iter().flatten() {
            set.close();
        }
        self.active(info).fetch_sub(1, Ordering::Relaxed);
        let authz = match revoked {
            Some(d) => {
                self.metrics.agent.revoked.fetch_add(1, Ordering::Relaxed);
                Some(authz_of(d, true))
            }
            None => info.authz.as_ref().map(|d| authz_of(d, false)),
        };
        let error = result.as_ref().err().map(ToString::to_string);
        // A warning (failed, or closed by a policy change) within the log budget; the debug line
        // of a clean close always.
        if (error.is_none() && revoked.is_none()) || self.may_warn(info) {
            log_close(info, started, totals, error.as_deref(), revoked);
        }
        let span_error = error
            .clone()
            .or_else(|| revoked.map(|_| "closed by a policy change".to_owned()));
        self.span(info, started, totals, span_error);
        self.access_log.write(&Self::record(
            info,
            started,
            totals,
            authz,
            ResponseFlags::None,
            error,
        ));
    }

    fn record(
        info: &ConnInfo,
        started: Instant,
        totals: [u64; 2],
        authz: Option<Authz>,
        flags: ResponseFlags,
        error: Option<String>,
    ) -> AccessRecord {
        let (src_id, dst_id) = info.identities();
        let endpoint = |addr: SocketAddr, w: Option<&Workload>, id: Option<&Identity>| Endpoint {
            addr: addr.to_string(),
            workload: w.map(|w| w.name.clone()),
            namespace: w
                .map(|w| w.namespace.clone())
                .or_else(|| id.map(|i| i.namespace().to_owned())),
            identity: id.map(|i| i.as_str().to_owned()),
        };
        let reporters = info.reporters();
        AccessRecord {
            log: "access",
            time: rfc3339(SystemTime::now()),
            reporter: if reporters.len() > 1 {
                "source_and_destination"
            } else {
                reporters[0].as_str()
            },
            direction: info.direction.as_str(),
            src: endpoint(info.src, info.src_workload.as_deref(), src_id),
            dst: endpoint(info.dst, info.dst_workload.as_deref(), dst_id),
            service: info.service.as_deref().map(|s| s.hostname.clone()),
            upstream: info.upstream.to_string(),
            connection_security_policy: info.security.policy(),
            bytes_to_destination: totals[0],
            bytes_to_source: totals[1],
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            authz,
            response_flags: flags.as_str(),
            error,
            trace_id: info.trace.as_ref().map(|t| t.context.trace_id_hex()),
        }
    }
}

fn count_decision(metrics: &Metrics, d: &AuthzDecision) {
    let agent = &metrics.agent;
    match d.verdict {
        Verdict::Allow => agent.authz_allowed.fetch_add(1, Ordering::Relaxed),
        Verdict::Deny => agent.authz_denied.fetch_add(1, Ordering::Relaxed),
    };
}

/// The access log's `reason` for a decision.
pub fn reason_str(reason: DecisionReason) -> &'static str {
    match reason {
        DecisionReason::NoPolicy => "no_policy",
        DecisionReason::AllowMatched => "allow_matched",
        DecisionReason::DenyMatched => "deny_matched",
        DecisionReason::NoAllowMatched => "no_allow_matched",
        DecisionReason::MtlsRequired => "mtls_required",
        DecisionReason::UnknownDestination => "unknown_destination",
        DecisionReason::WaypointBypass => "waypoint_bypass",
        DecisionReason::NodeLocal => "node_local",
    }
}

fn authz_of(d: &AuthzDecision, revoked: bool) -> Authz {
    Authz {
        decision: match (revoked, d.verdict) {
            (true, _) => "revoked",
            (false, Verdict::Allow) => "allow",
            (false, Verdict::Deny) => "deny",
        },
        reason: reason_str(d.reason),
        policy: d.policy.as_deref().map(str::to_owned),
        audit: d.audited.iter().map(ToString::to_string).collect(),
    }
}

/// The connection's `tracing` line when it ends (the agent's own log, on standard error).
fn log_close(
    info: &ConnInfo,
    started: Instant,
    totals: [u64; 2],
    error: Option<&str>,
    revoked: Option<&AuthzDecision>,
) {
    let duration_ms = started.elapsed().as_millis();
    let service = info
        .service
        .as_deref()
        .map(|s| s.hostname.clone())
        .unwrap_or_default();
    let security = info.security.policy();
    let (src_id, dst_id) = info.identities();
    let src_identity = tracing::field::display(src_id.map_or("", Identity::as_str));
    let dst_identity = tracing::field::display(dst_id.map_or("", Identity::as_str));
    let src_workload = info.src_workload.as_deref().map_or("", workload_name);
    let dst_workload = info.dst_workload.as_deref().map_or("", workload_name);
    if let Some(d) = revoked {
        warn!(
            direction = info.direction.as_str(),
            src = %info.src,
            dst = %info.dst,
            src_identity,
            policy = d.policy.as_deref().unwrap_or(""),
            reason = reason_str(d.reason),
            bytes_sent = totals[0],
            bytes_received = totals[1],
            duration_ms,
            "connection closed: no longer allowed by policy"
        );
        return;
    }
    // The access log has every closed connection; this line only for debugging (each one a
    // write to stderr).
    match error {
        None => debug!(
            direction = info.direction.as_str(),
            pod = %info.pod.name,
            src = %info.src,
            dst = %info.dst,
            upstream = %info.upstream,
            service,
            security,
            src_workload,
            dst_workload,
            src_identity,
            dst_identity,
            bytes_sent = totals[0],
            bytes_received = totals[1],
            duration_ms,
            "connection closed"
        ),
        Some(error) => warn!(
            direction = info.direction.as_str(),
            pod = %info.pod.name,
            src = %info.src,
            dst = %info.dst,
            upstream = %info.upstream,
            service,
            security,
            src_identity,
            dst_identity,
            bytes_sent = totals[0],
            bytes_received = totals[1],
            duration_ms,
            error,
            "connection failed"
        ),
    }
}
