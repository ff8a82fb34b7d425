//! Tests of endpoint picking.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use http::HeaderMap;
use mesh_cluster::{
    k8s::{parse_documents, HashCookie, HashKey, LoadBalancer, OutlierDetection},
    ClusterState, EndpointPolicy, EnrollmentOptions, Service,
};

use super::{cookie_to_set, Answer, Balancer, Keys};

/// Service `shop/web` with pods `web-0..n` (labels `version: v<i % 2>`), all ready.
fn service(n: usize) -> (ClusterState, Arc<Service>) {
    let mut text = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, targetPort: 8080}]\n  selector: {app: web}\n",
    );
    for i in 0..n {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, namespace: shop, labels: {{app: web, version: v{}}}}}\nspec: {{nodeName: n1}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.0.0.{}}}]}}\n",
            i % 2,
            i + 1
        );
    }
    let objects = parse_documents("t.yaml", &text).expect("parses");
    let state = ClusterState::build(&objects, &EnrollmentOptions::new("n0")).expect("builds");
    let svc = Arc::clone(
        state
            .service_by_hostname("web.shop.svc.cluster.local")
            .expect("web"),
    );
    (state, svc)
}

fn policy(lb: LoadBalancer, labels: &[(&str, &str)]) -> EndpointPolicy {
    EndpointPolicy {
        subset: None,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        load_balancer: lb,
        locality_lb: None,
        outlier_detection: None,
        connection_pool: None,
    }
}

const CLIENT: &str = "10.1.0.1:40000";

fn keys(headers: &HeaderMap) -> Keys<'_> {
    Keys {
        client: CLIENT.parse().unwrap(),
        request: Some((headers, None)),
        near: None,
        dialled: None,
    }
}

fn cookie(name: &str, ttl: Option<Duration>) -> HashKey {
    HashKey::Cookie(HashCookie {
        name: name.to_owned(),
        ttl,
        path: None,
        attributes: Vec::new(),
    })
}

