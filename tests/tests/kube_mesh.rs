//! Privileged, end to end on Kubernetes: the real control plane, the testbed kubelet running
//! pods through the CNI chain (`mtb-cni`, then the real `mesh-cni`), and the real agent reading
//! the API with its least RBAC and taking the pods over `mesh-cni`'s hand-over.
//!
//! Proven here: a client pod in a labelled namespace whose container connects at start-up
//! through a Service reaches the server, and the agent carried that very connection (its access
//! log holds it: captured before its first packet); both pods carry a `MeshCaptured` Event; a
//! pod created while the agent is down does not start (its sandbox fails, no container runs)
//! until the agent is back, and is then captured; an agent that crashed and restarted re-learns
//! its running pods from `/proc` (the hand-overs it held are gone) and carries their traffic;
//! on two nodes, kubelet-run pods talk over HBONE with their SPIFFE identities.

use std::{
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod, Service},
    events::v1::Event,
};
use kube::{
    api::{ListParams, PostParams},
    Api,
};
use mesh_tests::{
    agent::AgentOptions,
    kube::{eventually, ControlPlane, Kubelet, KubeletOptions},
    Agent, Testbed, TestbedSpec,
};
use serde_json::{json, Value};

const NS: &str = "mesh";
const WAIT: Duration = Duration::from_secs(60);

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("object from JSON")
}

fn echo_deployment(node: Option<&str>) -> Deployment {
    let selector = node.map_or(json!({}), |n| json!({"kubernetes.io/hostname": n}));
    from_json(json!({
        "metadata": {"name": "echo", "namespace": NS},
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

/// A pod whose only container connects to `target` as soon as it starts, once.
fn client_pod(name: &str, target: &str) -> Pod {
    client_pod_on(name, target, None)
}

/// [`client_pod`], on `node` when one is named.
fn client_pod_on(name: &str, target: &str, node: Option<&str>) -> Pod {
    let selector = node.map_or(json!({}), |n| json!({"kubernetes.io/hostname": n}));
    from_json(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"restartPolicy": "Never", "nodeSelector": selector, "containers": [{
            "name": "client", "image": "mesh-probe", "args": ["connect", target, "first-packet"],
        }]},
    }))
}

/// The pod's phase once it is `Succeeded` or `Failed`.
fn finished(cp: &ControlPlane, name: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    cp.block_on(eventually(&format!("pod {name} to finish"), WAIT, || {
        let pods = pods.clone();
        async move {
            let phase = pods.get(name).await.ok()?.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        }
    }))
    .expect("pod phase")
}

fn has_event(cp: &ControlPlane, pod_prefix: &str, reason: &str) -> bool {
    let events: Api<Event> = Api::namespaced(cp.client(), NS);
    cp.block_on(events.list(&ListParams::default()))
        .expect("events")
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding
                    .as_ref()
                    .and_then(|r| r.name.as_deref())
                    .is_some_and(|n| n.starts_with(pod_prefix))
        })
}

