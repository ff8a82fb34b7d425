//! Tests of the cluster view: parsing, translation, resolution, validation and hot reload.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use super::{
    k8s::{parse_documents, IntOrString, Kind, MetaExt, Object, PeerAuthMode, PodExt},
    spawn_watcher, ClusterState, ConfigDir, EndpointsFrom, EnrollmentOptions, FilesError, MtlsMode,
    PeerAuthScope, Resolution, Shortcut, StateError, TargetPort, SHORTCUT_ANNOTATION,
};

const CLUSTER: &str = include_str!("testdata/cluster.yaml");
const KUBECTL_LIST: &str = include_str!("testdata/kubectl-list.yaml");
const PEER_AUTHENTICATION: &str = include_str!("testdata/peer-authentication.yaml");

/// Label pairs in a table.
type Pairs<'a> = &'a [(&'a str, &'a str)];

pub(crate) fn opts() -> EnrollmentOptions {
    EnrollmentOptions::new("n0")
}

pub(crate) fn parse(text: &str) -> Vec<Object> {
    parse_documents("test.yaml", text).expect("parses")
}

fn build(text: &str) -> ClusterState {
    ClusterState::build(&parse(text), &opts()).expect("builds")
}

fn build_err(text: &str) -> String {
    ClusterState::build(&parse(text), &opts())
        .expect_err("must not build")
        .to_string()
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP address")
}

fn namespace(name: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n")
}

/// A running, ready pod on node `node` with its runtime annotations; `ips` comma-separated.
pub(crate) fn pod(ns: &str, name: &str, node: &str, ips: &str, labels: &str) -> String {
    let ip_list = list(ips, "  - ip: ");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\n  annotations:\n    mesh.local/netns: /run/netns/{name}\n    mesh.local/cgroup: /sys/fs/cgroup/{name}\nspec:\n  nodeName: {node}\nstatus:\n  phase: Running\n  podIPs:\n{ip_list}"
    )
}

/// A service with one TCP port; `vips` comma-separated (or `None`).
pub(crate) fn service(
    ns: &str,
    name: &str,
    vips: &str,
    port: &str,
    target: &str,
    selector: &str,
) -> String {
    let vip_list = list(vips, "  - ");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  clusterIPs:\n{vip_list}  ports:\n  - port: {port}\n    targetPort: {target}\n  selector: {{{selector}}}\n"
    )
}

/// One line per comma-separated item of `items`, after `prefix`.
fn list(items: &str, prefix: &str) -> String {
    items
        .split(',')
        .map(|item| format!("{prefix}{item}\n"))
        .collect::<Vec<_>>()
        .concat()
}

/// Parses each text (one file of YAML documents) and checks that its error contains every
/// expected part.
pub(crate) fn assert_parse_errors(table: &[(String, &[&str])]) {
    for (text, expected) in table {
        let err = parse_documents("objects.yaml", text)
            .expect_err("must not parse")
            .to_string();
        for part in *expected {
            assert!(err.contains(part), "error {err:?} lacks {part:?}");
        }
    }
}

/// A pod of waypoint `shop/wp`, under its own service account `wp`.
pub(crate) fn waypoint_pod(name: &str, node: &str, ip: &str) -> String {
    pod(
        "shop",
        name,
        node,
        ip,
        "gateway.networking.k8s.io/gateway-name: wp",
    )
    .replace("spec:\n", "spec:\n  serviceAccountName: wp\n")
}

pub(crate) fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

// ---------------------------------------------------------------------------------------------
// Parsing

#[test]
fn parses_each_kind_from_a_multi_document_file() {
    let objects = parse(CLUSTER);
    let kinds: Vec<Kind> = objects.iter().map(|o| o.object_ref().kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::Namespace,
            Kind::Namespace,
            Kind::Pod,
            Kind::Pod,
            Kind::Pod,
            Kind::Pod,
            Kind::Service
        ],
        "the Deployment and the empty last document are skipped"
    );
    let Object::Pod(web0) = &objects[2] else {
        panic!("not a pod")
    };
    assert_eq!(web0.metadata.namespace(), "shop");
    assert_eq!(web0.node_name(), Some("n0"));
    assert_eq!(web0.service_account(), "web");
    let status = web0.status.as_ref().expect("status");
    assert_eq!(status.pod_ips.as_ref().expect("podIPs").len(), 2);
    let spec = web0.spec.as_ref().expect("spec");
    assert_eq!(
        spec.containers[0].ports.as_ref().expect("ports")[0]
            .name
            .as_deref(),
        Some("http")
    );
    let Object::Pod(batch) = &objects[4] else {
        panic!("not a pod")
    };
    assert_eq!(batch.service_account(), "default");
    let Object::Service(web) = &objects[6] else {
        panic!("not a service")
    };
    let spec = web.spec.as_ref().expect("spec");
    assert_eq!(spec.cluster_ips.as_ref().expect("clusterIPs").len(), 2);
    let ports = spec.ports.as_ref().expect("ports");
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("http".into()))
    );
    assert_eq!(
        ports[0].protocol, None,
        "TCP by default, resolved when built"
    );
}

#[test]
fn namespace_defaults_to_default() {
    let objects = parse("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels:\n");
    assert_eq!(objects[0].object_ref().to_string(), "Pod default/a");
}

