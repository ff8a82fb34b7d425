//! Cross-origin resource sharing at the waypoint: a `VirtualService`'s `corsPolicy` and an
//! `HTTPRoute`'s `CORS` filter, read into one [`CorsPolicy`] and answered as Envoy's CORS filter
//! answers (the filter Istio's waypoints run):
//!
//! - a request without an `Origin` (or with an empty one) is not a CORS request: nothing changes;
//! - a **preflight** (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed
//!   origin is answered by the waypoint, 200 without a body, never forwarded:
//!   `Access-Control-Allow-Origin` (the request's origin), `-Allow-Credentials: true` when allowed,
//!   `-Allow-Methods` and `-Allow-Headers` (the lists, or what the request asks for when the list
//!   is `*`), `-Max-Age`, and `-Expose-Headers` (Gateway API asks for it on preflights too);
//! - a preflight from another origin is forwarded to the backend as any request
//!   (`unmatchedPreflights: FORWARD`, the default), or answered 200 without CORS headers
//!   (`IGNORE`), which the browser reads as a refusal;
//! - any other request from an allowed origin is forwarded and its answer (the backend's, or one
//!   the waypoint made) gets `Access-Control-Allow-Origin`, `-Allow-Credentials` and
//!   `-Expose-Headers`; from another origin, its answer is left as it is.
//!
//! An origin is allowed when any of the patterns matches it, or matches `*` (so `*` allows every
//! origin, and the answer still names the request's origin, as Envoy's does). The patterns are
//! the routes' own string matches ([`OriginMatch`]), so this module needs none of theirs.

/// A pattern an origin is matched against.
pub trait OriginMatch {
    /// Whether `origin` matches.
    fn matches(&self, origin: &str) -> bool;
}

/// A route's CORS policy, its origins matched by `M`.
#[derive(Clone, Debug, PartialEq)]
pub struct CorsPolicy<M> {
    /// The origins allowed (`scheme://host[:port]` as browsers send them).
    pub allow_origins: Vec<M>,
    /// `Access-Control-Allow-Methods`.
    pub allow_methods: Allowed,
    /// `Access-Control-Allow-Headers`.
    pub allow_headers: Allowed,
    /// `Access-Control-Expose-Headers`.
    pub expose_headers: Vec<String>,
    /// `Access-Control-Max-Age`, in seconds.
    pub max_age: Option<u64>,
    /// `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
    /// What a preflight from an origin not allowed gets.
    pub unmatched_preflights: UnmatchedPreflights,
}

/// A list of methods or headers a preflight's answer allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// These (none: the header is left out).
    Listed(Vec<String>),
    /// `*`: whatever the preflight asks for.
    Any,
}

impl Allowed {
    /// From a written list: `*` alone is [`Allowed::Any`].
    pub fn from_list(list: Vec<String>) -> Self {
        if list.len() == 1 && list[0] == "*" {
            Allowed::Any
        } else {
            Allowed::Listed(list)
        }
    }

    /// The header's value, for a preflight that asks for `asked`.
    fn value(&self, asked: Option<&str>) -> Option<String> {
        match self {
            Allowed::Listed(list) if list.is_empty() => None,
            Allowed::Listed(list) => Some(list.join(",")),
            Allowed::Any => asked.filter(|a| !a.is_empty()).map(str::to_owned),
        }
    }
}

/// Istio's `unmatchedPreflights`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnmatchedPreflights {
    /// Forwarded to the backend as any request (the default).
    #[default]
    Forward,
    /// Answered 200 by the waypoint, without CORS headers.
    Ignore,
}

/// What a request's CORS headers ask.
#[derive(Clone, Copy, Debug)]
pub struct CorsRequest<'a> {
    /// `Origin`.
    pub origin: Option<&'a str>,
    /// Whether the method is `OPTIONS`.
    pub options: bool,
    /// `Access-Control-Request-Method`.
    pub request_method: Option<&'a str>,
    /// `Access-Control-Request-Headers`.
    pub request_headers: Option<&'a str>,
}

/// What the waypoint does with a request under a [`CorsPolicy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsStep {
    /// Not a CORS request, or one from an origin not allowed: forwarded, its answer unchanged.
    Pass,
    /// A preflight the waypoint answers, 200 with these headers (none: an origin not allowed).
    Answer(Vec<(&'static str, String)>),
    /// Forwarded; its answer gets these headers.
    Forward(Vec<(&'static str, String)>),
}

impl<M: OriginMatch> CorsPolicy<M> {
    /// Whether `origin` is allowed.
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    /// What to do with `request`.
    pub fn step(&self, request: &CorsRequest<'_>) -> CorsStep {
        let Some(origin) = request.origin.filter(|o| !o.is_empty()) else {
            return CorsStep::Pass;
        };
        let allowed = self.allows(origin);
        let preflight = request.options
            && request
                .request_method
                .is_some_and(|method| !method.is_empty());
        if !preflight {
            return if allowed {
                CorsStep::Forward(self.response_headers(origin))
            } else {
                CorsStep::Pass
            };
        }
        if !allowed {
            return match self.unmatched_preflights {
                UnmatchedPreflights::Forward => CorsStep::Pass,
                UnmatchedPreflights::Ignore => CorsStep::Answer(Vec::new()),
            };
        }
        let mut headers = self.response_headers(origin);
        if let Some(methods) = self.allow_methods.value(request.request_method) {
            headers.push(("access-control-allow-methods", methods));
        }
        if let Some(allowed) = self.allow_headers.value(request.request_headers) {
            headers.push(("access-control-allow-headers", allowed));
        }
        if let Some(age) = self.max_age {
            headers.push(("access-control-max-age", age.to_string()));
        }
        CorsStep::Answer(headers)
    }

    /// The headers of any answer to an allowed origin.
    fn response_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        let mut headers = vec![("access-control-allow-origin", origin.to_owned())];
        if self.allow_credentials {
            headers.push(("access-control-allow-credentials", "true".to_owned()));
        }
        if !self.expose_headers.is_empty() {
            headers.push((
                "access-control-expose-headers",
                self.expose_headers.join(","),
            ));
        }
        headers
    }
}

#[cfg(test)]
mod tests;
