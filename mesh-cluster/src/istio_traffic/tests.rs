//! Tests of `VirtualService` and `DestinationRule`: parsing and checks, and how their rules route
//! (order, subsets, faults, retries, rewrites).

use std::{fmt::Write as _, sync::Arc, time::Duration};

use super::{parse_istio_duration, Abort, HashKey, LoadBalancer, LoadBalancerSettings, VsString};
use crate::{
    http_route::{Backend, RequestFacts, RouteDecision},
    k8s::{parse_documents, Filter, Object, PathMatch, PathModifier},
    tests::{assert_parse_errors, docs, opts, parse, pod, service},
    ClusterState,
};

fn vs(body: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: shop\nspec:\n{body}"
    )
}

/// The algorithm of a `loadBalancer`, when set.
fn algorithm(settings: Option<&LoadBalancerSettings>) -> Option<LoadBalancer> {
    settings.map(|s| s.algorithm.clone())
}

fn dr(body: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata:\n  name: web\n  namespace: shop\nspec:\n{body}"
    )
}

#[test]
fn parses_a_virtual_service_and_a_destination_rule() {
    let text = docs(&[
        vs(r#"  hosts: [web]
  http:
  - name: ab
    match:
    - uri: {prefix: /api}
      headers: {X-User: {exact: alice}}
      queryParams: {v: {regex: "[0-9]+"}}
      ignoreUriCase: true
      port: 80
    route:
    - destination: {host: web, subset: v2, port: {number: 80}}
      headers: {request: {set: {x-ab: "b"}}}
    fault:
      delay: {fixedDelay: 1.5s, percentage: {value: 10}}
      abort: {httpStatus: 503, percentage: {value: 2.5}}
    retries: {attempts: 3, perTryTimeout: 200ms, retryOn: "5xx,connect-failure,418,unavailable,resource-exhausted"}
    timeout: 2s
    rewrite: {uri: /v2, authority: api.internal}
    mirror: {host: shadow}
    mirrorPercentage: {value: 12.5}
  - route:
    - destination: {host: web, subset: v1}
      weight: 90
    - destination: {host: web, subset: v2}
      weight: 10
"#),
        dr(r"  host: web.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    tls: {mode: ISTIO_MUTUAL}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50, splitExternalLocalOriginErrors: true}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}
"),
    ]);
    let objects = parse_documents("istio.yaml", &text).expect("parses");
    let (Object::VirtualService(vs), Object::DestinationRule(dr)) = (&objects[0], &objects[1])
    else {
        panic!("{objects:?}");
    };
    assert!(vs.spec.mesh);
    let ab = &vs.spec.http[0];
    assert_eq!(ab.matches[0].uri, Some(VsString::Prefix("/api".into())));
    assert!(
        ab.matches[0].headers.contains_key("x-user"),
        "header names lowercased"
    );
    assert_eq!(ab.matches[0].port, Some(80));
    let fault = ab.fault.as_ref().expect("fault");
    assert_eq!(fault.delay, Some((Duration::from_millis(1500), 10.0)));
    assert_eq!(fault.abort, Some((Abort::Http(503), 2.5)));
    let retries = ab.retries.as_ref().expect("retries");
    assert_eq!(retries.attempts, 3);
    assert!(retries.retry_on.server_errors && retries.retry_on.connect_failure);
    assert_eq!(retries.retry_on.codes, vec![418]);
    assert_eq!(retries.retry_on.grpc, vec![14, 8], "gRPC statuses by name");
    assert_eq!(ab.timeout, Some(Duration::from_secs(2)));
    assert_eq!(ab.mirrors.len(), 1);
    assert_eq!(
        (ab.mirrors[0].0.host.as_str(), ab.mirrors[0].1),
        ("shadow", 12.5)
    );
    assert_eq!(vs.spec.http[1].route[0].weight, Some(90));
    let parts = &dr.spec.traffic_policy.parts;
    let least = algorithm(parts.load_balancer.as_ref());
    assert_eq!(least, Some(LoadBalancer::LeastRequest));
    let outlier = parts.outlier_detection.as_ref().expect("outlierDetection");
    // Gateway errors off unless set.
    let counts = (outlier.consecutive_5xx, outlier.consecutive_gateway);
    assert_eq!(counts, (3, 0));
    let times = (outlier.interval, outlier.base_ejection_time);
    assert_eq!(times, (Duration::from_secs(5), Duration::from_secs(60)));
    let rest = (outlier.max_ejection_percent, outlier.min_health_percent);
    assert_eq!((rest, outlier.consecutive_local_origin), ((50, 0), Some(5)));
    assert_eq!(
        dr.spec.subsets[0].traffic_policy.parts.outlier_detection, None,
        "the rule's applies"
    );
    let by_header = dr.spec.subsets[1]
        .traffic_policy
        .parts
        .load_balancer
        .as_ref();
    let header = HashKey::Header("x-user".into());
    assert_eq!(
        algorithm(by_header),
        Some(LoadBalancer::ConsistentHash(header))
    );
    assert_eq!(
        parse_istio_duration("1m30.5s").ok(),
        Some(Duration::from_millis(90_500))
    );
    assert!(parse_istio_duration("10").is_err() && parse_istio_duration("1d").is_err());
}

#[test]
fn parses_a_connection_pool_as_istio_writes_it() {
    let text = dr(r"  host: web
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
        tcpKeepalive: {time: 7200s, interval: 75s, probes: 9}
        maxConnectionDuration: 1h
        idleTimeout: 0s
      http:
        http1MaxPendingRequests: 0
        http2MaxRequests: 1000
        maxRequestsPerConnection: 10
        maxRetries: 3
        maxConcurrentStreams: 100
        idleTimeout: 10m
        h2UpgradePolicy: DEFAULT
        useClientProtocol: true
        http2KeepAlive: {interval: 30s}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 1, h2UpgradePolicy: UPGRADE}}}
");
    let objects = parse_documents("istio.yaml", &text).expect("parses");
    let Object::DestinationRule(dr) = &objects[0] else {
        panic!("{objects:?}");
    };
    let pool = dr
        .spec
        .traffic_policy
        .parts
        .connection_pool
        .as_ref()
        .expect("connectionPool");
    let secs = Duration::from_secs;
    assert_eq!(pool.max_connections, Some(100));
    assert_eq!(pool.connect_timeout, Some(Duration::from_millis(30)));
    let keepalive = pool.tcp_keepalive.as_ref().expect("tcpKeepalive");
    assert_eq!(
        (keepalive.time, keepalive.interval, keepalive.probes),
        (Some(secs(7200)), Some(secs(75)), Some(9))
    );
    assert_eq!(pool.max_connection_duration, Some(secs(3600)));
    assert_eq!(pool.tcp_idle_timeout, Some(Duration::ZERO), "0s: never");
    assert_eq!(pool.http1_max_pending_requests, None, "0 is no limit");
    assert_eq!(pool.http2_max_requests, Some(1000));
    assert_eq!(pool.max_requests_per_connection, Some(10));
    assert_eq!(
        (pool.max_retries, pool.max_concurrent_streams),
        (Some(3), Some(100))
    );
    assert_eq!(pool.idle_timeout, Some(secs(600)));
    let ping = pool.http2_keepalive.as_ref().expect("http2KeepAlive");
    assert_eq!((ping.interval, ping.timeout), (secs(30), secs(3)));
    assert!(!pool.h2_upgrade, "DEFAULT: as the client spoke");
    assert!(pool.limits());
    assert_eq!(
        dr.spec.subsets[0].traffic_policy.parts.connection_pool,
        None
    );
    assert_eq!(
        dr.spec.subsets[1]
            .traffic_policy
            .parts
            .connection_pool
            .as_ref()
            .map(|p| (p.http1_max_pending_requests, p.h2_upgrade)),
        Some((Some(1), true))
    );

    // A subset's pool replaces the rule's whole (Istio's merge), the others keep the rule's.
    let state = cluster(std::slice::from_ref(&text));
    let service = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    let policy = state.default_backend(&service, 80);
    let Backend::Service { policy, .. } = policy else {
        panic!("{policy:?}");
    };
    assert_eq!(policy.connection_pool.as_deref(), Some(pool));
    let split = vs("  hosts: [web]\n  http:\n  - route:\n    - {destination: {host: web, subset: v1}, weight: 50}\n    - {destination: {host: web, subset: v2}, weight: 50}\n");
    let state = cluster(&[text, split]);
    let RouteDecision::Matched { rule, .. } = decide(&state, "/", &[]) else {
        panic!("the VirtualService's rule");
    };
    let pools: Vec<_> = rule
        .backends
        .iter()
        .map(|b| match &b.backend {
            Backend::Service { policy, .. } => policy
                .connection_pool
                .as_ref()
                .map(|p| (p.http1_max_pending_requests, p.max_connections)),
            Backend::Invalid(why) => panic!("{why}"),
        })
        .collect();
    assert_eq!(pools, [Some((None, Some(100))), Some((Some(1), None))]);
}

