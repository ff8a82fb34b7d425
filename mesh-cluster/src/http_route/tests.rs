//! Tests of HTTP routing decisions: attachment (producer and consumer routes, ports), Gateway
//! API's precedence, the match semantics, weighted backends and the warnings.

use std::sync::Arc;

use super::{Backend, InvalidBackend, RequestFacts, ResolvedRule, RouteDecision};
use crate::{
    tests::{docs, opts, parse, pod, service},
    ClusterState, Service,
};

/// A route `ns/name` attached to Service `shop/web` (port 80 unless `parent` says more), with
/// `rules` (YAML, indented for `spec.rules`).
fn route(ns: &str, name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, namespace: shop{parent}}}\n  rules:\n{rules}"
    )
}

/// Services `shop/web` (VIP 10.96.0.10:80), `shop/v1` and `shop/v2` (port 80) with one pod each.
fn cluster(routes: &[String]) -> ClusterState {
    let mut parts = vec![
        pod("shop", "web-0", "n0", "10.0.0.1", "app: web"),
        pod("shop", "v1-0", "n0", "10.0.0.2", "app: v1"),
        pod("shop", "v2-0", "n0", "10.0.0.3", "app: v2"),
        service("shop", "web", "10.96.0.10", "80", "8080", "app: web"),
        service("shop", "v1", "10.96.0.11", "80", "8080", "app: v1"),
        service("shop", "v2", "10.96.0.12", "80", "8080", "app: v2"),
    ];
    parts.extend(routes.iter().cloned());
    ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
}

fn web(state: &ClusterState) -> &Arc<Service> {
    state
        .service_by_hostname("web.shop.svc.cluster.local")
        .expect("web")
}

/// A request; `target` is `path?query`, `headers` `name: value` pairs.
struct Req {
    method: http::Method,
    path: String,
    query: Option<String>,
    headers: http::HeaderMap,
}

fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Req {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut map = http::HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    Req {
        method: method.parse().expect("method"),
        path,
        query,
        headers: map,
    }
}

/// Which rule (by name) takes `request` from a client in `client_ns`: `None` for the default,
/// `Some("404")` when none matches.
fn rule_for(state: &ClusterState, client_ns: &str, request: &Req) -> Option<String> {
    let facts = RequestFacts {
        method: &request.method,
        path: &request.path,
        query: request.query.as_deref(),
        headers: &request.headers,
        authority: None,
        scheme: "http",
    };
    match state.route_http(web(state), 80, client_ns, &facts) {
        RouteDecision::Default => None,
        RouteDecision::NoMatch => Some("404".to_owned()),
        RouteDecision::Matched { rule, .. } => Some(rule.name.clone().unwrap_or_default()),
    }
}

fn get(state: &ClusterState, target: &str) -> Option<String> {
    rule_for(state, "shop", &req("GET", target, &[]))
}

#[test]
fn no_route_is_the_default_and_an_unmatched_request_a_404() {
    let state = cluster(&[]);
    assert_eq!(get(&state, "/"), None);
    let state = cluster(&[route(
        "shop",
        "r",
        "",
        "  - name: api\n    matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: v1, port: 80}]\n",
    )]);
    assert_eq!(get(&state, "/api").as_deref(), Some("api"));
    assert_eq!(get(&state, "/other").as_deref(), Some("404"));
    // The route attached to port 80 only: another port of another service is untouched.
    let v1 = state
        .service_by_hostname("v1.shop.svc.cluster.local")
        .expect("v1");
    let request = req("GET", "/other", &[]);
    let facts = RequestFacts {
        method: &request.method,
        path: &request.path,
        query: None,
        headers: &request.headers,
        authority: None,
        scheme: "http",
    };
    assert!(matches!(
        state.route_http(v1, 80, "shop", &facts),
        RouteDecision::Default
    ));
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
}

#[test]
fn path_prefix_matches_whole_segments_and_exact_the_whole_path() {
    let state = cluster(&[route(
        "shop",
        "r",
        "",
        "  - name: foo\n    matches: [{path: {value: /foo/}}]\n  - name: exact\n    matches: [{path: {type: Exact, value: /bar}}]\n  - name: re\n    matches: [{path: {type: RegularExpression, value: \"/r[0-9]+\"}}]\n",
    )]);
    for (path, rule) in [
        ("/foo", "foo"),
        ("/foo/", "foo"),
        ("/foo/bar", "foo"),
        ("/foobar", "404"),
        ("/bar", "exact"),
        ("/bar/", "404"),
        ("/bar/x", "404"),
        ("/r12", "re"),
        ("/r12/x", "404"),
    ] {
        assert_eq!(get(&state, path).as_deref(), Some(rule), "path {path}");
    }
}

