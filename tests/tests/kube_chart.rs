//! The Helm chart (`deploy/chart`), with Helm built from its module at the pinned release
//! (`tests/helm`, by `cargo xtask setup`): `helm lint --strict`; `helm template` renders the
//! node agent with the least privileges it needs (each capability with its reason in the
//! template, never `privileged`), the host mounts, scheduling on every node, and the CNI
//! installer; the CA as its own Deployment (non-root, no capability, read-only root, its state
//! in memory, TCP readiness, a Service, a disruption budget, its least RBAC), the agents calling
//! it with a projected token and trusting the root it publishes, or calling istiod instead
//! (`ca.external.*`); every rendered object passes the real API server's server-side dry run
//! with strict field validation (and a misspelt field does not).

use std::process::Command;

use kube::{
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    discovery::{pinned_kind, Scope},
    Api,
};
use mesh_tests::kube::{chart_dir, helm_binary, ControlPlane, AGENT_NAMESPACE, RELEASE};
use serde_json::{json, Value};

/// `helm <args>`; its stdout, or the failure with its stderr.
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm_binary().expect("helm (cargo xtask setup builds it)"))
        .args(args)
        .output()
        .expect("running helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The chart's objects as `helm template` renders them with `extra` arguments.
fn render(extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    let mut args = vec!["template", RELEASE, chart, "--namespace", AGENT_NAMESPACE];
    args.extend_from_slice(extra);
    let text = helm(&args).expect("helm template");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

fn container<'a>(daemonset: &'a Value, name: &str) -> &'a Value {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string"))
        .collect()
}

/// Never privileged: every capability dropped but those the agent needs, each with its
/// one-line reason just above it in the template.
fn assert_least_privileges(agent: &Value) {
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let added: Vec<&str> = security["capabilities"]["add"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| c.as_str().expect("string"))
        .collect();
    assert_eq!(
        added,
        [
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]
    );
    // Each capability has its one-line reason just above it in the template.
    let template =
        std::fs::read_to_string(chart_dir().join("templates/daemonset.yaml")).expect("template");
    let lines: Vec<&str> = template.lines().collect();
    for capability in &added {
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("- {capability}"))
            .expect("capability in the template");
        assert!(
            lines[at - 1].trim().starts_with('#'),
            "{capability} has no reason above it"
        );
    }
}

#[test]
fn the_chart_lints_strictly_and_renders_the_agent_with_its_least_privileges() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    helm(&["lint", "--strict", chart]).expect("helm lint --strict");
    helm(&["lint", "--strict", chart, "--set", "sockmap=false"]).expect("lint, sockmap off");

    let objects = render(&[]);
    let mut kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
            "ServiceAccount"
        ]
    );
    let ds = one(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "mesh-agent");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        json!([{"operator": "Exists"}]),
        "every taint"
    );
    assert_eq!(
        (&pod["hostNetwork"], &pod["hostPID"]),
        (&json!(true), &json!(true))
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );

    let agent = container(ds, "agent");
    assert_least_privileges(agent);
    assert!(args(agent).contains(&"--node-name=$(NODE_NAME)"));
    assert!(
        !args(agent).contains(&"--no-sockmap"),
        "sockmap on by default"
    );
    assert!(
        !args(agent).contains(&"--kernel-direct"),
        "kernel-direct off by default"
    );
    let mounts: Vec<&str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        mounts,
        [
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/var/run/mesh",
            "/etc/cni/net.d",
            "/opt/cni/bin"
        ]
    );

    let installer = container(ds, "install-cni");
    assert_eq!(
        installer["securityContext"]["capabilities"],
        json!({"drop": ["ALL"]})
    );
    assert!(args(installer).contains(&"--watch-ms=1000"));
    assert!(args(installer).contains(&"--socket=/var/run/mesh/cni.sock"));
}

