//! The flags that say where spans go, shared by `mesh-agent run` and `mesh-agent waypoint`.

use mesh_trace::{Sampler, SamplerError};

/// Where spans are exported, and how many new traces are sampled.
#[derive(Debug, clap::Args)]
pub struct TracingFlags {
    /// OTLP/gRPC collector for spans, `http://<host>:<port>` (Jaeger, an OpenTelemetry
    /// collector). Unset: no span is exported; trace context is still propagated.
    #[arg(long, env = "MESH_TRACING_ENDPOINT")]
    pub tracing_endpoint: Option<String>,
    /// Percentage (0 to 100) of the traces this proxy starts that are sampled; traces started
    /// upstream keep their own decision. Istio's default is 1.
    #[arg(long, env = "MESH_TRACING_SAMPLING", default_value_t = 1.0)]
    pub tracing_sampling: f64,
}

/// Where spans go, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracingSettings {
    /// The collector, when spans are exported.
    pub endpoint: Option<String>,
    /// Which new traces are sampled.
    pub sampler: Sampler,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            endpoint: None,
            sampler: Sampler::never(),
        }
    }
}

impl TracingFlags {
    /// The settings; a sampling percentage outside 0..=100 is refused.
    pub fn settings(&self) -> Result<TracingSettings, SamplerError> {
        Ok(TracingSettings {
            endpoint: self.tracing_endpoint.clone(),
            sampler: Sampler::percent(self.tracing_sampling)?,
        })
    }
}

impl TracingSettings {
    /// The tracer's configuration for `service_name` with resource `attributes`.
    pub fn trace_config(
        &self,
        service_name: &str,
        attributes: Vec<(&'static str, String)>,
    ) -> mesh_trace::TraceConfig {
        mesh_trace::TraceConfig {
            endpoint: self.endpoint.clone(),
            sampler: self.sampler,
            service_name: service_name.to_owned(),
            attributes,
        }
    }
}

impl std::fmt::Display for TracingSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.endpoint {
            Some(endpoint) => write!(f, "{endpoint} sampling={}%", self.sampler.as_percent()),
            None => f.write_str("off"),
        }
    }
}
