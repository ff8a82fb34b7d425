//! Gateway API's `HTTPRoute` (`gateway.networking.k8s.io` `v1` and `v1beta1`, which have the same
//! schema): the L7 routes a waypoint applies to traffic for the Services they attach to (GAMMA,
//! `parentRefs` of kind `Service`). Re-exported by [`super::k8s`], whose parser reads it like the
//! other kinds; how a request is routed is in [`super::http_route`].
//!
//! The rules the Gateway API CRD's schema and its validation rules apply are checked when the
//! route is parsed, so that an error names the field path and the line, and a file with an invalid
//! route keeps its last good objects (the route before stays in force). Checked here:
//!
//! - every struct of the spec refuses fields it does not know: a misspelt `backendRef` must not
//!   silently send a route's traffic elsewhere, and a field of a newer release this waypoint does
//!   not implement (`sessionPersistence`, a `CORS` filter) is refused rather than ignored;
//! - list lengths: at most 32 `parentRefs`, 16 `hostnames`, 16 `rules`, 64 `matches` per rule and
//!   128 in all, 16 `filters`, 16 `backendRefs`, 16 `headers` and `queryParams` per match, 16
//!   headers per `set`, `add` and `remove`; rule `name`s are unique;
//! - paths start with `/` and hold no `//`, `/./`, `/../`, `%2f` or `#`; regular expressions
//!   compile (Rust's `regex` syntax, linear time); header and query parameter names are HTTP
//!   tokens; hostnames are DNS names (a leading `*.` only where Gateway API allows one);
//! - a filter sets exactly the field its `type` names; `RequestHeaderModifier`,
//!   `ResponseHeaderModifier`, `RequestRedirect` and `URLRewrite` appear at most once per rule,
//!   and a redirect and a rewrite not together; `ReplacePrefixMatch` needs exactly one match, of
//!   type `PathPrefix`; `ExtensionRef`, `CORS` and `ExternalAuth` filters are refused (not
//!   supported);
//! - redirect status codes are 301, 302 (the default), 303, 307 or 308; ports 1-65535; backend
//!   weights 0-1,000,000 (default 1); a `Service` backend names a port; mirroring sets
//!   `percent` (0-100) or `fraction` (numerator ≤ denominator), not both;
//! - durations have Gateway API's form (`1h2m3s4ms`: up to four number-unit pairs, units `h`,
//!   `m`, `s`, `ms`), and `backendRequest` is not longer than `request` (zero: no timeout);
//! - retry codes are 400-599.
//!
//! Names (the route's, its parents' and backends') are checked when the state is built.

use std::{collections::HashSet, fmt, str::FromStr, time::Duration};

use serde::{
    de::{self, Visitor},
    Deserialize, Deserializer,
};

use super::{
    meta::ObjectMeta,
    schema::{deserialize_checked, Checked, List, Parsed},
};

pub(crate) mod cors_fields;
mod de_fields;
pub mod l4;

pub use l4::{
    L4Rule, TcpRoute, TcpRouteSpec, TlsRoute, TlsRouteSpec, TCP_ROUTE_VERSIONS, TLS_ROUTE_VERSIONS,
};

/// `apiVersion`s of `HTTPRoute` read.
pub const HTTP_ROUTE_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// A Gateway API `GRPCRoute` (`v1`): gRPC routes, read into the same rules as an `HTTPRoute`'s
/// (a method match is a match on the request's path, `/<service>/<method>`; filters are the
/// header modifiers and mirroring). Checked when parsed as Gateway API's schema says: a method
/// match names a service or a method (`Exact`: a service is dot-separated identifiers, a method
/// one identifier; `RegularExpression`: each compiles); redirects and rewrites are not gRPC
/// filters.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct GrpcRoute {
    /// Name, namespace and creation time.
    pub metadata: ObjectMeta,
    /// `spec`, as the rules the waypoint applies.
    pub spec: GrpcRouteSpec,
}

/// `spec` of a `GRPCRoute`, in the form of an `HTTPRoute`'s.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GrpcRouteSpec(pub HttpRouteSpec);

impl<'de> Deserialize<'de> for GrpcRouteSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