#[test]
fn values_reach_the_agent() {
    let objects = render(&[
        "--set",
        "sockmap=false",
        "--set",
        "trustDomain=example.org",
        "--set",
        "logLevel=debug",
        "--set",
        "kernelDirect=true",
    ]);
    let agent = container(one(&objects, "DaemonSet"), "agent");
    assert!(args(agent).contains(&"--no-sockmap"));
    assert!(args(agent).contains(&"--kernel-direct"));
    assert!(args(agent).contains(&"--trust-domain=example.org"));
    let log = agent["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "RUST_LOG")
        .expect("RUST_LOG");
    assert_eq!(log["value"], "debug");
}

/// The not-ready taint: the installer lifts the configured key from its own node (and the agent's
/// RBAC may patch nodes for it); disabled, neither the flag nor the rule is there. Both the
/// agent and the installer know their `DaemonSet` (an uninstall tells itself from a restart by it),
/// and the CA tolerates the taint (the agents need it before any node is ready).
#[test]
fn the_not_ready_taint_and_the_owner_reach_the_installer() {
    let objects = render(&["--set", "notReadyTaint.key=example.com/not-meshed"]);
    let daemonset = one(&objects, "DaemonSet");
    let installer = args(container(daemonset, "install-cni"));
    assert!(installer.contains(&"--not-ready-taint=example.com/not-meshed"));
    assert!(installer.contains(&"--node-name=$(NODE_NAME)"));
    for name in ["agent", "install-cni"] {
        assert!(
            args(container(daemonset, name)).contains(&"--owner-daemonset=mesh-system/mesh-agent"),
            "{name}"
        );
    }
    let node_rule = |objects: &[Value]| {
        named(objects, "ClusterRole", "mesh-agent")["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .any(|r| r["resources"] == json!(["nodes"]) && r["verbs"] == json!(["get", "patch"]))
    };
    assert!(node_rule(&objects));
    let ca = named(&objects, "Deployment", "mesh-ca");
    assert_eq!(
        ca["spec"]["template"]["spec"]["tolerations"],
        json!([{"key": "example.com/not-meshed", "operator": "Exists", "effect": "NoSchedule"}])
    );

    let objects = render(&["--set", "notReadyTaint.enabled=false"]);
    let installer = args(container(one(&objects, "DaemonSet"), "install-cni"));
    assert!(!installer.iter().any(|a| a.starts_with("--not-ready-taint")));
    assert!(!node_rule(&objects));
}

#[test]
fn every_rendered_object_passes_the_api_servers_strict_server_side_dry_run() {
    let cp = ControlPlane::start().expect("control plane");
    let client = cp.client();
    let namespace: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": AGENT_NAMESPACE}})).expect("namespace");
    cp.block_on(Api::all(client.clone()).create(&PostParams::default(), &namespace))
        .expect("namespace");
    let dry_run = |object: &Value| {
        let gvk = {
            let (group, version) = match object["apiVersion"]
                .as_str()
                .expect("apiVersion")
                .split_once('/')
            {
                Some((group, version)) => (group, version),
                None => ("", object["apiVersion"].as_str().expect("apiVersion")),
            };
            GroupVersionKind::gvk(group, version, object["kind"].as_str().expect("kind"))
        };
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("object");
        cp.block_on(async {
            let (resource, caps) = pinned_kind(&client, &gvk).await.expect("served kind");
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Namespaced => {
                    Api::namespaced_with(client.clone(), AGENT_NAMESPACE, &resource)
                }
                Scope::Cluster => Api::all_with(client.clone(), &resource),
            };
            let params = PatchParams::apply("mesh-chart-test")
                .dry_run()
                .validation_strict();
            api.patch(&name, &params, &Patch::Apply(&dynamic)).await
        })
    };
    let external = [
        "--set",
        "ca.external.address=https://istiod.istio-system.svc:15012",
        "--set",
        "ca.external.rootConfigMap=istio-ca-root-cert",
    ];
    for values in [&[][..], &["--set", "sockmap=false"][..], &external[..]] {
        for object in render(values) {
            let what = format!("{} {}", object["kind"], object["metadata"]["name"]);
            if let Err(e) = dry_run(&object) {
                panic!("{what}: refused by the API server's dry run: {e}");
            }
        }
    }
    // Not vacuous: a misspelt field is refused.
    let mut daemonset = one(&render(&[]), "DaemonSet").clone();
    daemonset["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    match dry_run(&daemonset) {
        Err(kube::Error::Api(status)) => {
            assert!(status.message.contains("hostNetwrok"), "{status:?}");
        }
        other => panic!("a misspelt field must be refused: {other:?}"),
    }
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name}"))
}

