//! The fields of each struct of an `HTTPRoute` spec as written, and the checks that turn them
//! into the typed values of [`super`].

use std::{collections::HashSet, str::FromStr, time::Duration};

use serde::{de::IgnoredAny, Deserialize};

use super::{
    check_count, check_len, check_patterns, check_rule_names, header_name, header_value,
    parse_duration, BackendRef, BackendTarget, Checked, Filter, FilterType, GrpcRouteSpec,
    HeaderModifier, HttpRouteSpec, Int, List, ParentRef, Parsed, PathMatch, PathModifier, Pattern,
    Redirect, Retry, RetryOn, Rewrite, RouteMatch, RouteRule, RouteSchemaError, StringMatch,
    Timeouts, ValueMatch, GATEWAY_GROUP,
};

use crate::schema::checked;

checked!(
    ParentRef,
    RouteRule,
    RouteMatch,
    Filter,
    BackendRef,
    BackendTarget,
    HeaderModifier,
    Retry
);

// After the macro, which it uses too.
mod l4;

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SpecFields {
    parent_refs: List<ParentRef>,
    hostnames: List<Parsed<Hostname>>,
    rules: List<RouteRule>,
}

impl Checked for HttpRouteSpec {
    type Error = RouteSchemaError;
    type Fields = SpecFields;
    const WHAT: &'static str = "an HTTPRoute spec";

