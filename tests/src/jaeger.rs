//! A real Jaeger (v2, built from its Go module by `cargo xtask setup`) in a testbed pod's
//! network namespace: OTLP/gRPC on port 4317 of the pod's addresses, its in-memory store, and
//! its query API on the pod's loopback (`/api/traces/<id>`), read with curl from inside the pod.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::{Error, Pod, Process, Result};

/// Where `cargo xtask setup` puts `jaeger` (built from `tests/jaeger`), relative to the
/// workspace root.
pub const JAEGER_PATH: &str = "target/kube/bin/jaeger";

/// The `jaeger` binary `cargo xtask setup` built.
pub fn binary() -> Result<PathBuf> {
    crate::built_tool(JAEGER_PATH, "tests/jaeger", "")
}

/// The OTLP/gRPC port.
pub const OTLP_PORT: u16 = 4317;
/// The query API's port (loopback of the pod only).
const QUERY_PORT: u16 = 16686;

/// Its configuration: OTLP in, memory store, query API; no self-telemetry listener.
const CONFIG: &str = "\
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:16686
    grpc:
      endpoint: 127.0.0.1:16685
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 0.0.0.0:4317
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
";

/// A running Jaeger.
#[derive(Debug)]
pub struct Jaeger {
    pub process: Process,
    pod: Pod,
}

impl Jaeger {
    /// Starts Jaeger in `pod` (its config in `dir`) and waits until it takes spans.
    pub fn start(pod: &Pod, dir: &Path) -> Result<Self> {
        let bin = binary()?;
        fs::create_dir_all(dir).map_err(crate::io_err(format!("creating {}", dir.display())))?;
        let config = dir.join("jaeger.yaml");
        fs::write(&config, CONFIG)
            .map_err(crate::io_err(format!("writing {}", config.display())))?;
        let mut cmd = pod.command(bin);
        cmd.arg("--config")
            .arg(format!("file:{}", config.display()));
        let mut process = Process::spawn("jaeger", &mut cmd)?;
        process.wait_for_line("Jaeger to start", Duration::from_secs(30), |l| {
            l.contains("Everything is ready")
        })?;
        Ok(Self {
            process,
            pod: pod.clone(),
        })
    }

    /// The OTLP endpoint for proxies elsewhere in the testbed.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{OTLP_PORT}", self.pod.ipv4)
    }

    /// The spans of trace `id` (32 hex digits) as the query API gives them: the trace object
    /// (`spans`, `processes`), or `None` while Jaeger has none.
    pub fn trace(&self, id: &str) -> Result<Option<Value>> {
        let url = format!("http://127.0.0.1:{QUERY_PORT}/api/traces/{id}");
        let out = self
            .pod
            .command("curl")
            .args(["-sS", "--max-time", "10", &url])
            .output()
            .map_err(crate::io_err("running curl for Jaeger's query API"))?;
        if !out.status.success() {
            return Err(Error::Output {
                what: "curl to Jaeger's query API".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let body: Value = serde_json::from_slice(&out.stdout).map_err(|e| Error::Output {
            what: "Jaeger's query API".into(),
            detail: format!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)),
        })?;
        Ok(body["data"].as_array().and_then(|d| d.first()).cloned())
    }

    /// Waits up to `timeout` until trace `id` has at least `spans` spans; returns it.
    pub fn wait_trace(&self, id: &str, spans: usize, timeout: Duration) -> Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let trace = self.trace(id)?;
            let count = trace
                .as_ref()
                .and_then(|t| t["spans"].as_array())
                .map_or(0, Vec::len);
            if count >= spans {
                return Ok(trace.unwrap_or_default());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("{spans} spans of trace {id} in Jaeger"),
                    after: timeout,
                    output: format!("{count} spans: {trace:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
