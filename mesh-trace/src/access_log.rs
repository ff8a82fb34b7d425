//! The proxies' access log writer: one JSON object per line, from the agent (a line per
//! connection) and the waypoint (a line per request).
//!
//! Lines are handed to a writer thread through a bounded queue, so a slow log reader never
//! stalls a connection or a request, and the proxy's event loop never writes to the log
//! itself. When the queue is full the line is dropped, counted ([`AccessLog::dropped`]) and a
//! warning says so: never silently.
//!
//! The writer writes what is queued in one go, then rests [`REST`] before it waits again:
//! under load it wakes and writes a few dozen times a second, not once per line (one system
//! call and one wake-up of the reader per batch), and a line written alone (a quiet proxy)
//! still goes out at once. [`AccessLog::close`] writes what is queued before the process ends.

use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, SyncSender, TrySendError},
        Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{error, warn};

/// Lines waiting for the writer at most.
const QUEUE: usize = 16 * 1024;
/// The writer's rest after each batch (a line waits at most this long when lines keep coming).
pub const REST: Duration = Duration::from_millis(20);

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// The proxy's standard output (its diagnostics go to standard error).
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

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening the access log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("starting the access log writer: {0}")]
    Thread(io::Error),
}

/// The access log writer.
#[derive(Debug)]
pub struct AccessLog {
    /// The queue to the writer and the writer's thread; `None` when the log is off or closed.
    writer: Mutex<Option<(SyncSender<String>, JoinHandle<()>)>>,
    /// The log is off: records are not even encoded.
    off: bool,
    dropped: AtomicU64,
    written: AtomicU64,
}

impl AccessLog {
    /// Starts the writer for `target`.
    pub fn start(target: &AccessLogTarget) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(Self::with(None)),
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
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(64 * 1024, out);
                let mut failed = false;
                while let Ok(first) = rx.recv() {
                    let written = std::iter::once(first)
                        .chain(rx.try_iter())
                        .try_for_each(|line| out.write_all(line.as_bytes()))
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
        Ok(Self::with(Some((tx, thread))))
    }

    fn with(writer: Option<(SyncSender<String>, JoinHandle<()>)>) -> Self {
        Self {
            off: writer.is_none(),
            writer: Mutex::new(writer),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    /// Queues one record, as a line of JSON (encoded before the queue is touched, so proxy
    /// threads logging at once do not wait on each other's encoding).
    pub fn write(&self, record: &impl Serialize) {
        if self.off {
            return;
        }
        let mut line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "encoding an access log record failed");
                return;
            }
        };
        line.push('\n');
        let sent = match self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            // Closed: the process is ending.
            None => return,
            Some((queue, _)) => queue.try_send(line),
        };
        match sent {
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

    /// Writes what is queued and stops the writer (at shutdown: no line is lost when the process
    /// ends); later records are not written.
    pub fn close(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((queue, thread)) = writer {
            drop(queue);
            if thread.join().is_err() {
                error!("the access log writer panicked");
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
        let t = UNIX_EPOCH + Duration::from_secs(20_792 * 86_400);
        assert_eq!(rfc3339(t), "2026-12-05T00:00:00.000Z");
    }

    #[derive(Serialize)]
    struct Line<'a> {
        log: &'static str,
        n: u32,
        path: &'a str,
    }

    #[test]
    fn records_are_one_json_object_per_line_and_close_writes_them_all() {
        let dir = std::env::temp_dir().join(format!("mesh-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::start(&AccessLogTarget::File(path.clone())).unwrap();
        for n in 0..1000 {
            log.write(&Line {
                log: "access",
                n,
                path: "/a\"b\n",
            });
        }
        // Everything queued is written by `close`, at once: no waiting for the writer.
        log.close();
        log.write(&Line {
            log: "access",
            n: 1000,
            path: "/",
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[999]["n"], 999);
        assert_eq!(lines[0]["path"], "/a\"b\n");
        assert_eq!((log.written(), log.dropped()), (1000, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_that_is_off_takes_records_and_writes_none() {
        let log = AccessLog::start(&AccessLogTarget::Off).unwrap();
        log.write(&Line {
            log: "access",
            n: 1,
            path: "/",
        });
        assert_eq!(log.written(), 0);
        assert_eq!(
            "off".parse::<AccessLogTarget>().unwrap(),
            AccessLogTarget::Off
        );
        assert_eq!(
            "-".parse::<AccessLogTarget>().unwrap(),
            AccessLogTarget::Stdout
        );
    }
}
