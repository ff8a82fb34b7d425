//! Tests of waypoint attachment: labels on Services, pods and namespaces, `waypoint-for`, the
//! waypoint's pods, and failing closed when the waypoint cannot take the traffic.

use std::collections::BTreeSet;

use super::{Unavailable, WaypointBinding, WaypointFor};
use crate::{
    tests::{docs, ip, opts, parse, pod, waypoint_pod},
    ClusterState,
};

fn namespace(name: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n")
}

fn gateway(ns: &str, name: &str, class: &str, labels: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  gatewayClassName: {class}\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE}}\n"
    )
}

fn service(ns: &str, name: &str, vip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  clusterIP: {vip}\n  ports: [{{port: 80, targetPort: 8080}}]\n  selector: {{app: {name}}}\n"
    )
}

/// Namespace `shop` (labels `ns_labels`), waypoint `shop/wp` for `traffic` with two pods,
/// Services `a` (labels `a_labels`) and `b`, and a pod of `a`.
fn cluster(ns_labels: &str, a_labels: &str, traffic: &str, extra: &[String]) -> ClusterState {
    let mut parts = vec![
        namespace("shop", ns_labels),
        gateway("shop", "wp", "istio-waypoint", traffic),
        waypoint_pod("wp-0", "n0", "10.0.1.1"),
        waypoint_pod("wp-1", "n1", "10.0.1.2"),
        pod("shop", "a-0", "n0", "10.0.0.1", "app: a"),
        service("shop", "a", "10.96.0.1", a_labels),
        service("shop", "b", "10.96.0.2", ""),
    ];
    parts.extend(extra.iter().cloned());
    ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
}

fn binding(state: &ClusterState, name: &str) -> String {
    let service = state
        .service_by_hostname(&format!("{name}.shop.svc.cluster.local"))
        .expect("service");
    match state.service_waypoint(service) {
        WaypointBinding::None => "none".to_owned(),
        WaypointBinding::Bound(waypoint) => format!("bound {waypoint}"),
        WaypointBinding::Unavailable(why) => format!("unavailable: {why}"),
    }
}

#[test]
fn a_service_label_binds_it_and_the_waypoint_pods_take_turns() {
    let state = cluster("", "istio.io/use-waypoint: wp", "", &[]);
    assert_eq!(binding(&state, "a"), "bound shop/wp");
    assert_eq!(binding(&state, "b"), "none");
    let service = state
        .service_by_hostname("a.shop.svc.cluster.local")
        .expect("a");
    let WaypointBinding::Bound(waypoint) = state.service_waypoint(service) else {
        panic!("bound");
    };
    assert_eq!(waypoint.traffic, WaypointFor::Service, "the default");
    let picked: BTreeSet<String> = (0..4)
        .map(|_| {
            let (pod, addr) = waypoint.pick(ip("10.96.0.1"), None).expect("a pod");
            assert_eq!(addr.port(), 15008);
            assert_eq!(Some(addr.ip()), pod.ips.first().copied());
            pod.name.clone()
        })
        .collect();
    assert_eq!(
        picked,
        BTreeSet::from(["wp-0".to_owned(), "wp-1".to_owned()])
    );
    assert!(waypoint.pick(ip("fd00::1"), None).is_none(), "no IPv6 pod");
    let wp0 = state.workload_by_name("shop", "wp-0").expect("wp-0");
    assert!(waypoint.has_pod(wp0));
    assert_eq!(
        state
            .waypoint_of_pod(wp0)
            .map(ToString::to_string)
            .as_deref(),
        Some("shop/wp")
    );
    assert_eq!(state.waypoints().count(), 1);
}

#[test]
fn the_namespace_label_binds_every_service_but_those_labelled_none() {
    let state = cluster(
        "istio.io/use-waypoint: wp",
        "istio.io/use-waypoint: none",
        "",
        &[],
    );
    assert_eq!(binding(&state, "a"), "none");
    assert_eq!(binding(&state, "b"), "bound shop/wp");
    // A waypoint in another namespace: used only as its HBONE listener's `allowedRoutes` let
    // (Istio's rule; `Same` when absent).
    let other = |allowed: &str| {
        [
            namespace("infra", ""),
            gateway(
                "infra",
                "shared",
                "istio-waypoint",
                "istio.io/waypoint-for: all",
            )
            .replace("protocol: HBONE}", &format!("protocol: HBONE{allowed}}}")),
            pod(
                "infra",
                "shared-0",
                "n0",
                "10.0.2.1",
                "gateway.networking.k8s.io/gateway-name: shared",
            )
            .replace("spec:\n", "spec:\n  serviceAccountName: shared\n"),
        ]
    };
    let bound_elsewhere = |ns_labels: &str, allowed: &str| {
        let state = cluster(
            ns_labels,
            "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
            "",
            &other(allowed),
        );
        binding(&state, "a")
    };
    let denied = "unavailable: waypoint infra/shared does not let namespace shop use it (its \
                  HBONE listener's allowedRoutes.namespaces)";
    assert_eq!(bound_elsewhere("", ""), denied);
    assert_eq!(
        bound_elsewhere("", ", allowedRoutes: {namespaces: {from: Same}}"),
        denied
    );
    assert_eq!(
        bound_elsewhere("", ", allowedRoutes: {namespaces: {from: All}}"),
        "bound infra/shared"
    );
    let by_label = ", allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: team, operator: In, values: [shop, web]}]}}}";
    assert_eq!(
        bound_elsewhere("team: shop", by_label),
        "bound infra/shared"
    );
    assert_eq!(bound_elsewhere("team: ads", by_label), denied);
    // An unreadable `from` is the narrowest, with a warning.
    let state = cluster(
        "",
        "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
        "",
        &other(", allowedRoutes: {namespaces: {from: Everyone}}"),
    );
    assert_eq!(binding(&state, "a"), denied);
    assert!(
        state.warnings().iter().any(|w| w.contains(
            "Gateway infra/shared: spec.listeners[0].allowedRoutes.namespaces.from: \"Everyone\" is not Same, All or Selector"
        )),
        "{:?}",
        state.warnings()
    );
}

