//! Privileged, end to end on the real control plane: the L7 waypoint as users deploy it. The
//! chart is installed (agents, CA, waypoint controller, all run by the testbed kubelets from the
//! image `mesh-agent`); the test creates only what a user writes: two echo `Deployments`, their
//! `Services` (`web` labelled `istio.io/use-waypoint`), a `Gateway` of class `istio-waypoint`
//! and an `HTTPRoute`, through the API.
//!
//! Proven here: the controller turns the `Gateway` into a `ServiceAccount`, `Deployment` and
//! `Service` owned by it and copies the CA's root; the kubelet runs the waypoint pod under its
//! own account, bound to no role, it gets its certificate from the CA with its own token and
//! reads its routes through the controller's view (that account's token reads nothing of the
//! API server: the attack of a pod run under it is replayed); the `Gateway`'s status gets the `Service`'s address and
//! `Programmed`; a client pod's requests (real curl) are routed by the `HTTPRoute` (header A/B
//! to `web-v2`, the rest to `web-v1`) through its node agent, the waypoint and the endpoints'
//! agents; the route changed through the API applies; an `AuthorizationPolicy` targeting the
//! Service is enforced by the waypoint with its HTTP fields, and lifted when deleted; deleting the `Gateway` removes what the
//! controller made (the garbage collector does),
//! and the Service's traffic then fails closed (its waypoint is gone). The echo pods' HTTP
//! readiness probes (the kubelet's, from the node) pass although the pods are behind the
//! waypoint: the node's own connections are no bypass.
//!
//! The other tests here: a waypoint per service account from one namespace label; a canary
//! over 1,000 requests, a timeout, a `VirtualService` abort and `DestinationRule` subsets; and
//! retries and an injected delay (`VirtualService`), mirroring, WebSocket, h2 multiplexing
//! (h2load), gRPC unary and streaming calls (a tonic client; UNAVAILABLE as a gRPC status
//! while no endpoint is ready), bypass refused, and the waypoint's pod replaced under load.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
        rbac::v1::ClusterRoleBinding,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
        PostParams,
    },
    Api,
};
use mesh_tests::kube::{
    eventually,
    mesh::{from_json, KubeMesh, WAIT},
    Credentials,
};
use serde_json::{json, Value};

const NS: &str = "shop";
/// One control plane at a time: two would compete for the machine's two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

fn gvk(group: &str, kind: &str, plural: &str) -> ApiResource {
    gvk_at(group, "v1", kind, plural)
}

/// A kind served at another version than `v1` (Istio's `EnvoyFilter`: `v1alpha3`).
fn gvk_at(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn gateways(mesh: &KubeMesh) -> Api<DynamicObject> {
    let resource = gvk("gateway.networking.k8s.io", "Gateway", "gateways");
    Api::namespaced_with(mesh.cp.client(), NS, &resource)
}

fn routes(mesh: &KubeMesh) -> Api<DynamicObject> {
    let resource = gvk("gateway.networking.k8s.io", "HTTPRoute", "httproutes");
    Api::namespaced_with(mesh.cp.client(), NS, &resource)
}

fn create<K>(mesh: &KubeMesh, api: &Api<K>, object: &K, what: &str)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    mesh.cp
        .block_on(api.create(&PostParams::default(), object))
        .unwrap_or_else(|e| panic!("creating {what}: {e}"));
}

/// An echo `Deployment` `echo-<version>` (`mesh-probe http-echo`, answering with its name)
/// under service account `account`.
fn echo_as(version: &str, account: &str) -> Deployment {
    from_json(json!({
        "metadata": {"name": format!("echo-{version}"), "namespace": NS},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web", "version": version}},
          "template": {
            "metadata": {"labels": {"app": "web", "version": version}},
            "spec": {"serviceAccountName": account, "containers": [{
                "name": "echo", "image": "mesh-probe",
                "args": ["http-echo", "$(POD_IP):8080", "--name", version],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                // An HTTP probe, from the kubelet on the node: the pod is behind a waypoint,
                // and the node's own connections are no bypass.
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                   "periodSeconds": 1},
            }]},
          }},
    }))
}

fn service(name: &str, selector: &Value, labels: &Value) -> Service {
    from_json(json!({
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {"selector": selector,
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
}

/// The route of `web`: `x-version: v2` to `web-v2`, the rest to `default`.
fn route(default: &str) -> DynamicObject {
    from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                 "filters": [{"type": "CORS", "cors": {"allowOrigins": ["https://*.example"]}}],
                 "backendRefs": [{"name": "web-v2", "port": 80}]},
                {"backendRefs": [{"name": default, "port": 80}]},
            ],
        },
    }))
}

/// The cluster IP of Service `name`.
fn vip(mesh: &KubeMesh, name: &str) -> String {
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    mesh.cp
        .block_on(services.get(name))
        .unwrap_or_else(|e| panic!("Service {name}: {e}"))
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap_or_else(|| panic!("Service {name} has no cluster IP"))
}

/// A client pod on `node` running `script` with `sh -c` (curl is on its path).
fn client(mesh: &KubeMesh, name: &str, node: &str, script: &str) {
    let pod: Pod = from_json(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"restartPolicy": "Never", "nodeSelector": {"kubernetes.io/hostname": node},
                 "containers": [{"name": "client", "image": "shell", "args": ["-c", script]}]},
    }));
    create(mesh, &mesh.pods(), &pod, &format!("pod {name}"));
}

/// The `backend` of each echo line the client printed.
fn backends(mesh: &KubeMesh, node: usize, pod: &str) -> Vec<String> {
    assert_eq!(
        mesh.finished(pod).expect("client ends"),
        "Succeeded",
        "{:?}",
        mesh.kubelets[node].logs(NS, pod, "client")
    );
    mesh.kubelets[node]
        .logs(NS, pod, "client")
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["backend"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn condition(gateway: &Value, kind: &str) -> Option<String> {
    gateway["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

/// The condition the controller writes on Services and `ServiceEntries` that ask for a waypoint.
const BOUND: &str = "istio.io/WaypointBound";

/// Waits until `name` (through `api`) has the controller's condition `kind` (`BOUND`,
/// `WaypointAccepted`, `ZtunnelAccepted`; on a Service, `ServiceEntry`, `AuthorizationPolicy`,
/// `RequestAuthentication` or `EnvoyFilter`) with `status` and a message starting with `message`,
/// or (`status` none) has none.
fn condition_is(
    mesh: &KubeMesh,
    api: &Api<DynamicObject>,
    (name, kind): (&str, &str),
    status: Option<&str>,
    message: &str,
) {
    let what = format!("{name}'s {kind} {status:?} {message:?}");
    mesh.cp
        .block_on(eventually(&what, WAIT, || async {
            let object = api.get(name).await.ok()?;
            let found = object.data["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == kind))
                .cloned();
            let matches = match (&found, status) {
                (None, None) => true,
                (Some(c), Some(status)) => {
                    c["status"] == status
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with(message))
                        && c["lastTransitionTime"].is_string()
                }
                _ => false,
            };
            matches.then_some(())
        }))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// `Services` of the namespace, as dynamic objects (their status read as it is written).
fn services_dyn(mesh: &KubeMesh) -> Api<DynamicObject> {
    Api::namespaced_with(mesh.cp.client(), NS, &ApiResource::erase::<Service>(&()))
}

/// Someone else (another field manager, forcing) rewrites the condition `kind` of `name`
/// (through `api`, of `api_version` and `object_kind`) to `False`: the controller's next read
/// of the conditions puts it right (`True`, its message starting with `message`), although
/// nothing in the cluster view changed. (The other manager keeps a share of the condition, so
/// the controller could not remove it later: the object is one the test deletes.)
fn tampered_condition_put_right(
    mesh: &KubeMesh,
    api: &Api<DynamicObject>,
    (api_version, object_kind): (&str, &str),
    (name, kind): (&str, &str),
    message: &str,
) {
    let tampered = json!({
        "apiVersion": api_version, "kind": object_kind,
        "status": {"conditions": [{
            "type": kind, "status": "False", "reason": "Tampered",
            "message": "not so, says someone else",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    let written = mesh
        .cp
        .block_on(api.patch_status(
            name,
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(&tampered),
        ))
        .expect("the condition rewritten");
    assert_eq!(
        condition(&written.data, kind).as_deref(),
        Some("False"),
        "the rewrite took: {:?}",
        written.data["status"]
    );
    condition_is(mesh, api, (name, kind), Some("True"), message);
}

/// The controller's entry in `status.parents` of route `name` (through `api`) for the Service
/// parent `parent`, once it holds `accepted` and `resolved` (status, reason; `None`: no such
/// condition) with `observedGeneration` the route's generation; returns the route's parents.
fn route_entry_is(
    mesh: &KubeMesh,
    api: &Api<DynamicObject>,
    (name, parent): (&str, &Value),
    accepted: (&str, &str),
    resolved: Option<(&str, &str)>,
) -> Vec<Value> {
    let what = format!("{name}'s entry for {parent}: {accepted:?} {resolved:?}");
    mesh.cp
        .block_on(eventually(&what, WAIT, || async {
            let route = api.get(name).await.ok()?;
            let generation = route.metadata.generation?;
            let parents = route.data["status"]["parents"].as_array()?.clone();
            let ours = parents.iter().find(|p| {
                p["controllerName"] == "mesh.local/waypoint" && &p["parentRef"] == parent
            })?;
            let condition = |kind: &str| {
                let conditions = ours["conditions"].as_array()?;
                let c = conditions.iter().find(|c| c["type"] == kind)?;
                let fresh =
                    c["observedGeneration"] == generation && c["lastTransitionTime"].is_string();
                fresh.then(|| (c["status"].as_str(), c["reason"].as_str()))
            };
            let holds = condition("Accepted")? == (Some(accepted.0), Some(accepted.1))
                && condition("ResolvedRefs") == resolved.map(|(s, r)| (Some(s), Some(r)));
            holds.then_some(parents)
        }))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `web`'s route is told, for its Service parent, that web's waypoint applies it and that its
/// backends resolve; another controller's entry (a `Gateway` parent) is left as it is when the
/// controller writes its own; a route on `web-v1` (no waypoint) with a missing backend is told
/// both.
fn route_status(mesh: &KubeMesh) {
    let api = routes(mesh);
    let web = json!({"group": "", "kind": "Service", "name": "web", "port": 80});
    let parents = route_entry_is(
        mesh,
        &api,
        ("web", &web),
        ("True", "Accepted"),
        Some(("True", "ResolvedRefs")),
    );
    // Another controller's entry, beside the mesh's.
    let mut with_foreign = parents;
    with_foreign.push(json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"},
        "controllerName": "example.com/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "someone else's", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }));
    mesh.cp
        .block_on(api.patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"parents": with_foreign}})),
        ))
        .expect("another controller's entry added");
    let lonely: DynamicObject = from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "lonely", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web-v1"}],
            "rules": [{"backendRefs": [{"name": "missing", "port": 80}]}],
        },
    }));
    create(mesh, &api, &lonely, "the HTTPRoute on web-v1");
    route_entry_is(
        mesh,
        &api,
        (
            "lonely",
            &json!({"group": "", "kind": "Service", "name": "web-v1"}),
        ),
        ("False", "NoWaypoint"),
        Some(("False", "BackendNotFound")),
    );
    mesh.cp
        .block_on(api.delete("lonely", &DeleteParams::default()))
        .expect("deleted");
}

/// After `route_change` (a new generation of `web`'s route) the controller's entry says the new
/// generation, and the other controller's entry is still there.
fn route_status_follows_its_generation(mesh: &KubeMesh) {
    let web = json!({"group": "", "kind": "Service", "name": "web", "port": 80});
    let parents = route_entry_is(
        mesh,
        &routes(mesh),
        ("web", &web),
        ("True", "Accepted"),
        Some(("True", "ResolvedRefs")),
    );
    let controllers: Vec<&str> = parents
        .iter()
        .filter_map(|p| p["controllerName"].as_str())
        .collect();
    assert_eq!(
        controllers,
        ["example.com/gateway-controller", "mesh.local/waypoint"],
        "{parents:?}"
    );
}

/// A change of `web`'s route that does not read (a regular expression that does not compile,
/// which the CRD's schema lets through) is told so at its generation, `Accepted` `False` with
/// `UnsupportedValue` naming the field, while the version before (`route_change`'s, default to
/// v2) stays in force; put right, it is accepted again.
fn invalid_route_keeps_its_last_good(mesh: &KubeMesh, vip: &str) {
    let api = routes(mesh);
    let before = mesh
        .cp
        .block_on(api.get("web"))
        .expect("web's route")
        .metadata
        .generation
        .expect("a generation");
    let mut invalid = serde_json::to_value(route("web-v1")).expect("JSON");
    invalid["spec"]["rules"][1]["matches"] =
        json!([{"path": {"type": "RegularExpression", "value": "/(unclosed"}}]);
    patch_route(mesh, &from_json(invalid));
    let web = json!({"group": "", "kind": "Service", "name": "web", "port": 80});
    let parents = route_entry_is(
        mesh,
        &api,
        ("web", &web),
        ("False", "UnsupportedValue"),
        None,
    );
    let message = parents
        .iter()
        .find(|p| p["controllerName"] == "mesh.local/waypoint")
        .and_then(|p| p["conditions"][0]["message"].as_str())
        .expect("a message")
        .to_owned();
    assert_eq!(
        message,
        format!(
            "not applied: spec.rules[1].matches[0]: \"/(unclosed\" is not a regular expression: \
             unclosed group; the route's generation {before} stays in force"
        )
    );
    // The waypoint still routes by the version before: the default is v2, not v1.
    let once = format!("for i in 1 2 3; do curl -sS --max-time 10 http://{vip}/c -w '\\n'; done");
    until_seen(mesh, 1, "kept", &once, |seen| seen == ["v2", "v2", "v2"]);
    patch_route(mesh, &route("web-v2"));
    route_entry_is(
        mesh,
        &api,
        ("web", &web),
        ("True", "Accepted"),
        Some(("True", "ResolvedRefs")),
    );
}

/// The waypoint `Gateway` labelled with an `istio.io/waypoint-for` the mesh does not know is
/// told `Accepted` `False` (`Invalid`) naming the label, and the version before stays in
/// force: `web`'s requests still go through the waypoint, by its route (default v2). The label
/// removed, the `Gateway` is accepted again.
fn invalid_gateway_label(mesh: &KubeMesh, vip: &str) {
    let label = |value: Value| {
        mesh.cp
            .block_on(gateways(mesh).patch(
                "wp",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"istio.io/waypoint-for": value}}})),
            ))
            .expect("Gateway labelled");
    };
    label(json!("everything"));
    condition_is(
        mesh,
        &gateways(mesh),
        ("wp", "Accepted"),
        Some("False"),
        "Gateway shop/wp: metadata.labels[istio.io/waypoint-for]: \"everything\" is not \
         service, workload, all or none: the mesh does not take this version",
    );
    let once = format!("for i in 1 2 3; do curl -sS --max-time 10 http://{vip}/c -w '\\n'; done");
    until_seen(mesh, 1, "kept-wp", &once, |seen| seen == ["v2", "v2", "v2"]);
    label(Value::Null);
    condition_is(
        mesh,
        &gateways(mesh),
        ("wp", "Accepted"),
        Some("True"),
        "waypoint resources applied",
    );
}

