//! Privileged: the agent reading the cluster from a real Kubernetes API server
//! (`mesh_tests::kube::ControlPlane`), as a node agent does, with the least RBAC of
//! the chart's RBAC (`deploy/chart`) and a token bound to its own Pod, never the admin's credentials.
//!
//! Proven here: the first full list makes the agent's view (workloads with their identities,
//! services with their hostnames); a request outside its role gets 403; an
//! `AuthorizationPolicy` created through the API is in the agent's policy within a second, and
//! deleting it lifts it; with the API server stopped for 10 s the agent keeps its view, says so
//! in readiness and metrics, and applies the changes made once the server is back.
//!
//! Not yet here: capture of pods handed over by the CNI plugin (the testbed kubelet runs them),
//! so policies are checked in the agent's view, not yet with traffic.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams,
    },
    Api, Client,
};
use mesh_cni::handover::{Client as Handover, PodRef, Verdict};
use mesh_tests::{
    agent::AgentOptions,
    http::http,
    kube::{mesh, register_node, ControlPlane},
    probe,
    telemetry::{scrape, READINESS},
    Agent, Node, Testbed, TestbedSpec,
};
use serde_json::{json, Value};

const SHOP: &str = "shop";
/// A node no agent of this test serves: its pods are destinations only.
const OTHER_NODE: &str = "n9";
const WAIT: Duration = Duration::from_secs(30);

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("object from JSON")
}

/// A running, ready Pod `name` of service account `sa` on [`OTHER_NODE`] at `ip`, its status
/// written as kubelet writes it.
async fn running_pod(client: &Client, name: &str, sa: &str, ip: &str, labels: Value) {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), SHOP);
    if accounts
        .get_opt(sa)
        .await
        .expect("service account")
        .is_none()
    {
        let account: ServiceAccount =
            from_json(json!({"metadata": {"name": sa, "namespace": SHOP}}));
        accounts
            .create(&PostParams::default(), &account)
            .await
            .expect("service account");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), SHOP);
    let pod: Pod = from_json(json!({
        "metadata": {"name": name, "namespace": SHOP, "labels": labels},
        "spec": {"nodeName": OTHER_NODE, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "mesh-probe",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}
    }));
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");
}

fn policies_api(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    Api::namespaced_with(client.clone(), SHOP, &resource)
}

fn config_dump(node: &Node) -> Value {
    mesh::config_dump(node).expect("config dump")
}

/// Waits until `check` holds for the agent's `/config_dump`; returns how long it took.
fn wait_dump(node: &Node, what: &str, check: impl Fn(&Value) -> bool) -> Duration {
    let start = Instant::now();
    mesh::wait_dump(node, what, check).expect(what);
    start.elapsed()
}

fn has_policy(dump: &Value, name: &str) -> bool {
    mesh::dump_has_policy(dump, name)
}

fn workload<'a>(dump: &'a Value, name: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["namespace"] == SHOP && w["name"] == name)
}

/// Whether the agent's gauge `name` reads 1 (`Some(true)`), 0 (`Some(false)`), or is absent.
fn flag(node: &Node, name: &str) -> Option<bool> {
    scrape(node)
        .expect("metrics")
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.value > 0.5)
}

const REACHABLE: &str = "mesh_agent_kubernetes_api_reachable";