#[test]
fn a_waypoint_that_cannot_take_the_traffic_fails_closed() {
    let state = cluster("", "istio.io/use-waypoint: nope", "", &[]);
    assert_eq!(
        binding(&state, "a"),
        "unavailable: no waypoint Gateway shop/nope (class istio-waypoint)"
    );
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "istio.io/waypoint-for: workload",
        &[],
    );
    assert_eq!(
        binding(&state, "a"),
        "unavailable: waypoint shop/wp is for workload traffic (istio.io/waypoint-for)"
    );
    // Its pods not ready: fail closed, not bypass.
    let text = docs(&[
        gateway("shop", "wp", "istio-waypoint", ""),
        pod(
            "shop",
            "wp-0",
            "n0",
            "10.0.1.1",
            "gateway.networking.k8s.io/gateway-name: wp",
        )
        .replace(
            "  phase: Running\n",
            "  phase: Running\n  conditions: [{type: Ready, status: \"False\"}]\n",
        ),
        service("shop", "a", "10.96.0.1", "istio.io/use-waypoint: wp"),
    ]);
    let state = ClusterState::build(&parse(&text), &opts()).expect("builds");
    assert_eq!(
        binding(&state, "a"),
        "unavailable: waypoint shop/wp has no ready pod"
    );
    let service = state
        .service_by_hostname("a.shop.svc.cluster.local")
        .expect("a");
    assert!(matches!(
        state.service_waypoint(service),
        WaypointBinding::Unavailable(Unavailable::NotReady { .. })
    ));
    // A Gateway of another class is no waypoint.
    let state = cluster(
        "",
        "istio.io/use-waypoint: ingress",
        "",
        &[gateway("shop", "ingress", "istio", "")],
    );
    assert!(binding(&state, "a").starts_with("unavailable: no waypoint Gateway shop/ingress"));
}

#[test]
fn pods_bind_to_workload_waypoints_and_waypoint_pods_never_do() {
    let state = cluster(
        "istio.io/use-waypoint: wp",
        "",
        "istio.io/waypoint-for: all",
        &[],
    );
    let a0 = state.workload_by_name("shop", "a-0").expect("a-0");
    assert!(matches!(
        state.workload_waypoint(a0),
        WaypointBinding::Bound(_)
    ));
    let wp0 = state.workload_by_name("shop", "wp-0").expect("wp-0");
    assert!(matches!(
        state.workload_waypoint(wp0),
        WaypointBinding::None
    ));
    // A service waypoint takes no pod-addressed traffic.
    let state = cluster("istio.io/use-waypoint: wp", "", "", &[]);
    let a0 = state.workload_by_name("shop", "a-0").expect("a-0");
    assert!(matches!(
        state.workload_waypoint(a0),
        WaypointBinding::Unavailable(Unavailable::WrongTraffic {
            traffic: WaypointFor::Service,
            ..
        })
    ));
}

#[test]
fn a_bad_waypoint_for_label_is_refused_naming_the_gateway() {
    let text = gateway(
        "shop",
        "wp",
        "istio-waypoint",
        "istio.io/waypoint-for: everything",
    );
    let err = ClusterState::build(&parse(&text), &opts())
        .expect_err("bad label")
        .to_string();
    assert_eq!(
        err,
        "Gateway shop/wp: metadata.labels[istio.io/waypoint-for]: \"everything\" is not service, workload, all or none"
    );
}

#[test]
fn connections_to_a_bound_service_go_to_the_waypoint_except_the_waypoints_own() {
    use crate::{tests::addr, Resolution};
    let state = cluster("", "istio.io/use-waypoint: wp", "", &[]);
    let client = state.workload_by_name("shop", "a-0").expect("a-0");
    match state.resolve_from(Some(client), addr("10.96.0.1:80")) {
        Resolution::Waypoint {
            service,
            waypoint,
            pod,
            addr,
            authority,
        } => {
            assert_eq!(authority, crate::tests::addr("10.96.0.1:80"), "the VIP");
            assert_eq!(service.map(|s| s.name.clone()).as_deref(), Some("a"));
            assert_eq!(waypoint.to_string(), "shop/wp");
            assert_eq!(addr.port(), 15008);
            assert!(pod.name.starts_with("wp-"));
        }
        other => panic!("{other:?}"),
    }
    // The waypoint's own connection to the Service goes to an endpoint.
    let wp = state.workload_by_name("shop", "wp-0").expect("wp-0");
    assert!(matches!(
        state.resolve_from(Some(wp), addr("10.96.0.1:80")),
        Resolution::Service { .. }
    ));
    // An unbound Service and an unknown address are as before.
    assert!(matches!(
        state.resolve_from(Some(client), addr("10.96.0.2:80")),
        Resolution::NoEndpoint { .. }
    ));
    assert!(matches!(
        state.resolve_from(None, addr("192.0.2.1:80")),
        Resolution::Passthrough
    ));
    // A bound Service whose waypoint is gone: refused, not sent past it.
    let state = cluster("", "istio.io/use-waypoint: gone", "", &[]);
    assert!(matches!(
        state.resolve_from(None, addr("10.96.0.1:80")),
        Resolution::WaypointUnavailable {
            service: Some(_),
            ..
        }
    ));
}

