//! Tests of `TCPRoute` and `TLSRoute`: parsing and its checks, attachment, which route takes a
//! connection, and what a port carries.

use std::sync::Arc;

use crate::{
    http_route::{Backend, ResolvedRule},
    model::AppProtocol,
    tests::{assert_parse_errors, docs, opts, parse, pod, service},
    ClusterState, Service,
};

/// A `kind` route `ns/name` (`TCPRoute` or `TLSRoute`) attached to Service `shop/web` (all its
/// ports unless `parent` says more), with the rest of its `spec` (`body`, after `parentRefs`).
fn l4_route(kind: &str, ns: &str, name: &str, parent: &str, body: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, namespace: shop{parent}}}\n{body}"
    )
}

/// One rule with `backends` (`name:weight` pairs, port 80).
fn rule(backends: &[(&str, u32)]) -> String {
    let refs: Vec<String> = backends
        .iter()
        .map(|(name, weight)| format!("{{name: {name}, port: 80, weight: {weight}}}"))
        .collect();
    format!("  rules:\n  - backendRefs: [{}]\n", refs.join(", "))
}

/// Services `shop/web` (VIP 10.96.0.10, port 80 undeclared, 443 named `tls`), `shop/v1` and
/// `shop/v2` (port 80) with one pod each, and `extra`.
fn cluster(extra: &[String]) -> ClusterState {
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n  - {name: tls, port: 443, targetPort: 8443}\n".to_owned();
    let mut parts = vec![
        pod("shop", "web-0", "n0", "10.0.0.1", "app: web"),
        pod("shop", "v1-0", "n0", "10.0.0.2", "app: v1"),
        pod("shop", "v2-0", "n0", "10.0.0.3", "app: v2"),
        web,
        service("shop", "v1", "10.96.0.11", "80", "8080", "app: v1"),
        service("shop", "v2", "10.96.0.12", "80", "8080", "app: v2"),
    ];
    parts.extend(extra.iter().cloned());
    ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
}

fn web(state: &ClusterState) -> Arc<Service> {
    Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .expect("web"),
    )
}

/// The rule's backends as `service:weight`.
fn backends(rule: &ResolvedRule) -> Vec<String> {
    rule.backends
        .iter()
        .map(|b| match &b.backend {
            Backend::Service { service, .. } => format!("{}:{}", service.name, b.weight),
            Backend::Invalid(problem) => format!("invalid ({problem}):{}", b.weight),
        })
        .collect()
}

fn tcp_backends(state: &ClusterState, port: u16, client_ns: &str) -> Option<Vec<String>> {
    state.route_tcp(&web(state), port, client_ns).map(backends)
}

fn tls_backends(state: &ClusterState, sni: &str) -> Option<Vec<String>> {
    state.route_tls(&web(state), 443, "shop", sni).map(backends)
}

#[test]
fn a_tcp_route_splits_a_ports_connections_by_weight() {
    // Istio's "TCP traffic shifting" task, as it writes the route for a waypoint.
    let route = l4_route(
        "TCPRoute",
        "shop",
        "shift",
        ", port: 80",
        &rule(&[("v1", 80), ("v2", 20)]),
    );
    let state = cluster(&[route]);
    assert_eq!(
        tcp_backends(&state, 80, "anyone"),
        Some(vec!["v1:80".to_owned(), "v2:20".to_owned()])
    );
    assert_eq!(tcp_backends(&state, 443, "anyone"), None, "another port");
    let rule = state.route_tcp(&web(&state), 80, "anyone").unwrap();
    let picks: Vec<u64> = (0..100).collect();
    let to_v2 = picks
        .iter()
        .filter(|&&roll| {
            matches!(&rule.pick_backend(roll).unwrap().backend,
                Backend::Service { service, .. } if service.name == "v2")
        })
        .count();
    assert_eq!(to_v2, 20, "20 of every 100 rolls");
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
}

#[test]
fn an_undeclared_port_with_only_l4_routes_is_tcp_and_an_http_port_warns() {
    let protocols = |state: &ClusterState| -> Vec<AppProtocol> {
        let service = web(state);
        service
            .ports
            .iter()
            .map(|port| state.waypoint_protocol(&service, port))
            .collect()
    };
    // Port 80 undeclared, sniffed; 443 named `tls`, TCP.
    assert_eq!(
        protocols(&cluster(&[])),
        [AppProtocol::Unknown, AppProtocol::Opaque]
    );
    // A TCPRoute on the whole Service: its undeclared ports carry TCP, unsniffed.
    let tcp = l4_route("TCPRoute", "shop", "t", "", &rule(&[("v1", 1)]));
    let state = cluster(std::slice::from_ref(&tcp));
    assert_eq!(
        protocols(&state),
        [AppProtocol::Opaque, AppProtocol::Opaque]
    );
    // With an HTTPRoute on port 80 too, that port is HTTP and the TCPRoute routes none of it.
    let http = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: h, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules: [{backendRefs: [{name: v2, port: 80}]}]\n".to_owned();
    let state = cluster(&[tcp, http]);
    assert_eq!(protocols(&state), [AppProtocol::Http, AppProtocol::Opaque]);
    assert_eq!(
        state.warnings(),
        [
            "Service shop/web port 80: the waypoint reads its connections as HTTP (the port is \
          declared so, or an HTTP route attaches to it); the TCPRoutes and TLSRoutes attached to \
          it route none of them"
        ]
    );
}

