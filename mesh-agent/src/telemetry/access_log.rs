//! The agent's access log records: one JSON object per line for every connection, written when
//! it closes (refused connections included, with the decision and the policy that decided), by
//! the proxies' shared writer ([`mesh_trace::AccessLog`]: a thread of its own, a bounded queue,
//! dropped lines counted as `mesh_agent_access_log_dropped_total`).

use serde::Serialize;

/// One side of a connection in a record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Endpoint {
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// The authorization outcome in a record.
#[derive(Clone, Debug, Serialize)]
pub struct Authz {
    /// `allow`, `deny`, or `revoked` (allowed at open, closed by a later policy).
    pub decision: &'static str,
    /// `no_policy`, `allow_matched`, `deny_matched`, `no_allow_matched`, `mtls_required`.
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
}

/// One access log line.
#[derive(Clone, Debug, Serialize)]
pub struct AccessRecord {
    /// Always `access`: tells these lines from the agent's own logs.
    pub log: &'static str,
    /// When the connection closed, RFC 3339 UTC.
    pub time: String,
    pub reporter: &'static str,
    pub direction: &'static str,
    pub src: Endpoint,
    pub dst: Endpoint,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Where the agent connected (the endpoint after service resolution).
    pub upstream: String,
    pub connection_security_policy: &'static str,
    /// Bytes from the source to the destination.
    pub bytes_to_destination: u64,
    /// Bytes from the destination to the source.
    pub bytes_to_source: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz: Option<Authz>,
    pub response_flags: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The trace of a connection carried over HBONE (W3C trace id, 32 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use mesh_trace::{rfc3339, AccessLog, AccessLogTarget};

    use super::*;

    #[test]
    fn records_are_one_json_object_per_line() {
        let dir = std::env::temp_dir().join(format!("mesh-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::start(&AccessLogTarget::File(path.clone())).unwrap();
        let record = AccessRecord {
            log: "access",
            time: rfc3339(SystemTime::now()),
            reporter: "destination",
            direction: "inbound",
            src: Endpoint {
                addr: "10.0.0.1:4000".into(),
                ..Endpoint::default()
            },
            dst: Endpoint {
                addr: "10.0.1.1:80".into(),
                workload: Some("web".into()),
                namespace: Some("shop".into()),
                identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            },
            service: None,
            upstream: "10.0.1.1:80".into(),
            connection_security_policy: "mutual_tls",
            bytes_to_destination: 5,
            bytes_to_source: 6,
            duration_ms: 7,
            authz: Some(Authz {
                decision: "deny",
                reason: "deny_matched",
                policy: Some("shop/deny-all".into()),
                audit: Vec::new(),
            }),
            response_flags: "DENY",
            error: None,
            trace_id: None,
        };
        log.write(&record);
        log.write(&record);
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["authz"]["policy"], "shop/deny-all");
        assert_eq!(lines[0]["dst"]["workload"], "web");
        assert!(lines[0]["src"].get("workload").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