#[test]
fn a_pod_behind_a_waypoint_admits_only_the_waypoint_unless_a_policy_allows_explicitly() {
    use crate::{decision::Inbound, tests::addr, DecisionReason, Verdict};
    // `a-0` serves Service `a`, bound to `wp`; `b-0` serves nothing bound.
    let b0 = pod("shop", "b-0", "n1", "10.0.0.2", "app: b");
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "",
        std::slice::from_ref(&b0),
    );
    let identity = |name: &str| {
        state
            .workload_by_name("shop", name)
            .expect("pod")
            .identity
            .clone()
    };
    let (client, waypoint) = (identity("b-0"), identity("wp-0"));
    let admit = |src: &str, identity: Option<&mesh_identity::Identity>, dst: &str| {
        let d = state.admit(&Inbound {
            src: addr(src),
            dst: addr(dst),
            src_identity: identity,
            origin: crate::Origin::Network,
        });
        (d.verdict, d.reason, d.policy.map(|p| p.to_string()))
    };
    assert_eq!(
        admit("10.0.0.2:40000", Some(&client), "10.0.0.1:8080"),
        (
            Verdict::Deny,
            DecisionReason::WaypointBypass,
            Some("waypoint shop/wp".to_owned())
        ),
        "straight to the pod, past the waypoint"
    );
    assert_eq!(
        admit("10.0.1.1:40000", Some(&waypoint), "10.0.0.1:8080").0,
        Verdict::Allow,
        "from the waypoint"
    );
    assert_eq!(
        admit("10.0.0.2:40000", None, "10.0.0.1:8080").1,
        DecisionReason::WaypointBypass,
        "plaintext"
    );
    assert_eq!(
        admit("10.0.0.2:40000", Some(&waypoint), "10.0.0.1:8080").1,
        DecisionReason::WaypointBypass,
        "the waypoint's identity from another pod's address"
    );
    assert_eq!(
        admit("10.0.0.1:40000", Some(&identity("a-0")), "10.0.0.2:8080").0,
        Verdict::Allow,
        "a pod behind no waypoint"
    );
    // An ALLOW policy that matches the client lets it past the waypoint, explicitly.
    let allow = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: direct, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: a}}}}\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
        client.as_str().trim_start_matches("spiffe://")
    );
    let state = cluster("", "istio.io/use-waypoint: wp", "", &[b0, allow]);
    let d = state.admit(&Inbound {
        src: addr("10.0.0.2:40000"),
        dst: addr("10.0.0.1:8080"),
        src_identity: Some(&client),
        origin: crate::Origin::Network,
    });
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Allow, DecisionReason::AllowMatched)
    );
    // The waypoint now falls under that ALLOW policy and is not matched by it: denied, as any
    // source would be (the waypoint rule adds to policies, it never overrides a denial).
    let d = state.admit(&Inbound {
        src: addr("10.0.1.1:40000"),
        dst: addr("10.0.0.1:8080"),
        src_identity: Some(&waypoint),
        origin: crate::Origin::Network,
    });
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Deny, DecisionReason::NoAllowMatched)
    );
}

#[test]
fn a_pod_merely_labelled_as_the_waypoints_is_not_it() {
    // Same label, another service account: no waypoint pod, no skipping, no admission.
    let impostor = pod(
        "shop",
        "fake",
        "n0",
        "10.0.9.9",
        "gateway.networking.k8s.io/gateway-name: wp",
    );
    let state = cluster("", "istio.io/use-waypoint: wp", "", &[impostor]);
    let fake = state.workload_by_name("shop", "fake").expect("fake");
    assert!(state.waypoint_of_pod(fake).is_none());
    let service = state
        .service_by_hostname("a.shop.svc.cluster.local")
        .expect("a");
    let WaypointBinding::Bound(waypoint) = state.service_waypoint(service) else {
        panic!("bound");
    };
    assert_eq!(waypoint.workloads.len(), 2, "the two real ones");
    assert!(matches!(
        state.resolve_from(Some(fake), crate::tests::addr("10.96.0.1:80")),
        crate::Resolution::Waypoint { .. }
    ));
    assert!(
        state.warnings().iter().any(|w| w.contains("Pod shop/fake: labelled gateway.networking.k8s.io/gateway-name=wp but runs as service account \"default\"")),
        "{:?}",
        state.warnings()
    );
}