fn volume<'a>(daemonset: &'a Value, name: &str) -> &'a Value {
    daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("volume {name}"))
}

/// The CA: its own Deployment (non-root, no capability, read-only root, the state in memory),
/// ready once it listens, behind a Service, kept by a disruption budget, with its least RBAC;
/// the agents call it with a projected token and trust the root it publishes.
#[test]
fn the_ca_renders_as_its_own_least_privileged_deployment_and_the_agents_use_it() {
    let objects = render(&[]);
    let deployment = named(&objects, "Deployment", "mesh-ca");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "mesh-ca");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let ca = container(deployment, "ca");
    let ca_args = args(ca);
    assert_eq!(ca_args[0], "ca");
    for arg in [
        "--impersonator=mesh-system/mesh-agent",
        "--audience=istio-ca",
        "--max-cert-lifetime=24h",
        "--root-secret=mesh-ca-root",
        "--bundle-configmap=mesh-ca-root-cert",
        "--service-name=mesh-ca",
        "--state-dir=/var/run/mesh-ca",
    ] {
        assert!(ca_args.contains(&arg), "{arg} in {ca_args:?}");
    }
    assert_eq!(
        ca["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(ca["readinessProbe"]["tcpSocket"]["port"], 15012);
    assert_eq!(
        ca["env"][0],
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}})
    );
    assert_eq!(pod["volumes"][0]["emptyDir"]["medium"], "Memory");
    // The agents' selector does not pick the CA's pods.
    let agents = one(&objects, "DaemonSet");
    let agent_selector = &agents["spec"]["selector"]["matchLabels"];
    let ca_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_ne!(
        agent_selector["app.kubernetes.io/name"],
        ca_labels["app.kubernetes.io/name"]
    );

    let service = named(&objects, "Service", "mesh-ca");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "grpc-ca", "port": 15012, "targetPort": 15012, "appProtocol": "grpc"}])
    );
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let budget = one(&objects, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["minAvailable"], 1);

    let cluster_role = named(&objects, "ClusterRole", "mesh-ca");
    assert_eq!(
        cluster_role["rules"],
        json!([
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
        ])
    );
    let role = named(&objects, "Role", "mesh-ca");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mesh-ca-root"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mesh-ca-root-cert"], "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}
        ])
    );
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let binding = named(&objects, kind, "mesh-ca");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "mesh-ca", "namespace": AGENT_NAMESPACE}])
        );
    }

    let agent = container(agents, "agent");
    for arg in [
        "--ca-address=https://mesh-ca.mesh-system.svc:15012",
        "--ca-root-cert=/var/run/secrets/mesh-ca/root-cert.pem",
        "--ca-token-file=/var/run/secrets/tokens/istio-token",
    ] {
        assert!(args(agent).contains(&arg), "{arg}");
    }
    assert_eq!(
        volume(agents, "istio-token")["projected"]["sources"],
        json!([{"serviceAccountToken": {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}])
    );
    assert_eq!(
        volume(agents, "ca-root")["configMap"]["name"],
        "mesh-ca-root-cert"
    );
}

