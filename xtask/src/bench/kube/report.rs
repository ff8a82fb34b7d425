//! What the bench measured (memory, pod sizes, stages, windows, capture) and its report.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{forward::Bytes, IN_FLIGHT, ONE_ARENA};

/// `VmRSS` and `VmHWM` of a process, in bytes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Memory {
    pub(super) rss: u64,
    pub(super) hwm: u64,
}

pub(super) fn memory(pid: u32) -> Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?
            .split_whitespace()
            .next()
            .context("empty field")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// The served size of the cluster's pods (an admin's paged list, as a watcher lists).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PodSizes {
    pub(super) pods: usize,
    /// Each pod's JSON as served (compact), summed.
    pub(super) json: u64,
    /// The same cut to the fields the agent keeps (`mesh-cluster/src/kube_source/strip.rs`).
    pub(super) trimmed: u64,
    /// The list responses' bodies, summed.
    pub(super) list_bodies: u64,
}

/// One measured stage: the cluster with `pods` pods.
#[derive(Clone, Debug, Default)]
pub(super) struct Stage {
    pub(super) pods: usize,
    pub(super) sizes: PodSizes,
    /// Creating this stage's pods (from the previous stage): pods, time.
    pub(super) created: Option<(usize, Duration)>,
    /// Bytes to the running agent while they were created, and its memory once it saw them.
    pub(super) watched: Option<(Bytes, Memory)>,
    /// A fresh agent: bytes from start to ready, time to ready, memory after its first list.
    pub(super) first_list: Option<(Bytes, Duration, Memory, Memory)>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Window {
    pub(super) what: String,
    pub(super) secs: f64,
    pub(super) pod_changes: usize,
    pub(super) policy_changes: usize,
    pub(super) failed: usize,
    pub(super) bytes: Bytes,
    pub(super) agent_cpu_s: f64,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Capture {
    pub(super) pods: usize,
    /// Milliseconds from the label's patch to each pod's `pod enrolled` line, sorted.
    pub(super) latencies_ms: Vec<f64>,
    /// Pods enrolled but not served (`served=false`).
    pub(super) unserved: usize,
    /// Milliseconds from the pods' deletion to the last `pod removed from the mesh`.
    pub(super) release_ms: Option<f64>,
    pub(super) problems: Vec<String>,
}

#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) stages: Vec<Stage>,
    pub(super) windows: Vec<Window>,
    pub(super) capture: Option<Capture>,
    /// A fresh agent's memory with one malloc arena, with this many pods.
    pub(super) one_arena: Option<(usize, Memory)>,
    /// A fresh waypoint controller's memory (the waypoints' view), with this many pods.
    pub(super) controller: Option<(usize, Memory)>,
    pub(super) notes: Vec<String>,
    pub(super) total: Duration,
}

/// The value at fraction `q` of sorted `v` (nearest rank).
pub(super) fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[allow(clippy::cast_precision_loss)]
pub(super) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[allow(clippy::cast_precision_loss)]
pub(super) fn kb(bytes: u64) -> f64 {
    bytes as f64 / 1e3
}

#[allow(clippy::cast_precision_loss)]
pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

impl Report {
    #[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
    pub(super) fn markdown(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "### Agent memory and first list\n\n| pods in the cluster | pods' JSON as served (per pod) | trimmed as the agent keeps them (per pod) | fresh agent: start → ready | bytes received until ready (first list) | VmRSS / VmHWM after the first list | VmRSS / VmHWM, same pods arrived by watch |\n|---|---|---|---|---|---|---|"
        );
        for s in &self.stages {
            let per = |total: u64| {
                if s.sizes.pods == 0 {
                    "–".to_owned()
                } else {
                    format!(
                        "{:.1} MB ({:.0} B)",
                        mb(total),
                        total as f64 / s.sizes.pods as f64
                    )
                }
            };
            let (first, ready, mem) = s.first_list.as_ref().map_or(
                ("–".to_owned(), "–".to_owned(), "–".to_owned()),
                |(b, d, _, m)| {
                    (
                        format!("{:.2} MB ({} connections)", mb(b.to_agent), b.connections),
                        format!("{:.2} s", d.as_secs_f64()),
                        format!("{:.1} / {:.1} MiB", mib(m.rss), mib(m.hwm)),
                    )
                },
            );
            let watched = s.watched.as_ref().map_or("–".to_owned(), |(_, m)| {
                format!("{:.1} / {:.1} MiB", mib(m.rss), mib(m.hwm))
            });
            let _ = writeln!(
                t,
                "| {} | {} | {} | {ready} | {first} | {mem} | {watched} |",
                s.pods,
                per(s.sizes.json),
                per(s.sizes.trimmed)
            );
        }
        if let Some((pods, m)) = &self.one_arena {
            let _ = writeln!(
                t,
                "\nA fresh agent with `{ONE_ARENA}=1` (one glibc malloc arena), {pods} pods: VmRSS {:.1} / VmHWM {:.1} MiB.",
                mib(m.rss),
                mib(m.hwm)
            );
        }
        if let Some((pods, m)) = &self.controller {
            let _ = writeln!(
                t,
                "\nA fresh waypoint controller (the view a waypoint reads: every pod, the routes and policies), {pods} pods: VmRSS {:.1} / VmHWM {:.1} MiB.",
                mib(m.rss),
                mib(m.hwm)
            );
        }
        if let Some(empty) = self.stages.first().and_then(|s| s.first_list.as_ref()) {
            let _ = writeln!(t);
            for s in self.stages.iter().skip(1) {
                if let Some((b, _, _, m)) = &s.first_list {
                    let pods = s.pods as f64;
                    let _ = writeln!(
                        t,
                        "- {} pods: {:.1} kB VmRSS per pod over the empty cluster ({:.1} kB VmHWM); first list {:.0} B per pod received ({:.2}× the pods' JSON)",
                        s.pods,
                        (m.rss as f64 - empty.3.rss as f64) / pods / 1e3,
                        (m.hwm as f64 - empty.3.hwm as f64) / pods / 1e3,
                        (b.to_agent as f64 - empty.0.to_agent as f64) / pods,
                        (b.to_agent as f64 - empty.0.to_agent as f64) / s.sizes.json.max(1) as f64
                    );
                }
            }
        }
        let _ = writeln!(
            t,
            "\n### Creating the pods through the API ({IN_FLIGHT} requests in flight; create, then status)\n\n| stage | pods created | time | pods/s | bytes to the running agent meanwhile (per pod) |\n|---|---|---|---|---|"
        );
        for s in &self.stages {
            if let (Some((n, d)), Some((b, _))) = (s.created, s.watched.as_ref()) {
                let _ = writeln!(
                    t,
                    "| to {} | {n} | {:.1} s | {:.0} | {:.1} MB ({:.0} B) |",
                    s.pods,
                    d.as_secs_f64(),
                    n as f64 / d.as_secs_f64().max(1e-9),
                    mb(b.to_agent),
                    b.to_agent as f64 / n.max(1) as f64
                );
            }
        }
        let pods = self.stages.last().map_or(0, |s| s.pods);
        let _ = writeln!(
            t,
            "\n### Watch traffic with {pods} pods (bytes the agent receives, TLS included)\n\n| window | length | pod status changes | policy changes | failed requests | received | per minute | per change (over idle) | agent CPU |\n|---|---|---|---|---|---|---|---|---|"
        );
        let idle_rate = self
            .windows
            .iter()
            .find(|w| w.what == "idle")
            .map_or(0.0, |w| w.bytes.to_agent as f64 / w.secs);
        for w in &self.windows {
            let changes = w.pod_changes + w.policy_changes;
            let per_change = if changes == 0 {
                "–".to_owned()
            } else {
                format!(
                    "{:.0} B",
                    (w.bytes.to_agent as f64 - idle_rate * w.secs) / changes as f64
                )
            };
            let _ = writeln!(
                t,
                "| {} | {:.1} s | {} | {} | {} | {:.1} kB | {:.1} kB | {per_change} | {:.2} s ({:.1} % of a core) |",
                w.what,
                w.secs,
                w.pod_changes,
                w.policy_changes,
                w.failed,
                kb(w.bytes.to_agent),
                kb(w.bytes.to_agent) * 60.0 / w.secs,
                w.agent_cpu_s,
                w.agent_cpu_s / w.secs * 100.0
            );
        }
        if let Some(c) = &self.capture {
            let _ = writeln!(
                t,
                "\n### Labelling a namespace: its running pods captured ({} pods on the agent's node, {pods} in the cluster)\n\n| captured | p50 | p90 | max | first | enrolled but not served | all released after deletion |\n|---|---|---|---|---|---|---|",
                c.pods
            );
            let _ = writeln!(
                t,
                "| {} of {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} |",
                c.latencies_ms.len(),
                c.pods,
                percentile(&c.latencies_ms, 0.5),
                percentile(&c.latencies_ms, 0.9),
                c.latencies_ms.last().copied().unwrap_or(f64::NAN),
                c.latencies_ms.first().copied().unwrap_or(f64::NAN),
                c.unserved,
                c.release_ms
                    .map_or("not within 60 s".to_owned(), |ms| format!("{ms:.0} ms"))
            );
            for p in &c.problems {
                let _ = writeln!(t, "\n    {p}");
            }
        }
        for note in &self.notes {
            let _ = writeln!(t, "\nNote: {note}");
        }
        let _ = writeln!(
            t,
            "\nWhole run: {:.0} s, from the control plane's start to its teardown.",
            self.total.as_secs_f64()
        );
        t
    }