fn picks(
    balancer: &Arc<Balancer>,
    svc: &Service,
    policy: &EndpointPolicy,
    headers: &HeaderMap,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let (endpoint, _, _guard) = balancer
            .pick(svc, 80, policy, &keys(headers))
            .expect("an endpoint");
        *counts.entry(endpoint.addr.ip().to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn round_robin_takes_turns_within_the_subset() {
    let (_state, svc) = service(4);
    let balancer = Arc::new(Balancer::default());
    let none = HeaderMap::new();
    let all = picks(
        &balancer,
        &svc,
        &policy(LoadBalancer::RoundRobin, &[]),
        &none,
        8,
    );
    assert_eq!(all.values().copied().collect::<Vec<_>>(), vec![2, 2, 2, 2]);
    let v1 = picks(
        &balancer,
        &svc,
        &policy(LoadBalancer::RoundRobin, &[("version", "v1")]),
        &none,
        6,
    );
    assert_eq!(
        v1,
        BTreeMap::from([("10.0.0.2".to_owned(), 3), ("10.0.0.4".to_owned(), 3)])
    );
    let nobody = policy(LoadBalancer::RoundRobin, &[("version", "v9")]);
    assert!(
        balancer.pick(&svc, 80, &nobody, &keys(&none)).is_none(),
        "an empty subset"
    );
}

#[test]
fn consistent_hash_keeps_a_key_on_its_endpoint() {
    let (_state, svc) = service(4);
    let balancer = Arc::new(Balancer::default());
    let by_header = policy(
        LoadBalancer::ConsistentHash(HashKey::Header("x-user".into())),
        &[],
    );
    let mut spread = BTreeMap::new();
    for user in 0..40 {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", format!("user-{user}").parse().unwrap());
        let counts = picks(&balancer, &svc, &by_header, &headers, 5);
        assert_eq!(
            counts.len(),
            1,
            "user-{user} always on one endpoint: {counts:?}"
        );
        *spread
            .entry(counts.into_keys().next().unwrap())
            .or_insert(0) += 1;
    }
    assert!(
        spread.len() >= 3,
        "40 users spread over the endpoints: {spread:?}"
    );
    // A cookie, and the source address.
    let mut headers = HeaderMap::new();
    headers.insert("cookie", "a=1; session=abc".parse().unwrap());
    let by_cookie = policy(LoadBalancer::ConsistentHash(cookie("session", None)), &[]);
    assert_eq!(picks(&balancer, &svc, &by_cookie, &headers, 5).len(), 1);
    let by_ip = policy(LoadBalancer::ConsistentHash(HashKey::SourceIp), &[]);
    assert_eq!(
        picks(&balancer, &svc, &by_ip, &HeaderMap::new(), 5).len(),
        1
    );
}

#[test]
fn a_cookie_with_a_ttl_is_made_up_once_and_then_keeps_its_endpoint() {
    // Envoy's sticky sessions: `httpCookie` with a `ttl`.
    let (_state, svc) = service(4);
    let balancer = Arc::new(Balancer::default());
    let sticky = policy(
        LoadBalancer::ConsistentHash(HashKey::Cookie(HashCookie {
            name: "route".into(),
            ttl: Some(Duration::from_secs(3600)),
            path: Some("/shop".into()),
            attributes: vec![
                ("SameSite".into(), Some("Strict".into())),
                ("Secure".into(), None),
            ],
        })),
        &[],
    );
    // A first request without the cookie: one is made up, keyed on, and to be set.
    let none = HeaderMap::new();
    let set = cookie_to_set(&sticky, &keys(&none)).expect("a cookie to set");
    let set = set.to_str().unwrap();
    let value = set
        .strip_prefix("route=\"")
        .and_then(|rest| rest.split_once('"'))
        .map(|(value, _)| value.to_owned())
        .expect(set);
    assert_eq!(
        set,
        format!("route=\"{value}\"; Max-Age=3600; Path=/shop; SameSite=Strict; Secure; HttpOnly")
    );
    let first = picks(&balancer, &svc, &sticky, &none, 5);
    assert_eq!(
        first.len(),
        1,
        "one connection's requests keep the made-up key: {first:?}"
    );
    // The client's next requests carry it, quoted as set or not: the same endpoint, nothing set.
    for sent in [format!("a=1; route=\"{value}\""), format!("route={value}")] {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", sent.parse().unwrap());
        assert_eq!(
            picks(&balancer, &svc, &sticky, &headers, 5),
            BTreeMap::from([(first.keys().next().unwrap().clone(), 5)])
        );
        assert!(cookie_to_set(&sticky, &keys(&headers)).is_none(), "{sent}");
    }
    // Another connection gets another cookie; a TCP tunnel none.
    let other = Keys {
        client: "10.1.0.1:40001".parse::<SocketAddr>().unwrap(),
        request: Some((&none, None)),
        near: None,
        dialled: None,
    };
    assert_ne!(
        cookie_to_set(&sticky, &other).unwrap().to_str().unwrap(),
        set
    );
    let tunnel = Keys {
        client: CLIENT.parse().unwrap(),
        request: None,
        near: None,
        dialled: None,
    };
    assert!(cookie_to_set(&sticky, &tunnel).is_none());
    // A session cookie (`ttl: 0s`) has no `Max-Age`; without a `ttl` none is made up.
    let session = policy(
        LoadBalancer::ConsistentHash(cookie("route", Some(Duration::ZERO))),
        &[],
    );
    let set = cookie_to_set(&session, &keys(&none)).unwrap();
    assert!(!set.to_str().unwrap().contains("Max-Age"), "{set:?}");
    let plain = policy(LoadBalancer::ConsistentHash(cookie("route", None)), &[]);
    assert!(cookie_to_set(&plain, &keys(&none)).is_none());
}

#[test]
fn a_query_parameter_keys_a_consistent_hash() {
    let (_state, svc) = service(4);
    let balancer = Arc::new(Balancer::default());
    let by_query = policy(
        LoadBalancer::ConsistentHash(HashKey::QueryParameter("user".into())),
        &[],
    );
    let none = HeaderMap::new();
    let mut spread = BTreeMap::new();
    for user in 0..40 {
        let query = format!("page=2&user=u{user}&user=other");
        let mut counts = BTreeMap::new();
        for _ in 0..5 {
            let keys = Keys {
                client: CLIENT.parse().unwrap(),
                request: Some((&none, Some(&query))),
                near: None,
                dialled: None,
            };
            let (endpoint, _, _guard) = balancer.pick(&svc, 80, &by_query, &keys).unwrap();
            *counts.entry(endpoint.addr).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 1, "u{user} on one endpoint: {counts:?}");
        *spread
            .entry(counts.into_keys().next().unwrap())
            .or_insert(0) += 1;
    }
    assert!(
        spread.len() >= 3,
        "40 users spread over the endpoints: {spread:?}"
    );
}

#[test]
fn least_request_avoids_a_busy_endpoint_and_counts_go_back() {
    let (_state, svc) = service(2);
    let balancer = Arc::new(Balancer::default());
    let lr = policy(LoadBalancer::LeastRequest, &[]);
    let none = HeaderMap::new();
    // Hold 10 requests on whichever endpoint comes first.
    let (busy, busy_addr, _) = balancer.pick(&svc, 80, &lr, &keys(&none)).unwrap();
    drop(busy);
    let held: Vec<_> = (0..10)
        .map(|_| {
            let p = policy(
                LoadBalancer::RoundRobin,
                &[(
                    "version",
                    if busy_addr.ip().to_string().ends_with(".1") {
                        "v0"
                    } else {
                        "v1"
                    },
                )],
            );
            balancer.pick(&svc, 80, &p, &keys(&none)).unwrap().2
        })
        .collect();
    assert_eq!(balancer.load(busy_addr), 10);
    let counts = picks(&balancer, &svc, &lr, &none, 100);
    let to_busy = counts
        .get(&busy_addr.ip().to_string())
        .copied()
        .unwrap_or(0);
    // The busy one wins only when both draws are it (a quarter of the time).
    assert!(to_busy < 45, "{counts:?}");
    drop(held);
    assert_eq!(
        balancer.load(busy_addr),
        0,
        "counts go back when requests end"
    );
}

fn outliers(consecutive_5xx: u32, max_ejection_percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx,
        consecutive_gateway: 0,
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent,
        min_health_percent: 0,
        consecutive_local_origin: None,
    }
}

#[test]
fn split_local_origin_failures_count_apart_from_the_answers() {
    // `splitExternalLocalOriginErrors` with `consecutiveLocalOriginFailures: 2` (and 3 5xx).
    let (_state, svc) = service(3);
    let mut policy = policy(LoadBalancer::RoundRobin, &[]);
    policy.outlier_detection = Some(OutlierDetection {
        consecutive_local_origin: Some(2),
        ..outliers(3, 100)
    });
    let balancer = Arc::new(Balancer::default());
    let bad: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let now = std::time::Instant::now();
    let record = |answer| balancer.record((&svc, 80, &policy), bad, answer, now);
    let ejected = || {
        let counts = picks(&balancer, &svc, &policy, &HeaderMap::new(), 30);
        !counts.contains_key("10.0.0.1")
    };
    // Two 5xx answers, an unreachable attempt, a third 5xx (the answer shows it reachable, so
    // the local count starts over), another unreachable one: no count at its limit.
    for answer in [
        Answer::Status(503),
        Answer::Status(500),
        Answer::Unreachable,
    ] {
        record(answer);
    }
    record(Answer::Status(502));
    assert!(
        ejected(),
        "three 5xx answers in a row, the failure to reach it apart"
    );
    let (_state, svc) = service(3);
    let balancer = Arc::new(Balancer::default());
    let record = |answer| balancer.record((&svc, 80, &policy), bad, answer, now);
    record(Answer::Unreachable);
    record(Answer::Status(200));
    record(Answer::Unreachable);
    let counts = picks(&balancer, &svc, &policy, &HeaderMap::new(), 30);
    assert!(
        counts.contains_key("10.0.0.1"),
        "an answer in between: {counts:?}"
    );
    record(Answer::Unreachable);
    let counts = picks(&balancer, &svc, &policy, &HeaderMap::new(), 30);
    assert!(!counts.contains_key("10.0.0.1"), "two in a row: {counts:?}");
}

#[test]
fn an_endpoint_failing_in_a_row_is_ejected_for_a_while() {
    let (_state, svc) = service(3);
    let mut policy = policy(LoadBalancer::RoundRobin, &[]);
    policy.outlier_detection = Some(outliers(2, 100));
    let balancer = Arc::new(Balancer::default());
    let bad: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    let now = std::time::Instant::now();
    let record = |answer, at| balancer.record((&svc, 80, &policy), bad, answer, at);
    // A 503, a 200 (the count starts over), a tunnel that could not connect, one that could
    // (over again), then two failures in a row: ejected.
    record(Answer::Status(503), now);
    record(Answer::Status(200), now);
    record(Answer::Unreachable, now);
    record(Answer::Connected, now);
    record(Answer::Status(503), now);
    let headers = HeaderMap::new();
    assert_eq!(
        picks(&balancer, &svc, &policy, &headers, 30).len(),
        3,
        "still in"
    );
    record(Answer::Unreachable, now);
    let counts = picks(&balancer, &svc, &policy, &headers, 30);
    assert!(!counts.contains_key("10.0.0.1:8080"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 30);
    // Back after its ejection time (30 s); the second ejection lasts twice as long.
    let later = now + Duration::from_secs(31);
    let mut candidates: Vec<&mesh_cluster::Endpoint> = super::candidates(&svc, (80, &[]), &policy);
    balancer.leave_out_ejected(
        &mut candidates,
        policy.outlier_detection.as_ref().unwrap(),
        later,
    );
    assert_eq!(candidates.len(), 3, "back in");
    record(Answer::Status(500), later);
    record(Answer::Status(500), later);
    let mut candidates = super::candidates(&svc, (80, &[]), &policy);
    let after_first_length = later + Duration::from_secs(31);
    balancer.leave_out_ejected(
        &mut candidates,
        policy.outlier_detection.as_ref().unwrap(),
        after_first_length,
    );
    assert_eq!(candidates.len(), 2, "ejected for 60 s this time");
}

#[test]
fn no_more_than_max_ejection_percent_are_ejected() {
    let (_state, svc) = service(4);
    let mut policy = policy(LoadBalancer::Random, &[]);
    // 30 %: of four, the first ejection (0 % ejected) is allowed, the second (25 %) too, the
    // third (50 %) not.
    policy.outlier_detection = Some(outliers(1, 30));
    let balancer = Arc::new(Balancer::default());
    let now = std::time::Instant::now();
    for i in 1..=4 {
        let addr = format!("10.0.0.{i}:8080").parse().unwrap();
        balancer.record((&svc, 80, &policy), addr, Answer::Status(503), now);
    }
    let counts = picks(&balancer, &svc, &policy, &HeaderMap::new(), 200);
    assert_eq!(counts.len(), 2, "two ejected, two left: {counts:?}");
    // Without outlier detection, nothing is recorded or left out.
    let plain = policy_without_outliers();
    let counts = picks(&balancer, &svc, &plain, &HeaderMap::new(), 200);
    assert_eq!(counts.len(), 4);
}

fn policy_without_outliers() -> EndpointPolicy {
    policy(LoadBalancer::Random, &[])
}

#[test]
fn what_is_kept_of_gone_backends_and_endpoints_is_let_go() {
    let (_state, svc) = service(4);
    let mut policy = policy(LoadBalancer::RoundRobin, &[]);
    policy.outlier_detection = Some(outliers(3, 100));
    let balancer = Arc::new(Balancer::default());
    let now = std::time::Instant::now();
    let _ = picks(&balancer, &svc, &policy, &HeaderMap::new(), 4);
    let addr = |i: u8| -> SocketAddr { format!("10.0.0.{i}:8080").parse().unwrap() };
    // web-3 (10.0.0.4) failing, web-0 (10.0.0.1) failing, web-1 (10.0.0.2) failed and then
    // answered (nothing left to remember).
    balancer.record((&svc, 80, &policy), addr(4), Answer::Status(503), now);
    balancer.record((&svc, 80, &policy), addr(1), Answer::Status(503), now);
    balancer.record((&svc, 80, &policy), addr(2), Answer::Status(503), now);
    balancer.record((&svc, 80, &policy), addr(2), Answer::Status(200), now);
    assert_eq!(balancer.kept(), (1, 3));

    // The same view: the failing endpoints' records stay, the answered one's goes.
    let (same, _) = service(4);
    balancer.forget_gone(&same, now);
    assert_eq!(balancer.kept(), (1, 2));
    // Two pods gone (web-2, web-3): web-3's record goes, web-0's stays, and so does the cursor.
    let (fewer, _) = service(2);
    balancer.forget_gone(&fewer, now);
    assert_eq!(balancer.kept(), (1, 1));
    // The Service gone: its cursor and its endpoints' records go.
    let empty = ClusterState::build(&[], &EnrollmentOptions::new("n0")).expect("builds");
    balancer.forget_gone(&empty, now);
    assert_eq!(balancer.kept(), (0, 0));
}

/// Service `shop/web` (with `spec` lines added) with `web-0` and `web-1` in zone `a` (nodes
/// n1, n2) and `web-2` in zone `b` (node n3).
fn zoned_service(spec: &str) -> ClusterState {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{{port: 80, targetPort: 8080}}]\n  selector: {{app: web}}\n{spec}",
    );
    for (i, node, zone) in [(0, "n1", "a"), (1, "n2", "a"), (2, "n3", "b")] {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: {zone}}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, namespace: shop, labels: {{app: web}}}}\nspec: {{nodeName: {node}}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.0.0.{}}}]}}\n",
            i + 1
        );
    }
    let objects = parse_documents("t.yaml", &text).expect("parses");
    ClusterState::build(&objects, &EnrollmentOptions::new("n0")).expect("builds")
}

