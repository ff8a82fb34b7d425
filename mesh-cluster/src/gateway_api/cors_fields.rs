//! The `CORS` filter of an `HTTPRoute` as written (Gateway API's `HTTPCORSFilter`), and the
//! checks a `VirtualService`'s `corsPolicy` shares: origins, methods and header names that may
//! stand in the answers' headers.

use std::str::FromStr;

use serde::Deserialize;

use super::{check_count, header_name, Pattern, RouteCors, RouteSchemaError, StringMatch};
use crate::cors::{Allowed, CorsPolicy, UnmatchedPreflights};

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CorsFilterFields {
    allow_origins: super::List<String>,
    allow_credentials: Option<bool>,
    allow_methods: super::List<String>,
    allow_headers: super::List<String>,
    expose_headers: super::List<String>,
    max_age: Option<i64>,
}

impl CorsFilterFields {
    pub(crate) fn check(self) -> Result<RouteCors, RouteSchemaError> {
        check_count(&self.allow_origins.0, 64)?;
        let allow_origins = self
            .allow_origins
            .0
            .iter()
            .map(|o| origin(o))
            .collect::<Result<_, _>>()?;
        let max_age = match self.max_age {
            // Gateway API's default.
            None => 5,
            Some(age @ 1..=2_147_483_647) => age.unsigned_abs(),
            Some(age) => {
                return Err(RouteSchemaError::Count {
                    field: "maxAge",
                    value: age,
                })
            }
        };
        Ok(CorsPolicy {
            allow_origins,
            allow_methods: methods(self.allow_methods.0)?,
            allow_headers: header_names(self.allow_headers.0, true)?,
            expose_headers: match header_names(self.expose_headers.0, true)? {
                Allowed::Any => vec!["*".to_owned()],
                Allowed::Listed(list) => list,
            },
            max_age: Some(max_age),
            allow_credentials: self.allow_credentials.unwrap_or(false),
            unmatched_preflights: UnmatchedPreflights::Forward,
        })
    }
}

/// A Gateway API origin: `*`, or `http(s)://host[:port]` whose host may be `*` or start with
/// `*.` (one or more labels, as the conformance suite reads it).
pub(crate) fn origin(text: &str) -> Result<StringMatch, RouteSchemaError> {
    let bad = || RouteSchemaError::Origin(text.to_owned());
    if text == "*" {
        return Ok(StringMatch::Exact("*".to_owned()));
    }
    let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
    if !matches!(scheme, "http" | "https") {
        return Err(bad());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err(bad());
    }
    let (wild, name) = match host {
        "*" => (true, ""),
        _ => match host.strip_prefix("*.") {
            Some(name) => (true, name),
            None => (false, host),
        },
    };
    let label =
        |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !name.is_empty() && !name.split('.').all(label) || (!wild && name.is_empty()) {
        return Err(bad());
    }
    if !wild {
        return Ok(StringMatch::Exact(text.to_owned()));
    }
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let name = if name.is_empty() {
        String::new()
    } else {
        format!("\\.{}", regex::escape(name))
    };
    let pattern = format!(
        "{scheme}://[A-Za-z0-9-]+(?:\\.[A-Za-z0-9-]+)*{name}{}",
        regex::escape(&port)
    );
    Pattern::from_str(&pattern).map(StringMatch::Regex)
}

/// Methods: `*` alone, or method names (tokens).
pub(crate) fn methods(list: Vec<String>) -> Result<Allowed, RouteSchemaError> {
    check_count(&list, 9)?;
    let allowed = Allowed::from_list(list);
    if let Allowed::Listed(list) = &allowed {
        for method in list {
            if http::Method::from_str(method).is_err() || method == "*" {
                return Err(RouteSchemaError::Method(method.clone()));
            }
        }
    }
    Ok(allowed)
}

/// Header names (tokens), or `*` alone when `wildcard`.
pub(crate) fn header_names(list: Vec<String>, wildcard: bool) -> Result<Allowed, RouteSchemaError> {
    check_count(&list, 64)?;
    let allowed = Allowed::from_list(list);
    match allowed {
        Allowed::Any if wildcard => Ok(Allowed::Any),
        Allowed::Any => Err(RouteSchemaError::HeaderName("*".to_owned())),
        Allowed::Listed(list) => list
            .into_iter()
            .map(header_name)
            .collect::<Result<_, _>>()
            .map(Allowed::Listed),
    }
}
