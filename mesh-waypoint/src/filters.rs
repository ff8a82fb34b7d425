//! What the `HTTPRoute` filters do to a request or a response: header modifiers, path
//! replacements (redirects and rewrites) and redirect locations, as Gateway API specifies them.

use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use mesh_cluster::k8s::{HeaderModifier, PathMatch, PathModifier, Redirect, RouteMatch};
use tracing::warn;

/// Applies `set`, `add` and `remove`, in that order.
pub(crate) fn modify_headers(headers: &mut HeaderMap, modifier: &HeaderModifier) {
    let pair = |name: &str, value: &str| {
        let parsed = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        );
        if let (Ok(name), Ok(value)) = parsed {
            Some((name, value))
        } else {
            // Names and values are checked when the route is read (`header_name`,
            // `header_value`): not expected.
            warn!(name, value, "header not set: not a valid HTTP header value");
            None
        }
    };
    for (name, value) in &modifier.set {
        if let Some((name, value)) = pair(name, value) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &modifier.add {
        if let Some((name, value)) = pair(name, value) {
            headers.append(name, value);
        }
    }
    for name in &modifier.remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
}

/// The path after `modifier`, for a request that `matched` (a `ReplacePrefixMatch` replaces what
/// the match's `PathPrefix` matched, on segment boundaries).
pub(crate) fn replace_path(path: &str, modifier: &PathModifier, matched: &RouteMatch) -> String {
    match modifier {
        PathModifier::Full(full) => full.clone(),
        PathModifier::Regex(rewrite) => rewrite.apply(path),
        // A `VirtualService`'s `rewrite.uri`: the matched prefix, else the whole path.
        PathModifier::Matched(replacement) => match &matched.path {
            PathMatch::RawPrefix(prefix) => {
                let rest = path.get(prefix.len()..).unwrap_or_default();
                format!("{replacement}{rest}")
            }
            PathMatch::Prefix(_) => {
                replace_path(path, &PathModifier::Prefix(replacement.clone()), matched)
            }
            PathMatch::Exact(_) | PathMatch::Regex(_) => replacement.clone(),
        },
        PathModifier::Prefix(replacement) => {
            let prefix = match &matched.path {
                PathMatch::Prefix(prefix) => prefix.trim_end_matches('/'),
                PathMatch::RawPrefix(prefix) => prefix.as_str(),
                // Parsing allows `ReplacePrefixMatch` only with one `PathPrefix` match.
                PathMatch::Exact(_) | PathMatch::Regex(_) => return path.to_owned(),
            };
            let rest = path.get(prefix.len()..).unwrap_or_default();
            let joined = format!("{}{rest}", replacement.trim_end_matches('/'));
            if joined.is_empty() {
                "/".to_owned()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

/// The request's authority: `:authority` (HTTP/2, or an absolute URI) or `Host` (HTTP/1.1).
pub(crate) fn request_authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// The request's host, without port: `:authority` (HTTP/2) or `Host` (HTTP/1.1).
pub(crate) fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let authority = request_authority(uri, headers)?.to_owned();
    let host = match authority.rsplit_once(':') {
        // An IPv6 literal keeps its brackets; only a trailing `:port` goes.
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host.to_owned()
        }
        _ => authority,
    };
    Some(host)
}

/// The `Location` and status of a redirect for a request to `service_port` with `uri` and
/// `headers`, that `matched`.
pub(crate) fn redirect_location(
    redirect: &Redirect,
    uri: &Uri,
    headers: &HeaderMap,
    matched: &RouteMatch,
    service_port: u16,
) -> (StatusCode, String) {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let host = redirect
        .hostname
        .clone()
        .or_else(|| request_host(uri, headers))
        .unwrap_or_default();
    // Gateway API: the given port; else the scheme's well-known port when the redirect names a
    // scheme; else the port the request came to. Well-known ports are left out.
    let port = redirect.port.unwrap_or(match redirect.scheme.as_deref() {
        Some("https") => 443,
        Some(_) => 80,
        None => service_port,
    });
    let default_port = matches!((scheme, port), ("http", 80) | ("https", 443));
    let path = match &redirect.path {
        Some(modifier) => replace_path(uri.path(), modifier, matched),
        None => uri.path().to_owned(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = if default_port {
        format!("{scheme}://{host}{path}{query}")
    } else {
        format!("{scheme}://{host}:{port}{path}{query}")
    };
    let status = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND);
    (status, location)
}

#[cfg(test)]
mod tests;
