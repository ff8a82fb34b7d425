//! The fields of `VirtualService` and `DestinationRule` as written, and their checks.

use std::{collections::BTreeMap, str::FromStr};

use serde::{de::IgnoredAny, Deserialize};

use super::{
    istio_port, percentage,
    policy::{PortPolicy, TrafficPolicyFields},
    refuse, unsupported, Abort, ConnectionPool, DestinationRuleSpec, DirectResponse, Fault,
    HashCookie, HashKey, IstioDuration, LoadBalancer, LoadBalancerSettings, Subset,
    VirtualServiceSpec, VsDestination, VsHeaderOps, VsHeaders, VsHttpRoute, VsMatch, VsRedirect,
    VsRetries, VsRewrite, VsString, VsTarget, VsTcpRoute, VsTlsRoute, DIRECT_RESPONSE_LIMIT,
    GRPC_STATUS_NAMES,
};
use crate::{
    cors::{Allowed, CorsPolicy, UnmatchedPreflights},
    gateway_api::{
        cors_fields, header_name, header_value, Pattern, RegexRewrite, RetryOn, RouteCors,
        RouteSchemaError, StringMatch,
    },
    locality::{Distribute, LocalityLbSetting, LocalityPattern, PriorityLabel},
    meta::{nullable, Labels},
    schema::{Checked, List, Parsed},
};

use crate::schema::checked;

