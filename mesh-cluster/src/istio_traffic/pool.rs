//! `trafficPolicy.connectionPool` of a `DestinationRule`: the limits and settings of the
//! waypoint's connections and requests toward a destination (Envoy's circuit breakers and
//! connection pool, as Istio configures them for a cluster), and their checks.
//!
//! As in Istio, a value of 0 (or a field left out) is no limit, a negative one is refused, and a
//! subset's `connectionPool` replaces the rule's whole.

use std::time::Duration;

use serde::Deserialize;

use super::IstioDuration;
use crate::{
    gateway_api::RouteSchemaError,
    schema::{Checked, Parsed},
};

/// `connectionPool`: what the waypoint holds to for the requests and connections of one
/// destination (a Service port, or one subset of it), per waypoint replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: the most connections to the destination's endpoints at a time (an
    /// HTTP/1.1 connection carries one request at a time; a TCP tunnel is one). A request beyond
    /// waits for one ([`Self::http1_max_pending_requests`]); a tunnel beyond is refused. An
    /// endpoint without any connection may always get one, as Envoy's pools may.
    pub max_connections: Option<u32>,
    /// `tcp.connectTimeout`: how long reaching an endpoint may take (10 s when absent).
    pub connect_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive`: TCP keep-alive on the connections to endpoints outside the mesh.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `tcp.maxConnectionDuration`: a connection is not used for new requests past this age,
    /// and a TCP tunnel ends at it.
    pub max_connection_duration: Option<Duration>,
    /// `tcp.idleTimeout`: a TCP tunnel without a byte either way for this long ends (1 h when
    /// absent, `Some(ZERO)`: never).
    pub tcp_idle_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`: the most requests waiting for a connection
    /// ([`Self::max_connections`]); one more gets 503 (`UO`).
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: the most requests in flight to the destination, whatever their
    /// protocol; one more gets 503 (`UO`).
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection carries at most this many requests (1: no
    /// keep-alive).
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: the most retries in flight to the destination at a time; a request
    /// that would be retried beyond it gets its answer as it is.
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`: a kept connection unused this long is let go (5 min when absent,
    /// the HBONE pool's idle time).
    pub idle_timeout: Option<Duration>,
    /// `http.http2KeepAlive`: HTTP/2 PINGs on the HTTP/2 connections to endpoints.
    pub http2_keepalive: Option<Http2Keepalive>,
    /// `http.maxConcurrentStreams`: the most requests in flight on one HTTP/2 connection to an
    /// endpoint; past it, another connection (Envoy's pool opens more).
    pub max_concurrent_streams: Option<u32>,
    /// `http.h2UpgradePolicy: UPGRADE`: HTTP/1.1 requests go to the endpoints over HTTP/2,
    /// multiplexed on each endpoint's HTTP/2 connection (a WebSocket upgrade excepted, as in
    /// Envoy); the endpoints must speak HTTP/2 without TLS (h2c).
    pub h2_upgrade: bool,
}

/// `tcp.tcpKeepalive`: `SO_KEEPALIVE`, with the kernel's defaults for what is left out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpKeepalive {
    /// `probes`: unanswered probes before the connection counts as dead.
    pub probes: Option<u32>,
    /// `time`: idle time before the first probe.
    pub time: Option<Duration>,
    /// `interval`: time between probes.
    pub interval: Option<Duration>,
}

/// `http.http2KeepAlive`: a PING every `interval`, the connection closed when one goes
/// unanswered for `timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Http2Keepalive {
    /// `interval`.
    pub interval: Duration,
    /// `timeout` (Envoy's default: 3 s).
    pub timeout: Duration,
}

impl ConnectionPool {
    /// Whether it limits how many requests or connections go at a time (what the waypoint
    /// counts per destination).
    pub fn limits(&self) -> bool {
        self.max_connections.is_some()
            || self.http2_max_requests.is_some()
            || self.max_retries.is_some()
    }
}

/// A duration as Istio writes it.
type Time = Option<Parsed<IstioDuration>>;

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PoolFields {
    tcp: Option<TcpFields>,
    http: Option<HttpFields>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct TcpFields {
    max_connections: Option<i64>,
    connect_timeout: Time,
    tcp_keepalive: Option<KeepaliveFields>,
    max_connection_duration: Time,
    idle_timeout: Time,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct KeepaliveFields {
    probes: Option<i64>,
    time: Time,
    interval: Time,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct HttpFields {
    http1_max_pending_requests: Option<i64>,
    http2_max_requests: Option<i64>,
    max_requests_per_connection: Option<i64>,
    max_retries: Option<i64>,
    idle_timeout: Time,
    h2_upgrade_policy: Option<String>,
    use_client_protocol: Option<bool>,
    max_concurrent_streams: Option<i64>,
    http2_keep_alive: Option<H2KeepaliveFields>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct H2KeepaliveFields {
    interval: Time,
    timeout: Time,
}

/// A count: 0 or absent is no limit (Istio's `MaxUint32`), negative is refused.
fn count(value: Option<i64>, field: &'static str) -> Result<Option<u32>, RouteSchemaError> {
    match value {
        None | Some(0) => Ok(None),
        Some(v) => u32::try_from(v)
            .map(Some)
            .map_err(|_| RouteSchemaError::Count { field, value: v }),
    }
}

/// A duration that must be at least 1 ms (the CRD's rule), when present.
fn at_least_1ms(value: Time, field: &'static str) -> Result<Option<Duration>, RouteSchemaError> {
    match value.map(|d| d.0 .0) {
        Some(d) if d < Duration::from_millis(1) => Err(RouteSchemaError::TooShort(field)),
        d => Ok(d),
    }
}

impl Checked for ConnectionPool {
    type Error = RouteSchemaError;
    type Fields = PoolFields;
    const WHAT: &'static str = "a connection pool";

    fn check(f: PoolFields) -> Result<Self, RouteSchemaError> {
        if f.tcp.is_none() && f.http.is_none() {
            return Err(RouteSchemaError::OneOf("`tcp` or `http`, or both"));
        }
        let mut pool = ConnectionPool::default();
        if let Some(tcp) = f.tcp {
            pool.max_connections = count(tcp.max_connections, "tcp.maxConnections")?;
            pool.connect_timeout = at_least_1ms(tcp.connect_timeout, "tcp.connectTimeout")?;
            pool.max_connection_duration =
                at_least_1ms(tcp.max_connection_duration, "tcp.maxConnectionDuration")?;
            pool.tcp_idle_timeout = tcp.idle_timeout.map(|d| d.0 .0);
            pool.tcp_keepalive = tcp
                .tcp_keepalive
                .map(|k| {
                    Ok::<_, RouteSchemaError>(TcpKeepalive {
                        probes: count(k.probes, "tcp.tcpKeepalive.probes")?,
                        time: at_least_1ms(k.time, "tcp.tcpKeepalive.time")?,
                        interval: at_least_1ms(k.interval, "tcp.tcpKeepalive.interval")?,
                    })
                })
                .transpose()?;
        }
        if let Some(http) = f.http {
            pool.http1_max_pending_requests = count(
                http.http1_max_pending_requests,
                "http.http1MaxPendingRequests",
            )?;
            pool.http2_max_requests = count(http.http2_max_requests, "http.http2MaxRequests")?;
            pool.max_requests_per_connection = count(
                http.max_requests_per_connection,
                "http.maxRequestsPerConnection",
            )?;
            pool.max_retries = count(http.max_retries, "http.maxRetries")?;
            pool.idle_timeout = at_least_1ms(http.idle_timeout, "http.idleTimeout")?;
            pool.max_concurrent_streams =
                count(http.max_concurrent_streams, "http.maxConcurrentStreams")?;
            match http.h2_upgrade_policy.as_deref() {
                None | Some("DEFAULT" | "DO_NOT_UPGRADE") => {}
                Some("UPGRADE") => {
                    if http.use_client_protocol == Some(true) {
                        return Err(RouteSchemaError::UpgradeAndClientProtocol);
                    }
                    pool.h2_upgrade = true;
                }
                Some(_) => {
                    return Err(RouteSchemaError::OneOf(
                        "DEFAULT, DO_NOT_UPGRADE, UPGRADE for `http.h2UpgradePolicy`",
                    ))
                }
            }
            // Otherwise the waypoint speaks to an endpoint as the client spoke to it: what
            // `useClientProtocol: true` asks for, and what `false` comes to without an upgrade.
            let _ = http.use_client_protocol;
            pool.http2_keepalive = http
                .http2_keep_alive
                .map(|k| {
                    let interval = at_least_1ms(k.interval, "http.http2KeepAlive.interval")?
                        .ok_or(RouteSchemaError::OneOf(
                            "`interval` for `http.http2KeepAlive`",
                        ))?;
                    let timeout = at_least_1ms(k.timeout, "http.http2KeepAlive.timeout")?
                        .unwrap_or(H2_PING_TIMEOUT);
                    Ok::<_, RouteSchemaError>(Http2Keepalive { interval, timeout })
                })
                .transpose()?;
        }
        Ok(pool)
    }
}

/// How long an HTTP/2 PING may go unanswered when `http2KeepAlive` does not say (Envoy's).
const H2_PING_TIMEOUT: Duration = Duration::from_secs(3);