#[test]
fn a_pod_out_of_its_services_endpoints_stays_behind_the_waypoint() {
    // `a-1` is selected by Service `a` (bound to `wp`) but not ready, so not an endpoint: it is
    // still `a`'s pod, and connections past the waypoint stay refused (a probe that fails must
    // not open the pod to everyone, nor flap its guard with its readiness).
    use crate::{decision::Inbound, tests::addr, DecisionReason, Verdict};
    let unready = format!(
        "{}\n  conditions: [{{type: Ready, status: \"False\"}}]\n",
        pod("shop", "a-1", "n1", "10.0.0.3", "app: a").trim_end()
    );
    let b0 = pod("shop", "b-0", "n1", "10.0.0.2", "app: b");
    let state = cluster("", "istio.io/use-waypoint: wp", "", &[unready, b0]);
    let a = state
        .service_by_hostname("a.shop.svc.cluster.local")
        .expect("a");
    let endpoints: Vec<String> = a.ports[0]
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(endpoints, ["10.0.0.1:8080"], "a-1 is not an endpoint");
    let client = state
        .workload_by_name("shop", "b-0")
        .expect("b-0")
        .identity
        .clone();
    let d = state.admit(&Inbound {
        src: addr("10.0.0.2:40000"),
        dst: addr("10.0.0.3:8080"),
        src_identity: Some(&client),
        origin: crate::Origin::Network,
    });
    assert_eq!(
        (d.verdict, d.reason),
        (Verdict::Deny, DecisionReason::WaypointBypass)
    );
}

/// Waypoint `shop/reviews-waypoint` for the workloads of service account `reviews`, with a
/// ready pod; pods `r-0` (ready) and `r-1` (not ready) under `reviews` behind Service `r`,
/// pod `o-0` under `other` behind Service `o`, and Service `mixed` over `r-0` and `o-0`.
fn per_account(extra: &[String]) -> ClusterState {
    let under = |name: &str, ip: &str, labels: &str, account: &str| {
        pod("shop", name, "n0", ip, labels).replace(
            "spec:\n",
            &format!("spec:\n  serviceAccountName: {account}\n"),
        )
    };
    let wp = pod(
        "shop",
        "reviews-waypoint-0",
        "n1",
        "10.0.1.9",
        "gateway.networking.k8s.io/gateway-name: reviews-waypoint",
    )
    .replace("spec:\n", "spec:\n  serviceAccountName: reviews-waypoint\n");
    let unready = format!(
        "{}\n  conditions: [{{type: Ready, status: \"False\"}}]\n",
        under("r-1", "10.0.0.2", "app: r, mix: \"yes\"", "reviews").trim_end()
    );
    let mut parts = vec![
        namespace("shop", ""),
        gateway(
            "shop",
            "reviews-waypoint",
            "istio-waypoint",
            "istio.io/waypoint-for: all, mesh.local/waypoint-for-service-account: reviews",
        ),
        wp,
        under("r-0", "10.0.0.1", "app: r, mix: \"yes\"", "reviews"),
        unready,
        under("o-0", "10.0.0.3", "app: o, mix: \"yes\"", "other"),
        service("shop", "r", "10.96.0.1", ""),
        service("shop", "o", "10.96.0.2", ""),
        service("shop", "mixed", "10.96.0.3", "").replace("{app: mixed}", "{mix: \"yes\"}"),
    ];
    parts.extend(extra.iter().cloned());
    ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds")
}

#[test]
fn a_service_accounts_waypoint_takes_its_pods_and_the_services_that_are_only_its() {
    let state = per_account(&[]);
    assert_eq!(binding(&state, "r"), "bound shop/reviews-waypoint");
    assert_eq!(binding(&state, "o"), "none", "another account");
    assert_eq!(binding(&state, "mixed"), "none", "pods of two accounts");
    for (pod, bound) in [("r-0", true), ("r-1", true), ("o-0", false)] {
        let workload = state.workload_by_name("shop", pod).expect("pod");
        assert_eq!(
            matches!(state.workload_waypoint(workload), WaypointBinding::Bound(_)),
            bound,
            "{pod}"
        );
    }
    // An explicit label wins over the account's waypoint, `none` included.
    let state = per_account(&[
        service("shop", "r2", "10.96.0.4", "istio.io/use-waypoint: none")
            .replace("{app: r2}", "{app: r}"),
    ]);
    assert_eq!(binding(&state, "r2"), "none");
}