#[test]
fn a_service_preferring_close_endpoints_is_served_by_those_of_the_waypoints_zone() {
    let state = zoned_service("  trafficDistribution: PreferClose\n");
    let svc = state
        .service_by_hostname("web.shop.svc.cluster.local")
        .expect("web");
    let balancer = Arc::new(Balancer::default());
    let round_robin = policy(LoadBalancer::RoundRobin, &[]);
    let none = HeaderMap::new();
    let from = |pod: &str| state.workload_by_name("shop", pod).map(AsRef::as_ref);
    let picked = |near| {
        let mut counts = BTreeMap::new();
        for _ in 0..12 {
            let keys = Keys {
                near,
                ..keys(&none)
            };
            let (endpoint, _, _guard) = balancer.pick(svc, 80, &round_robin, &keys).unwrap();
            *counts.entry(endpoint.addr.ip().to_string()).or_insert(0) += 1;
        }
        counts
    };
    // A waypoint in zone `a` (where web-0 runs): zone `a`'s two, evenly.
    assert_eq!(
        picked(from("web-0")),
        BTreeMap::from([("10.0.0.1".into(), 6), ("10.0.0.2".into(), 6)])
    );
    // In zone `b`: its one.
    assert_eq!(
        picked(from("web-2")),
        BTreeMap::from([("10.0.0.3".into(), 12)])
    );
    // Where the waypoint runs unknown: all three.
    assert_eq!(picked(None).len(), 3);
}

