//! Istio's traffic objects for the waypoint (`networking.istio.io` `v1`, `v1beta1` and
//! `v1alpha3`, which share a schema): `VirtualService` (HTTP routes in order, with fault
//! injection, retries with `retryOn`, subsets) and `DestinationRule` (subsets by labels, load
//! balancers). Re-exported by [`super::k8s`]; a `VirtualService` is translated into the same rules
//! as an `HTTPRoute` ([`crate::gateway_api::RouteRule`]) and applied by
//! [`crate::http_route`].
//!
//! Checked when parsed, each error naming the field path and the line: every struct refuses
//! fields it does not know, and the fields of features this waypoint does not implement
//! (`delegate`, `sourceLabels`, …) are refused by
//! name rather than ignored; `gateways` other than `mesh` make the `VirtualService` an ingress
//! one, skipped by the waypoint; string matches set at most one of `exact`, `prefix`, `regex`
//! (none: Istio's presence match); regular expressions compile; percentages are 0-100; redirect codes are 301, 302, 303, 307 or
//! 308; abort statuses 200-599; durations are Istio's (`1h`, `1.5s`, `100ms`); `retryOn` names
//! conditions Envoy knows or status codes; a `DestinationRule`'s load balancer sets one of
//! `simple` and `consistentHash`, and a consistent hash one key.

use std::{collections::BTreeMap, fmt::Write as _, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer};

use super::{
    gateway_api::{Pattern, RetryOn, RouteSchemaError},
    meta::{Labels, ObjectMeta},
    schema::deserialize_checked,
};

mod de_fields;
mod policy;
mod pool;

pub use policy::{merged, PolicyParts, PortPolicy, TrafficPolicy};
pub use pool::{ConnectionPool, Http2Keepalive, TcpKeepalive};

/// `apiVersion`s of `VirtualService` and `DestinationRule` read.
pub const ISTIO_NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// A `VirtualService`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VirtualService {
    /// Name, namespace, creation time (older first when several apply).
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: VirtualServiceSpec,
}

/// `spec` of a `VirtualService`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VirtualServiceSpec {
    /// `hosts`: the Services it routes (short names are in its namespace).
    pub hosts: Vec<String>,
    /// Whether it applies in the mesh (`gateways` absent, or naming `mesh`).
    pub mesh: bool,
    /// `http`, in order: the first rule that matches takes the request.
    pub http: Vec<VsHttpRoute>,
    /// `tcp`, in order: the first rule whose port matches takes a connection the waypoint
    /// passes on as TCP.
    pub tcp: Vec<VsTcpRoute>,
    /// `exportTo`: the namespaces whose clients it applies to (`.`: its own); empty, or `*`:
    /// every namespace's.
    pub export_to: Vec<String>,
    /// `tls`, in order: the first rule whose match names the port and the server name a TLS
    /// client asks for (SNI) takes a connection the waypoint passes on as TCP.
    pub tls: Vec<VsTlsRoute>,
}

/// A `tls` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct VsTlsRoute {
    /// `match`: each with its `sniHosts` and `port` (`None`: every port).
    pub matches: Vec<(Vec<String>, Option<u16>)>,
    /// `route`: destinations by weight.
    pub route: Vec<VsDestination>,
}

/// Whether `pattern` (an `sniHosts` entry: a name, `*.` and a domain, or `*`) takes `name`.
pub fn sni_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(domain) => {
            name.len() > domain.len()
                && name
                    .get(name.len() - domain.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(domain))
        }
        None => pattern.eq_ignore_ascii_case(name),
    }
}

/// A `tcp` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct VsTcpRoute {
    /// The ports of its `match` entries (none: every port).
    pub ports: Vec<u16>,
    /// `route`: destinations by weight.
    pub route: Vec<VsDestination>,
}

/// An `http` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct VsHttpRoute {
    pub name: Option<String>,
    /// `match`; none matches every request.
    pub matches: Vec<VsMatch>,
    pub route: Vec<VsDestination>,
    pub redirect: Option<VsRedirect>,
    pub rewrite: Option<VsRewrite>,
    pub timeout: Option<Duration>,
    pub retries: Option<VsRetries>,
    pub fault: Option<Fault>,
    /// `mirror` with `mirrorPercentage.value` (all requests without it), or `mirrors`, each
    /// with its `percentage`.
    pub mirrors: Vec<(VsTarget, f64)>,
    /// `directResponse`: answered by the waypoint, sent nowhere.
    pub direct_response: Option<DirectResponse>,
    pub headers: VsHeaders,
    /// `corsPolicy`.
    pub cors: Option<crate::gateway_api::RouteCors>,
}

