use std::net::SocketAddr;

use crate::{
    tests::{addr, docs, ip, opts, parse, pod, service},
    ClusterState, EndpointsFrom, EnrollmentOptions, Resolution,
};

fn slices() -> EnrollmentOptions {
    EnrollmentOptions {
        endpoints: EndpointsFrom::Slices,
        ..opts()
    }
}

/// An `EndpointSlice` of `service` in `ns`; `endpoints` are YAML flow items.
fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    ports: &str,
    endpoints: &str,
) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {family}\nports: [{ports}]\nendpoints: [{endpoints}]\n"
    )
}

fn endpoints_of(state: &ClusterState, vip: &str) -> Vec<(SocketAddr, Option<String>)> {
    let (_, port) = state.service_by_addr(addr(vip)).expect("service");
    port.endpoints
        .iter()
        .map(|e| (e.addr, e.workload.as_ref().map(|w| w.name.clone())))
        .collect()
}

fn build_with(text: &str, opts: &EnrollmentOptions) -> ClusterState {
    ClusterState::build(&parse(text), opts).expect("builds")
}

fn error_with(text: &str, opts: &EnrollmentOptions) -> String {
    ClusterState::build(&parse(text), opts)
        .expect_err("must not build")
        .to_string()
}

#[test]
fn slices_give_ready_addresses_on_the_matching_port_each_once() {
    let text = docs(&[
        pod("a", "p1", "n1", "10.0.0.1", "app: x"),
        pod("a", "p2", "n1", "10.0.0.2", "app: x"),
        service("a", "s", "10.96.0.1", "80", "8080", "app: x"),
        // The controller's two slices, the address 10.0.0.1 moving between them.
        slice(
            "a",
            "s-1",
            "s",
            "IPv4",
            "{port: 8080, protocol: TCP}, {name: other, port: 9}",
            "{addresses: [10.0.0.1], conditions: {ready: true}}, \
             {addresses: [10.0.0.3], conditions: {ready: false}}",
        ),
        slice(
            "a",
            "s-2",
            "s",
            "IPv4",
            "{port: 8080}",
            "{addresses: [10.0.0.1]}, {addresses: [10.0.0.2], conditions: {ready: true}}, \
             {addresses: [192.0.2.7]}",
        ),
        // Another namespace's slice for a service of the same name is not this service's.
        slice(
            "b",
            "s-3",
            "s",
            "IPv4",
            "{port: 8080}",
            "{addresses: [10.0.0.9]}",
        ),
    ]);
    let state = build_with(&text, &slices());
    assert_eq!(
        endpoints_of(&state, "10.96.0.1:80"),
        [
            (addr("10.0.0.1:8080"), Some("p1".to_owned())),
            (addr("10.0.0.2:8080"), Some("p2".to_owned())),
            // An address that is no pod's (a VM, say): served, with no identity to tunnel to.
            (addr("192.0.2.7:8080"), None),
        ],
        "not-ready 10.0.0.3 left out; `ready` absent counts as ready"
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let terminating =
        "{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}, \
         {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}";
    let text = |extra: &str| {
        docs(&[
            service("a", "s", "10.96.0.1", "80", "8080", "app: x"),
            slice(
                "a",
                "s-1",
                "s",
                "IPv4",
                "{port: 8080}",
                &format!("{terminating}{extra}"),
            ),
        ])
    };
    let state = build_with(&text(""), &slices());
    assert_eq!(
        endpoints_of(&state, "10.96.0.1:80"),
        [(addr("10.0.0.1:8080"), None)],
        "only the one still serving"
    );
    let state = build_with(&text(", {addresses: [10.0.0.4]}"), &slices());
    assert_eq!(
        endpoints_of(&state, "10.96.0.1:80"),
        [(addr("10.0.0.4:8080"), None)],
        "a ready endpoint takes over"
    );
}

#[test]
fn ports_match_by_name_and_protocol() {
    let text = docs(&[
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\nspec:\n  clusterIP: 10.96.0.1\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: dns, port: 53, protocol: TCP}\n".to_owned(),
        slice(
            "a",
            "s-1",
            "s",
            "IPv4",
            "{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: dns}",
            "{addresses: [10.0.0.1]}",
        ),
    ]);
    let state = build_with(&text, &slices());
    assert_eq!(
        endpoints_of(&state, "10.96.0.1:80"),
        [(addr("10.0.0.1:8080"), None)]
    );
    assert!(
        endpoints_of(&state, "10.96.0.1:53").is_empty(),
        "the UDP port is not the TCP one; a port without number serves nothing"
    );
    assert!(matches!(
        state.resolve(addr("10.96.0.1:53")),
        Resolution::NoEndpoint { .. }
    ));
}

#[test]
fn dual_stack_slices_serve_their_own_family() {
    let text = docs(&[
        pod("a", "dual", "n1", "10.0.0.1,fd00::1", "app: x"),
        service("a", "s", "10.96.0.1,fd00:96::1", "80", "8080", "app: x"),
        slice(
            "a",
            "s-v4",
            "s",
            "IPv4",
            "{port: 8080}",
            "{addresses: [10.0.0.1]}",
        ),
        slice(
            "a",
            "s-v6",
            "s",
            "IPv6",
            "{port: 8080}",
            "{addresses: ['fd00::1']}",
        ),
    ]);
    let state = build_with(&text, &slices());
    for (vip, endpoint) in [
        ("10.96.0.1:80", "10.0.0.1:8080"),
        ("[fd00:96::1]:80", "[fd00::1]:8080"),
    ] {
        let Resolution::Service {
            endpoint: picked,
            workload,
            ..
        } = state.resolve(addr(vip))
        else {
            panic!("{vip}: a service");
        };
        assert_eq!(picked, addr(endpoint));
        assert_eq!(workload.expect("the pod").name, "dual");
    }
}

