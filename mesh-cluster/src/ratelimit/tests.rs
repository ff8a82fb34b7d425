//! Tests of local rate limits at the waypoints: Istio's documented `EnvoyFilter`, read in both
//! of its forms; which limits apply; what is refused when read, and what only warns.

use std::time::Duration;

use crate::{k8s::parse_documents, ClusterState, EnrollmentOptions};

/// Waypoint `shop/waypoint` with a ready pod; Services `web` (ports 80 and 8080) and `db`,
/// bound to it.
const SERVICES: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {nodeName: n1, serviceAccountName: waypoint}\nstatus: {phase: Running, podIPs: [{ip: 10.0.5.5}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{name: http, port: 80}]\n";

/// Istio's documented local rate limit, for a waypoint: `target` (YAML flow), `matching` (the
/// `match` beside the context) and the `LocalRateLimit` fields (`fields`, indented by 10), in
/// a `TypedStruct` when `typed_struct`.
fn envoy_filter(
    name: &str,
    target: &str,
    matching: &str,
    fields: &str,
    typed_struct: bool,
) -> String {
    let typed = if typed_struct {
        format!("          \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n          value:\n{}", indent(fields, 2))
    } else {
        format!("          \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n{fields}")
    };
    let matching = if matching.is_empty() {
        "      waypoint: {}\n"
    } else {
        matching
    };
    format!("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  targetRefs: [{target}]\n  configPatches:\n  - applyTo: HTTP_FILTER\n    match:\n      context: WAYPOINT\n{matching}    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.local_ratelimit\n        typed_config:\n{typed}")
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().flat_map(|l| [pad.as_str(), l, "\n"]).collect()
}

const BUCKET: &str = "          stat_prefix: http_local_rate_limiter\n          token_bucket: {max_tokens: 10, tokens_per_fill: 5, fill_interval: 60s}\n          filter_enabled: {runtime_key: local_rate_limit_enabled, default_value: {numerator: 100, denominator: HUNDRED}}\n          filter_enforced: {runtime_key: local_rate_limit_enforced, default_value: {numerator: 100, denominator: HUNDRED}}\n          response_headers_to_add: [{append_action: APPEND_IF_EXISTS_OR_ADD, header: {key: x-local-rate-limit, value: \"true\"}}]\n";

const WAYPOINT: &str = "{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}";

fn build(docs: &[String]) -> Result<ClusterState, String> {
    let text = [SERVICES.to_owned()]
        .into_iter()
        .chain(docs.iter().cloned())
        .collect::<Vec<_>>()
        .join("---\n");
    let objects = parse_documents("ef.yaml", &text).map_err(|e| e.to_string())?;
    ClusterState::build(&objects, &EnrollmentOptions::new("n0")).map_err(|e| e.to_string())
}

/// The limits at the waypoint for a request to `service`'s `port`: (policy, max tokens).
fn limits(state: &ClusterState, service: &str, port: u16) -> Vec<(String, u32)> {
    let svc = state
        .service_by_hostname(&format!("{service}.shop.svc.cluster.local"))
        .cloned()
        .expect("service");
    let vip = svc.vips[0];
    state
        .rate_limits_at_waypoint(
            ("shop", "waypoint"),
            Some(&svc),
            std::net::SocketAddr::new(vip, port),
        )
        .iter()
        .map(|l| (l.policy.to_string(), l.max_tokens))
        .collect()
}

#[test]
fn istios_documented_filter_reads_in_both_forms() {
    for typed_struct in [false, true] {
        let state = build(&[envoy_filter("rl", WAYPOINT, "", BUCKET, typed_struct)]).unwrap();
        assert!(state.warnings().is_empty(), "{:?}", state.warnings());
        let svc = state
            .service_by_hostname("web.shop.svc.cluster.local")
            .cloned()
            .unwrap();
        let limit = &state.rate_limits_at_waypoint(
            ("shop", "waypoint"),
            Some(&svc),
            "10.96.0.10:80".parse().unwrap(),
        )[0]
        .clone();
        assert_eq!((limit.max_tokens, limit.tokens_per_fill), (10, 5));
        assert_eq!(limit.fill_interval, Duration::from_secs(60));
        assert_eq!((limit.enabled, limit.enforced), (1.0, 1.0));
        assert_eq!(limit.status, http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limit.response_headers.len(), 1);
        assert!(limit.response_headers[0].2, "appended");
        assert!(!limit.per_connection && !limit.x_ratelimit_headers);
    }
}

#[test]
fn limits_apply_by_target_and_port() {
    let gateway = envoy_filter("a-all", WAYPOINT, "", BUCKET, false);
    let web_alt = envoy_filter(
        "b-web-alt",
        "{kind: Service, name: web}",
        "      waypoint: {portNumber: 8080}\n",
        &BUCKET.replace("max_tokens: 10", "max_tokens: 2"),
        false,
    );
    let state = build(&[gateway, web_alt]).unwrap();
    assert_eq!(limits(&state, "web", 80), [("shop/a-all".to_owned(), 10)]);
    assert_eq!(
        limits(&state, "web", 8080),
        [
            ("shop/a-all".to_owned(), 10),
            ("shop/b-web-alt".to_owned(), 2)
        ]
    );
    assert_eq!(limits(&state, "db", 80), [("shop/a-all".to_owned(), 10)]);
    assert!(state
        .rate_limits_at_waypoint(("shop", "other"), None, "10.0.0.1:80".parse().unwrap())
        .is_empty());
}

#[test]
fn a_bad_limit_is_refused_naming_the_field() {
    for (fields, expected) in [
        ("          stat_prefix: x\n", "missing field `token_bucket`"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 0, fill_interval: 1s}\n", "token_bucket.max_tokens must be greater than 0"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: 10ms}\n", "below Envoy's 50 ms"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: soon}\n", "fill_interval \"soon\" is not a duration"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: 1s}\n          filter_enabled: {default_value: {numerator: 200}}\n", "filter_enabled.default_value: 200 is more than 100 %"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: 1s}\n          descriptors: [{entries: [{key: a, value: b}]}]\n", "descriptors are not supported"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: 1s}\n          token_buckett: {}\n", "unknown field `token_buckett`"),
        ("          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: 1s}\n          status: {code: 200}\n", "status.code 200 is not 400-599"),
    ] {
        let err = build(&[envoy_filter("bad", WAYPOINT, "", fields, false)]).expect_err(fields);
        assert!(err.contains("EnvoyFilter shop/bad: spec: configPatches[0]: patch.value.typed_config: "), "{err}");
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
    // The CRD's rule: a `waypoint` match exactly with context WAYPOINT.
    let any = envoy_filter("any", WAYPOINT, "", BUCKET, false)
        .replace("context: WAYPOINT", "context: ANY");
    let err = build(&[any]).expect_err("a waypoint match without context WAYPOINT");
    assert!(err.contains("EnvoyFilter shop/any: spec: configPatches[0]: match: `waypoint` goes with context WAYPOINT"), "{err}");
}

