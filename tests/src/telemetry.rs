//! Reads what an agent reports: its Prometheus metrics (scraped from inside its node's
//! namespace) and its JSON access log lines.

use std::collections::BTreeMap;

use crate::{http::http, Agent, Error, Node, Result};

/// Where the agent serves its metrics, inside its node's namespace.
pub const METRICS: &str = "127.0.0.1:15020";
/// Where the agent serves readiness.
pub const READINESS: &str = "127.0.0.1:15021";
/// Where the agent serves its admin endpoints.
pub const ADMIN: &str = "127.0.0.1:15000";

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Scrapes `/metrics` of the agent on `node`.
pub fn scrape(node: &Node) -> Result<Vec<Sample>> {
    let (status, body) = http(node, "GET", METRICS, "/metrics")?;
    if status != 200 {
        return Err(output("GET /metrics", format!("status {status}: {body}")));
    }
    parse_prometheus(&body)
}

/// Parses the Prometheus text format (samples only; `#` lines skipped).
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let bad = || output("the metrics", format!("not a Prometheus sample: {line}"));
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value: f64 = value.parse().map_err(|_| bad())?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').ok_or_else(bad)?)?),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or_else(|| output("the metrics", format!("bad labels: {text}")))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => break,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end =
            end.ok_or_else(|| output("the metrics", format!("unterminated label value: {text}")))?;
        labels.insert(name.trim_start_matches(',').to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

fn output(what: &str, detail: String) -> Error {
    Error::Output {
        what: what.to_owned(),
        detail,
    }
}

/// The sum of the samples named `name` whose labels include all of `labels`.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// [`sum`] of counters and gauges, which hold non-negative integers.
pub fn count(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    // Counters are integers far below 2^53: the conversion is exact.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = sum(samples, name, labels).round() as u64;
    n
}

/// The access log records (`"log":"access"` JSON lines) the agent wrote so far, from log line
/// `from` on.
pub fn access_records(agent: &Agent, from: usize) -> Vec<serde_json::Value> {
    access_records_in(&agent.logs()[from..])
}

/// The access log records among an agent's output `lines` (a test process's, or an agent pod's
/// container's).
pub fn access_records_in(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["log"] == "access")
        .collect()
}

/// The access log records in `lines()` once `done` says they are all there (the proxies write
/// their access log in batches, up to tens of milliseconds after the connection or request),
/// or, after `wait`, those there are.
pub fn access_records_once(
    lines: impl Fn() -> Vec<String>,
    wait: std::time::Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    access_records_in(&lines_once(lines, wait, |l| done(&access_records_in(l))))
}

/// `lines()` once `done` holds for them, or, after `wait`, as they are then: for a proxy's log
/// lines that follow what the test saw end (an access record is written in the log's next
/// batch, a moment after the connection closed).
pub fn lines_once(
    lines: impl Fn() -> Vec<String>,
    wait: std::time::Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let now = lines();
        if done(&now) || std::time::Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The warnings a proxy's log budget held back, as its "warnings held back" lines count them
/// (`mesh-trace/src/log_budget.rs`).
pub fn warnings_held_back(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter(|l| l.contains("warnings held back"))
        .filter_map(|l| {
            l.split("held=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The `warning` lines about connections or requests from `source` (their `src=<address>:`).
pub fn warnings_from(lines: &[String], warning: &str, source: std::net::Ipv4Addr) -> usize {
    let from = format!("src={source}:");
    lines
        .iter()
        .filter(|l| l.contains(warning) && l.contains(&from))
        .count()
}

/// Whether a "warnings held back" line names `source` as the one most of them came from.
pub fn held_back_most_from(lines: &[String], source: std::net::Ipv4Addr) -> bool {
    let named = format!("most_from={source} ");
    lines
        .iter()
        .any(|l| l.contains("warnings held back") && l.contains(&named))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples_parse_with_escapes() {
        let text = "# HELP x y\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"u\\\\o\\nte\"} 5\nplain 2.5\n";
        let s = parse_prometheus(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["b"], "q\"u\\o\nte");
        assert_eq!(count(&s, "x", &[("a", "1")]), 5);
        assert!((sum(&s, "plain", &[]) - 2.5).abs() < 1e-9);
        assert_eq!(count(&s, "x", &[("a", "2")]), 0);
    }
}
