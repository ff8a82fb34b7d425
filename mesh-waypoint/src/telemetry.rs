//! What the waypoint reports per request: Istio's request metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`, with
//! `reporter="waypoint"` and Istio's labels), served in Prometheus' text format, and one JSON
//! access-log line (standard output by default, written in batches by the log's own thread:
//! [`mesh_trace::AccessLog`]). Both are written when the response's last byte has gone (or the
//! client went away first), so duration and sizes are the whole exchange's.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use mesh_cluster::{Service, Workload};
use mesh_identity::Identity;
use mesh_trace::{AccessLog, FinishedSpan, KeyValue, LogBudget, SpanKind, TraceContext, Tracer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use serde::Serialize;

use crate::grpc_messages::MessageCount;

/// Istio's duration buckets, in milliseconds.
const DURATION_BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// Size buckets, in bytes: powers of ten up to 100 MB.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Istio's labels of the request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Labels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    request_protocol: &'static str,
    response_code: u16,
    grpc_response_status: String,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// The waypoint's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    /// Mirrored requests not sent: as many were in flight as the waypoint allows.
    mirrors_skipped: Counter,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    /// gRPC messages sent by clients, and by servers.
    request_messages: Family<Labels, Counter>,
    response_messages: Family<Labels, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let histograms = || HistogramFamily::new_with_constructor(duration_histogram);
        let sizes = || HistogramFamily::new_with_constructor(size_histogram);
        let (duration, request_bytes, response_bytes) = (histograms(), sizes(), sizes());
        registry.register("istio_requests", "Requests", requests.clone());
        let mirrors_skipped = Counter::default();
        registry.register(
            "mesh_waypoint_mirrors_skipped",
            "Mirrored requests not sent because as many mirrors were in flight as allowed",
            mirrors_skipped.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration, from the request's start to the response's last byte",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size: headers and body",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size: headers and body",
            response_bytes.clone(),
        );
        let (request_messages, response_messages) = (Family::default(), Family::default());
        registry.register(
            "istio_request_messages",
            "gRPC messages sent by the client",
            request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages sent by the server",
            response_messages.clone(),
        );
        Self {
            registry,
            requests,
            mirrors_skipped,
            duration,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
        }
    }

    /// A finished request's samples: its count, duration and sizes, and its gRPC messages
    /// (`None` for a request that is not gRPC).
    fn record(
        &self,
        labels: &Labels,
        elapsed: std::time::Duration,
        (request_bytes, response_bytes): (u64, u64),
        (sent, answered): (Option<u64>, Option<u64>),
    ) {
        self.requests.get_or_create(labels).inc();
        if let Some(sent) = sent {
            self.request_messages.get_or_create(labels).inc_by(sent);
            let answered = answered.unwrap_or(0);
            self.response_messages
                .get_or_create(labels)
                .inc_by(answered);
        }
        let millis = elapsed.as_secs_f64() * 1000.0;
        self.duration.get_or_create(labels).observe(millis);
        #[allow(clippy::cast_precision_loss)] // Byte counts far below 2^52.
        {
            self.request_bytes
                .get_or_create(labels)
                .observe(request_bytes as f64);
            self.response_bytes
                .get_or_create(labels)
                .observe(response_bytes as f64);
        }
    }

    /// Counts a mirror not sent.
    pub(crate) fn mirror_skipped(&self) {
        self.mirrors_skipped.inc();
    }

    /// The metrics in Prometheus' text format.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a `String` cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// Where each request is reported: metrics, its span, its access log line.
pub(crate) struct Reporters {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tracer: Tracer,
    pub(crate) access_log: AccessLog,
    /// How many per-connection and per-request warnings are written each second, per client
    /// and in all (`mesh_trace::log_budget`).
    pub(crate) log_budget: Arc<LogBudget>,
}

/// A request's access log line.
#[derive(Serialize)]
struct AccessLine<'a> {
    /// Always `access`: tells these lines from the waypoint's own logs.
    log: &'static str,
    time: String,
    reporter: &'static str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    grpc_status: Option<u8>,
    duration_ms: u64,
    src: AccessSource<'a>,
    service: Option<&'a str>,
    /// The endpoint's address.
    upstream: Option<SocketAddr>,
    /// The endpoint's pod, `namespace/name`.
    upstream_workload: Option<String>,
    bytes_received: u64,
    bytes_sent: u64,
    /// W3C trace id, 32 hex digits.
    trace_id: String,
    /// `x-request-id` (Istio's `request_id`).
    request_id: &'a str,
    response_flags: &'static str,
    /// The policy that denied the request, or those that audited it.
    #[serde(skip_serializing_if = "Option::is_none")]
    authz: Option<&'a str>,
}