/// A Gateway API `Gateway` (`v1` or `v1beta1`). Only its class is read: a Gateway of class
/// [`crate::waypoint::WAYPOINT_CLASS`] is a waypoint (see [`crate::waypoint`]); Gateways of other
/// classes are ingress gateways, not the mesh's, and are kept without effect. Of the listeners,
/// only the HBONE one's `allowedRoutes` is read (which namespaces may use the waypoint): a
/// waypoint listens on 15008 (HBONE) only.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Gateway {
    /// Name, namespace and labels (`istio.io/waypoint-for`).
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: GatewaySpec,
}

/// What is read of a `Gateway`'s `spec`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// `gatewayClassName`.
    pub gateway_class_name: String,
    /// `listeners`: of a waypoint, its HBONE listener's `allowedRoutes` say which namespaces may
    /// use it.
    #[serde(default, deserialize_with = "crate::meta::nullable")]
    pub listeners: Vec<Listener>,
}

/// What is read of a `Gateway` listener.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// `port`.
    pub port: i64,
    /// `protocol`.
    pub protocol: String,
    /// `allowedRoutes.namespaces`.
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// A listener's `allowedRoutes`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct AllowedRoutes {
    /// `namespaces`.
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
}

/// `allowedRoutes.namespaces`: `from` (`Same`, the default; `All`; `Selector`) and `selector`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RouteNamespaces {
    /// `from`.
    #[serde(default)]
    pub from: Option<String>,
    /// `selector`, for `from: Selector`.
    #[serde(default)]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// Gateway API's group, the default `group` of a `parentRef`.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Why an `HTTPRoute` spec is refused. The parser prefixes each with the field path and appends