/// The waypoint's `ConfigMap` of settings: its container requests `cpu`; `extra`: more keys.
fn waypoint_options(cpu: &str, extra: &[(&str, &str)]) -> ConfigMap {
    let mut data = json!({
        "deployment": format!(
            "spec:\n  template:\n    metadata:\n      annotations: {{example.com/tuned: \"yes\"}}\n    \
             spec:\n      containers:\n      - name: istio-proxy\n        resources: \
             {{requests: {{cpu: {cpu}}}}}\n"
        ),
        "service": "metadata:\n  annotations: {example.com/svc: tuned}\n",
    });
    for (key, value) in extra {
        data[*key] = json!(value);
    }
    from_json(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "wp-options", "namespace": NS}, "data": data,
    }))
}

/// Waits until the waypoint's `Deployment` and `Service` carry `waypoint_options`' patches, its
/// one container requesting `cpu`.
fn wait_patched(mesh: &KubeMesh, cpu: &'static str) {
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    let (deployments, services) = (&deployments, &services);
    mesh.cp
        .block_on(eventually(
            &format!("the waypoint patched, {cpu}"),
            WAIT,
            || async move {
                let d = deployments.get("wp").await.ok()?;
                let pod = d.spec.template;
                let containers = pod.spec?.containers;
                let requests = containers.first()?.resources.clone()?.requests?;
                let tuned = pod.metadata?.annotations?.get("example.com/tuned").cloned();
                let svc = services.get("wp").await.ok()?.metadata.annotations?;
                let done = containers.len() == 1
                    && containers[0].name == "waypoint"
                    && requests.get("cpu").map(|q| q.0.as_str()) == Some(cpu)
                    && tuned.as_deref() == Some("yes")
                    && svc.get("example.com/svc").map(String::as_str) == Some("tuned");
                done.then_some(())
            },
        ))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Replaces the waypoint's `ConfigMap` of settings with `options`.
fn replace_options(mesh: &KubeMesh, options: &ConfigMap) {
    let config_maps: Api<ConfigMap> = Api::namespaced(mesh.cp.client(), NS);
    mesh.cp
        .block_on(config_maps.replace("wp-options", &PostParams::default(), options))
        .expect("ConfigMap replaced");
}

/// What the waypoint's `ConfigMap` may not do is told on the `Gateway` (`InvalidParameters`),
/// and its objects stay as `gateway_parameters` left them (200m, the autoscaler, the budget):
/// a key the mesh does not apply, and a patch of what makes the waypoint the waypoint.
fn parameters_refused(mesh: &KubeMesh, scaling: &[(&str, &str); 2]) {
    let unknown = [
        scaling[0],
        scaling[1],
        ("proxyConfig", "drainDuration: 30s\n"),
    ];
    replace_options(mesh, &waypoint_options("300m", &unknown));
    condition_is(
        mesh,
        &gateways(mesh),
        ("wp", "Accepted"),
        Some("False"),
        "ConfigMap shop/wp-options: data.proxyConfig: not a key this mesh applies (deployment, \
         service, serviceAccount, horizontalPodAutoscaler, podDisruptionBudget); its waypoint's \
         objects are left as they are",
    );
    wait_patched(mesh, "200m");
    optional_objects(mesh, true);
    // The attack: whoever may write the ConfigMap runs a program of theirs as the waypoint (its
    // identity is what destinations trust as the waypoint's). Refused, nothing changed.
    let mut hijack = waypoint_options("300m", &[]);
    hijack.data.get_or_insert_with(Default::default).insert(
        "deployment".into(),
        "spec:\n  template:\n    spec:\n      containers:\n      - name: istio-proxy\n        \
         image: example.com/not-the-waypoint\n"
            .into(),
    );
    replace_options(mesh, &hijack);
    condition_is(
        mesh,
        &gateways(mesh),
        ("wp", "Accepted"),
        Some("False"),
        "ConfigMap shop/wp-options: data.deployment: \
         spec.template.spec.containers[waypoint].image is the controller's",
    );
    wait_patched(mesh, "200m");
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let deployment = mesh
        .cp
        .block_on(deployments.get("wp"))
        .expect("Deployment wp");
    let pod = deployment.spec.template.spec;
    let image = pod.and_then(|p| p.containers.first()?.image.clone());
    assert_ne!(image.as_deref(), Some("example.com/not-the-waypoint"));
}

/// The waypoint `Gateway`'s own settings, as Istio's users write them: a `ConfigMap` named by
/// `spec.infrastructure.parametersRef` patches its `Deployment` (the container by Istio's name,
/// `istio-proxy`; a pod annotation) and its `Service`; a change of the `ConfigMap` applies at
/// once (it is watched); a key the mesh does not apply is told on the `Gateway`
/// (`InvalidParameters`); without the reference, the patches are gone again (server-side apply).
fn gateway_parameters(mesh: &KubeMesh, vip: &str) {
    let config_maps: Api<ConfigMap> = Api::namespaced(mesh.cp.client(), NS);
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    create(
        mesh,
        &config_maps,
        &waypoint_options("150m", &[]),
        "the waypoint's ConfigMap",
    );
    let old = pod_names(
        &mesh
            .cp
            .block_on(
                mesh.pods()
                    .list(&ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"))),
            )
            .expect("the waypoint pod")
            .items,
    );
    let reference = |r: Value| {
        let patch = json!({"spec": {"infrastructure": {"parametersRef": r}}});
        mesh.cp
            .block_on(gateways(mesh).patch("wp", &PatchParams::default(), &Patch::Merge(&patch)))
            .expect("Gateway patched");
    };
    reference(json!({"group": "", "kind": "ConfigMap", "name": "wp-options"}));
    let patched = |cpu| wait_patched(mesh, cpu);
    patched("150m");
    // The template changed: a new pod, which serves.
    waypoint_pods_ready(mesh, 1, &old);
    let once = format!("curl -sS --max-time 10 http://{vip}/tuned -w '\\n'");
    until_seen(mesh, 1, "tuned", &once, |seen| seen == ["v2"]);
    // The ConfigMap changed (an autoscaler and a disruption budget asked for too): applied
    // without touching the Gateway.
    let scaling = [
        (
            "horizontalPodAutoscaler",
            "spec: {minReplicas: 1, maxReplicas: 3}\n",
        ),
        ("podDisruptionBudget", "spec: {minAvailable: 1}\n"),
    ];
    replace_options(mesh, &waypoint_options("200m", &scaling));
    patched("200m");
    optional_objects(mesh, true);
    parameters_refused(mesh, &scaling);
    reference(Value::Null);
    condition_is(
        mesh,
        &gateways(mesh),
        ("wp", "Accepted"),
        Some("True"),
        "waypoint",
    );
    mesh.cp
        .block_on(eventually("the patches gone", WAIT, || async {
            let d = deployments.get("wp").await.ok()?;
            let annotations = d.spec.template.metadata?.annotations.unwrap_or_default();
            (!annotations.contains_key("example.com/tuned")).then_some(())
        }))
        .unwrap_or_else(|e| panic!("{e}"));
    optional_objects(mesh, false);
    waypoint_pods_ready(mesh, 1, &[]);
    mesh.cp
        .block_on(config_maps.delete("wp-options", &DeleteParams::default()))
        .expect("ConfigMap deleted");
}

/// Waits until the waypoint's `HorizontalPodAutoscaler` (1 to 3 replicas) and
/// `PodDisruptionBudget` (`minAvailable` 1), owned by its `Gateway`, are there, or (`present`
/// false) gone.
fn optional_objects(mesh: &KubeMesh, present: bool) {
    let autoscalers: Api<HorizontalPodAutoscaler> = Api::namespaced(mesh.cp.client(), NS);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(mesh.cp.client(), NS);
    let (autoscalers, budgets) = (&autoscalers, &budgets);
    let what = format!("the waypoint's autoscaler and budget, present: {present}");
    mesh.cp
        .block_on(eventually(&what, WAIT, || async move {
            let hpa = autoscalers.get_opt("wp").await.ok()?;
            let pdb = budgets.get_opt("wp").await.ok()?;
            if !present {
                return (hpa.is_none() && pdb.is_none()).then_some(());
            }
            let (hpa, pdb) = (hpa?, pdb?);
            let owned = |owners: &Option<Vec<_>>| {
                owners.iter().flatten().any(
                    |o: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference| {
                        o.kind == "Gateway" && o.name == "wp"
                    },
                )
            };
            let spec = hpa.spec;
            let target = &spec.scale_target_ref;
            let done = owned(&hpa.metadata.owner_references)
                && owned(&pdb.metadata.owner_references)
                && (target.kind.as_str(), target.name.as_str()) == ("Deployment", "wp")
                && (spec.min_replicas, spec.max_replicas) == (Some(1), 3)
                && pdb.spec?.min_available
                    == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1));
            done.then_some(())
        }))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// What a user writes: the echo `Deployments` and `Services`, the waypoint `Gateway`, the
/// `HTTPRoute`. Returns `web`'s VIP.
fn deploy(mesh: &KubeMesh) -> String {
    let vip = deploy_echoes(mesh, "default", &json!({"istio.io/use-waypoint": "wp"}));
    let gateway: DynamicObject = from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": NS, "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
                 "infrastructure": {"labels": {"team": "shop"},
                                    "annotations": {"example.com/owner": "shop-team"}}},
    }));
    create(mesh, &gateways(mesh), &gateway, "the waypoint Gateway");
    vip
}