/// Who sent the request, in its access log line.
#[derive(Serialize)]
struct AccessSource<'a> {
    identity: &'a str,
    workload: &'a str,
}

/// A gRPC status code as a response or its trailers give it (`grpc-status`): 0 to 16. Any other
/// value is read as `UNKNOWN` (2), as gRPC clients read a malformed status, so what a backend
/// sends cannot add label values of its own to the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GrpcStatus(u8);

impl GrpcStatus {
    /// `UNKNOWN`.
    const UNKNOWN: Self = Self(2);
    /// The highest code gRPC defines (`UNAUTHENTICATED`).
    const LAST: u8 = 16;

    /// The status a `grpc-status` value says.
    pub(crate) fn of(value: &http::HeaderValue) -> Self {
        value
            .to_str()
            .ok()
            .and_then(|text| text.parse::<u8>().ok())
            .filter(|code| *code <= Self::LAST)
            .map_or(Self::UNKNOWN, Self)
    }

    /// The code.
    pub(crate) fn code(self) -> u8 {
        self.0
    }
}

/// Why the waypoint answered as it did, as Envoy's response flags say it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Flag {
    /// Nothing to report.
    #[default]
    None,
    /// `NR`: no route matched.
    NoRoute,
    /// `UH`: no healthy endpoint.
    NoHealthyUpstream,
    /// `UF`: the endpoint could not be reached.
    UpstreamFailure,
    /// `UT`: a timeout.
    Timeout,
    /// `DC`: the client went away before the response was done.
    DownstreamClosed,
    /// `NC`: the backend does not resolve (a 500).
    InvalidBackend,
    /// `FI`: a fault injected an abort.
    FaultAbort,
    /// `DI`: a fault injected a delay.
    FaultDelay,
    /// `RL`: a local rate limit refused it.
    RateLimited,
    /// `UO`: a circuit breaker of the destination (`connectionPool`) refused it.
    Overflow,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::NoRoute => "NR",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamFailure => "UF",
            Flag::Timeout => "UT",
            Flag::DownstreamClosed => "DC",
            Flag::InvalidBackend => "NC",
            Flag::FaultAbort => "FI",
            Flag::FaultDelay => "DI",
            Flag::RateLimited => "RL",
            Flag::Overflow => "UO",
        }
    }
}

/// What the response says about where the request went: set in the response's extensions by
/// whoever made it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) flag: Flag,
    /// The endpoint that answered.
    pub(crate) upstream: Option<SocketAddr>,
    pub(crate) workload: Option<Arc<Workload>>,
    /// The backend Service.
    pub(crate) service: Option<Arc<Service>>,
}

/// One request's record, completed when its response ends.
pub(crate) struct RequestLog {
    started: Instant,
    /// `x-request-id`, as the request came or as the waypoint gave it.
    request_id: String,
    method: String,
    authority: String,
    path: String,
    protocol: &'static str,
    /// The request's span and its parent's span id.
    trace: (TraceContext, Option<u64>),
    wall_start: SystemTime,
    source: Identity,
    source_workload: Option<Arc<Workload>>,
    request_bytes: Arc<AtomicU64>,
    /// A gRPC request's messages, as its body is read.
    request_messages: Option<Arc<AtomicU64>>,
    /// The Service the tunnel was addressed to (its VIP), if any: what the metrics name as the
    /// destination service when the response says no other (the waypoint's own answers).
    addressed: Option<Arc<Service>>,
    status: u16,
    grpc_status: Option<GrpcStatus>,
    outcome: Outcome,
    /// What the `AuthorizationPolicies` did, when they denied or audited.
    authz: Option<String>,
}