/// the line.
#[derive(Debug, thiserror::Error)]
pub enum RouteSchemaError {
    #[error("at most {max} entries, found {found}")]
    TooMany { max: usize, found: usize },
    #[error("at most 128 matches across all rules, found {0}")]
    TooManyMatches(usize),
    #[error("at most {MAX_PATTERNS} regular expressions across all rules, found {0}")]
    TooManyPatterns(usize),
    #[error("rule name {0:?} is used by more than one rule")]
    DuplicateRuleName(String),
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} is longer than {1} characters")]
    TooLong(String, usize),
    #[error("path {path:?} {problem}")]
    Path { path: String, problem: &'static str },
    #[error("{pattern:?} is not a regular expression: {reason}")]
    Regex { pattern: String, reason: String },
    #[error("{0:?} is not an HTTP header or parameter name (letters, digits and !#$%&'*+-.^_`|~)")]
    HeaderName(String),
    #[error("the value of header {0:?} holds a control character (only tab is allowed)")]
    HeaderValue(String),
    #[error("header {0:?} is listed twice")]
    DuplicateHeader(String),
    #[error("rule name {0:?} is not a DNS label (lowercase letters, digits and `-`)")]
    RuleName(String),
    #[error("{0:?} is not a hostname{1}")]
    Hostname(String, &'static str),
    #[error("{0:?} is not a port number (1-65535)")]
    Port(i64),
    #[error("weight {0} is out of range (0-1000000)")]
    Weight(i64),
    #[error("{0} is not a redirect status (301, 302, 303, 307 or 308)")]
    RedirectStatus(i64),
    #[error("{0} is not an HTTP error status (400-599)")]
    RetryCode(i64),
    #[error("{0:?} is not a duration (up to four of <1-5 digits><h|m|s|ms>, as in `1m30s`)")]
    Duration(String),
    #[error("backendRequest ({backend:?}) is longer than request ({request:?})")]
    BackendLongerThanRequest {
        backend: Duration,
        request: Duration,
    },
    #[error("type {kind} needs the field `{field}`")]
    FilterField {
        kind: FilterType,
        field: &'static str,
    },
    #[error("field `{field}` does not go with type {kind}")]
    FilterExtraField {
        kind: FilterType,
        field: &'static str,
    },
    #[error("filter type {0} is not supported by this waypoint")]
    UnsupportedFilter(FilterType),
    #[error("a rule has at most one {0} filter")]
    RepeatedFilter(FilterType),
    #[error("a rule cannot have both a RequestRedirect and a URLRewrite filter")]
    RedirectAndRewrite,
    #[error("replacePrefixMatch needs the rule to have exactly one match, of type PathPrefix")]
    ReplacePrefixWithoutPrefix,
    #[error("type {kind} needs `{field}`")]
    PathModifierField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("`percent` and `fraction` cannot both be set")]
    PercentAndFraction,
    #[error("percent {0} is out of range (0-100)")]
    Percent(i64),
    #[error("fraction {numerator}/{denominator}: the denominator must be positive and not below the numerator")]
    Fraction { numerator: i64, denominator: i64 },
    #[error("a backend of kind Service needs a `port`")]
    ServiceWithoutPort,
    #[error("retry attempts {0} is negative")]
    Attempts(i64),
    #[error("`{0}` is not supported by this waypoint")]
    Unsupported(&'static str),
    #[error("{field} must not be negative or over 4294967295, found {value}")]
    Count { field: &'static str, value: i64 },
    #[error("{0} must be at least 1ms")]
    TooShort(&'static str),
    #[error("http.h2UpgradePolicy UPGRADE and http.useClientProtocol true contradict each other")]
    UpgradeAndClientProtocol,
    #[error("trafficPolicy.portLevelSettings: port {0} is set more than once")]
    DuplicatePortLevel(u16),
    #[error(
        "trafficPolicy.tls.mode {0}: the waypoint reaches the mesh's endpoints over HBONE, mutual TLS with their \
         identities (ISTIO_MUTUAL, the only mode it takes); it does not originate TLS to servers \
         outside the mesh"
    )]
    TlsMode(String),
    #[error("percentage {0} is out of range (0-100)")]
    PercentValue(f64),
    #[error("{0:?} is not a locality (`region`, `region/zone` or `region/zone/subzone`, with `*` only as the last part)")]
    LocalityPattern(String),
    #[error("`distribute` and `failover` cannot both be set")]
    DistributeAndFailover,
    #[error("distribute from {from:?}: the weights add up to {total}, not 100")]
    DistributeWeights { from: String, total: u64 },
    #[error("{0:?} is given twice")]
    LocalityTwice(String),
    #[error("failover: {0:?} is not a region (not empty, no `/`)")]
    FailoverRegion(String),
    #[error("failover from {0:?} to itself")]
    FailoverToItself(String),
    #[error("failoverPriority: {0:?} is not a label (`key`, or `key=value`)")]
    PriorityLabel(String),
    #[error("set exactly one of {0}")]
    OneOf(&'static str),
    #[error("{0} is not an HTTP status (200-599)")]
    Status(i64),
    #[error("unknown retryOn condition {0:?} (5xx, gateway-error, connect-failure, refused-stream, reset, retriable-4xx, envoy-ratelimited, retriable-status-codes, a gRPC status name, or a status code)")]
    RetryOn(String),
    #[error("{0:?} is not a Service host (`name`, `name.namespace`, or `name.namespace.svc[.<domain>]`)")]
    Host(String),
    #[error("{0:?} is not a gRPC {1} name")]
    GrpcName(String, &'static str),
    #[error("a method match names a service, a method or both")]
    EmptyMethodMatch,
    #[error("filter type {0} is not a GRPCRoute filter")]
    NotGrpcFilter(FilterType),
    #[error("exportTo: {0:?} is not `.`, `*` (alone) or a namespace name")]
    ExportTo(String),
    #[error("{0:?} is not a CORS origin (`*`, or http(s)://host[:port] with `*` or `*.` before the host's name)")]
    Origin(String),
    #[error("{0:?} is not an HTTP method")]
    Method(String),
    #[error("{0:?} is not a gRPC status name (OK, CANCELLED, UNKNOWN, …, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED, in capitals)")]
    GrpcStatus(String),
    #[error("rules: exactly one rule, found {0} (the rule of a TCPRoute or TLSRoute has no matches: a second could never be chosen)")]
    OneRule(usize),
    #[error("cookie {what} {value:?} {problem}")]
    Cookie {
        what: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// An `HTTPRoute`: the routes for the traffic of the `parentRefs` it attaches to. See the module
/// documentation for what parsing checks.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct HttpRoute {
    /// Name, namespace and creation time (the older route wins a tie).
    pub metadata: ObjectMeta,
    /// `spec`.
    pub spec: HttpRouteSpec,
}

/// `spec` of an `HTTPRoute`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpRouteSpec {
    /// `parentRefs`: the Services (GAMMA) or Gateways it attaches to.
    pub parent_refs: Vec<ParentRef>,
    /// `hostnames`. GAMMA implementations "SHOULD NOT infer any functionality from the hostnames
    /// field" of a route attached to a Service (GEP-1426); kept for Gateway parents.
    pub hostnames: Vec<String>,
    /// `rules`; none means one rule matching every request without backends (a 500).
    pub rules: Vec<RouteRule>,
}

/// A `parentRef`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    /// `group`; [`GATEWAY_GROUP`] when absent, `""` for the core group (a Service).
    pub group: String,
    /// `kind`; `Gateway` when absent.
    pub kind: String,
    /// `namespace`; the route's when absent.
    pub namespace: Option<String>,
    /// `name`.
    pub name: String,
    /// `sectionName`: a Service port's name, or a Gateway listener's.
    pub section_name: Option<String>,
    /// `port`: one port of the Service (or the Gateway).
    pub port: Option<u16>,
}

impl ParentRef {
    /// Whether the parent is a core `Service` (a GAMMA route) or an Istio `ServiceEntry`
    /// (`networking.istio.io`, as Istio's waypoints take routes for entries).
    pub fn is_service(&self) -> bool {
        (self.group.is_empty() && self.kind == "Service")
            || (self.group == crate::model::ISTIO_NETWORKING_GROUP && self.kind == "ServiceEntry")
    }
}

/// A rule of an `HTTPRoute`.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteRule {
    /// `name` (Gateway API 1.2), for telemetry and `sectionName` references.
    pub name: Option<String>,
    /// `matches`; `PathPrefix /` when absent. A request matching any of them takes the rule.
    pub matches: Vec<RouteMatch>,
    /// `filters`, in order.
    pub filters: Vec<Filter>,
    /// `backendRefs`, with their weights.
    pub backend_refs: Vec<BackendRef>,
    /// `timeouts`.
    pub timeouts: Timeouts,
    /// `retry` (Gateway API 1.2, experimental channel).
    pub retry: Option<Retry>,
}

/// A `match` of a rule: all its conditions hold.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    /// `path`; `PathPrefix /` when absent.
    pub path: PathMatch,
    /// `headers`: each header named has a value that matches (names compared without case).
    pub headers: Vec<ValueMatch>,
    /// `queryParams`: each parameter named has a value that matches (names compared exactly).
    pub query_params: Vec<ValueMatch>,
    /// `method`.
    pub method: Option<http::Method>,
}