#[test]
fn precedence_follows_gateway_api() {
    // Written in the reverse of their precedence, across two routes.
    let state = cluster(&[
        route(
            "shop",
            "a",
            "",
            "  - name: root\n    matches: [{path: {value: /}}]\n  - name: regex\n    matches: [{path: {type: RegularExpression, value: \"/api/.*\"}}]\n  - name: short\n    matches: [{path: {value: /api}}]\n",
        ),
        route(
            "shop",
            "b",
            "",
            "  - name: long\n    matches: [{path: {value: /api/v1}}]\n  - name: method\n    matches: [{path: {value: /api/v1}, method: POST}]\n  - name: header\n    matches: [{path: {value: /api/v1}, method: POST, headers: [{name: x-a, value: \"1\"}]}]\n  - name: query\n    matches: [{path: {value: /api/v1}, method: POST, headers: [{name: x-a, value: \"1\"}], queryParams: [{name: q, value: \"1\"}]}]\n  - name: exact\n    matches: [{path: {type: Exact, value: /api/v1/x}}]\n",
        ),
    ]);
    let post = |target: &str, headers: &[(&str, &str)]| {
        rule_for(&state, "shop", &req("POST", target, headers))
    };
    assert_eq!(get(&state, "/api/v1/x").as_deref(), Some("exact"));
    assert_eq!(
        post("/api/v1/y?q=1", &[("x-a", "1")]).as_deref(),
        Some("query")
    );
    assert_eq!(
        post("/api/v1/y?q=2", &[("x-a", "1")]).as_deref(),
        Some("header")
    );
    assert_eq!(post("/api/v1/y", &[]).as_deref(), Some("method"));
    assert_eq!(get(&state, "/api/v1/y").as_deref(), Some("long"));
    assert_eq!(
        get(&state, "/api/v2").as_deref(),
        Some("short"),
        "every prefix before a regex"
    );
    assert_eq!(get(&state, "/apix").as_deref(), Some("root"));
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_then_rule_order() {
    let rules = |name: &str| {
        format!("  - name: {name}\n    matches: [{{path: {{value: /x}}}}]\n  - name: {name}-2\n    matches: [{{path: {{value: /x}}}}]\n")
    };
    let old = route("shop", "z-old", "", &rules("old")).replace(
        "  namespace: shop\n",
        "  namespace: shop\n  creationTimestamp: \"2026-01-01T00:00:00Z\"\n",
    );
    let new = route("shop", "a-new", "", &rules("new")).replace(
        "  namespace: shop\n",
        "  namespace: shop\n  creationTimestamp: \"2026-06-01T00:00:00Z\"\n",
    );
    let state = cluster(&[new.clone(), old]);
    assert_eq!(get(&state, "/x").as_deref(), Some("old"));
    // Same age (none given): alphabetical by namespace/name, then the first rule.
    let state = cluster(&[
        route("shop", "b", "", &rules("b")),
        route("shop", "a", "", &rules("a")),
    ]);
    assert_eq!(get(&state, "/x").as_deref(), Some("a"));
}

#[test]
fn headers_query_parameters_and_methods() {
    let state = cluster(&[route(
        "shop",
        "r",
        "",
        "  - name: h\n    matches: [{headers: [{name: X-User, value: alice}, {type: RegularExpression, name: x-env, value: \"dev|test\"}]}]\n  - name: q\n    matches: [{queryParams: [{name: v, value: \"a b\"}]}]\n  - name: m\n    matches: [{method: DELETE}]\n",
    )]);
    let r = |method: &str, target: &str, headers: &[(&str, &str)]| {
        rule_for(&state, "shop", &req(method, target, headers))
    };
    assert_eq!(
        r("GET", "/", &[("x-user", "alice"), ("X-Env", "dev")]).as_deref(),
        Some("h")
    );
    assert_eq!(
        r("GET", "/", &[("x-user", "alice"), ("x-env", "prod")]).as_deref(),
        Some("404")
    );
    assert_eq!(
        r("GET", "/", &[("x-user", "Alice"), ("x-env", "dev")]).as_deref(),
        Some("404")
    );
    assert_eq!(
        r("GET", "/", &[("x-user", "alice")]).as_deref(),
        Some("404")
    );
    // Repeated header values are matched as one, joined by commas.
    assert_eq!(
        r(
            "GET",
            "/",
            &[("x-user", "alice"), ("x-user", "bob"), ("x-env", "dev")]
        )
        .as_deref(),
        Some("404")
    );
    assert_eq!(r("GET", "/?v=a%20b", &[]).as_deref(), Some("q"));
    assert_eq!(
        r("GET", "/?w=1&v=a%20b&v=c", &[]).as_deref(),
        Some("q"),
        "the first value"
    );
    assert_eq!(r("GET", "/?v=c&v=a%20b", &[]).as_deref(), Some("404"));
    assert_eq!(
        r("GET", "/?V=a%20b", &[]).as_deref(),
        Some("404"),
        "names are exact"
    );
    assert_eq!(r("DELETE", "/", &[]).as_deref(), Some("m"));
    assert_eq!(r("GET", "/", &[]).as_deref(), Some("404"));
}

#[test]
fn a_consumer_route_replaces_the_producer_routes_for_its_namespace_only() {
    let state = cluster(&[
        route("shop", "producer", "", "  - name: producer\n"),
        route(
            "client",
            "consumer",
            "",
            "  - name: consumer\n    matches: [{path: {value: /c}}]\n",
        ),
    ]);
    assert_eq!(
        rule_for(&state, "client", &req("GET", "/c", &[])).as_deref(),
        Some("consumer")
    );
    assert_eq!(
        rule_for(&state, "client", &req("GET", "/", &[])).as_deref(),
        Some("404")
    );
    assert_eq!(
        rule_for(&state, "other", &req("GET", "/c", &[])).as_deref(),
        Some("producer")
    );
    assert_eq!(
        rule_for(&state, "shop", &req("GET", "/", &[])).as_deref(),
        Some("producer")
    );
}

#[test]
fn port_and_section_name_pick_the_ports_a_route_attaches_to() {
    let two_ports = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n  - {name: admin, port: 9000, targetPort: 9000}\n";
    let build = |parent: &str| {
        let parts = [
            pod("shop", "web-0", "n0", "10.0.0.1", "app: web"),
            two_ports.to_owned(),
            route("shop", "r", parent, "  - name: only\n"),
        ];
        ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
    };
    let attached = |state: &ClusterState, port: u16| {
        let request = req("GET", "/", &[]);
        let facts = RequestFacts {
            method: &request.method,
            path: &request.path,
            query: None,
            headers: &request.headers,
            authority: None,
            scheme: "http",
        };
        matches!(
            state.route_http(web(state), port, "shop", &facts),
            RouteDecision::Matched { .. }
        )
    };
    let state = build("");
    assert!(attached(&state, 80) && attached(&state, 9000));
    let state = build(", port: 9000");
    assert!(!attached(&state, 80) && attached(&state, 9000));
    let state = build(", sectionName: http");
    assert!(attached(&state, 80) && !attached(&state, 9000));
    let state = build(", port: 81");
    assert!(!attached(&state, 80));
    assert!(
        state.warnings()[0]
            .contains("HTTPRoute shop/r: spec.parentRefs[0]: Service shop/web has no TCP port"),
        "{:?}",
        state.warnings()
    );
}

fn only_rule(state: &ClusterState) -> &ResolvedRule {
    rule_of(state, "shop")
}

/// The rule that takes `GET /` from a client in `client_ns`.
fn rule_of<'a>(state: &'a ClusterState, client_ns: &str) -> &'a ResolvedRule {
    let request = req("GET", "/", &[]);
    let facts = RequestFacts {
        method: &request.method,
        path: &request.path,
        query: None,
        headers: &request.headers,
        authority: None,
        scheme: "http",
    };
    match state.route_http(web(state), 80, client_ns, &facts) {
        RouteDecision::Matched { rule, .. } => rule,
        other => panic!("{other:?}"),
    }
}