#[test]
fn through_a_service_without_waypoint_to_a_pod_behind_one_goes_through_that_waypoint() {
    use crate::{tests::addr, Resolution};
    // `mixed` has no waypoint; its endpoint `r-0` is behind its account's: the connection goes
    // to that waypoint with the endpoint as authority. `o-0` is reached directly.
    let state = per_account(&[]);
    let client = state.workload_by_name("shop", "o-0").expect("o-0");
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        match state.resolve_from(Some(client), addr("10.96.0.3:80")) {
            Resolution::Waypoint {
                waypoint,
                authority,
                ..
            } => {
                assert_eq!(waypoint.to_string(), "shop/reviews-waypoint");
                assert_eq!(authority, addr("10.0.0.1:8080"), "the endpoint");
                seen.insert("waypoint");
            }
            Resolution::Service { endpoint, .. } => {
                assert_eq!(endpoint, addr("10.0.0.3:8080"));
                seen.insert("direct");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.len(), 2, "both endpoints: {seen:?}");
    // The waypoint's own connection goes to the endpoint.
    let wp = state
        .workload_by_name("shop", "reviews-waypoint-0")
        .expect("waypoint pod");
    for _ in 0..4 {
        assert!(!matches!(
            state.resolve_from(Some(wp), addr("10.96.0.3:80")),
            Resolution::Waypoint { .. }
        ));
    }
}

#[test]
fn two_waypoints_for_one_account_the_first_by_name_serves_it() {
    let second = gateway(
        "shop",
        "another",
        "istio-waypoint",
        "istio.io/waypoint-for: all, mesh.local/waypoint-for-service-account: reviews",
    );
    let state = per_account(&[second]);
    assert_eq!(
        binding(&state, "r"),
        "unavailable: waypoint shop/another has no ready pod"
    );
    assert!(
        state
            .warnings()
            .iter()
            .any(|w| w.contains("also for service account shop/reviews")),
        "{:?}",
        state.warnings()
    );
}

#[test]
fn the_nodes_own_plaintext_connection_is_no_bypass() {
    // `a-0` is behind `wp`: its kubelet's probe (plaintext from the node) passes the waypoint
    // rule, named `node_local`; the same from the network does not; with an identity it is a
    // tunnel, not the node.
    use crate::{decision::Inbound, tests::addr, DecisionReason, Origin, Verdict};
    let state = cluster("", "istio.io/use-waypoint: wp", "", &[]);
    let admit = |origin, identity: Option<&mesh_identity::Identity>| {
        let d = state.admit(&Inbound {
            src: addr("10.0.9.1:40000"),
            dst: addr("10.0.0.1:8080"),
            src_identity: identity,
            origin,
        });
        (d.verdict, d.reason)
    };
    assert_eq!(
        admit(Origin::Node, None),
        (Verdict::Allow, DecisionReason::NodeLocal)
    );
    assert_eq!(
        admit(Origin::Network, None),
        (Verdict::Deny, DecisionReason::WaypointBypass)
    );
    let someone = state
        .workload_by_name("shop", "a-0")
        .expect("a-0")
        .identity
        .clone();
    assert_eq!(
        admit(Origin::Node, Some(&someone)).1,
        DecisionReason::WaypointBypass
    );
}

#[test]
fn the_xfcc_annotation_is_read_as_istio_reads_it() {
    let with = |value: Option<&str>| {
        let mut gw = gateway("shop", "wp", "istio-waypoint", "");
        if let Some(value) = value {
            gw = gw.replace(
                "  labels: {}\n",
                &format!(
                    "  labels: {{}}\n  annotations: {{ambient.istio.io/xfcc-include-client-identity: \"{value}\"}}\n"
                ),
            );
        }
        let state = ClusterState::build(&parse(&docs(&[gw])), &opts()).expect("builds");
        let on = state
            .waypoint("shop", "wp")
            .expect("a waypoint")
            .xfcc_client_identity;
        (on, state.warnings().to_vec())
    };
    assert_eq!(with(None), (false, vec![]));
    assert_eq!(with(Some("true")), (true, vec![]));
    assert_eq!(with(Some("TRUE")), (true, vec![]));
    assert_eq!(with(Some("False")), (false, vec![]));
    let (on, warnings) = with(Some("1"));
    assert!(!on, "only true is true, as in Istio");
    assert_eq!(
        warnings,
        ["Gateway shop/wp: metadata.annotations[ambient.istio.io/xfcc-include-client-identity]: \"1\" is not true or false; read as false"]
    );
    assert!(ClusterState::build(&parse(&docs(&[])), &opts())
        .expect("builds")
        .waypoint("shop", "wp")
        .is_none());
}

#[test]
fn a_waypoint_pod_being_deleted_takes_no_new_connections_but_finishes_its_own() {
    use crate::{decision::Inbound, tests::addr, Resolution, Verdict};
    // `wp-1` (10.0.1.2) being deleted; `a` bound to the waypoint.
    let going = waypoint_pod("wp-1", "n1", "10.0.1.2").replace(
        "metadata:\n",
        "metadata:\n  deletionTimestamp: \"2026-12-07T07:00:00Z\"\n",
    );
    let parts = vec![
        namespace("shop", ""),
        gateway("shop", "wp", "istio-waypoint", ""),
        going,
        pod("shop", "a-0", "n0", "10.0.0.1", "app: a"),
        service("shop", "a", "10.96.0.1", "istio.io/use-waypoint: wp"),
        pod("shop", "b-0", "n1", "10.0.0.2", "app: b"),
    ];
    let picked = |parts: &[String]| -> BTreeSet<String> {
        let state = ClusterState::build(&parse(&docs(parts)), &opts()).expect("builds");
        let client = state.workload_by_name("shop", "b-0").expect("b-0");
        (0..6)
            .map(
                |_| match state.resolve_from(Some(client), addr("10.96.0.1:80")) {
                    Resolution::Waypoint { pod, .. } => pod.name.clone(),
                    other => panic!("{other:?}"),
                },
            )
            .collect()
    };
    // Alone, it serves on (while its replacement starts, as Kubernetes' serving-terminating
    // endpoints); with another pod ready, new connections go to that one.
    assert_eq!(picked(&parts), BTreeSet::from(["wp-1".to_owned()]));
    let mut parts = parts;
    parts.push(waypoint_pod("wp-0", "n0", "10.0.1.1"));
    assert_eq!(picked(&parts), BTreeSet::from(["wp-0".to_owned()]));
    let state = ClusterState::build(&parse(&docs(&parts)), &opts()).expect("builds");
    // Its connections to the endpoints still came through the waypoint (before, a pod no
    // longer ready was taken for a bypass, and its requests in flight were cut).
    let going = state.workload_by_name("shop", "wp-1").expect("wp-1");
    let decision = state.admit(&Inbound {
        src: addr("10.0.1.2:40000"),
        dst: addr("10.0.0.1:8080"),
        src_identity: Some(&going.identity),
        origin: crate::Origin::Network,
    });
    assert_eq!(decision.verdict, Verdict::Allow, "{decision:?}");
}

#[test]
fn what_asks_for_a_waypoint_is_told_whether_it_is_bound_and_why_not() {
    use crate::{BoundKind, BoundObject};
    let entry = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: api\n  namespace: shop\n  labels: {istio.io/use-waypoint: wp}\nspec:\n  hosts: [api.example.com]\n  addresses: [240.240.0.9]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  location: MESH_EXTERNAL\n";
    let missing = service("shop", "c", "10.96.0.3", "istio.io/use-waypoint: nowhere");
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "",
        &[missing.clone(), entry.to_owned()],
    );
    let conditions = state.bound_conditions();
    let of = |kind, name: &str| {
        let object = BoundObject {
            kind,
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        };
        let condition = conditions.get(&object)?;
        Some((
            condition.ok,
            condition.reason.as_str(),
            condition.message.clone(),
        ))
    };
    let bound = Some((true, "WaypointAccepted", "bound to shop/wp".to_owned()));
    assert_eq!(of(BoundKind::Service, "a"), bound);
    assert_eq!(of(BoundKind::ServiceEntry, "api"), bound);
    // `b` asks for none: no condition.
    assert_eq!(conditions.len(), 3, "{conditions:?}");
    let (ok, reason, message) = of(BoundKind::Service, "c").expect("c's condition");
    assert_eq!((ok, reason), (false, "WaypointNotFound"));
    assert!(
        message.starts_with("no waypoint Gateway shop/nowhere"),
        "{message}"
    );
    // A waypoint for workloads only.
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "istio.io/waypoint-for: workload",
        &[],
    );
    let reasons: Vec<_> = state
        .bound_conditions()
        .values()
        .map(|c| (c.ok, c.reason.as_str()))
        .collect();
    assert_eq!(reasons, [(false, "WaypointUnsupportedTraffic")]);
}

