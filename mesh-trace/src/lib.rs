//! Distributed tracing and the access log for the mesh's proxies.
//!
//! - [`TraceContext`]: W3C `traceparent`, read from a CONNECT or a request, a child made for the
//!   proxy's own span, written on to the next hop.
//! - [`Tracer`]: samples new traces and exports each finished, sampled span over OTLP/gRPC
//!   through the OpenTelemetry SDK.
//! - [`AccessLog`]: the JSON access log, written by a thread of its own in batches.
//! - [`LogBudget`]: how many per-connection or per-request warnings a proxy writes a second, per
//!   source and in all (a pod that floods the proxy with failing connections cannot flood its log).
//!
//! Who makes which span (ARCHITECTURE.md, "Tracing"): the source agent one per outbound
//! connection (a new trace, its context in the HBONE CONNECT), the waypoint one per request
//! (the child of the request's `traceparent`, else of the CONNECT's), the destination agent one
//! per inbound tunnel (the child of the CONNECT's).

pub mod access_log;
mod context;
mod export;
pub mod log_budget;
mod request_id;

pub use access_log::{rfc3339, AccessLog, AccessLogError, AccessLogTarget};
pub use log_budget::LogBudget;

pub use context::{Sampler, SamplerError, TraceContext, TraceparentError, TRACEPARENT, TRACESTATE};
pub use export::{ExportError, FinishedSpan, SpanKind, TraceConfig, Tracer};
pub use opentelemetry::KeyValue;
pub use request_id::{ensure_request_id, new_request_id, X_REQUEST_ID};
