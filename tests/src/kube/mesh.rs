//! A meshed Kubernetes cluster on the testbed, as the end-to-end tests and `cargo xtask demo
//! --kube` use it: the real control plane, `nodes` testbed nodes each with its testbed kubelet
//! (the real `mesh-cni` chained after the testbed's own plugin) and its agent (least RBAC, a
//! token bound to an agent Pod on its node, pods handed over by `mesh-cni`), and the workloads
//! they run: an echo Deployment behind a Service, and client pods that connect once at start.

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod, Service},
    events::v1::Event,
};
use kube::{
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    },
    Api,
};
use serde_json::{json, Value};

use super::{eventually, ControlPlane, Error, Kubelet, KubeletOptions, Result};
use crate::{agent::AgentOptions, http::http, telemetry::ADMIN, Agent, Node, Testbed, TestbedSpec};

/// The label that enrolls a namespace (Istio ambient's).
pub const MESH_LABEL: &str = "istio.io/dataplane-mode";

/// How long the cluster's steps may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// The cluster. Dropped in field order: kubelets (their pods) first, then agents, the testbed
/// and the control plane.
#[derive(Debug)]
pub struct KubeMesh {
    pub kubelets: Vec<Kubelet>,
    pub agents: Vec<Agent>,
    /// Each agent's options, to start it again.
    pub options: Vec<AgentOptions>,
    pub tb: Testbed,
    pub cp: ControlPlane,
    /// The namespace the workloads go in.
    pub namespace: String,
    /// The cluster DNS, for the clusters the chart is installed in (as on a real cluster:
    /// waypoints reach the controller's view by name).
    pub dns: Option<super::dns::ClusterDns>,
}

impl KubeMesh {
    /// Starts the control plane, `nodes` nodes with their kubelets and agents, and creates
    /// `namespace`, labelled for the mesh if `meshed`.
    pub fn start(nodes: usize, namespace: &str, meshed: bool) -> Result<Self> {
        let (mut cp, tb) = control_plane_and_testbed(nodes)?;
        let (mut kubelets, mut agents, mut all_options) = (Vec::new(), Vec::new(), Vec::new());
        for (index, node) in tb.nodes().iter().enumerate() {
            let mut options = AgentOptions::new(tb.scratch_dir().join("config"));
            let kubeconfig: PathBuf = tb
                .scratch_dir()
                .join(format!("agent-{}.kubeconfig", node.name));
            cp.agent_kubeconfig(node, &kubeconfig)?;
            options.kubeconfig = Some(kubeconfig);
            let kubelet = Kubelet::start(
                &cp,
                &tb,
                index,
                &KubeletOptions {
                    cni_socket: Some(options.cni_socket(&node.name)),
                    ..KubeletOptions::default()
                },
            )?;
            options.kubepods_cgroup = Some(kubelet.kubepods_root().to_path_buf());
            agents.push(Agent::start(node, &options)?);
            kubelets.push(kubelet);
            all_options.push(options);
        }
        create_namespace(&mut cp, namespace, meshed)?;
        Ok(Self {
            kubelets,
            agents,
            options: all_options,
            tb,
            cp,
            namespace: namespace.to_owned(),
            dns: None,
        })
    }