#[test]
fn outlier_detection_prefers_the_waypoints_zone_and_fails_over_from_ejected_endpoints() {
    // No `trafficDistribution`: the `DestinationRule`'s outlier detection turns on Istio's
    // locality load balancing (its `localityLbSetting`, or the default).
    let state = zoned_service("");
    let svc = state
        .service_by_hostname("web.shop.svc.cluster.local")
        .expect("web");
    let own = state.workload_by_name("shop", "web-0").map(AsRef::as_ref);
    let balancer = Arc::new(Balancer::default());
    let mut with_outliers = policy(LoadBalancer::RoundRobin, &[]);
    with_outliers.outlier_detection = Some(outliers(1, 100));
    let none = HeaderMap::new();
    let picked = |policy: &EndpointPolicy| {
        let mut counts = BTreeMap::new();
        for _ in 0..12 {
            let keys = Keys {
                near: own,
                dialled: None,
                ..keys(&none)
            };
            let (endpoint, _, _guard) = balancer.pick(svc, 80, policy, &keys).unwrap();
            *counts.entry(endpoint.addr.ip().to_string()).or_insert(0) += 1;
        }
        counts
    };
    let zone_a = BTreeMap::from([("10.0.0.1".into(), 6), ("10.0.0.2".into(), 6)]);
    assert_eq!(picked(&with_outliers), zone_a);
    // Zone `a`'s endpoints ejected: zone `b`'s takes every request.
    let now = std::time::Instant::now();
    for addr in ["10.0.0.1:8080", "10.0.0.2:8080"] {
        let answer = Answer::Status(503);
        balancer.record(
            (svc, 80, &with_outliers),
            addr.parse().unwrap(),
            answer,
            now,
        );
    }
    assert_eq!(
        picked(&with_outliers),
        BTreeMap::from([("10.0.0.3".into(), 12)])
    );
    // Without outlier detection the setting does not apply: all three.
    assert_eq!(picked(&policy(LoadBalancer::RoundRobin, &[])).len(), 3);
}