/// How a request's path is matched.
#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    /// `Exact`: the whole path.
    Exact(String),
    /// `PathPrefix`: whole segments (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`); a
    /// trailing `/` is ignored.
    Prefix(String),
    /// `RegularExpression`: the whole path matches.
    Regex(Pattern),
    /// A `VirtualService`'s `prefix`: a plain string prefix (`/foo` matches `/foobar`).
    RawPrefix(String),
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueMatch {
    /// The header's or parameter's name.
    pub name: String,
    /// How its value is matched.
    pub value: StringMatch,
}

impl RouteMatch {
    /// How many regular expressions it holds.
    pub(crate) fn patterns(&self) -> usize {
        let path = usize::from(matches!(self.path, PathMatch::Regex(_)));
        let values = self
            .headers
            .iter()
            .chain(&self.query_params)
            .filter(|m| m.value.has_pattern())
            .count();
        path + values
    }
}

/// How a value is matched.
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    /// `Exact`.
    Exact(String),
    /// `RegularExpression`: the whole value matches.
    Regex(Pattern),
    /// A `VirtualService`'s `prefix`.
    Prefix(String),
    /// A `VirtualService`'s `{}`: the header or parameter is there, whatever its value.
    Present,
    /// A `VirtualService`'s `withoutHeaders`: the header is absent, or its value does not match.
    Not(Box<StringMatch>),
}

/// A route's CORS policy: its origins matched as the route's other strings.
pub type RouteCors = crate::cors::CorsPolicy<StringMatch>;

impl crate::cors::OriginMatch for StringMatch {
    fn matches(&self, origin: &str) -> bool {
        self.admits(Some(origin))
    }
}