/// The echo `Deployments` (under service account `account`), `web-v1`, `web-v2`, and `web`
/// (labelled `web_labels`) with its route. Returns `web`'s VIP.
fn deploy_echoes(mesh: &KubeMesh, account: &str, web_labels: &Value) -> String {
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    for version in ["v1", "v2"] {
        create(
            mesh,
            &deployments,
            &echo_as(version, account),
            "an echo Deployment",
        );
        let name = format!("web-{version}");
        let svc = service(
            &name,
            &json!({"app": "web", "version": version}),
            &json!({}),
        );
        create(mesh, &services, &svc, &name);
    }
    let web = service("web", &json!({"app": "web"}), web_labels);
    create(mesh, &services, &web, "web");
    create(mesh, &routes(mesh), &route("web-v1"), "the HTTPRoute");
    vip(mesh, "web")
}

/// The controller's objects, owned by the `Gateway`; the waypoint pod ready under its account;
/// the `Gateway`'s status.
fn check_controller_objects(mesh: &KubeMesh) {
    let started = Instant::now();
    let programmed = mesh
        .cp
        .block_on(eventually("the Gateway Programmed", WAIT * 2, || async {
            let gw = gateways(mesh).get("wp").await.ok()?;
            let gw = serde_json::to_value(gw).ok()?;
            (condition(&gw, "Programmed").as_deref() == Some("True")).then_some(gw)
        }))
        .expect("the waypoint runs");
    eprintln!("Gateway programmed after {:?}", started.elapsed());
    // Its one listener's status, as Gateway API asks (routes attach to Services, not to it).
    let listener = &programmed["status"]["listeners"][0];
    assert_eq!(
        (&listener["name"], &listener["attachedRoutes"]),
        (&json!("mesh"), &json!(0)),
        "{listener}"
    );
    let conditions: Vec<(&str, &str)> = listener["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["type"].as_str()?, c["status"].as_str()?)))
        .collect();
    assert_eq!(
        conditions,
        [
            ("Accepted", "True"),
            ("Programmed", "True"),
            ("ResolvedRefs", "True")
        ],
        "{listener}"
    );
    let address = programmed["status"]["addresses"][0]["value"]
        .as_str()
        .unwrap_or_default();
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    let wp_service = mesh
        .cp
        .block_on(services.get("wp"))
        .expect("the waypoint's Service");
    assert_eq!(
        wp_service.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some(address),
        "the Gateway's address is its Service's"
    );
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let wp_deployment = mesh
        .cp
        .block_on(deployments.get("wp"))
        .expect("Deployment wp");
    // The waypoint container's requests and memory limit (the chart's defaults).
    let container = wp_deployment
        .spec
        .template
        .spec
        .as_ref()
        .map(|p| p.containers[0].clone())
        .expect("the waypoint container");
    let resources = serde_json::to_value(&container.resources).expect("JSON");
    assert_eq!(
        resources,
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}),
        "{container:?}"
    );
    // The Gateway's `spec.infrastructure` labels and annotations, on what is made for it.
    let template = wp_deployment.spec.template.metadata.as_ref();
    let team = template.and_then(|m| m.labels.as_ref()?.get("team").cloned());
    assert_eq!(team.as_deref(), Some("shop"), "{template:?}");
    let owner_note = wp_service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("example.com/owner").cloned());
    assert_eq!(owner_note.as_deref(), Some("shop-team"));
    let owner = &wp_deployment
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Gateway", "wp")
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(mesh.cp.client(), NS);
    mesh.cp
        .block_on(accounts.get("wp"))
        .expect("ServiceAccount wp");
    let selector = ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"));
    let wp_pods = mesh
        .cp
        .block_on(mesh.pods().list(&selector))
        .expect("waypoint pods");
    assert_eq!(
        wp_pods.items[0]
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref()),
        Some("wp")
    );
}

/// `curl` from node `n0`'s namespace (it routes to every pod) to the controller's view:
/// `path` with `token`; the answer's status code and body. `-k`: this asks who is served what;
/// the waypoints verify the view's certificate by its SPIFFE id.
fn ask_view(mesh: &KubeMesh, path: &str, token: Option<&str>) -> (u16, String) {
    let controllers = mesh
        .cp
        .block_on(
            Api::<Pod>::namespaced(mesh.cp.client(), "mesh-system").list(
                &ListParams::default().labels("app.kubernetes.io/name=mesh-waypoint-controller"),
            ),
        )
        .expect("the controller's pod");
    let ip = controllers
        .items
        .iter()
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .expect("the controller's pod address");
    let mut curl = std::process::Command::new("ip");
    curl.args([
        "netns",
        "exec",
        &mesh.tb.nodes()[0].netns,
        "curl",
        "-sk",
        "--max-time",
        "10",
    ])
    .args(["-w", "\n%{http_code}"]);
    if let Some(token) = token {
        curl.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = curl
        .arg(format!("https://{ip}:15012{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl's status line");
    (code.trim().parse().expect("a status code"), body.to_owned())
}

/// The attack of a pod run under the waypoint's account (any pod of its namespace may be):
/// with that account's token the API server lists no pod, and the account has no binding. The
/// waypoint reads through the controller's view, which serves the waypoints' accounts only,
/// only what a waypoint reads, and Pods without what the model does not read (their
/// environment, for one).
fn the_waypoint_account_reads_nothing(mesh: &KubeMesh) {
    let api_token = mesh
        .cp
        .service_account_token(NS, "wp")
        .expect("a token of the waypoint's account");
    let as_waypoint = mesh
        .cp
        .client_for(&Credentials::Token(api_token))
        .expect("a client as the waypoint's account");
    let listed = mesh
        .cp
        .block_on(Api::<Pod>::all(as_waypoint).list(&ListParams::default().limit(1)));
    match listed {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("the waypoint's account must not list pods: {other:?}"),
    }
    let bindings = mesh
        .cp
        .block_on(Api::<ClusterRoleBinding>::all(mesh.cp.client()).list(
            &ListParams::default().labels("app.kubernetes.io/managed-by=mesh-waypoint-controller"),
        ))
        .expect("bindings");
    assert!(bindings.items.is_empty(), "{:?}", bindings.items);
    // The view: nobody without a token, a token of another account of the namespace, a kind
    // a waypoint does not read.
    let (code, body) = ask_view(mesh, "/api/v1/pods", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no bearer token"), "{body}");
    let other = mesh
        .cp
        .service_account_token_for(NS, "default", Some("istio-ca"))
        .expect("a token of shop/default");
    let (code, body) = ask_view(mesh, "/api/v1/pods", Some(&other));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("shop/default is not a waypoint's"), "{body}");
    let token = mesh
        .cp
        .service_account_token_for(NS, "wp", Some("istio-ca"))
        .expect("a token of the waypoint's account");
    let (code, body) = ask_view(mesh, "/api/v1/secrets", Some(&token));
    assert_eq!(code, 403, "{body}");
    // The waypoint's own token: Pods, cut. The waypoint's pod has RUST_LOG in its
    // environment, as the API server holds it.
    let (code, body) = ask_view(mesh, "/api/v1/pods", Some(&token));
    assert_eq!(code, 200, "{body}");
    let pods: Value = serde_json::from_str(&body).expect("a pod list");
    let items = pods["items"].as_array().expect("items");
    let wp = items
        .iter()
        .find(|p| p["metadata"]["labels"][GATEWAY_NAME] == "wp")
        .expect("the waypoint's pod in the view");
    assert_eq!(wp["spec"]["serviceAccountName"], "wp");
    assert!(wp["status"]["podIP"].is_string(), "{wp}");
    assert!(
        !body.contains("RUST_LOG"),
        "the view holds pods' environment: {body}"
    );
    let raw = mesh
        .cp
        .block_on(
            mesh.pods()
                .list(&ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"))),
        )
        .expect("the waypoint's pods");
    assert!(
        serde_json::to_string(&raw.items)
            .expect("JSON")
            .contains("RUST_LOG"),
        "the API server holds the environment the view leaves out"
    );
}

/// Header A/B from a meshed client pod (real curl): 10 plain requests to v1, 5 with
/// `x-version: v2` to v2.
fn ab_requests(mesh: &KubeMesh, vip: &str) {
    let script = format!(
        "for i in $(seq 1 10); do curl -sS --max-time 10 http://{vip}/a -w '\\n' || exit 1; done; \
         for i in $(seq 1 5); do curl -sS --max-time 10 -H 'x-version: v2' http://{vip}/b -w '\\n' || exit 1; done"
    );
    // The A/B rule's `CORS` filter, as the API server stores it (its `maxAge` default of 5
    // filled in): a preflight answered, and an answer marked, for an origin it allows.
    let cors = format!(
        "{script}; curl -sS --max-time 10 -o /dev/null -D - -X OPTIONS -H 'x-version: v2' \
         -H 'origin: https://app.example' -H 'access-control-request-method: GET' http://{vip}/p \
         && curl -sS --max-time 10 -o /dev/null -D - -H 'x-version: v2' \
         -H 'origin: https://app.example' http://{vip}/q"
    );
    client(mesh, "ab", "n0", &cors);
    let seen = backends(mesh, 0, "ab");
    assert_eq!(seen.len(), 15, "{seen:?}");
    assert!(seen[..10].iter().all(|b| b == "v1"), "{seen:?}");
    assert!(seen[10..].iter().all(|b| b == "v2"), "header A/B: {seen:?}");
    let lines: Vec<String> = mesh.kubelets[0]
        .logs(NS, "ab", "client")
        .iter()
        .map(|l| l.trim().to_ascii_lowercase())
        .collect();
    let origin = "access-control-allow-origin: https://app.example";
    assert_eq!(
        lines.iter().filter(|l| *l == origin).count(),
        2,
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "access-control-max-age: 5"),
        "{lines:?}"
    );
}

/// The route changed through the API (the default to v2) applies.
fn route_change(mesh: &KubeMesh, vip: &str) {
    patch_route(mesh, &route("web-v2"));
    let script_once = format!("curl -sS --max-time 10 http://{vip}/c -w '\\n'");
    // Fails, naming it, when the patched route never applies.
    until_seen(mesh, 1, "after", &script_once, |seen| seen == ["v2"]);
}

/// Six curl requests to `raw`'s port 9000, each on its own connection.
fn six_connections(raw_vip: &str) -> String {
    format!(
        "for i in 1 2 3 4 5 6; do curl -sS --max-time 10 http://{raw_vip}:9000/t -w '\\n' || exit 1; done"
    )
}

/// A `TCPRoute` (Gateway API v1, the standard channel's CRD) created through the API: `raw`, a
/// Service of both echoes whose port declares no protocol, sends every connection to `web-v2`.
/// The waypoint passes them on as TCP, unread: the echo gets curl's request without the
/// `x-request-id` the waypoint gives every request it routes as HTTP.
fn tcp_route(mesh: &KubeMesh) {
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    let raw: Service = from_json(json!({
        "metadata": {"name": "raw", "namespace": NS, "labels": {"istio.io/use-waypoint": "wp"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 9000, "targetPort": 8080}]},
    }));
    create(mesh, &services, &raw, "Service raw");
    let raw_vip = vip(mesh, "raw");
    let route: DynamicObject = from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "TCPRoute",
        "metadata": {"name": "raw", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "raw", "port": 9000}],
            "rules": [{"backendRefs": [{"name": "web-v2", "port": 80}]}],
        },
    }));
    let api = Api::namespaced_with(
        mesh.cp.client(),
        NS,
        &gvk("gateway.networking.k8s.io", "TCPRoute", "tcproutes"),
    );
    create(mesh, &api, &route, "the TCPRoute");
    let raw = json!({"group": "", "kind": "Service", "name": "raw", "port": 9000});
    route_entry_is(
        mesh,
        &api,
        ("raw", &raw),
        ("True", "Accepted"),
        Some(("True", "ResolvedRefs")),
    );
    let script = six_connections(&raw_vip);
    // Fails, naming it, when the route never applies (both echoes answer `raw` by itself).
    until_seen(mesh, 0, "tcp", &script, |seen| {
        seen.len() == 6 && seen.iter().all(|b| b == "v2")
    });
    client(
        mesh,
        "tcp-headers",
        "n0",
        &format!("curl -sS --max-time 10 http://{raw_vip}:9000/h"),
    );
    let last = mesh.kubelets[0].logs(NS, "tcp-headers", "client");
    assert_eq!(backends(mesh, 0, "tcp-headers"), ["v2"], "{last:?}");
    for line in last.iter().filter(|l| l.trim_start().starts_with('{')) {
        let echo: Value = serde_json::from_str(line).expect("an echo line");
        assert!(
            echo["headers"].get("x-request-id").is_none(),
            "routed as HTTP, not passed on as TCP: {echo}"
        );
    }
}

