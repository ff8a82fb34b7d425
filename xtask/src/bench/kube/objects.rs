//! The bench's generated cluster objects (apps, pods, statuses, policies) and its API writes.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result};
use futures_util::{stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod, Service, ServiceAccount};
use kube::{
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    },
    Api, Client,
};
use serde_json::{json, Value};

use super::{NAMESPACES, PODS_PER_APP};

/// How often the simulated nodes' heartbeat is written (the node lifecycle controller's grace
/// period is 50 s; without it, it would mark every pod not ready and churn all of them).
const HEARTBEAT: Duration = Duration::from_secs(15);
/// The characters of the random suffix of a pod's name (as Kubernetes' `rand.String`).
const ALNUM: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
/// Kinds of app, for realistic names and images.
const APP_KINDS: [&str; 8] = [
    "checkout", "cart", "catalog", "payments", "shipping", "search", "reviews", "frontend",
];

/// Retries a request that failed for a reason a busy API server gives (429, 5xx, a timeout
/// or a broken connection) up to three times.
pub(super) async fn retry<T, F, Fut>(mut request: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match request().await {
            Err(kube::Error::Api(s)) if attempt < 3 && (s.code == 429 || s.code >= 500) => {}
            Err(kube::Error::HyperError(_) | kube::Error::Service(_)) if attempt < 3 => {}
            other => return other,
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
    }
}

/// Creates a pod and writes its status (the API server resets the status on create).
/// Returns its UID.
pub(super) async fn create_running_pod(
    admin: &Client,
    pod: &Value,
    status: &Value,
) -> Result<String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let typed: Pod = serde_json::from_value(pod.clone())?;
    let (pp, patch_params) = (PostParams::default(), PatchParams::default());
    let created = retry(|| api.create(&pp, &typed))
        .await
        .with_context(|| format!("creating pod {ns}/{name}"))?;
    let patch = Patch::Merge(json!({ "status": status }));
    retry(|| api.patch_status(name, &patch_params, &patch))
        .await
        .with_context(|| format!("writing the status of pod {ns}/{name}"))?;
    created.metadata.uid.context("a created pod has a UID")
}

/// An app's service account and Service.
pub(super) async fn app_objects(admin: &Client, a: usize) -> Result<()> {
    let (ns, app) = (namespace_name(a % NAMESPACES), app_name(a));
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {
        "name": app, "namespace": ns, "labels": {"app": app}
    }}))?;
    let pp = PostParams::default();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    retry(|| accounts.create(&pp, &sa))
        .await
        .with_context(|| format!("creating service account {ns}/{app}"))?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": app, "namespace": ns,
                     "labels": {"app": app, "app.kubernetes.io/part-of": "shop"}},
        "spec": {"selector": {"app": app},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                           {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]}
    }))?;
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    retry(|| services.create(&pp, &svc))
        .await
        .with_context(|| format!("creating service {ns}/{app}"))?;
    Ok(())
}

pub(super) fn namespace_name(n: usize) -> String {
    format!("bench-{n:02}")
}

fn app_name(a: usize) -> String {
    format!("{}-{a:03}", APP_KINDS[a % APP_KINDS.len()])
}

/// A deterministic 64-bit mix (`SplitMix64`), for hashes and ids that look random.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pod `i`'s namespace and name: `<app>-<pod-template-hash>-<5 characters>`, as a
/// Deployment's `ReplicaSet` names them.
pub(super) fn pod_name(i: usize) -> (String, String) {
    let a = i / PODS_PER_APP;
    let suffix: String = (0..5)
        .map(|k| {
            char::from(ALNUM[usize::from(mix(i as u64 * 8 + k).to_le_bytes()[0]) % ALNUM.len()])
        })
        .collect();
    (
        namespace_name(a % NAMESPACES),
        format!("{}-{}-{suffix}", app_name(a), template_hash(a)),
    )
}

fn template_hash(a: usize) -> String {
    format!("{:010x}", mix(a as u64) & 0xff_ffff_ffff)
}

/// Pod `i`'s address: 10.64.0.0/10 (neither the testbed's 198.18.0.0/15 nor the Service range).
pub(super) fn pod_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i).unwrap_or(0) + 256;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + n)
}

/// Address of capture pod `i` (only inside its own namespace).
pub(super) fn capture_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i).unwrap_or(0) + 1;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + n)
}