#[test]
fn a_view_gives_each_merged_connection_pool_once() {
    let text = dr(r"  host: web
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 100}}
    portLevelSettings:
    - port: {number: 80}
      connectionPool: {http: {maxRetries: 1}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 1}}}
");
    let state = cluster(&[text]);
    let mut given: Vec<_> = state
        .connection_pools()
        .into_iter()
        .map(|p| {
            (
                p.max_connections,
                p.max_retries,
                p.http1_max_pending_requests,
            )
        })
        .collect();
    given.sort_unstable();
    // The rule's (its subset `v1` has the same), port 80's (which replaces it there), and
    // `v2`'s (the rule's port 80 setting replaces `v2`'s pool there too, Istio's merge).
    assert_eq!(
        given,
        [
            (None, None, Some(1)),
            (None, Some(1), None),
            (Some(100), None, None)
        ]
    );
}

#[test]
fn port_level_settings_override_part_by_part_as_istio_merges() {
    let two_ports = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: a, port: 80, targetPort: 8080}, {name: b, port: 81, targetPort: 8081}]\n  selector: {app: web}\n";
    let rule = dr(r"  host: web
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {http: {http2MaxRequests: 10}}
    portLevelSettings:
    - port: {number: 80}
      loadBalancer: {simple: LEAST_REQUEST}
    - port: {number: 9999}
      connectionPool: {http: {maxRetries: 1}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      outlierDetection: {consecutive5xxErrors: 1}
      portLevelSettings:
      - port: {number: 81}
        connectionPool: {http: {http2MaxRequests: 1}}
");
    let to_subset = vs(r"  hosts: [web]
  http:
  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: web, subset: v1, port: {number: 80}}}]
  - route: [{destination: {host: web, subset: v1, port: {number: 81}}}]
");
    let state = ClusterState::build(
        &parse(&docs(&[
            pod("shop", "web-0", "n1", "10.0.0.1", "app: web, version: v1"),
            two_ports.to_owned(),
            rule,
            to_subset,
        ])),
        &opts(),
    )
    .expect("builds");
    assert!(
        state.warnings().iter().any(|w| w.contains(
            "DestinationRule shop/web: portLevelSettings for port 9999: Service shop/web has no such port"
        )),
        "{:?}",
        state.warnings()
    );
    // (load balancer, http2MaxRequests, consecutive5xxErrors) of a backend.
    let seen = |backend: &Backend| match backend {
        Backend::Service { policy, .. } => (
            policy.load_balancer.clone(),
            policy
                .connection_pool
                .as_ref()
                .and_then(|p| p.http2_max_requests),
            policy.outlier_detection.as_ref().map(|o| o.consecutive_5xx),
        ),
        Backend::Invalid(why) => panic!("{why}"),
    };
    let service = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    // Without a subset: port 80's own load balancer, the rule's pool; port 81 the rule's.
    assert_eq!(
        seen(&state.default_backend(&service, 80)),
        (LoadBalancer::LeastRequest, Some(10), None)
    );
    assert_eq!(
        seen(&state.default_backend(&service, 81)),
        (LoadBalancer::Random, Some(10), None)
    );
    // Subset v1: its outlier detection everywhere, on port 81 its own pool, and the rule's
    // port-level load balancer on port 80 (the subset sets none).
    for (path, expected) in [
        ("/a", (LoadBalancer::LeastRequest, Some(10), Some(1))),
        ("/b", (LoadBalancer::Random, Some(1), Some(1))),
    ] {
        let RouteDecision::Matched { rule, .. } = decide(&state, path, &[]) else {
            panic!("{path}: the VirtualService's rule");
        };
        assert_eq!(seen(&rule.backends[0].backend), expected, "{path}");
    }
}