/// A cluster whose Gateway API is older than 1.5 serves `TCPRoute` only at `v1alpha2` (its
/// experimental channel): the CRD changed in place to serve that version alone (the standard
/// CRD's own `v1alpha2` schema, made the stored one), and the waypoint's pod replaced, so that
/// the new waypoint starts on such a cluster. Its watch at `v1` fails as not found and moves to
/// `v1alpha2`, where a route created at that version routes `raw` (to `web-v1` now; `web-v2`
/// before, so only the new route explains it).
fn tcp_route_at_an_older_version(mesh: &KubeMesh) {
    let routes = Api::<DynamicObject>::namespaced_with(
        mesh.cp.client(),
        NS,
        &gvk("gateway.networking.k8s.io", "TCPRoute", "tcproutes"),
    );
    mesh.cp
        .block_on(routes.delete("raw", &DeleteParams::default()))
        .expect("the v1 TCPRoute deleted");
    let crds: Api<CustomResourceDefinition> = Api::all(mesh.cp.client());
    let name = "tcproutes.gateway.networking.k8s.io";
    let mut crd = mesh.cp.block_on(crds.get(name)).expect("the TCPRoute CRD");
    for version in &mut crd.spec.versions {
        let old = version.name == "v1alpha2";
        version.served = old;
        version.storage = old;
    }
    mesh.cp
        .block_on(crds.replace(name, &PostParams::default(), &crd))
        .expect("the TCPRoute CRD serves v1alpha2 alone");
    let old = gvk_at(
        "gateway.networking.k8s.io",
        "v1alpha2",
        "TCPRoute",
        "tcproutes",
    );
    let old_routes = Api::<DynamicObject>::namespaced_with(mesh.cp.client(), NS, &old);
    let route: DynamicObject = from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
        "metadata": {"name": "raw-old", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "raw", "port": 9000}],
            "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}],
        },
    }));
    // The API server serves the version once the CRD's new handler is in place.
    mesh.cp
        .block_on(eventually(
            "the v1alpha2 TCPRoute created",
            WAIT,
            || async { old_routes.create(&PostParams::default(), &route).await.ok() },
        ))
        .expect("a v1alpha2 TCPRoute");
    // The controller writes its status at the version now served.
    let raw = json!({"group": "", "kind": "Service", "name": "raw", "port": 9000});
    route_entry_is(
        mesh,
        &old_routes,
        ("raw-old", &raw),
        ("True", "Accepted"),
        Some(("True", "ResolvedRefs")),
    );
    replace_the_waypoint_pod(mesh);
    let raw_vip = vip(mesh, "raw");
    let script = six_connections(&raw_vip);
    until_seen(mesh, 0, "tcp-old", &script, |seen| {
        seen.len() == 6 && seen.iter().all(|b| b == "v1")
    });
    let logs = pod_logs(mesh, "wp-", "waypoint");
    assert!(
        logs.iter()
            .any(|l| l.contains("watched at an older version") && l.contains("v1alpha2")),
        "the waypoint says which version it reads: {:?}",
        logs.iter().rev().take(20).collect::<Vec<_>>()
    );
}

/// The `Gateway` deleted: what the controller made goes, and web's traffic fails closed.
fn delete_gateway(mesh: &KubeMesh, vip: &str) {
    mesh.cp
        .block_on(gateways(mesh).delete("wp", &DeleteParams::default()))
        .expect("Gateway deleted");
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    mesh.cp
        .block_on(eventually("the waypoint's objects gone", WAIT, || async {
            let gone = deployments.get_opt("wp").await.ok()?.is_none()
                && services.get_opt("wp").await.ok()?.is_none();
            gone.then_some(())
        }))
        .expect("garbage collected");
    client(
        mesh,
        "closed",
        "n0",
        &format!("curl -sS --max-time 5 http://{vip}/d && exit 1 || exit 0"),
    );
    assert_eq!(
        mesh.finished("closed").expect("ends"),
        "Succeeded",
        "web fails closed"
    );
    // ... and is told why; its label removed, the condition goes.
    let services = services_dyn(mesh);
    condition_is(
        mesh,
        &services,
        ("web", BOUND),
        Some("False"),
        "no waypoint Gateway shop/wp",
    );
    let unlabelled = json!({"metadata": {"labels": {"istio.io/use-waypoint": null}}});
    mesh.cp
        .block_on(services.patch("web", &PatchParams::default(), &Patch::Merge(&unlabelled)))
        .expect("web's label removed");
    condition_is(mesh, &services, ("web", BOUND), None, "");
}

/// Deletes the waypoint's pod and waits until the one its `Deployment` starts instead is ready.
fn replace_the_waypoint_pod(mesh: &KubeMesh) {
    let selector = ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"));
    let old = mesh
        .cp
        .block_on(mesh.pods().list(&selector))
        .expect("the waypoint pod");
    let old = pod_names(&old.items);
    mesh.cp
        .block_on(
            mesh.pods()
                .delete_collection(&DeleteParams::default(), &selector),
        )
        .expect("the waypoint pod deleted");
    waypoint_pods_ready(mesh, 1, &old);
}

fn pod_names(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

/// Scales the waypoint's `Deployment` to `replicas`, as `kubectl scale` does (its scale
/// subresource).
fn scale_waypoint(mesh: &KubeMesh, replicas: i32) {
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let patch = json!({"spec": {"replicas": replicas}});
    let params = PatchParams {
        field_manager: Some("kubectl-scale".into()),
        ..PatchParams::default()
    };
    mesh.cp
        .block_on(deployments.patch_scale("wp", &params, &Patch::Merge(&patch)))
        .expect("scaled");
}

/// Waits until the waypoint has `count` pods, all ready and none of `old`.
fn waypoint_pods_ready(mesh: &KubeMesh, count: usize, old: &[String]) {
    let selector = ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"));
    mesh.cp
        .block_on(eventually("the waypoint's pods ready", WAIT, || async {
            let pods = mesh.pods().list(&selector).await.ok()?.items;
            let ready = |p: &Pod| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            };
            let all_new = pod_names(&pods).iter().all(|n| !old.contains(n));
            (all_new && pods.len() == count && pods.iter().all(ready)).then_some(())
        }))
        .unwrap_or_else(|e| panic!("{count} waypoint pods: {e}"));
}

/// The waypoint's `Deployment` scaled to two by its user (`kubectl scale`: the scale
/// subresource): the controller, which reconciles at every change of it, leaves the replicas
/// alone (before, it applied one again at once), and both pods serve. Scaled back to one.
fn scaled_by_its_user(mesh: &KubeMesh) {
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), NS);
    let scale = |replicas| scale_waypoint(mesh, replicas);
    scale(2);
    waypoint_pods_ready(mesh, 2, &[]);
    // A reconcile of the Gateway (its label changed) applies the Deployment again, and keeps
    // the time of its conditions, whose status stays.
    let accepted_since = || {
        let gateway = mesh
            .cp
            .block_on(gateways(mesh).get("wp"))
            .expect("Gateway wp");
        let conditions = gateway.data["status"]["conditions"].as_array().cloned();
        conditions
            .unwrap_or_default()
            .iter()
            .find(|c| c["type"] == "Accepted")
            .map(|c| c["lastTransitionTime"].clone())
    };
    let since = accepted_since();
    let label = json!({"metadata": {"labels": {"touched": "yes"}}});
    mesh.cp
        .block_on(gateways(mesh).patch("wp", &PatchParams::default(), &Patch::Merge(&label)))
        .expect("Gateway patched");
    std::thread::sleep(Duration::from_secs(3));
    assert!(since.is_some());
    assert_eq!(
        accepted_since(),
        since,
        "the Accepted condition's time stays"
    );
    let replicas = mesh
        .cp
        .block_on(deployments.get("wp"))
        .expect("Deployment wp")
        .spec
        .replicas;
    assert_eq!(replicas, Some(2), "the user's replicas stay");
    waypoint_pods_ready(mesh, 2, &[]);
    let vip = vip(mesh, "web");
    let script = format!(
        "for i in $(seq 1 8); do curl -sS --max-time 10 http://{vip}/scaled -w '\\n' || exit 1; done"
    );
    client(mesh, "scaled", "n0", &script);
    assert_eq!(mesh.finished("scaled").expect("client ends"), "Succeeded");
    scale(1);
    waypoint_pods_ready(mesh, 1, &[]);
}