fn wait_event(cp: &ControlPlane, pod_prefix: &str, reason: &str) {
    let deadline = Instant::now() + WAIT;
    while !has_event(cp, pod_prefix, reason) {
        assert!(
            Instant::now() < deadline,
            "no {reason} event on {pod_prefix}"
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// A control plane and `nodes` testbed nodes, each with its testbed kubelet (the real
/// `mesh-cni` in its chain) and its agent (least RBAC, bound token), and the namespace `mesh`
/// labelled for the mesh.
struct Cluster {
    cp: ControlPlane,
    tb: Testbed,
    kubelets: Vec<Kubelet>,
    agents: Vec<Agent>,
    options: Vec<AgentOptions>,
}

fn cluster(nodes: usize) -> Cluster {
    let mut cp = ControlPlane::start().expect("control plane");
    let tb = Testbed::new(TestbedSpec {
        nodes,
        pods_per_node: 1,
    })
    .expect("testbed");
    std::fs::create_dir_all(tb.scratch_dir()).expect("scratch");
    let (mut kubelets, mut agents, mut all_options) = (Vec::new(), Vec::new(), Vec::new());
    for (index, node) in tb.nodes().iter().enumerate() {
        let mut options = AgentOptions::new(tb.scratch_dir().join("config"));
        let kubeconfig = tb
            .scratch_dir()
            .join(format!("agent-{}.kubeconfig", node.name));
        cp.agent_kubeconfig(node, &kubeconfig)
            .expect("agent kubeconfig");
        options.kubeconfig = Some(kubeconfig);
        let kubelet = Kubelet::start(
            &cp,
            &tb,
            index,
            &KubeletOptions {
                cni_socket: Some(options.cni_socket(&node.name)),
                ..KubeletOptions::default()
            },
        )
        .expect("kubelet");
        options.kubepods_cgroup = Some(kubelet.kubepods_root().to_path_buf());
        agents.push(Agent::start(node, &options).expect("agent"));
        kubelets.push(kubelet);
        all_options.push(options);
    }
    let mesh: Namespace = from_json(
        json!({"metadata": {"name": NS, "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    cp.block_on(Api::<Namespace>::all(cp.client()).create(&PostParams::default(), &mesh))
        .expect("namespace");
    cp.wait_service_account(NS, "default", WAIT)
        .expect("service account");
    Cluster {
        cp,
        tb,
        kubelets,
        agents,
        options: all_options,
    }
}

/// Whether `agent`'s access log holds a connection from `ip` to the echo Service.
fn carried(agent: &Agent, ip: &str) -> bool {
    agent.logs().iter().any(|l| {
        l.contains("\"log\":\"access\"")
            && l.contains("\"direction\":\"outbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("echo.mesh.svc.cluster.local")
    })
}

/// The pod's address, as its status says.
fn pod_ip(cp: &ControlPlane, pods: &Api<Pod>, name: &str) -> String {
    cp.block_on(pods.get(name))
        .expect("pod")
        .status
        .and_then(|s| s.pod_ip)
        .expect("its address")
}

#[test]
fn pods_the_kubelet_starts_are_captured_before_their_first_packet_and_wait_for_the_agent() {
    let Cluster {
        cp,
        tb,
        mut kubelets,
        mut agents,
        options,
    } = cluster(1);
    let node = tb.node(0);
    let (kubelet, agent, options) = (kubelets.remove(0), agents.remove(0), &options[0]);
    let vip = start_echo(&cp, None);
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);

    // Its very first connection, at start-up, through the Service VIP: carried by the agent.
    let target = format!("{vip}:80");
    cp.block_on(pods.create(&PostParams::default(), &client_pod("first", &target)))
        .expect("client pod");
    assert_eq!(
        finished(&cp, "first"),
        "Succeeded",
        "{:?}",
        kubelet.logs(NS, "first", "client")
    );
    wait_event(&cp, "first", "MeshCaptured");
    let first_ip = pod_ip(&cp, &pods, "first");
    assert!(
        carried(&agent, &first_ip),
        "the agent carried the start-up connection of {first_ip}"
    );

    // The agent down: a new pod does not start (no container), until the agent is back.
    agent.kill().expect("kill the agent");
    cp.block_on(pods.create(&PostParams::default(), &client_pod("late", &target)))
        .expect("late pod");
    wait_event(&cp, "late", "FailedCreatePodSandBox");
    thread::sleep(Duration::from_secs(2));
    assert!(
        kubelet
            .pod(NS, "late")
            .is_none_or(|p| p.containers.iter().all(|c| c.pid.is_none() && !c.running)),
        "no container of a pod runs before its capture"
    );
    let agent = Agent::start(node, options).expect("agent back");
    assert_eq!(
        finished(&cp, "late"),
        "Succeeded",
        "{:?}",
        kubelet.logs(NS, "late", "client")
    );
    wait_event(&cp, "late", "MeshCaptured");

    // The agent crashes and restarts: the hand-overs it held are gone, yet it re-learns the
    // running echo pod from /proc before it reports ready, and carries new connections to it.
    agent.kill().expect("kill the agent");
    let agent = Agent::start(node, options).expect("agent restarted");
    let echo_captured = agent
        .logs()
        .iter()
        .any(|l| l.contains("running pod found from /proc") && l.contains("pod=mesh/echo-"));
    assert!(
        echo_captured,
        "the restarted agent re-learnt the echo pod from /proc"
    );
    cp.block_on(pods.create(&PostParams::default(), &client_pod("again", &target)))
        .expect("client pod");
    assert_eq!(finished(&cp, "again"), "Succeeded");
    let again_ip = pod_ip(&cp, &pods, "again");
    assert!(
        carried(&agent, &again_ip),
        "the restarted agent carried the connection of {again_ip}"
    );
    drop(kubelet);
}

/// The `echo` Deployment behind its Service, captured and ready; returns the Service's VIP.
fn start_echo(cp: &ControlPlane, node: Option<&str>) -> String {
    let service: Service = from_json(json!({
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": "tcp"}]},
    }));
    let service = cp
        .block_on(
            Api::<Service>::namespaced(cp.client(), NS).create(&PostParams::default(), &service),
        )
        .expect("service");
    let vip = service.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    cp.block_on(
        Api::<Deployment>::namespaced(cp.client(), NS)
            .create(&PostParams::default(), &echo_deployment(node)),
    )
    .expect("deployment");
    wait_event(cp, "echo-", "MeshCaptured");
    // Ready behind its Service (the readiness probe passed through the agent's capture).
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    cp.block_on(eventually("echo ready", WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app=echo"))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .then_some(())
        }
    }))
    .expect("echo ready");
    vip
}

/// Two nodes: a client pod on n0 reaches the echo pod on n1 through the Service; the hop
/// between the agents is HBONE (mutual TLS), and the destination's agent knows the client by
/// its SPIFFE identity.
#[test]
fn pods_on_two_nodes_talk_over_hbone_with_their_identities() {
    // Every part is bound: the testbed must outlive the kubelets and agents.
    let Cluster {
        cp,
        tb: _tb,
        agents,
        kubelets,
        options: _options,
    } = cluster(2);
    let vip = start_echo(&cp, Some("n1"));
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    let target = format!("{vip}:80");
    cp.block_on(pods.create(
        &PostParams::default(),
        &client_pod_on("across", &target, Some("n0")),
    ))
    .expect("client pod");
    assert_eq!(
        finished(&cp, "across"),
        "Succeeded",
        "{:?}",
        kubelets[0].logs(NS, "across", "client")
    );
    let ip = pod_ip(&cp, &pods, "across");
    let source = agents[0].logs().iter().any(|l| {
        l.contains("\"direction\":\"outbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("\"connection_security_policy\":\"mutual_tls\"")
    });
    assert!(
        source,
        "n0's agent tunnelled the connection over mutual TLS"
    );
    let destination = agents[1].logs().iter().any(|l| {
        l.contains("\"direction\":\"inbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("spiffe://cluster.local/ns/mesh/sa/default")
    });
    assert!(
        destination,
        "n1's agent received it from the client's identity"
    );
    drop(kubelets);
}