/// A `match`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VsMatch {
    pub uri: Option<VsString>,
    /// `headers`, by lower-case name.
    pub headers: BTreeMap<String, VsString>,
    /// `withoutHeaders`, by lower-case name: each must not match (absent, or another value).
    pub without_headers: BTreeMap<String, VsString>,
    pub query_params: BTreeMap<String, VsString>,
    pub method: Option<VsString>,
    /// `authority`: the request's `:authority` (its `Host`).
    pub authority: Option<VsString>,
    /// `scheme`: the request's `:scheme` (`http` for plain-text requests).
    pub scheme: Option<VsString>,
    pub port: Option<u16>,
    pub ignore_uri_case: bool,
}

impl VsMatch {
    /// How many regular expressions it holds.
    pub(crate) fn patterns(&self) -> usize {
        self.uri
            .iter()
            .chain(self.headers.values())
            .chain(self.without_headers.values())
            .chain(self.query_params.values())
            .chain(&self.method)
            .chain(&self.authority)
            .chain(&self.scheme)
            .filter(|s| matches!(s, VsString::Regex(_)))
            .count()
    }
}

/// Istio's `StringMatch`.
#[derive(Clone, Debug, PartialEq)]
pub enum VsString {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
    /// `{}`: Istio's presence match (the header or parameter is there, whatever its value).
    Present,
}

impl VsString {
    /// The same condition as a route's string match.
    pub(crate) fn to_match(&self) -> crate::gateway_api::StringMatch {
        use crate::gateway_api::StringMatch;
        match self {
            VsString::Exact(v) => StringMatch::Exact(v.clone()),
            VsString::Prefix(v) => StringMatch::Prefix(v.clone()),
            VsString::Regex(p) => StringMatch::Regex(p.clone()),
            VsString::Present => StringMatch::Present,
        }
    }
}

/// A `route` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct VsDestination {
    pub destination: VsTarget,
    /// `weight`; when no entry has one, the only entry takes all.
    pub weight: Option<u32>,
    pub headers: VsHeaders,
}

/// A `destination` (or `mirror`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsTarget {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

/// `headers`: request and response operations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsHeaders {
    pub request: VsHeaderOps,
    pub response: VsHeaderOps,
}

/// `set`, `add`, `remove`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsHeaderOps {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// `directResponse`: the status and body the waypoint answers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectResponse {
    /// `status`: 200-599.
    pub status: u16,
    /// `body.string` or `body.bytes` (at most [`DIRECT_RESPONSE_LIMIT`]); empty without.
    pub body: std::sync::Arc<[u8]>,
}

/// The largest `directResponse` body read (Istio's limit).
pub const DIRECT_RESPONSE_LIMIT: usize = 1 << 20;

/// `redirect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub scheme: Option<String>,
    /// `redirectCode`; 301 when absent.
    pub code: u16,
}

/// `rewrite`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsRewrite {
    /// Replaces the matched prefix (a `prefix` match) or the whole path.
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `uriRegexRewrite`: the parts of the path its `match` takes replaced.
    pub uri_regex: Option<crate::gateway_api::RegexRewrite>,
}

/// `retries`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsRetries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

/// `fault`: injected by the waypoint before the request goes anywhere.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fault {
    /// `delay.fixedDelay` for `delay.percentage.value` per cent of requests.
    pub delay: Option<(Duration, f64)>,
    /// `abort` for `abort.percentage.value` per cent of requests.
    pub abort: Option<(Abort, f64)>,
}

/// What an injected abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// `httpStatus`.
    Http(u16),
    /// `grpcStatus`, as its code (`UNAVAILABLE`: 14): a gRPC request gets it trailers-only
    /// (HTTP 200), any other request a 503, as Envoy's fault filter answers.
    Grpc(u8),
}

/// gRPC's status codes by name, as `grpcStatus` writes them.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A `DestinationRule`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    pub spec: DestinationRuleSpec,
}

/// `spec` of a `DestinationRule`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationRuleSpec {
    pub host: String,
    /// `trafficPolicy`.
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
    /// `exportTo`, as written: the waypoint applies a rule to every client of its Service,
    /// and says so when this narrows it ([`crate::http_route`]).
    pub export_to: Vec<String>,
}

/// `outlierDetection`: endpoints that keep failing are left out for a while (Envoy's outlier
/// detection, with Istio's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors`: 5xx answers (and failures to reach it) in a row that eject an
    /// endpoint; 5 when absent, 0 turns it off.
    pub consecutive_5xx: u32,
    /// `consecutiveGatewayErrors`: 502, 503, 504 (and failures to reach it) in a row; off (0)
    /// when absent.
    pub consecutive_gateway: u32,
    /// `interval`: how often ejections are reconsidered (10 s).
    pub interval: Duration,
    /// `baseEjectionTime`: an ejection lasts this times the endpoint's ejections so far (30 s),
    /// at most 300 s (Envoy's `max_ejection_time`).
    pub base_ejection_time: Duration,
    /// `maxEjectionPercent`: an endpoint is ejected only while fewer than this share are (10).
    pub max_ejection_percent: u32,
    /// `minHealthPercent`: below this share of endpoints not ejected, ejections are ignored
    /// (Envoy's panic mode; 0, off).
    pub min_health_percent: u32,
    /// With `splitExternalLocalOriginErrors`: `consecutiveLocalOriginFailures` (5 when absent),
    /// the failures to reach an endpoint in a row that eject it, counted apart from the
    /// answers' 5xx; `None`: such failures count as 5xx (and gateway) errors.
    pub consecutive_local_origin: Option<u32>,
}