/// The echo pods stay ready behind the waypoint: their HTTP probes come from the node, which is
/// no bypass. Checked after several probe periods (three failures would have made them
/// unready).
fn echo_pods_stay_ready(mesh: &KubeMesh) {
    std::thread::sleep(Duration::from_secs(4));
    let selector = ListParams::default().labels("app=web");
    let pods = mesh
        .cp
        .block_on(mesh.pods().list(&selector))
        .expect("echo pods");
    assert_eq!(pods.items.len(), 2);
    for pod in pods.items {
        let ready = pod
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "{:?} stays ready", pod.metadata.name);
    }
}

/// The cluster with the chart installed, what a user writes ([`deploy`]) and the controller's
/// objects checked; returns `web`'s VIP, holding the serial lock (dropped last).
fn deployed() -> (std::sync::MutexGuard<'static, ()>, KubeMesh, String) {
    let serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The controller reads the conditions back every 5 s (not every 10 minutes), so that the
    // test sees one someone else changed put right.
    let values = [("waypointController.statusResyncSeconds", "5")];
    let mesh = KubeMesh::install(2, NS, true, &values).expect("the chart installed");
    let vip = deploy(&mesh);
    check_controller_objects(&mesh);
    (serial, mesh, vip)
}

/// An `AuthorizationPolicy` targeting `web` (Istio's waypoint form), created through the API:
/// the waypoint enforces its HTTP fields (GET only, never `/admin` however spelled); deleted,
/// everything is served again.
fn waypoint_policy(mesh: &KubeMesh, vip: &str) {
    let resource = gvk(
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
    );
    let policies: Api<DynamicObject> = Api::namespaced_with(mesh.cp.client(), NS, &resource);
    let policy: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "web-read-only", "namespace": NS},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"methods": ["GET"], "notPaths": ["/admin", "/admin/*"]}}]}],
        },
    }));
    create(mesh, &policies, &policy, "the AuthorizationPolicy");
    // The controller tells each policy what enforces it: web's, its waypoint; one on a Service
    // without waypoint, that nothing does; one of pods (the node agents'), what its HTTP field,
    // which they cannot evaluate, does to its rule.
    let others = [
        (
            "web-v1-deny",
            json!({"targetRefs": [{"kind": "Service", "group": "", "name": "web-v1"}],
                   "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}),
            ("WaypointAccepted", "Service shop/web-v1 has no waypoint"),
        ),
        (
            "pods-get-only",
            json!({"selector": {"matchLabels": {"app": "nobody"}},
                   "action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
            (
                "ZtunnelAccepted",
                "rules[0].to[0].operation.methods is an HTTP (L7) field the node agent does not \
                 enforce: this ALLOW rule matches nothing",
            ),
        ),
    ];
    for (name, spec, _) in &others {
        let other: DynamicObject = from_json(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": NS}, "spec": spec,
        }));
        create(mesh, &policies, &other, name);
    }
    condition_is(
        mesh,
        &policies,
        ("web-read-only", "WaypointAccepted"),
        Some("True"),
        "bound to shop/wp",
    );
    tampered_condition_put_right(
        mesh,
        &policies,
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("web-read-only", "WaypointAccepted"),
        "bound to shop/wp",
    );
    // A change the CRD lets through but the mesh does not read (a port by name) is told so, and
    // the version before stays in force (checked by the requests below).
    mesh.cp
        .block_on(policies.patch(
            "web-read-only",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}}),
            ),
        ))
        .expect("policy patched");
    condition_is(
        mesh,
        &policies,
        ("web-read-only", "WaypointAccepted"),
        Some("False"),
        "not applied: spec.rules[0].to[0].operation.ports[0]",
    );
    for (name, _, (kind, message)) in &others {
        condition_is(mesh, &policies, (name, kind), Some("False"), message);
        mesh.cp
            .block_on(policies.delete(name, &DeleteParams::default()))
            .expect("policy deleted");
    }
    let statuses = format!(
        "for req in 'GET /x' 'POST /x' 'GET /admin' 'GET /%61dmin/a' 'GET /b/../admin' 'GET //admin'; do \
         set -- $req; curl -sS --max-time 10 --path-as-is -X $1 -o /dev/null -w '%{{http_code}}\n' \
         http://{vip}$2 || exit 1; done"
    );
    until_seen(mesh, 0, "authz", &statuses, |seen| {
        seen == ["200", "403", "403", "403", "403", "403"]
    });
    mesh.cp
        .block_on(policies.delete("web-read-only", &DeleteParams::default()))
        .expect("policy deleted");
    until_seen(mesh, 0, "unauthz", &statuses, |seen| {
        seen == ["200", "200", "200", "200", "200", "200"]
    });
}

/// A `RequestAuthentication` targeting `web` (its key set inline) and Istio's "require a JWT"
/// policy, created through the API: the controller tells it the waypoint validates its tokens
/// (and one with a selector, that nothing does); a valid token is served, a request without
/// one is denied (403), an expired one refused (401); deleted, everything is served again.
fn waypoint_jwt(mesh: &KubeMesh, vip: &str) {
    let authns: Api<DynamicObject> = Api::namespaced_with(
        mesh.cp.client(),
        NS,
        &gvk(
            "security.istio.io",
            "RequestAuthentication",
            "requestauthentications",
        ),
    );
    let policies: Api<DynamicObject> = Api::namespaced_with(
        mesh.cp.client(),
        NS,
        &gvk(
            "security.istio.io",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
    );
    let authn: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "web-jwt", "namespace": NS},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "jwtRules": [{"issuer": "https://idp.example", "jwks": mesh_tests::jwt::JWKS_EC}],
        },
    }));
    let require: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "require-jwt", "namespace": NS},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "action": "DENY",
            "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}],
        },
    }));
    create(mesh, &authns, &authn, "the RequestAuthentication");
    create(mesh, &policies, &require, "the AuthorizationPolicy");
    // The controller tells each what validates its tokens: web's waypoint; for one with a
    // selector (a sidecar's, in Istio), nothing.
    let of_pods: DynamicObject = from_json(json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "pods-jwt", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "jwtRules": [{"issuer": "https://idp.example", "jwks": mesh_tests::jwt::JWKS_EC}],
        },
    }));
    create(
        mesh,
        &authns,
        &of_pods,
        "the sidecars' RequestAuthentication",
    );
    condition_is(
        mesh,
        &authns,
        ("web-jwt", "WaypointAccepted"),
        Some("True"),
        "bound to shop/wp",
    );
    condition_is(
        mesh,
        &authns,
        ("pods-jwt", "WaypointAccepted"),
        Some("False"),
        "no waypoint validates its tokens",
    );
    mesh.cp
        .block_on(authns.delete("pods-jwt", &DeleteParams::default()))
        .expect("deleted");
    let now = mesh_tests::jwt::now();
    let token = |exp: u64| {
        let claims = json!({"iss": "https://idp.example", "sub": "alice", "exp": exp});
        mesh_tests::jwt::sign(mesh_tests::jwt::TestKey::Ec, &claims)
    };
    let (good, expired) = (token(now + 3600), token(now - 3600));
    let statuses = format!(
        "for t in '{good}' '' '{expired}'; do \
         curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\n' -H \"Authorization: Bearer $t\" \
         http://{vip}/x || exit 1; done"
    );
    until_seen(mesh, 0, "jwt", &statuses, |seen| {
        seen == ["200", "403", "401"]
    });
    for (api, name) in [(&authns, "web-jwt"), (&policies, "require-jwt")] {
        mesh.cp
            .block_on(api.delete(name, &DeleteParams::default()))
            .expect("deleted");
    }
    until_seen(mesh, 0, "unjwt", &statuses, |seen| {
        seen == ["200", "200", "200"]
    });
}

/// Istio's documented local rate limit (an `EnvoyFilter`) targeting `web`, created through the
/// API: the controller tells it the waypoint applies it; a bucket of 3 (never refilled within
/// the test), then 429 with Envoy's body; deleted, everything is served again.
fn waypoint_rate_limit(mesh: &KubeMesh, vip: &str) {
    let filters: Api<DynamicObject> = Api::namespaced_with(
        mesh.cp.client(),
        NS,
        &gvk_at(
            "networking.istio.io",
            "v1alpha3",
            "EnvoyFilter",
            "envoyfilters",
        ),
    );
    let filter: DynamicObject = from_json(json!({
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
        "metadata": {"name": "web-limit", "namespace": NS},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "web"}],
            "configPatches": [{
                "applyTo": "HTTP_FILTER",
                "match": {"context": "WAYPOINT", "waypoint": {"portNumber": 80}},
                "patch": {"operation": "INSERT_BEFORE", "value": {
                    "name": "envoy.filters.http.local_ratelimit",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                        "stat_prefix": "http_local_rate_limiter",
                        "token_bucket": {"max_tokens": 3, "tokens_per_fill": 3, "fill_interval": "3600s"},
                        "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                        "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                    },
                }},
            }],
        },
    }));
    create(mesh, &filters, &filter, "the EnvoyFilter");
    condition_is(
        mesh,
        &filters,
        ("web-limit", "WaypointAccepted"),
        Some("True"),
        "bound to shop/wp",
    );
    let statuses = format!(
        "for i in 1 2 3 4 5 6; do \
         curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\n' http://{vip}/x || exit 1; done"
    );
    // Runs before the waypoint sees the filter are all 200; the first run after spends the
    // bucket (whatever is left of it), and every request past it is 429.
    until_seen(mesh, 0, "limited", &statuses, |seen| {
        let limited = seen.iter().position(|s| s == "429");
        limited.is_some_and(|first| seen[first..].iter().all(|s| s == "429"))
            && seen.iter().all(|s| s == "200" || s == "429")
    });
    mesh.cp
        .block_on(filters.delete("web-limit", &DeleteParams::default()))
        .expect("deleted");
    until_seen(mesh, 0, "unlimited", &statuses, |seen| {
        seen == ["200", "200", "200", "200", "200", "200"]
    });
}

#[test]
fn the_controller_runs_a_waypoint_that_routes_by_httproute_on_the_real_control_plane() {
    let (_serial, mesh, vip) = deployed();
    ab_requests(&mesh, &vip);
    the_waypoint_account_reads_nothing(&mesh);
    // The controller tells web it is bound (the other Services ask for no waypoint).
    condition_is(
        &mesh,
        &services_dyn(&mesh),
        ("web", BOUND),
        Some("True"),
        "bound to shop/wp",
    );
    condition_is(&mesh, &services_dyn(&mesh), ("web-v1", BOUND), None, "");
    route_status(&mesh);
    echo_pods_stay_ready(&mesh);
    route_change(&mesh, &vip);
    route_status_follows_its_generation(&mesh);
    invalid_route_keeps_its_last_good(&mesh, &vip);
    invalid_gateway_label(&mesh, &vip);
    tcp_route(&mesh);
    tcp_route_at_an_older_version(&mesh);
    scaled_by_its_user(&mesh);
    gateway_parameters(&mesh, &vip);
    waypoint_policy(&mesh, &vip);
    waypoint_jwt(&mesh, &vip);
    waypoint_rate_limit(&mesh, &vip);
    service_entry_from_the_api(&mesh);
    delete_gateway(&mesh, &vip);
}