#[test]
fn policies_are_told_which_waypoint_enforces_them_or_how_the_agents_narrow_them() {
    use crate::{BoundKind, BoundObject};
    let policy = |name: &str, target: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  {target}\n  action: DENY\n  rules: [{{to: [{{operation: {{methods: [POST]}}}}]}}]\n"
        )
    };
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "",
        &[
            policy("on-a", "targetRefs: [{kind: Service, group: \"\", name: a}]"),
            policy("on-b", "targetRefs: [{kind: Service, group: \"\", name: b}]"),
            policy("on-gone", "targetRefs: [{kind: Service, group: \"\", name: gone}]"),
            policy(
                "on-wp",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]",
            ),
            policy("on-both", "targetRefs: [{kind: Service, group: \"\", name: a}, {kind: Service, group: \"\", name: b}]"),
            policy("on-pods", "selector: {matchLabels: {app: a}}"),
            policy("on-deployment", "targetRefs: [{kind: Deployment, group: apps, name: a}]"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: l4\n  namespace: shop\nspec:\n  selector: {matchLabels: {app: a}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [evil]}}]}]\n"
                .to_owned(),
        ],
    );
    let conditions = state.bound_conditions();
    let of = |name: &str| {
        let object = BoundObject {
            kind: BoundKind::AuthorizationPolicy,
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        };
        let c = conditions.get(&object)?;
        Some((c.ok, c.reason.as_str(), c.message.clone()))
    };
    let accepted = Some((true, "Accepted", "bound to shop/wp".to_owned()));
    assert_eq!(of("on-a"), accepted);
    assert_eq!(of("on-wp"), accepted);
    let (ok, reason, message) = of("on-b").expect("on-b's condition");
    assert_eq!((ok, reason), (false, "NoWaypoint"));
    assert!(
        message.starts_with("Service shop/b has no waypoint"),
        "{message}"
    );
    // One target without waypoint is enough for the policy to be told.
    assert_eq!(of("on-both").map(|c| c.1), Some("NoWaypoint"));
    assert_eq!(
        of("on-gone").map(|c| (c.1, c.2)),
        Some(("TargetNotFound", "no Service shop/gone".to_owned()))
    );
    assert_eq!(of("on-deployment").map(|c| c.1), Some("TargetNotFound"));
    let types = |name: &str| {
        let object = BoundObject {
            kind: BoundKind::AuthorizationPolicy,
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        };
        conditions.get(&object).map(|c| c.condition_type)
    };
    assert_eq!(types("on-a"), Some("WaypointAccepted"));
    // A policy of pods (a selector, enforced by the node agents) is told whether the agents
    // enforce it as written: its HTTP field makes its DENY rule deny more.
    assert_eq!(types("on-pods"), Some("ZtunnelAccepted"));
    let (ok, reason, message) = of("on-pods").expect("on-pods' condition");
    assert_eq!((ok, reason), (false, "UnsupportedValue"));
    assert!(
        message.starts_with(
            "rules[0].to[0].operation.methods is an HTTP (L7) field the node agent does not \
             enforce: this DENY rule is enforced without it, so it denies more"
        ),
        "{message}"
    );
    assert_eq!(
        of("l4"),
        Some((true, "Accepted", "enforced by the node agents".to_owned()))
    );
    assert_eq!(
        BoundKind::AuthorizationPolicy.condition_types(),
        ["WaypointAccepted", "ZtunnelAccepted"]
    );
}