/// The Service (namespace, name) and subset a request from `client_ns` to `shop/web:80` goes
/// to, by its first backend.
fn routed_from(state: &ClusterState, client_ns: &str) -> (String, String, Option<String>) {
    let service = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    let backend = match decide_from(state, ("/", &[]), client_ns) {
        RouteDecision::Matched { rule, .. } => rule.backends[0].backend.clone(),
        RouteDecision::Default => state.default_backend(&service, 80),
        RouteDecision::NoMatch => panic!("no match from {client_ns}"),
    };
    match backend {
        Backend::Service {
            service, policy, ..
        } => (
            service.namespace.clone(),
            service.name.clone(),
            policy
                .labels
                .get("version")
                .cloned()
                .or_else(|| policy.connection_pool.as_ref().map(|_| "pool".into())),
        ),
        Backend::Invalid(why) => panic!("{why}"),
    }
}

#[test]
fn a_tenants_virtual_service_or_destination_rule_never_steers_another_namespaces_traffic() {
    // Before, rules from any namespace applied to any Service: namespace `evil` could send
    // every client's requests for `shop/web` to its own `sink` (a VirtualService), or take over
    // `web`'s subsets and limits (a DestinationRule, older or first by name).
    let evil_vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: grab, namespace: evil}\nspec:\n  hosts: [web.shop.svc.cluster.local]\n  http: [{route: [{destination: {host: sink}}]}]\n";
    let evil_dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: grab, namespace: evil}\nspec:\n  host: web.shop\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}\n  subsets: [{name: v1, labels: {version: v2}}]\n";
    let own_dr = dr("  host: web\n  subsets: [{name: v1, labels: {version: v1}}]\n");
    let own_vs =
        vs("  hosts: [web]\n  http: [{route: [{destination: {host: web, subset: v1}}]}]\n");
    let state = cluster(&[
        pod("evil", "sink-0", "n1", "10.0.1.1", "app: sink"),
        service("evil", "sink", "10.96.1.1", "80", "8080", "app: sink"),
        evil_vs.to_owned(),
        evil_dr.to_owned(),
        own_dr,
        own_vs,
    ]);
    let web_v1 = ("shop".to_owned(), "web".to_owned(), Some("v1".to_owned()));
    assert_eq!(routed_from(&state, "shop"), web_v1, "shop's own rules");
    assert_eq!(
        routed_from(&state, "client"),
        web_v1,
        "any other client too"
    );
    // `evil`'s VirtualService routes `evil`'s own requests only (a consumer route).
    assert_eq!(
        routed_from(&state, "evil"),
        ("evil".to_owned(), "sink".to_owned(), None)
    );
    assert!(
        state.warnings().iter().any(|w| w.contains(
            "DestinationRule evil/grab: spec.host: Service shop/web is in another namespace"
        )),
        "{:?}",
        state.warnings()
    );

    // From the root namespace a rule applies to any Service (the mesh's operators), after the
    // Service's own namespace's.
    let root_dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: mesh-wide, namespace: istio-system}\nspec:\n  host: web.shop.svc.cluster.local\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}\n";
    let state = cluster(&[root_dr.to_owned()]);
    assert_eq!(
        routed_from(&state, "client"),
        ("shop".to_owned(), "web".to_owned(), Some("pool".to_owned()))
    );
    let state = cluster(&[root_dr.to_owned(), dr("  host: web\n")]);
    assert_eq!(
        routed_from(&state, "client"),
        ("shop".to_owned(), "web".to_owned(), None),
        "the Service's own namespace's rule, though younger by name"
    );
}

#[test]
fn connection_pool_checks_name_the_field_and_line() {
    assert_parse_errors(&[
        (
            dr("  host: web\n  trafficPolicy:\n    portLevelSettings:\n    - {port: {number: 80}}\n    - {port: {number: 80}, loadBalancer: {simple: RANDOM}}\n"),
            &["spec: trafficPolicy.portLevelSettings: port 80 is set more than once"],
        ),
        (
            dr("  host: web\n  trafficPolicy:\n    portLevelSettings:\n    - {loadBalancer: {simple: RANDOM}}\n"),
            &["spec.trafficPolicy.portLevelSettings[0]: set exactly one of `port.number`", "line 10"],
        ),
        (
            dr("  host: web\n  trafficPolicy:\n    portLevelSettings:\n    - {port: {number: 80}, tls: {mode: SIMPLE}}\n"),
            &["spec.trafficPolicy.portLevelSettings[0]: trafficPolicy.tls.mode SIMPLE"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {}}\n"),
            &["spec.trafficPolicy.connectionPool: set exactly one of `tcp` or `http`, or both"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: -1}}}\n"),
            &["spec.trafficPolicy.connectionPool: http.http1MaxPendingRequests must not be negative", "found -1"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}\n"),
            &["tcp.connectTimeout must be at least 1ms"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {tcp: {maxConections: 1}}}\n"),
            &["unknown field `maxConections`"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true}}}\n"),
            &["h2UpgradePolicy UPGRADE and http.useClientProtocol true contradict each other"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: ALWAYS}}}\n"),
            &["set exactly one of DEFAULT, DO_NOT_UPGRADE, UPGRADE for `http.h2UpgradePolicy`"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {connectionPool: {http: {maxConcurrentStreams: -1}}}\n"),
            &["http.maxConcurrentStreams must not be negative"],
        ),
        (
            dr("  host: web\n  subsets:\n  - name: v1\n    trafficPolicy: {connectionPool: {http: {http2KeepAlive: {timeout: 1s}}}}\n"),
            &["spec.subsets[0].trafficPolicy.connectionPool: set exactly one of `interval` for `http.http2KeepAlive`", "line 10"],
        ),
    ]);
}