    /// The namespace's Pods.
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.cp.client(), &self.namespace)
    }

    /// The echo Deployment's pod and its address.
    pub fn echo_pod(&self) -> Result<(Pod, String)> {
        let invalid = |detail: &str| Error::Invalid {
            what: "the echo pod".into(),
            detail: detail.into(),
        };
        let mut list = self
            .cp
            .block_on(self.pods().list(&ListParams::default().labels("app=echo")))
            .map_err(|source| Error::Api {
                what: "listing the echo pods".into(),
                source,
            })?;
        let pod = list.items.pop().ok_or_else(|| invalid("none"))?;
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .ok_or_else(|| invalid("no address"))?;
        Ok((pod, ip))
    }

    /// The namespace's Istio `AuthorizationPolicies` (`security.istio.io/v1`).
    pub fn authorization_policies(&self) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
        Api::namespaced_with(self.cp.client(), &self.namespace, &resource)
    }

    /// A DENY `AuthorizationPolicy` `name` for `app=echo`, matching the source `principal`.
    pub fn deny_echo_from(&self, name: &str, principal: &str) -> DynamicObject {
        from_json(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
                     "rules": [{"from": [{"source": {"principals": [principal]}}]}]},
        }))
    }

    /// Sets (`true`) or removes the namespace's mesh label, through the API.
    pub fn label_namespace(&self, meshed: bool) -> Result<()> {
        let value = if meshed {
            json!("ambient")
        } else {
            Value::Null
        };
        let patch = json!({"metadata": {"labels": {MESH_LABEL: value}}});
        self.cp
            .block_on(Api::<Namespace>::all(self.cp.client()).patch(
                &self.namespace,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
            .map(drop)
            .map_err(|source| Error::Api {
                what: format!("labelling namespace {}", self.namespace),
                source,
            })
    }

    /// Creates the `echo` Service and its Deployment (on `node` if named), and waits until the
    /// echo pod is ready (and, if `meshed`, captured); returns the Service's VIP.
    pub fn start_echo(&self, node: Option<&str>, meshed: bool) -> Result<String> {
        let service: Service = from_json(json!({
            "metadata": {"name": "echo", "namespace": self.namespace},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": "tcp"}]},
        }));
        let api = |what: &str| {
            let what = what.to_owned();
            move |source| Error::Api { what, source }
        };
        let service = self
            .cp
            .block_on(
                Api::<Service>::namespaced(self.cp.client(), &self.namespace)
                    .create(&PostParams::default(), &service),
            )
            .map_err(api("creating the echo Service"))?;
        let vip = service
            .spec
            .and_then(|s| s.cluster_ip)
            .ok_or_else(|| Error::Invalid {
                what: "the echo Service".into(),
                detail: "no cluster IP".into(),
            })?;
        self.cp
            .block_on(
                Api::<Deployment>::namespaced(self.cp.client(), &self.namespace).create(
                    &PostParams::default(),
                    &echo_deployment(&self.namespace, node),
                ),
            )
            .map_err(api("creating the echo Deployment"))?;
        if meshed {
            self.wait_event("echo-", "MeshCaptured")?;
        }
        // Ready behind its Service (the readiness probe passed through the agent's capture).
        let pods = self.pods();
        self.cp.block_on(eventually("echo ready", WAIT, || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=echo"))
                    .await
                    .ok()?;
                list.items.iter().any(is_ready).then_some(())
            }
        }))?;
        // And every agent has the endpoint from the Service's slice (a client started earlier
        // would be refused: no ready endpoint).
        if meshed {
            for node in self.tb.nodes() {
                wait_dump(node, "the echo endpoint", |d| {
                    !dump_endpoints(d, &self.namespace, "echo").is_empty()
                })?;
            }
        }
        Ok(vip)
    }

    /// Creates a pod (on `node` if named) whose only container connects to `target` as soon as
    /// it starts, once, and exits 0 if the echo came back.
    pub fn start_client(&self, name: &str, target: &str, node: Option<&str>) -> Result<()> {
        self.start_probe(name, &["connect", target, "first-packet"], node)
    }

    /// Creates a pod (on `node` if named) whose only container runs `mesh-probe` with `args`.
    pub fn start_probe(&self, name: &str, args: &[&str], node: Option<&str>) -> Result<()> {
        let selector = node.map_or(json!({}), |n| json!({"kubernetes.io/hostname": n}));
        let pod: Pod = from_json(json!({
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"restartPolicy": "Never", "nodeSelector": selector, "containers": [{
                "name": "client", "image": "mesh-probe", "args": args,
            }]},
        }));
        self.cp
            .block_on(self.pods().create(&PostParams::default(), &pod))
            .map(drop)
            .map_err(|source| Error::Api {
                what: format!("creating pod {name}"),
                source,
            })
    }

    /// The pod's phase once it is `Succeeded` or `Failed`.
    pub fn finished(&self, name: &str) -> Result<String> {
        let pods = self.pods();
        self.cp
            .block_on(eventually(&format!("pod {name} to finish"), WAIT, || {
                let pods = pods.clone();
                async move {
                    let phase = pods.get(name).await.ok()?.status?.phase?;
                    matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
                }
            }))
    }

    /// The pod's address, as its status says.
    pub fn pod_ip(&self, name: &str) -> Result<String> {
        self.cp
            .block_on(self.pods().get(name))
            .map_err(|source| Error::Api {
                what: format!("reading pod {name}"),
                source,
            })?
            .status
            .and_then(|s| s.pod_ip)
            .ok_or_else(|| Error::Invalid {
                what: format!("pod {name}"),
                detail: "no address in its status".into(),
            })
    }

    /// The namespace's Events of `reason` about pods whose name starts with `pod_prefix`.
    pub fn events(&self, pod_prefix: &str, reason: &str) -> Result<Vec<Event>> {
        let events: Api<Event> = Api::namespaced(self.cp.client(), &self.namespace);
        let list = self
            .cp
            .block_on(events.list(&ListParams::default()))
            .map_err(|source| Error::Api {
                what: "listing events".into(),
                source,
            })?;
        Ok(list
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding
                        .as_ref()
                        .and_then(|r| r.name.as_deref())
                        .is_some_and(|n| n.starts_with(pod_prefix))
            })
            .collect())
    }

    /// Waits for an Event of `reason` about a pod whose name starts with `pod_prefix`.
    pub fn wait_event(&self, pod_prefix: &str, reason: &str) -> Result<Event> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(event) = self.events(pod_prefix, reason)?.pop() {
                return Ok(event);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("a {reason} event on {pod_prefix}"),
                    after: WAIT,
                    detail: "none".into(),
                });
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The agent of `node`'s `/config_dump`.
pub fn config_dump(node: &Node) -> Result<Value> {
    let invalid = |detail: String| Error::Invalid {
        what: format!("config dump of {}", node.name),
        detail,
    };
    let (status, body) = http(node, "GET", ADMIN, "/config_dump")?;
    if status != 200 {
        return Err(invalid(format!("status {status}: {body}")));
    }
    serde_json::from_str(&body).map_err(|e| invalid(e.to_string()))
}