/// A `ServiceEntry` created through the API (watched by the agents and the waypoint, as the
/// chart's roles let them): its address is captured, its `workloadSelector` picks `v2`'s pod,
/// through the waypoint it is bound to; then a route attached to the entry sends its requests
/// to `web-v1` by Istio's `Hostname` backend.
fn service_entry_from_the_api(mesh: &KubeMesh) {
    let entries: Api<DynamicObject> = Api::namespaced_with(
        mesh.cp.client(),
        NS,
        &gvk("networking.istio.io", "ServiceEntry", "serviceentries"),
    );
    let entry: DynamicObject = from_json(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "echo-entry", "namespace": NS,
                     "labels": {"istio.io/use-waypoint": "wp"}},
        "spec": {
            "hosts": ["echo.internal.example"],
            "addresses": ["240.240.0.77"],
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8080}],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "workloadSelector": {"labels": {"app": "web", "version": "v2"}},
        },
    }));
    create(mesh, &entries, &entry, "the ServiceEntry");
    let once = "curl -sS --max-time 10 http://240.240.0.77/e -w '\\n'";
    until_seen(mesh, 0, "entry", once, |seen| seen == ["v2"]);
    condition_is(
        mesh,
        &entries,
        ("echo-entry", BOUND),
        Some("True"),
        "bound to shop/wp",
    );
    let route: DynamicObject = from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "echo-entry", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry",
                            "name": "echo-entry", "port": 80}],
            "rules": [{"backendRefs": [{"group": "networking.istio.io", "kind": "Hostname",
                                        "name": format!("web-v1.{NS}.svc.cluster.local"),
                                        "port": 80}]}],
        },
    }));
    create(mesh, &routes(mesh), &route, "the entry's HTTPRoute");
    until_seen(mesh, 0, "entry-routed", once, |seen| seen == ["v1"]);
    mesh.cp
        .block_on(entries.delete("echo-entry", &DeleteParams::default()))
        .expect("entry deleted");
}

/// The echo `Deployments` under service account `reviews`, their Services (no waypoint label)
/// and the route of `web`. Returns `web`'s VIP.
fn deploy_under_an_account(mesh: &KubeMesh) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(mesh.cp.client(), NS);
    let reviews: ServiceAccount =
        from_json(json!({"metadata": {"name": "reviews", "namespace": NS}}));
    create(mesh, &accounts, &reviews, "ServiceAccount reviews");
    deploy_echoes(mesh, "reviews", &json!({}))
}

/// Sets (or with `Null` removes) the namespace's `mesh.local/waypoint` label.
fn set_waypoint_mode(mesh: &KubeMesh, value: &Value) {
    let patch = json!({"metadata": {"labels": {"mesh.local/waypoint": value}}});
    mesh.cp
        .block_on(Api::<Namespace>::all(mesh.cp.client()).patch(
            NS,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))
        .expect("namespace labelled");
}

/// The account's waypoint: a Gateway owned by the account, made into a waypoint, ready, under
/// its own identity.
fn account_waypoint_runs(mesh: &KubeMesh) {
    let gateway = mesh
        .cp
        .block_on(eventually(
            "reviews-waypoint Programmed",
            WAIT * 2,
            || async {
                let gw = gateways(mesh).get("reviews-waypoint").await.ok()?;
                let gw = serde_json::to_value(gw).ok()?;
                (condition(&gw, "Programmed").as_deref() == Some("True")).then_some(gw)
            },
        ))
        .expect("the account's waypoint runs");
    assert_eq!(
        gateway["metadata"]["labels"]["mesh.local/waypoint-for-service-account"],
        "reviews"
    );
    assert_eq!(
        gateway["metadata"]["ownerReferences"][0]["kind"],
        "ServiceAccount"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(mesh.cp.client(), NS);
    mesh.cp
        .block_on(accounts.get("reviews-waypoint"))
        .expect("the waypoint's own identity");
}

/// A request to the v1 pod's own address goes through the account's waypoint (its access log
/// names it) and is answered.
fn pod_address_through_the_waypoint(mesh: &KubeMesh) {
    let selector = ListParams::default().labels("app=web,version=v1");
    let v1 = mesh
        .cp
        .block_on(mesh.pods().list(&selector))
        .expect("v1 pod");
    let v1_ip = v1.items[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("v1's address");
    client(
        mesh,
        "direct",
        "n0",
        &format!("curl -sS --max-time 10 http://{v1_ip}:8080/direct -w '\\n'"),
    );
    assert_eq!(backends(mesh, 0, "direct"), ["v1"]);
    // The waypoint writes its access log in batches: its line may come a little later.
    let waypoint_logs = || -> Vec<String> {
        mesh.kubelets
            .iter()
            .flat_map(|k| {
                k.pods()
                    .into_iter()
                    .filter(|p| p.name.starts_with("reviews-waypoint-"))
                    .flat_map(|p| k.logs(NS, &p.name, "waypoint"))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let direct = mesh_tests::telemetry::access_records_once(waypoint_logs, WAIT, |records| {
        records.iter().any(|r| r["path"] == "/direct")
    });
    assert!(
        direct.iter().any(|r| r["path"] == "/direct"),
        "the pod-address request went through the account's waypoint"
    );
}

/// The setting removed: the waypoint goes, and web's traffic is direct (no route: the header no
/// longer picks v2 every time).
fn setting_removed(mesh: &KubeMesh, vip: &str) {
    set_waypoint_mode(mesh, &Value::Null);
    mesh.cp
        .block_on(eventually("reviews-waypoint gone", WAIT, || async {
            gateways(mesh)
                .get_opt("reviews-waypoint")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }))
        .expect("the account's waypoint deleted");
    let script = format!(
        "for i in $(seq 1 6); do curl -sS --max-time 10 -H 'x-version: v2' http://{vip}/e -w '\\n' || exit 1; done"
    );
    // web's traffic direct again, not routed by the waypoint: the header no longer picks v2
    // every time (fails, naming it, when it never is).
    until_seen(mesh, 1, "plain", &script, |seen| {
        seen.iter().any(|b| b == "v1")
    });
}

/// The per-service-account setting on the namespace: the echo pods' account `reviews` gets its
/// waypoint `reviews-waypoint` (a `Gateway` the controller makes, owned by the account, then
/// run like any other), which takes the Service `web` (all its pods run under `reviews`, and it
/// has no label of its own) and the pods' own addresses; removing the setting removes the
/// waypoint and the traffic goes direct again.
#[test]
fn one_namespace_label_gives_each_service_account_its_own_waypoint() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mesh = KubeMesh::install(2, NS, true, &[]).expect("the chart installed");
    let vip = deploy_under_an_account(&mesh);
    set_waypoint_mode(&mesh, &json!("per-service-account"));
    account_waypoint_runs(&mesh);
    // web's traffic goes through it (the route's header A/B applies) without any label on web.
    ab_requests(&mesh, &vip);
    pod_address_through_the_waypoint(&mesh);
    setting_removed(&mesh, &vip);
}

fn virtual_services(mesh: &KubeMesh) -> Api<DynamicObject> {
    let resource = gvk("networking.istio.io", "VirtualService", "virtualservices");
    Api::namespaced_with(mesh.cp.client(), NS, &resource)
}

fn destination_rules(mesh: &KubeMesh) -> Api<DynamicObject> {
    let resource = gvk("networking.istio.io", "DestinationRule", "destinationrules");
    Api::namespaced_with(mesh.cp.client(), NS, &resource)
}

/// Runs `script` in a new client pod on node `node` until `done` holds for its echo backends
/// (each line's `backend`, or the status curl printed), or fails after 30 tries.
fn until_seen(
    mesh: &KubeMesh,
    node: usize,
    prefix: &str,
    script: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let mut last = Vec::new();
    for i in 0..30 {
        let name = format!("{prefix}-{i}");
        client(mesh, &name, &format!("n{node}"), script);
        assert_eq!(
            mesh.finished(&name).expect("client ends"),
            "Succeeded",
            "{:?}",
            mesh.kubelets[node].logs(NS, &name, "client")
        );
        last = mesh.kubelets[node]
            .logs(NS, &name, "client")
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                // An echo's JSON line names its backend; anything else (a status) is kept.
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(Value::is_object)
                    .map_or_else(
                        || l.trim().to_owned(),
                        |v| v["backend"].as_str().unwrap_or("?").to_owned(),
                    )
            })
            .collect();
        if done(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{prefix}: never as expected; last: {last:?}");
}

/// Patches the route of `web` to have `rules`.
fn patch_rules(mesh: &KubeMesh, rules: &Value) {
    patch_route(
        mesh,
        &from_json(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": NS},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": rules,
            },
        })),
    );
}

/// Patches the route of `web` to `route`'s spec.
fn patch_route(mesh: &KubeMesh, route: &DynamicObject) {
    let patch = serde_json::to_value(route).expect("JSON");
    mesh.cp
        .block_on(routes(mesh).patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": patch["spec"]})),
        ))
        .expect("route patched");
}

/// A canary, 90/10 over 1,000 requests: v2's share within ±4 standard deviations (100 ± 38).
fn canary_from_the_api(mesh: &KubeMesh, vip: &str) {
    patch_rules(
        mesh,
        &json!([{"backendRefs": [
            {"name": "web-v1", "port": 80, "weight": 90},
            {"name": "web-v2", "port": 80, "weight": 10},
        ]}]),
    );
    let urls: Vec<String> = (0..1000).map(|i| format!("http://{vip}/c/{i}")).collect();
    let script = format!("curl -sS --max-time 30 -w '\\n' {}", urls.join(" "));
    let seen = until_seen(mesh, 0, "canary", &script, |seen| {
        seen.len() == 1000 && seen.iter().any(|b| b == "v2")
    });
    let v2 = seen.iter().filter(|b| *b == "v2").count();
    eprintln!("canary on Kubernetes: {v2} of 1000 to v2");
    assert!((62..=138).contains(&v2), "v2 took {v2} of 1000");
}

/// A request timeout of 300 ms to a backend asked (by the rule's header filter) to answer in
/// 1 s: 504.
fn timeout_from_the_api(mesh: &KubeMesh, vip: &str) {
    patch_rules(
        mesh,
        &json!([{"backendRefs": [{"name": "web-v1", "port": 80}],
                           "timeouts": {"request": "300ms"},
                           "filters": [{"type": "RequestHeaderModifier",
                                        "requestHeaderModifier": {
                                            "add": [{"name": "x-delay-ms", "value": "1000"}]}}]}]),
    );
    let script =
        format!("curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 http://{vip}/t");
    until_seen(mesh, 0, "timeout", &script, |seen| seen == ["504"]);
}

