//! The access log: one JSON object per line for every connection, written when it closes
//! (refused connections included, with the decision and the policy that decided).
//!
//! Lines are handed to a writer thread through a bounded queue, so a slow log reader never
//! stalls a connection. When the queue is full the line is dropped, counted
//! (`mesh_agent_access_log_dropped_total`) and a warning says so: never silently.
//!
//! The writer writes what is queued in one go, then rests [`REST`] before it waits again:
//! under load it wakes and writes a few dozen times a second, not once per connection, and
//! a line written alone (a quiet agent) still goes out at once.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{error, warn};

/// Lines waiting for the writer at most.
const QUEUE: usize = 16 * 1024;
/// The writer's rest after each batch (a line waits at most this long when lines keep coming).
const REST: Duration = Duration::from_millis(20);

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// The agent's standard output (its diagnostics go to standard error).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Not written.
    Off,
}

impl FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;

    /// `-` or `stdout`, `off`, or a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "-" | "stdout" => AccessLogTarget::Stdout,
            "off" | "none" => AccessLogTarget::Off,
            path => AccessLogTarget::File(PathBuf::from(path)),
        })
    }
}

impl std::fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLogTarget::Stdout => f.write_str("stdout"),
            AccessLogTarget::File(p) => write!(f, "{}", p.display()),
            AccessLogTarget::Off => f.write_str("off"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening the access log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("starting the access log writer: {0}")]
    Thread(io::Error),
}

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

/// The access log writer.
#[derive(Debug)]
pub struct AccessLog {
    queue: Option<SyncSender<String>>,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl AccessLog {
    /// Starts the writer for `target`.
    pub fn start(target: &AccessLogTarget) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => {
                return Ok(Self {
                    queue: None,
                    dropped: AtomicU64::new(0),
                    written: AtomicU64::new(0),
                })
            }
            AccessLogTarget::Stdout => Box::new(io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(64 * 1024, out);
                let mut failed = false;
                while let Ok(first) = rx.recv() {
                    let written = std::iter::once(first)
                        .chain(rx.try_iter())
                        .try_for_each(|line| writeln!(out, "{line}"))
                        .and_then(|()| out.flush());
                    if let Err(e) = written {
                        if !failed {
                            error!(error = %e, "writing the access log failed");
                            failed = true;
                        }
                    }
                    std::thread::sleep(REST);
                }
            })
            .map_err(AccessLogError::Thread)?;
        Ok(Self {
            queue: Some(tx),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    /// Queues one record.
    pub fn write(&self, record: &AccessRecord) {
        let Some(queue) = &self.queue else { return };
        let line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "encoding an access log record failed");
                return;
            }
        };
        match queue.try_send(line) {
            Ok(()) => {
                self.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    warn!(
                        dropped = n + 1,
                        "access log writer is behind; records dropped"
                    );
                }
            }
        }
    }

    /// Records dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records queued for writing.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// `time` as RFC 3339 UTC with milliseconds (`2026-11-30T07:31:02.123Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (y, m as u32, d as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_939_862_123);
        assert_eq!(rfc3339(t), "2026-11-29T08:11:02.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

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
        drop(log);
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