#[test]
fn checks_name_the_field_and_line() {
    // 65 regular expressions in one object: more than a waypoint compiles for it.
    let many = (0..65).fold(String::new(), |mut text, i| {
        let _ = write!(
            text,
            "  - match: [{{uri: {{regex: \"/p{i}/.*\"}}}}]\n    route: [{{destination: {{host: web}}}}]\n"
        );
        text
    });
    assert_parse_errors(&[
        (
            vs(&format!("  hosts: [web]\n  http:\n{many}")),
            &["VirtualService shop/web: spec", "at most 64 regular expressions across all rules, found 65"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    delegate: {name: other}\n"),
            &["VirtualService shop/web: spec.http[0]: `delegate` is not supported", "line 9"],
        ),
        (vs("  hosts: [web]\n  delegate: {name: x}\n"), &["unknown field `delegate`"]),
        (
            vs("  hosts: [web]\n  http:\n  - match: [{uri: {exact: /a, prefix: /b}}]\n    route: [{destination: {host: web}}]\n"),
            &["spec.http[0].match[0].uri: set exactly one of `exact`, `prefix`, `regex`", "line 9"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    fault: {abort: {httpStatus: 700}}\n"),
            &["700 is not an HTTP status"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n"),
            &["percentage 101 is out of range"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    retries: {attempts: 2, retryOn: \"sometimes\"}\n"),
            &["unknown retryOn condition \"sometimes\""],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    timeout: 10\n"),
            &["spec.http[0].timeout", "\"10\" is not a duration"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web}\n      weight: 50\n    - destination: {host: web2}\n"),
            &["set exactly one of `weight` on every destination"],
        ),
        (vs("  hosts: [web]\n  http:\n  - {}\n"), &["set exactly one of `route`, `redirect` and `directResponse`"]),
        (
            dr("  host: web\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n"),
            &["DestinationRule shop/web: spec.trafficPolicy.loadBalancer: set exactly one of ROUND_ROBIN"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {outlierDetection: {consecutiveLocalOriginFailures: -1}}\n"),
            &["outlierDetection"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}\n"),
            &["percentage 150 is out of range"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {outlierDetection: {baseEjectionTime: soon}}\n"),
            &["\"soon\" is not a duration"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {tls: {mode: SIMPLE}}\n"),
            &["spec: trafficPolicy.tls.mode SIMPLE: the waypoint reaches the mesh's endpoints over HBONE"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, sni: x}}\n"),
            &["unknown field `sni`"],
        ),
        (
            dr("  host: web\n  subsets: [{name: v1, labelz: {a: b}}]\n"),
            &["spec.subsets[0]: unknown field `labelz`"],
        ),
    ]);
}

#[test]
fn match_abort_and_cookie_checks_name_the_field_and_line() {
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    fault: {abort: {grpcStatus: \"14\"}}\n"),
            &["spec.http[0]: \"14\" is not a gRPC status name", "line 9"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    fault: {abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}}\n"),
            &["set exactly one of `httpStatus`, `grpcStatus`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    fault: {abort: {http2Error: REFUSED_STREAM}}\n"),
            &["`http2Error` is not supported"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - match: [{withoutHeaders: {x-a: {exact: a, regex: b}}}]\n    route: [{destination: {host: web}}]\n"),
            &["spec.http[0].match[0].withoutHeaders.x-a: set exactly one of `exact`, `prefix`, `regex`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - directResponse: {status: 99}\n"),
            &["spec.http[0]: 99 is not an HTTP status"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - directResponse: {status: 200, body: {string: a, bytes: YQ==}}\n"),
            &["set exactly one of `string`, `bytes` in `body`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - directResponse: {status: 200}\n    route: [{destination: {host: web}}]\n"),
            &["set exactly one of `route`, `redirect` and `directResponse`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - directResponse: {status: 200}\n    mirror: {host: web}\n"),
            &["set exactly one of `directResponse` and a mirror"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    mirror: {host: a}\n    mirrors: [{destination: {host: b}}]\n"),
            &["set exactly one of `mirror` and `mirrors`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    corsPolicy: {allowMethods: [\"GET POST\"]}\n"),
            &["spec.http[0]: \"GET POST\" is not an HTTP method"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    corsPolicy: {exposeHeaders: [\"x\\r\\nset-cookie: a=b\"]}\n"),
            &["is not an HTTP header or parameter name"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    corsPolicy: {unmatchedPreflights: DROP}\n"),
            &["set exactly one of FORWARD, IGNORE for `unmatchedPreflights`"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: \"a;b\", ttl: 0s}}}}\n"),
            &["spec.trafficPolicy.loadBalancer", "cookie name \"a;b\" is not a token"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: a, path: \"/x; Domain=evil\"}}}}\n"),
            &["cookie path \"/x; Domain=evil\" has a space, a `;`"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: a, ttl: forever}}}}\n"),
            &["\"forever\" is not a duration"],
        ),
        (
            dr("  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x, httpQueryParameterName: y}}}\n"),
            &["set exactly one of `httpHeaderName`, `httpCookie`, `useSourceIp`, `httpQueryParameterName`"],
        ),
    ]);
}

/// `shop/web` (VIP 10.96.0.1:80, pods web-0 `version: v1`, web-1 `version: v2`) with `extra`.
fn cluster(extra: &[String]) -> ClusterState {
    let mut parts = vec![
        pod("shop", "web-0", "n1", "10.0.0.1", "app: web, version: v1"),
        pod("shop", "web-1", "n1", "10.0.0.2", "app: web, version: v2"),
        service("shop", "web", "10.96.0.1", "80", "8080", "app: web"),
    ];
    parts.extend(extra.iter().cloned());
    ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
}

fn decide<'a>(state: &'a ClusterState, path: &str, headers: &[(&str, &str)]) -> RouteDecision<'a> {
    decide_from(state, (path, headers), "client")
}

/// What `state` decides for a GET of `path` with `headers` to `shop/web:80` from a client in
/// `client_ns`.
fn decide_from<'a>(
    state: &'a ClusterState,
    (path, headers): (&str, &[(&str, &str)]),
    client_ns: &str,
) -> RouteDecision<'a> {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    // Leaked for the test: the decision borrows the state only.
    let map: &'static http::HeaderMap = Box::leak(Box::new(map));
    let path: &'static str = Box::leak(path.to_owned().into_boxed_str());
    let service = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    let facts = RequestFacts {
        method: &http::Method::GET,
        path,
        query: None,
        headers: map,
        authority: None,
        scheme: "http",
    };
    state.route_http(&service, 80, client_ns, &facts)
}

#[test]
fn virtual_service_rules_route_in_order_to_subsets() {
    let state = cluster(&[
        vs(r"  hosts: [web]
  http:
  - name: alice
    match: [{headers: {x-user: {exact: alice}}}]
    route: [{destination: {host: web, subset: v2}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
  - name: api
    match: [{uri: {prefix: /api}}]
    rewrite: {uri: /v2}
    route: [{destination: {host: web, subset: v1}}]
  - name: rest
    route:
    - {destination: {host: web, subset: v1}, weight: 75}
    - {destination: {host: web, subset: v3}, weight: 25}
"),
        dr("  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n"),
    ]);
    let rule = |d: RouteDecision<'_>| match d {
        RouteDecision::Matched { rule, .. } => rule.name.clone().unwrap_or_default(),
        other => panic!("{other:?}"),
    };
    // In order: alice's header wins over the later `/api` prefix, as Istio orders rules.
    assert_eq!(
        rule(decide(&state, "/api/x", &[("x-user", "alice")])),
        "alice"
    );
    assert_eq!(
        rule(decide(&state, "/apix", &[])),
        "api",
        "a plain string prefix"
    );
    assert_eq!(rule(decide(&state, "/", &[])), "rest");
    let RouteDecision::Matched { rule: alice, .. } = decide(&state, "/", &[("x-user", "alice")])
    else {
        panic!("alice");
    };
    assert_eq!(
        alice.fault.as_ref().and_then(|f| f.abort),
        Some((Abort::Http(418), 100.0))
    );
    match &alice.backends[0].backend {
        Backend::Service { policy, .. } => {
            assert_eq!(policy.subset.as_deref(), Some("v2"));
            let web = state
                .service_by_hostname("web.shop.svc.cluster.local")
                .unwrap();
            let admitted: Vec<_> = web.ports[0]
                .endpoints
                .iter()
                .filter(|e| policy.admits(e))
                .collect();
            assert_eq!(admitted.len(), 1);
            assert_eq!(admitted[0].addr.ip().to_string(), "10.0.0.2");
        }
        other @ Backend::Invalid(_) => panic!("{other:?}"),
    }
    let retry = alice.retry.as_ref().expect("Istio's default retries");
    assert_eq!(
        (
            retry.attempts,
            retry.on.codes.clone(),
            retry.on.grpc.clone()
        ),
        (Some(2), vec![503], vec![1, 14]),
        "Istio's default: 503, connection failures, CANCELLED and UNAVAILABLE"
    );
    let RouteDecision::Matched {
        rule: api, matched, ..
    } = decide(&state, "/api/x", &[])
    else {
        panic!("api");
    };
    assert_eq!(matched.path, PathMatch::RawPrefix("/api".into()));
    assert!(
        matches!(&api.filters[0], Filter::UrlRewrite(r) if r.path == Some(PathModifier::Matched("/v2".into())))
    );
    // A subset no DestinationRule defines: that share gets a 500, and a warning says why.
    let RouteDecision::Matched { rule: rest, .. } = decide(&state, "/", &[]) else {
        panic!("rest");
    };
    assert!(matches!(rest.backends[1].backend, Backend::Invalid(_)));
    assert!(
        state.warnings().iter().any(|w| w.contains("VirtualService shop/web: destination web: no DestinationRule of Service shop/web defines subset \"v3\"")),
        "{:?}",
        state.warnings()
    );
}

#[test]
fn matches_on_presence_absence_authority_and_scheme_and_a_grpc_abort() {
    let state = cluster(&[
        vs(r"  hosts: [web]
  http:
  - name: canary-testers
    match: [{headers: {x-canary: {}}, withoutHeaders: {x-opt-out: {}}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: web, subset: v2}}]
  - name: not-internal
    match: [{withoutHeaders: {x-team: {prefix: internal-}}, authority: {prefix: web.shop}, scheme: {exact: http}}]
    route: [{destination: {host: web, subset: v2}}]
  - name: rest
    match: [{uri: {}, method: {}}]
    route: [{destination: {host: web, subset: v1}}]
"),
        dr("  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n"),
    ]);
    let service = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    let rule = |headers: &[(&str, &str)], authority: Option<&str>| {
        let mut map = http::HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let facts = RequestFacts {
            method: &http::Method::GET,
            path: "/",
            query: None,
            headers: &map,
            authority,
            scheme: "http",
        };
        match state.route_http(&service, 80, "shop", &facts) {
            RouteDecision::Matched { rule, .. } => (
                rule.name.clone().unwrap_or_default(),
                rule.fault.as_ref().and_then(|f| f.abort),
            ),
            other => panic!("{other:?}"),
        }
    };
    let web = Some("web.shop.svc.cluster.local");
    // `{}`: the header is there, whatever its value (empty too); `withoutHeaders` `{}`: absent.
    assert_eq!(rule(&[("x-canary", "")], web).0, "canary-testers");
    assert_eq!(
        rule(&[("x-canary", "yes")], None),
        ("canary-testers".to_owned(), Some((Abort::Grpc(14), 100.0)))
    );
    assert_eq!(
        rule(&[("x-canary", "yes"), ("x-opt-out", "1")], web).0,
        "not-internal"
    );
    // `withoutHeaders` with a value: absent, or another value; the authority by prefix.
    assert_eq!(rule(&[("x-team", "internal-ops")], web).0, "rest");
    assert_eq!(rule(&[("x-team", "sales")], web).0, "not-internal");
    assert_eq!(rule(&[], web).0, "not-internal");
    assert_eq!(rule(&[], Some("other.shop")).0, "rest");
    assert_eq!(rule(&[], None).0, "rest", "no authority: its match fails");
}

#[test]
fn a_cors_policy_reads_as_istio_writes_it_and_goes_first_among_the_filters() {
    let state = cluster(&[vs(r#"  hosts: [web]
  http:
  - name: app
    corsPolicy:
      allowOrigins: [{exact: "https://app.example"}, {regex: 'https://.*\.shop\.example'}]
      allowMethods: [GET, POST]
      allowHeaders: [x-user]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
    headers: {response: {set: {x-served: waypoint}}}
    route: [{destination: {host: web}}]
"#)]);
    let RouteDecision::Matched { rule, .. } = decide(&state, "/", &[]) else {
        panic!("app");
    };
    let [Filter::Cors(cors), Filter::ResponseHeaderModifier(_)] = rule.filters.as_slice() else {
        panic!("{:?}", rule.filters);
    };
    assert!(cors.allows("https://app.example") && cors.allows("https://a.shop.example"));
    assert!(!cors.allows("https://app.example.evil"));
    assert_eq!(cors.max_age, Some(86_400));
    assert!(cors.allow_credentials);
    assert_eq!(
        cors.unmatched_preflights,
        crate::cors::UnmatchedPreflights::Ignore
    );
    // The deprecated `allowOrigin`: `*` allows every origin.
    let objects = parse_documents(
        "istio.yaml",
        &vs("  hosts: [web]\n  http:\n  - corsPolicy: {allowOrigin: [\"*\"]}\n    route: [{destination: {host: web}}]\n"),
    )
    .expect("parses");
    let Object::VirtualService(vs) = &objects[0] else {
        panic!("{objects:?}");
    };
    assert!(vs.spec.http[0]
        .cors
        .as_ref()
        .unwrap()
        .allows("https://any.example"));
}

#[test]
fn direct_responses_and_several_mirrors_read_as_istio_writes_them() {
    let text = vs(r#"  hosts: [web]
  http:
  - name: down
    match: [{uri: {prefix: /down}}]
    directResponse: {status: 503, body: {string: '{"error": "down"}'}}
    headers: {response: {set: {content-type: application/json}}}
  - name: bytes
    match: [{uri: {prefix: /bytes}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - name: empty
    match: [{uri: {prefix: /empty}}]
    directResponse: {status: 204}
  - name: shadowed
    route: [{destination: {host: web, subset: v1}}]
    mirrors:
    - {destination: {host: web, subset: v2}, percentage: {value: 25}}
    - destination: {host: shadow}
"#);
    let objects = parse_documents("istio.yaml", &text).expect("parses");
    let Object::VirtualService(vs) = &objects[0] else {
        panic!("{objects:?}");
    };
    let direct = |i: usize| {
        let d = vs.spec.http[i]
            .direct_response
            .as_ref()
            .expect("directResponse");
        (d.status, String::from_utf8_lossy(&d.body).into_owned())
    };
    assert_eq!(direct(0), (503, r#"{"error": "down"}"#.to_owned()));
    assert_eq!(direct(1), (200, "hello".to_owned()), "bytes are base64");
    assert_eq!(direct(2), (204, String::new()));
    let mirrors: Vec<(&str, Option<&str>, f64)> = vs.spec.http[3]
        .mirrors
        .iter()
        .map(|(t, share)| (t.host.as_str(), t.subset.as_deref(), *share))
        .collect();
    assert_eq!(
        mirrors,
        [("web", Some("v2"), 25.0), ("shadow", None, 100.0)]
    );
    // In the waypoint's rules: the direct response, and a mirror filter per mirror.
    let state = cluster(&[
        text,
        dr("  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n"),
    ]);
    let RouteDecision::Matched { rule, .. } = decide(&state, "/down/x", &[]) else {
        panic!("down");
    };
    assert_eq!(rule.direct_response.as_ref().map(|d| d.status), Some(503));
    let RouteDecision::Matched { rule, .. } = decide(&state, "/", &[]) else {
        panic!("shadowed");
    };
    let shares: Vec<u32> = rule
        .filters
        .iter()
        .filter_map(|f| match f {
            Filter::RequestMirror(m) => Some(m.numerator),
            _ => None,
        })
        .collect();
    assert_eq!(shares, [250_000, 1_000_000]);
    assert_eq!(rule.mirrors.len(), 2);
}

#[test]
fn tcp_rules_take_a_ports_connections_by_weight_for_their_clients() {
    let subsets = dr("  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n");
    let tenant = r"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mine, namespace: evil}
spec:
  hosts: [web.shop]
  tcp:
  - route: [{destination: {host: web.shop, subset: v1}}]
";
    let state = cluster(&[
        vs(r"  hosts: [web]
  tcp:
  - match: [{port: 9999}]
    route: [{destination: {host: web, subset: v1}}]
  - match: [{port: 80}, {port: 9999}]
    route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web, subset: v2}, weight: 10}
"),
        subsets,
        tenant.to_owned(),
    ]);
    let web = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    let rule = state.route_tcp(&web, 80, "shop").expect("port 80's rule");
    let subset_of = |roll: u64| match &rule.pick_backend(roll).unwrap().backend {
        Backend::Service { policy, .. } => policy.subset.clone().unwrap_or_default(),
        other @ Backend::Invalid(_) => panic!("{other:?}"),
    };
    assert_eq!(
        (subset_of(0), subset_of(89), subset_of(90), subset_of(99)),
        ("v1".into(), "v1".into(), "v2".into(), "v2".into())
    );
    // Another namespace's rule routes its own clients only.
    let evil = state.route_tcp(&web, 80, "evil").expect("its own rule");
    assert_eq!(evil.backends.len(), 1);
    assert!(
        state.route_tcp(&web, 81, "shop").is_none(),
        "no such port: the Service itself"
    );
    // A `tcp` rule alone does not make a port HTTP.
    let port = &web.ports[0];
    assert_eq!(state.waypoint_protocol(&web, port), port.app_protocol);
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  tcp:\n  - match: [{sourceLabels: {app: a}}]\n    route: [{destination: {host: web}}]\n"),
            &["spec.tcp[0]: `sourceLabels` is not supported"],
        ),
        (
            vs("  hosts: [web]\n  tcp:\n  - route:\n    - {destination: {host: web}, weight: 50}\n    - {destination: {host: web}}\n"),
            &["set exactly one of `weight` on every destination"],
        ),
        (vs("  hosts: [web]\n  tcp:\n  - match: [{port: 80}]\n"), &["spec.tcp[0]: set exactly one of `route`"]),
    ]);
}

#[test]
fn export_to_narrows_the_clients_a_virtual_service_routes() {
    let subsets = dr("  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n");
    let own = vs("  hosts: [web]\n  exportTo: [\".\", team]\n  http:\n  - route: [{destination: {host: web, subset: v2}}]\n  tcp:\n  - route: [{destination: {host: web, subset: v2}}]\n");
    let tenant = r"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mine, namespace: evil}
spec:
  hosts: [web.shop]
  exportTo: [shop]
  http:
  - route: [{destination: {host: web.shop, subset: v1}}]
";
    let state = cluster(&[own, subsets, tenant.to_owned()]);
    let version = |client: &str| routed_from(&state, client).2;
    // Its own namespace's and `team`'s clients: routed; any other's: the Service itself.
    assert_eq!(version("shop").as_deref(), Some("v2"));
    assert_eq!(version("team").as_deref(), Some("v2"));
    assert_eq!(
        version("other"),
        None,
        "not exported there: the Service itself"
    );
    let web = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    assert!(state.route_tcp(&web, 80, "team").is_some());
    assert!(state.route_tcp(&web, 80, "other").is_none());
    // A tenant's rule exported only to the Service's namespace applies to nobody, said so.
    assert_eq!(version("evil"), None);
    assert!(
        state
            .warnings()
            .iter()
            .any(|w| w.contains("VirtualService evil/mine: exportTo leaves out its own namespace")),
        "{:?}",
        state.warnings()
    );
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  exportTo: [\"*\", shop]\n"),
            &["spec: exportTo: \"* with other entries\""],
        ),
        (
            vs("  hosts: [web]\n  exportTo: [Not_A_Namespace]\n"),
            &["exportTo: \"Not_A_Namespace\" is not `.`, `*` (alone) or a namespace name"],
        ),
    ]);
}

#[test]
fn tls_rules_take_connections_by_the_server_name_they_ask_for() {
    let subsets = dr("  host: web\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n");
    let state = cluster(&[
        vs(r#"  hosts: [web]
  tls:
  - match: [{sniHosts: [a.example], port: 80}]
    route: [{destination: {host: web, subset: v1}}]
  - match: [{sniHosts: ["*.example"]}, {sniHosts: [other.test], port: 9999}]
    route: [{destination: {host: web, subset: v2}}]
"#),
        subsets,
    ]);
    let web = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .unwrap(),
    );
    assert!(state.tls_routes_attach(&web, 80));
    let subset = |sni: &str| {
        state
            .route_tls(&web, 80, "shop", sni)
            .map(|rule| match &rule.backends[0].backend {
                Backend::Service { policy, .. } => policy.subset.clone().unwrap_or_default(),
                other @ Backend::Invalid(_) => panic!("{other:?}"),
            })
    };
    assert_eq!(
        subset("a.example").as_deref(),
        Some("v1"),
        "the first rule that takes it"
    );
    assert_eq!(
        subset("B.Example").as_deref(),
        Some("v2"),
        "by wildcard, any case"
    );
    assert_eq!(
        subset("example"),
        None,
        "a wildcard takes names under the domain only"
    );
    assert_eq!(subset("other.test"), None, "that match is for port 9999");
    assert!(super::sni_matches("*", "anything.at.all"));
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  tls:\n  - route: [{destination: {host: web}}]\n"),
            &["spec.tls[0]: set exactly one of `match` (with `sniHosts`)"],
        ),
        (
            vs("  hosts: [web]\n  tls:\n  - match: [{sniHosts: [\"bad name\"]}]\n    route: [{destination: {host: web}}]\n"),
            &["\"bad name\" is not a hostname"],
        ),
        (
            vs("  hosts: [web]\n  tls:\n  - match: [{sniHosts: [a.example], sourceLabels: {app: a}}]\n    route: [{destination: {host: web}}]\n"),
            &["`sourceLabels` is not supported"],
        ),
    ]);
}

#[test]
fn uri_regex_rewrites_as_istio_documents_them() {
    use crate::gateway_api::RegexRewrite;
    // Istio's example, its second group starting with its own `/`.
    let groups = RegexRewrite::new("^/service/([^/]+)(/.*)$", r"/customprefix\2/\1").unwrap();
    assert_eq!(
        groups.apply("/service/update/v1/api"),
        "/customprefix/v1/api/update"
    );
    let any_case = RegexRewrite::new("(?i)/xxx/", "/yyy/").unwrap();
    assert_eq!(any_case.apply("/aaa/XxX/bbb"), "/aaa/yyy/bbb");
    // A `$` in the rewrite is itself; `\\` a backslash; no match: the path as it was.
    let literal = RegexRewrite::new("^/a", r"/$x\\").unwrap();
    assert_eq!(literal.apply("/a/b"), r"/$x\/b");
    assert_eq!(literal.apply("/z"), "/z");
    let state = cluster(&[vs(r"  hosts: [web]
  http:
  - rewrite: {uriRegexRewrite: {match: '^/v1/(.*)$', rewrite: '/api/\1'}}
    route: [{destination: {host: web}}]
")]);
    let RouteDecision::Matched { rule, .. } = decide(&state, "/", &[]) else {
        panic!("the rule");
    };
    assert!(matches!(
        &rule.filters[0],
        Filter::UrlRewrite(r) if matches!(&r.path, Some(PathModifier::Regex(_)))
    ));
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  http:\n  - rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}\n    route: [{destination: {host: web}}]\n"),
            &["set exactly one of `uri`, `uriRegexRewrite`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - rewrite: {uriRegexRewrite: {match: \"(\", rewrite: b}}\n    route: [{destination: {host: web}}]\n"),
            &["\"(\" is not a regular expression"],
        ),
    ]);
}

#[test]
fn deprecated_whole_percentages_still_read() {
    let text = vs(r"  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
    fault: {delay: {fixedDelay: 1s, percent: 30}}
    mirror: {host: web}
    mirrorPercent: 20
    retries: {attempts: 2, retryRemoteLocalities: true, retryOn: 'retriable-4xx,envoy-ratelimited'}
");
    let objects = parse_documents("istio.yaml", &text).expect("parses");
    let Object::VirtualService(read) = &objects[0] else {
        panic!("{objects:?}");
    };
    let http = &read.spec.http[0];
    assert_eq!(
        http.fault.as_ref().and_then(|f| f.delay),
        Some((Duration::from_secs(1), 30.0))
    );
    assert!((http.mirrors[0].1 - 20.0).abs() < f64::EPSILON);
    let on = &http.retries.as_ref().expect("retries").retry_on;
    assert!(
        on.answer(409, None, false) && on.answer(429, None, true) && !on.answer(429, None, false)
    );
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    fault: {delay: {fixedDelay: 1s, percent: 30, percentage: {value: 1}}}\n"),
            &["set exactly one of `percentage`, `percent`"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    mirror: {host: web}\n    mirrorPercent: 101\n"),
            &["percentage 101 is out of range"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    retries: {attempts: 2, retryRemoteLocalities: false}\n"),
            &["`retryRemoteLocalities: false` is not supported"],
        ),
    ]);
}

#[test]
fn a_destination_rule_hashes_on_a_made_up_cookie_or_a_query_parameter() {
    let text = dr(r"  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: route
          ttl: 1h
          path: /
          attributes: [{name: SameSite, value: Lax}, {name: Secure}]
        ringHash: {minimumRingSize: 1024}
  subsets:
  - name: by-user
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: user, maglev: {tableSize: 65537}}}}
");
    let objects = parse_documents("istio.yaml", &text).expect("parses");
    let Object::DestinationRule(dr) = &objects[0] else {
        panic!("{objects:?}");
    };
    let Some(LoadBalancer::ConsistentHash(HashKey::Cookie(cookie))) =
        algorithm(dr.spec.traffic_policy.parts.load_balancer.as_ref())
    else {
        panic!("{dr:?}");
    };
    assert_eq!(cookie.ttl, Some(Duration::from_secs(3600)));
    assert_eq!(
        cookie.set_cookie("0123abcd"),
        "route=\"0123abcd\"; Max-Age=3600; Path=/; SameSite=Lax; Secure; HttpOnly"
    );
    assert_eq!(
        algorithm(
            dr.spec.subsets[0]
                .traffic_policy
                .parts
                .load_balancer
                .as_ref()
        ),
        Some(LoadBalancer::ConsistentHash(HashKey::QueryParameter(
            "user".into()
        )))
    );
}

