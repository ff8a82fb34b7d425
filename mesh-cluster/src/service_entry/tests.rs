//! Tests of `ServiceEntry`: its checks, the model's Service made of it, whose connections its
//! addresses capture, its waypoint, and the routes and policies that name it.

use http::{HeaderMap, Method};
use mesh_identity::Identity;

use crate::{
    authz::{Verdict, WaypointFacts},
    http_route::{Backend, RequestFacts, RouteDecision},
    tests::{addr, assert_parse_errors, docs, opts, parse, pod, service, waypoint_pod},
    ClusterState, Resolution, Service,
};

/// A `ServiceEntry` `name` of namespace `ns` with `spec` (indented two spaces), and `labels`.
fn entry(ns: &str, name: &str, labels: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n{spec}"
    )
}

/// `api.example.com` at 240.240.0.10:443 (TLS) and :80 (HTTP), two external endpoints.
const STATIC: &str = "  hosts: [api.example.com, api.example.org]\n  addresses: [240.240.0.10]\n  ports:\n  - {number: 80, name: http, protocol: HTTP, targetPort: 8080}\n  - {number: 443, name: tls, protocol: TLS}\n  resolution: STATIC\n  endpoints:\n  - {address: 192.0.2.10}\n  - {address: 192.0.2.11, ports: {http: 9090}}\n";

fn build(parts: &[String]) -> ClusterState {
    ClusterState::build(&parse(&docs(parts)), &opts()).expect("builds")
}

fn build_err(parts: &[String]) -> String {
    ClusterState::build(&parse(&docs(parts)), &opts())
        .expect_err("must not build")
        .to_string()
}

/// Client pods: `shop/client` (10.0.0.1), `other/client` (10.0.0.2).
fn clients() -> Vec<String> {
    vec![
        pod("shop", "client", "n0", "10.0.0.1", "app: client"),
        pod("other", "client", "n0", "10.0.0.2", "app: client"),
    ]
}