/// Istio's traffic objects: the `HTTPRoute` removed, a `VirtualService` aborting `/abort` with
/// 418 and sending `x-user: alice` to the `DestinationRule`'s subset v2, the rest to v1.
fn istio_objects_from_the_api(mesh: &KubeMesh, vip: &str) {
    mesh.cp
        .block_on(routes(mesh).delete("web", &DeleteParams::default()))
        .expect("route deleted");
    let dr: DynamicObject = from_json(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"host": "web", "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer":
                {"consistentHash": {"httpCookie": {"name": "route", "ttl": "0s", "path": "/"}}}}},
        // Istio's locality failover, as its task writes it (the nodes carry no zones here, so
        // it changes nothing; a rule that did not read would leave the subsets unknown).
        ], "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_REQUEST", "localityLbSetting": {
                "enabled": true, "failover": [{"from": "region1", "to": "region2"}]}},
            "outlierDetection": {"consecutive5xxErrors": 100, "interval": "1s", "baseEjectionTime": "1m"}}},
    }));
    let vs: DynamicObject = from_json(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"hosts": ["web"], "http": [
            {"name": "abort", "match": [{"uri": {"prefix": "/abort"}}],
             "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "web", "subset": "v1"}}]},
            {"name": "down", "match": [{"uri": {"prefix": "/down"}}],
             "directResponse": {"status": 503, "body": {"string": "down"}}},
            {"name": "alice",
             "match": [{"headers": {"x-user": {"exact": "alice"}}, "withoutHeaders": {"x-opt-out": {}}}],
             "route": [{"destination": {"host": "web", "subset": "v2"}}]},
            {"name": "rest", "route": [{"destination": {"host": "web", "subset": "v1"}}],
             "corsPolicy": {"allowOrigins": [{"exact": "https://app.example"}], "maxAge": "1h"}},
        ]},
    }));
    create(mesh, &destination_rules(mesh), &dr, "the DestinationRule");
    create(mesh, &virtual_services(mesh), &vs, "the VirtualService");
    // Then, as the API server stores them: a direct response, a presence match in
    // `withoutHeaders`, a CORS preflight answered, and the subset's sticky cookie set.
    let script = format!(
        "curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 http://{vip}/abort/1; \
         for i in 1 2 3; do curl -sS --max-time 10 -H 'x-user: alice' http://{vip}/a -w '\\n' || exit 1; done; \
         for i in 1 2 3; do curl -sS --max-time 10 http://{vip}/b -w '\\n' || exit 1; done; \
         curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 http://{vip}/down; \
         curl -sS --max-time 10 -H 'x-user: alice' -H 'x-opt-out: 1' http://{vip}/a -w '\\n'; \
         curl -sS --max-time 10 -o /dev/null -D - -X OPTIONS -H 'origin: https://app.example' \
           -H 'access-control-request-method: GET' http://{vip}/c | grep -i '^access-control-max-age'; \
         curl -sS --max-time 10 -o /dev/null -D - -H 'x-user: alice' http://{vip}/a \
           | grep -i '^set-cookie' | cut -d'\"' -f1"
    );
    let seen = until_seen(mesh, 0, "istio", &script, |seen| {
        seen == [
            "418",
            "v2",
            "v2",
            "v2",
            "v1",
            "v1",
            "v1",
            "503",
            "v1",
            "access-control-max-age: 3600",
            "set-cookie: route=",
        ]
    });
    eprintln!("VirtualService on Kubernetes: {seen:?}");
}

/// Istio's circuit breaker given to the `DestinationRule` through the API (the CRD's schema
/// checks it): with `http2MaxRequests: 1`, a request while a slow one is in flight gets 503; the
/// pool removed, both are served.
fn circuit_breaker_from_the_api(mesh: &KubeMesh, vip: &str) {
    let pool = |pool: Value| {
        let patch = json!({"spec": {"trafficPolicy": {"connectionPool": pool}}});
        mesh.cp
            .block_on(destination_rules(mesh).patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
            .expect("DestinationRule patched");
    };
    pool(json!({
        "tcp": {"connectTimeout": "5s", "tcpKeepalive": {"time": "60s"}},
        "http": {"http2MaxRequests": 1, "maxRetries": 1, "idleTimeout": "30s"},
    }));
    let script = format!(
        "curl -sS -o /dev/null -w 'slow %{{http_code}}\\n' --max-time 10 -H 'x-delay-ms: 2000' http://{vip}/b & \
         sleep 0.5; curl -sS -o /dev/null -w '%{{http_code}}\\n' --max-time 10 http://{vip}/b; wait"
    );
    until_seen(mesh, 0, "breaker", &script, |seen| {
        seen == ["503", "slow 200"]
    });
    pool(Value::Null);
    until_seen(mesh, 0, "unbroken", &script, |seen| {
        seen == ["200", "slow 200"]
    });
}

/// The L7 objects as the API server stores and returns them (with its defaults filled in),
/// read by the waypoint from the API: a weighted canary `HTTPRoute`, its request timeout, and
/// an Istio `VirtualService` with an injected abort and a header route to a `DestinationRule`
/// subset.
#[test]
fn canary_timeout_fault_and_subsets_from_the_api() {
    let (_serial, mesh, vip) = deployed();
    canary_from_the_api(&mesh, &vip);
    timeout_from_the_api(&mesh, &vip);
    istio_objects_from_the_api(&mesh, &vip);
    circuit_breaker_from_the_api(&mesh, &vip);
}

/// Runs `mesh-probe` with `args` in a new pod on node `node` to the end; its output.
fn probe(mesh: &KubeMesh, name: &str, node: usize, args: &[&str]) -> Vec<String> {
    mesh.start_probe(name, args, Some(&format!("n{node}")))
        .expect("probe pod");
    let phase = mesh.finished(name).expect("the probe ends");
    let logs = mesh.kubelets[node].logs(NS, name, "client");
    assert_eq!(phase, "Succeeded", "{name}: {logs:?}");
    logs
}

/// Runs `mesh-probe` with `args` in new pods on node 0 (`<prefix>-<i>`) until `done` holds for
/// one's phase and output, or fails after 30; that output.
fn probe_until(
    mesh: &KubeMesh,
    prefix: &str,
    args: &[&str],
    done: impl Fn(&str, &[String]) -> bool,
) -> Vec<String> {
    let mut last = (String::new(), Vec::new());
    for i in 0..30 {
        let name = format!("{prefix}-{i}");
        mesh.start_probe(&name, args, Some("n0"))
            .expect("probe pod");
        let phase = mesh.finished(&name).expect("the probe ends");
        let out = mesh.kubelets[0].logs(NS, &name, "client");
        if done(&phase, &out) {
            return out;
        }
        last = (phase, out);
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{prefix}: never as expected; last: {last:?}");
}

/// The output of container `container` of the pod whose name starts with `prefix`.
fn pod_logs(mesh: &KubeMesh, prefix: &str, container: &str) -> Vec<String> {
    mesh.kubelets
        .iter()
        .flat_map(|k| {
            k.pods()
                .into_iter()
                .filter(|p| p.namespace == NS && p.name.starts_with(prefix))
                .flat_map(|p| k.logs(NS, &p.name, container))
        })
        .collect()
}

/// How many requests the echo pods starting with `prefix` served for paths starting with
/// `path`, once that count holds still.
fn served(mesh: &KubeMesh, prefix: &str, path: &str) -> usize {
    let count = || {
        pod_logs(mesh, prefix, "echo")
            .iter()
            .filter(|l| {
                l.split_whitespace()
                    .nth(3)
                    .is_some_and(|p| p.starts_with(path))
            })
            .count()
    };
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A `Deployment` `name` running `mesh-probe` with `args`, ready once it listens on `port`.
fn workload_deployment(mesh: &KubeMesh, name: &str, args: &[&str], port: u16) {
    deployment_in(mesh, NS, name, args, port);
}

/// [`workload_deployment`] in namespace `namespace`.
fn deployment_in(mesh: &KubeMesh, namespace: &str, name: &str, args: &[&str], port: u16) {
    let deployments: Api<Deployment> = Api::namespaced(mesh.cp.client(), namespace);
    let deployment: Deployment = from_json(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
          "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"containers": [{
                "name": "echo", "image": "mesh-probe", "args": args,
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
            }]},
          }},
    }));
    create(mesh, &deployments, &deployment, name);
}

/// The `Service` `name` (bound to the waypoint `wp`) of port `port`; returns its VIP.
fn workload_service(mesh: &KubeMesh, name: &str, port: u16, app_protocol: Option<&str>) -> String {
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), NS);
    let mut port_spec = json!({"name": "main", "port": port, "targetPort": port});
    if let Some(protocol) = app_protocol {
        port_spec["appProtocol"] = json!(protocol);
    }
    let svc: Service = from_json(json!({
        "metadata": {"name": name, "namespace": NS, "labels": {"istio.io/use-waypoint": "wp"}},
        "spec": {"selector": {"app": name}, "ports": [port_spec]},
    }));
    create(mesh, &services, &svc, name);
    mesh.cp
        .block_on(services.get(name))
        .expect("the Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("its VIP")
}

