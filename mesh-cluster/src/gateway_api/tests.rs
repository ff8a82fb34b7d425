//! Tests of `HTTPRoute` parsing: every field, the defaults, and each schema rule's error naming
//! the field path and the line.

use std::time::Duration;

use super::{
    parse_duration, BackendTarget, Filter, HttpRoute, PathMatch, PathModifier, StringMatch,
};
use crate::k8s::{parse_documents, Object};

/// The document of route `shop/r` with `body` as its spec; the spec's fields start at line 7.
fn doc(body: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  namespace: shop\nspec:\n{body}"
    )
}

fn parse_one(text: &str) -> HttpRoute {
    let objects = parse_documents("route.yaml", text).expect("parses");
    match objects.as_slice() {
        [Object::HttpRoute(route)] => route.clone(),
        other => panic!("expected one HTTPRoute, got {other:?}"),
    }
}

#[test]
#[allow(clippy::too_many_lines)] // One route with every field, checked field by field.
fn parses_every_field() {
    let route = parse_one(&doc(r#"  parentRefs:
  - {group: "", kind: Service, name: web, port: 8080}
  - name: gw
  hostnames: ["web.shop.svc.cluster.local", "*.example.com"]
  rules:
  - name: canary
    matches:
    - path: {type: Exact, value: /login}
      method: POST
    - path: {type: RegularExpression, value: "/api/v[0-9]+/.*"}
      headers:
      - {name: x-user, value: alice}
      - {type: RegularExpression, name: X-Env, value: "dev|test"}
      queryParams:
      - {name: debug, value: "1"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-a, value: "1"}]
        add: [{name: x-b, value: "2"}]
        remove: [x-c]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [server]}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow, port: 80}
        percent: 25
    - type: URLRewrite
      urlRewrite: {hostname: v2.shop, path: {type: ReplaceFullPath, replaceFullPath: /new}}
    backendRefs:
    - {name: web-v1, port: 80, weight: 90}
    - name: web-v2
      port: 80
      weight: 10
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-canary, value: "yes"}]}
    timeouts: {request: 10s, backendRequest: 1s500ms}
    retry: {codes: [503, 502], attempts: 3, backoff: 100ms}
  - matches:
    - path: {type: PathPrefix, value: /old/}
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: example.com
        port: 8443
        statusCode: 301
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
"#));
    let spec = &route.spec;
    assert_eq!(spec.parent_refs.len(), 2);
    assert!(spec.parent_refs[0].is_service());
    assert_eq!(spec.parent_refs[0].port, Some(8080));
    assert!(
        !spec.parent_refs[1].is_service(),
        "group and kind default to a Gateway"
    );
    assert_eq!(spec.hostnames.len(), 2);
    let rule = &spec.rules[0];
    assert_eq!(rule.name.as_deref(), Some("canary"));
    assert_eq!(rule.matches[0].path, PathMatch::Exact("/login".into()));
    assert_eq!(rule.matches[0].method, Some(http::Method::POST));
    assert!(matches!(&rule.matches[1].path, PathMatch::Regex(p) if p.is_match("/api/v2/x")));
    assert!(matches!(&rule.matches[1].path, PathMatch::Regex(p) if !p.is_match("/x/api/v2/x")));
    assert!(
        matches!(&rule.matches[1].headers[1].value, StringMatch::Regex(p) if p.is_match("dev"))
    );
    assert_eq!(rule.matches[1].query_params[0].name, "debug");
    assert_eq!(rule.filters.len(), 4);
    match &rule.filters[0] {
        Filter::RequestHeaderModifier(m) => {
            assert_eq!(m.set, vec![("x-a".to_owned(), "1".to_owned())]);
            assert_eq!(m.add, vec![("x-b".to_owned(), "2".to_owned())]);
            assert_eq!(m.remove, vec!["x-c".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    match &rule.filters[2] {
        Filter::RequestMirror(m) => {
            assert_eq!((m.numerator, m.denominator), (25, 100));
            assert_eq!(m.backend.name, "shadow");
            assert!(m.backend.is_service());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rule.backend_refs[0].weight, 90);
    assert_eq!(rule.backend_refs[1].filters.len(), 1);
    assert_eq!(rule.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(
        rule.timeouts.backend_request,
        Some(Duration::from_millis(1500))
    );
    let retry = rule.retry.as_ref().expect("retry");
    assert_eq!(
        (retry.on.codes.clone(), retry.attempts),
        (vec![503, 502], Some(3))
    );
    assert!(retry.on.connect_failure && retry.on.reset && !retry.on.server_errors);
    assert_eq!(retry.backoff, Some(Duration::from_millis(100)));
    match &spec.rules[1].filters[0] {
        Filter::RequestRedirect(r) => {
            assert_eq!(r.status, 301);
            assert_eq!(r.scheme.as_deref(), Some("https"));
            assert_eq!(r.port, Some(8443));
            assert_eq!(r.path, Some(PathModifier::Prefix("/new".into())));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn defaults() {
    let route = parse_one(&doc(
        "  parentRefs: [{kind: Service, group: \"\", name: web}]\n  rules:\n  - backendRefs: [{name: web, port: 80}]\n  - matches: [{headers: [{name: a, value: b}]}]\n",
    ));
    let rules = &route.spec.rules;
    assert_eq!(rules[0].matches.len(), 1, "no matches: one PathPrefix /");
    assert_eq!(rules[0].matches[0].path, PathMatch::Prefix("/".into()));
    assert_eq!(rules[0].backend_refs[0].weight, 1);
    assert_eq!(
        rules[0].backend_refs[0].target,
        BackendTarget {
            group: String::new(),
            kind: "Service".into(),
            name: "web".into(),
            namespace: None,
            port: Some(80),
        }
    );
    assert_eq!(rules[1].matches[0].path, PathMatch::Prefix("/".into()));
    assert!(rules[0].timeouts.request.is_none() && rules[0].retry.is_none());
    // A zero timeout is no timeout; v1beta1 reads the same.
    let text = doc("  rules:\n  - timeouts: {request: 0s}\n").replace(
        "gateway.networking.k8s.io/v1",
        "gateway.networking.k8s.io/v1beta1",
    );
    assert_eq!(parse_one(&text).spec.rules[0].timeouts.request, None);
    // A redirect without a status code is a 302.
    let route = parse_one(&doc(
        "  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {hostname: a.b}}]\n",
    ));
    assert!(
        matches!(&route.spec.rules[0].filters[0], Filter::RequestRedirect(r) if r.status == 302)
    );
}

#[test]
fn cors_and_backend_filter_errors_name_field_and_line() {
    assert_parse_errors(&[
        ("  rules:\n  - filters: [{type: CORS, cors: {allowOrigins: [\"https://*.a.com/x\"]}}]\n", &["spec.rules[0].filters[0]: \"https://*.a.com/x\" is not a CORS origin", "line 8"]),
        ("  rules:\n  - filters: [{type: CORS, cors: {allowOrigins: [\"ftp://a.com\"]}}]\n", &["\"ftp://a.com\" is not a CORS origin"]),
        ("  rules:\n  - filters: [{type: CORS, cors: {allowMethods: [GET, \"*\"]}}]\n", &["\"*\" is not an HTTP method"]),
        ("  rules:\n  - filters: [{type: CORS, cors: {allowHeaders: [\"x a\"]}}]\n", &["\"x a\" is not an HTTP header"]),
        ("  rules:\n  - filters: [{type: CORS, cors: {maxAge: 0}}]\n", &["maxAge must not be negative or over"]),
        ("  rules:\n  - filters: [{type: CORS, cors: {}}, {type: CORS, cors: {}}]\n", &["a rule has at most one CORS filter"]),
        ("  rules:\n  - backendRefs: [{name: web, port: 80, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: b, port: 80}}}]}]\n", &["filter type RequestMirror is not supported"]),
    ]);
}

#[test]
fn cors_filters_read_as_gateway_api_writes_them() {
    let route = parse_one(&doc(
        "  rules:\n  - filters:\n    - type: CORS\n      cors:\n        allowOrigins: [\"https://www.foo.com\", \"https://*.bar.com\", \"http://*:8080\"]\n        allowMethods: [GET, OPTIONS]\n        allowHeaders: [x-header-1]\n        exposeHeaders: [x-header-3]\n        allowCredentials: true\n",
    ));
    let Filter::Cors(cors) = &route.spec.rules[0].filters[0] else {
        panic!("{route:?}");
    };
    for (origin, allowed) in [
        ("https://www.foo.com", true),
        ("https://www.bar.com", true),
        ("https://xpto.www.bar.com", true),
        ("http://a.example:8080", true),
        ("https://bar.com", false),
        ("https://www.bar.com.evil", false),
        ("https://evil-bar.com", false),
        ("http://www.bar.com", false),
        ("http://a.example", false),
        ("https://www.foo.com:443", false),
    ] {
        assert_eq!(cors.allows(origin), allowed, "{origin}");
    }
    assert_eq!(cors.max_age, Some(5), "Gateway API's default");
    assert!(cors.allow_credentials);
    // `*` alone allows any origin.
    let any = parse_one(&doc(
        "  rules:\n  - filters: [{type: CORS, cors: {allowOrigins: [\"*\"], allowMethods: [\"*\"], maxAge: 600}}]\n",
    ));
    let Filter::Cors(any) = &any.spec.rules[0].filters[0] else {
        panic!("{any:?}");
    };
    assert!(any.allows("https://anything.example:1234"));
    assert_eq!(any.allow_methods, crate::cors::Allowed::Any);
    assert_eq!(any.max_age, Some(600));
}

#[test]
fn durations() {
    assert_eq!(
        parse_duration("1h2m3s4ms").ok(),
        Some(Duration::from_millis(3_723_004))
    );
    assert_eq!(
        parse_duration("99999ms").ok(),
        Some(Duration::from_millis(99_999))
    );
    assert_eq!(parse_duration("0s").ok(), Some(Duration::ZERO));
    for bad in [
        "",
        "1",
        "s",
        "1d",
        "100000s",
        "1.5s",
        "-1s",
        "1s1s1s1s1s",
        " 1s",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} must not parse");
    }
}

/// Parses the spec `body` and asserts that the error names the file, document and route, and
/// contains each of the expected parts.
fn assert_parse_errors(table: &[(&str, &[&str])]) {
    for (body, expected) in table {
        let text = doc(body);
        let err = parse_documents("route.yaml", &text)
            .expect_err("must not parse")
            .to_string();
        let prefix = "route.yaml: document 1: HTTPRoute shop/r: ";
        assert!(err.starts_with(prefix), "error {err:?} lacks {prefix:?}");
        for part in *expected {
            assert!(
                err.contains(part),
                "error {err:?} lacks {part:?}, for:\n{text}"
            );
        }
    }
}

#[test]
fn at_most_64_regular_expressions_per_route() {
    let headers = |n: usize| -> String {
        let list: Vec<String> = (0..n)
            .map(|i| format!("{{type: RegularExpression, name: h{i}, value: \"v{i}.*\"}}"))
            .collect();
        format!("    - headers: [{}]\n", list.join(", "))
    };
    // Four matches of 16 header patterns: 64, accepted.
    let route = |last: usize| {
        doc(&format!(
            "  rules:\n  - matches:\n{}{}{}{}",
            headers(16),
            headers(16),
            headers(16),
            headers(last)
        ))
    };
    let objects = parse_documents("route.yaml", &route(16)).expect("64 patterns parse");
    assert_eq!(objects.len(), 1);
    // One more, in a path: refused, naming the count.
    let more = route(16).replace(
        "  - matches:\n",
        "  - matches:\n    - path: {type: RegularExpression, value: \"/a.*\"}\n",
    );
    let err = parse_documents("route.yaml", &more)
        .expect_err("65 patterns must not parse")
        .to_string();
    assert!(
        err.contains("HTTPRoute shop/r: spec")
            && err.contains("at most 64 regular expressions across all rules, found 65"),
        "{err}"
    );
}

#[test]
fn schema_errors_name_field_and_line() {
    assert_parse_errors(&[
        ("  rules:\n  - backendRef: [{name: a, port: 1}]\n", &["spec.rules[0]: unknown field `backendRef`", "line 8"]),
        ("  rules:\n  - sessionPersistence: {}\n", &["unknown field `sessionPersistence`"]),
        ("  parentRefs: [{kind: Service}]\n", &["spec.parentRefs[0]: missing field `name`", "line 7"]),
        ("  parentRefs: [{kind: Service, name: a, port: 0}]\n", &["spec.parentRefs[0]", "0 is not a port number"]),
        (
            "  rules:\n  - matches:\n    - path: {type: PathPrefix, value: foo}\n",
            &["spec.rules[0].matches[0]: path \"foo\" does not start with `/`", "line 9"],
        ),
        ("  rules:\n  - matches: [{path: {value: /a//b}}]\n", &["contains `//`"]),
        ("  rules:\n  - matches: [{path: {value: /a/..}}]\n", &["ends with `/.` or `/..`"]),
        ("  rules:\n  - matches: [{path: {type: Prefix, value: /}}]\n", &["unknown variant `Prefix`"]),
        (
            "  rules:\n  - matches: [{path: {type: RegularExpression, value: \"/(a\"}}]\n",
            &["\"/(a\" is not a regular expression: unclosed group at line"],
        ),
        (
            // Nine characters that compile to about 10 MiB: refused, not built.
            "  rules:\n  - matches: [{headers: [{type: RegularExpression, name: x, value: \"\\\\w{1,200}\"}]}]\n",
            &["spec.rules[0].matches[0]", "exceeds size limit"],
        ),
        ("  rules:\n  - matches: [{headers: [{name: \"a b\", value: c}]}]\n", &["\"a b\" is not an HTTP header"]),
        ("  rules:\n  - matches: [{method: FETCH}]\n", &["unknown variant `FETCH`"]),
        (
            "  rules:\n  - filters: [{type: RequestHeaderModifier}]\n",
            &["spec.rules[0].filters[0]: type RequestHeaderModifier needs the field `requestHeaderModifier`"],
        ),
        (
            "  rules:\n  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 1}}, urlRewrite: {}}]\n",
            &["field `urlRewrite` does not go with type RequestMirror"],
        ),
        ("  rules:\n  - filters: [{type: ExtensionRef, extensionRef: {group: a, kind: b, name: c}}]\n", &["filter type ExtensionRef is not supported"]),
        (
            "  rules:\n  - filters:\n    - {type: RequestRedirect, requestRedirect: {hostname: a.b}}\n    - {type: URLRewrite, urlRewrite: {hostname: c.d}}\n",
            &["spec.rules[0]: a rule cannot have both a RequestRedirect and a URLRewrite filter"],
        ),
        (
            "  rules:\n  - filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [a]}}\n    - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [b]}}\n",
            &["at most one RequestHeaderModifier filter"],
        ),
        (
            "  rules:\n  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n",
            &["replacePrefixMatch needs the rule to have exactly one match, of type PathPrefix"],
        ),
        (
            "  rules:\n  - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}]\n",
            &["type ReplaceFullPath needs `replaceFullPath`"],
        ),
        ("  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 300}}]\n", &["300 is not a redirect status"]),
        ("  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]\n", &["unknown variant `ftp`"]),
        ("  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {hostname: \"*.a\"}}]\n", &["\"*.a\" is not a hostname"]),
        (
            "  rules:\n  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: A, value: x}, {name: a, value: y}]}}]\n",
            &["header \"a\" is listed twice"],
        ),
        (
            "  rules:\n  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 1}, percent: 101}}]\n",
            &["percent 101 is out of range"],
        ),
        (
            "  rules:\n  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 1}, percent: 1, fraction: {numerator: 1}}}]\n",
            &["`percent` and `fraction` cannot both be set"],
        ),
        (
            "  rules:\n  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 1}, fraction: {numerator: 3, denominator: 2}}}]\n",
            &["fraction 3/2"],
        ),
        ("  rules:\n  - backendRefs: [{name: a}]\n", &["spec.rules[0].backendRefs[0]: a backend of kind Service needs a `port`", "line 8"]),
        ("  rules:\n  - backendRefs: [{name: a, port: 1, weight: 1000001}]\n", &["weight 1000001 is out of range"]),
        (
            "  rules:\n  - backendRefs: [{name: a, port: 1, filters: [{type: URLRewrite, urlRewrite: {hostname: a.b}}]}]\n",
            &["filter type URLRewrite is not supported"],
        ),
        ("  rules:\n  - timeouts: {request: 1d}\n", &["spec.rules[0].timeouts.request", "\"1d\" is not a duration"]),
        ("  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}\n", &["backendRequest (2s) is longer than request (1s)"]),
        ("  rules:\n  - retry: {codes: [200]}\n", &["200 is not an HTTP error status"]),
        ("  rules:\n  - retry: {attempts: -1}\n", &["retry attempts -1 is negative"]),
        ("  rules:\n  - name: a\n  - name: a\n", &["rule name \"a\" is used by more than one rule"]),
        ("  rules:\n  - name: A_b\n", &["rule name \"A_b\" is not a DNS label"]),
        ("  hostnames: [\"10.0.0.1\"]\n", &["an IP address is not allowed"]),
        ("  rules: null\n  parentRefs: [null]\n", &["must not be null: expected a parentRef"]),
    ]);
    let many_rules = "  rules:\n".to_owned() + &"  - {}\n".repeat(17);
    assert_parse_errors(&[(&many_rules, &["spec: at most 16 entries, found 17"])]);
    let many_matches = format!(
        "  rules:\n{}",
        format!("  - matches: [{}]\n", vec!["{}"; 64].join(", ")).repeat(3)
    );
    assert_parse_errors(&[(
        &many_matches,
        &["at most 128 matches across all rules, found 192"],
    )]);
    // `spec` is required.
    let err = parse_documents(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n",
    )
    .expect_err("no spec")
    .to_string();
    assert!(err.contains("missing field `spec`"), "{err}");
}

#[test]
fn grpc_routes_read_as_path_matches() {
    let text = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: grpc}]\n  rules:\n  - matches:\n    - method: {service: grpc.health.v1.Health, method: Watch}\n    - method: {service: pkg.Svc}\n      headers: [{name: x-v, value: \"2\"}]\n    - method: {method: Check}\n    - method: {type: RegularExpression, service: \"pkg\\\\..*\"}\n    backendRefs: [{name: grpc, port: 7070}]\n  - {}\n";
    let objects = parse_documents("grpc.yaml", text).expect("parses");
    let [Object::GrpcRoute(route)] = objects.as_slice() else {
        panic!("{objects:?}");
    };
    let rules = &route.spec.0.rules;
    let paths: Vec<&PathMatch> = rules[0].matches.iter().map(|m| &m.path).collect();
    assert_eq!(
        paths[0],
        &PathMatch::Exact("/grpc.health.v1.Health/Watch".into())
    );
    assert_eq!(paths[1], &PathMatch::RawPrefix("/pkg.Svc/".into()));
    assert!(
        matches!(paths[2], PathMatch::Regex(p) if p.is_match("/a.B/Check") && !p.is_match("/a.B/Checks"))
    );
    assert!(
        matches!(paths[3], PathMatch::Regex(p) if p.is_match("/pkg.X/Y") && !p.is_match("/other.X/Y"))
    );
    assert_eq!(rules[0].matches[1].headers[0].name, "x-v");
    assert_eq!(
        rules[1].matches[0].path,
        PathMatch::Prefix("/".into()),
        "no match: every call"
    );
    let bad = |rule: &str| {
        let doc = text.replace(
            "  rules:\n  - matches:",
            &format!("  rules:\n{rule}\n  - matches:"),
        );
        parse_documents("grpc.yaml", &doc)
            .expect_err("refused")
            .to_string()
    };
    assert!(bad("  - matches: [{method: {}}]")
        .contains("spec.rules[0].matches[0]: a method match names a service, a method or both"));
    assert!(bad("  - matches: [{method: {service: \"a..b\"}}]")
        .contains("\"a..b\" is not a gRPC service name"));
    assert!(
        bad("  - filters: [{type: URLRewrite, urlRewrite: {hostname: a.b}}]")
            .contains("filter type URLRewrite is not a GRPCRoute filter")
    );
    assert!(bad("  - matches: [{path: {value: /}}]").contains("unknown field `path`"));
}

#[test]
fn retries_back_off_exponentially_with_jitter_from_the_base() {
    use super::{Retry, DEFAULT_RETRY_BACKOFF};
    let ms = Duration::from_millis;
    let default = Retry::default();
    assert_eq!(DEFAULT_RETRY_BACKOFF, ms(25), "Envoy's base");
    // The first retry waits between the base and twice it, the second up to four times, ...
    assert_eq!(
        (default.wait(1, 0.0), default.wait(1, 1.0)),
        (ms(25), ms(50))
    );
    assert_eq!(default.wait(2, 1.0), ms(100));
    assert_eq!(default.wait(3, 0.5), ms(25) + ms(175) / 2);
    // ... never longer than ten times the base, however many retries.
    assert_eq!(
        (default.wait(4, 1.0), default.wait(1_000, 1.0)),
        (ms(250), ms(250))
    );
    // A route's `backoff` is the base: never a shorter wait (Gateway API's minimum).
    let route = Retry {
        backoff: Some(ms(100)),
        ..Retry::default()
    };
    assert_eq!(
        (route.wait(1, 0.0), route.wait(9, 0.99)),
        (ms(100), ms(100) + ms(900).mul_f64(0.99))
    );
}

#[test]
fn header_modifier_values_are_checked_when_read() {
    let route = |filter: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  rules:\n  - filters: [{filter}]\n"
        )
    };
    let err = parse_documents(
        "r.yaml",
        &route("{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: \"a\\u0000b\"}]}}"),
    )
    .expect_err("a NUL in a header value")
    .to_string();
    assert!(
        err.contains("spec.rules[0].filters[0].requestHeaderModifier")
            && err.contains("the value of header \"x-a\" holds a control character")
            && err.contains("line 6"),
        "{err}"
    );
    // Tabs and bytes past ASCII are allowed.
    parse_documents(
        "r.yaml",
        &route("{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-b, value: \"a\\tcafé\"}]}}"),
    )
    .expect("a tab and UTF-8");
}