fn resolve(state: &ClusterState, client_ns: &str, dst: &str) -> String {
    let src = state.workload_by_name(client_ns, "client").expect("client");
    match state.resolve_from(Some(src), addr(dst)) {
        Resolution::Service {
            service,
            endpoint,
            workload,
        } => format!(
            "{} {service} -> {endpoint}{}",
            service.kind_name(),
            workload.map_or(String::new(), |w| format!(" (pod {w})"))
        ),
        Resolution::Waypoint {
            waypoint,
            authority,
            ..
        } => format!("waypoint {waypoint} for {authority}"),
        Resolution::Passthrough => "passthrough".to_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn a_static_entry_is_a_service_of_its_namespace_clients() {
    let mut parts = clients();
    parts.push(entry("shop", "api", "", STATIC));
    let state = build(&parts);
    let api = state
        .service_by_hostname("api.example.com")
        .expect("by host");
    assert_eq!(api.to_string(), "shop/api");
    assert!(
        std::ptr::eq(
            api.as_ref(),
            state
                .service_by_hostname("api.example.org")
                .expect("second host")
                .as_ref()
        ),
        "each host names the entry"
    );
    let http = &api.ports[0];
    assert_eq!(http.app_protocol, crate::AppProtocol::Http);
    assert_eq!(api.ports[1].app_protocol, crate::AppProtocol::Opaque);
    let endpoints: Vec<String> = http.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(
        endpoints,
        ["192.0.2.10:8080", "192.0.2.11:9090"],
        "targetPort, or the endpoint's own port for the port's name"
    );
    let picked: std::collections::BTreeSet<String> = (0..4)
        .map(|_| resolve(&state, "shop", "240.240.0.10:80"))
        .collect();
    assert_eq!(
        picked.into_iter().collect::<Vec<_>>(),
        [
            "ServiceEntry shop/api -> 192.0.2.10:8080",
            "ServiceEntry shop/api -> 192.0.2.11:9090"
        ]
    );
    assert_eq!(
        resolve(&state, "shop", "240.240.0.10:443"),
        "ServiceEntry shop/api -> 192.0.2.10:443"
    );
    // Another namespace's clients are not captured: their connection goes where it was
    // opened to, as if the entry did not exist.
    assert_eq!(resolve(&state, "other", "240.240.0.10:80"), "passthrough");
    assert!(
        state
            .service_for_client("other", addr("240.240.0.10:80"))
            .is_none()
            && state
                .service_for_client("shop", addr("240.240.0.10:80"))
                .is_some()
    );
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
}

#[test]
fn a_tenants_entry_never_captures_another_namespaces_connections() {
    // The attack: a tenant of `evil` writes an entry for the address of `shop`'s database,
    // exported everywhere, with its own server as the endpoint. `shop`'s connections to the
    // database must still go to the database.
    let mut parts = clients();
    parts.push(entry(
        "evil",
        "db",
        "",
        "  hosts: [db.shop.example]\n  addresses: [203.0.113.5]\n  exportTo: ['*']\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 198.51.100.66}]\n",
    ));
    let state = build(&parts);
    assert_eq!(resolve(&state, "shop", "203.0.113.5:5432"), "passthrough");
    assert_eq!(resolve(&state, "other", "203.0.113.5:5432"), "passthrough");
    let warnings = state.warnings().join("\n");
    assert!(
        warnings.contains(
            "ServiceEntry evil/db: spec.exportTo [\"*\"] is narrowed to its own namespace"
        ),
        "{warnings}"
    );
    // The root namespace's entry (the platform team's) is every namespace's, as far as its
    // `exportTo` lets it.
    let mut parts = clients();
    parts.push(entry(
        "istio-system",
        "db",
        "",
        "  hosts: [db.shop.example]\n  addresses: [203.0.113.5]\n  exportTo: [shop]\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 198.51.100.7}]\n",
    ));
    let state = build(&parts);
    assert_eq!(
        resolve(&state, "shop", "203.0.113.5:5432"),
        "ServiceEntry istio-system/db -> 198.51.100.7:5432"
    );
    assert_eq!(resolve(&state, "other", "203.0.113.5:5432"), "passthrough");
}

#[test]
fn resolution_none_goes_on_to_the_address_dialled_and_a_selector_picks_pods() {
    let mut parts = clients();
    parts.push(entry(
        "shop",
        "dbs",
        "",
        "  hosts: [dbs.internal]\n  addresses: [203.0.113.5, 203.0.113.6, 2001:db8::5]\n  ports: [{number: 5432, name: tcp-pg, targetPort: 6432}]\n",
    ));
    parts.push(pod("shop", "cache-0", "n1", "10.0.1.7", "app: cache"));
    parts.push(pod("shop", "cache-1", "n1", "10.0.1.8", "app: other"));
    parts.push(entry(
        "shop",
        "cache",
        "",
        "  hosts: [cache.internal]\n  addresses: [240.240.0.20]\n  location: MESH_INTERNAL\n  ports: [{number: 6379, name: redis, protocol: REDIS}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: cache}}\n",
    ));
    let state = build(&parts);
    for _ in 0..3 {
        assert_eq!(
            resolve(&state, "shop", "203.0.113.6:5432"),
            "ServiceEntry shop/dbs -> 203.0.113.6:6432"
        );
    }
    assert_eq!(
        resolve(&state, "shop", "[2001:db8::5]:5432"),
        "ServiceEntry shop/dbs -> [2001:db8::5]:6432"
    );
    assert_eq!(
        resolve(&state, "shop", "240.240.0.20:6379"),
        "ServiceEntry shop/cache -> 10.0.1.7:6379 (pod shop/cache-0)",
        "a selected pod is reached over HBONE with its identity"
    );
}

#[test]
fn an_entry_bound_to_a_waypoint_goes_through_it_and_routes_and_policies_name_it() {
    let mut parts = clients();
    parts.extend([
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: shop\n  labels: {istio.io/waypoint-for: service}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n".to_owned(),
        waypoint_pod("wp-0", "n0", "10.0.9.1"),
        entry("shop", "api", "istio.io/use-waypoint: wp", STATIC),
        // A route on the entry sending `/v2` to its second host's Service (itself) and the
        // rest to `shop/mirror`.
        service("shop", "mirror", "10.96.0.9", "80", "8080", "app: mirror"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api, namespace: shop}\nspec:\n  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api, port: 80}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v2}}]\n    backendRefs: [{group: networking.istio.io, kind: Hostname, name: api.example.org, port: 80}]\n  - backendRefs: [{name: mirror, port: 80}]\n".to_owned(),
        // Kind Service with the entry's name attaches to nothing.
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: wrong-kind, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api, port: 80}]\n  rules: [{backendRefs: [{name: mirror, port: 80}]}]\n".to_owned(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n".to_owned(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: wrong-kind, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: api}]\n  action: DENY\n  rules: [{}]\n".to_owned(),
    ]);
    let state = build(&parts);
    assert_eq!(
        resolve(&state, "shop", "240.240.0.10:80"),
        "waypoint shop/wp for 240.240.0.10:80"
    );
    assert_eq!(resolve(&state, "other", "240.240.0.10:80"), "passthrough");
    let warnings = state.warnings().join("\n");
    assert!(
        warnings.contains(
            "HTTPRoute shop/wrong-kind: spec.parentRefs[0]: Service shop/api does not exist"
        ),
        "{warnings}"
    );

    let api = state.service_by_hostname("api.example.com").expect("api");
    let route = |path: &str| -> String {
        let headers = HeaderMap::new();
        let facts = RequestFacts {
            method: &Method::GET,
            path,
            query: None,
            headers: &headers,
            authority: Some("api.example.com"),
            scheme: "http",
        };
        match state.route_http(api, 80, "shop", &facts) {
            RouteDecision::Matched { rule, .. } => match &rule.backends[0].backend {
                Backend::Service { service, port, .. } => {
                    format!("{} {service}:{port}", service.kind_name())
                }
                Backend::Invalid(why) => format!("invalid: {why}"),
            },
            other => format!("{other:?}"),
        }
    };
    assert_eq!(route("/v2/x"), "ServiceEntry shop/api:80");
    assert_eq!(route("/"), "Service shop/mirror:80");

    let decide = |path: &str, service: &Service| {
        let identity = Identity::new("cluster.local", "shop", "default").expect("identity");
        let headers = HeaderMap::new();
        let facts = WaypointFacts {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: &identity,
            dst: addr("240.240.0.10:80"),
            http: Some(crate::authz::HttpFacts {
                method: "GET",
                authority: "api.example.com",
                path,
                path_and_query: path,
                headers: &headers,
                jwt: None,
            }),
        };
        state
            .authorize_at_waypoint(("shop", "wp"), Some(service), &facts)
            .verdict
    };
    assert_eq!(decide("/admin", api), Verdict::Deny);
    assert_eq!(
        decide("/", api),
        Verdict::Allow,
        "the policy targeting kind Service `api` does not apply to the entry"
    );
}