impl RequestLog {
    /// The record of a request, from its head; `request_bytes` counts its body as it is read;
    /// `trace` is the request's span and its parent's span id; `addressed` the Service whose
    /// VIP the tunnel was for.
    pub(crate) fn start(
        parts: &http::request::Parts,
        (source, source_workload): (Identity, Option<Arc<Workload>>),
        addressed: Option<Arc<Service>>,
        request_bytes: Arc<AtomicU64>,
        trace: (TraceContext, Option<u64>),
    ) -> Self {
        let authority = crate::filters::request_authority(&parts.uri, &parts.headers)
            .unwrap_or_default()
            .to_owned();
        let grpc = crate::grpc_reply::is_grpc(&parts.headers);
        let protocol = match (grpc, parts.version) {
            (true, _) => "grpc",
            (false, http::Version::HTTP_2) => "http2",
            _ => "http",
        };
        request_bytes.fetch_add(head_size(&parts.headers), Ordering::Relaxed);
        Self {
            started: Instant::now(),
            request_id: parts
                .headers
                .get(&mesh_trace::X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            method: parts.method.to_string(),
            authority,
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            protocol,
            trace,
            wall_start: SystemTime::now(),
            source,
            source_workload,
            request_bytes,
            request_messages: grpc.then(Arc::default),
            addressed,
            status: 0,
            grpc_status: None,
            outcome: Outcome::default(),
            authz: None,
        }
    }

    /// Whether the request is gRPC (its `content-type`).
    /// The request's authority (`:authority`, else `Host`), as sent.
    pub(crate) fn authority(&self) -> &str {
        &self.authority
    }

    /// Notes what the `AuthorizationPolicies` did (for the access log).
    pub(crate) fn authz(&mut self, note: String) {
        self.authz = Some(note);
    }

    pub(crate) fn is_grpc(&self) -> bool {
        self.protocol == "grpc"
    }

    /// Where a gRPC request's body counts its messages ([`Counted`]).
    pub(crate) fn request_messages(&self) -> Option<Arc<AtomicU64>> {
        self.request_messages.clone()
    }

    /// Adds the response's head and what it says about where the request went.
    pub(crate) fn respond(&mut self, response: &http::Response<impl Body>) {
        self.status = response.status().as_u16();
        self.grpc_status = response.headers().get("grpc-status").map(GrpcStatus::of);
        if let Some(outcome) = response.extensions().get::<Outcome>() {
            self.outcome = outcome.clone();
        }
    }

    fn finish(
        mut self,
        reporters: &Reporters,
        (response_bytes, response_messages): (u64, Option<u64>),
        trailers_status: Option<GrpcStatus>,
        complete: bool,
    ) {
        if !complete && self.outcome.flag == Flag::None {
            self.outcome.flag = Flag::DownstreamClosed;
        }
        if trailers_status.is_some() {
            self.grpc_status = trailers_status;
        }
        let elapsed = self.started.elapsed();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let workload = self.outcome.workload.as_deref();
        // Never the request's own `Host`: a client could make every request a new label set.
        let service = self
            .outcome
            .service
            .as_deref()
            .or(self.addressed.as_deref());
        let labels = Labels {
            reporter: "waypoint",
            source_workload: self
                .source_workload
                .as_deref()
                .map_or_else(|| "unknown".to_owned(), |w| w.name.clone()),
            source_workload_namespace: self.source.namespace().to_owned(),
            source_principal: self.source.as_str().to_owned(),
            destination_workload: workload.map_or_else(|| "unknown".to_owned(), |w| w.name.clone()),
            destination_workload_namespace: workload
                .map_or_else(|| "unknown".to_owned(), |w| w.namespace.clone()),
            destination_principal: workload
                .filter(|w| w.is_meshed())
                .map_or_else(|| "unknown".to_owned(), |w| w.identity.as_str().to_owned()),
            destination_service: service
                .map_or_else(|| "unknown".to_owned(), |s| s.hostname.clone()),
            destination_service_name: service
                .map_or_else(|| "unknown".to_owned(), |s| s.telemetry_name().to_owned()),
            destination_service_namespace: service
                .map_or_else(|| "unknown".to_owned(), |s| s.namespace.clone()),
            request_protocol: self.protocol,
            response_code: self.status,
            grpc_response_status: self
                .grpc_status
                .map(|status| status.code().to_string())
                .unwrap_or_default(),
            response_flags: self.outcome.flag.as_str(),
            connection_security_policy: if workload.is_some_and(Workload::is_meshed) {
                "mutual_tls"
            } else {
                "none"
            },
        };
        let messages = (
            self.request_messages
                .as_ref()
                .map(|m| m.load(Ordering::Relaxed)),
            response_messages,
        );
        reporters
            .metrics
            .record(&labels, elapsed, (request_bytes, response_bytes), messages);
        reporters.access_log.write(&AccessLine {
            log: "access",
            time: mesh_trace::rfc3339(SystemTime::now()),
            reporter: "waypoint",
            method: &self.method,
            authority: &self.authority,
            path: &self.path,
            protocol: self.protocol,
            status: self.status,
            grpc_status: self.grpc_status.map(GrpcStatus::code),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            src: AccessSource {
                identity: self.source.as_str(),
                workload: &labels.source_workload,
            },
            service: service.map(|s| s.hostname.as_str()),
            upstream: self.outcome.upstream,
            upstream_workload: workload.map(ToString::to_string),
            bytes_received: request_bytes,
            bytes_sent: response_bytes,
            trace_id: self.trace.0.trace_id_hex(),
            request_id: &self.request_id,
            response_flags: self.outcome.flag.as_str(),
            authz: self.authz.as_deref(),
        });
        if self.trace.0.sampled {
            reporters
                .tracer
                .record(self.span(&labels, response_bytes, request_bytes));
        }
    }

    /// The request's span, with OpenTelemetry's HTTP attribute names and Istio's.
    fn span(&self, labels: &Labels, response_bytes: u64, request_bytes: u64) -> FinishedSpan {
        let (context, parent) = self.trace;
        #[allow(clippy::cast_possible_wrap, reason = "byte counts far below 2^63")]
        let mut attributes = vec![
            KeyValue::new("http.request.method", self.method.clone()),
            KeyValue::new("guid:x-request-id", self.request_id.clone()),
            KeyValue::new("url.path", self.path.clone()),
            KeyValue::new("server.address", self.authority.clone()),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
            KeyValue::new("network.protocol.name", self.protocol),
            KeyValue::new("istio.response_flags", labels.response_flags),
            KeyValue::new("istio.source_principal", labels.source_principal.clone()),
            KeyValue::new(
                "istio.destination_service",
                labels.destination_service.clone(),
            ),
            KeyValue::new("http.request.body.size", request_bytes as i64),
            KeyValue::new("http.response.body.size", response_bytes as i64),
        ];
        if let Some(upstream) = self.outcome.upstream {
            attributes.push(KeyValue::new("upstream.address", upstream.to_string()));
        }
        if let Some(status) = self.grpc_status {
            attributes.push(KeyValue::new(
                "rpc.grpc.status_code",
                i64::from(status.code()),
            ));
        }
        let failed = self.status >= 500 || self.outcome.flag != Flag::None;
        FinishedSpan {
            name: format!("{} {}", self.method, labels.destination_service),
            kind: SpanKind::Server,
            context,
            parent,
            start: self.wall_start,
            end: self.wall_start + self.started.elapsed(),
            attributes,
            error: failed.then(|| format!("{} {}", self.status, self.outcome.flag.as_str())),
        }
    }
}

/// Headers' size on the wire, roughly (name, value, `: ` and CRLF).
fn head_size(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// A request body that counts the bytes read from it, and a gRPC request's messages.
pub(crate) struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
    messages: Option<(MessageCount, Arc<AtomicU64>)>,
}

impl Counted {
    pub(crate) fn new(
        inner: Incoming,
        bytes: Arc<AtomicU64>,
        messages: Option<Arc<AtomicU64>>,
    ) -> Self {
        Self {
            inner,
            bytes,
            messages: messages.map(|m| (MessageCount::default(), m)),
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame {
            if let Some(data) = frame.data_ref() {
                this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Some((count, total)) = &mut this.messages {
                    count.feed(data);
                    total.store(count.messages, Ordering::Relaxed);
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that completes its request's record when it ends or is dropped.
pub(crate) struct Recorded {
    inner: crate::body::Body,
    bytes: u64,
    /// A gRPC response's messages.
    messages: Option<MessageCount>,
    grpc_status: Option<GrpcStatus>,
    log: Option<(RequestLog, Arc<Reporters>)>,
}

impl Recorded {
    /// `response`'s body, recorded; the head's size counts towards the response's bytes.
    pub(crate) fn wrap(
        response: http::Response<crate::body::Body>,
        log: RequestLog,
        reporters: Arc<Reporters>,
    ) -> http::Response<Self> {
        let head = head_size(response.headers());
        let messages = log.is_grpc().then(MessageCount::default);
        response.map(|inner| Self {
            inner,
            bytes: head,
            messages,
            grpc_status: None,
            log: Some((log, reporters)),
        })
    }

    fn finish(&mut self, complete: bool) {
        if let Some((log, reporters)) = self.log.take() {
            let messages = self.messages.as_ref().map(|m| m.messages);
            log.finish(
                &reporters,
                (self.bytes, messages),
                self.grpc_status.take(),
                complete,
            );
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(count) = &mut this.messages {
                        count.feed(data);
                    }
                }
                if let Some(trailers) = frame.trailers_ref() {
                    this.grpc_status = trailers.get("grpc-status").map(GrpcStatus::of);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended, so a body dropped at its end is a
        // complete response; one dropped before is a client that went away.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_trace::{AccessLogTarget, Sampler};

    fn reporters() -> Reporters {
        Reporters {
            metrics: Arc::new(Metrics::new()),
            tracer: Tracer::disabled(),
            access_log: AccessLog::start(&AccessLogTarget::Off).expect("a log that is off"),
            log_budget: Arc::default(),
        }
    }

    fn web() -> Arc<Service> {
        Arc::new(Service {
            hostname: "web.mesh.svc.cluster.local".into(),
            namespace: "mesh".into(),
            name: "web".into(),
            vips: Vec::new(),
            selector: std::collections::BTreeMap::default(),
            ports: Vec::new(),
            traffic_distribution: None,
            kind: mesh_cluster::ServiceKind::Kubernetes,
        })
    }

    /// A request with `Host: host` that the waypoint answers itself (404, no route).
    fn answered_locally(reporters: &Reporters, host: &str, addressed: Option<Arc<Service>>) {
        let (parts, ()) = http::Request::get("/nothing")
            .header(http::header::HOST, host)
            .body(())
            .expect("a request")
            .into_parts();
        let source = Identity::parse("spiffe://cluster.local/ns/mesh/sa/client").expect("an id");
        let trace = TraceContext::root(Sampler::percent(0.0).expect("0 %"));
        let mut log = RequestLog::start(
            &parts,
            (source, None),
            addressed,
            Arc::default(),
            (trace, None),
        );
        let mut response = http::Response::new(crate::body::full(Bytes::new()));
        *response.status_mut() = http::StatusCode::NOT_FOUND;
        response.extensions_mut().insert(Outcome {
            flag: Flag::NoRoute,
            ..Outcome::default()
        });
        log.respond(&response);
        log.finish(reporters, (0, None), None, true);
    }

    fn request_series(metrics: &Metrics) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .map(str::to_owned)
            .collect()
    }

    /// The attack: a client sends each request with another `Host`, which no route matches.
    /// Were the `Host` the destination service's label, every request would add a series to
    /// each of the four families, without bound.
    #[test]
    fn hosts_a_client_makes_up_add_no_series_to_the_metrics() {
        let reporters = reporters();
        for i in 0..100 {
            answered_locally(&reporters, &format!("attacker-{i}.example"), Some(web()));
        }
        let series = request_series(&reporters.metrics);
        assert_eq!(series.len(), 1, "{series:#?}");
        assert!(
            series[0].contains(r#"destination_service="web.mesh.svc.cluster.local""#)
                && series[0].contains(r#"destination_service_name="web""#)
                && series[0].contains(r#"response_flags="NR""#)
                && series[0].ends_with(" 100"),
            "{}",
            series[0]
        );
        // A tunnel addressed to a pod rather than a Service: `unknown`, still one series.
        for i in 0..100 {
            answered_locally(&reporters, &format!("other-{i}.example"), None);
        }
        let series = request_series(&reporters.metrics);
        assert_eq!(series.len(), 2, "{series:#?}");
        assert!(series
            .iter()
            .any(|s| s.contains(r#"destination_service="unknown""#) && s.ends_with(" 100")));
        assert!(!reporters.metrics.encode().contains(".example"));
    }

    #[test]
    fn grpc_statuses_outside_grpcs_codes_read_as_unknown() {
        let of = |text: &'static str| GrpcStatus::of(&http::HeaderValue::from_static(text)).code();
        assert_eq!(of("0"), 0);
        assert_eq!(of("14"), 14);
        assert_eq!(of("16"), 16);
        for malformed in [
            "17",
            "255",
            "256",
            "-1",
            "",
            "ok",
            "1e3",
            " 3",
            "99999999999",
        ] {
            assert_eq!(of(malformed), 2, "{malformed:?}");
        }
        let bytes = http::HeaderValue::from_bytes(b"\xff").expect("an opaque value");
        assert_eq!(GrpcStatus::of(&bytes).code(), 2);
    }
}