impl StringMatch {
    /// Whether it holds a regular expression.
    fn has_pattern(&self) -> bool {
        match self {
            StringMatch::Regex(_) => true,
            StringMatch::Not(inner) => inner.has_pattern(),
            StringMatch::Exact(_) | StringMatch::Prefix(_) | StringMatch::Present => false,
        }
    }

    /// Whether a value (`None`: the header or parameter is absent) meets it.
    pub fn admits(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (StringMatch::Not(inner), value) => !inner.admits(value),
            (_, None) => false,
            (StringMatch::Present, Some(_)) => true,
            (StringMatch::Exact(expected), Some(value)) => value == expected,
            (StringMatch::Regex(pattern), Some(value)) => pattern.is_match(value),
            (StringMatch::Prefix(prefix), Some(value)) => value.starts_with(prefix.as_str()),
        }
    }
}

/// A compiled regular expression, anchored at both ends; compared by its text.
#[derive(Clone, Debug)]
pub struct Pattern(regex::Regex);

/// Most memory one compiled pattern may take, and its matcher's cache. The regex crate allows
/// 10 MiB, and nine characters of a counted Unicode class come near it (`\w{1,200}`; `\w{1,50}`
/// takes 2.5 MiB): every route or `VirtualService` a tenant writes is compiled by the waypoints
/// it reaches, so such patterns would let one tenant take their memory and time. 256 KiB holds
/// what routes match on (`/api/v\d+/users/\w+(/.*)?` takes about 57 KiB, `\w+@\w+\.\w+` 150
/// KiB); Envoy's RE2 limit is stricter still (a program of 100 instructions).
pub const PATTERN_SIZE_LIMIT: usize = 256 << 10;

/// Most regular expressions in one route or `VirtualService`: with [`PATTERN_SIZE_LIMIT`], one
/// object can make a waypoint hold at most 16 MiB of compiled patterns (Gateway API would allow
/// 128 matches of 33 patterns each).
pub const MAX_PATTERNS: usize = 64;

impl Pattern {
    /// A case-insensitive pattern matching `text` exactly (`prefix`: or any text starting
    /// with it), for a `VirtualService`'s `ignoreUriCase`.
    pub fn ignoring_case(text: &str, prefix: bool) -> Self {
        let tail = if prefix { ".*" } else { "" };
        let pattern = format!("(?i)^(?:{}{tail})$", regex::escape(text));
        // An escaped literal always compiles.
        Pattern(regex::Regex::new(&pattern).unwrap_or_else(|_| regex::Regex::new("$^").unwrap()))
    }

    /// Whether all of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// A `VirtualService`'s `rewrite.uriRegexRewrite`: every part of the path `match` takes is
/// replaced by `rewrite`, whose `\1`..`\9` are the capture groups (RE2's and Envoy's form); a
/// pattern held to the same size limits as [`Pattern`]'s. Compared by its text.
#[derive(Clone, Debug)]
pub struct RegexRewrite {
    regex: regex::Regex,
    /// `rewrite` in the regex crate's form (`${1}`, `$$`).
    replacement: String,
}

impl RegexRewrite {
    /// Checks and compiles `match` and `rewrite`.
    pub fn new(pattern: &str, rewrite: &str) -> Result<Self, RouteSchemaError> {
        if pattern.is_empty() {
            return Err(RouteSchemaError::Empty);
        }
        check_len(pattern, 1024)?;
        check_len(rewrite, 1024)?;
        let regex = regex::RegexBuilder::new(pattern)
            .size_limit(PATTERN_SIZE_LIMIT)
            .dfa_size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map_err(|error| RouteSchemaError::Regex {
                pattern: pattern.to_owned(),
                reason: regex_reason(&error),
            })?;
        let mut replacement = String::with_capacity(rewrite.len());
        let mut chars = rewrite.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek().copied()) {
                ('\\', Some(d)) if d.is_ascii_digit() => {
                    replacement.push_str("${");
                    replacement.push(d);
                    replacement.push('}');
                    chars.next();
                }
                ('\\', Some('\\')) => {
                    replacement.push('\\');
                    chars.next();
                }
                ('$', _) => replacement.push_str("$$"),
                (c, _) => replacement.push(c),
            }
        }
        Ok(Self { regex, replacement })
    }

    /// `path` rewritten.
    pub fn apply(&self, path: &str) -> String {
        self.regex
            .replace_all(path, self.replacement.as_str())
            .into_owned()
    }
}