#[test]
fn claims_on_another_objects_address_host_or_name_are_refused() {
    let base = || {
        let mut parts = clients();
        parts.push(service(
            "shop",
            "web",
            "10.96.0.1",
            "80",
            "8080",
            "app: web",
        ));
        parts
    };
    let err = |extra: String| {
        let mut parts = base();
        parts.push(extra);
        build_err(&parts)
    };
    let port = "  ports: [{number: 80, name: http}]\n";
    assert_eq!(
        err(entry("shop", "e", "", &format!("  hosts: [e.example]\n  addresses: [10.96.0.1]\n{port}"))),
        "ServiceEntry shop/e: spec.ports[0].number: 10.96.0.1:80 (TCP) is already claimed by Service shop/web"
    );
    assert_eq!(
        err(entry("shop", "e", "", &format!("  hosts: [e.example]\n  addresses: [10.0.0.2]\n{port}"))),
        "ServiceEntry shop/e: spec.addresses[0]: 10.0.0.2 is already the address of Pod other/client"
    );
    assert_eq!(
        err(entry("other", "e", "", &format!("  hosts: [web.shop.svc.cluster.local]\n{port}"))),
        "ServiceEntry other/e: spec.hosts[0]: host \"web.shop.svc.cluster.local\" is already Service shop/web's"
    );
    assert!(err(entry(
        "shop",
        "web",
        "",
        &format!("  hosts: [w.example]\n{port}")
    ))
    .starts_with("ServiceEntry shop/web: metadata.name: Service shop/web has this name"),);
    // Without addresses: named by routes, captures nothing (and says so).
    let mut parts = base();
    parts.push(entry(
        "shop",
        "e",
        "",
        &format!("  hosts: [e.example]\n{port}"),
    ));
    let warnings = build(&parts).warnings().join("\n");
    assert!(
        warnings.contains("ServiceEntry shop/e: no addresses"),
        "{warnings}"
    );
    // Istio's allocator's address, when the entry gives none.
    let mut parts = base();
    parts.push(format!(
        "{}status:\n  addresses: [{{value: 240.240.0.3, host: e.example}}]\n",
        entry("shop", "e", "", &format!("  hosts: [e.example]\n  resolution: STATIC\n  endpoints: [{{address: 192.0.2.1}}]\n{port}"))
    ));
    let state = build(&parts);
    assert_eq!(
        resolve(&state, "shop", "240.240.0.3:80"),
        "ServiceEntry shop/e -> 192.0.2.1:80"
    );
}