/// `ca.external.*`: the agents call istiod (or another CA speaking Istio's API) and trust its
/// root; no CA of the chart's is rendered. Without any CA the chart refuses to render.
#[test]
fn an_external_ca_replaces_the_charts_own() {
    let objects = render(&[
        "--set",
        "ca.external.address=https://istiod.istio-system.svc:15012",
        "--set",
        "ca.external.rootConfigMap=istio-ca-root-cert",
    ]);
    for (kind, name) in [
        ("Deployment", "mesh-ca"),
        ("Service", "mesh-ca"),
        ("PodDisruptionBudget", "mesh-ca"),
        ("ClusterRole", "mesh-ca"),
        ("Role", "mesh-ca"),
        ("ServiceAccount", "mesh-ca"),
    ] {
        assert!(
            !objects
                .iter()
                .any(|o| o["kind"] == kind && o["metadata"]["name"] == name),
            "{kind} {name} is not rendered"
        );
    }
    let agents = one(&objects, "DaemonSet");
    assert!(args(container(agents, "agent"))
        .contains(&"--ca-address=https://istiod.istio-system.svc:15012"));
    assert_eq!(
        volume(agents, "ca-root")["configMap"]["name"],
        "istio-ca-root-cert"
    );
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    let refused =
        helm(&["template", RELEASE, chart, "--set", "ca.enabled=false"]).expect_err("no CA at all");
    assert!(
        refused.contains("ca.enabled=false needs ca.external.address"),
        "{refused}"
    );
    let refused = helm(&[
        "template",
        RELEASE,
        chart,
        "--set",
        "ca.external.address=https://istiod.istio-system.svc:15012",
    ])
    .expect_err("an external CA without its root");
    assert!(
        refused.contains("ca.external.rootConfigMap is required"),
        "{refused}"
    );
}

/// The values schema (`values.schema.json`): a misspelt or mistyped value is refused by name,
/// never silently ignored.
#[test]
fn misspelt_or_mistyped_values_are_refused_by_name() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    for (value, expected) in [
        (
            "trustDomian=example.org",
            "additional properties 'trustDomian' not allowed",
        ),
        ("sockmap=maybe", "at '/sockmap': got string, want boolean"),
        (
            "cni.watchMs=10",
            "at '/cni/watchMs': minimum: got 10, want 100",
        ),
        ("logFormat=xml", "at '/logFormat'"),
        ("host.bpffs=sys/fs/bpf", "at '/host/bpffs'"),
        ("ca.replicas=0", "at '/ca/replicas'"),
        (
            "ca.external.address=http://istiod:15012",
            "at '/ca/external/address'",
        ),
        ("ca.maxCertLifetime=soon", "at '/ca/maxCertLifetime'"),
        (
            "waypointController.waypointResources.limits.memory=1GB",
            "at '/waypointController/waypointResources/limits/memory'",
        ),
    ] {
        let refused = helm(&["template", RELEASE, chart, "--set", value])
            .expect_err(&format!("{value} must be refused"));
        assert!(refused.contains(expected), "{value}: {refused}");
    }
}

/// The controller's identity (the view's), from the downward API, its token for the CA, and the
/// view's Service: headless, to the controller's pod.
fn view_wiring(objects: &[Value], deployment: &Value) {
    let pod = &deployment["spec"]["template"]["spec"];
    let controller = container(deployment, "controller");
    let env = controller["env"].as_array().expect("env");
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ] {
        let var = env.iter().find(|e| e["name"] == name).expect(name);
        assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    let token = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "istio-token")
        .expect("the CA token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    let service = named(objects, "Service", "mesh-waypoint-controller");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["ports"][0]["port"], 15012);
}