/// Retries by a `VirtualService` (`HTTPRoute`'s `retry` is not in the standard channel whose
/// CRDs the cluster runs): `flaky` fails its first 4 requests; 2 retries on 5xx give a 503
/// after exactly 3 attempts, then a 200 on the next request's second attempt. Then the same
/// Service with an injected delay of 600 ms.
fn retries_and_delay_from_the_api(mesh: &KubeMesh) {
    let vs = |spec: Value| -> DynamicObject {
        from_json(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "flaky", "namespace": NS},
            "spec": spec,
        }))
    };
    // A header-matched abort in the same object tells when the waypoint has it, before any
    // request can reach (and use up a failure of) the backend: it does not run yet.
    let probe_rule = json!({"match": [{"headers": {"x-probe": {"exact": "1"}}}],
                            "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                            "route": [{"destination": {"host": "flaky"}}]});
    create(
        mesh,
        &virtual_services(mesh),
        &vs(json!({"hosts": ["flaky"], "http": [probe_rule, {
            "route": [{"destination": {"host": "flaky"}}],
            "retries": {"attempts": 2, "retryOn": "5xx", "perTryTimeout": "2s"},
        }]})),
        "the retrying VirtualService",
    );
    let vip = workload_service(mesh, "flaky", 8080, Some("http"));
    let status = |path: &str, header: &str| {
        format!("curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 {header} http://{vip}:8080{path}")
    };
    until_seen(
        mesh,
        0,
        "vs-in",
        &status("/probe", "-H 'x-probe: 1'"),
        |seen| seen == ["418"],
    );
    let flaky = [
        "http-echo",
        "$(POD_IP):8080",
        "--name",
        "flaky",
        "--fail-first",
        "4",
    ];
    workload_deployment(mesh, "flaky", &flaky, 8080);
    // One request at a time, each with the attempts it made (what the backend served): until
    // the endpoint is known none reach it; then a 503 after 3, then a 200 after 2.
    let mut attempts = Vec::new();
    let mut before = 0;
    for i in 0..30 {
        let seen = until_seen(mesh, 0, &format!("retry-{i}"), &status("/retry", ""), |s| {
            s.len() == 1
        });
        let after = served(mesh, "flaky", "/");
        attempts.push((seen[0].clone(), after - before));
        before = after;
        if seen[0] == "200" {
            break;
        }
    }
    let reached: Vec<_> = attempts.iter().filter(|(_, n)| *n > 0).cloned().collect();
    eprintln!("retries on Kubernetes (status, attempts): {attempts:?}");
    assert_eq!(
        reached,
        [("503".to_owned(), 3), ("200".to_owned(), 2)],
        "a 503 at the attempt limit, then a retried 200: {attempts:?}"
    );
    let delayed = vs(json!({"hosts": ["flaky"], "http": [{
        "route": [{"destination": {"host": "flaky"}}],
        "fault": {"delay": {"fixedDelay": "600ms", "percentage": {"value": 100}}},
    }]}));
    let patch = serde_json::to_value(&delayed).expect("JSON");
    mesh.cp
        .block_on(virtual_services(mesh).patch(
            "flaky",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": patch["spec"]})),
        ))
        .expect("VirtualService patched");
    let timed = format!(
        "curl -s -o /dev/null -w '%{{http_code}} %{{time_total}}\\n' --max-time 10 http://{vip}:8080/delay"
    );
    let seen = until_seen(mesh, 0, "delay", &timed, |seen| {
        seen.len() == 1
            && seen[0].starts_with("200 ")
            && seen[0][4..].parse::<f64>().is_ok_and(|t| t >= 0.6)
    });
    eprintln!("delay fault on Kubernetes: {seen:?}");
}

/// `web`'s route mirrors to `web-v2`: the answer is v1's, and v2 sees the request too.
fn mirror_from_the_api(mesh: &KubeMesh, vip: &str) {
    patch_rules(
        mesh,
        &json!([
            // Tells when the waypoint has this route.
            {"matches": [{"path": {"type": "PathPrefix", "value": "/probe-mirror"}}],
             "backendRefs": [{"name": "web-v2", "port": 80}]},
            {"backendRefs": [{"name": "web-v1", "port": 80}],
             "filters": [{"type": "RequestMirror", "requestMirror": {
                 "backendRef": {"name": "web-v2", "port": 80}}}]},
        ]),
    );
    let probe = format!("curl -sS --max-time 10 http://{vip}/probe-mirror -w '\\n'");
    until_seen(mesh, 0, "mirror-in", &probe, |seen| seen == ["v2"]);
    let script = format!("curl -sS --max-time 10 http://{vip}/mirror -w '\\n'");
    let seen = until_seen(mesh, 0, "mirror", &script, |seen| seen.len() == 1);
    assert_eq!(seen, ["v1"], "the answer is the backend's");
    assert!(
        served(mesh, "echo-v2", "/mirror") >= 1,
        "v2 saw the mirrored request"
    );
}

/// A route of `web` sending `/other` to a Service of namespace `backend`: a 500 until that
/// namespace's `ReferenceGrant` lets `shop`'s `HTTPRoutes` refer to it, then its answer.
fn reference_grant_from_the_api(mesh: &KubeMesh, vip: &str) {
    let namespaces: Api<Namespace> = Api::all(mesh.cp.client());
    let ns: Namespace = from_json(json!({"metadata": {"name": "backend"}}));
    create(mesh, &namespaces, &ns, "namespace backend");
    let echo = ["http-echo", "$(POD_IP):8080", "--name", "other"];
    deployment_in(mesh, "backend", "other", &echo, 8080);
    let services: Api<Service> = Api::namespaced(mesh.cp.client(), "backend");
    let svc: Service = from_json(json!({
        "metadata": {"name": "other", "namespace": "backend"},
        "spec": {"selector": {"app": "other"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }));
    create(mesh, &services, &svc, "backend/other");
    patch_rules(
        mesh,
        &json!([
            {"matches": [{"path": {"type": "PathPrefix", "value": "/other"}}],
             "backendRefs": [{"name": "other", "namespace": "backend", "port": 80}]},
            {"backendRefs": [{"name": "web-v1", "port": 80}]},
        ]),
    );
    let status =
        format!("curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 10 http://{vip}/other");
    until_seen(mesh, 0, "ungranted", &status, |seen| seen == ["500"]);
    let grants = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1beta1", "ReferenceGrant"),
        "referencegrants",
    );
    let grants: Api<DynamicObject> = Api::namespaced_with(mesh.cp.client(), "backend", &grants);
    let grant: DynamicObject = from_json(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "from-shop", "namespace": "backend"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": NS}],
                 "to": [{"group": "", "kind": "Service", "name": "other"}]},
    }));
    create(mesh, &grants, &grant, "the ReferenceGrant");
    let body = format!("curl -sS --max-time 10 http://{vip}/other -w '\\n'");
    until_seen(mesh, 0, "granted", &body, |seen| seen == ["other"]);
}

/// WebSocket, h2 multiplexing (h2load: 200 requests, 50 streams at a time on one h2c
/// connection) and gRPC unary and server-streaming calls (a tonic client), through the
/// waypoint.
fn protocols_through_the_waypoint(mesh: &KubeMesh, vip: &str) {
    let ws = probe(
        mesh,
        "ws",
        0,
        &["ws", &format!("{vip}:80"), "hello", "--count", "3"],
    );
    eprintln!("WebSocket on Kubernetes: {ws:?}");
    let script = format!("h2load -n 200 -c 1 -m 50 http://{vip}/mux");
    client(mesh, "h2", "n1", &script);
    let phase = mesh.finished("h2").expect("h2load ends");
    let out = mesh.kubelets[1].logs(NS, "h2", "client").join("\n");
    assert_eq!(phase, "Succeeded", "{out}");
    assert!(
        out.contains("200 succeeded") && out.contains("Application protocol: h2c"),
        "{out}"
    );
    // Before the server runs, the waypoint's own answer is a gRPC status, UNAVAILABLE.
    let grpc_vip = workload_service(mesh, "grpc", 7070, Some("kubernetes.io/h2c"));
    let target = format!("{grpc_vip}:7070");
    let unary = ["grpc", target.as_str(), "--service", "grpc", "--count", "5"];
    let unavailable = probe_until(mesh, "grpc-none", &unary, |phase, out| {
        phase == "Failed" && out.iter().any(|l| l.contains("no ready endpoint"))
    });
    assert!(
        unavailable
            .iter()
            .any(|l| l.contains("currently unavailable")),
        "UNAVAILABLE: {unavailable:?}"
    );
    workload_deployment(
        mesh,
        "grpc",
        &["grpc-serve", "$(POD_IP):7070", "--name", "grpc"],
        7070,
    );
    probe_until(mesh, "grpc-unary", &unary, |phase, out| {
        phase == "Succeeded"
            && out
                .iter()
                .any(|l| l.contains("grpc ok serving=5 not_found=0"))
    });
    let watch = probe(
        mesh,
        "grpc-watch",
        1,
        &["grpc", &target, "--service", "grpc", "--watch"],
    );
    assert!(
        watch.iter().any(|l| l.contains("watch status=SERVING")),
        "{watch:?}"
    );
}

/// Skipping the waypoint is refused: `web-v1`'s pods serve `web`, bound to `wp`, so their
/// agent refuses connections by `web-v1`'s own address or the pod's.
fn bypass_refused(mesh: &KubeMesh) {
    let v1_vip = vip(mesh, "web-v1");
    let selector = ListParams::default().labels("app=web,version=v1");
    let v1_pod = mesh
        .cp
        .block_on(mesh.pods().list(&selector))
        .expect("pods")
        .items[0]
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("v1's address");
    for (name, target) in [
        ("past-vip", format!("{v1_vip}:80")),
        ("past-pod", format!("{v1_pod}:8080")),
    ] {
        client(
            mesh,
            name,
            "n0",
            &format!("curl -sS --max-time 5 http://{target}/bypass && exit 1 || exit 0"),
        );
        assert_eq!(
            mesh.finished(name).expect("ends"),
            "Succeeded",
            "{name}: refused"
        );
    }
}

/// The waypoint pod deleted under load (50 requests/s for 18 s from a client pod): its
/// Deployment starts another; counted are the answers and failures.
fn restart_under_load(mesh: &KubeMesh, vip: &str) {
    let (codes, ok) = under_load(mesh, vip, "load", |mesh| {
        let selector = ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"));
        mesh.cp
            .block_on(
                mesh.pods()
                    .delete_collection(&DeleteParams::default(), &selector),
            )
            .expect("the waypoint pod deleted");
    });
    // The old pod serves on for its drain delay (5 s) while the new one starts: at most 1 %
    // fails (before the delay and the serving-terminating fallback, 5-6 did; the new pod is
    // ready here well within the delay).
    assert!(ok >= 891, "{ok} of 900 answered");
    assert!(
        codes[800..].iter().all(|c| c.trim() == "200"),
        "the new waypoint answers: {:?}",
        &codes[800..]
    );
}

/// 900 requests at 50/s from a client pod `name` on n0, each answered or failed on its own,
/// with `during` done 3 s into them; the status codes, and how many were 200.
fn under_load(
    mesh: &KubeMesh,
    vip: &str,
    name: &str,
    during: impl FnOnce(&KubeMesh),
) -> (Vec<String>, usize) {
    // `-o` applies to one URL: each gets its own, so no body (a local 503's has no newline)
    // runs into the next status code.
    let urls: Vec<String> = (0..900)
        .map(|i| format!("-o /dev/null http://{vip}/load/{i}"))
        .collect();
    let script = format!(
        "curl -s --max-time 5 --rate 50/s -w '%{{http_code}}\\n' {}",
        urls.join(" ")
    );
    client(mesh, name, "n0", &script);
    std::thread::sleep(Duration::from_secs(3));
    during(mesh);
    let phase = mesh
        .cp
        .block_on(eventually("the load to end", WAIT, || async {
            let phase = mesh.pods().get(name).await.ok()?.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        }));
    let (codes, other): (Vec<String>, Vec<String>) = mesh.kubelets[0]
        .logs(NS, name, "client")
        .into_iter()
        .partition(|l| l.trim().len() == 3);
    let ok = codes.iter().filter(|c| c.trim() == "200").count();
    eprintln!(
        "{name} on Kubernetes: {ok} of {} answered, {} failed ({phase:?})",
        codes.len(),
        codes.len() - ok
    );
    assert_eq!(
        codes.len(),
        900,
        "one code per request; the client's other lines: {other:?}"
    );
    (codes, ok)
}

/// The waypoint scaled to two (as its user would, for a rollout without a gap) and one of its
/// pods deleted under load: the other takes every new connection at once (a pod being deleted
/// is no longer a ready waypoint pod to the agents), the deleted one finishes what it has.
/// Before, a pod being deleted stayed ready to the agents until its readiness probe failed.
fn one_of_two_replaced_under_load(mesh: &KubeMesh, vip: &str) {
    scale_waypoint(mesh, 2);
    waypoint_pods_ready(mesh, 2, &[]);
    let (_, ok) = under_load(mesh, vip, "rollout", |mesh| {
        let selector = ListParams::default().labels(&format!("{GATEWAY_NAME}=wp"));
        let pods = mesh
            .cp
            .block_on(mesh.pods().list(&selector))
            .expect("waypoint pods");
        let first = pod_names(&pods.items).remove(0);
        mesh.cp
            .block_on(mesh.pods().delete(&first, &DeleteParams::default()))
            .expect("one waypoint pod deleted");
    });
    assert_eq!(ok, 900, "every request answered while one of two went");
    scale_waypoint(mesh, 1);
    waypoint_pods_ready(mesh, 1, &[]);
}

/// The rest of the L7 scenarios on the real control plane, from the objects as the API
/// server stores them: retries and an injected delay (`VirtualService`), mirroring
/// (`HTTPRoute`), WebSocket, h2 multiplexing, gRPC unary and streaming, bypass refused, and
/// the waypoint's pod replaced under load.
#[test]
fn retries_delay_mirror_protocols_bypass_and_restart_from_the_api() {
    let (_serial, mesh, vip) = deployed();
    retries_and_delay_from_the_api(&mesh);
    mirror_from_the_api(&mesh, &vip);
    reference_grant_from_the_api(&mesh, &vip);
    protocols_through_the_waypoint(&mesh, &vip);
    bypass_refused(&mesh);
    one_of_two_replaced_under_load(&mesh, &vip);
    restart_under_load(&mesh, &vip);
}