#[test]
fn the_agent_reads_the_cluster_from_the_api_server_with_least_privilege() {
    let mut cp = ControlPlane::start().expect("control plane");
    let tb = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 3,
    })
    .expect("testbed");
    let node = tb.node(0);
    let admin = cp.client();
    std::fs::create_dir_all(tb.scratch_dir()).expect("scratch directory");
    let kubeconfig = tb.scratch_dir().join("agent.kubeconfig");
    cp.block_on(async {
        register_node(&admin, &node.name, node.link_ipv4.into())
            .await
            .expect("node");
        register_node(&admin, OTHER_NODE, "198.19.9.1".parse().unwrap())
            .await
            .expect("node");
        let labels = json!({"istio.io/dataplane-mode": "ambient"});
        let shop: Namespace = from_json(json!({"metadata": {"name": SHOP, "labels": labels}}));
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &shop)
            .await
            .expect("shop");
        running_pod(&admin, "web-0", "web", "198.19.9.2", json!({"app": "web"})).await;
        let web: Service = from_json(json!({
            "metadata": {"name": "web", "namespace": SHOP},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}
        }));
        Api::<Service>::namespaced(admin.clone(), SHOP)
            .create(&PostParams::default(), &web)
            .await
            .expect("service");
    });
    cp.agent_kubeconfig(node, &kubeconfig)
        .expect("the agent's kubeconfig");

    least_privilege(&cp, &kubeconfig);
    without_the_gateway_crd(&cp);

    let mut options = AgentOptions::new(tb.scratch_dir().join("config"));
    options.kubeconfig = Some(kubeconfig.clone());
    // The directory holding node n0's `kubepods` tree, as the cgroup2 root holds a real
    // kubelet's.
    options.kubepods_cgroup = Some(tb.cgroup_dir().join("kubelet-n0"));
    let agent = Agent::start(node, &options).expect("agent on the API");
    // Ready without the kind (before, the API server's plain `404 page not found` was not
    // taken for "not served", and the agent waited for the kind's first list for ever).
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("does not serve this kind") && l.contains("Gateway")),
        "the agent says the Gateway kind is not served"
    );

    // The first full list is the view: a workload with its identity, a service with its
    // hostname and endpoint.
    let dump = config_dump(node);
    let web = workload(&dump, "web-0").unwrap_or_else(|| panic!("web-0 in {dump:#}"));
    assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/web");
    let services = dump["services"].to_string();
    assert!(
        services.contains("web.shop.svc.cluster.local") || services.contains("\"web\""),
        "{services}"
    );

    policy_through_the_api(&cp, node);
    let pod_cgroup = handover_then_policy_with_traffic(&cp, &tb, &options);
    let running_cgroup = labelling_captures_a_running_pod(&cp, &tb, &options);

    api_server_outage(&mut cp, node);
    drop(agent);
    for dir in running_cgroup.ancestors().take(2) {
        std::fs::remove_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    for dir in pod_cgroup.ancestors().take(4) {
        std::fs::remove_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    cp.teardown().expect("teardown");
}

/// The Gateway API's `Gateway` CRD deleted: a cluster without it (Istio's kinds do not need
/// the Gateway API), where the agent reads no waypoint `Gateway`.
fn without_the_gateway_crd(cp: &ControlPlane) {
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client());
    let name = "gateways.gateway.networking.k8s.io";
    cp.block_on(async {
        crds.delete(name, &DeleteParams::default())
            .await
            .expect("the Gateway CRD deleted");
        let deadline = Instant::now() + WAIT;
        while crds.get_opt(name).await.expect("CRDs").is_some() {
            assert!(Instant::now() < deadline, "the Gateway CRD never went");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

fn wait_readiness(node: &Node, check: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http(node, "GET", READINESS, "/healthz/ready").expect("readiness");
        if check(status, &body) {
            return (status, body);
        }
        assert!(Instant::now() < deadline, "readiness: {status} {body}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// The agent's credentials list pods, and are refused secrets and writes (403).
fn least_privilege(cp: &ControlPlane, kubeconfig: &Path) {
    let as_agent = cp.client_from(kubeconfig).expect("agent client");
    cp.block_on(async {
        Api::<Pod>::all(as_agent.clone())
            .list(&ListParams::default())
            .await
            .expect("pods");
        match Api::<Secret>::all(as_agent.clone())
            .list(&ListParams::default())
            .await
        {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("secrets must be forbidden to the agent: {other:?}"),
        }
        match Api::<Pod>::namespaced(as_agent.clone(), SHOP)
            .delete("web-0", &DeleteParams::default())
            .await
        {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
            other => panic!("the agent must not delete pods: {other:?}"),
        }
    });
}

/// A policy created through the API is in force within a second; deleting it lifts it.
fn policy_through_the_api(cp: &ControlPlane, node: &Node) {
    let admin = cp.client();
    let policies = policies_api(&admin);
    let deny: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": SHOP},
        "spec": {"action": "DENY", "rules": [{}]}
    }));
    cp.block_on(policies.create(&PostParams::default(), &deny))
        .expect("policy");
    let applied = wait_dump(node, "the DENY policy in the agent's view", |d| {
        has_policy(d, "deny-all")
    });
    println!(
        "policy created → in the agent's view: {} ms",
        applied.as_millis()
    );
    assert!(applied < Duration::from_secs(1), "took {applied:?}");
    cp.block_on(policies.delete("deny-all", &DeleteParams::default()))
        .expect("delete");
    let lifted = wait_dump(node, "the DENY policy lifted", |d| {
        !has_policy(d, "deny-all")
    });
    println!("policy deleted → lifted: {} ms", lifted.as_millis());
    assert!(lifted < Duration::from_secs(1), "took {lifted:?}");
}

/// The API server stops for 10 s: the view stays, readiness and metrics say so; once it is
/// back, the note goes and changes are applied.
fn api_server_outage(cp: &mut ControlPlane, node: &Node) {
    let admin = cp.client();
    assert_eq!(flag(node, REACHABLE), Some(true));
    cp.stop_apiserver().expect("stop the API server");
    let stopped = Instant::now();
    let (status, body) = wait_readiness(node, |_, body| {
        body.contains("degraded: Kubernetes API unreachable since")
    });
    assert_eq!(status, 200, "still ready, serving its last view: {body}");
    assert_eq!(flag(node, REACHABLE), Some(false));
    assert!(
        workload(&config_dump(node), "web-0").is_some(),
        "the last view stays"
    );
    thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    assert!(
        workload(&config_dump(node), "web-0").is_some(),
        "the last view stays"
    );
    cp.start_apiserver().expect("start the API server");
    cp.wait_ready(Duration::from_secs(60))
        .expect("API server back");

    // Back: the note goes, and a change made now is applied.
    cp.block_on(running_pod(
        &admin,
        "web-1",
        "web",
        "198.19.9.3",
        json!({"app": "web"}),
    ));
    let back = wait_dump(node, "web-1 after the API server came back", |d| {
        workload(d, "web-1").is_some()
    });
    println!(
        "API server ready again → a change made then in the agent's view: {} ms",
        back.as_millis()
    );
    wait_readiness(node, |status, body| {
        status == 200 && !body.contains("degraded")
    });
    assert_eq!(flag(node, REACHABLE), Some(true));
}

/// A pod of this node in an enrolled namespace is reported uncaptured until the container
/// runtime hands it over (`mesh-cni`'s protocol: its network namespace as a descriptor); then
/// it is captured before the answer, and a DENY created through the API refuses a client's
/// connection to it, until deleted. Returns the pod's cgroup (to remove once the agent is gone).
fn handover_then_policy_with_traffic(
    cp: &ControlPlane,
    tb: &Testbed,
    options: &AgentOptions,
) -> PathBuf {
    let node = tb.node(0);
    let (server_pod, client_pod) = (tb.pod(0, 0), tb.pod(0, 1));
    let admin = cp.client();
    let uid = cp.block_on(pod_of_node(
        &admin,
        (SHOP, "api-0", "api"),
        node,
        server_pod,
    ));
    // Known, enrolled, on this node, not handed over: reported, holding readiness.
    let (status, body) = wait_readiness(node, |status, _| status == 503);
    assert!(body.contains("pod shop/api-0"), "{status} {body}");
    wait_dump(node, "api-0 reported uncaptured", |d| {
        workload(d, "api-0").is_some_and(|w| {
            w["not_captured_because"]
                .as_str()
                .is_some_and(|r| r.contains("no hand-over from the CNI plugin"))
        })
    });

    wait_event(cp, "api-0", "MeshCaptureFailed");

    // The runtime's hand-over: the pod's cgroup in the kubelet's layout, its namespace as a
    // descriptor.
    let pod_cgroup = options
        .kubepods_cgroup
        .clone()
        .expect("kubepods root")
        .join("kubepods")
        .join("besteffort")
        .join(format!("pod{uid}"));
    std::fs::create_dir_all(&pod_cgroup).expect("pod cgroup");
    let netns = std::fs::File::open(format!("/run/netns/{}", server_pod.netns)).expect("netns");
    let client = Handover::connect(&options.cni_socket(&node.name), Duration::from_secs(10))
        .expect("the agent's hand-over socket");
    let pod_ref = PodRef {
        namespace: SHOP.into(),
        name: "api-0".into(),
        uid: Some(uid),
        container_id: "sandbox-api-0".into(),
        ifname: "eth0".into(),
        ips: vec![server_pod.ipv4.into()],
        netns_path: None,
    };
    let start = Instant::now();
    let verdict = client.add(&pod_ref, netns.as_fd()).expect("CNI ADD");
    println!("CNI ADD → captured: {} ms", start.elapsed().as_millis());
    assert_eq!(verdict, Verdict::Captured);
    wait_readiness(node, |status, _| status == 200);
    wait_event(cp, "api-0", "MeshCaptured");
    // A pod of a namespace outside the mesh passes at once.
    let outside = PodRef {
        namespace: "mesh-system".into(),
        name: format!("mesh-agent-{}", node.name),
        uid: None,
        ..pod_ref.clone()
    };
    assert_eq!(
        client.add(&outside, netns.as_fd()).expect("ADD"),
        Verdict::NotMeshed
    );

    // Enforced with traffic: a DENY through the API refuses the client, deleting it lifts it.
    let _server =
        probe::serve(server_pod, SocketAddr::new(server_pod.ipv4.into(), 8080)).expect("server");
    let target = SocketAddr::new(server_pod.ipv4.into(), 8080);
    assert!(
        probe::connect(client_pod, target, "before").is_ok(),
        "allowed at first"
    );
    let policies = policies_api(&admin);
    let deny: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-api", "namespace": SHOP},
        "spec": {"selector": {"matchLabels": {"app": "api"}}, "action": "DENY", "rules": [{}]}
    }));
    cp.block_on(policies.create(&PostParams::default(), &deny))
        .expect("policy");
    wait_dump(node, "deny-api in force", |d| has_policy(d, "deny-api"));
    assert!(
        probe::connect(client_pod, target, "denied").is_err(),
        "refused by the DENY"
    );
    cp.block_on(policies.delete("deny-api", &DeleteParams::default()))
        .expect("delete");
    wait_dump(node, "deny-api lifted", |d| !has_policy(d, "deny-api"));
    assert!(
        probe::connect(client_pod, target, "after").is_ok(),
        "allowed again"
    );
    pod_cgroup
}