#[test]
fn http_routes_come_first_and_ingress_virtual_services_are_skipped() {
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules:\n  - name: gateway-api\n    backendRefs: [{name: web, port: 80}]\n".to_owned();
    let virtual_service =
        vs("  hosts: [web]\n  http:\n  - name: istio\n    route: [{destination: {host: web}}]\n");
    let state = cluster(&[route, virtual_service.clone()]);
    assert!(
        matches!(decide(&state, "/", &[]), RouteDecision::Matched { rule, .. } if rule.name.as_deref() == Some("gateway-api"))
    );
    let state = cluster(&[virtual_service]);
    assert!(
        matches!(decide(&state, "/", &[]), RouteDecision::Matched { rule, .. } if rule.name.as_deref() == Some("istio"))
    );
    let ingress = vs("  hosts: [web]\n  gateways: [istio-system/ingress]\n  http:\n  - route: [{destination: {host: web}}]\n");
    let state = cluster(&[ingress]);
    assert!(matches!(decide(&state, "/", &[]), RouteDecision::Default));
    // A host that names no Service, and a DestinationRule of none.
    let state = cluster(&[
        vs("  hosts: [nope]\n  http:\n  - route: [{destination: {host: web}}]\n"),
        dr("  host: gone\n"),
    ]);
    let warnings = state.warnings().join("\n");
    assert!(
        warnings.contains("VirtualService shop/web: spec.hosts[0]: \"nope\" names no Service"),
        "{warnings}"
    );
    assert!(
        warnings.contains("DestinationRule shop/web: spec.host: \"gone\" names no Service"),
        "{warnings}"
    );
}

