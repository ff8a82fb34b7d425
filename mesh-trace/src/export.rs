//! Spans out over OTLP: a proxy records each connection's or request's span once it is over,
//! with the ids it already sent downstream in `traceparent`, and the OpenTelemetry SDK's batch
//! processor exports them to the collector (a background thread; nothing on the data path
//! waits for it).
//!
//! Only sampled spans are recorded. A proxy with no endpoint configured still propagates trace
//! context ([`Tracer::disabled`]): the ids cost 25 bytes per connection and nothing else.

use std::{fmt, sync::Arc, time::SystemTime};

use opentelemetry::{
    trace::{
        SpanContext, SpanId, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        Tracer as _, TracerProvider as _,
    },
    Context, KeyValue,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    trace::{Sampler as SdkSampler, SdkTracer, SdkTracerProvider},
    Resource,
};
use tracing::warn;

use crate::context::{Sampler, TraceContext};

/// Why tracing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The endpoint is not `http://<host>:<port>`.
    #[error("tracing endpoint {endpoint:?}: {why}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The OTLP exporter could not be built.
    #[error("tracing endpoint {endpoint:?}: the OTLP exporter: {source}")]
    Exporter {
        /// The endpoint as given.
        endpoint: String,
        /// The SDK's error.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Where spans go and how many new traces are sampled.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The OTLP/gRPC collector, `http://<host>:<port>` (4317 by convention); `None`: nothing is
    /// exported, trace context is still propagated.
    pub endpoint: Option<String>,
    /// Which new traces this proxy starts sampled.
    pub sampler: Sampler,
    /// `service.name` of the spans (`mesh-agent`, `mesh-waypoint`).
    pub service_name: String,
    /// Further resource attributes (the node, the waypoint's name).
    pub attributes: Vec<(&'static str, String)>,
}

/// The kind of a span, as OpenTelemetry defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The side that opened the connection or sent the request (a source agent's tunnel).
    Client,
    /// The side that took it (a destination agent's tunnel, the waypoint's request).
    Server,
}

/// A span that is over, to export.
#[derive(Debug)]
pub struct FinishedSpan {
    /// The span's name (`outbound`, `inbound`, `GET /path`…).
    pub name: String,
    /// Its kind.
    pub kind: SpanKind,
    /// Its own context: the ids it sent downstream.
    pub context: TraceContext,
    /// Its parent's span id, when it has one (same trace).
    pub parent: Option<u64>,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes.
    pub attributes: Vec<KeyValue>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// A proxy's tracer: samples new traces and exports sampled spans. Cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    sampler: Sampler,
    export: Option<Arc<Export>>,
}

struct Export {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl fmt::Debug for Tracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracer")
            .field("sampler", &self.sampler)
            .field("exporting", &self.export.is_some())
            .finish()
    }
}

impl Tracer {
    /// A tracer that propagates context and samples nothing new and exports nothing.
    pub fn disabled() -> Self {
        Self {
            sampler: Sampler::never(),
            export: None,
        }
    }

    /// A tracer as `config` says. With an endpoint it must be called within a Tokio runtime
    /// (the gRPC channel's task runs there). The batch processor follows the `OTEL_BSP_*`
    /// environment variables (delay 5 s, batches of 512, queue of 2,048 by default); spans beyond
    /// the queue are dropped and counted by the SDK, which says so in the log.
    ///
    /// # Errors
    /// An endpoint that is not `http://<host>:<port>`, or an exporter that cannot be built.
    pub fn new(config: &TraceConfig) -> Result<Self, ExportError> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(Self {
                sampler: config.sampler,
                export: None,
            });
        };
        check_endpoint(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|source| ExportError::Exporter {
                endpoint: endpoint.clone(),
                source,
            })?;
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attributes(
                config
                    .attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(*k, v.clone())),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(SdkSampler::AlwaysOn)
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer("mesh");
        Ok(Self {
            sampler: config.sampler,
            export: Some(Arc::new(Export { provider, tracer })),
        })
    }

    /// Which new traces are sampled.
    pub fn sampler(&self) -> Sampler {
        self.sampler
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }

    /// Records `span` when its trace is sampled and spans are exported; otherwise drops it.
    pub fn record(&self, span: FinishedSpan) {
        let Some(export) = &self.export else {
            return;
        };
        if !span.context.sampled {
            return;
        }
        let trace_id = TraceId::from_bytes(span.context.trace_id.to_be_bytes());
        let parent = span.parent.map_or_else(Context::new, |parent| {
            Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                SpanId::from_bytes(parent.to_be_bytes()),
                TraceFlags::SAMPLED,
                true,
                TraceState::NONE,
            ))
        });
        let kind = match span.kind {
            SpanKind::Client => opentelemetry::trace::SpanKind::Client,
            SpanKind::Server => opentelemetry::trace::SpanKind::Server,
        };
        let mut builder = export
            .tracer
            .span_builder(span.name)
            .with_kind(kind)
            .with_span_id(SpanId::from_bytes(span.context.span_id.to_be_bytes()))
            .with_start_time(span.start)
            .with_attributes(span.attributes);
        if span.parent.is_none() {
            builder = builder.with_trace_id(trace_id);
        }
        let mut started = builder.start_with_context(&export.tracer, &parent);
        if let Some(error) = span.error {
            opentelemetry::trace::Span::set_status(&mut started, Status::error(error));
        }
        opentelemetry::trace::Span::end_with_timestamp(&mut started, span.end);
    }

    /// Exports what is queued and stops the exporter (at shutdown). Later spans are dropped.
    pub fn shutdown(&self) {
        if let Some(export) = &self.export {
            if let Err(e) = export.provider.shutdown() {
                warn!(error = %e, "tracing: exporting the last spans failed");
            }
        }
    }
}

/// `http://<host>:<port>`: OTLP over gRPC without TLS (a collector on the node or in the
/// cluster; this build has no TLS client for it).
fn check_endpoint(endpoint: &str) -> Result<(), ExportError> {
    let fail = |why| {
        Err(ExportError::Endpoint {
            endpoint: endpoint.to_owned(),
            why,
        })
    };
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return fail("not a URL");
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return fail("https is not supported: use http:// to a collector nearby"),
        _ => return fail("the scheme must be http://"),
    }
    match uri.authority() {
        Some(a) if a.port_u16().is_some() && !a.host().is_empty() => {}
        _ => return fail("it must name a host and a port"),
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return fail("OTLP/gRPC takes no path");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [
            "http://127.0.0.1:4317",
            "http://jaeger.obs:4317",
            "http://[::1]:4317/",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("127.0.0.1:4317", "scheme"),
            ("https://a:4317", "https"),
            ("http://a", "port"),
            ("http://a:4317/v1/traces", "path"),
            ("not a url", "URL"),
        ] {
            let err = check_endpoint(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn disabled_records_nothing_and_samples_nothing_new() {
        let tracer = Tracer::disabled();
        assert!(!tracer.exporting());
        assert!(!TraceContext::root(tracer.sampler()).sampled);
        tracer.record(FinishedSpan {
            name: "x".into(),
            kind: SpanKind::Client,
            context: TraceContext::root(Sampler::percent(100.0).unwrap()),
            parent: None,
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: vec![],
            error: None,
        });
        tracer.shutdown();
    }
}