#[test]
fn the_waypoint_controller_renders_serving_the_view_and_binding_no_role() {
    let objects = render(&[]);
    let deployment = named(&objects, "Deployment", "mesh-waypoint-controller");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "mesh-waypoint-controller");
    let controller = container(deployment, "controller");
    assert_eq!(
        controller["securityContext"]["capabilities"],
        json!({"drop": ["ALL"]})
    );
    let controller_args = args(controller);
    for expected in [
        "waypoint-controller",
        "--waypoint-image=mesh-agent:0.1.0",
        "--ca-address=https://mesh-ca.mesh-system.svc:15012",
        "--ca-root-configmap=mesh-system/mesh-ca-root-cert",
        "--ca-root-cert=/var/run/secrets/mesh-ca/root-cert.pem",
        "--ca-token-file=/var/run/secrets/tokens/istio-token",
        "--view-address=https://mesh-waypoint-controller.mesh-system.svc:15012",
        "--status-resync-secs=600",
        "--waypoint-cpu-request=100m",
        "--waypoint-memory-request=128Mi",
        "--waypoint-memory-limit=1Gi",
    ] {
        assert!(
            controller_args.contains(&expected),
            "{expected} in {controller_args:?}"
        );
    }
    assert!(
        !controller_args
            .iter()
            .any(|a| a.starts_with("--waypoint-tracing")),
        "no tracing unless asked"
    );
    view_wiring(&objects, deployment);
    // It binds no role (no `bind`, no binding written): the waypoints' accounts stay bound
    // to nothing. It may review tokens (the view's clients), and delete old bindings.
    let role = named(&objects, "ClusterRole", "mesh-waypoint-controller");
    let rules = role["rules"].as_array().expect("rules");
    for rule in rules {
        let verbs = rule["verbs"].as_array().expect("verbs");
        assert!(!verbs.contains(&json!("bind")), "{rule}");
        if rule["resources"] == json!(["clusterrolebindings"]) {
            assert_eq!(rule["verbs"], json!(["list", "delete"]), "{rule}");
        }
    }
    assert!(
        rules
            .iter()
            .any(|r| r["resources"] == json!(["tokenreviews"]) && r["verbs"] == json!(["create"])),
        "{rules:?}"
    );
    // Besides, it writes only status (the Gateways', the bound objects' conditions, the
    // routes' entries), and reads the cluster view through the waypoint role.
    let status: Vec<&Value> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| {
            r["resources"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.ends_with("/status")))
            })
        })
        .collect();
    for rule in &status {
        assert_eq!(rule["verbs"], json!(["patch"]), "{rule}");
    }
    assert_eq!(status.len(), 5, "{status:?}");
    // The routes it tells their status it reads one by one, and nothing else of them.
    let routes: Vec<&Value> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["resources"] == json!(["httproutes", "grpcroutes", "tcproutes", "tlsroutes"]))
        .collect();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["verbs"], json!(["get"]));
    let view = named(
        &objects,
        "ClusterRoleBinding",
        "mesh-waypoint-controller-view",
    );
    assert_eq!(view["roleRef"]["name"], "mesh-waypoint");
    assert_eq!(view["subjects"][0]["name"], "mesh-waypoint-controller");
    // The waypoint role reads only.
    let waypoint = named(&objects, "ClusterRole", "mesh-waypoint");
    for rule in waypoint["rules"].as_array().expect("rules") {
        assert_eq!(rule["verbs"], json!(["list", "watch"]), "{rule}");
    }
    // Tracing handed to every waypoint; the controller off.
    let traced = render(&[
        "--set",
        "waypointController.tracing.endpoint=http://jaeger.obs:4317",
        "--set",
        "waypointController.tracing.sampling=10",
    ]);
    let deployment = named(&traced, "Deployment", "mesh-waypoint-controller");
    let traced_args = args(container(deployment, "controller"));
    assert!(traced_args.contains(&"--waypoint-tracing-endpoint=http://jaeger.obs:4317"));
    assert!(traced_args.contains(&"--waypoint-tracing-sampling=10"));
    let off = render(&["--set", "waypointController.enabled=false"]);
    assert!(!off
        .iter()
        .any(|o| o["metadata"]["name"] == "mesh-waypoint-controller"));
}
