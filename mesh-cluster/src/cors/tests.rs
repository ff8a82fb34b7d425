//! Tests of the CORS decisions, against Envoy's CORS filter and Gateway API's conformance cases.

use super::{Allowed, CorsPolicy, CorsRequest, CorsStep, OriginMatch, UnmatchedPreflights};

/// An origin written out, or `https://*.<domain>`: any name under the domain.
#[derive(Debug)]
struct Origin(&'static str);

impl OriginMatch for Origin {
    fn matches(&self, origin: &str) -> bool {
        match self.0.strip_prefix("https://*.") {
            Some(domain) => origin
                .strip_prefix("https://")
                .and_then(|host| host.strip_suffix(domain))
                .is_some_and(|name| name.len() > 1 && name.ends_with('.')),
            None => origin == self.0,
        }
    }
}

fn policy() -> CorsPolicy<Origin> {
    CorsPolicy {
        allow_origins: vec![Origin("https://www.foo.com"), Origin("https://*.bar.com")],
        allow_methods: Allowed::from_list(vec!["GET".into(), "OPTIONS".into()]),
        allow_headers: Allowed::from_list(vec!["x-header-1".into(), "x-header-2".into()]),
        expose_headers: vec!["x-header-3".into(), "x-header-4".into()],
        max_age: Some(3600),
        allow_credentials: true,
        unmatched_preflights: UnmatchedPreflights::Forward,
    }
}

fn preflight<'a>(origin: &'a str, method: &'a str, headers: Option<&'a str>) -> CorsRequest<'a> {
    CorsRequest {
        origin: Some(origin),
        options: true,
        request_method: Some(method),
        request_headers: headers,
    }
}

fn simple(origin: Option<&str>) -> CorsRequest<'_> {
    CorsRequest {
        origin,
        options: false,
        request_method: None,
        request_headers: None,
    }
}

fn answer(headers: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

#[test]
fn a_preflight_from_an_allowed_origin_is_answered_with_the_policy() {
    let policy = policy();
    for origin in [
        "https://www.foo.com",
        "https://www.bar.com",
        "https://xpto.www.bar.com",
    ] {
        assert_eq!(
            policy.step(&preflight(origin, "GET", Some("x-header-1, x-header-2"))),
            CorsStep::Answer(answer(&[
                ("access-control-allow-origin", origin),
                ("access-control-allow-credentials", "true"),
                ("access-control-expose-headers", "x-header-3,x-header-4"),
                ("access-control-allow-methods", "GET,OPTIONS"),
                ("access-control-allow-headers", "x-header-1,x-header-2"),
                ("access-control-max-age", "3600"),
            ])),
            "{origin}"
        );
    }
}

#[test]
fn another_origin_gets_no_cors_headers_and_its_preflight_is_forwarded_or_answered_bare() {
    let mut policy = policy();
    for origin in [
        "https://foobar.com",
        "https://bar.com",
        "http://www.foo.com",
    ] {
        assert_eq!(policy.step(&preflight(origin, "GET", None)), CorsStep::Pass);
        assert_eq!(policy.step(&simple(Some(origin))), CorsStep::Pass);
    }
    policy.unmatched_preflights = UnmatchedPreflights::Ignore;
    assert_eq!(
        policy.step(&preflight("https://foobar.com", "GET", None)),
        CorsStep::Answer(Vec::new())
    );
    assert_eq!(
        policy.step(&simple(Some("https://foobar.com"))),
        CorsStep::Pass
    );
}

#[test]
fn an_allowed_origins_request_is_forwarded_and_its_answer_marked() {
    let policy = policy();
    assert_eq!(
        policy.step(&simple(Some("https://www.foo.com"))),
        CorsStep::Forward(answer(&[
            ("access-control-allow-origin", "https://www.foo.com"),
            ("access-control-allow-credentials", "true"),
            ("access-control-expose-headers", "x-header-3,x-header-4"),
        ]))
    );
    // An OPTIONS without `Access-Control-Request-Method` is not a preflight.
    let options = CorsRequest {
        options: true,
        ..simple(Some("https://www.foo.com"))
    };
    assert!(matches!(policy.step(&options), CorsStep::Forward(_)));
    // No origin, or an empty one: not a CORS request.
    assert_eq!(policy.step(&simple(None)), CorsStep::Pass);
    assert_eq!(policy.step(&simple(Some(""))), CorsStep::Pass);
}

#[test]
fn wildcards_allow_any_origin_method_and_header() {
    let policy = CorsPolicy {
        allow_origins: vec![Origin("*")],
        allow_methods: Allowed::from_list(vec!["*".into()]),
        allow_headers: Allowed::from_list(vec!["*".into()]),
        expose_headers: Vec::new(),
        max_age: None,
        allow_credentials: false,
        unmatched_preflights: UnmatchedPreflights::Forward,
    };
    assert_eq!(
        policy.step(&preflight("https://foobar.com:8443", "POST", Some("x-a"))),
        CorsStep::Answer(answer(&[
            ("access-control-allow-origin", "https://foobar.com:8443"),
            ("access-control-allow-methods", "POST"),
            ("access-control-allow-headers", "x-a"),
        ]))
    );
    // Nothing asked for, nothing allowed by name.
    assert_eq!(
        policy.step(&preflight("https://a.example", "PUT", None)),
        CorsStep::Answer(answer(&[
            ("access-control-allow-origin", "https://a.example"),
            ("access-control-allow-methods", "PUT"),
        ]))
    );
}