    fn check(fields: SpecFields) -> Result<Self, RouteSchemaError> {
        check_count(&fields.parent_refs.0, 32)?;
        check_count(&fields.hostnames.0, 16)?;
        check_count(&fields.rules.0, 16)?;
        let matches: usize = fields.rules.0.iter().map(|rule| rule.matches.len()).sum();
        if matches > 128 {
            return Err(RouteSchemaError::TooManyMatches(matches));
        }
        check_patterns(
            fields
                .rules
                .0
                .iter()
                .flat_map(|rule| &rule.matches)
                .map(RouteMatch::patterns),
        )?;
        check_rule_names(&fields.rules.0)?;
        Ok(Self {
            parent_refs: fields.parent_refs.0,
            hostnames: fields.hostnames.0.into_iter().map(|h| h.0 .0).collect(),
            rules: fields.rules.0,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ParentRefFields {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    section_name: Option<String>,
    port: Option<Int>,
}

impl Checked for ParentRef {
    type Error = RouteSchemaError;
    type Fields = ParentRefFields;
    const WHAT: &'static str = "a parentRef";

    fn check(f: ParentRefFields) -> Result<Self, RouteSchemaError> {
        Ok(Self {
            group: f.group.unwrap_or_else(|| GATEWAY_GROUP.to_owned()),
            kind: f.kind.unwrap_or_else(|| "Gateway".to_owned()),
            namespace: f.namespace,
            name: non_empty(f.name)?,
            section_name: f.section_name,
            port: f.port.map(port).transpose()?,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RuleFields {
    name: Option<String>,
    matches: List<RouteMatch>,
    filters: List<Filter>,
    backend_refs: List<BackendRef>,
    timeouts: Option<TimeoutsFields>,
    retry: Option<Retry>,
}

impl Checked for RouteRule {
    type Error = RouteSchemaError;
    type Fields = RuleFields;
    const WHAT: &'static str = "a rule";

    fn check(f: RuleFields) -> Result<Self, RouteSchemaError> {
        check_count(&f.matches.0, 64)?;
        check_count(&f.filters.0, 16)?;
        check_count(&f.backend_refs.0, 16)?;
        if let Some(name) = &f.name {
            check_section_name(name)?;
        }
        let mut matches = f.matches.0;
        if matches.is_empty() {
            matches.push(RouteMatch {
                path: PathMatch::Prefix("/".to_owned()),
                headers: Vec::new(),
                query_params: Vec::new(),
                method: None,
            });
        }
        check_rule_filters(&f.filters.0, &matches)?;
        Ok(Self {
            name: f.name,
            matches,
            filters: f.filters.0,
            backend_refs: f.backend_refs.0,
            timeouts: f
                .timeouts
                .map(TimeoutsFields::check)
                .transpose()?
                .unwrap_or_default(),
            retry: f.retry,
        })
    }
}

/// The filters of a rule: singletons once, not both a redirect and a rewrite, and a prefix
/// replacement only with one `PathPrefix` match.
fn check_rule_filters(filters: &[Filter], matches: &[RouteMatch]) -> Result<(), RouteSchemaError> {
    let mut seen = HashSet::new();
    for filter in filters {
        let kind = filter.kind();
        if kind != FilterType::RequestMirror && !seen.insert(kind) {
            return Err(RouteSchemaError::RepeatedFilter(kind));
        }
        let path = match filter {
            Filter::RequestRedirect(redirect) => redirect.path.as_ref(),
            Filter::UrlRewrite(rewrite) => rewrite.path.as_ref(),
            _ => None,
        };
        let one_prefix = matches!(
            matches,
            [RouteMatch {
                path: PathMatch::Prefix(_),
                ..
            }]
        );
        if matches!(path, Some(PathModifier::Prefix(_))) && !one_prefix {
            return Err(RouteSchemaError::ReplacePrefixWithoutPrefix);
        }
    }
    if seen.contains(&FilterType::RequestRedirect) && seen.contains(&FilterType::UrlRewrite) {
        return Err(RouteSchemaError::RedirectAndRewrite);
    }
    Ok(())
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MatchFields {
    path: Option<PathFields>,
    headers: List<ValueFields>,
    query_params: List<ValueFields>,
    method: Option<MethodName>,
}

impl Checked for RouteMatch {
    type Error = RouteSchemaError;
    type Fields = MatchFields;
    const WHAT: &'static str = "a match";

    fn check(f: MatchFields) -> Result<Self, RouteSchemaError> {
        check_count(&f.headers.0, 16)?;
        check_count(&f.query_params.0, 16)?;
        let path = match f.path {
            None => PathMatch::Prefix("/".to_owned()),
            Some(path) => path.check()?,
        };
        let values = |list: List<ValueFields>| {
            list.0
                .into_iter()
                .map(ValueFields::check)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            path,
            headers: values(f.headers)?,
            query_params: values(f.query_params)?,
            method: f.method.map(MethodName::method),
        })
    }
}

#[derive(Deserialize)]
enum PathType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PathFields {
    #[serde(rename = "type")]
    kind: Option<PathType>,
    value: Option<String>,
}

impl PathFields {
    fn check(self) -> Result<PathMatch, RouteSchemaError> {
        let value = self.value.unwrap_or_else(|| "/".to_owned());
        check_len(&value, 1024)?;
        Ok(match self.kind.unwrap_or(PathType::PathPrefix) {
            PathType::Exact => PathMatch::Exact(check_path(value)?),
            PathType::PathPrefix => PathMatch::Prefix(check_path(value)?),
            PathType::RegularExpression => PathMatch::Regex(value.parse()?),
        })
    }
}

/// Gateway API's rules for an `Exact` or `PathPrefix` value.
fn check_path(path: String) -> Result<String, RouteSchemaError> {
    let problem = if !path.starts_with('/') {
        Some("does not start with `/`")
    } else if ["//", "/./", "/../", "%2f", "%2F", "#"]
        .iter()
        .any(|bad| path.contains(bad))
    {
        Some("contains `//`, `/./`, `/../`, `%2f` or `#`")
    } else if path.ends_with("/..") || path.ends_with("/.") {
        Some("ends with `/.` or `/..`")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(RouteSchemaError::Path { path, problem }),
        None => Ok(path),
    }
}

#[derive(Deserialize)]
enum ValueType {
    Exact,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ValueFields {
    #[serde(rename = "type")]
    kind: Option<ValueType>,
    name: String,
    value: String,
}

impl ValueFields {
    fn check(self) -> Result<ValueMatch, RouteSchemaError> {
        let name = header_name(self.name)?;
        check_len(&self.value, 4096)?;
        let value = match self.kind.unwrap_or(ValueType::Exact) {
            ValueType::Exact => StringMatch::Exact(self.value),
            ValueType::RegularExpression => StringMatch::Regex(self.value.parse()?),
        };
        Ok(ValueMatch { name, value })
    }
}

/// The methods Gateway API matches on.
#[derive(Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum MethodName {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

impl MethodName {
    fn method(self) -> http::Method {
        match self {
            MethodName::Get => http::Method::GET,
            MethodName::Head => http::Method::HEAD,
            MethodName::Post => http::Method::POST,
            MethodName::Put => http::Method::PUT,
            MethodName::Delete => http::Method::DELETE,
            MethodName::Connect => http::Method::CONNECT,
            MethodName::Options => http::Method::OPTIONS,
            MethodName::Trace => http::Method::TRACE,
            MethodName::Patch => http::Method::PATCH,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct FilterFields {
    #[serde(rename = "type")]
    kind: FilterType,
    request_header_modifier: Option<HeaderModifier>,
    response_header_modifier: Option<HeaderModifier>,
    request_redirect: Option<RedirectFields>,
    url_rewrite: Option<RewriteFields>,
    request_mirror: Option<MirrorFields>,
    extension_ref: Option<IgnoredAny>,
    #[serde(rename = "cors")]
    cors: Option<super::cors_fields::CorsFilterFields>,
    external_auth: Option<IgnoredAny>,
}

impl Checked for Filter {
    type Error = RouteSchemaError;
    type Fields = FilterFields;
    const WHAT: &'static str = "a filter";

    fn check(f: FilterFields) -> Result<Self, RouteSchemaError> {
        let set = [
            (
                FilterType::RequestHeaderModifier,
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                FilterType::ResponseHeaderModifier,
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            (
                FilterType::RequestRedirect,
                "requestRedirect",
                f.request_redirect.is_some(),
            ),
            (
                FilterType::UrlRewrite,
                "urlRewrite",
                f.url_rewrite.is_some(),
            ),
            (
                FilterType::RequestMirror,
                "requestMirror",
                f.request_mirror.is_some(),
            ),
            (
                FilterType::ExtensionRef,
                "extensionRef",
                f.extension_ref.is_some(),
            ),
            (FilterType::Cors, "cors", f.cors.is_some()),
            (
                FilterType::ExternalAuth,
                "externalAuth",
                f.external_auth.is_some(),
            ),
        ];
        for (kind, field, present) in set {
            if kind == f.kind && !present {
                return Err(RouteSchemaError::FilterField { kind, field });
            }
            if kind != f.kind && present {
                return Err(RouteSchemaError::FilterExtraField {
                    kind: f.kind,
                    field,
                });
            }
        }
        Ok(match f.kind {
            FilterType::RequestHeaderModifier => {
                Filter::RequestHeaderModifier(f.request_header_modifier.unwrap_or_default())
            }
            FilterType::ResponseHeaderModifier => {
                Filter::ResponseHeaderModifier(f.response_header_modifier.unwrap_or_default())
            }
            FilterType::RequestRedirect => Filter::RequestRedirect(
                f.request_redirect
                    .map(RedirectFields::check)
                    .transpose()?
                    .ok_or(RouteSchemaError::FilterField {
                        kind: f.kind,
                        field: "requestRedirect",
                    })?,
            ),
            FilterType::UrlRewrite => {
                Filter::UrlRewrite(f.url_rewrite.map(RewriteFields::check).transpose()?.ok_or(
                    RouteSchemaError::FilterField {
                        kind: f.kind,
                        field: "urlRewrite",
                    },
                )?)
            }
            FilterType::RequestMirror => Filter::RequestMirror(
                f.request_mirror
                    .map(MirrorFields::check)
                    .transpose()?
                    .ok_or(RouteSchemaError::FilterField {
                        kind: f.kind,
                        field: "requestMirror",
                    })?,
            ),
            FilterType::Cors => Filter::Cors(Box::new(
                f.cors
                    .ok_or(RouteSchemaError::FilterField {
                        kind: f.kind,
                        field: "cors",
                    })?
                    .check()?,
            )),
            kind @ (FilterType::ExtensionRef | FilterType::ExternalAuth) => {
                return Err(RouteSchemaError::UnsupportedFilter(kind))
            }
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderFields {
    name: String,
    value: String,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HeaderModifierFields {
    set: List<HeaderFields>,
    add: List<HeaderFields>,
    remove: List<String>,
}

impl Checked for HeaderModifier {
    type Error = RouteSchemaError;
    type Fields = HeaderModifierFields;
    const WHAT: &'static str = "a header modifier";

    fn check(f: HeaderModifierFields) -> Result<Self, RouteSchemaError> {
        fn pairs(list: List<HeaderFields>) -> Result<Vec<(String, String)>, RouteSchemaError> {
            check_count(&list.0, 16)?;
            let mut seen = HashSet::new();
            list.0
                .into_iter()
                .map(|header| {
                    let name = header_name(header.name)?;
                    if !seen.insert(name.to_ascii_lowercase()) {
                        return Err(RouteSchemaError::DuplicateHeader(name));
                    }
                    let value = header_value(&name, header.value)?;
                    Ok((name, value))
                })
                .collect()
        }
        check_count(&f.remove.0, 16)?;
        Ok(Self {
            set: pairs(f.set)?,
            add: pairs(f.add)?,
            remove: f
                .remove
                .0
                .into_iter()
                .map(header_name)
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scheme {
    Http,
    Https,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RedirectFields {
    scheme: Option<Scheme>,
    hostname: Option<Parsed<PreciseHostname>>,
    path: Option<PathModifierFields>,
    port: Option<Int>,
    status_code: Option<Int>,
}

impl RedirectFields {
    fn check(self) -> Result<Redirect, RouteSchemaError> {
        let status = match self.status_code.map_or(302, |code| code.0) {
            code @ (301 | 302 | 303 | 307 | 308) => u16::try_from(code).unwrap_or(302),
            code => return Err(RouteSchemaError::RedirectStatus(code)),
        };
        Ok(Redirect {
            scheme: self.scheme.map(|scheme| {
                match scheme {
                    Scheme::Http => "http",
                    Scheme::Https => "https",
                }
                .to_owned()
            }),
            hostname: self.hostname.map(|h| h.0 .0),
            path: self.path.map(PathModifierFields::check).transpose()?,
            port: self.port.map(port).transpose()?,
            status,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RewriteFields {
    hostname: Option<Parsed<PreciseHostname>>,
    path: Option<PathModifierFields>,
}

impl RewriteFields {
    fn check(self) -> Result<Rewrite, RouteSchemaError> {
        Ok(Rewrite {
            hostname: self.hostname.map(|h| h.0 .0),
            path: self.path.map(PathModifierFields::check).transpose()?,
        })
    }
}

#[derive(Deserialize)]
enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PathModifierFields {
    #[serde(rename = "type")]
    kind: PathModifierType,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

impl PathModifierFields {
    fn check(self) -> Result<PathModifier, RouteSchemaError> {
        let (kind, field, value, other) = match self.kind {
            PathModifierType::ReplaceFullPath => (
                "ReplaceFullPath",
                "replaceFullPath",
                self.replace_full_path,
                self.replace_prefix_match,
            ),
            PathModifierType::ReplacePrefixMatch => (
                "ReplacePrefixMatch",
                "replacePrefixMatch",
                self.replace_prefix_match,
                self.replace_full_path,
            ),
        };
        if other.is_some() {
            let field = if field == "replaceFullPath" {
                "no replacePrefixMatch"
            } else {
                "no replaceFullPath"
            };
            return Err(RouteSchemaError::PathModifierField { kind, field });
        }
        let value = value.ok_or(RouteSchemaError::PathModifierField { kind, field })?;
        check_len(&value, 1024)?;
        Ok(match self.kind {
            PathModifierType::ReplaceFullPath => PathModifier::Full(value),
            PathModifierType::ReplacePrefixMatch => PathModifier::Prefix(value),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FractionFields {
    numerator: Int,
    denominator: Option<Int>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct MirrorFields {
    backend_ref: BackendTarget,
    percent: Option<Int>,
    fraction: Option<FractionFields>,
}

impl MirrorFields {
    fn check(self) -> Result<super::Mirror, RouteSchemaError> {
        let (numerator, denominator) = match (self.percent, self.fraction) {
            (Some(_), Some(_)) => return Err(RouteSchemaError::PercentAndFraction),
            (Some(Int(percent)), None) => match u32::try_from(percent) {
                Ok(percent) if percent <= 100 => (percent, 100),
                _ => return Err(RouteSchemaError::Percent(percent)),
            },
            (None, Some(fraction)) => {
                let numerator = fraction.numerator.0;
                let denominator = fraction.denominator.map_or(100, |d| d.0);
                match (u32::try_from(numerator), u32::try_from(denominator)) {
                    (Ok(n), Ok(d)) if d > 0 && n <= d => (n, d),
                    _ => {
                        return Err(RouteSchemaError::Fraction {
                            numerator,
                            denominator,
                        })
                    }
                }
            }
            (None, None) => (1, 1),
        };
        Ok(super::Mirror {
            backend: self.backend_ref,
            numerator,
            denominator,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetFields {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<Int>,
}

impl Checked for BackendTarget {
    type Error = RouteSchemaError;
    type Fields = TargetFields;
    const WHAT: &'static str = "a backend reference";

    fn check(f: TargetFields) -> Result<Self, RouteSchemaError> {
        let target = Self {
            group: f.group.unwrap_or_default(),
            kind: f.kind.unwrap_or_else(|| "Service".to_owned()),
            name: non_empty(f.name)?,
            namespace: f.namespace,
            port: f.port.map(port).transpose()?,
        };
        if (target.is_service() || target.is_hostname()) && target.port.is_none() {
            return Err(RouteSchemaError::ServiceWithoutPort);
        }
        Ok(target)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackendFields {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<Int>,
    weight: Option<Int>,
    #[serde(default)]
    filters: List<Filter>,
}

impl Checked for BackendRef {
    type Error = RouteSchemaError;
    type Fields = BackendFields;
    const WHAT: &'static str = "a backendRef";

    fn check(f: BackendFields) -> Result<Self, RouteSchemaError> {
        let target = BackendTarget::check(TargetFields {
            group: f.group,
            kind: f.kind,
            name: f.name,
            namespace: f.namespace,
            port: f.port,
        })?;
        let weight = match f.weight.map_or(1, |w| w.0) {
            w @ 0..=1_000_000 => u32::try_from(w).unwrap_or(1),
            w => return Err(RouteSchemaError::Weight(w)),
        };
        check_count(&f.filters.0, 16)?;
        if let Some(filter) = f.filters.0.iter().find(|filter| {
            !matches!(
                filter,
                Filter::RequestHeaderModifier(_) | Filter::ResponseHeaderModifier(_)
            )
        }) {
            // A backend's own filters: header modifiers (Gateway API's core support), nothing
            // that would be dropped unseen.
            return Err(RouteSchemaError::UnsupportedFilter(filter.kind()));
        }
        Ok(Self {
            target,
            weight,
            filters: f.filters.0,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TimeoutsFields {
    request: Option<Parsed<GatewayDuration>>,
    backend_request: Option<Parsed<GatewayDuration>>,
}

impl TimeoutsFields {
    fn check(self) -> Result<Timeouts, RouteSchemaError> {
        let nonzero =
            |d: Option<Parsed<GatewayDuration>>| d.map(|d| d.0 .0).filter(|d| !d.is_zero());
        let timeouts = Timeouts {
            request: nonzero(self.request),
            backend_request: nonzero(self.backend_request),
        };
        if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request) {
            if backend > request {
                return Err(RouteSchemaError::BackendLongerThanRequest { backend, request });
            }
        }
        Ok(timeouts)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RetryFields {
    codes: List<Int>,
    attempts: Option<Int>,
    backoff: Option<Parsed<GatewayDuration>>,
}

impl Checked for Retry {
    type Error = RouteSchemaError;
    type Fields = RetryFields;
    const WHAT: &'static str = "a retry";

    fn check(f: RetryFields) -> Result<Self, RouteSchemaError> {
        let codes = f
            .codes
            .0
            .into_iter()
            .map(|Int(code)| match code {
                400..=599 => Ok(u16::try_from(code).unwrap_or(500)),
                _ => Err(RouteSchemaError::RetryCode(code)),
            })
            .collect::<Result<_, _>>()?;
        let attempts = f
            .attempts
            .map(|Int(n)| u32::try_from(n).map_err(|_| RouteSchemaError::Attempts(n)))
            .transpose()?;
        Ok(Self {
            on: RetryOn {
                codes,
                connect_failure: true,
                reset: true,
                ..RetryOn::default()
            },
            attempts,
            backoff: f.backoff.map(|d| d.0 .0),
        })
    }
}

/// A duration as Gateway API writes it.
pub(crate) struct GatewayDuration(Duration);

impl FromStr for GatewayDuration {
    type Err = RouteSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        parse_duration(value).map(GatewayDuration)
    }
}

/// A route's `hostnames` entry: a DNS name, with an optional leading `*.` label.
pub(crate) struct Hostname(String);

impl FromStr for Hostname {
    type Err = RouteSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let name = value.strip_prefix("*.").unwrap_or(value);
        check_dns_name(value, name)?;
        Ok(Hostname(value.to_owned()))
    }
}

/// A redirect's or rewrite's hostname: a DNS name without wildcard.
pub(crate) struct PreciseHostname(String);

impl FromStr for PreciseHostname {
    type Err = RouteSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        check_dns_name(value, value)?;
        Ok(PreciseHostname(value.to_owned()))
    }
}

/// RFC 1123 subdomain rules for `name` (the part of `value` after a wildcard).
fn check_dns_name(value: &str, name: &str) -> Result<(), RouteSchemaError> {
    let bad = |why| Err(RouteSchemaError::Hostname(value.to_owned(), why));
    if value.len() > 253 {
        return bad(": longer than 253 characters");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return bad(": an IP address is not allowed");
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || !name.split('.').all(label_ok) {
        return bad(" (lowercase letters, digits, `-` and `.`, as in `shop.example.com`)");
    }
    Ok(())
}

/// A rule's `name`: a DNS label (Gateway API's `SectionName`).
fn check_section_name(name: &str) -> Result<(), RouteSchemaError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(RouteSchemaError::RuleName(name.to_owned()))
    }
}

fn non_empty(value: String) -> Result<String, RouteSchemaError> {
    if value.is_empty() {
        return Err(RouteSchemaError::Empty);
    }
    Ok(value)
}

fn port(Int(value): Int) -> Result<u16, RouteSchemaError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(RouteSchemaError::Port(value)),
    }
}

/// A `GRPCRoute` rule, read as an `HTTPRoute` rule.
pub(crate) struct GrpcRule(RouteRule);

/// A `GRPCRoute` match, read as an `HTTPRoute` match on the path.
pub(crate) struct GrpcMatch(RouteMatch);

checked!(GrpcRule, GrpcMatch);

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GrpcSpecFields {
    parent_refs: List<ParentRef>,
    hostnames: List<Parsed<Hostname>>,
    rules: List<GrpcRule>,
}

impl Checked for GrpcRouteSpec {
    type Error = RouteSchemaError;
    type Fields = GrpcSpecFields;
    const WHAT: &'static str = "a GRPCRoute spec";

    fn check(f: GrpcSpecFields) -> Result<Self, RouteSchemaError> {
        let spec = HttpRouteSpec::check(SpecFields {
            parent_refs: f.parent_refs,
            hostnames: f.hostnames,
            rules: List(f.rules.0.into_iter().map(|r| r.0).collect()),
        })?;
        Ok(GrpcRouteSpec(spec))
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct GrpcRuleFields {
    name: Option<String>,
    matches: List<GrpcMatch>,
    filters: List<Filter>,
    backend_refs: List<BackendRef>,
}

impl Checked for GrpcRule {
    type Error = RouteSchemaError;
    type Fields = GrpcRuleFields;
    const WHAT: &'static str = "a rule";

    fn check(f: GrpcRuleFields) -> Result<Self, RouteSchemaError> {
        if let Some(filter) = f.filters.0.iter().find(|filter| {
            matches!(
                filter,
                Filter::RequestRedirect(_) | Filter::UrlRewrite(_) | Filter::Cors(_)
            )
        }) {
            return Err(RouteSchemaError::NotGrpcFilter(filter.kind()));
        }
        let rule = RouteRule::check(RuleFields {
            name: f.name,
            matches: List(f.matches.0.into_iter().map(|m| m.0).collect()),
            filters: f.filters,
            backend_refs: f.backend_refs,
            timeouts: None,
            retry: None,
        })?;
        Ok(GrpcRule(rule))
    }
}

#[derive(Deserialize)]
enum MethodMatchType {
    Exact,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MethodFields {
    #[serde(rename = "type")]
    kind: Option<MethodMatchType>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct GrpcMatchFields {
    method: Option<MethodFields>,
    headers: List<ValueFields>,
}

impl Checked for GrpcMatch {
    type Error = RouteSchemaError;
    type Fields = GrpcMatchFields;
    const WHAT: &'static str = "a match";

    fn check(f: GrpcMatchFields) -> Result<Self, RouteSchemaError> {
        check_count(&f.headers.0, 16)?;
        let path = match f.method {
            None => PathMatch::Prefix("/".to_owned()),
            Some(m) => grpc_path(m)?,
        };
        Ok(GrpcMatch(RouteMatch {
            path,
            headers: f
                .headers
                .0
                .into_iter()
                .map(ValueFields::check)
                .collect::<Result<_, _>>()?,
            query_params: Vec::new(),
            method: None,
        }))
    }
}

/// A method match as a match on the path, `/<service>/<method>`.
fn grpc_path(m: MethodFields) -> Result<PathMatch, RouteSchemaError> {
    let ident = |s: &str| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match (
        m.kind.unwrap_or(MethodMatchType::Exact),
        m.service,
        m.method,
    ) {
        (_, None, None) => Err(RouteSchemaError::EmptyMethodMatch),
        (MethodMatchType::Exact, service, method) => {
            if let Some(s) = service.as_deref().filter(|s| !s.split('.').all(ident)) {
                return Err(RouteSchemaError::GrpcName(s.to_owned(), "service"));
            }
            if let Some(m) = method.as_deref().filter(|m| !ident(m)) {
                return Err(RouteSchemaError::GrpcName(m.to_owned(), "method"));
            }
            Ok(match (service, method) {
                (Some(service), Some(method)) => PathMatch::Exact(format!("/{service}/{method}")),
                (Some(service), None) => PathMatch::RawPrefix(format!("/{service}/")),
                (None, Some(method)) => {
                    PathMatch::Regex(format!("/[^/]+/{}", regex::escape(&method)).parse()?)
                }
                (None, None) => unreachable!("refused above"),
            })
        }
        (MethodMatchType::RegularExpression, service, method) => {
            // Each part is checked as a pattern of its own first, so its error names it.
            for part in service.iter().chain(method.iter()) {
                part.parse::<Pattern>()?;
            }
            let service = service.unwrap_or_else(|| "[^/]+".to_owned());
            let method = method.unwrap_or_else(|| "[^/]+".to_owned());
            Ok(PathMatch::Regex(
                format!("/(?:{service})/(?:{method})").parse()?,
            ))
        }
    }
}