#[test]
fn a_tls_route_takes_connections_by_server_name_exact_before_wildcard() {
    let older = "  creationTimestamp: 2026-01-01T00:00:00Z\n";
    let wildcard = l4_route(
        "TLSRoute",
        "shop",
        "wild",
        ", sectionName: tls",
        &format!("  hostnames: [\"*.example.com\"]\n{}", rule(&[("v2", 1)])),
    )
    .replace(
        "  namespace: shop\n",
        &format!("  namespace: shop\n{older}"),
    );
    let exact = l4_route(
        "TLSRoute",
        "shop",
        "exact",
        ", sectionName: tls",
        &format!("  hostnames: [a.example.com]\n{}", rule(&[("v1", 1)])),
    );
    let state = cluster(&[wildcard, exact]);
    // The older route is the wildcard one; the exact name goes first all the same.
    assert_eq!(
        tls_backends(&state, "a.example.com"),
        Some(vec!["v1:1".into()])
    );
    assert_eq!(
        tls_backends(&state, "b.a.Example.com"),
        Some(vec!["v2:1".into()]),
        "any labels before the suffix, any case"
    );
    assert_eq!(
        tls_backends(&state, "example.com"),
        None,
        "not the bare suffix"
    );
    assert!(state.tls_routes_attach(&web(&state), 443));
    assert!(!state.tls_routes_attach(&web(&state), 80));
}

#[test]
fn the_oldest_tcp_route_wins_and_comes_before_a_virtual_services_rules() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: shop, creationTimestamp: 2020-01-01T00:00:00Z}\nspec:\n  hosts: [web]\n  tcp:\n  - route: [{destination: {host: v2}}]\n".to_owned();
    let newer = l4_route("TCPRoute", "shop", "a-newer", "", &rule(&[("v2", 1)])).replace(
        "  namespace: shop\n",
        "  namespace: shop\n  creationTimestamp: 2026-02-01T00:00:00Z\n",
    );
    let older = l4_route("TCPRoute", "shop", "z-older", "", &rule(&[("v1", 1)])).replace(
        "  namespace: shop\n",
        "  namespace: shop\n  creationTimestamp: 2026-01-01T00:00:00Z\n",
    );
    let state = cluster(&[vs.clone(), newer, older]);
    assert_eq!(tcp_backends(&state, 80, "shop"), Some(vec!["v1:1".into()]));
    // Without the routes, the VirtualService's rule.
    let state = cluster(&[vs]);
    assert_eq!(
        tcp_backends(&state, 80, "shop"),
        Some(vec!["v2:100".into()])
    );
}

#[test]
fn a_consumer_tcp_route_routes_its_own_namespaces_clients_only() {
    let tenant = l4_route("TCPRoute", "team", "mine", "", &rule(&[("web", 1)])).replace(
        "{name: web, port: 80, weight: 1}",
        "{name: web, namespace: shop, port: 80, weight: 1}",
    );
    let own = l4_route("TCPRoute", "shop", "own", "", &rule(&[("v1", 1)]));
    let state = cluster(&[tenant, own]);
    assert_eq!(
        tcp_backends(&state, 80, "team"),
        Some(vec!["web:1".into()]),
        "the tenant's route, to the Service it was for (GEP-1294)"
    );
    assert_eq!(tcp_backends(&state, 80, "other"), Some(vec!["v1:1".into()]));
}

#[test]
fn a_backend_of_another_namespace_needs_a_reference_grant_for_the_kind() {
    let mut parts = vec![
        pod("other", "db-0", "n0", "10.0.0.9", "app: db"),
        service("other", "db", "10.96.0.20", "80", "5432", "app: db"),
        l4_route("TCPRoute", "shop", "t", "", &rule(&[("db", 1)])).replace(
            "{name: db, port: 80",
            "{name: db, namespace: other, port: 80",
        ),
    ];
    let state = cluster(&parts);
    let routed = tcp_backends(&state, 80, "shop").unwrap();
    assert!(routed[0].starts_with("invalid ("), "{routed:?}");
    assert!(
        state
            .warnings()
            .iter()
            .any(|w| w.contains("TCPRoute shop/t: backend db:")
                && w.ends_with("its share of the connections is refused")),
        "{:?}",
        state.warnings()
    );
    // A grant for HTTPRoutes does not do; one for TCPRoutes does.
    let grant = |kind: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: other}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {kind}, namespace: shop}}]\n  to: [{{group: \"\", kind: Service}}]\n")
    };
    parts.push(grant("HTTPRoute"));
    let routed = tcp_backends(&cluster(&parts), 80, "shop").unwrap();
    assert!(routed[0].starts_with("invalid ("), "{routed:?}");
    *parts.last_mut().unwrap() = grant("TCPRoute");
    assert_eq!(
        tcp_backends(&cluster(&parts), 80, "shop"),
        Some(vec!["db:1".into()])
    );
}

