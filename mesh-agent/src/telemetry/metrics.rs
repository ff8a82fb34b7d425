//! Istio's TCP metrics (`istio_tcp_*`) and the agent's own counters, kept in memory and read
//! into an [`Exposition`] (written by `prometheus-client`) at each scrape.
//!
//! A connection looks up its label set once, when it opens, and keeps the [`ConnCounters`] of
//! it; bytes are then added with one atomic add per read, so a long-lived connection shows its
//! traffic while it runs (as ztunnel does), and closing costs no lookup.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use super::{
    exposition::{Exposition, Kind},
    labels::TrafficLabels,
};

/// Counters of one label set.
#[derive(Debug, Default)]
pub struct ConnCounters {
    opened: AtomicU64,
    closed: AtomicU64,
    /// Bytes from the destination to the source (Istio: "sent during response").
    sent: AtomicU64,
    /// Bytes from the source to the destination (Istio: "received during request").
    received: AtomicU64,
}

impl ConnCounters {
    /// Adds bytes moved: `request` from the source to the destination, `response` back.
    pub fn add_bytes(&self, request: u64, response: u64) {
        if request > 0 {
            self.received.fetch_add(request, Ordering::Relaxed);
        }
        if response > 0 {
            self.sent.fetch_add(response, Ordering::Relaxed);
        }
    }

    /// Counts the connection's close.
    pub fn close(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Agent-level counters (not per label set).
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub authz_allowed: AtomicU64,
    pub authz_denied: AtomicU64,
    /// Open connections closed because a policy change no longer allows them.
    pub revoked: AtomicU64,
    /// HBONE tunnels closed after moving no byte for the idle timeout.
    pub tunnels_idle_closed: AtomicU64,
    pub plaintext_refused: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Connections being relayed now, per reporter role of this agent.
    pub active_outbound: AtomicI64,
    pub active_inbound: AtomicI64,
}

/// All of Istio's TCP metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    families: Mutex<HashMap<Arc<TrafficLabels>, Arc<ConnCounters>>>,
    pub agent: AgentCounters,
}

impl Metrics {
    /// Counts a connection opened with `labels` and returns its counters for the rest of its
    /// life.
    pub fn open(&self, labels: TrafficLabels) -> Arc<ConnCounters> {
        let counters = {
            let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(families.entry(Arc::new(labels)).or_default())
        };
        counters.opened.fetch_add(1, Ordering::Relaxed);
        counters
    }

    /// Counts a connection that was refused when it opened (opened and closed at once).
    pub fn refused(&self, labels: TrafficLabels) {
        self.open(labels).close();
    }

    /// Adds the four `istio_tcp_*` families and the agent's counters to `out`, label sets
    /// sorted so that the output is stable.
    pub fn write_prometheus(&self, out: &mut Exposition) {
        let mut rows: Vec<(Arc<TrafficLabels>, [u64; 4])> = {
            let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
            families
                .iter()
                .map(|(labels, c)| {
                    (
                        Arc::clone(labels),
                        [
                            c.opened.load(Ordering::Relaxed),
                            c.closed.load(Ordering::Relaxed),
                            c.sent.load(Ordering::Relaxed),
                            c.received.load(Ordering::Relaxed),
                        ],
                    )
                })
                .collect()
        };
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let families = [
            (
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened",
            ),
            (
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed",
            ),
            (
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during response in case of a TCP connection",
            ),
            (
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request in case of a TCP connection",
            ),
        ];
        for (i, (name, help)) in families.into_iter().enumerate() {
            let family = out.family(name, help, Kind::Counter);
            for (labels, values) in &rows {
                family.sample(&labels.pairs(), values[i]);
            }
        }
        self.write_agent(out);
    }

    fn write_agent(&self, out: &mut Exposition) {
        let a = &self.agent;
        out.family(
            "mesh_agent_authorization_decisions_total",
            "Connections checked against AuthorizationPolicy when they opened, by decision",
            Kind::Counter,
        )
        .sample(
            &[("decision", "allow")],
            a.authz_allowed.load(Ordering::Relaxed),
        )
        .sample(
            &[("decision", "deny")],
            a.authz_denied.load(Ordering::Relaxed),
        );
        out.counter(
            "mesh_agent_connections_revoked_total",
            "Open connections closed because a policy change no longer allows them",
            a.revoked.load(Ordering::Relaxed),
        );
        out.counter(
            "mesh_agent_tunnels_idle_closed_total",
            "HBONE tunnels closed because no byte moved either way for the idle timeout",
            a.tunnels_idle_closed.load(Ordering::Relaxed),
        );
        out.counter(
            "mesh_agent_plaintext_refused_total",
            "Plaintext connections refused by PeerAuthentication STRICT",
            a.plaintext_refused.load(Ordering::Relaxed),
        );
        out.counter(
            "mesh_agent_upstream_connect_failures_total",
            "Connections whose upstream could not be reached",
            a.connect_failures.load(Ordering::Relaxed),
        );
        out.family(
            "mesh_agent_active_connections",
            "Connections being relayed now, by direction",
            Kind::Gauge,
        )
        .sample(
            &[("direction", super::Direction::Outbound.as_str())],
            a.active_outbound.load(Ordering::Relaxed),
        )
        .sample(
            &[("direction", super::Direction::Inbound.as_str())],
            a.active_inbound.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::labels::{
        Peer, PeerLabels, Reporter, ResponseFlags, ServiceLabels, TrafficLabels,
    };

    fn labels(reporter: Reporter, flags: ResponseFlags) -> TrafficLabels {
        TrafficLabels {
            reporter,
            source: PeerLabels::of(Peer::default()),
            destination: PeerLabels::of(Peer::default()),
            service: ServiceLabels::of(None),
            security: "none",
            response_flags: flags,
        }
    }

    #[test]
    fn counters_of_one_label_set_add_up_and_render() {
        let m = Metrics::default();
        let a = m.open(labels(Reporter::Destination, ResponseFlags::None));
        let b = m.open(labels(Reporter::Destination, ResponseFlags::None));
        assert!(Arc::ptr_eq(&a, &b), "one label set, one counter set");
        a.add_bytes(100, 7);
        b.add_bytes(1, 0);
        a.close();
        m.refused(labels(Reporter::Destination, ResponseFlags::Denied));
        let mut exposition = Exposition::default();
        m.write_prometheus(&mut exposition);
        let out = exposition.encode();
        let line = |name: &str, flags: &str| {
            out.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("response_flags=\"{flags}\"")))
                .unwrap_or_else(|| panic!("no {name} {flags} in\n{out}"))
                .rsplit_once(' ')
                .unwrap()
                .1
                .to_owned()
        };
        assert_eq!(line("istio_tcp_connections_opened_total{", "-"), "2");
        assert_eq!(line("istio_tcp_connections_closed_total{", "-"), "1");
        assert_eq!(line("istio_tcp_received_bytes_total{", "-"), "101");
        assert_eq!(line("istio_tcp_sent_bytes_total{", "-"), "7");
        assert_eq!(line("istio_tcp_connections_opened_total{", "DENY"), "1");
        assert_eq!(line("istio_tcp_connections_closed_total{", "DENY"), "1");
        assert!(out.contains("# TYPE istio_tcp_sent_bytes_total counter\n"));
        assert!(out.contains("reporter=\"destination\""));
        assert!(out.contains("request_protocol=\"tcp\""));
    }
}