/// A `subset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subset {
    pub name: String,
    /// `labels`: the endpoints' pods have all of them.
    pub labels: Labels,
    /// Its own `trafficPolicy`, over the rule's ([`merged`]).
    pub traffic_policy: TrafficPolicy,
}

/// `loadBalancer`: how the waypoint picks an endpoint, and by locality.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancerSettings {
    /// `simple` or `consistentHash`.
    pub algorithm: LoadBalancer,
    /// `localityLbSetting`, when given.
    pub locality: Option<crate::locality::LocalityLbSetting>,
}

/// How the waypoint picks an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Two endpoints drawn at random, the one with fewer requests in flight (Envoy's).
    LeastRequest,
    Random,
    /// The same key to the same endpoint while the endpoints stay.
    ConsistentHash(HashKey),
}

/// What a consistent hash is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// `httpHeaderName`.
    Header(String),
    /// `httpCookie`.
    Cookie(HashCookie),
    /// `useSourceIp`.
    SourceIp,
    /// `httpQueryParameterName`: the parameter's first value.
    QueryParameter(String),
}

/// `httpCookie`: the hash is over the cookie's value. Without `ttl`, a request without the cookie
/// has no key (any endpoint); with it, the waypoint makes the cookie up for such a request, keys
/// on it, and sets it on the answer (Envoy's sticky sessions), so the client's next requests
/// carry it to the same endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashCookie {
    /// `name`: an RFC 6265 token.
    pub name: String,
    /// `ttl`: the made-up cookie's `Max-Age`; zero makes it a session cookie (no `Max-Age`);
    /// `None`: no cookie is made.
    pub ttl: Option<Duration>,
    /// `path`: the made-up cookie's `Path`.
    pub path: Option<String>,
    /// `attributes`: more of the made-up cookie's attributes (`SameSite=Strict`, `Secure`).
    pub attributes: Vec<(String, Option<String>)>,
}

impl HashCookie {
    /// The `Set-Cookie` value for a cookie made up with `value` (Envoy's form: the value quoted,
    /// `Max-Age`, `Path`, the attributes, `HttpOnly`).
    pub fn set_cookie(&self, value: &str) -> String {
        let mut out = format!("{}=\"{value}\"", self.name);
        if let Some(ttl) = self.ttl.filter(|t| t.as_secs() > 0) {
            let _ = write!(out, "; Max-Age={}", ttl.as_secs());
        }
        if let Some(path) = self.path.as_deref().filter(|p| !p.is_empty()) {
            out.push_str("; Path=");
            out.push_str(path);
        }
        for (name, value) in &self.attributes {
            out.push_str("; ");
            out.push_str(name);
            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                out.push('=');
                out.push_str(value);
            }
        }
        out.push_str("; HttpOnly");
        out
    }
}

impl<'de> Deserialize<'de> for VirtualServiceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

impl<'de> Deserialize<'de> for DestinationRuleSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

/// Parses Istio's duration (`protobuf` `Duration` as Istio writes it): a decimal number and a
/// unit, `h`, `m`, `s`, `ms`, `us` or `ns`, possibly several (`1m30s`).
pub fn parse_istio_duration(text: &str) -> Result<Duration, RouteSchemaError> {
    let invalid = || RouteSchemaError::Duration(text.to_owned());
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * seconds).map_err(|_| invalid())?;
    }
    Ok(total)
}

/// An Istio duration.
pub(crate) struct IstioDuration(pub(crate) Duration);

impl FromStr for IstioDuration {
    type Err = RouteSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        parse_istio_duration(value).map(IstioDuration)
    }
}

/// A port number as Istio writes it (a `uint32`): 1-65535.
pub(crate) fn istio_port(port: u32) -> Result<u16, RouteSchemaError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(RouteSchemaError::Port(i64::from(port)))
}

/// Refuses a field that is present (a feature this waypoint does not implement).
pub(crate) fn refuse<T>(value: Option<&T>, field: &'static str) -> Result<(), RouteSchemaError> {
    match value {
        Some(_) => Err(unsupported(field)),
        None => Ok(()),
    }
}

/// A list field that Istio allows and this waypoint does not implement.
pub(crate) fn unsupported(field: &'static str) -> RouteSchemaError {
    RouteSchemaError::Unsupported(field)
}

/// A percentage (0-100).
pub(crate) fn percentage(value: f64) -> Result<f64, RouteSchemaError> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(RouteSchemaError::PercentValue(value))
    }
}

#[cfg(test)]
mod tests;