#[test]
fn what_a_waypoint_does_not_apply_is_warned_about() {
    let sidecar = "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: lua, namespace: shop}\nspec:\n  workloadSelector: {labels: {app: web}}\n  configPatches:\n  - applyTo: HTTP_FILTER\n    patch: {operation: INSERT_BEFORE, value: {name: envoy.filters.http.lua}}\n";
    let inbound = envoy_filter(
        "inbound",
        WAYPOINT,
        "      listener: {portNumber: 80}\n",
        BUCKET,
        false,
    )
    .replace("context: WAYPOINT", "context: SIDECAR_INBOUND");
    let route = envoy_filter(
        "route",
        WAYPOINT,
        "      waypoint: {route: {name: default}}\n",
        BUCKET,
        false,
    );
    let disabled = envoy_filter(
        "disabled",
        WAYPOINT,
        "",
        "          stat_prefix: x\n          token_bucket: {max_tokens: 1, fill_interval: 1s}\n",
        false,
    );
    let state = build(&[sidecar.to_owned(), inbound, route, disabled]).unwrap();
    let warnings = state.warnings().join("\n");
    for expected in [
        "EnvoyFilter shop/lua: configPatches[0] (HTTP_FILTER, envoy.filters.http.lua) is not applied",
        "EnvoyFilter shop/inbound: configPatches[0] is not applied: its context SIDECAR_INBOUND is not the waypoints'",
        "EnvoyFilter shop/route: configPatches[0] is not applied: it matches Envoy route names",
        "EnvoyFilter shop/disabled: configPatches[0]: it refuses no request: filter_enabled and filter_enforced are 0 % and 0 %",
    ] {
        assert!(warnings.contains(expected), "{expected:?} in {warnings}");
    }
    assert_eq!(
        limits(&state, "web", 80).len(),
        1,
        "only `disabled` applies (and refuses nothing)"
    );
}