/// Why a pattern does not compile, in one line: the regex crate writes a syntax error as the
/// pattern with a caret under the place, on lines of their own, and the problem last.
fn regex_reason(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("error: "))
            .unwrap_or(text)
            .to_owned(),
        // Too big compiled (one line), or a kind of a later release.
        other => other.to_string().replace('\n', " "),
    }
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str() && self.replacement == other.replacement
    }
}

impl Eq for RegexRewrite {}

impl FromStr for Pattern {
    type Err = RouteSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err(RouteSchemaError::Empty);
        }
        check_len(value, 1024)?;
        regex::RegexBuilder::new(&format!("^(?:{value})$"))
            .size_limit(PATTERN_SIZE_LIMIT)
            .dfa_size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map(Pattern)
            .map_err(|error| RouteSchemaError::Regex {
                pattern: value.to_owned(),
                reason: regex_reason(&error),
            })
    }
}

/// The type of a filter, as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
    ExtensionRef,
    #[serde(rename = "CORS")]
    Cors,
    ExternalAuth,
}

impl fmt::Display for FilterType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilterType::RequestHeaderModifier => "RequestHeaderModifier",
            FilterType::ResponseHeaderModifier => "ResponseHeaderModifier",
            FilterType::RequestRedirect => "RequestRedirect",
            FilterType::UrlRewrite => "URLRewrite",
            FilterType::RequestMirror => "RequestMirror",
            FilterType::ExtensionRef => "ExtensionRef",
            FilterType::Cors => "CORS",
            FilterType::ExternalAuth => "ExternalAuth",
        })
    }
}

/// A filter of a rule or of a backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// Headers of the request changed before it is forwarded.
    RequestHeaderModifier(HeaderModifier),
    /// Headers of the response changed before it is returned.
    ResponseHeaderModifier(HeaderModifier),
    /// The request answered with a redirect, not forwarded.
    RequestRedirect(Redirect),
    /// The request's host or path changed before it is forwarded.
    UrlRewrite(Rewrite),
    /// A copy of the request sent to another backend, its answer dropped.
    RequestMirror(Mirror),
    /// Cross-origin resource sharing: preflights answered, answers marked (`CORS`, or a
    /// `VirtualService`'s `corsPolicy`).
    Cors(Box<RouteCors>),
}

impl Filter {
    /// The filter's type.
    pub fn kind(&self) -> FilterType {
        match self {
            Filter::RequestHeaderModifier(_) => FilterType::RequestHeaderModifier,
            Filter::ResponseHeaderModifier(_) => FilterType::ResponseHeaderModifier,
            Filter::RequestRedirect(_) => FilterType::RequestRedirect,
            Filter::UrlRewrite(_) => FilterType::UrlRewrite,
            Filter::RequestMirror(_) => FilterType::RequestMirror,
            Filter::Cors(_) => FilterType::Cors,
        }
    }
}

/// `set`, `add` and `remove` of a header modifier, applied in that order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Headers replaced (or added when absent).
    pub set: Vec<(String, String)>,
    /// Values appended.
    pub add: Vec<(String, String)>,
    /// Headers removed.
    pub remove: Vec<String>,
}

/// `requestRedirect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `scheme`: `http` or `https`; the request's when absent.
    pub scheme: Option<String>,
    /// `hostname`; the request's when absent.
    pub hostname: Option<String>,
    /// `path`; the request's when absent.
    pub path: Option<PathModifier>,
    /// `port`; when absent, the scheme's well-known port if the scheme changes, else the
    /// request's.
    pub port: Option<u16>,
    /// `statusCode`; 302 when absent.
    pub status: u16,
}

/// `urlRewrite`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// `hostname`: the new `Host` / `:authority`.
    pub hostname: Option<String>,
    /// `path`.
    pub path: Option<PathModifier>,
}