/// Pod `i` as its Deployment's `ReplicaSet` would create it: labels, a few annotations (every
/// fifth app also `kubectl.kubernetes.io/last-applied-configuration`, about 2 KB), an app
/// container with arguments, environment, ports, resources, probes, volume mounts and a
/// security context, and on every third app a log-shipping sidecar. (No `ownerReferences`:
/// the garbage collector would delete pods whose owner does not exist.)
pub(super) fn bench_pod(i: usize, node: &str) -> Value {
    let a = i / PODS_PER_APP;
    let (ns, name) = pod_name(i);
    let app = app_name(a);
    let kind = APP_KINDS[a % APP_KINDS.len()];
    let hash = template_hash(a);
    let image = format!("registry.example.com/shop/{kind}:1.{}.{}", a % 20, a % 7);
    let labels = json!({
        "app": app, "version": "v1", "pod-template-hash": hash,
        "app.kubernetes.io/name": kind, "app.kubernetes.io/instance": app,
        "app.kubernetes.io/part-of": "shop", "app.kubernetes.io/version": format!("1.{}.{}", a % 20, a % 7),
        "team": format!("team-{}", a % 7),
    });
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let mut containers = vec![json!({
        "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
        "args": ["--port=8080", "--metrics-port=9090", "--log-level=info", "--config=/etc/app/config.yaml"],
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "env": [
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "POD_IP", "valueFrom": field("status.podIP")},
            {"name": "LOG_FORMAT", "value": "json"},
            {"name": "DATABASE_URL", "value": format!("postgres://{kind}@db.{ns}.svc.cluster.local:5432/{kind}")},
            {"name": "CACHE_TTL_SECONDS", "value": "300"},
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability.svc:4317"},
            {"name": "GOMAXPROCS", "valueFrom": {"resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1"}}},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "500m", "memory": "512Mi"}},
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
                           "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                          "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 1},
        "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
    })];
    if a.is_multiple_of(3) {
        containers.push(json!({
            "name": "log-shipper", "image": "registry.example.com/infra/fluent-bit:3.1.4",
            "args": ["--config=/fluent-bit/etc/fluent-bit.yaml"],
            "resources": {"requests": {"cpu": "20m", "memory": "32Mi"},
                          "limits": {"cpu": "100m", "memory": "64Mi"}},
            "volumeMounts": [{"name": "tmp", "mountPath": "/var/log/app", "readOnly": true}],
        }));
    }
    let spec = json!({
        "nodeName": node, "serviceAccountName": app,
        "containers": containers,
        "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
                    {"name": "tmp", "emptyDir": {}}],
        "terminationGracePeriodSeconds": 30,
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app": app}}}],
    });
    let mut annotations = json!({
        "prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics",
        "kubectl.kubernetes.io/restartedAt": "2026-11-02T09:14:31Z",
    });
    if a.is_multiple_of(5) {
        let applied = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
                         "labels": labels, "name": app, "namespace": ns},
            "spec": {"containers": spec["containers"], "volumes": spec["volumes"],
                     "serviceAccountName": app},
        });
        annotations["kubectl.kubernetes.io/last-applied-configuration"] =
            Value::from(format!("{applied}\n"));
    }
    json!({
        "metadata": {"name": name, "namespace": ns, "generateName": format!("{app}-{hash}-"),
                     "labels": labels, "annotations": annotations},
        "spec": spec,
    })
}