/// A pod that runs before its namespace joins the mesh never passes through the CNI plugin
/// again: labelling the namespace captures it (found from `/proc`: the oldest process of its
/// cgroup), with no restart; unlabelling releases it. Returns its cgroup.
fn labelling_captures_a_running_pod(
    cp: &ControlPlane,
    tb: &Testbed,
    options: &AgentOptions,
) -> PathBuf {
    let node = tb.node(0);
    let (server_pod, client_pod) = (tb.pod(0, 2), tb.pod(0, 1));
    let admin = cp.client();
    let target = SocketAddr::new(server_pod.ipv4.into(), 8080);
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let uid = cp.block_on(async {
        let later: Namespace = from_json(json!({"metadata": {"name": "later"}}));
        namespaces
            .create(&PostParams::default(), &later)
            .await
            .expect("namespace");
        pod_of_node(&admin, ("later", "run-0", "run"), node, server_pod).await
    });
    // Its container runs in its cgroup (the kubelet's burstable layout) and namespace.
    let cgroup = options
        .kubepods_cgroup
        .clone()
        .expect("kubepods root")
        .join("kubepods/burstable")
        .join(format!("pod{uid}"));
    std::fs::create_dir_all(&cgroup).expect("pod cgroup");
    let server = probe::serve(server_pod, target).expect("server");
    std::fs::write(cgroup.join("cgroup.procs"), server.pid().to_string()).expect("into its cgroup");
    let captured = |d: &Value| {
        d["workloads"].as_array().is_some_and(|ws| {
            ws.iter()
                .any(|w| w["name"] == "run-0" && w["captured_by_this_agent"] == true)
        })
    };
    assert!(!captured(&config_dump(node)), "not enrolled yet");

    // A DENY in the namespace is in force only once the pod is captured.
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    let policies: Api<DynamicObject> = Api::namespaced_with(admin.clone(), "later", &resource);
    let deny: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-run", "namespace": "later"},
        "spec": {"action": "DENY", "rules": [{}]}
    }));
    cp.block_on(policies.create(&PostParams::default(), &deny))
        .expect("policy");
    wait_dump(node, "deny-run in the view", |d| has_policy(d, "deny-run"));
    assert!(
        probe::connect(client_pod, target, "outside").is_ok(),
        "not in the mesh: direct"
    );

    let label = |value: Value| {
        let patch = json!({"metadata": {"labels": {"istio.io/dataplane-mode": value}}});
        cp.block_on(namespaces.patch("later", &PatchParams::default(), &Patch::Merge(&patch)))
            .expect("label");
    };
    label(json!("ambient"));
    let took = wait_dump(node, "run-0 captured after labelling", captured);
    println!(
        "namespace labelled → running pod captured: {} ms",
        took.as_millis()
    );
    assert!(
        probe::connect(client_pod, target, "denied").is_err(),
        "captured: the DENY applies"
    );
    label(Value::Null);
    wait_dump(node, "run-0 released after unlabelling", |d| !captured(d));
    assert!(
        probe::connect(client_pod, target, "released").is_ok(),
        "released: direct again"
    );
    drop(server);
    cgroup
}

/// Waits for an Event with `reason` about Pod `shop/<pod>` (the agent's capture state, as
/// `kubectl describe pod` shows it).
fn wait_event(cp: &ControlPlane, pod: &str, reason: &str) {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(cp.client(), SHOP);
    let found = cp.block_on(mesh_tests::kube::eventually(
        &format!("event {reason} on {pod}"),
        WAIT,
        || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .into_iter()
                    .find(|e| {
                        e.reason.as_deref() == Some(reason)
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                    })
                    .map(|e| e.note.unwrap_or_default())
            }
        },
    ));
    let note = found.expect("capture event");
    println!("event {reason} on {pod}: {note}");
}

/// Pod `namespace/name` (label `app`) of testbed node `node`, running as testbed pod `at` (its
/// address): the object and its status, as kubelet would write them. Returns its UID.
async fn pod_of_node(
    admin: &Client,
    (namespace, name, app): (&str, &str, &str),
    node: &Node,
    at: &mesh_tests::Pod,
) -> String {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let pod: Pod = from_json(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "mesh-probe"}]}
    }));
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let ip = at.ipv4.to_string();
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                   "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status");
    created.metadata.uid.expect("uid")
}