checked!(
    VsHttpRoute,
    VsTcpRoute,
    VsTlsRoute,
    VsMatch,
    VsString,
    VsDestination,
    VsTarget,
    Subset,
    LoadBalancerSettings,
    LocalityLbSetting,
    ConnectionPool,
    PortPolicy
);

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct VsSpecFields {
    hosts: List<String>,
    gateways: List<String>,
    http: List<VsHttpRoute>,
    export_to: List<String>,
    tcp: List<VsTcpRoute>,
    tls: List<VsTlsRoute>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TlsRouteFields {
    #[serde(rename = "match")]
    matches: List<TlsMatchFields>,
    route: List<TcpDestinationFields>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TlsMatchFields {
    sni_hosts: List<String>,
    port: Option<u32>,
    destination_subnets: Option<IgnoredAny>,
    source_labels: Option<IgnoredAny>,
    source_namespace: Option<IgnoredAny>,
    gateways: Option<IgnoredAny>,
}

impl Checked for VsTlsRoute {
    type Error = RouteSchemaError;
    type Fields = TlsRouteFields;
    const WHAT: &'static str = "a tls route";

    fn check(f: TlsRouteFields) -> Result<Self, RouteSchemaError> {
        if f.matches.0.is_empty() {
            return Err(RouteSchemaError::OneOf("`match` (with `sniHosts`)"));
        }
        let mut matches = Vec::new();
        for m in f.matches.0 {
            refuse(m.destination_subnets.as_ref(), "destinationSubnets")?;
            refuse(m.source_labels.as_ref(), "sourceLabels")?;
            refuse(m.source_namespace.as_ref(), "sourceNamespace")?;
            refuse(m.gateways.as_ref(), "gateways")?;
            if m.sni_hosts.0.is_empty() {
                return Err(RouteSchemaError::OneOf("`sniHosts`"));
            }
            for host in &m.sni_hosts.0 {
                let name = host.strip_prefix("*.").unwrap_or(host);
                if host != "*" && !crate::names::is_dns_subdomain(name) {
                    return Err(RouteSchemaError::Hostname(host.clone(), ""));
                }
            }
            matches.push((m.sni_hosts.0, m.port.map(istio_port).transpose()?));
        }
        let route = destinations(f.route.0)?;
        Ok(VsTlsRoute { matches, route })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TcpRouteFields {
    #[serde(rename = "match")]
    matches: List<TcpMatchFields>,
    route: List<TcpDestinationFields>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TcpMatchFields {
    port: Option<u32>,
    destination_subnets: Option<IgnoredAny>,
    source_labels: Option<IgnoredAny>,
    source_namespace: Option<IgnoredAny>,
    source_subnet: Option<IgnoredAny>,
    gateways: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TcpDestinationFields {
    destination: VsTarget,
    weight: Option<u32>,
}

impl Checked for VsTcpRoute {
    type Error = RouteSchemaError;
    type Fields = TcpRouteFields;
    const WHAT: &'static str = "a tcp route";

    fn check(f: TcpRouteFields) -> Result<Self, RouteSchemaError> {
        let mut ports = Vec::new();
        let mut every_port = f.matches.0.is_empty();
        for m in f.matches.0 {
            refuse(m.destination_subnets.as_ref(), "destinationSubnets")?;
            refuse(m.source_labels.as_ref(), "sourceLabels")?;
            refuse(m.source_namespace.as_ref(), "sourceNamespace")?;
            refuse(m.source_subnet.as_ref(), "sourceSubnet")?;
            refuse(m.gateways.as_ref(), "gateways")?;
            // A match without a port matches every port.
            match m.port.map(istio_port).transpose()? {
                Some(port) => ports.push(port),
                None => every_port = true,
            }
        }
        if every_port {
            ports.clear();
        }
        let route = destinations(f.route.0)?;
        Ok(VsTcpRoute { ports, route })
    }
}

/// A `tcp` or `tls` rule's `route`: destinations with weights up to 100, on every one when
/// there are several.
fn destinations(route: Vec<TcpDestinationFields>) -> Result<Vec<VsDestination>, RouteSchemaError> {
    if route.is_empty() {
        return Err(RouteSchemaError::OneOf("`route`"));
    }
    let route: Vec<VsDestination> = route
        .into_iter()
        .map(|d| {
            if let Some(w) = d.weight.filter(|w| *w > 100) {
                return Err(RouteSchemaError::Weight(i64::from(w)));
            }
            Ok(VsDestination {
                destination: d.destination,
                weight: d.weight,
                headers: VsHeaders::default(),
            })
        })
        .collect::<Result<_, _>>()?;
    check_weights(&route)?;
    Ok(route)
}

impl Checked for VirtualServiceSpec {
    type Error = RouteSchemaError;
    type Fields = VsSpecFields;
    const WHAT: &'static str = "a VirtualService spec";

    fn check(f: VsSpecFields) -> Result<Self, RouteSchemaError> {
        if f.hosts.0.is_empty() {
            return Err(RouteSchemaError::Empty);
        }
        let export_to = check_export_to(f.export_to.0)?;
        let rewrites = f.http.0.iter().filter(|route| {
            route
                .rewrite
                .as_ref()
                .is_some_and(|r| r.uri_regex.is_some())
        });
        crate::gateway_api::check_patterns(
            f.http
                .0
                .iter()
                .flat_map(|route| &route.matches)
                .map(VsMatch::patterns)
                .chain(rewrites.map(|_| 1)),
        )?;
        let gateways = f.gateways.0;
        Ok(Self {
            hosts: f.hosts.0,
            mesh: gateways.is_empty() || gateways.iter().any(|g| g == "mesh"),
            http: f.http.0,
            tcp: f.tcp.0,
            export_to,
            tls: f.tls.0,
        })
    }
}

/// A share of requests: Istio's `Percent`, or the whole per cent its deprecated field gives
/// (`names` the two fields); all of them without either.
fn share(
    (precise, whole): (Option<PercentFields>, Option<u32>),
    names: &'static str,
) -> Result<f64, RouteSchemaError> {
    match (precise, whole) {
        (Some(p), None) => percentage(p.value),
        (None, Some(whole)) => percentage(f64::from(whole)),
        (None, None) => Ok(100.0),
        (Some(_), Some(_)) => Err(RouteSchemaError::OneOf(names)),
    }
}

/// A route's weights: on every destination when it has several.
fn check_weights(route: &[VsDestination]) -> Result<(), RouteSchemaError> {
    if route.len() > 1 && route.iter().any(|d| d.weight.is_none()) {
        return Err(RouteSchemaError::OneOf(
            "`weight` on every destination of a route with several",
        ));
    }
    Ok(())
}

/// `exportTo` as Istio checks it: `.`, `*` or namespace names, and `*` alone.
fn check_export_to(list: Vec<String>) -> Result<Vec<String>, RouteSchemaError> {
    for entry in &list {
        if !crate::names::is_export_target(entry) {
            return Err(RouteSchemaError::ExportTo(entry.clone()));
        }
    }
    if list.len() > 1 && list.iter().any(|e| e == "*") {
        return Err(RouteSchemaError::ExportTo(
            "* with other entries".to_owned(),
        ));
    }
    Ok(list)
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct HttpFields {
    name: Option<String>,
    #[serde(rename = "match")]
    matches: List<VsMatch>,
    route: List<VsDestination>,
    redirect: Option<RedirectFields>,
    rewrite: Option<RewriteFields>,
    timeout: Option<Parsed<IstioDuration>>,
    retries: Option<RetriesFields>,
    fault: Option<FaultFields>,
    mirror: Option<VsTarget>,
    mirror_percentage: Option<PercentFields>,
    /// Deprecated in Istio for `mirrorPercentage`: a whole per cent.
    mirror_percent: Option<u32>,
    mirrors: List<MirrorFields>,
    headers: Option<HeadersFields>,
    cors_policy: Option<CorsFields>,
    delegate: Option<IgnoredAny>,
    direct_response: Option<DirectResponseFields>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MirrorFields {
    destination: VsTarget,
    percentage: Option<PercentFields>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirectResponseFields {
    status: i64,
    body: Option<BodyFields>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct BodyFields {
    string: Option<String>,
    /// base64, as protobuf's JSON writes bytes.
    bytes: Option<k8s_openapi::ByteString>,
}

impl DirectResponseFields {
    fn check(self) -> Result<DirectResponse, RouteSchemaError> {
        let status = match self.status {
            code @ 200..=599 => u16::try_from(code).unwrap_or(500),
            code => return Err(RouteSchemaError::Status(code)),
        };
        let body: Vec<u8> = match self.body.map(|b| (b.string, b.bytes)) {
            None => Vec::new(),
            Some((Some(text), None)) => text.into_bytes(),
            Some((None, Some(bytes))) => bytes.0,
            Some(_) => return Err(RouteSchemaError::OneOf("`string`, `bytes` in `body`")),
        };
        if body.len() > DIRECT_RESPONSE_LIMIT {
            return Err(RouteSchemaError::TooMany {
                max: DIRECT_RESPONSE_LIMIT,
                found: body.len(),
            });
        }
        Ok(DirectResponse {
            status,
            body: body.into(),
        })
    }
}

impl Checked for VsHttpRoute {
    type Error = RouteSchemaError;
    type Fields = HttpFields;
    const WHAT: &'static str = "an http route";

    fn check(f: HttpFields) -> Result<Self, RouteSchemaError> {
        refuse(f.delegate.as_ref(), "delegate")?;
        let actions = [
            !f.route.0.is_empty(),
            f.redirect.is_some(),
            f.direct_response.is_some(),
        ];
        if actions.iter().filter(|set| **set).count() != 1 {
            return Err(RouteSchemaError::OneOf(
                "`route`, `redirect` and `directResponse`",
            ));
        }
        if f.mirror.is_some() && !f.mirrors.0.is_empty() {
            return Err(RouteSchemaError::OneOf("`mirror` and `mirrors`"));
        }
        if f.direct_response.is_some() && (f.mirror.is_some() || !f.mirrors.0.is_empty()) {
            // Nothing is sent on for a direct response, so a mirror would never be.
            return Err(RouteSchemaError::OneOf("`directResponse` and a mirror"));
        }
        let mut mirrors = Vec::new();
        if let Some(mirror) = f.mirror {
            let share = share(
                (f.mirror_percentage, f.mirror_percent),
                "`mirrorPercentage`, `mirrorPercent`",
            )?;
            mirrors.push((mirror, share));
        }
        for mirror in f.mirrors.0 {
            let share = mirror
                .percentage
                .map_or(Ok(100.0), |p| percentage(p.value))?;
            mirrors.push((mirror.destination, share));
        }
        check_weights(&f.route.0)?;
        Ok(Self {
            name: f.name,
            matches: f.matches.0,
            route: f.route.0,
            redirect: f.redirect.map(RedirectFields::check).transpose()?,
            rewrite: f.rewrite.map(RewriteFields::check).transpose()?,
            timeout: f.timeout.map(|d| d.0 .0),
            retries: f.retries.map(RetriesFields::check).transpose()?,
            fault: f.fault.map(FaultFields::check).transpose()?,
            mirrors,
            direct_response: f
                .direct_response
                .map(DirectResponseFields::check)
                .transpose()?,
            headers: f
                .headers
                .map(HeadersFields::check)
                .transpose()?
                .unwrap_or_default(),
            cors: f.cors_policy.map(CorsFields::check).transpose()?,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CorsFields {
    allow_origins: List<VsString>,
    /// Deprecated in Istio for `allowOrigins`: exact origins, `*` any.
    allow_origin: List<String>,
    allow_methods: List<String>,
    allow_headers: List<String>,
    expose_headers: List<String>,
    max_age: Option<Parsed<IstioDuration>>,
    allow_credentials: Option<bool>,
    unmatched_preflights: Option<String>,
}

impl CorsFields {
    fn check(self) -> Result<RouteCors, RouteSchemaError> {
        let allow_origins = self
            .allow_origins
            .0
            .iter()
            .map(VsString::to_match)
            .chain(self.allow_origin.0.into_iter().map(StringMatch::Exact))
            .collect();
        let unmatched_preflights = match self.unmatched_preflights.as_deref() {
            None | Some("UNSPECIFIED" | "FORWARD") => UnmatchedPreflights::Forward,
            Some("IGNORE") => UnmatchedPreflights::Ignore,
            Some(_) => {
                return Err(RouteSchemaError::OneOf(
                    "FORWARD, IGNORE for `unmatchedPreflights`",
                ))
            }
        };
        Ok(CorsPolicy {
            allow_origins,
            allow_methods: cors_fields::methods(self.allow_methods.0)?,
            allow_headers: cors_fields::header_names(self.allow_headers.0, true)?,
            expose_headers: match cors_fields::header_names(self.expose_headers.0, true)? {
                Allowed::Any => vec!["*".to_owned()],
                Allowed::Listed(list) => list,
            },
            max_age: self.max_age.map(|age| age.0 .0.as_secs()),
            allow_credentials: self.allow_credentials.unwrap_or(false),
            unmatched_preflights,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MatchFields {
    name: Option<String>,
    uri: Option<VsString>,
    #[serde(deserialize_with = "nullable")]
    headers: BTreeMap<String, VsString>,
    #[serde(deserialize_with = "nullable")]
    query_params: BTreeMap<String, VsString>,
    method: Option<VsString>,
    port: Option<u32>,
    ignore_uri_case: bool,
    scheme: Option<VsString>,
    authority: Option<VsString>,
    #[serde(deserialize_with = "nullable")]
    without_headers: BTreeMap<String, VsString>,
    source_labels: Option<IgnoredAny>,
    source_namespace: Option<IgnoredAny>,
    gateways: Option<IgnoredAny>,
}

impl Checked for VsMatch {
    type Error = RouteSchemaError;
    type Fields = MatchFields;
    const WHAT: &'static str = "a match";

    fn check(f: MatchFields) -> Result<Self, RouteSchemaError> {
        refuse(f.source_labels.as_ref(), "sourceLabels")?;
        refuse(f.source_namespace.as_ref(), "sourceNamespace")?;
        refuse(f.gateways.as_ref(), "gateways")?;
        let _ = f.name;
        let port = f.port.map(istio_port).transpose()?;
        let lower = |map: BTreeMap<String, VsString>| {
            map.into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect()
        };
        Ok(Self {
            uri: f.uri,
            headers: lower(f.headers),
            without_headers: lower(f.without_headers),
            query_params: f.query_params,
            method: f.method,
            authority: f.authority,
            scheme: f.scheme,
            port,
            ignore_uri_case: f.ignore_uri_case,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StringFields {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

impl Checked for VsString {
    type Error = RouteSchemaError;
    type Fields = StringFields;
    const WHAT: &'static str = "a string match";

    fn check(f: StringFields) -> Result<Self, RouteSchemaError> {
        match (f.exact, f.prefix, f.regex) {
            (Some(exact), None, None) => Ok(VsString::Exact(exact)),
            (None, Some(prefix), None) => Ok(VsString::Prefix(prefix)),
            (None, None, Some(regex)) => Ok(VsString::Regex(Pattern::from_str(&regex)?)),
            (None, None, None) => Ok(VsString::Present),
            _ => Err(RouteSchemaError::OneOf("`exact`, `prefix`, `regex`")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DestinationFields {
    destination: VsTarget,
    weight: Option<u32>,
    headers: Option<HeadersFields>,
}

impl Checked for VsDestination {
    type Error = RouteSchemaError;
    type Fields = DestinationFields;
    const WHAT: &'static str = "a route destination";

    fn check(f: DestinationFields) -> Result<Self, RouteSchemaError> {
        if let Some(w) = f.weight.filter(|w| *w > 100) {
            return Err(RouteSchemaError::Weight(i64::from(w)));
        }
        Ok(Self {
            destination: f.destination,
            weight: f.weight,
            headers: f
                .headers
                .map(HeadersFields::check)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortFields {
    number: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetFields {
    host: String,
    subset: Option<String>,
    port: Option<PortFields>,
}

impl Checked for VsTarget {
    type Error = RouteSchemaError;
    type Fields = TargetFields;
    const WHAT: &'static str = "a destination";

    fn check(f: TargetFields) -> Result<Self, RouteSchemaError> {
        if f.host.is_empty() {
            return Err(RouteSchemaError::Empty);
        }
        let port = f.port.map(|p| istio_port(p.number)).transpose()?;
        Ok(Self {
            host: f.host,
            subset: f.subset,
            port,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HeaderOpsFields {
    #[serde(deserialize_with = "nullable")]
    set: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    add: BTreeMap<String, String>,
    remove: List<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HeadersFields {
    request: Option<HeaderOpsFields>,
    response: Option<HeaderOpsFields>,
}

impl HeadersFields {
    /// Header names are HTTP tokens, values bytes HTTP allows: checked when read, rather than
    /// skipped with a warning at every request.
    fn check(self) -> Result<VsHeaders, RouteSchemaError> {
        let pairs = |map: BTreeMap<String, String>| {
            map.into_iter()
                .map(|(name, value)| {
                    let name = header_name(name)?;
                    let value = header_value(&name, value)?;
                    Ok((name, value))
                })
                .collect::<Result<BTreeMap<_, _>, RouteSchemaError>>()
        };
        let ops = |o: Option<HeaderOpsFields>| -> Result<VsHeaderOps, RouteSchemaError> {
            let Some(o) = o else {
                return Ok(VsHeaderOps::default());
            };
            Ok(VsHeaderOps {
                set: pairs(o.set)?,
                add: pairs(o.add)?,
                remove: o
                    .remove
                    .0
                    .into_iter()
                    .map(header_name)
                    .collect::<Result<_, _>>()?,
            })
        };
        Ok(VsHeaders {
            request: ops(self.request)?,
            response: ops(self.response)?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RedirectFields {
    uri: Option<String>,
    authority: Option<String>,
    port: Option<u32>,
    scheme: Option<String>,
    redirect_code: Option<u32>,
    derive_port: Option<IgnoredAny>,
}

impl RedirectFields {
    fn check(self) -> Result<VsRedirect, RouteSchemaError> {
        refuse(self.derive_port.as_ref(), "derivePort")?;
        let code = match self.redirect_code.unwrap_or(301) {
            code @ (301 | 302 | 303 | 307 | 308) => u16::try_from(code).unwrap_or(301),
            code => return Err(RouteSchemaError::RedirectStatus(i64::from(code))),
        };
        let port = self.port.map(istio_port).transpose()?;
        Ok(VsRedirect {
            uri: self.uri,
            authority: self.authority,
            port,
            scheme: self.scheme,
            code,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RewriteFields {
    uri: Option<String>,
    authority: Option<String>,
    uri_regex_rewrite: Option<RegexRewriteFields>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegexRewriteFields {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

impl RewriteFields {
    fn check(self) -> Result<VsRewrite, RouteSchemaError> {
        if self.uri.is_some() && self.uri_regex_rewrite.is_some() {
            return Err(RouteSchemaError::OneOf("`uri`, `uriRegexRewrite`"));
        }
        let uri_regex = self
            .uri_regex_rewrite
            .map(|r| RegexRewrite::new(&r.pattern, &r.rewrite))
            .transpose()?;
        Ok(VsRewrite {
            uri: self.uri,
            authority: self.authority,
            uri_regex,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RetriesFields {
    attempts: u32,
    per_try_timeout: Option<Parsed<IstioDuration>>,
    retry_on: Option<String>,
    retry_remote_localities: Option<bool>,
}

impl RetriesFields {
    fn check(self) -> Result<VsRetries, RouteSchemaError> {
        // Retries go to any endpoint of the destination (the waypoint knows no localities), as
        // `true` asks; `false` cannot be held to.
        if self.retry_remote_localities == Some(false) {
            return Err(unsupported("retryRemoteLocalities: false"));
        }
        let mut on = RetryOn::default();
        // Istio's default conditions when `retryOn` is absent.
        let conditions = self.retry_on.as_deref().unwrap_or(
            "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        );
        let mut retriable_codes = false;
        for condition in conditions
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            match condition {
                "5xx" => on.server_errors = true,
                "gateway-error" => on.gateway_errors = true,
                "connect-failure" | "refused-stream" => on.connect_failure = true,
                "reset" | "reset-before-request" => on.reset = true,
                // Envoy's: a 409 (Conflict).
                "retriable-4xx" => on.codes.push(409),
                "envoy-ratelimited" => on.rate_limited = true,
                "retriable-status-codes" => retriable_codes = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                code => match code.parse::<u16>() {
                    Ok(code @ 100..=599) => on.codes.push(code),
                    _ => return Err(RouteSchemaError::RetryOn(code.to_owned())),
                },
            }
        }
        if retriable_codes && on.codes.is_empty() {
            // Envoy's retriable status codes default to none; Istio's default policy means 503.
            on.codes.push(503);
        }
        Ok(VsRetries {
            attempts: self.attempts,
            per_try_timeout: self.per_try_timeout.map(|d| d.0 .0),
            retry_on: on,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PercentFields {
    value: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DelayFields {
    fixed_delay: Parsed<IstioDuration>,
    percentage: Option<PercentFields>,
    /// Deprecated in Istio for `percentage`: a whole per cent.
    percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct AbortFields {
    http_status: Option<i64>,
    percentage: Option<PercentFields>,
    grpc_status: Option<String>,
    http2_error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultFields {
    delay: Option<DelayFields>,
    abort: Option<AbortFields>,
}

impl FaultFields {
    fn check(self) -> Result<Fault, RouteSchemaError> {
        let delay = self
            .delay
            .map(|d| {
                let share = share((d.percentage, d.percent), "`percentage`, `percent`")?;
                Ok::<_, RouteSchemaError>((d.fixed_delay.0 .0, share))
            })
            .transpose()?;
        let abort = self
            .abort
            .map(|a| {
                refuse(a.http2_error.as_ref(), "http2Error")?;
                let status = match (a.http_status, a.grpc_status) {
                    (Some(code @ 200..=599), None) => {
                        Abort::Http(u16::try_from(code).unwrap_or(500))
                    }
                    (Some(code), None) => return Err(RouteSchemaError::Status(code)),
                    (None, Some(name)) => match GRPC_STATUS_NAMES.iter().position(|n| *n == name) {
                        Some(code) => Abort::Grpc(u8::try_from(code).unwrap_or(2)),
                        None => return Err(RouteSchemaError::GrpcStatus(name)),
                    },
                    _ => return Err(RouteSchemaError::OneOf("`httpStatus`, `grpcStatus`")),
                };
                let share = a.percentage.map_or(Ok(100.0), |p| percentage(p.value))?;
                Ok((status, share))
            })
            .transpose()?;
        Ok(Fault { delay, abort })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DrSpecFields {
    host: String,
    traffic_policy: Option<TrafficPolicyFields>,
    subsets: List<Subset>,
    export_to: List<String>,
    workload_selector: Option<IgnoredAny>,
}

impl Checked for DestinationRuleSpec {
    type Error = RouteSchemaError;
    type Fields = DrSpecFields;
    const WHAT: &'static str = "a DestinationRule spec";

    fn check(f: DrSpecFields) -> Result<Self, RouteSchemaError> {
        refuse(f.workload_selector.as_ref(), "workloadSelector")?;
        if f.host.is_empty() {
            return Err(RouteSchemaError::Empty);
        }
        let traffic_policy = f
            .traffic_policy
            .map(TrafficPolicyFields::check)
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            host: f.host,
            traffic_policy,
            subsets: f.subsets.0,
            export_to: check_export_to(f.export_to.0)?,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SubsetFields {
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    labels: Labels,
    traffic_policy: Option<TrafficPolicyFields>,
}

impl Checked for Subset {
    type Error = RouteSchemaError;
    type Fields = SubsetFields;
    const WHAT: &'static str = "a subset";

    fn check(f: SubsetFields) -> Result<Self, RouteSchemaError> {
        if f.name.is_empty() {
            return Err(RouteSchemaError::Empty);
        }
        let traffic_policy = f
            .traffic_policy
            .map(TrafficPolicyFields::check)
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            name: f.name,
            labels: f.labels,
            traffic_policy,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CookieFields {
    name: String,
    ttl: Option<Parsed<IstioDuration>>,
    path: Option<String>,
    #[serde(default)]
    attributes: List<AttributeFields>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AttributeFields {
    name: String,
    value: Option<String>,
}

/// Whether `text` is an RFC 6265 token (a cookie's or attribute's name).
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `text` may stand in a `Set-Cookie` attribute's value: visible ASCII but `;`.
fn is_attribute_value(text: &str) -> bool {
    text.bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b';')
}

impl CookieFields {
    fn check(self) -> Result<HashCookie, RouteSchemaError> {
        let bad = |what, value: &str, problem| RouteSchemaError::Cookie {
            what,
            value: value.to_owned(),
            problem,
        };
        if !is_token(&self.name) {
            return Err(bad(
                "name",
                &self.name,
                "is not a token (letters, digits and !#$%&'*+-.^_`|~)",
            ));
        }
        if let Some(path) = self.path.as_deref().filter(|p| !is_attribute_value(p)) {
            return Err(bad(
                "path",
                path,
                "has a space, a `;` or a character outside visible ASCII",
            ));
        }
        let mut attributes = Vec::new();
        for a in self.attributes.0 {
            if !is_token(&a.name) {
                return Err(bad("attribute", &a.name, "is not a token"));
            }
            if let Some(value) = a.value.as_deref().filter(|v| !is_attribute_value(v)) {
                return Err(bad(
                    "attribute value",
                    value,
                    "has a space, a `;` or a character outside visible ASCII",
                ));
            }
            attributes.push((a.name, a.value));
        }
        Ok(HashCookie {
            name: self.name,
            ttl: self.ttl.map(|t| t.0 .0),
            path: self.path,
            attributes,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct HashFields {
    http_header_name: Option<String>,
    http_cookie: Option<CookieFields>,
    use_source_ip: Option<bool>,
    http_query_parameter_name: Option<String>,
    ring_hash: Option<IgnoredAny>,
    maglev: Option<IgnoredAny>,
    minimum_ring_size: Option<IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LoadBalancerFields {
    simple: Option<String>,
    consistent_hash: Option<HashFields>,
    locality_lb_setting: Option<LocalityLbSetting>,
    warmup_duration_secs: Option<IgnoredAny>,
    warmup: Option<IgnoredAny>,
}

impl Checked for LoadBalancerSettings {
    type Error = RouteSchemaError;
    type Fields = LoadBalancerFields;
    const WHAT: &'static str = "a load balancer";

    fn check(f: LoadBalancerFields) -> Result<Self, RouteSchemaError> {
        refuse(f.warmup_duration_secs.as_ref(), "warmupDurationSecs")?;
        refuse(f.warmup.as_ref(), "warmup")?;
        let locality = f.locality_lb_setting;
        let algorithm = match (f.simple, f.consistent_hash) {
            // Only `localityLbSetting`: round robin, within the localities it picks.
            (None, None) if locality.is_some() => LoadBalancer::RoundRobin,
            (simple, hash) => algorithm(simple.as_deref(), hash)?,
        };
        Ok(Self {
            algorithm,
            locality,
        })
    }
}

/// `simple` or `consistentHash`, checked.
fn algorithm(
    simple: Option<&str>,
    hash: Option<HashFields>,
) -> Result<LoadBalancer, RouteSchemaError> {
    match (simple, hash) {
        (Some("ROUND_ROBIN" | "UNSPECIFIED"), None) => Ok(LoadBalancer::RoundRobin),
        (Some("LEAST_REQUEST" | "LEAST_CONN"), None) => Ok(LoadBalancer::LeastRequest),
        (Some("RANDOM"), None) => Ok(LoadBalancer::Random),
        (Some("PASSTHROUGH"), None) => Err(unsupported("simple: PASSTHROUGH")),
        (Some(_), None) => Err(RouteSchemaError::OneOf(
            "ROUND_ROBIN, LEAST_REQUEST, RANDOM for `simple`",
        )),
        (None, Some(hash)) => {
            // The ring's or table's size tunes how evenly keys spread; the waypoint's
            // rendezvous hash spreads them evenly and moves as few when endpoints change.
            let _ = (hash.ring_hash, hash.maglev, hash.minimum_ring_size);
            let source_ip = hash.use_source_ip.filter(|on| *on);
            let key = match (
                hash.http_header_name,
                hash.http_cookie,
                source_ip,
                hash.http_query_parameter_name,
            ) {
                (Some(header), None, None, None) => HashKey::Header(header.to_ascii_lowercase()),
                (None, Some(cookie), None, None) => HashKey::Cookie(cookie.check()?),
                (None, None, Some(_), None) => HashKey::SourceIp,
                (None, None, None, Some(name)) if !name.is_empty() => HashKey::QueryParameter(name),
                _ => {
                    return Err(RouteSchemaError::OneOf(
                        "`httpHeaderName`, `httpCookie`, `useSourceIp`, `httpQueryParameterName`",
                    ))
                }
            };
            Ok(LoadBalancer::ConsistentHash(key))
        }
        _ => Err(RouteSchemaError::OneOf(
            "`simple`, `consistentHash`, or only `localityLbSetting`",
        )),
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LocalityFields {
    enabled: Option<bool>,
    distribute: List<DistributeFields>,
    failover: List<FailoverFields>,
    failover_priority: List<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct DistributeFields {
    from: String,
    to: BTreeMap<String, u32>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct FailoverFields {
    from: String,
    to: String,
}

/// A locality pattern of `distribute`, checked.
fn locality_pattern(text: &str) -> Result<LocalityPattern, RouteSchemaError> {
    LocalityPattern::parse(text).ok_or_else(|| RouteSchemaError::LocalityPattern(text.to_owned()))
}

impl Checked for LocalityLbSetting {
    type Error = RouteSchemaError;
    type Fields = LocalityFields;
    const WHAT: &'static str = "a locality load balancer setting";

    fn check(f: LocalityFields) -> Result<Self, RouteSchemaError> {
        if !f.distribute.0.is_empty() && !f.failover.0.is_empty() {
            return Err(RouteSchemaError::DistributeAndFailover);
        }
        let mut distribute: Vec<Distribute> = Vec::new();
        for rule in f.distribute.0 {
            let from = locality_pattern(&rule.from)?;
            if distribute.iter().any(|d| d.from == from) {
                return Err(RouteSchemaError::LocalityTwice(rule.from));
            }
            let total: u64 = rule.to.values().map(|w| u64::from(*w)).sum();
            if total != 100 {
                return Err(RouteSchemaError::DistributeWeights {
                    from: rule.from,
                    total,
                });
            }
            let to = rule
                .to
                .iter()
                .map(|(pattern, weight)| Ok((locality_pattern(pattern)?, *weight)))
                .collect::<Result<_, RouteSchemaError>>()?;
            distribute.push(Distribute { from, to });
        }
        let mut failover: Vec<(String, String)> = Vec::new();
        for rule in f.failover.0 {
            for region in [&rule.from, &rule.to] {
                if region.is_empty() || region.contains('/') {
                    return Err(RouteSchemaError::FailoverRegion(region.clone()));
                }
            }
            if rule.from == rule.to {
                return Err(RouteSchemaError::FailoverToItself(rule.from));
            }
            if failover.iter().any(|(from, _)| *from == rule.from) {
                return Err(RouteSchemaError::LocalityTwice(rule.from));
            }
            failover.push((rule.from, rule.to));
        }
        let failover_priority = f
            .failover_priority
            .0
            .into_iter()
            .map(|label| {
                let (key, value) = match label.split_once('=') {
                    Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                    None => (label.clone(), None),
                };
                if key.is_empty() || key.contains(char::is_whitespace) {
                    return Err(RouteSchemaError::PriorityLabel(label));
                }
                Ok(PriorityLabel { key, value })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            enabled: f.enabled.unwrap_or(true),
            distribute,
            failover,
            failover_priority,
        })
    }
}
