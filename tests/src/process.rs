//! A child process whose output is collected line by line (and echoed to stderr with a prefix),
//! with waits that time out and report what the process printed. Killed when dropped.

use std::{
    io::{BufRead as _, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{Error, Result};

/// Set (to anything) to stop echoing child processes' output to stderr, as the demo does.
pub const QUIET_ENV: &str = "MESH_TESTBED_QUIET";

/// How many lines of output an error message shows.
const TAIL: usize = 40;
/// How long to wait, after the process exited, for its output pipes to close.
const READER_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Output {
    lines: Vec<String>,
    /// Readers still running (stdout and stderr); 0 once the process closed both.
    open: usize,
}

/// A running child process.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Process {
    /// Spawns `command` with stdout and stderr captured. `name` prefixes the echoed lines.
    pub fn spawn(name: impl Into<String>, command: &mut Command) -> Result<Self> {
        let name = name.into();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(crate::io_err(format!("starting {name} ({command:?})")))?;
        let output = Arc::new((
            Mutex::new(Output {
                lines: Vec::new(),
                open: 2,
            }),
            Condvar::new(),
        ));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        // Echo children's output to stderr (tests show it on failure) unless told not to.
        let echo = std::env::var_os(QUIET_ENV).is_none();
        let readers = [stdout, stderr]
            .into_iter()
            .flatten()
            .map(|stream| {
                let output = Arc::clone(&output);
                let prefix = name.clone();
                thread::spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        if echo {
                            eprintln!("[{prefix}] {line}");
                        }
                        let (lock, cond) = &*output;
                        lock.lock().expect("output lock").lines.push(line);
                        cond.notify_all();
                    }
                    let (lock, cond) = &*output;
                    lock.lock().expect("output lock").open -= 1;
                    cond.notify_all();
                })
            })
            .collect();
        Ok(Self {
            name,
            child,
            output,
            readers,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far, stdout and stderr interleaved as they arrived.
    pub fn lines(&self) -> Vec<String> {
        self.output.0.lock().expect("output lock").lines.clone()
    }

    /// Waits until a line satisfies `pred` and returns it. Fails if the process closes its
    /// output first or `timeout` passes; the error carries the output's tail.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        self.wait_for_line_from(0, what, timeout, pred)
    }

    /// Number of lines printed so far (a starting point for [`Self::wait_for_line_from`]).
    pub fn line_count(&self) -> usize {
        self.output.0.lock().expect("output lock").lines.len()
    }

    /// Like [`Self::wait_for_line`], considering only lines from index `from` on.
    pub fn wait_for_line_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.output;
        let mut out = lock.lock().expect("output lock");
        // Each line is looked at once: a chatty process adds lines faster than rescanning all
        // of them each time would keep up with (and the scan holds the lock its reader needs).
        let mut next = from;
        loop {
            if let Some(line) = out.lines.iter().skip(next).find(|l| pred(l)) {
                return Ok(line.clone());
            }
            next = next.max(out.lines.len());
            if out.open == 0 {
                drop(out);
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(Error::Exited {
                    name: self.name.clone(),
                    status,
                    what: what.into(),
                    output: self.tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(out);
                return Err(Error::Timeout {
                    what: what.into(),
                    after: timeout,
                    output: self.tail(),
                });
            }
            out = cond
                .wait_timeout(out, deadline - now)
                .expect("output lock")
                .0;
        }
    }

    /// The exit status if the process has exited, `None` while it runs (does not wait).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(crate::io_err(format!("checking on {}", self.name)))
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(crate::io_err("waiting"))? {
                self.join_readers();
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{} to exit", self.name),
                    after: timeout,
                    output: self.tail(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a successful exit; a failure status is an error carrying the output.
    pub fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        let status = self.wait(timeout)?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                what: "a successful exit".into(),
                output: self.tail(),
            })
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        kill(pid, signal).map_err(|e| Error::Io {
            what: format!("sending {signal} to {}", self.name),
            source: e.into(),
        })
    }

    /// SIGTERM, then SIGKILL if the process has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().map_err(crate::io_err("waiting"))? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait(grace) {
            Ok(status) => Ok(status),
            Err(Error::Timeout { .. }) => {
                let _ = self.child.kill();
                let status = self.child.wait().map_err(crate::io_err("waiting"))?;
                self.join_readers();
                Ok(status)
            }
            Err(e) => Err(e),
        }
    }

    /// The last lines of output, for error messages.
    pub fn tail(&self) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(TAIL)..].join("\n")
    }

    /// Joins the output readers once the process's output is closed. Processes it started may
    /// keep the pipes open after it exits; then the readers are left to finish on their own
    /// after a short grace period rather than blocking the caller.
    fn join_readers(&mut self) {
        let (lock, cond) = &*self.output;
        let out = lock.lock().expect("output lock");
        let (out, _) = cond
            .wait_timeout_while(out, READER_GRACE, |o| o.open > 0)
            .expect("output lock");
        let closed = out.open == 0;
        drop(out);
        for reader in self.readers.drain(..) {
            if closed {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.join_readers();
    }
}

/// Runs a command to completion and returns its stdout; a failure is an error carrying stderr.
pub fn run(command: &mut Command) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(crate::io_err(format!("running {command:?}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{command:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