/// Pod `i`'s status as its kubelet writes it: running (or not ready), its addresses, the five
/// conditions and each container's status.
pub(super) fn status(i: usize, node_ip: Ipv4Addr, ready: bool, restarts: u32) -> Value {
    let a = i / PODS_PER_APP;
    let kind = APP_KINDS[a % APP_KINDS.len()];
    let started = "2026-12-01T08:00:00Z";
    let now = mesh_tests::kube::now();
    let (ip, host) = (pod_ip(i).to_string(), node_ip.to_string());
    let ready_s = if ready { "True" } else { "False" };
    let transition = if restarts == 0 && ready {
        started
    } else {
        now.as_str()
    };
    let condition = |t: &str, s: &str, at: &str| json!({"type": t, "status": s, "lastProbeTime": null, "lastTransitionTime": at});
    let id = |k: u64| {
        format!(
            "{:016x}{:016x}{:016x}{:016x}",
            mix(k),
            mix(k + 1),
            mix(k + 2),
            mix(k + 3)
        )
    };
    let mut containers = vec![json!({
        "name": "app", "ready": ready, "started": true, "restartCount": restarts,
        "image": format!("registry.example.com/shop/{kind}:1.{}.{}", a % 20, a % 7),
        "imageID": format!("registry.example.com/shop/{kind}@sha256:{}", id(a as u64 * 4)),
        "containerID": format!("containerd://{}", id(i as u64 * 16 + u64::from(restarts))),
        "state": {"running": {"startedAt": if restarts == 0 { started } else { now.as_str() }}},
    })];
    if restarts > 0 {
        containers[0]["lastState"] = json!({"terminated": {"exitCode": 137, "reason": "Error",
            "startedAt": started, "finishedAt": now, "containerID": format!("containerd://{}", id(i as u64 * 16))}});
    }
    if a.is_multiple_of(3) {
        containers.push(json!({
            "name": "log-shipper", "ready": true, "started": true, "restartCount": 0,
            "image": "registry.example.com/infra/fluent-bit:3.1.4",
            "imageID": format!("registry.example.com/infra/fluent-bit@sha256:{}", id(7)),
            "containerID": format!("containerd://{}", id(i as u64 * 16 + 8)),
            "state": {"running": {"startedAt": started}},
        }));
    }
    json!({
        "phase": "Running", "hostIP": host, "hostIPs": [{"ip": host}],
        "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
        "conditions": [
            condition("PodReadyToStartContainers", "True", started),
            condition("Initialized", "True", started),
            condition("Ready", ready_s, transition),
            condition("ContainersReady", ready_s, transition),
            condition("PodScheduled", "True", started),
        ],
        "containerStatuses": containers,
    })
}

/// The churn's `k`-th change: which pod, whether it is now ready, and its restarts. Each pod
/// changed goes not ready, then ready again with one more restart.
pub(super) fn churn_step(k: usize, pods: usize) -> (usize, bool, u32) {
    let pod = (k / 2).wrapping_mul(7_919) % pods.max(1);
    let ready = k % 2 == 1;
    (pod, ready, u32::from(ready))
}

/// The policy change number `step`: created, changed, deleted, in turn.
pub(super) async fn policy_change(admin: &Client, step: u32) -> Result<()> {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
    let ns = namespace_name(0);
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &resource);
    let name = "bench-churn";
    let policy = |principal: &str| -> Result<DynamicObject> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": app_name(0)}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": [principal]}}],
                                "to": [{"operation": {"ports": ["8080"]}}]}]}
        }))?)
    };
    match step % 3 {
        0 => drop(
            api.create(
                &PostParams::default(),
                &policy("cluster.local/ns/bench-01/sa/cart-001")?,
            )
            .await?,
        ),
        1 => {
            let patch = json!({"spec": {"rules": [{"from": [{"source": {"principals":
                ["cluster.local/ns/bench-01/sa/cart-001", "cluster.local/ns/bench-02/sa/catalog-002"]}}],
                "to": [{"operation": {"ports": ["8080"]}}]}]}});
            drop(
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?,
            );
        }
        _ => drop(api.delete(name, &DeleteParams::default()).await?),
    }
    Ok(())
}

/// A pod's JSON cut to what `mesh-cluster/src/kube_source/strip.rs` keeps (an estimate of what
/// the agent holds, before its own model).
pub(super) fn trimmed(pod: &Value) -> Value {
    let m = &pod["metadata"];
    let keep = [
        "mesh.local/netns",
        "mesh.local/cgroup",
        "mesh.local/sockmap-shortcut",
    ];
    let annotations: serde_json::Map<String, Value> = m["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let containers: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!({"name": c["name"], "ports": c["ports"]}))
        .collect();
    let ready: Vec<Value> = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"] == "Ready")
        .map(|c| json!({"type": c["type"], "status": c["status"]}))
        .collect();
    json!({
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "labels": m["labels"], "annotations": annotations,
                     "creationTimestamp": m["creationTimestamp"]},
        "spec": {"nodeName": pod["spec"]["nodeName"], "serviceAccountName": pod["spec"]["serviceAccountName"],
                 "containers": containers},
        "status": {"phase": pod["status"]["phase"], "podIP": pod["status"]["podIP"],
                   "podIPs": pod["status"]["podIPs"], "conditions": ready},
    })
}

/// Keeps every node's `Ready` heartbeat fresh, as a kubelet does.
pub(super) async fn heartbeat(admin: Client, nodes: Vec<(String, Ipv4Addr)>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let now = mesh_tests::kube::now();
        let api: Api<KubeNode> = Api::all(admin.clone());
        stream::iter(nodes.clone().into_iter().map(|(name, _)| {
            let api = api.clone();
            let patch = json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }]}});
            async move {
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
        }))
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    }
}