#[test]
fn jwt_rules_and_rate_limits_are_told_which_waypoint_applies_them_or_why_none_does() {
    use crate::{BoundKind, BoundObject};
    let authn = |name: &str, target: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  {target}\n  jwtRules: [{{issuer: https://idp.example, jwksUri: https://idp.example/keys}}]\n"
        )
    };
    let limit = "- applyTo: HTTP_FILTER\n    match: {context: WAYPOINT, waypoint: {}}\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.local_ratelimit\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n          stat_prefix: x\n          token_bucket: {max_tokens: 3, fill_interval: 60s}\n          filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}\n          filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}\n";
    let lua = "- applyTo: HTTP_FILTER\n    match: {context: SIDECAR_INBOUND}\n    patch:\n      operation: INSERT_BEFORE\n      value: {name: envoy.filters.http.lua}\n";
    let filter = |name: &str, target: &str, patches: &[&str]| {
        format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  {target}\n  configPatches:\n  {}",
            patches.join("  ")
        )
    };
    let on_a = "targetRefs: [{kind: Service, group: \"\", name: a}]";
    let on_b = "targetRefs: [{kind: Service, group: \"\", name: b}]";
    let pods = "workloadSelector: {labels: {app: a}}";
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "",
        &[
            authn("jwt-on-a", on_a),
            authn("jwt-on-b", on_b),
            authn("jwt-of-pods", "selector: {matchLabels: {app: a}}"),
            filter("limit-on-a", on_a, &[limit]),
            filter("limit-and-lua-on-a", on_a, &[limit, lua]),
            filter("lua-on-a", on_a, &[lua]),
            filter("limit-of-pods", pods, &[limit]),
            filter("lua-of-pods", pods, &[lua]),
        ],
    );
    let conditions = state.bound_conditions();
    let of = |kind, name: &str| {
        let c = conditions.get(&BoundObject::new(kind, "shop", name))?;
        assert_eq!(c.condition_type, "WaypointAccepted");
        Some((c.ok, c.reason.as_str(), c.message.clone()))
    };
    let accepted = Some((true, "Accepted", "bound to shop/wp".to_owned()));
    let ra = BoundKind::RequestAuthentication;
    assert_eq!(of(ra, "jwt-on-a"), accepted);
    let (ok, reason, message) = of(ra, "jwt-on-b").expect("jwt-on-b's condition");
    assert_eq!((ok, reason), (false, "NoWaypoint"));
    assert!(
        message.starts_with("Service shop/b has no waypoint"),
        "{message}"
    );
    // A selector is for sidecars: nothing validates its tokens, and it is told so.
    let (ok, reason, message) = of(ra, "jwt-of-pods").expect("jwt-of-pods' condition");
    assert_eq!((ok, reason), (false, "NoTargetRefs"));
    assert!(
        message.starts_with("no waypoint validates its tokens"),
        "{message}"
    );
    let ef = BoundKind::EnvoyFilter;
    assert_eq!(of(ef, "limit-on-a"), accepted);
    // A patch not applied is named, with what is.
    let (ok, reason, message) = of(ef, "limit-and-lua-on-a").expect("its condition");
    assert_eq!((ok, reason), (false, "UnsupportedValue"));
    assert!(
        message
            .starts_with("configPatches[1] (HTTP_FILTER, envoy.filters.http.lua) is not applied")
            && message.ends_with("; its local rate limits are applied, bound to shop/wp"),
        "{message}"
    );
    let (ok, reason, message) = of(ef, "lua-on-a").expect("its condition");
    assert_eq!((ok, reason), (false, "UnsupportedValue"));
    assert!(message.ends_with("; no patch is applied"), "{message}");
    let (ok, reason, message) = of(ef, "limit-of-pods").expect("its condition");
    assert_eq!((ok, reason), (false, "NoTargetRefs"));
    assert!(
        message.starts_with("no waypoint applies its local rate limits"),
        "{message}"
    );
    // A filter for sidecars that is no rate limit is not a waypoint's business.
    assert_eq!(of(ef, "lua-of-pods"), None);
    assert_eq!(ra.condition_types(), ["WaypointAccepted"]);
    assert_eq!(ef.condition_types(), ["WaypointAccepted"]);
}