/// Waits until `check` holds for `node`'s agent's `/config_dump`.
pub fn wait_dump(node: &Node, what: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let dump = config_dump(node)?;
        if check(&dump) {
            return Ok(dump);
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: WAIT,
                detail: format!("{dump:#}"),
            });
        }
        // Fine enough to time how fast a change reaches the agent.
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a config dump holds the `AuthorizationPolicy` `name`.
pub fn dump_has_policy(dump: &Value, name: &str) -> bool {
    dump["policies"]["authorization"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["name"] == name))
}

/// The endpoints of the first port of `namespace/service` in a config dump.
pub fn dump_endpoints(dump: &Value, namespace: &str, service: &str) -> Vec<Value> {
    dump["services"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["namespace"] == namespace && s["name"] == service)
        })
        .and_then(|s| s["ports"][0]["endpoints"].as_array().cloned())
        .unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `echo`: one `mesh-probe` echo server on port 8080 (named `tcp`), with a readiness probe.
fn echo_deployment(namespace: &str, node: Option<&str>) -> Deployment {
    let selector = node.map_or(json!({}), |n| json!({"kubernetes.io/hostname": n}));
    from_json(json!({
        "metadata": {"name": "echo", "namespace": namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}}, "template": {
            "metadata": {"labels": {"app": "echo"}},
            "spec": {"nodeSelector": selector, "containers": [{
                "name": "echo", "image": "mesh-probe",
                "args": ["serve", "$(POD_IP):8080"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "ports": [{"name": "tcp", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": "tcp"}, "periodSeconds": 1},
            }]},
        }},
    }))
}

/// The control plane and a testbed of `nodes` nodes (its scratch directory made).
pub(super) fn control_plane_and_testbed(nodes: usize) -> Result<(ControlPlane, Testbed)> {
    let cp = ControlPlane::start()?;
    let tb = Testbed::new(TestbedSpec {
        nodes,
        pods_per_node: 1,
    })?;
    std::fs::create_dir_all(tb.scratch_dir())
        .map_err(|e| Error::Setup(format!("creating {}: {e}", tb.scratch_dir().display())))?;
    Ok((cp, tb))
}

/// The output of a `mesh-probe repeat` client (container `client` of pod `pod` on kubelet
/// `index`), and its tries in order: `true` for an echo, `false` for a failure.
pub fn repeat_tries(mesh: &KubeMesh, index: usize, pod: &str) -> (Vec<String>, Vec<bool>) {
    let lines = mesh.kubelets[index].logs(&mesh.namespace, pod, "client");
    let tries = lines
        .iter()
        .filter(|l| l.starts_with("echo ok") || l.starts_with("failed"))
        .map(|l| l.starts_with("echo ok"))
        .collect();
    (lines, tries)
}

/// Creates the workloads' namespace, labelled for the mesh if `meshed`, and waits for its
/// `default` service account.
pub(super) fn create_namespace(cp: &mut ControlPlane, namespace: &str, meshed: bool) -> Result<()> {
    let labels = if meshed {
        json!({MESH_LABEL: "ambient"})
    } else {
        json!({})
    };
    let ns: Namespace = from_json(json!({"metadata": {"name": namespace, "labels": labels}}));
    cp.block_on(Api::<Namespace>::all(cp.client()).create(&PostParams::default(), &ns))
        .map_err(|source| Error::Api {
            what: format!("creating namespace {namespace}"),
            source,
        })?;
    cp.wait_service_account(namespace, "default", WAIT)
}

/// Waits until container `container` of pod `pod` on kubelet `index` has printed `count`
/// lines starting with `prefix`.
pub fn wait_lines(
    mesh: &KubeMesh,
    index: usize,
    pod: &str,
    prefix: &str,
    count: usize,
) -> Result<()> {
    let kubelet = &mesh.kubelets[index];
    mesh.cp.block_on(eventually(
        &format!("{count} lines {prefix:?} from {pod}"),
        WAIT,
        || async {
            let lines = kubelet.logs(&mesh.namespace, pod, "client");
            (lines.iter().filter(|l| l.starts_with(prefix)).count() >= count).then_some(())
        },
    ))
}

/// A typed object from literal JSON (the literals are the code's own).
pub fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("object literal matches its type")
}