/// How a redirect or a rewrite changes the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    /// `ReplaceFullPath`.
    Full(String),
    /// `ReplacePrefixMatch`: the part the rule's `PathPrefix` matched is replaced.
    Prefix(String),
    /// A `VirtualService`'s `rewrite.uri`: replaces the matched prefix when the request matched
    /// a prefix, the whole path otherwise.
    Matched(String),
    /// A `VirtualService`'s `rewrite.uriRegexRewrite`.
    Regex(RegexRewrite),
}

/// `requestMirror`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// Where the copies go.
    pub backend: BackendTarget,
    /// The share of requests mirrored, as `numerator / denominator`; all when neither `percent`
    /// nor `fraction` is set.
    pub numerator: u32,
    /// See `numerator`.
    pub denominator: u32,
}

/// A backend: a Service and port (or another kind, which the state refuses to route to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendTarget {
    /// `group`; `""` (core) when absent.
    pub group: String,
    /// `kind`; `Service` when absent.
    pub kind: String,
    /// `name`.
    pub name: String,
    /// `namespace`; the route's when absent.
    pub namespace: Option<String>,
    /// `port`.
    pub port: Option<u16>,
}

impl BackendTarget {
    /// Whether the backend is a core `Service` or an Istio `ServiceEntry` (by name).
    pub fn is_service(&self) -> bool {
        (self.group.is_empty() && self.kind == "Service")
            || (self.group == crate::model::ISTIO_NETWORKING_GROUP && self.kind == "ServiceEntry")
    }

    /// Whether the backend is Istio's `Hostname` (`networking.istio.io`): the Service or
    /// `ServiceEntry` that answers to that host.
    pub fn is_hostname(&self) -> bool {
        self.group == crate::model::ISTIO_NETWORKING_GROUP && self.kind == "Hostname"
    }
}

/// A weighted backend of a rule.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendRef {
    /// The backend.
    pub target: BackendTarget,
    /// `weight`: its share, relative to the rule's other backends; 0 sends it nothing.
    pub weight: u32,
    /// `filters` applied to requests sent to this backend only.
    pub filters: Vec<Filter>,
}

/// `timeouts`; zero means none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// `request`: the whole request, retries included, until the response's headers.
    pub request: Option<Duration>,
    /// `backendRequest`: one attempt at a backend.
    pub backend_request: Option<Duration>,
}

/// `retry` (an `HTTPRoute`'s, or a `VirtualService`'s `retries`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retry {
    /// When a failed attempt is retried. An `HTTPRoute`'s `codes`, and connection failures and
    /// resets.
    pub on: RetryOn,
    /// `attempts`: retries after the first attempt; the waypoint's default when absent.
    pub attempts: Option<u32>,
    /// `backoff`: the shortest wait before a retry (the base of [`Retry::wait`]); Envoy's 25 ms
    /// when absent.
    pub backoff: Option<Duration>,
}

/// Envoy's base retry back-off, when a route sets none.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

impl Retry {
    /// The wait before retry number `retry` (1 for the first), `roll` a random number in
    /// [0, 1): exponential with jitter, as Envoy backs off: between the base and the base times
    /// 2^`retry`, at most ten times the base (Envoy's default longest back-off). Never shorter
    /// than the base, which Gateway API's `backoff` is ("the minimum duration between
    /// attempts"). So retries never hammer a failing endpoint in a tight loop, whatever
    /// `attempts` says.
    pub fn wait(&self, retry: u32, roll: f64) -> Duration {
        let base = self.backoff.unwrap_or(DEFAULT_RETRY_BACKOFF);
        let most = base.saturating_mul(10);
        let upper = base
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(most);
        base + (upper.saturating_sub(base)).mul_f64(roll.clamp(0.0, 1.0))
    }
}

/// When a failed attempt is retried (Envoy's `retryOn` conditions the waypoint implements).
// Envoy's conditions are independent flags, as `retryOn` lists them.
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx answer, a reset, or a timed-out attempt.
    pub server_errors: bool,
    /// `gateway-error`: 502, 503, 504, or a timed-out attempt.
    pub gateway_errors: bool,
    /// `connect-failure`, `refused-stream`: the endpoint could not be reached.
    pub connect_failure: bool,
    /// `reset`: the exchange broke after it started, or the attempt timed out.
    pub reset: bool,
    /// Status codes retried (`retriable-status-codes`, `codes`).
    pub codes: Vec<u16>,
    /// gRPC statuses retried (`cancelled` 1, `deadline-exceeded` 4, `resource-exhausted` 8,
    /// `internal` 13, `unavailable` 14), when an answer carries one in its headers (gRPC's
    /// trailers-only answer, as Envoy decides on the answer's head).
    pub grpc: Vec<u8>,
    /// `envoy-ratelimited`: an answer with `x-envoy-ratelimited` (a rate limit's refusal).
    pub rate_limited: bool,
}