/// A route's entries, per parent: its name, `Accepted` (status, reason) and message, and
/// `ResolvedRefs` (status, reason, message); every entry for generation 3.
type Entries = Vec<(
    String,
    (bool, &'static str),
    String,
    Option<(bool, &'static str, String)>,
)>;

fn route_entries(
    statuses: &std::collections::BTreeMap<crate::RouteObject, Vec<crate::ParentStatus>>,
    kind: crate::RouteKind,
    name: &str,
) -> Entries {
    let object = crate::RouteObject {
        kind,
        namespace: "shop".to_owned(),
        name: name.to_owned(),
    };
    statuses
        .get(&object)
        .unwrap_or_else(|| panic!("{name} has a status"))
        .iter()
        .map(|p| {
            assert_eq!(p.generation, Some(3));
            let refs = p
                .resolved_refs
                .as_ref()
                .map(|c| (c.ok, c.reason.as_str(), c.message.clone()));
            (
                p.parent.name.clone(),
                (p.accepted.ok, p.accepted.reason.as_str()),
                p.accepted.message.clone(),
                refs,
            )
        })
        .collect()
}

#[test]
fn routes_are_told_per_parent_whether_a_waypoint_applies_them_and_their_backends_resolve() {
    use crate::RouteKind;
    let route = |kind: &str, name: &str, parents: &str, backend: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\n  namespace: shop\n  generation: 3\nspec:\n  parentRefs: {parents}\n  rules:\n  - backendRefs: [{backend}]\n"
        )
    };
    let to_a = "{name: a, port: 80}";
    let on = |name: &str| format!("[{{group: \"\", kind: Service, name: {name}}}]");
    let state = cluster(
        "",
        "istio.io/use-waypoint: wp",
        "",
        &[
            route("HTTPRoute", "on-a", &on("a"), to_a),
            route(
                "HTTPRoute",
                "on-a-and-b-and-gone",
                "[{group: \"\", kind: Service, name: a, port: 80}, {group: \"\", kind: Service, name: b}, {group: \"\", kind: Service, name: gone}, {name: some-gateway}, {group: \"\", kind: Service, name: a, port: 81}]",
                to_a,
            ),
            route("GRPCRoute", "grpc-on-a", &on("a"), "{name: missing, port: 80}"),
            route(
                "HTTPRoute",
                "elsewhere",
                &on("a"),
                "{name: a, namespace: other, port: 80}",
            ),
            route(
                "HTTPRoute",
                "odd-kind",
                &on("a"),
                "{group: apps, kind: Deployment, name: a, port: 80}",
            ),
            route("TCPRoute", "tcp-on-a", &on("a"), "{name: missing, port: 80}")
                .replace("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1alpha2"),
        ],
    );
    let statuses = state.route_statuses();
    let of = |kind, name: &str| route_entries(&statuses, kind, name);
    let resolves = Some((true, "ResolvedRefs", "every backend resolves".to_owned()));
    let on_a = of(RouteKind::Http, "on-a");
    assert_eq!(
        on_a,
        [(
            "a".to_owned(),
            (true, "Accepted"),
            "applied by waypoint shop/wp".to_owned(),
            resolves.clone()
        )]
    );
    // One entry per Service parent, in order (the Gateway parent is not a waypoint's): a
    // Service without waypoint applies nothing, a missing one or a missing port attaches
    // nothing.
    let many = of(RouteKind::Http, "on-a-and-b-and-gone");
    let summary: Vec<_> = many
        .iter()
        .map(|(n, a, _, r)| (n.as_str(), *a, r.is_some()))
        .collect();
    assert_eq!(
        summary,
        [
            ("a", (true, "Accepted"), true),
            ("b", (false, "NoWaypoint"), true),
            ("gone", (false, "NoMatchingParent"), false),
            ("a", (false, "NoMatchingParent"), false),
        ]
    );
    assert!(
        many[1].2.starts_with("Service shop/b has no waypoint"),
        "{}",
        many[1].2
    );
    assert_eq!(
        many[2].2,
        "Service shop/gone does not exist: the route does not attach to it"
    );
    assert!(many[3].2.contains("has no TCP port"), "{}", many[3].2);
    // Backends that do not resolve, by Gateway API's reasons.
    let refs = |kind, name: &str| of(kind, name)[0].3.clone().expect("attached");
    let (ok, reason, message) = refs(RouteKind::Grpc, "grpc-on-a");
    assert_eq!((ok, reason), (false, "BackendNotFound"));
    assert_eq!(
        message,
        "Service shop/missing does not exist: its share of the requests gets a 500"
    );
    assert_eq!(
        refs(RouteKind::Http, "elsewhere").1,
        "RefNotPermitted",
        "another namespace without a ReferenceGrant"
    );
    assert_eq!(refs(RouteKind::Http, "odd-kind").1, "InvalidKind");
    // A TCPRoute's share is connections, refused.
    assert_eq!(
        refs(RouteKind::Tcp, "tcp-on-a").2,
        "Service shop/missing does not exist: its share of the connections is refused"
    );
    assert_eq!(statuses.len(), 6, "{statuses:?}");
}