    pub(super) fn json(&self) -> Value {
        let mem = |m: &Memory| json!({"vm_rss": m.rss, "vm_hwm": m.hwm});
        let bytes = |b: &Bytes| json!({"to_agent": b.to_agent, "from_agent": b.from_agent, "connections": b.connections});
        json!({
            "stages": self.stages.iter().map(|s| json!({
                "pods": s.pods,
                "served_json_bytes": s.sizes.json,
                "trimmed_json_bytes": s.sizes.trimmed,
                "list_body_bytes": s.sizes.list_bodies,
                "created": s.created.map(|(n, d)| json!({"pods": n, "seconds": d.as_secs_f64()})),
                "watched": s.watched.as_ref().map(|(b, m)| json!({"bytes": bytes(b), "memory": mem(m)})),
                "first_list": s.first_list.as_ref().map(|(b, d, at_ready, settled)| json!({
                    "bytes": bytes(b), "ready_seconds": d.as_secs_f64(),
                    "memory_at_ready": mem(at_ready), "memory": mem(settled)})),
            })).collect::<Vec<_>>(),
            "windows": self.windows.iter().map(|w| json!({
                "what": w.what, "seconds": w.secs, "pod_changes": w.pod_changes,
                "policy_changes": w.policy_changes, "failed": w.failed, "bytes": bytes(&w.bytes),
                "agent_cpu_seconds": w.agent_cpu_s,
            })).collect::<Vec<_>>(),
            "capture": self.capture.as_ref().map(|c| json!({
                "pods": c.pods, "latencies_ms": c.latencies_ms, "unserved": c.unserved,
                "release_ms": c.release_ms, "problems": c.problems,
            })),
            "one_arena": self.one_arena.as_ref().map(|(pods, m)| json!({"pods": pods, "memory": mem(m)})),
            "controller": self.controller.as_ref().map(|(pods, m)| json!({"pods": pods, "memory": mem(m)})),
            "notes": self.notes,
            "seconds": self.total.as_secs_f64(),
        })
    }
}