#[test]
fn a_slice_cannot_lend_another_pods_identity() {
    // A slice in namespace `evil` claims, through its targetRef, that its address is the
    // `bank` pod; the address is the `evil` pod's, and that is the identity used.
    let text = docs(&[
        pod("bank", "vault", "n1", "10.0.0.1", "app: vault"),
        pod("evil", "mallory", "n1", "10.0.0.2", "app: m"),
        service("evil", "s", "10.96.0.1", "80", "8080", ""),
        slice(
            "evil",
            "s-1",
            "s",
            "IPv4",
            "{port: 8080}",
            "{addresses: [10.0.0.2], targetRef: {kind: Pod, namespace: bank, name: vault}}",
        ),
    ]);
    for opts in [opts(), slices()] {
        let state = build_with(&text, &opts);
        let Resolution::Service { workload, .. } = state.resolve(addr("10.96.0.1:80")) else {
            panic!("a service");
        };
        let workload = workload.expect("a pod");
        assert_eq!(
            (workload.namespace.as_str(), workload.name.as_str()),
            ("evil", "mallory")
        );
    }
}

#[test]
fn without_a_controller_selectors_decide_and_selectorless_services_read_slices() {
    let text = docs(&[
        pod("a", "p1", "n1", "10.0.0.1", "app: x"),
        pod("a", "p2", "n1", "10.0.0.2", "app: y"),
        service("a", "picked", "10.96.0.1", "80", "8080", "app: x"),
        service("a", "manual", "10.96.0.2", "80", "8080", ""),
        // Stale slices of the selector service are not read: the model is the controller.
        slice(
            "a",
            "picked-1",
            "picked",
            "IPv4",
            "{port: 8080}",
            "{addresses: [10.0.0.2]}",
        ),
        slice(
            "a",
            "manual-1",
            "manual",
            "IPv4",
            "{port: 9000}",
            "{addresses: [10.0.0.2]}",
        ),
    ]);
    let state = build_with(&text, &opts());
    assert_eq!(
        endpoints_of(&state, "10.96.0.1:80"),
        [(addr("10.0.0.1:8080"), Some("p1".to_owned()))]
    );
    assert_eq!(
        endpoints_of(&state, "10.96.0.2:80"),
        [(addr("10.0.0.2:9000"), Some("p2".to_owned()))]
    );
    // From slices only, the selector service has what its (stale) slice says.
    let state = build_with(&text, &slices());
    assert_eq!(
        endpoints_of(&state, "10.96.0.1:80"),
        [(addr("10.0.0.2:8080"), Some("p2".to_owned()))]
    );
}

#[test]
fn bad_slices_are_refused_naming_the_field() {
    let with = |family: &str, ports: &str, endpoints: &str| {
        docs(&[
            service("a", "s", "10.96.0.1", "80", "8080", ""),
            slice("a", "s-1", "s", family, ports, endpoints),
        ])
    };
    for (text, expected) in [
        (
            with("IPv4", "{port: 8080}", "{addresses: [10.0.0.1]}, {addresses: ['fd00::1']}"),
            "EndpointSlice a/s-1: endpoints[1].addresses[0]: fd00::1 is not of the slice's addressType IPv4",
        ),
        (
            with("IPv4", "{port: 8080}", "{addresses: [10.0.0.300]}"),
            "EndpointSlice a/s-1: endpoints[0].addresses[0]: \"10.0.0.300\" is not an IP address",
        ),
        (
            with("IPv4", "{port: 8080}", "{addresses: [127.0.0.1]}"),
            "EndpointSlice a/s-1: endpoints[0].addresses[0]: 127.0.0.1 is loopback, never an endpoint",
        ),
        (
            with("IPv6", "{port: 8080}", "{addresses: ['::']}"),
            "EndpointSlice a/s-1: endpoints[0].addresses[0]: :: is unspecified, never an endpoint",
        ),
        (
            with("IPv4", "{port: 8080}, {name: b, port: 70000}", "{addresses: [10.0.0.1]}"),
            "EndpointSlice a/s-1: ports[1].port: 70000 is not a port number (1-65535)",
        ),
    ] {
        assert_eq!(error_with(&text, &slices()), expected);
        assert_eq!(error_with(&text, &opts()), expected, "checked in both modes");
    }
}

#[test]
fn slices_that_serve_nothing_are_warned_about() {
    let text = docs(&[
        service("a", "s", "10.96.0.1", "80", "8080", ""),
        slice("a", "s-1", "s", "FQDN", "{port: 8080}", "{addresses: [db.example.com]}"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: loose, namespace: a}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n".to_owned(),
    ]);
    let state = build_with(&text, &slices());
    assert_eq!(
        state.warnings(),
        [
            "EndpointSlice a/loose: no kubernetes.io/service-name label, so no Service uses it",
            "EndpointSlice a/s-1: addressType \"FQDN\" is not used (only IPv4 and IPv6 slices are)",
        ]
    );
    assert!(endpoints_of(&state, "10.96.0.1:80").is_empty());
    assert!(state.workload_by_ip(ip("10.0.0.1")).is_none());
}