impl RetryOn {
    /// Whether an answer with `status`, `grpc` in its headers, and `x-envoy-ratelimited` or
    /// not (`rate_limited`), is retried.
    pub fn answer(&self, status: u16, grpc: Option<u8>, rate_limited: bool) -> bool {
        (self.rate_limited && rate_limited)
            || self.codes.contains(&status)
            || (self.server_errors && status >= 500)
            || (self.gateway_errors && (502..=504).contains(&status))
            || grpc.is_some_and(|code| self.grpc.contains(&code))
    }

    /// Whether an attempt that broke or timed out after it was sent is retried.
    pub fn broken(&self) -> bool {
        self.reset || self.server_errors || self.gateway_errors
    }
}

impl<'de> Deserialize<'de> for HttpRouteSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

/// Parses a Gateway API duration (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`).
pub fn parse_duration(text: &str) -> Result<Duration, RouteSchemaError> {
    let invalid = || RouteSchemaError::Duration(text.to_owned());
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut pairs = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(invalid());
        };
        rest = &rest[len..];
        // At most 99,999 hours: no overflow.
        total += unit * u32::try_from(number).map_err(|_| invalid())?;
        pairs += 1;
    }
    if pairs == 0 || pairs > 4 {
        return Err(invalid());
    }
    Ok(total)
}

/// A length limit of a value.
/// An HTTP header or query parameter name (an RFC 7230 token, at most 256 characters).
pub(crate) fn header_name(name: String) -> Result<String, RouteSchemaError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > 256 || !name.bytes().all(token) {
        return Err(RouteSchemaError::HeaderName(name));
    }
    Ok(name)
}

/// A header value a filter sets or adds: at most 4,096 bytes (Gateway API's limit), and bytes
/// HTTP allows in a field value (no control character but tab, such as a line break that would
/// end the header), so that it is refused when read rather than skipped at every request.
pub(crate) fn header_value(name: &str, value: String) -> Result<String, RouteSchemaError> {
    check_len(&value, 4096)?;
    if http::HeaderValue::from_bytes(value.as_bytes()).is_err() {
        return Err(RouteSchemaError::HeaderValue(name.to_owned()));
    }
    Ok(value)
}

fn check_len(value: &str, max: usize) -> Result<(), RouteSchemaError> {
    if value.len() > max {
        return Err(RouteSchemaError::TooLong(value.to_owned(), max));
    }
    Ok(())
}

/// The limit of regular expressions in one object ([`MAX_PATTERNS`]), given each match's count.
pub(crate) fn check_patterns(counts: impl Iterator<Item = usize>) -> Result<(), RouteSchemaError> {
    let patterns: usize = counts.sum();
    if patterns > MAX_PATTERNS {
        return Err(RouteSchemaError::TooManyPatterns(patterns));
    }
    Ok(())
}

/// A list's length limit.
fn check_count<T>(list: &[T], max: usize) -> Result<(), RouteSchemaError> {
    if list.len() > max {
        return Err(RouteSchemaError::TooMany {
            max,
            found: list.len(),
        });
    }
    Ok(())
}

/// Rule names are unique within a route.
fn check_rule_names(rules: &[RouteRule]) -> Result<(), RouteSchemaError> {
    let mut seen = HashSet::new();
    for name in rules.iter().filter_map(|rule| rule.name.as_deref()) {
        if !seen.insert(name) {
            return Err(RouteSchemaError::DuplicateRuleName(name.to_owned()));
        }
    }
    Ok(())
}

/// An integer field read from a YAML number (or refused with its own error when out of range).
struct Int(i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_i64(IntVisitor)
    }
}

#[cfg(test)]
mod tests;