#[test]
fn parses_a_list_and_ignores_unknown_fields_and_kinds() {
    let objects = parse_documents("kubectl-list.yaml", KUBECTL_LIST).expect("parses");
    let names: Vec<String> = objects.iter().map(|o| o.object_ref().to_string()).collect();
    assert_eq!(
        names,
        [
            "Namespace demo",
            "Pod demo/echo-7d9f-abcde",
            "Service demo/echo",
            "EndpointSlice demo/echo-xyz"
        ]
    );
    let state = ClusterState::build(&objects, &opts()).expect("builds");
    let echo = state.workload_by_ip(ip("198.19.1.7")).expect("pod");
    assert!(echo.enrolled && echo.readiness == crate::Readiness::Ready);
    assert_eq!(
        echo.identity.as_str(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    let Resolution::Service { endpoint, .. } = state.resolve(addr("198.18.200.1:5678")) else {
        panic!("service expected");
    };
    assert_eq!(endpoint, addr("198.19.1.7:5678"));
    // Read as the Kubernetes source reads it, from the controller's slice: the same endpoint.
    let from_slices = EnrollmentOptions {
        endpoints: EndpointsFrom::Slices,
        ..opts()
    };
    let state = ClusterState::build(&objects, &from_slices).expect("builds");
    let Resolution::Service {
        endpoint, workload, ..
    } = state.resolve(addr("198.18.200.1:5678"))
    else {
        panic!("service expected");
    };
    assert_eq!(endpoint, addr("198.19.1.7:5678"));
    assert_eq!(workload.expect("the pod").name, "echo-7d9f-abcde");
}

#[test]
fn parses_typed_lists_whose_items_omit_their_kind() {
    let text =
        "apiVersion: v1\nkind: PodList\nitems:\n- metadata: {name: a}\n- metadata: {name: b}\n";
    assert_eq!(parse(text).len(), 2);
    let empty = "apiVersion: v1\nkind: List\nitems: []\n---\napiVersion: v1\nkind: List\n";
    assert!(parse(empty).is_empty());
}

#[test]
fn skips_known_kinds_of_other_api_groups() {
    let text = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  template: {}\n";
    assert!(parse(text).is_empty());
}

#[test]
fn rejects_documents_without_kind_or_api_version() {
    let no_kind = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nmetadata: {name: b}\n";
    let err = parse_documents("objs.yaml", no_kind)
        .expect_err("no kind")
        .to_string();
    assert_eq!(
        err,
        "objs.yaml: document 2: no `kind` (every object needs `apiVersion` and `kind`)"
    );

    let no_version = "kind: Pod\nmetadata: {name: a}\n";
    let err = parse_documents("objs.yaml", no_version)
        .expect_err("no apiVersion")
        .to_string();
    assert!(
        err.starts_with("objs.yaml: document 1: no `apiVersion`"),
        "{err}"
    );

    let in_list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n- {metadata: {name: b}}\n";
    let err = parse_documents("list.yaml", in_list)
        .expect_err("item without kind")
        .to_string();
    assert!(
        err.starts_with("list.yaml: document 1, items[1]: no `apiVersion`"),
        "{err}"
    );

    let scalar = "just text\n";
    let err = parse_documents("x.yaml", scalar)
        .expect_err("not an object")
        .to_string();
    assert!(
        err.starts_with("x.yaml: document 1: not an object"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_errors_name_file_and_document() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nmetadata: [unclosed\n";
    let err = parse_documents("bad.yaml", text)
        .expect_err("syntax")
        .to_string();
    assert!(
        err.starts_with("bad.yaml: document 2: invalid YAML: "),
        "{err}"
    );
    assert!(err.contains("line"), "{err}");
}

#[test]
fn shape_errors_name_object_field_and_line() {
    let text = format!(
        "{}---\n{}",
        namespace("a", ""),
        service("a", "web", "10.0.0.1", "http", "80", "app: web")
    );
    let err = parse_documents("svc.yaml", &text)
        .expect_err("port is a string")
        .to_string();
    assert!(
        err.starts_with("svc.yaml: document 2: Service a/web: spec.ports[0].port: invalid type"),
        "{err}"
    );
    assert!(err.contains("at line 16 column 11"), "{err}");

    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: ok}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: broken, namespace: x}\n  spec: {containers: [{ports: [{containerPort: many}]}]}\n";
    let err = parse_documents("list.yaml", list)
        .expect_err("containerPort")
        .to_string();
    assert!(
        err.starts_with("list.yaml: document 1, items[1]: Pod x/broken: items[1].spec.containers[0].ports[0].containerPort: invalid type"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Enrollment

#[test]
fn enrollment_follows_istio_ambient() {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let key = "istio.io/dataplane-mode";
    let custom = "mesh.example/mode";
    // (label key, namespace labels (None: no Namespace object), pod labels, enrolled)
    let table: &[(&str, Option<Pairs>, Pairs, bool)] = &[
        (key, Some(&[(key, "ambient")]), &[], true),
        (key, Some(&[]), &[], false),
        (key, None, &[], false),
        (key, Some(&[(key, "ambient")]), &[(key, "none")], false),
        (key, Some(&[]), &[(key, "ambient")], true),
        (key, None, &[(key, "ambient")], true),
        (key, Some(&[(key, "none")]), &[(key, "ambient")], true),
        (key, Some(&[(key, "ambient")]), &[(key, "other")], true),
        (key, Some(&[(key, "sidecar")]), &[], false),
        (key, Some(&[(custom, "ambient")]), &[], false),
        (custom, Some(&[(custom, "ambient")]), &[], true),
        (custom, Some(&[(key, "ambient")]), &[], false),
        (
            custom,
            Some(&[(custom, "ambient")]),
            &[(custom, "none")],
            false,
        ),
        (custom, None, &[(custom, "ambient")], true),
    ];
    for (label_key, ns_labels, pod_labels, expected) in table {
        let opts = EnrollmentOptions {
            label_key: (*label_key).to_owned(),
            ..opts()
        };
        let ns_labels = ns_labels.map(labels);
        let got = opts.is_enrolled(ns_labels.as_ref(), &labels(pod_labels));
        assert_eq!(
            got, *expected,
            "key {label_key}, namespace {ns_labels:?}, pod {pod_labels:?}"
        );
    }
}

#[test]
fn enrollment_in_the_built_state() {
    let state = build(CLUSTER);
    let enrolled = |ip_: &str| state.workload_by_ip(ip(ip_)).expect("pod").enrolled;
    assert!(enrolled("198.19.0.2"), "shop is labelled");
    assert!(!enrolled("198.19.0.3"), "batch opts out");
    assert!(
        enrolled("198.19.0.4"),
        "old-app opts in from an unlabelled namespace"
    );
    let on_n0: Vec<String> = state
        .workloads_on_node("n0")
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        on_n0,
        ["legacy/old-app", "shop/batch", "shop/web-0"],
        "enrolled and not"
    );
    assert_eq!(state.workloads_on_node("n1").len(), 1);
    assert_eq!(state.workloads_on_node("n9").len(), 0);
}

/// The short-cut is opt-in: the pod's annotation wins, else its namespace's, else disabled.
#[test]
fn shortcut_is_opt_in_by_pod_or_namespace_annotation() {
    let annotate = |object: &str, value: &str| {
        object.replacen(
            "metadata:\n",
            &format!("metadata:\n  annotations:\n    {SHORTCUT_ANNOTATION}: {value}\n"),
            1,
        )
    };
    // The pod's own annotation block: add the short-cut line to it.
    let pod_with = |name: &str, ip_: &str, value: &str| {
        pod("shop", name, "n0", ip_, "").replace(
            "  annotations:\n",
            &format!("  annotations:\n    {SHORTCUT_ANNOTATION}: {value}\n"),
        )
    };
    let text = docs(&[
        annotate(
            &namespace("shop", "istio.io/dataplane-mode: ambient"),
            "enabled",
        ),
        namespace("plain", "istio.io/dataplane-mode: ambient"),
        pod("shop", "inherits", "n0", "198.19.0.2", ""),
        pod_with("opts-out", "198.19.0.3", "disabled"),
        pod("plain", "default", "n0", "198.19.0.4", ""),
        pod_with("opts-in", "198.19.0.5", "enabled").replace("namespace: shop", "namespace: plain"),
    ]);
    let state = build(&text);
    let shortcut = |ip_: &str| state.workload_by_ip(ip(ip_)).expect("pod").shortcut;
    assert_eq!(
        shortcut("198.19.0.2"),
        Shortcut::Enabled,
        "namespace opts in"
    );
    assert_eq!(shortcut("198.19.0.3"), Shortcut::Disabled, "pod opts out");
    assert_eq!(shortcut("198.19.0.4"), Shortcut::Disabled, "the default");
    assert_eq!(shortcut("198.19.0.5"), Shortcut::Enabled, "pod opts in");
}

#[test]
fn a_bad_shortcut_annotation_is_refused_naming_object_and_value() {
    let bad_ns = namespace("shop", "").replacen(
        "metadata:\n",
        &format!("metadata:\n  annotations:\n    {SHORTCUT_ANNOTATION}: \"yes\"\n"),
        1,
    );
    let e = build_err(&bad_ns);
    assert_eq!(
        e,
        format!(
            "Namespace shop: metadata.annotations[{SHORTCUT_ANNOTATION}]: \"yes\" is not \"enabled\" or \"disabled\""
        )
    );
    let bad_pod = pod("shop", "web", "n0", "198.19.0.2", "").replace(
        "  annotations:\n",
        &format!("  annotations:\n    {SHORTCUT_ANNOTATION}: \"on\"\n"),
    );
    let e = build_err(&bad_pod);
    assert!(e.starts_with("Pod shop/web: metadata.annotations["), "{e}");
    assert!(e.contains("\"on\" is not"), "{e}");
}

/// A pod address the agent could not bind its listeners to, or that would capture the node's
/// own traffic, is refused naming the pod, the address and why.
#[test]
fn unusable_pod_addresses_are_refused() {
    for (bad, why) in [
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("169.254.1.1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
    ] {
        let e = build_err(&pod("shop", "web", "n0", &format!("\"{bad}\""), ""));
        assert!(e.starts_with("Pod shop/web: status.podIPs: "), "{bad}: {e}");
        assert!(
            e.ends_with(&format!("is {why}, never a pod's own address")),
            "{bad}: {e}"
        );
    }
}

#[test]
fn host_network_pods_are_not_enrolled_nor_indexed_by_ip() {
    let host = |name: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a, labels: {{app: node}}}}\nspec: {{nodeName: n0, hostNetwork: true}}\nstatus: {{podIP: 198.18.0.1}}\n")
    };
    let state = build(&docs(&[
        namespace("a", "istio.io/dataplane-mode: ambient"),
        host("h1"),
        host("h2"),
    ]));
    assert_eq!(
        state.workloads().len(),
        2,
        "shared node address is not a conflict"
    );
    assert!(state
        .workloads()
        .iter()
        .all(|w| w.host_network && !w.enrolled));
    assert!(state.workload_by_ip(ip("198.18.0.1")).is_none());
}

// ---------------------------------------------------------------------------------------------
// Workloads and services

#[test]
fn workload_fields() {
    let state = build(CLUSTER);
    let web0 = state
        .workload_by_ip(ip("fd00:6d65:7368::2"))
        .expect("by IPv6");
    assert_eq!(
        (web0.namespace.as_str(), web0.name.as_str()),
        ("shop", "web-0")
    );
    assert_eq!(
        web0.uid.as_deref(),
        Some("5d1c0a7e-0000-4000-8000-000000000001")
    );
    assert_eq!(web0.node.as_deref(), Some("n0"));
    assert_eq!(web0.service_account, "web");
    assert_eq!(
        web0.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(web0.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(web0.ips, [ip("198.19.0.2"), ip("fd00:6d65:7368::2")]);
    assert_eq!(web0.ip_like(ip("::1")), Some(ip("fd00:6d65:7368::2")));
    assert!(web0.readiness == crate::Readiness::Ready && web0.enrolled && !web0.host_network);
    assert_eq!(
        web0.netns.as_deref(),
        Some(Path::new("/run/netns/n0-web-0"))
    );
    assert_eq!(
        web0.cgroup.as_deref(),
        Some(Path::new("/sys/fs/cgroup/mesh-testbed/n0-web-0"))
    );
    assert!(Arc::ptr_eq(
        web0,
        state.workload_by_ip(ip("198.19.0.2")).expect("by IPv4")
    ));

    let custom = EnrollmentOptions {
        trust_domain: "example.org".into(),
        ..opts()
    };
    let state = ClusterState::build(&parse(CLUSTER), &custom).expect("builds");
    let batch = state.workload_by_ip(ip("198.19.0.3")).expect("batch");
    assert_eq!(
        batch.identity.as_str(),
        "spiffe://example.org/ns/shop/sa/default"
    );
}

#[test]
fn readiness_and_finished_pods() {
    let not_ready = pod("a", "b", "n1", "10.0.0.2", "app: x")
        + "  conditions:\n  - {type: Ready, status: \"False\"}\n";
    let finished = pod("a", "c", "n1", "10.0.0.2", "app: x").replace("Running", "Succeeded");
    let unknown = pod("a", "d", "n1", "10.0.0.3", "app: x")
        + "  conditions:\n  - {type: Ready, status: \"Unknown\"}\n";
    // Being deleted: it finishes what it has and takes nothing new.
    let terminating = pod("a", "e", "n1", "10.0.0.4", "app: x").replace(
        "metadata:\n",
        "metadata:\n  deletionTimestamp: \"2026-12-07T07:00:00Z\"\n",
    );
    let state = build(&docs(&[
        pod("a", "a", "n1", "10.0.0.1", "app: x"),
        not_ready,
        finished,
        unknown,
        terminating,
        service("a", "x", "10.96.0.1", "80", "8080", "app: x"),
    ]));
    assert!(state
        .workload_by_ip(ip("10.0.0.2"))
        .is_some_and(|w| w.name == "b" && w.readiness == crate::Readiness::NotReady));
    assert!(
        state.workloads().iter().all(|w| w.name != "c"),
        "a finished pod is left out"
    );
    let (_, port) = state
        .service_by_addr(addr("10.96.0.1:80"))
        .expect("service");
    let endpoints: Vec<&str> = port
        .endpoints
        .iter()
        .map(|e| e.workload.as_ref().expect("a pod").name.as_str())
        .collect();
    assert_eq!(
        endpoints,
        ["a", "d"],
        "only ready pods (Unknown counts as ready)"
    );
    assert!(state
        .workload_by_ip(ip("10.0.0.4"))
        .is_some_and(|w| w.name == "e" && w.readiness == crate::Readiness::Terminating));
    // Every ready pod being deleted: they serve on (serving-terminating endpoints).
    let state = build(&docs(&[
        pod("a", "e", "n1", "10.0.0.4", "app: x").replace(
            "metadata:\n",
            "metadata:\n  deletionTimestamp: \"2026-12-07T07:00:00Z\"\n",
        ),
        service("a", "x", "10.96.0.1", "80", "8080", "app: x"),
    ]));
    let (_, port) = state
        .service_by_addr(addr("10.96.0.1:80"))
        .expect("service");
    assert_eq!(
        port.endpoints.len(),
        1,
        "the terminating pod, for want of another"
    );
}

#[test]
fn service_selects_ready_pods_of_its_namespace_by_all_selector_labels() {
    let state = build(&docs(&[
        pod(
            "a",
            "match",
            "n1",
            "10.0.0.1",
            "app: x, tier: web, extra: y",
        ),
        pod("a", "partial", "n1", "10.0.0.2", "app: x"),
        pod("other", "elsewhere", "n1", "10.0.0.3", "app: x, tier: web"),
        service("a", "s", "10.96.0.1", "80", "8080", "app: x, tier: web"),
        service("a", "no-selector", "10.96.0.2", "80", "8080", ""),
    ]));
    let (svc, port) = state
        .service_by_addr(addr("10.96.0.1:80"))
        .expect("service");
    assert_eq!(svc.to_string(), "a/s");
    assert_eq!(port.target_port, TargetPort::Number(8080));
    let endpoints: Vec<String> = port
        .endpoints
        .iter()
        .map(|e| e.workload.as_ref().expect("a pod").to_string())
        .collect();
    assert_eq!(endpoints, ["a/match"]);
    assert!(matches!(
        state.resolve(addr("10.96.0.2:80")),
        Resolution::NoEndpoint { service } if service.name == "no-selector"
    ));
}

#[test]
fn named_target_port_resolves_per_pod() {
    let with_port = |name: &str, ip_: &str, port: u16| {
        pod("a", name, "n1", ip_, "app: x").replace(
            "spec:\n",
            &format!("spec:\n  containers:\n  - name: c\n    ports:\n    - {{name: http, containerPort: {port}}}\n    - {{name: dns, containerPort: 53, protocol: UDP}}\n"),
        )
    };
    let state = build(&docs(&[
        with_port("p1", "10.0.0.1", 8080),
        with_port("p2", "10.0.0.2", 9090),
        pod("a", "p3", "n1", "10.0.0.3", "app: x"),
        service("a", "s", "10.96.0.1", "80", "http", "app: x"),
        service("a", "t", "10.96.0.2", "53", "dns", "app: x"),
    ]));
    let (_, port) = state
        .service_by_addr(addr("10.96.0.1:80"))
        .expect("service");
    assert_eq!(port.target_port, TargetPort::Name("http".into()));
    let endpoints: Vec<(String, u16)> = port
        .endpoints
        .iter()
        .map(|e| {
            (
                e.workload.as_ref().expect("a pod").name.clone(),
                e.addr.port(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [("p1".into(), 8080), ("p2".into(), 9090)],
        "p3 lacks the port"
    );
    let mut seen: Vec<SocketAddr> = (0..2)
        .map(|_| match state.resolve(addr("10.96.0.1:80")) {
            Resolution::Service { endpoint, .. } => endpoint,
            other => panic!("{other:?}"),
        })
        .collect();
    seen.sort();
    assert_eq!(seen, [addr("10.0.0.1:8080"), addr("10.0.0.2:9090")]);
    // The TCP service port named `dns` does not match the UDP container port of that name.
    assert!(matches!(
        state.resolve(addr("10.96.0.2:53")),
        Resolution::NoEndpoint { .. }
    ));
}

#[test]
fn round_robin_alternates_between_two_endpoints() {
    let state = build(&docs(&[
        pod("a", "p1", "n1", "10.0.0.1", "app: x"),
        pod("a", "p2", "n1", "10.0.0.2", "app: x"),
        service("a", "s", "10.96.0.1", "80", "8080", "app: x"),
    ]));
    let pick = || match state.resolve(addr("10.96.0.1:80")) {
        Resolution::Service {
            endpoint,
            workload,
            service,
        } => {
            assert_eq!(service.name, "s");
            let workload = workload.expect("a pod");
            assert_eq!(Some(endpoint.ip()), workload.ip_like(endpoint.ip()));
            endpoint
        }
        other => panic!("{other:?}"),
    };
    let (first, second, third) = (pick(), pick(), pick());
    assert_ne!(
        first, second,
        "two consecutive resolutions pick the two endpoints"
    );
    let mut both = [first, second];
    both.sort();
    assert_eq!(both, [addr("10.0.0.1:8080"), addr("10.0.0.2:8080")]);
    assert_eq!(third, first, "and then start over");
}

#[test]
fn resolve_pod_ip_service_unknown_and_empty_service() {
    let state = build(&docs(&[
        pod("a", "p1", "n1", "10.0.0.1", "app: x"),
        service("a", "s", "10.96.0.1", "80", "8080", "app: x"),
        service("a", "empty", "10.96.0.2", "80", "8080", "app: nobody"),
    ]));
    assert!(matches!(
        state.resolve(addr("10.0.0.1:1234")),
        Resolution::Workload { workload } if workload.name == "p1"
    ));
    assert!(matches!(
        state.resolve(addr("10.96.0.1:80")),
        Resolution::Service { .. }
    ));
    assert!(
        matches!(state.resolve(addr("10.96.0.1:81")), Resolution::Passthrough),
        "no such port"
    );
    assert!(matches!(
        state.resolve(addr("192.0.2.1:80")),
        Resolution::Passthrough
    ));
    assert!(matches!(
        state.resolve(addr("10.96.0.2:80")),
        Resolution::NoEndpoint { service } if service.name == "empty"
    ));
    // An IPv4-mapped IPv6 destination is the IPv4 address.
    assert!(matches!(
        state.resolve(addr("[::ffff:10.96.0.1]:80")),
        Resolution::Service { .. }
    ));
}

#[test]
fn dual_stack_service_resolves_to_the_destination_family() {
    let state = build(&docs(&[
        pod("a", "dual", "n1", "10.0.0.1,fd00::1", "app: x"),
        pod("a", "v4only", "n1", "10.0.0.2", "app: y"),
        service("a", "s", "10.96.0.1,fd00:96::1", "80", "8080", "app: x"),
        service("a", "t", "10.96.0.2,fd00:96::2", "80", "8080", "app: y"),
    ]));
    let endpoint = |dst: &str| match state.resolve(addr(dst)) {
        Resolution::Service { endpoint, .. } => Some(endpoint),
        Resolution::NoEndpoint { .. } => None,
        other => panic!("{other:?}"),
    };
    assert_eq!(endpoint("10.96.0.1:80"), Some(addr("10.0.0.1:8080")));
    assert_eq!(endpoint("[fd00:96::1]:80"), Some(addr("[fd00::1]:8080")));
    assert_eq!(
        endpoint("[fd00:96::2]:80"),
        None,
        "no endpoint has an IPv6 address"
    );
    assert!(matches!(
        state.resolve(addr("[fd00::1]:22")),
        Resolution::Workload { workload } if workload.name == "dual"
    ));
}

#[test]
fn headless_service_has_no_vip_but_pods_resolve() {
    let state = build(&docs(&[
        pod("a", "p1", "n1", "10.0.0.1", "app: x"),
        service("a", "h", "None", "80", "8080", "app: x"),
    ]));
    assert!(state.services()[0].vips.is_empty());
    assert_eq!(state.services()[0].ports[0].endpoints.len(), 1);
    assert!(matches!(
        state.resolve(addr("10.0.0.1:8080")),
        Resolution::Workload { .. }
    ));
}

#[test]
fn fixture_cluster_resolves() {
    let state = build(CLUSTER);
    let mut targets: Vec<String> = (0..2)
        .map(
            |_| match state.resolve(addr("[fd00:6d65:7368:ff::10]:80")) {
                Resolution::Service {
                    endpoint, workload, ..
                } => format!("{} {endpoint}", workload.expect("a pod")),
                other => panic!("{other:?}"),
            },
        )
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "shop/web-0 [fd00:6d65:7368::2]:8080",
            "shop/web-1 [fd00:6d65:7368:1::2]:8080"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Validation: every error names the object and the field

/// Builds each text and checks that the error contains every expected part.
fn assert_errors(cases: Vec<(String, &[&str])>) {
    for (text, expected) in cases {
        let err = build_err(&text);
        for part in expected {
            assert!(
                err.contains(part),
                "error {err:?} lacks {part:?}, for:\n{text}"
            );
        }
    }
}

#[test]
fn pod_validation_errors_name_object_and_field() {
    let p = |ips: &str| pod("a", "p", "n1", ips, "app: x");
    let container = |port: &str| {
        let ports = format!("spec:\n  containers:\n  - ports:\n    - containerPort: {port}\n");
        pod("a", "p", "n1", "10.0.0.1", "").replace("spec:\n", &ports)
    };
    assert_errors(vec![
        (
            p("10.0.0.x"),
            &[
                "Pod a/p",
                "status.podIPs[0]",
                "\"10.0.0.x\" is not an IP address",
            ],
        ),
        (
            p("10.0.0.1,10.0.0.2"),
            &["Pod a/p", "status.podIPs[1]", "second address"],
        ),
        (
            p("10.0.0.1") + "  podIP: 10.0.0.9\n",
            &[
                "Pod a/p",
                "status.podIP 10.0.0.9 differs from status.podIPs[0] 10.0.0.1",
            ],
        ),
        (
            container("0"),
            &["Pod a/p", "spec.containers[0].ports[0].containerPort", "0"],
        ),
        (
            container("80").replace(
                "containerPort: 80",
                "containerPort: 80\n      protocol: tcp",
            ),
            &["Pod a/p", "spec.containers[0].ports[0].protocol", "\"tcp\""],
        ),
        (
            docs(&[p("10.0.0.1"), pod("a", "q", "n1", "10.0.0.1", "")]),
            &[
                "Pod a/q",
                "status.podIPs",
                "10.0.0.1 is already the address of Pod a/p",
            ],
        ),
        (
            docs(&[p("10.0.0.1"), p("10.0.0.2")]),
            &["Pod a/p is defined more than once"],
        ),
        (
            pod("A", "p", "n1", "10.0.0.1", ""),
            &["Pod A/p", "metadata.namespace", "DNS label"],
        ),
        (
            pod("a", "P", "n1", "10.0.0.1", ""),
            &["Pod a/P", "metadata.name", "DNS subdomain"],
        ),
        (
            p("10.0.0.1").replace("nodeName: n1", "nodeName: n1\n  serviceAccountName: a/b"),
            &["Pod a/p", "spec.serviceAccountName", "\"a/b\""],
        ),
        (
            p("10.0.0.1").replace("/run/netns/p", "run/netns/p"),
            &[
                "Pod a/p",
                "metadata.annotations[mesh.local/netns]",
                "not an absolute path",
            ],
        ),
        (
            namespace("Bad", ""),
            &["Namespace Bad", "metadata.name", "DNS label"],
        ),
    ]);
}

#[test]
fn service_validation_errors_name_object_and_field() {
    let s = |port: &str, target: &str| service("a", "s", "10.96.0.1", port, target, "app: x");
    let one_port = "  - port: 80\n    targetPort: 80\n";
    assert_errors(vec![
        (
            s("0", "80"),
            &[
                "Service a/s",
                "spec.ports[0].port",
                "0 is not a port number",
            ],
        ),
        (
            s("65536", "80"),
            &["Service a/s", "spec.ports[0].port", "65536"],
        ),
        (s("-1", "80"), &["Service a/s", "spec.ports[0].port", "-1"]),
        (
            s("80", "70000"),
            &["Service a/s", "spec.ports[0].targetPort", "70000"],
        ),
        (
            s("80", "\"8080\""),
            &["Service a/s", "spec.ports[0].targetPort", "not a port name"],
        ),
        (
            s("80", "80").replace("    targetPort", "    protocol: ICMP\n    targetPort"),
            &["Service a/s", "spec.ports[0].protocol", "ICMP"],
        ),
        (
            s("80", "80").replace(one_port, "  - port: 80\n  - port: 80\n"),
            &[
                "Service a/s",
                "spec.ports[1].port",
                "80/TCP is listed twice",
            ],
        ),
        (
            service("a", "s", "10.96.0.999", "80", "80", ""),
            &["Service a/s", "spec.clusterIPs[0]", "10.96.0.999"],
        ),
        (
            service("a", "s", "10.96.0.1,10.96.0.2", "80", "80", ""),
            &["Service a/s", "spec.clusterIPs[1]", "second address"],
        ),
        (
            s("80", "80").replace("spec:\n", "spec:\n  clusterIP: 10.96.0.7\n"),
            &[
                "Service a/s",
                "spec.clusterIP 10.96.0.7 differs from spec.clusterIPs[0] 10.96.0.1",
            ],
        ),
        (
            docs(&[
                s("80", "80"),
                service("b", "t", "10.96.0.1", "80", "80", ""),
            ]),
            &[
                "Service b/t",
                "spec.ports[0].port",
                "10.96.0.1:80 (TCP) is already claimed by Service a/s",
            ],
        ),
        (
            docs(&[
                pod("a", "p", "n1", "10.0.0.1", ""),
                service("a", "s", "10.0.0.1", "80", "80", ""),
            ]),
            &[
                "Service a/s",
                "spec.clusterIPs[0]",
                "is already the address of Pod a/p",
            ],
        ),
        (
            service("a", "S", "None", "80", "80", ""),
            &["Service a/S", "metadata.name", "DNS label"],
        ),
    ]);
    // Same port number over UDP, and the same VIP and port in another protocol: no conflict.
    let udp = s("53", "53").replace(
        one_port.replace("80", "53").as_str(),
        "  - port: 53\n  - port: 53\n    protocol: UDP\n",
    );
    build(&docs(&[udp]));
}

#[test]
fn enrolled_local_pods_need_runtime_annotations() {
    let ns = namespace("a", "istio.io/dataplane-mode: ambient");
    let bare = |node: &str, annotation: &str| {
        pod("a", "p", node, "10.0.0.1", "")
            .replace(&format!("    {annotation}: "), "    ignored/x: ")
    };
    let err = build_err(&docs(&[ns.clone(), bare("n0", "mesh.local/netns")]));
    assert!(
        err.contains("Pod a/p: metadata.annotations[mesh.local/netns] is missing"),
        "{err}"
    );
    assert!(err.contains("(enrolled, on this node n0)"), "{err}");
    let err = build_err(&docs(&[ns.clone(), bare("n0", "mesh.local/cgroup")]));
    assert!(
        err.contains("Pod a/p: metadata.annotations[mesh.local/cgroup] is missing"),
        "{err}"
    );
    // On another node, or not enrolled: not needed.
    build(&docs(&[ns, bare("n1", "mesh.local/netns")]));
    build(&bare("n0", "mesh.local/netns"));
}

#[test]
fn invalid_options_are_rejected() {
    let mut bad = opts();
    bad.trust_domain = "Cluster.Local".into();
    assert!(matches!(
        ClusterState::build(&[], &bad),
        Err(StateError::TrustDomain(_))
    ));
    let mut bad = opts();
    bad.label_key.clear();
    assert!(matches!(
        ClusterState::build(&[], &bad),
        Err(StateError::EmptyLabelKey)
    ));
    assert!(matches!(
        ConfigDir::new("/nonexistent", bad),
        Err(FilesError::State(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Directory source and hot reload

/// A unique, empty temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "mesh-agent-cluster-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.0.join(name), text).expect("write");
    }

    fn remove(&self, name: &str) {
        fs::remove_file(self.0.join(name)).expect("remove");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn names(state: &ClusterState) -> Vec<String> {
    let workloads = state.workloads().iter().map(|w| format!("pod {w}"));
    let services = state.services().iter().map(|s| format!("svc {s}"));
    workloads.chain(services).collect()
}

fn error_messages(state: &ClusterState) -> Vec<String> {
    state
        .errors()
        .iter()
        .map(|e| format!("{}: {}", e.source, e.message))
        .collect()
}

#[test]
fn load_reads_yaml_files_and_ignores_others() {
    let dir = TempDir::new("ignore");
    dir.write("a.yaml", &pod("a", "a", "n1", "10.0.0.1", ""));
    dir.write("b.yml", &pod("a", "b", "n1", "10.0.0.2", ""));
    for ignored in [
        ".hidden.yaml",
        ".#a.yaml",
        "a.yaml~",
        "#a.yaml#",
        "c.json",
        "README",
    ] {
        dir.write(ignored, "not: [yaml");
    }
    fs::create_dir(dir.0.join("sub.yaml")).expect("subdir");
    fs::write(
        dir.0.join("sub.yaml/x.yaml"),
        pod("a", "x", "n1", "10.0.0.9", ""),
    )
    .expect("write");
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    let state = config.load().expect("loads");
    assert_eq!(state.generation(), 1);
    assert_eq!(names(&state), ["pod a/a", "pod a/b"]);
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    let again = config.load().expect("loads");
    assert!(
        Arc::ptr_eq(&state, &again),
        "nothing changed: same snapshot"
    );
}

#[test]
fn missing_directory_fails_the_first_load_only() {
    let dir = TempDir::new("missing");
    let missing = dir.0.join("not-there");
    let err = ConfigDir::new(&missing, opts())
        .expect("options")
        .load()
        .expect_err("missing");
    assert!(matches!(err, FilesError::ReadDir { .. }));
    assert!(err.to_string().contains("not-there"), "{err}");

    let sub = dir.0.join("cfg");
    fs::create_dir(&sub).expect("mkdir");
    fs::write(sub.join("a.yaml"), pod("a", "a", "n1", "10.0.0.1", "")).expect("write");
    let mut config = ConfigDir::new(&sub, opts()).expect("options");
    assert_eq!(config.load().expect("loads").generation(), 1);
    fs::rename(&sub, dir.0.join("moved")).expect("rename");
    let state = config.load().expect("later failures do not fail");
    assert_eq!(state.generation(), 2, "the error is published");
    assert_eq!(names(&state), ["pod a/a"], "objects kept");
    assert!(
        error_messages(&state)[0].contains("config directory"),
        "{:?}",
        state.errors()
    );
    assert!(
        Arc::ptr_eq(&state, &config.load().expect("loads")),
        "reported once"
    );
    fs::rename(dir.0.join("moved"), &sub).expect("rename back");
    let state = config.load().expect("loads");
    assert_eq!((state.generation(), state.errors().len()), (3, 0));
}

#[test]
fn hot_reload_change_break_fix_delete() {
    let dir = TempDir::new("reload");
    dir.write(
        "ns.yaml",
        &namespace("a", "istio.io/dataplane-mode: ambient"),
    );
    dir.write(
        "pods.yaml",
        &docs(&[pod("a", "p1", "n1", "10.0.0.1", "app: x")]),
    );
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    let first = config.load().expect("loads");
    assert_eq!(names(&first), ["pod a/p1"]);

    // Change: a new generation with the new objects.
    dir.write(
        "pods.yaml",
        &docs(&[
            pod("a", "p1", "n1", "10.0.0.1", "app: x"),
            pod("a", "p2", "n1", "10.0.0.2", "app: x"),
        ]),
    );
    let changed = config.load().expect("loads");
    assert_eq!(changed.generation(), 2);
    assert_eq!(names(&changed), ["pod a/p1", "pod a/p2"]);

    // Break (syntax): error reported, the file's previous objects kept.
    dir.write("pods.yaml", "apiVersion: v1\nkind: Pod\nmetadata: [\n");
    let broken = config.load().expect("loads");
    assert_eq!(broken.generation(), 3);
    assert_eq!(names(&broken), ["pod a/p1", "pod a/p2"]);
    let errors = error_messages(&broken);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("pods.yaml: document 1: invalid YAML"),
        "{errors:?}"
    );
    assert_eq!(
        broken.errors()[0].source,
        dir.0.join("pods.yaml").display().to_string()
    );

    // Break (validation): same, and the error names file, object and field.
    dir.write("pods.yaml", &pod("a", "p1", "n1", "10.0.0.300", "app: x"));
    let invalid = config.load().expect("loads");
    assert_eq!(names(&invalid), ["pod a/p1", "pod a/p2"]);
    let errors = error_messages(&invalid);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("pods.yaml: not applied"), "{errors:?}");
    assert!(
        errors[0].contains("Pod a/p1: status.podIPs[0]: \"10.0.0.300\""),
        "{errors:?}"
    );

    // Fix: recovered.
    dir.write("pods.yaml", &pod("a", "p3", "n1", "10.0.0.3", "app: x"));
    let fixed = config.load().expect("loads");
    assert_eq!(names(&fixed), ["pod a/p3"]);
    assert!(fixed.errors().is_empty(), "{:?}", fixed.errors());

    // Delete: its objects are gone.
    dir.remove("pods.yaml");
    let deleted = config.load().expect("loads");
    assert!(names(&deleted).is_empty());
    assert!(deleted.generation() > fixed.generation());
}

#[test]
fn file_that_never_parsed_contributes_nothing() {
    let dir = TempDir::new("never");
    dir.write("good.yaml", &pod("a", "p1", "n1", "10.0.0.1", ""));
    dir.write("bad.yaml", "kind: Pod\n");
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    let state = config.load().expect("a bad file does not fail the load");
    assert_eq!(names(&state), ["pod a/p1"]);
    let errors = error_messages(&state);
    assert!(
        errors[0].contains("bad.yaml: document 1: no `apiVersion`"),
        "{errors:?}"
    );
    dir.remove("bad.yaml");
    let state = config.load().expect("loads");
    assert!(state.errors().is_empty(), "{:?}", state.errors());
}

#[test]
fn conflict_between_files_rejects_the_changed_file() {
    let dir = TempDir::new("conflict");
    dir.write("a.yaml", &service("a", "s", "10.96.0.1", "80", "80", ""));
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    config.load().expect("loads");
    // A new file and a change to an existing file in the same round; only b.yaml conflicts.
    dir.write("b.yaml", &service("b", "t", "10.96.0.1", "80", "80", ""));
    dir.write("c.yaml", &pod("a", "p", "n1", "10.0.0.1", ""));
    let state = config.load().expect("loads");
    assert_eq!(
        names(&state),
        ["pod a/p", "svc a/s"],
        "c.yaml applied, b.yaml not"
    );
    let errors = error_messages(&state);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = &errors[0];
    assert!(error.contains("b.yaml: not applied"), "{error}");
    assert!(
        error.contains(
            "Service b/t: spec.ports[0].port: 10.96.0.1:80 (TCP) is already claimed by Service a/s"
        ),
        "{error}"
    );
    assert!(
        error.contains("see also") && error.contains("a.yaml"),
        "{error}"
    );
    // Fixing a.yaml instead (moving its VIP) lets the waiting b.yaml in.
    dir.write("a.yaml", &service("a", "s", "10.96.0.9", "80", "80", ""));
    let state = config.load().expect("loads");
    assert_eq!(names(&state), ["pod a/p", "svc a/s", "svc b/t"]);
    assert!(state.errors().is_empty(), "{:?}", state.errors());
}

#[test]
fn change_that_breaks_an_unchanged_file_keeps_the_previous_state() {
    let dir = TempDir::new("indirect");
    dir.write("ns.yaml", &namespace("a", ""));
    let unannotated = pod("a", "p", "n0", "10.0.0.1", "").replace("mesh.local/", "other/");
    dir.write("pods.yaml", &unannotated);
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    let before = config.load().expect("loads");
    assert!(!before.workloads()[0].enrolled);
    // Enrolling the namespace would enroll a local pod that lacks its runtime annotations.
    dir.write(
        "ns.yaml",
        &namespace("a", "istio.io/dataplane-mode: ambient"),
    );
    let after = config.load().expect("loads");
    assert!(
        !after.workloads()[0].enrolled,
        "the namespace change is not applied"
    );
    let errors = error_messages(&after);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("ns.yaml: not applied"), "{errors:?}");
    assert!(
        errors[0].contains("Pod a/p: metadata.annotations[mesh.local/netns] is missing"),
        "{errors:?}"
    );
    assert!(
        errors[0].contains("see also") && errors[0].contains("pods.yaml"),
        "{errors:?}"
    );
    // Annotating the pod lets both changes in.
    dir.write("pods.yaml", &pod("a", "p", "n0", "10.0.0.1", ""));
    let fixed = config.load().expect("loads");
    assert!(fixed.workloads()[0].enrolled);
    assert!(fixed.errors().is_empty(), "{:?}", fixed.errors());
}

#[test]
fn edits_that_do_not_change_objects_publish_nothing() {
    let dir = TempDir::new("noop");
    let text = pod("a", "p", "n1", "10.0.0.1", "");
    dir.write("a.yaml", &text);
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    let first = config.load().expect("loads");
    dir.write("a.yaml", &format!("# a comment\n{text}"));
    assert!(Arc::ptr_eq(&first, &config.load().expect("loads")));
}

#[test]
fn same_length_rewrite_within_the_same_second_is_seen() {
    let dir = TempDir::new("samelen");
    dir.write("a.yaml", &pod("a", "p", "n1", "10.0.0.1", ""));
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    config.load().expect("loads");
    dir.write("a.yaml", &pod("a", "q", "n1", "10.0.0.1", ""));
    assert_eq!(names(&config.load().expect("loads")), ["pod a/q"]);
}

#[test]
fn duplicate_object_across_files_is_rejected() {
    let dir = TempDir::new("dup");
    dir.write("a.yaml", &pod("a", "p", "n1", "10.0.0.1", ""));
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    config.load().expect("loads");
    dir.write("b.yaml", &pod("a", "p", "n1", "10.0.0.2", ""));
    let state = config.load().expect("loads");
    assert_eq!(state.workloads()[0].ips, [ip("10.0.0.1")]);
    let errors = error_messages(&state);
    assert!(
        errors[0].contains("b.yaml: not applied")
            && errors[0].contains("Pod a/p is defined more than once"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn watcher_publishes_changes_and_stops_without_receivers() {
    let dir = TempDir::new("watch");
    dir.write("a.yaml", &pod("a", "p1", "n1", "10.0.0.1", ""));
    let (mut rx, task) =
        spawn_watcher(&dir.0, opts(), Duration::from_millis(20)).expect("first load");
    assert_eq!(rx.borrow_and_update().generation(), 1);

    dir.write("a.yaml", &pod("a", "p2", "n1", "10.0.0.2", ""));
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a change within 10 s")
        .expect("watcher alive");
    let state = Arc::clone(&rx.borrow_and_update());
    assert_eq!(state.generation(), 2);
    assert_eq!(names(&state), ["pod a/p2"]);

    drop(rx);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the watcher stops once no one listens")
        .expect("no panic");
}

#[tokio::test]
async fn watcher_first_load_error_is_returned() {
    let dir = TempDir::new("watch-missing");
    let err = spawn_watcher(dir.0.join("nope"), opts(), Duration::from_millis(20))
        .expect_err("missing directory");
    assert!(matches!(err, FilesError::ReadDir { .. }));
}

// ---------------------------------------------------------------------------------------------
// File limits

/// A DENY `AuthorizationPolicy` in namespace `a`.
const DENY_POLICY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: deny-evil, namespace: a}\nspec:\n  action: DENY\n  rules:\n  \
    - from: [{source: {namespaces: [evil]}}]\n";

/// The smallest limits accepted.
fn small_limits() -> super::FileLimits {
    super::FileLimits {
        max_file_bytes: super::limits::MIN_MAX_FILE_BYTES,
        max_depth: super::limits::MIN_MAX_DEPTH,
    }
}

#[test]
fn a_file_over_the_size_limit_is_refused_unread_and_keeps_its_objects() {
    let dir = TempDir::new("too-large");
    dir.write("pods.yaml", &pod("a", "p1", "n1", "10.0.0.1", ""));
    let mut config = ConfigDir::with_limits(&dir.0, opts(), small_limits()).expect("options");
    assert_eq!(names(&config.load().expect("loads")), ["pod a/p1"]);

    // Valid objects, more of them than 4 KiB holds.
    let pods: Vec<String> = (1..30)
        .map(|i| pod("a", &format!("q{i}"), "n1", &format!("10.0.1.{i}"), ""))
        .collect();
    let big = docs(&pods);
    assert!(big.len() > 4096, "{}", big.len());
    dir.write("pods.yaml", &big);
    let state = config.load().expect("loads");
    assert_eq!(names(&state), ["pod a/p1"], "the last good objects stay");
    let errors = error_messages(&state);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let expected = format!(
        "pods.yaml: {} bytes, over the size limit of 4096 bytes (--config-max-file-bytes)",
        big.len()
    );
    assert!(errors[0].contains(&expected), "{errors:?}");

    // A sparse 1 GiB file is refused on its size, in milliseconds, without being read.
    let huge = fs::File::create(dir.0.join("huge.yaml")).expect("create");
    huge.set_len(1 << 30).expect("a sparse file");
    let started = std::time::Instant::now();
    let state = config.load().expect("loads");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let errors = error_messages(&state);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("huge.yaml: 1073741824 bytes, over the size limit of 4096")),
        "{errors:?}"
    );

    // Within the limit again: applied.
    dir.remove("huge.yaml");
    dir.write("pods.yaml", &pod("a", "p2", "n1", "10.0.0.2", ""));
    let state = config.load().expect("loads");
    assert_eq!(names(&state), ["pod a/p2"]);
    assert!(state.errors().is_empty(), "{:?}", state.errors());
}

#[test]
fn a_file_nested_too_deep_is_refused_before_parsing_and_keeps_its_objects() {
    let dir = TempDir::new("too-deep");
    dir.write("policy.yaml", DENY_POLICY);
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    assert_eq!(
        config.load().expect("loads").authorization_policies().len(),
        1
    );

    // Flow style, 200,000 levels: refused in milliseconds, the policy stays in force.
    dir.write("policy.yaml", &"[".repeat(200_000));
    let started = std::time::Instant::now();
    let state = config.load().expect("loads");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(state.authorization_policies().len(), 1, "the policy stays");
    let errors = error_messages(&state);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains(
            "policy.yaml: nested 200000 levels deep, over the depth limit of 64 \
             (--config-max-depth) from line 1, column 65"
        ),
        "{errors:?}"
    );

    // Block style, within what serde_yaml takes but over a lower limit.
    let mut config = ConfigDir::with_limits(&dir.0, opts(), small_limits()).expect("options");
    let block: Vec<String> = (0..20)
        .map(|level| format!("{}k{level}:", "  ".repeat(level)))
        .collect();
    dir.write("policy.yaml", &block.join("\n"));
    let errors = error_messages(&config.load().expect("loads"));
    assert!(
        errors[0].contains(
            "policy.yaml: nested 20 levels deep, over the depth limit of 16 \
             (--config-max-depth) from line 17, column 33"
        ),
        "{errors:?}"
    );
}

/// The first state published within `within` for which `wanted` holds (`Err` on timeout).
async fn first_state(
    rx: &mut tokio::sync::watch::Receiver<Arc<ClusterState>>,
    within: Duration,
    wanted: impl Fn(&ClusterState) -> bool,
) -> Result<Arc<ClusterState>, tokio::time::error::Elapsed> {
    tokio::time::timeout(within, async {
        loop {
            rx.changed().await.expect("watcher alive");
            let state = Arc::clone(&rx.borrow_and_update());
            if wanted(&state) {
                return state;
            }
        }
    })
    .await
}

#[tokio::test]
async fn watcher_applies_a_policy_within_a_second_while_a_deep_file_is_refused() {
    let dir = TempDir::new("watch-deep");
    dir.write("ns.yaml", &namespace("a", ""));
    // The agent's own poll interval.
    let (mut rx, _task) =
        spawn_watcher(&dir.0, opts(), Duration::from_millis(250)).expect("first load");
    dir.write("deep.yaml", &"[".repeat(200_000));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let written = std::time::Instant::now();
    dir.write("policy.yaml", DENY_POLICY);
    let state = first_state(&mut rx, Duration::from_secs(1), |s| {
        !s.authorization_policies().is_empty()
    })
    .await
    .unwrap_or_else(|_| panic!("the policy is not applied {:?} after", written.elapsed()));
    let errors = error_messages(&state);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("deep.yaml: nested 200000 levels deep, over the depth limit of 64")
            && errors[0].contains("--config-max-depth"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn watcher_applies_other_files_while_a_large_file_is_parsed() {
    let dir = TempDir::new("watch-slow");
    dir.write("ns.yaml", &namespace("a", ""));
    let (mut rx, _task) =
        spawn_watcher(&dir.0, opts(), Duration::from_millis(50)).expect("first load");
    // A valid 1 MiB Pod (an ignored field of 500,000 numbers): over a second to parse in a
    // debug build, a third of one in a release build.
    let slow = pod("a", "slow", "n1", "10.0.0.1", "")
        .replace("spec:", &format!("junk: [{}]\nspec:", "1,".repeat(500_000)));
    dir.write("slow.yaml", &slow);
    dir.write("policy.yaml", DENY_POLICY);
    let written = std::time::Instant::now();

    let state = first_state(&mut rx, Duration::from_secs(1), |s| {
        !s.authorization_policies().is_empty()
    })
    .await
    .unwrap_or_else(|_| panic!("the policy is not applied {:?} after", written.elapsed()));
    assert!(
        names(&state).is_empty(),
        "the policy came first: {:?}",
        names(&state)
    );
    let state = first_state(&mut rx, Duration::from_secs(60), |s| {
        !s.workloads().is_empty()
    })
    .await
    .expect("the large file is applied once parsed");
    assert_eq!(names(&state), ["pod a/slow"]);
    assert_eq!(state.authorization_policies().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// PeerAuthentication

/// A `security.istio.io/v1` `PeerAuthentication`. Empty arguments leave their field out:
/// `created` (`metadata.creationTimestamp`), `selector` (`matchLabels` as a flow mapping's
/// content), `mode` (`spec.mtls`), `ports` (`portLevelMtls` as a flow mapping's content).
fn peer_auth(
    ns: &str,
    name: &str,
    created: &str,
    selector: &str,
    mode: &str,
    ports: &str,
) -> String {
    let optional = |value: &str, line: String| {
        if value.is_empty() {
            String::new()
        } else {
            line
        }
    };
    [
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\n"),
        optional(created, format!("  creationTimestamp: \"{created}\"\n")),
        "spec:\n".to_owned(),
        optional(selector, format!("  selector:\n    matchLabels: {{{selector}}}\n")),
        optional(mode, format!("  mtls:\n    mode: {mode}\n")),
        optional(ports, format!("  portLevelMtls: {{{ports}}}\n")),
    ]
    .concat()
}

/// Pods of the `PeerAuthentication` tests: `shop/web` (app: web, tier: front), `shop/db`
/// (app: db), `other/web` (app: web) and `istio-system/istiod` (app: istiod).
fn pa_pods() -> Vec<String> {
    vec![
        pod("shop", "web", "n1", "10.0.0.1", "app: web, tier: front"),
        pod("shop", "db", "n1", "10.0.0.2", "app: db"),
        pod("other", "web", "n1", "10.0.0.3", "app: web"),
        pod("istio-system", "istiod", "n1", "10.0.0.4", "app: istiod"),
    ]
}

/// The decision for pod `ns/name` on `port`: mode, deciding policy, declared mode, port-level.
fn decide(
    state: &ClusterState,
    workload: &str,
    port: u16,
) -> (MtlsMode, Option<String>, PeerAuthMode, bool) {
    let workload = state
        .workloads()
        .iter()
        .find(|w| w.to_string() == workload)
        .expect("workload");
    let decision = state.peer_authentication(workload, port);
    (
        decision.mode,
        decision.policy.as_ref().map(ToString::to_string),
        decision.declared,
        decision.port.is_some(),
    )
}

/// A case of the decision tables: what, policies, workload, port, and the expected decision as
/// `MODE policy` (`-` for none), with ` (port)` when a port-level entry decided.
type DecisionCase<'a> = (&'a str, Vec<String>, &'a str, u16, &'a str);

/// Builds each case's policies with [`pa_pods`] and checks the decision.
fn assert_decisions(table: Vec<DecisionCase>) {
    for (case, policies, workload, port, expected) in table {
        let mut objects = pa_pods();
        objects.extend(policies);
        let state = build(&docs(&objects));
        let (mode, policy, _, port_level) = decide(&state, workload, port);
        let got = format!(
            "{mode} {}{}",
            policy.as_deref().unwrap_or("-"),
            if port_level { " (port)" } else { "" }
        );
        assert_eq!(got, expected, "{case}");
    }
}

fn mesh_pa(mode: &str) -> String {
    peer_auth("istio-system", "default", "", "", mode, "")
}

fn namespace_pa(ns: &str, mode: &str) -> String {
    peer_auth(ns, "default", "", "", mode, "")
}

/// `shop/web`, selecting `app: web`.
fn web_pa(mode: &str, ports: &str) -> String {
    peer_auth("shop", "web", "", "app: web", mode, ports)
}

#[test]
fn peer_authentication_mesh_and_namespace_scopes() {
    let (mesh, ns) = (mesh_pa, namespace_pa);
    assert_decisions(vec![
        ("no policy", vec![], "shop/web", 80, "PERMISSIVE -"),
        (
            "mesh-wide STRICT",
            vec![mesh("STRICT")],
            "shop/web",
            80,
            "STRICT istio-system/default",
        ),
        (
            "mesh-wide, root namespace",
            vec![mesh("STRICT")],
            "istio-system/istiod",
            80,
            "STRICT istio-system/default",
        ),
        (
            "namespace overrides mesh",
            vec![mesh("STRICT"), ns("shop", "PERMISSIVE")],
            "shop/web",
            80,
            "PERMISSIVE shop/default",
        ),
        (
            "other namespace keeps the mesh's",
            vec![mesh("STRICT"), ns("shop", "PERMISSIVE")],
            "other/web",
            80,
            "STRICT istio-system/default",
        ),
        (
            "policy in another namespace",
            vec![ns("other", "STRICT")],
            "shop/web",
            80,
            "PERMISSIVE -",
        ),
    ]);
}

#[test]
fn peer_authentication_workload_selectors() {
    let empty_selector = peer_auth("shop", "all", "", "", "PERMISSIVE", "")
        .replace("spec:\n", "spec:\n  selector:\n    matchLabels: {}\n");
    let in_other = peer_auth("other", "web", "", "app: web", "STRICT", "");
    let not_db = peer_auth("shop", "x", "", "app: db", "STRICT", "");
    let two_labels = peer_auth("shop", "x", "", "app: web, tier: back", "STRICT", "");
    let root_web = peer_auth("istio-system", "web", "", "app: web", "STRICT", "");
    let root_istiod = peer_auth("istio-system", "istiod", "", "app: istiod", "STRICT", "");
    let (mesh, ns, web) = (mesh_pa, namespace_pa, web_pa);
    assert_decisions(vec![
        (
            "selector in another namespace",
            vec![in_other],
            "shop/web",
            80,
            "PERMISSIVE -",
        ),
        (
            "selector overrides namespace",
            vec![ns("shop", "STRICT"), web("PERMISSIVE", "")],
            "shop/web",
            80,
            "PERMISSIVE shop/web",
        ),
        (
            "not selected: the namespace's",
            vec![ns("shop", "STRICT"), web("PERMISSIVE", "")],
            "shop/db",
            80,
            "STRICT shop/default",
        ),
        (
            "non-matching selector",
            vec![not_db],
            "shop/web",
            80,
            "PERMISSIVE -",
        ),
        (
            "selector needs every label",
            vec![two_labels],
            "shop/web",
            80,
            "PERMISSIVE -",
        ),
        (
            "empty matchLabels is namespace-wide",
            vec![mesh("STRICT"), empty_selector],
            "shop/db",
            80,
            "PERMISSIVE shop/all",
        ),
        (
            "root-namespace selector ignored",
            vec![root_web],
            "shop/web",
            80,
            "PERMISSIVE -",
        ),
        (
            "root-namespace selector ignored there too",
            vec![root_istiod],
            "istio-system/istiod",
            80,
            "PERMISSIVE -",
        ),
    ]);
}

#[test]
fn peer_authentication_unset_inherits_and_disable_is_ignored() {
    let (mesh, ns, web) = (mesh_pa, namespace_pa, web_pa);
    assert_decisions(vec![
        (
            "UNSET at every level",
            vec![mesh("STRICT"), ns("shop", "UNSET"), web("", "")],
            "shop/web",
            80,
            "STRICT istio-system/default",
        ),
        (
            "absent mtls is UNSET",
            vec![ns("shop", "STRICT"), web("", "")],
            "shop/web",
            80,
            "STRICT shop/default",
        ),
        (
            "only UNSET: the default",
            vec![mesh("UNSET")],
            "shop/web",
            80,
            "PERMISSIVE -",
        ),
        (
            "STRICT selector under PERMISSIVE",
            vec![mesh("PERMISSIVE"), web("STRICT", "")],
            "shop/web",
            80,
            "STRICT shop/web",
        ),
        (
            "DISABLE is ignored",
            vec![mesh("STRICT"), ns("shop", "DISABLE")],
            "shop/web",
            80,
            "STRICT istio-system/default",
        ),
        (
            "DISABLE selector is ignored",
            vec![ns("shop", "STRICT"), web("DISABLE", "")],
            "shop/web",
            80,
            "STRICT shop/default",
        ),
    ]);
}

#[test]
fn peer_authentication_port_level() {
    let (ns, web) = (namespace_pa, web_pa);
    let strict_8080_open = || web("STRICT", "8080: {mode: PERMISSIVE}");
    assert_decisions(vec![
        (
            "port-level override",
            vec![strict_8080_open()],
            "shop/web",
            8080,
            "PERMISSIVE shop/web (port)",
        ),
        (
            "other port: the workload's",
            vec![strict_8080_open()],
            "shop/web",
            80,
            "STRICT shop/web",
        ),
        (
            "not selected: no port-level",
            vec![strict_8080_open()],
            "shop/db",
            8080,
            "PERMISSIVE -",
        ),
        (
            "STRICT port, PERMISSIVE namespace",
            vec![
                ns("shop", "PERMISSIVE"),
                web("", "\"9000\": {mode: STRICT}"),
            ],
            "shop/web",
            9000,
            "STRICT shop/web (port)",
        ),
        (
            "port UNSET: the workload's",
            vec![
                ns("shop", "STRICT"),
                web("PERMISSIVE", "8080: {mode: UNSET}"),
            ],
            "shop/web",
            8080,
            "PERMISSIVE shop/web",
        ),
        (
            "port and workload UNSET",
            vec![ns("shop", "STRICT"), web("UNSET", "8080: {mode: UNSET}")],
            "shop/web",
            8080,
            "STRICT shop/default",
        ),
        (
            "port without mode is UNSET",
            vec![ns("shop", "STRICT"), web("", "8081: {}")],
            "shop/web",
            8081,
            "STRICT shop/default",
        ),
        (
            "port DISABLE is ignored",
            vec![web("STRICT", "8080: {mode: DISABLE}")],
            "shop/web",
            8080,
            "STRICT shop/web",
        ),
    ]);
}

#[test]
fn peer_authentication_decision_reports_disable_and_displays() {
    let state = build(&docs(&[
        pod("shop", "web", "n1", "10.0.0.1", "app: web"),
        peer_auth("istio-system", "default", "", "", "STRICT", ""),
        peer_auth(
            "shop",
            "web",
            "",
            "app: web",
            "DISABLE",
            "8080: {mode: STRICT}",
        ),
    ]));
    let web = &state.workloads()[0];
    let disabled = state.peer_authentication(web, 80);
    // DISABLE is ignored: the mesh-wide STRICT applies.
    assert_eq!(
        (disabled.mode, disabled.declared),
        (MtlsMode::Strict, PeerAuthMode::Strict)
    );
    assert_eq!(
        disabled.to_string(),
        "STRICT (PeerAuthentication istio-system/default, mesh-wide)"
    );
    let port = state.peer_authentication(web, 8080);
    assert_eq!(port.port, Some(8080));
    assert_eq!(
        port.to_string(),
        "STRICT (PeerAuthentication shop/web, port 8080)"
    );
    let empty = build(&pod("shop", "web", "n1", "10.0.0.1", "app: web"));
    assert_eq!(
        empty
            .peer_authentication(&empty.workloads()[0], 80)
            .to_string(),
        "PERMISSIVE (no PeerAuthentication sets a mode)"
    );
}

#[test]
fn conflicting_namespace_and_mesh_peer_authentications_oldest_wins_with_a_warning() {
    let table: Vec<ConflictCase> = vec![
        (
            "two namespace-wide: the older, though later by name",
            vec![
                peer_auth("shop", "a", "2024-06-01T00:00:00Z", "", "STRICT", ""),
                peer_auth("shop", "b", "2024-01-01T00:00:00Z", "", "PERMISSIVE", ""),
            ],
            "shop/b",
            &[
                "PeerAuthentications shop/b, shop/a conflict",
                "namespace-wide in shop",
                "the oldest, shop/b, applies",
            ],
        ),
        (
            "same time: by name",
            vec![
                peer_auth("shop", "b", "2024-01-01T00:00:00Z", "", "PERMISSIVE", ""),
                peer_auth("shop", "a", "2024-01-01T00:00:00Z", "", "STRICT", ""),
            ],
            "shop/a",
            &["the oldest, shop/a, applies"],
        ),
        (
            "offsets are compared as instants",
            vec![
                peer_auth("shop", "a", "2024-01-01T01:30:00+02:00", "", "STRICT", ""),
                peer_auth("shop", "b", "2024-01-01T00:00:00Z", "", "PERMISSIVE", ""),
            ],
            "shop/a",
            &["the oldest, shop/a, applies"],
        ),
        (
            "no timestamp counts as the oldest",
            vec![
                peer_auth("shop", "a", "2024-01-01T00:00:00Z", "", "STRICT", ""),
                peer_auth("shop", "b", "", "", "PERMISSIVE", ""),
            ],
            "shop/b",
            &["the oldest, shop/b, applies"],
        ),
        (
            "two mesh-wide",
            vec![
                peer_auth(
                    "istio-system",
                    "x",
                    "2024-02-01T00:00:00Z",
                    "",
                    "STRICT",
                    "",
                ),
                peer_auth(
                    "istio-system",
                    "y",
                    "2024-01-01T00:00:00Z",
                    "",
                    "PERMISSIVE",
                    "",
                ),
            ],
            "istio-system/y",
            &[
                "istio-system/y, istio-system/x conflict",
                "mesh-wide (root namespace istio-system)",
            ],
        ),
    ];
    assert_conflicts(table);
}

#[test]
fn conflicting_selector_peer_authentications_oldest_wins_with_a_warning() {
    let table: Vec<ConflictCase> = vec![(
        "two selectors of one workload",
        vec![
            peer_auth(
                "shop",
                "new",
                "2024-02-01T00:00:00Z",
                "app: web",
                "STRICT",
                "",
            ),
            peer_auth(
                "shop",
                "old",
                "2024-01-01T00:00:00Z",
                "app: web",
                "PERMISSIVE",
                "",
            ),
        ],
        "shop/old",
        &[
            "shop/old, shop/new conflict",
            "selecting shop/web, shop/web-2",
            "the oldest, shop/old, applies",
        ],
    )];
    assert_conflicts(table);
}

/// A case of the conflict tables: what, policies, deciding policy of `shop/web`, expected parts
/// of the one warning.
type ConflictCase<'a> = (&'a str, Vec<String>, &'a str, &'a [&'a str]);

/// Builds each case with pods `shop/web` and `shop/web-2` (app: web) and checks the decision and
/// the warning.
fn assert_conflicts(table: Vec<ConflictCase>) {
    let pods = || {
        vec![
            pod("shop", "web", "n1", "10.0.0.1", "app: web"),
            pod("shop", "web-2", "n1", "10.0.0.2", "app: web"),
        ]
    };
    for (case, policies, winner, warning) in table {
        let mut objects = pods();
        objects.extend(policies);
        let state = build(&docs(&objects));
        assert_eq!(
            decide(&state, "shop/web", 80).1.as_deref(),
            Some(winner),
            "{case}"
        );
        assert_eq!(state.warnings().len(), 1, "{case}: {:?}", state.warnings());
        for part in warning {
            assert!(
                state.warnings()[0].contains(part),
                "{case}: {:?} lacks {part:?}",
                state.warnings()
            );
        }
    }
}

#[test]
fn policies_of_different_levels_or_namespaces_do_not_conflict() {
    // A root-namespace selector policy is reported as ignored, though.
    let state = build(&docs(&[
        pod("shop", "web", "n1", "10.0.0.1", "app: web"),
        peer_auth("shop", "default", "", "", "STRICT", ""),
        peer_auth("shop", "web", "", "app: web", "PERMISSIVE", ""),
        peer_auth("other", "default", "", "", "STRICT", ""),
        peer_auth("istio-system", "web", "", "app: web", "STRICT", ""),
    ]));
    assert_eq!(state.warnings().len(), 1, "{:?}", state.warnings());
    assert!(
        state.warnings()[0].contains("PeerAuthentication istio-system/web is ignored"),
        "{:?}",
        state.warnings()
    );
}

#[test]
fn peer_authentications_are_listed_with_their_scope() {
    let objects = parse_documents("peer-authentication.yaml", PEER_AUTHENTICATION).expect("parses");
    assert_eq!(objects.len(), 3, "the Telemetry is skipped");
    let mut all = parse(CLUSTER);
    all.extend(objects);
    let state = ClusterState::build(&all, &opts()).expect("builds");
    let listed: Vec<(String, PeerAuthScope, PeerAuthMode)> = state
        .peer_authentications()
        .iter()
        .map(|p| (p.to_string(), p.scope, p.mode))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "istio-system/default".into(),
                PeerAuthScope::Mesh,
                PeerAuthMode::Strict
            ),
            (
                "legacy/default".into(),
                PeerAuthScope::Namespace,
                PeerAuthMode::Permissive
            ),
            (
                "shop/web-metrics".into(),
                PeerAuthScope::Workload,
                PeerAuthMode::Unset
            ),
        ]
    );
    let metrics = &state.peer_authentications()[2];
    assert_eq!(metrics.selector.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        metrics.port_level.iter().collect::<Vec<_>>(),
        [(&9090, &PeerAuthMode::Permissive)]
    );
    assert_eq!(
        metrics.creation_timestamp.as_deref(),
        Some("2024-05-02T08:30:00Z")
    );
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());

    let mode = |workload: &str, port: u16| {
        let (mode, policy, _, _) = decide(&state, workload, port);
        format!("{mode} {}", policy.unwrap_or_default())
    };
    assert_eq!(mode("shop/web-0", 8080), "STRICT istio-system/default");
    assert_eq!(mode("shop/web-0", 9090), "PERMISSIVE shop/web-metrics");
    assert_eq!(mode("shop/batch", 9090), "STRICT istio-system/default");
    assert_eq!(mode("legacy/old-app", 80), "PERMISSIVE legacy/default");
}

#[test]
fn peer_authentication_versions_and_lists() {
    let v1beta1 = peer_auth("shop", "a", "", "", "STRICT", "")
        .replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n");
    let alpha = peer_auth("shop", "b", "", "", "STRICT", "")
        .replace("security.istio.io/v1\n", "security.istio.io/v1alpha1\n");
    let objects = parse(&docs(&[v1beta1, alpha]));
    let names: Vec<String> = objects.iter().map(|o| o.object_ref().to_string()).collect();
    assert_eq!(names, ["PeerAuthentication shop/a"], "v1alpha1 is not read");

    let typed = "apiVersion: security.istio.io/v1\nkind: PeerAuthenticationList\nitems:\n- metadata: {name: a, namespace: shop}\n  spec: {mtls: {mode: STRICT}}\n";
    let mixed = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n- apiVersion: security.istio.io/v1beta1\n  kind: PeerAuthentication\n  metadata: {name: b, namespace: shop, creationTimestamp: 2024-05-01T10:00:00Z}\n  spec: {selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: STRICT}}}\n";
    let state = build(&docs(&[typed.to_owned(), mixed.to_owned()]));
    let listed: Vec<String> = state
        .peer_authentications()
        .iter()
        .map(|p| format!("{p} {:?}", p.creation_timestamp))
        .collect();
    assert_eq!(
        listed,
        ["shop/a None", "shop/b Some(\"2024-05-01T10:00:00Z\")"]
    );

    // The same policy under both versions is one object, defined twice.
    let err = build_err(&docs(&[
        peer_auth("shop", "a", "", "", "STRICT", ""),
        peer_auth("shop", "a", "", "", "STRICT", "")
            .replace("security.istio.io/v1\n", "security.istio.io/v1beta1\n"),
    ]));
    assert!(
        err.contains("PeerAuthentication shop/a is defined more than once"),
        "{err}"
    );
}

#[test]
fn peer_authentication_spec_forms() {
    // portLevelMtls before the selector, quoted and unquoted port keys, null fields.
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: shop}\nspec:\n  portLevelMtls:\n    8080: {mode: STRICT}\n    \"9090\":\n    \"443\": {mode: null}\n  mtls:\n  selector:\n    matchLabels: {app: web}\n    matchExpressions: []\n";
    let Object::PeerAuthentication(pa) = &parse(text)[0] else {
        panic!("not a PeerAuthentication")
    };
    assert_eq!(pa.spec.mode(), PeerAuthMode::Unset);
    let ports: Vec<(u16, PeerAuthMode)> = pa
        .spec
        .port_level_mtls
        .iter()
        .map(|(port, mtls)| (*port, mtls.mode))
        .collect();
    assert_eq!(
        ports,
        [
            (443, PeerAuthMode::Unset),
            (8080, PeerAuthMode::Strict),
            (9090, PeerAuthMode::Unset)
        ]
    );
    let bare = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n";
    let Object::PeerAuthentication(pa) = &parse(bare)[0] else {
        panic!("not a PeerAuthentication")
    };
    assert_eq!(pa.metadata.namespace(), "default");
    assert_eq!(pa.spec.mode(), PeerAuthMode::Unset);
    assert!(pa.spec.match_labels().is_none() && pa.spec.port_level_mtls.is_empty());
}

#[test]
fn peer_authentication_parse_errors_name_file_object_field_and_line() {
    let spec = |body: &str| {
        format!(
            "{}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\n  namespace: shop\nspec:\n{body}",
            namespace("shop", "")
        )
    };
    let web = "  selector:\n    matchLabels: {app: web}\n";
    // (text, expected parts of the message)
    let table: Vec<(String, &[&str])> = vec![
        (
            spec("  mtls:\n    mode: STRICTER\n"),
            &[
                "spec.mtls.mode: unknown variant `STRICTER`",
                "`UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`",
                "line 14 column 11",
            ],
        ),
        (
            spec("  mtls:\n    mode: strict\n"),
            &["spec.mtls.mode: unknown variant `strict`", "line 14"],
        ),
        (
            spec(&format!("{web}  portLevelMtls:\n    http: {{mode: STRICT}}\n")),
            &[
                "spec.portLevelMtls: invalid value: string \"http\", expected a port number (1-65535)",
                "line 16",
            ],
        ),
        (
            spec(&format!("{web}  portLevelMtls:\n    \"80a\": {{mode: STRICT}}\n")),
            &["spec.portLevelMtls: invalid value: string \"80a\"", "line 16"],
        ),
        (
            spec(&format!("{web}  portLevelMtls:\n    0: {{mode: STRICT}}\n")),
            &["spec.portLevelMtls: invalid value: integer `0`", "line 16"],
        ),
        (
            spec(&format!("{web}  portLevelMtls:\n    70000: {{mode: STRICT}}\n")),
            &["spec.portLevelMtls: invalid value: integer `70000`", "line 16"],
        ),
        (
            spec(&format!("{web}  portLevelMtls:\n    8080: {{mode: STRICT}}\n    \"8080\": {{mode: PERMISSIVE}}\n")),
            &["spec.portLevelMtls: port 8080 is listed twice", "line 17"],
        ),
        (
            spec(&format!("{web}  portLevelMtls:\n    8080: {{mode: OFF}}\n")),
            &["spec.portLevelMtls.8080.mode: unknown variant `OFF`", "line 16"],
        ),
        (
            spec("  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n"),
            &[
                "spec.portLevelMtls: requires a selector with matchLabels",
                "portLevelMtls requires selector",
                "line 15",
            ],
        ),
        (
            spec("  selector:\n    matchLabels: {}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n"),
            &["spec.portLevelMtls: requires a selector with matchLabels", "line 16"],
        ),
        (
            spec("  selector:\n    matchExpressions:\n    - {key: app, operator: In, values: [web]}\n"),
            &["spec.selector.matchExpressions: not supported", "line 15"],
        ),
        (
            spec("  mtls: STRICT\n"),
            &["spec.mtls: invalid type: string \"STRICT\"", "line 13"],
        ),
    ];
    for (text, expected) in table {
        let err = parse_documents("pa.yaml", &text)
            .expect_err("must not parse")
            .to_string();
        let mut parts = vec!["pa.yaml: document 2: PeerAuthentication shop/x: "];
        parts.extend(expected);
        for part in parts {
            assert!(
                err.contains(part),
                "error {err:?} lacks {part:?}, for:\n{text}"
            );
        }
    }

    // Inside a list, the path starts at the item.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: PeerAuthentication\n  metadata: {name: x, namespace: shop}\n  spec: {mtls: {mode: NOPE}}\n";
    let err = parse_documents("list.yaml", list)
        .expect_err("mode")
        .to_string();
    assert!(
        err.starts_with("list.yaml: document 1, items[0]: PeerAuthentication shop/x: items[0].spec.mtls.mode: unknown variant `NOPE`"),
        "{err}"
    );
}

#[test]
fn peer_authentication_validation_errors_name_object_and_field() {
    let pa = |ns: &str, name: &str, created: &str| peer_auth(ns, name, created, "", "STRICT", "");
    assert_errors(vec![
        (
            pa("Shop", "x", ""),
            &[
                "PeerAuthentication Shop/x",
                "metadata.namespace",
                "DNS label",
            ],
        ),
        (
            pa("shop", "X", ""),
            &[
                "PeerAuthentication shop/X",
                "metadata.name",
                "DNS subdomain",
            ],
        ),
    ]);
}

#[test]
fn invalid_root_namespace_is_rejected() {
    for bad in ["", "Istio-System", "istio.system"] {
        let options = EnrollmentOptions {
            root_namespace: bad.to_owned(),
            ..opts()
        };
        assert!(
            matches!(
                ClusterState::build(&[], &options),
                Err(StateError::RootNamespace(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn root_namespace_is_configurable() {
    let options = EnrollmentOptions {
        root_namespace: "mesh-root".to_owned(),
        ..opts()
    };
    let objects = parse(&docs(&[
        pod("shop", "web", "n1", "10.0.0.1", "app: web"),
        peer_auth("mesh-root", "default", "", "", "STRICT", ""),
        peer_auth("istio-system", "default", "", "", "PERMISSIVE", ""),
    ]));
    let state = ClusterState::build(&objects, &options).expect("builds");
    assert_eq!(
        decide(&state, "shop/web", 80).1.as_deref(),
        Some("mesh-root/default"),
        "istio-system is an ordinary namespace here"
    );
    let scopes: Vec<PeerAuthScope> = state
        .peer_authentications()
        .iter()
        .map(|p| p.scope)
        .collect();
    assert_eq!(scopes, [PeerAuthScope::Namespace, PeerAuthScope::Mesh]);
}

#[test]
fn bad_peer_authentication_keeps_the_files_last_good_objects() {
    let dir = TempDir::new("peer-auth");
    let good = |mode: &str| {
        docs(&[
            pod("shop", "web", "n1", "10.0.0.1", "app: web"),
            peer_auth("shop", "default", "", "", mode, ""),
            service("shop", "web", "10.96.0.1", "80", "8080", "app: web"),
        ])
    };
    dir.write("shop.yaml", &good("STRICT"));
    dir.write(
        "mesh.yaml",
        &peer_auth("istio-system", "default", "", "", "PERMISSIVE", ""),
    );
    let mut config = ConfigDir::new(&dir.0, opts()).expect("options");
    let first = config.load().expect("loads");
    assert_eq!(names(&first), ["pod shop/web", "svc shop/web"]);
    assert_eq!(first.peer_authentications().len(), 2);
    assert_eq!(decide(&first, "shop/web", 8080).0, MtlsMode::Strict);

    // One bad PeerAuthentication among good objects: the file's last good version stays.
    let bad = good("STRICT").replace("mode: STRICT", "mode: STRICTLY")
        + "---\n"
        + &pod("shop", "new", "n1", "10.0.0.2", "app: web");
    dir.write("shop.yaml", &bad);
    let state = config.load().expect("loads");
    assert_eq!(names(&state), ["pod shop/web", "svc shop/web"]);
    assert_eq!(state.peer_authentications().len(), 2);
    assert_eq!(decide(&state, "shop/web", 8080).0, MtlsMode::Strict);
    let errors = error_messages(&state);
    assert_eq!(errors.len(), 1, "{errors:?}");
    for part in [
        "shop.yaml: document 2: PeerAuthentication shop/default: ",
        "spec.mtls.mode: unknown variant `STRICTLY`",
        "line",
    ] {
        assert!(errors[0].contains(part), "{errors:?} lacks {part:?}");
    }

    // Invalid timestamp: refused when parsed (Kubernetes' own type), named the same way.
    let invalid = good("PERMISSIVE").replace(
        "  namespace: shop\nspec:",
        "  namespace: shop\n  creationTimestamp: soon\nspec:",
    );
    dir.write("shop.yaml", &invalid);
    let state = config.load().expect("loads");
    assert_eq!(
        decide(&state, "shop/web", 8080).0,
        MtlsMode::Strict,
        "not applied"
    );
    let errors = error_messages(&state);
    assert!(
        errors[0].contains("shop.yaml: document 2: PeerAuthentication shop/default: ")
            && errors[0].contains("metadata.creationTimestamp: ")
            && errors[0].contains(" at line "),
        "{errors:?}"
    );

    // Fixed: applied.
    dir.write("shop.yaml", &good("PERMISSIVE"));
    let state = config.load().expect("loads");
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    let (mode, policy, _, _) = decide(&state, "shop/web", 8080);
    assert_eq!(
        (mode, policy.as_deref()),
        (MtlsMode::Permissive, Some("shop/default"))
    );
}

// ---------------------------------------------------------------------------------------------
// Hostnames and tunnels

#[test]
fn services_are_found_by_the_hostname_of_the_configured_cluster_domain() {
    let text = docs(&[
        namespace("shop", "istio.io/dataplane-mode: ambient"),
        pod("shop", "web-0", "n0", "10.0.0.2", "app: web"),
        service("shop", "web", "10.96.0.10", "80", "8080", "app: web"),
    ]);
    let state = build(&text);
    let web = state
        .service_by_hostname("web.shop.svc.cluster.local")
        .expect("default domain");
    assert_eq!(web.hostname, "web.shop.svc.cluster.local");
    assert!(
        state.service_by_hostname("web.shop").is_none(),
        "exact names only"
    );

    let mut options = opts();
    options.cluster_domain = "corp.example".to_owned();
    let state = ClusterState::build(&parse(&text), &options).expect("builds");
    assert!(state
        .service_by_hostname("web.shop.svc.cluster.local")
        .is_none());
    assert_eq!(
        state
            .service_by_hostname("web.shop.svc.corp.example")
            .expect("custom domain")
            .name,
        "web"
    );
    options.cluster_domain = "Corp..example".to_owned();
    assert_eq!(
        options.validate().expect_err("invalid domain").to_string(),
        "cluster domain \"Corp..example\" is not a valid DNS subdomain (RFC 1123)"
    );
}

#[test]
fn only_meshed_pods_of_other_nodes_are_tunnelled_to() {
    let text = docs(&[
        namespace("shop", "istio.io/dataplane-mode: ambient"),
        namespace("plain", ""),
        pod("shop", "local", "n0", "10.0.0.2", ""),
        pod("shop", "remote", "n1", "10.0.1.2", ""),
        pod("plain", "outside", "n1", "10.0.1.3", ""),
    ]);
    let state = build(&text);
    let tunnel = |ip_text: &str| {
        state
            .workload_by_ip(ip(ip_text))
            .expect("workload")
            .tunnel_identity("n0")
            .map(|id| id.as_str().to_owned())
    };
    assert_eq!(
        tunnel("10.0.0.2"),
        None,
        "this node's pods are reached directly"
    );
    assert_eq!(
        tunnel("10.0.1.2").as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/default")
    );
    assert_eq!(
        tunnel("10.0.1.3"),
        None,
        "pods outside the mesh get plain TCP"
    );
}

#[test]
fn a_bad_creation_timestamp_is_refused_when_parsed_naming_field_and_line() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: shop, creationTimestamp: soon}\nspec: {mtls: {mode: STRICT}}\n";
    let err = parse_documents("shop.yaml", text)
        .expect_err("not a timestamp")
        .to_string();
    let feb30 = text.replace("soon", "2024-02-30T00:00:00Z");
    let feb30 = parse_documents("shop.yaml", &feb30)
        .expect_err("no such day")
        .to_string();
    assert!(feb30.contains("metadata.creationTimestamp: "), "{feb30}");
    assert!(
        err.starts_with(
            "shop.yaml: document 1: PeerAuthentication shop/x: metadata.creationTimestamp: "
        ) && err.ends_with("at line 3 column 57"),
        "{err}"
    );
}

#[test]
fn workloads_are_found_by_name_with_or_without_an_address() {
    let no_address = "apiVersion: v1\nkind: Pod\nmetadata: {name: starting, namespace: b}\nspec: {nodeName: n0}\n".to_owned();
    let state = build(&docs(&[
        pod("a", "web-1", "n1", "10.0.0.1", "app: x"),
        pod("b", "api", "n1", "10.0.0.2", "app: y"),
        no_address,
    ]));
    let found = |ns: &str, name: &str| state.workload_by_name(ns, name).map(|w| w.ips.len());
    assert_eq!(found("a", "web-1"), Some(1));
    assert_eq!(
        found("b", "starting"),
        Some(0),
        "before its address reached the API"
    );
    assert_eq!(found("b", "web-1"), None);
    assert_eq!(found("a", "web"), None);
}

/// The README's policy examples, read as a user would apply them: each parses, and together
/// they build a state with no warning (a misspelt field in the docs would be refused here).
#[test]
fn the_readmes_policy_examples_are_read_as_written() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let blocks: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .filter(|block| block.starts_with("apiVersion:"))
        .collect();
    assert!(blocks.len() >= 4, "the README's examples: {}", blocks.len());
    let mut objects = Vec::new();
    for block in &blocks {
        objects.extend(parse_documents("README.md", block).unwrap_or_else(|e| panic!("{e}")));
    }
    let state = ClusterState::build(&objects, &opts()).expect("builds");
    assert!(state.warnings().is_empty(), "{:?}", state.warnings());
    assert_eq!(state.request_authentications(), 1);
    assert_eq!(state.envoy_filters(), 1);
    assert!(state.authorization_policies().len() >= 3);
}