#[test]
fn older_api_versions_read_the_same() {
    for (kind, version, body) in [
        ("TCPRoute", "v1alpha2", rule(&[("v1", 1)])),
        ("TLSRoute", "v1alpha2", rule(&[("v1", 1)])),
        (
            "TLSRoute",
            "v1alpha3",
            format!("  hostnames: [a.example.com]\n{}", rule(&[("v1", 1)])),
        ),
    ] {
        let text = l4_route(kind, "shop", "r", "", &body).replace(
            "gateway.networking.k8s.io/v1\n",
            &format!("gateway.networking.k8s.io/{version}\n"),
        );
        let state = cluster(&[text]);
        let routed = match kind {
            "TCPRoute" => tcp_backends(&state, 80, "shop"),
            _ => tls_backends(&state, "a.example.com"),
        };
        assert_eq!(routed, Some(vec!["v1:1".into()]), "{kind} {version}");
    }
    // Only `v1alpha2` reads a `TLSRoute` without hostnames (every server name); `v1` and
    // `v1alpha3` require one, as their CRDs do.
    for version in ["v1", "v1alpha3"] {
        let text = l4_route("TLSRoute", "shop", "r", "", &rule(&[("v1", 1)])).replace(
            "gateway.networking.k8s.io/v1\n",
            &format!("gateway.networking.k8s.io/{version}\n"),
        );
        let parts = [pod("shop", "web-0", "n0", "10.0.0.1", "app: web"), text];
        let err = ClusterState::build(&parse(&docs(&parts)), &opts())
            .expect_err("refused")
            .to_string();
        assert_eq!(
            err,
            format!(
                "TLSRoute shop/r: spec.hostnames: at least one is required at \
                 gateway.networking.k8s.io/{version} (only v1alpha2 reads none as every server name)"
            )
        );
    }
}

#[test]
fn checks_name_the_field_and_line() {
    let two_rules = format!(
        "{}  - backendRefs: [{{name: v2, port: 80}}]\n",
        rule(&[("v1", 1)])
    );
    let table: &[(String, &[&str])] = &[
        (
            l4_route("TCPRoute", "shop", "r", "", &two_rules),
            &[
                "TCPRoute shop/r: spec: rules: exactly one rule, found 2",
                "line 7",
            ],
        ),
        (
            l4_route(
                "TCPRoute",
                "shop",
                "r",
                "",
                "  rules:\n  - backendRefs: [{name: v1, port: 80, filters: []}]\n",
            ),
            &[
                "spec.rules[0].backendRefs[0]: unknown field `filters`",
                "line 10",
            ],
        ),
        (
            l4_route(
                "TCPRoute",
                "shop",
                "r",
                "",
                "  rules:\n  - backendRefs: [{name: v1}]\n",
            ),
            &["a backend of kind Service needs a `port`", "line 10"],
        ),
        (
            l4_route(
                "TCPRoute",
                "shop",
                "r",
                "",
                "  rules:\n  - matches: []\n    backendRefs: [{name: v1, port: 80}]\n",
            ),
            &["spec.rules[0]: unknown field `matches`", "line 10"],
        ),
        (
            l4_route(
                "TCPRoute",
                "shop",
                "r",
                "",
                "  rules:\n  - backendRefs: []\n",
            ),
            &["spec.rules[0].backendRefs", "line 10"],
        ),
        (
            l4_route("TCPRoute", "shop", "r", "", "  rules: []\n"),
            &["spec.rules", "line 9"],
        ),
    ];
    assert_parse_errors(table);
}

#[test]
fn tls_hostname_checks_name_the_field_and_line() {
    let table: &[(String, &[&str])] = &[
        (
            l4_route(
                "TLSRoute",
                "shop",
                "r",
                "",
                &format!("  hostnames: [\"10.0.0.1\"]\n{}", rule(&[("v1", 1)])),
            ),
            &[
                "spec.hostnames[0]",
                "an IP address is not allowed",
                "line 9",
            ],
        ),
        (
            l4_route(
                "TLSRoute",
                "shop",
                "r",
                "",
                &format!("  hostnames: [\"a.*.example\"]\n{}", rule(&[("v1", 1)])),
            ),
            &["spec.hostnames[0]", "is not a hostname", "line 9"],
        ),
        (
            l4_route(
                "TCPRoute",
                "shop",
                "r",
                "",
                &format!("  hostnames: [a.example]\n{}", rule(&[("v1", 1)])),
            ),
            &["spec: unknown field `hostnames`", "line 9"],
        ),
        (
            l4_route("TCPRoute", "shop", "r", "", &rule(&[("v1", 2_000_000)])),
            &["weight 2000000 is out of range", "line 10"],
        ),
    ];
    assert_parse_errors(table);
}