#[test]
fn weighted_backends_split_by_weight() {
    let state = cluster(&[route(
        "shop",
        "r",
        "",
        "  - backendRefs:\n    - {name: v1, port: 80, weight: 90}\n    - {name: v2, port: 80, weight: 10}\n    - {name: web, port: 80, weight: 0}\n",
    )]);
    let rule = only_rule(&state);
    assert_eq!(rule.backends.len(), 2, "a zero weight takes nothing");
    let mut v2 = 0;
    for roll in 0..1000u64 {
        match &rule
            .pick_backend(roll.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .expect("backend")
            .backend
        {
            Backend::Service {
                service, port: 80, ..
            } if service.name == "v2" => v2 += 1,
            Backend::Service {
                service, port: 80, ..
            } if service.name == "v1" => {}
            other => panic!("{other:?}"),
        }
    }
    assert!((70..=130).contains(&v2), "v2 took {v2} of 1000");
    // Exactly by weight over one cycle of rolls.
    let v2_cycle = (0..100u64)
        .filter(|&roll| matches!(&rule.pick_backend(roll).expect("backend").backend, Backend::Service { service, .. } if service.name == "v2"))
        .count();
    assert_eq!(v2_cycle, 10);
}

#[test]
fn invalid_backends_keep_their_share_and_warn() {
    let state = cluster(&[route(
        "shop",
        "r",
        "",
        "  - backendRefs:\n    - {name: gone, port: 80}\n    - {name: v1, port: 81}\n    - {name: v1, namespace: other, port: 80}\n    - {group: example.com, kind: Bucket, name: b}\n    - {name: v2, port: 80}\n",
    )]);
    let rule = only_rule(&state);
    let problems: Vec<_> = rule
        .backends
        .iter()
        .filter_map(|b| match &b.backend {
            Backend::Invalid(problem) => Some(problem.clone()),
            Backend::Service { .. } => None,
        })
        .collect();
    assert_eq!(
        problems,
        vec![
            InvalidBackend::NotFound {
                namespace: "shop".into(),
                name: "gone".into()
            },
            InvalidBackend::NoPort {
                service: "shop/v1".into(),
                port: 81
            },
            InvalidBackend::CrossNamespace {
                namespace: "other".into()
            },
            InvalidBackend::Kind {
                group: "example.com".into(),
                kind: "Bucket".into()
            },
        ]
    );
    assert_eq!(state.warnings().len(), 4, "{:?}", state.warnings());
    assert!(state.warnings()[0].contains("HTTPRoute shop/r: backend gone: Service shop/gone does not exist; its share of the requests gets a 500"));
    // No backends at all: no pick (a 500).
    let state = cluster(&[route("shop", "r", "", "  - name: none\n")]);
    assert!(only_rule(&state).pick_backend(7).is_none());
}

/// The backends a client in `client_ns` gets for `/`: each a Service's `ns/name`, or why not.
fn backends_for(state: &ClusterState, client_ns: &str) -> Vec<String> {
    rule_of(state, client_ns)
        .backends
        .iter()
        .map(|b| match &b.backend {
            Backend::Service { service, .. } => service.to_string(),
            Backend::Invalid(problem) => problem.to_string(),
        })
        .collect()
}

#[test]
fn a_consumer_route_may_send_to_its_parent_and_nowhere_else_in_the_parents_namespace() {
    // GAMMA's consumer route (the conformance suite's MeshConsumerRoute): from namespace
    // `client`, on to `shop/web` itself, without a ReferenceGrant.
    let state = cluster(&[route(
        "client",
        "to-parent",
        "",
        "  - backendRefs:\n    - {name: web, namespace: shop, port: 80}\n",
    )]);
    assert_eq!(backends_for(&state, "client"), ["shop/web"]);
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
    // Another Service of the parent's namespace would be reached under the waypoint's
    // identity, which its policies may allow where they refuse the client: refused (a 500).
    let state = cluster(&[route(
        "client",
        "elsewhere",
        "",
        "  - backendRefs:\n    - {name: v1, namespace: shop, port: 80}\n",
    )]);
    assert_eq!(backends_for(&state, "client").len(), 1);
    assert!(
        backends_for(&state, "client")[0].contains("needs a ReferenceGrant"),
        "{:?}",
        backends_for(&state, "client")
    );
    assert_eq!(state.warnings().len(), 1, "{:?}", state.warnings());
}

#[test]
fn a_reference_grant_lets_a_route_reach_a_service_of_another_namespace() {
    let backend = "  - backendRefs:\n    - {name: api, namespace: other, port: 80}\n";
    let api = [
        pod("other", "api-0", "n0", "10.0.0.9", "app: api"),
        service("other", "api", "10.96.0.20", "80", "8080", "app: api"),
    ];
    let grant = |from_kind: &str, from_ns: &str, to: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: other}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n  to: [{{group: \"\", kind: Service{to}}}]\n")
    };
    let with = |extra: Option<String>| {
        let mut routes: Vec<String> = api.to_vec();
        routes.push(route("shop", "r", "", backend));
        routes.extend(extra);
        cluster(&routes)
    };
    assert!(backends_for(&with(None), "shop")[0].contains("needs a ReferenceGrant"));
    assert_eq!(
        backends_for(&with(Some(grant("HTTPRoute", "shop", ""))), "shop"),
        ["other/api"]
    );
    assert_eq!(
        backends_for(
            &with(Some(grant("HTTPRoute", "shop", ", name: api"))),
            "shop"
        ),
        ["other/api"]
    );
    // A grant for another Service, another kind of route, or another namespace: none.
    for wrong in [
        grant("HTTPRoute", "shop", ", name: web"),
        grant("GRPCRoute", "shop", ""),
        grant("HTTPRoute", "elsewhere", ""),
    ] {
        let state = with(Some(wrong));
        assert!(backends_for(&state, "shop")[0].contains("needs a ReferenceGrant"));
    }
}

#[test]
fn routes_without_a_service_parent_warn() {
    let gateway_only = route("shop", "r", "", "  - {}\n").replace(
        "{group: \"\", kind: Service, name: web, namespace: shop}",
        "{name: ingress}",
    );
    let missing = route("shop", "m", "", "  - {}\n").replace("name: web,", "name: nope,");
    let state = cluster(&[gateway_only, missing]);
    assert_eq!(get(&state, "/"), None);
    let warnings = state.warnings().join("\n");
    assert!(
        warnings.contains("HTTPRoute shop/r: no parentRef is a Service"),
        "{warnings}"
    );
    assert!(
        warnings.contains("HTTPRoute shop/m: spec.parentRefs[0]: Service shop/nope does not exist"),
        "{warnings}"
    );
}

#[test]
fn a_bad_route_name_is_refused_when_built() {
    let bad = route("shop", "Bad_Name", "", "  - {}\n");
    let err = ClusterState::build(&parse(&bad), &opts())
        .expect_err("bad name")
        .to_string();
    assert!(
        err.contains("HTTPRoute shop/Bad_Name: metadata.name"),
        "{err}"
    );
}

#[test]
fn an_undeclared_port_that_routes_attach_to_is_served_as_http() {
    use crate::model::AppProtocol::{self, Grpc, Http, Opaque, Unknown};
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n  - {name: db, port: 3306, targetPort: 3306}\n  - {name: mysql, port: 3307, targetPort: 3307}\n  - {name: grpc-api, port: 9090, targetPort: 9090}\n";
    let build = |extra: Option<String>| {
        let mut parts = vec![
            pod("shop", "web-0", "n0", "10.0.0.1", "app: web"),
            service.to_owned(),
        ];
        parts.extend(extra);
        ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
    };
    let protocols = |state: &ClusterState| -> Vec<AppProtocol> {
        let service = web(state);
        service
            .ports
            .iter()
            .map(|port| state.waypoint_protocol(service, port))
            .collect()
    };
    // No route: undeclared ports are sniffed.
    assert_eq!(protocols(&build(None)), [Unknown, Unknown, Opaque, Grpc]);
    // A route on the whole Service: its undeclared ports are HTTP; declared ones stay.
    let whole = route("shop", "r", "", "  - name: only\n");
    assert_eq!(protocols(&build(Some(whole))), [Http, Http, Opaque, Grpc]);
    // A route on one port: that port alone.
    let one = route("shop", "r", ", port: 3306", "  - name: only\n");
    assert_eq!(protocols(&build(Some(one))), [Unknown, Http, Opaque, Grpc]);
    // A consumer route (another namespace's) counts too: its clients' requests are routed.
    let consumer = route("shop-client", "r", "", "  - name: only\n");
    assert_eq!(
        protocols(&build(Some(consumer))),
        [Http, Http, Opaque, Grpc]
    );
    // A VirtualService's HTTP rules too.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: shop}\nspec:\n  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web}\n".to_owned();
    assert_eq!(protocols(&build(Some(vs))), [Http, Http, Opaque, Grpc]);
}