#[test]
fn the_spec_is_checked_with_field_and_line() {
    let e = |spec: &str| entry("shop", "e", "", spec);
    let port = "  ports: [{number: 80, name: http}]\n";
    let table: Vec<(String, &[&str])> = vec![
        (e("  hosts: []\n"), &["must name at least one host", "line"]),
        (
            e(&format!("  hosts: [Bad_Host]\n{port}")),
            &["spec.hosts", "\"Bad_Host\" is not a host name"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  addresses: [10.0.0.0/8]\n{port}")),
            &["spec.addresses[0]", "is an address range"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  addresses: [127.0.0.1]\n{port}")),
            &["127.0.0.1 is loopback"],
        ),
        (
            e("  hosts: [a.example]\n  ports: [{number: 80, name: a}, {number: 80, name: b}]\n"),
            &["port 80 is listed twice"],
        ),
        (
            e("  hosts: [a.example]\n  ports: [{number: 80, name: a, protocol: QUIC}]\n"),
            &["spec.ports[0]", "\"QUIC\" is not a protocol Istio knows"],
        ),
        (
            e(&format!("  hosts: [\"*.a.example\"]\n  resolution: DNS\n{port}")),
            &["host \"*.a.example\" is a wildcard", "cannot be"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  endpoints: [{{address: 192.0.2.1}}]\n{port}")),
            &["resolution NONE takes no endpoints"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  resolution: STATIC\n  endpoints: [{{address: api.example}}]\n{port}")),
            &["endpoints[0]: \"api.example\" is not an IP address", "needs resolution DNS"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  resolution: STATIC\n  endpoints: [{{address: 192.0.2.1, weight: 3}}]\n{port}")),
            &["endpoints[].weight is not supported"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  resolution: STATIC\n  endpoints: [{{address: 192.0.2.1, ports: {{https: 8443}}}}]\n{port}")),
            &["port name \"https\" is not one of the entry's ports"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  resolution: STATIC\n  workloadSelector: {{labels: {{a: b}}}}\n  endpoints: [{{address: 192.0.2.1}}]\n{port}")),
            &["endpoints and workloadSelector cannot both be given"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  location: OUTSIDE\n{port}")),
            &["\"OUTSIDE\" is not a location"],
        ),
        (
            e(&format!("  hosts: [a.example]\n  unknownField: 1\n{port}")),
            &["unknown field `unknownField`"],
        ),
    ];
    assert_parse_errors(&table);
}

#[test]
fn naming_another_tenants_pod_as_an_endpoint_does_not_put_it_behind_ones_waypoint() {
    // The attack: a tenant of `evil` binds a Service (without selector, its EndpointSlice
    // listing `shop/client`'s address) and an entry (its endpoint that address) to its own
    // waypoint. Had that put `shop/client` behind `evil/wp`, the pod's agent would refuse every
    // connection to it that did not come through `evil/wp`.
    let mut parts = clients();
    parts.extend([
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: evil\n  labels: {istio.io/waypoint-for: all}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n".to_owned(),
        waypoint_pod("wp-0", "n0", "10.0.9.1").replace("namespace: shop", "namespace: evil"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: grab\n  namespace: evil\n  labels: {istio.io/use-waypoint: wp}\nspec:\n  clusterIP: 10.96.0.66\n  ports: [{port: 80, targetPort: 8080}]\n".to_owned(),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: grab-1\n  namespace: evil\n  labels: {kubernetes.io/service-name: grab}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n".to_owned(),
        entry(
            "evil",
            "grab-entry",
            "istio.io/use-waypoint: wp",
            "  hosts: [grab.example]\n  addresses: [240.240.0.66]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n",
        ),
    ]);
    let mut opts = opts();
    opts.endpoints = crate::EndpointsFrom::Slices;
    let state = ClusterState::build(&parse(&docs(&parts)), &opts).expect("builds");
    let grab = state
        .service_by_hostname("grab.evil.svc.cluster.local")
        .expect("grab");
    assert_eq!(grab.ports[0].endpoints.len(), 1, "the slice is read");
    let victim = state.workload_by_name("shop", "client").expect("victim");
    let other = state.workload_by_name("other", "client").expect("a client");
    let guard = state.waypoint_guard(victim, other.ips[0], Some(&other.identity));
    assert_eq!(guard, crate::Guard::Open, "{guard:?}");
}

#[test]
fn virtual_services_and_destination_rules_name_an_entry_by_its_host() {
    let mut parts = clients();
    parts.extend([
        entry("shop", "api", "", STATIC),
        // A Service `api` of namespace `example` must not be what `api.example.com` names.
        service("example", "api", "10.96.0.8", "80", "8080", "app: api"),
        service("shop", "mirror", "10.96.0.9", "80", "8080", "app: mirror"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api, namespace: shop}\nspec:\n  hosts: [api.example.com]\n  http:\n  - match: [{uri: {prefix: /old}}]\n    route: [{destination: {host: mirror}}]\n".to_owned(),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api, namespace: shop}\nspec:\n  host: api.example.org\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}\n".to_owned(),
    ]);
    let state = build(&parts);
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
    let api = state.service_by_hostname("api.example.com").expect("api");
    let headers = HeaderMap::new();
    let facts = RequestFacts {
        method: &Method::GET,
        path: "/old/x",
        query: None,
        headers: &headers,
        authority: Some("api.example.com"),
        scheme: "http",
    };
    match state.route_http(api, 80, "shop", &facts) {
        RouteDecision::Matched { rule, .. } => match &rule.backends[0].backend {
            Backend::Service { service, .. } => assert_eq!(service.to_string(), "shop/mirror"),
            Backend::Invalid(why) => panic!("{why}"),
        },
        other => panic!("{other:?}"),
    }
    match state.default_backend(api, 80) {
        Backend::Service { policy, .. } => assert_eq!(
            policy.load_balancer,
            crate::istio_traffic::LoadBalancer::Random,
            "the rule's host is the entry's second host"
        ),
        Backend::Invalid(why) => panic!("{why}"),
    }
}

#[test]
fn resolution_dns_names_are_resolved_by_the_waypoint_only() {
    let mut parts = clients();
    parts.extend([
        // Its hosts are the names (no endpoints).
        entry(
            "shop",
            "search",
            "",
            "  hosts: [search.example.com, search.example.org]\n  addresses: [240.240.0.30]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: DNS_ROUND_ROBIN\n",
        ),
        // Its endpoints' names, and an address.
        entry(
            "shop",
            "mail",
            "",
            "  hosts: [mail.internal]\n  addresses: [240.240.0.31]\n  ports: [{number: 25, name: smtp, targetPort: 2525}]\n  resolution: DNS\n  endpoints:\n  - {address: mx1.example.net}\n  - {address: mx2.example.net, ports: {smtp: 587}}\n  - {address: 192.0.2.25}\n",
        ),
    ]);
    let state = build(&parts);
    let names = |host: &str| -> Vec<String> {
        state.service_by_hostname(host).expect("entry").ports[0]
            .dns
            .iter()
            .map(|n| format!("{}:{}", n.host, n.port))
            .collect()
    };
    assert_eq!(
        names("search.example.com"),
        ["search.example.com:443", "search.example.org:443"]
    );
    assert_eq!(
        names("mail.internal"),
        ["mx1.example.net:2525", "mx2.example.net:587"]
    );
    let search = state.service_by_hostname("search.example.com").unwrap();
    assert_eq!(search.dns_first_answer(), Some(true));
    // Without a waypoint the node agent cannot resolve them: its names' connections are
    // refused (the address endpoint still serves), with a warning for each entry.
    assert!(matches!(
        state.resolve_from(
            state.workload_by_name("shop", "client").map(AsRef::as_ref),
            addr("240.240.0.30:443")
        ),
        Resolution::NoEndpoint { .. }
    ));
    assert_eq!(
        resolve(&state, "shop", "240.240.0.31:25"),
        "ServiceEntry shop/mail -> 192.0.2.25:2525"
    );
    let warnings = state.warnings().join("\n");
    assert!(
        warnings
            .contains("ServiceEntry shop/search is resolved by DNS, which only a waypoint does")
            && warnings.contains("ServiceEntry shop/mail is resolved by DNS"),
        "{warnings}"
    );
}