#[test]
fn header_operations_are_checked_when_read() {
    // Before, a name or value HTTP refuses was read, then skipped with a warning at every
    // request.
    assert_parse_errors(&[
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    headers: {request: {set: {\"x a\": b}}}\n"),
            &["VirtualService shop/web: spec.http[0]", "\"x a\" is not an HTTP header", "line 9"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    headers: {response: {add: {x-a: \"line\\nbreak\"}}}\n"),
            &["spec.http[0]", "the value of header \"x-a\" holds a control character", "line 9"],
        ),
        (
            vs("  hosts: [web]\n  http:\n  - route:\n    - destination: {host: web}\n      headers: {request: {remove: [\"x:y\"]}}\n"),
            &["spec.http[0].route[0]", "\"x:y\" is not an HTTP header"],
        ),
    ]);
    // Bytes past ASCII are allowed, as Envoy allows them.
    let state = cluster(&[vs(
        "  hosts: [web]\n  http:\n  - route: [{destination: {host: web}}]\n    headers: {request: {set: {x-name: café}}}\n",
    )]);
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
}

#[test]
fn a_locality_lb_setting_is_read_as_istio_writes_it() {
    let text = dr(r#"  host: web
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        distribute:
        - from: region1/zone1/*
          to: {"region1/zone1/*": 70, "region1/zone2/*": 20, "region3/zone4/*": 10}
    outlierDetection: {consecutive5xxErrors: 100, interval: 1s, baseEjectionTime: 1m}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        simple: RANDOM
        localityLbSetting:
          failover: [{from: region1, to: region2}]
          failoverPriority: [topology.kubernetes.io/zone, "tier=gold"]
"#);
    let objects = parse_documents("istio.yaml", &text).expect("parses");
    let Object::DestinationRule(rule) = &objects[0] else {
        panic!("{objects:?}");
    };
    let own = rule
        .spec
        .traffic_policy
        .parts
        .load_balancer
        .as_ref()
        .expect("loadBalancer");
    // Only `localityLbSetting`: round robin within it.
    assert_eq!(own.algorithm, LoadBalancer::RoundRobin);
    let locality = own.locality.as_ref().expect("localityLbSetting");
    assert!(locality.enabled && locality.failover.is_empty());
    assert_eq!(locality.distribute[0].to.len(), 3);
    let subset = rule.spec.subsets[0]
        .traffic_policy
        .parts
        .load_balancer
        .as_ref()
        .unwrap();
    assert_eq!(subset.algorithm, LoadBalancer::Random);
    let subset = subset.locality.as_ref().unwrap();
    assert_eq!(
        subset.failover,
        [("region1".to_owned(), "region2".to_owned())]
    );
    assert_eq!(subset.failover_priority[1].value.as_deref(), Some("gold"));
}

#[test]
fn locality_lb_setting_checks_name_the_field_and_line() {
    let lb = |setting: &str| {
        dr(&format!(
            "  host: web\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n{setting}"
        ))
    };
    assert_parse_errors(&[
        (
            lb("        distribute: [{from: r1/z1/*, to: {r1/z1/*: 70}}]\n        failover: [{from: r1, to: r2}]\n"),
            &["spec.trafficPolicy.loadBalancer.localityLbSetting: `distribute` and `failover` cannot both be set", "line 11"],
        ),
        (
            lb("        distribute: [{from: r1/z1/*, to: {r1/z1/*: 70, r1/z2/*: 20}}]\n"),
            &["distribute from \"r1/z1/*\": the weights add up to 90, not 100"],
        ),
        (
            lb("        distribute: [{from: r1/*/z1, to: {r1/*: 100}}]\n"),
            &["\"r1/*/z1\" is not a locality"],
        ),
        (
            lb("        failover: [{from: r1/z1, to: r2}]\n"),
            &["failover: \"r1/z1\" is not a region"],
        ),
        (
            lb("        failover: [{from: r1, to: r1}]\n"),
            &["failover from \"r1\" to itself"],
        ),
        (
            lb("        failover: [{from: r1, to: r2}, {from: r1, to: r3}]\n"),
            &["\"r1\" is given twice"],
        ),
        (
            lb("        failoverPriority: [\"=gold\"]\n"),
            &["failoverPriority: \"=gold\" is not a label"],
        ),
        (
            lb("        spread: true\n"),
            &["unknown field `spread`"],
        ),
    ]);
}
