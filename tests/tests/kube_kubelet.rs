//! Privileged: the testbed kubelet (`mesh_tests::kube::Kubelet`) plays kubelet and container
//! runtime for testbed nodes against the real control plane, with each node's own client
//! certificate (the Node authorizer and `NodeRestriction` judge every request).
//!
//! Proven here: a Deployment's pods are bound by the real scheduler to two nodes, get their
//! addresses from the veth plugin through the CNI chain (`mtb-cni`, then `mesh-cni` handing
//! each pod to a stand-in agent on the node's own socket), run in their namespace and their
//! kubelet-layout cgroup, become Ready by their readiness probe, and the real controller
//! manager's `EndpointSlice` lists both; a pod on one node reaches the other node's pod, sees its
//! service-account token (bound to the pod) at the usual path, runs as its `runAsUser`, and ends
//! Succeeded; deleting the Deployment stops the processes, runs CNI DEL in reverse order and
//! removes namespaces and cgroups; the node's Lease is renewed. With no agent on the socket, a
//! pod's sandbox fails (`mesh-cni` code 11, an Event and a condition say so), none of its
//! containers runs, and it starts once the agent appears; host-network pods skip CNI; dropping
//! the kubelet removes everything it started.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::TokenReview,
    coordination::v1::Lease,
    core::v1::{Event, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{DeleteParams, ListParams, PostParams},
    Api, Client,
};
use mesh_cni::handover::{Reply, Request, Server};
use mesh_tests::{
    kube::{eventually, kubelet::LocalPod, ControlPlane, Kubelet, KubeletOptions},
    plan, Testbed, TestbedSpec,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};

const NS: &str = "web";
const WAIT: Duration = Duration::from_secs(60);
/// One control plane at a time: two would compete for the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("object from JSON")
}

/// A stand-in node agent on the CNI hand-over socket: every pod is `not_meshed`; requests are
/// recorded as `"<kind> <namespace>/<name> <ips>"`.
struct FakeAgent {
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeAgent {
    fn start(socket: &Path) -> Self {
        let server = Server::bind(socket).expect("bind the hand-over socket");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (Arc::clone(&stop), Arc::clone(&requests));
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
                if !matches!(poll(&mut fds, PollTimeout::from(100u16)), Ok(n) if n > 0) {
                    continue;
                }
                let Ok(mut conn) = server.accept() else {
                    continue;
                };
                while let Ok(Some(request)) = conn.recv() {
                    let (line, reply) = match request {
                        Request::Add { pod, .. } => {
                            (format!("add {pod} {:?}", pod.ips), Reply::NotMeshed)
                        }
                        Request::Del { pod } => (format!("del {pod}"), Reply::Deleted),
                        Request::Check { pod } => (format!("check {pod}"), Reply::NotMeshed),
                        Request::Status => ("status".to_owned(), Reply::Ready),
                    };
                    log.lock().unwrap().push(line);
                    let _ = conn.reply(&reply);
                }
            }
        });
        Self {
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn create_namespace(cp: &mut ControlPlane) {
    let namespace: Namespace = from_json(json!({"metadata": {"name": NS}}));
    cp.block_on(Api::<Namespace>::all(cp.client()).create(&PostParams::default(), &namespace))
        .expect("namespace");
    cp.wait_service_account(NS, "default", WAIT)
        .expect("default service account");
}

fn condition(pod: &Pod, kind: &str) -> Option<bool> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status == "True")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn name_of(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

fn lease_renewed(cp: &ControlPlane, node: &str) -> k8s_openapi::jiff::Timestamp {
    let lease = cp
        .block_on(Api::<Lease>::namespaced(cp.client(), "kube-node-lease").get(node))
        .expect("node lease");
    lease.spec.and_then(|s| s.renew_time).expect("renewTime").0
}

/// Whether the node is Ready, and when its kubelet last said so.
fn node_ready(cp: &ControlPlane, node: &str) -> (bool, Option<k8s_openapi::jiff::Timestamp>) {
    let node = cp
        .block_on(Api::<Node>::all(cp.client()).get(node))
        .expect("node");
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    (
        ready.status == "True",
        ready.last_heartbeat_time.map(|t| t.0),
    )
}

/// `pid` names a live process (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z')
    })
}

fn cgroup_procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// Everything the kubelet made for `pod` is gone: processes, namespace, cgroup.
fn assert_removed(pod: &LocalPod) {
    for container in &pod.containers {
        if let Some(pid) = container.pid {
            assert!(
                !alive(pid),
                "{}/{} pid {pid} still runs",
                pod.name,
                container.name
            );
        }
    }
    if let Some(netns) = &pod.netns {
        assert!(!netns.exists(), "{} left", netns.display());
    }
    assert!(!pod.cgroup.exists(), "{} left", pod.cgroup.display());
}

fn web_deployment() -> Deployment {
    let labels = json!({"app": "web"});
    from_json(json!({
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "terminationGracePeriodSeconds": 5,
                // One replica per node: the real scheduler must spread them.
                "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}
                ]}},
                "containers": [{
                    "name": "web", "image": "mesh-probe",
                    "args": ["serve", "$(POD_IP):8080"],
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "ports": [{"name": "tcp", "containerPort": 8080}],
                    "resources": {"requests": {"cpu": "10m"}},
                    "readinessProbe": {"tcpSocket": {"port": "tcp"}, "periodSeconds": 1},
                }],
            },
        }},
    }))
}

async fn ready_web_pods(client: &Client) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    eventually("both web pods Running and Ready", WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let ready: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| phase(p) == "Running" && condition(p, "Ready") == Some(true))
            .collect();
        (ready.len() == 2).then_some(ready)
    })
    .await
    .expect("web pods ready")
}

/// The client pod: on `node`, Guaranteed, as uid 1000; prints its uid, cgroup, namespace file
/// and token, then connects to `target`.
fn client_pod(node: &str, target: &str) -> Pod {
    let resources = json!({"cpu": "100m", "memory": "64Mi"});
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let script = format!(
        "echo uid=$(id -u); echo cgroup=$(cat /proc/self/cgroup); \
         echo namespace=$(cat {sa}/namespace); echo token=$(cat {sa}/token); \
         exec mesh-probe connect $TARGET hello-from-{node}"
    );
    from_json(json!({
        "metadata": {"name": "client", "namespace": NS},
        "spec": {
            "nodeName": node, "restartPolicy": "Never",
            "securityContext": {"runAsUser": 1000},
            "containers": [{
                "name": "client", "image": "mesh-probe", "command": ["sh", "-c", script],
                "env": [{"name": "TARGET", "value": format!("{target}:8080")}],
                "resources": {"requests": resources, "limits": resources},
            }],
        },
    }))
}

fn log_value(lines: &[String], key: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= line in {lines:#?}"))
        .to_owned()
}

/// The client pod ran on n0, reached the web pod on n1, saw its bound token and ran as 1000 in
/// its Guaranteed cgroup.
fn client_reaches_the_other_node(cp: &ControlPlane, kubelets: &[Kubelet], target: &Pod) {
    let admin = cp.client();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let client = cp
        .block_on(pods.create(&PostParams::default(), &client_pod("n0", &pod_ip(target))))
        .expect("client pod");
    let uid = client.metadata.uid.clone().unwrap_or_default();
    let done = cp
        .block_on(eventually("the client pod to end", WAIT, || async {
            let pod = pods.get("client").await.ok()?;
            matches!(phase(&pod), "Succeeded" | "Failed").then_some(pod)
        }))
        .expect("client ended");
    let lines = kubelets[0].logs(NS, "client", "client");
    assert_eq!(phase(&done), "Succeeded", "client output: {lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("echo ok") && l.contains(&pod_ip(target))),
        "{lines:#?}"
    );
    assert_eq!(log_value(&lines, "uid"), "1000");
    assert_eq!(log_value(&lines, "namespace"), NS);
    let cgroup = log_value(&lines, "cgroup");
    let expected = format!("/kubepods-n0/pod{uid}/");
    assert!(
        cgroup.contains(&expected),
        "{cgroup} (Guaranteed: {expected})"
    );
    // The token authenticates as the pod's service account, bound to this pod.
    let review: TokenReview = from_json(json!({"spec": {"token": log_value(&lines, "token")}}));
    let review = cp
        .block_on(Api::<TokenReview>::all(admin).create(&PostParams::default(), &review))
        .expect("token review");
    let status = review.status.expect("review status");
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    let user = status.user.expect("user");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:web:default")
    );
    let bound_to = user
        .extra
        .and_then(|e| e.get("authentication.kubernetes.io/pod-name").cloned());
    assert_eq!(bound_to, Some(vec!["client".to_owned()]));
    // A finished pod's sandbox is gone; the API server deletes it at once.
    assert!(kubelets[0].pod(NS, "client").is_none());
    cp.block_on(pods.delete("client", &DeleteParams::default()))
        .expect("delete client");
}

/// Web pod `pod` on node `i` runs where and as its kubelet says: the first address of the
/// node's pod subnet, a namespace, the Burstable cgroup, its process in its container's cgroup;
/// the agent was handed it and CNI CHECK passes.
fn runs_as_its_kubelet_says(i: usize, pod: &Pod, kubelet: &Kubelet, agent: &FakeAgent) -> LocalPod {
    let ip = pod_ip(pod);
    assert_eq!(
        ip,
        plan::pod_v4(i, 0).to_string(),
        "first address of n{i}'s pod subnet"
    );
    let ips: Vec<String> = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .collect();
    assert_eq!(ips, [ip.clone(), plan::pod_v6(i, 0).to_string()]);
    let running = kubelet.pod(NS, &name_of(pod)).expect("the kubelet runs it");
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    assert_eq!(running.qos_class, "Burstable");
    assert_eq!(
        running.cgroup,
        kubelet.kubepods_root().join(format!("burstable/pod{uid}"))
    );
    assert!(running.netns.as_ref().is_some_and(|n| n.exists()));
    let container = &running.containers[0];
    let pid = container.pid.expect("pid");
    assert_eq!(
        cgroup_procs(container.cgroup.as_ref().expect("cgroup")),
        [pid]
    );
    assert!(
        agent
            .requests()
            .iter()
            .any(|r| r.starts_with(&format!("add web/{}", name_of(pod))) && r.contains(&ip)),
        "{:?}",
        agent.requests()
    );
    kubelet.cni_check(NS, &name_of(pod)).expect("CNI CHECK");
    running
}

/// The real `EndpointSlice` controller lists every pod of `web`, ready.
fn endpoint_slice_lists(cp: &ControlPlane, web: &[Pod]) {
    let slices: Api<EndpointSlice> = Api::namespaced(cp.client(), NS);
    let want: Vec<String> = web.iter().map(pod_ip).collect();
    cp.block_on(eventually(
        "the EndpointSlice to list both pods ready",
        WAIT,
        || async {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            let ready: Vec<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.clone())
                .collect();
            want.iter().all(|ip| ready.contains(ip)).then_some(())
        },
    ))
    .expect("endpoint slice");
}

fn deleting_the_deployment_cleans_up(
    cp: &ControlPlane,
    kubelets: &[Kubelet],
    agents: &[FakeAgent],
    local: &[LocalPod],
) {
    // Deleting the Deployment: the garbage collector deletes the pods gracefully, the kubelets
    // stop them, run DEL (mesh-cni first) and remove the objects.
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), NS);
    cp.block_on(deployments.delete("web", &DeleteParams::background()))
        .expect("delete deployment");
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    cp.block_on(eventually("the web pods to be gone", WAIT, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    }))
    .expect("pods deleted");
    for (i, running) in local.iter().enumerate() {
        assert_removed(running);
        assert!(kubelets[i].pod(NS, &running.name).is_none());
        let dels: Vec<String> = kubelets[i]
            .cni_calls()
            .into_iter()
            .filter(|c| c.command == "DEL" && c.sandbox_id == running.sandbox_id)
            .map(|c| c.plugin)
            .collect();
        assert_eq!(dels, ["mesh-cni", "mtb-cni"], "reverse order");
        assert!(agents[i]
            .requests()
            .iter()
            .any(|r| *r == format!("del web/{}", running.name)));
        let ipam = kubelets[i].dir().join("ipam");
        assert_eq!(
            std::fs::read_dir(&ipam).map_or(0, Iterator::count),
            0,
            "addresses released"
        );
    }
}

#[test]
fn a_deployment_runs_on_two_testbed_nodes_through_the_cni_chain() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let mut cp = ControlPlane::start().expect("control plane");
    let tb = Testbed::new(TestbedSpec {
        nodes: 2,
        pods_per_node: 0,
    })
    .expect("testbed");
    create_namespace(&mut cp);
    let kubelets = Kubelet::start_all(&cp, &tb, &KubeletOptions::default()).expect("kubelets");
    let agents: Vec<FakeAgent> = kubelets
        .iter()
        .map(|k| FakeAgent::start(k.cni_socket()))
        .collect();
    let lease_at_start = lease_renewed(&cp, "n0");
    let heartbeat_at_start = node_ready(&cp, "n0").1;
    let admin = cp.client();

    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    cp.block_on(deployments.create(&PostParams::default(), &web_deployment()))
        .expect("deployment");
    let service: Service = from_json(json!({
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "tcp"}]},
    }));
    cp.block_on(
        Api::<Service>::namespaced(admin.clone(), NS).create(&PostParams::default(), &service),
    )
    .expect("service");
    let mut web = cp.block_on(ready_web_pods(&admin));
    web.sort_by_key(node_of);
    let ready_after = started.elapsed();
    assert_eq!(web.iter().map(node_of).collect::<Vec<_>>(), ["n0", "n1"]);

    // Each runs where and as its kubelet says: address from its node's subnet, a namespace,
    // the Burstable cgroup, the process in its container's cgroup; the agent was told.
    let local: Vec<LocalPod> = web
        .iter()
        .enumerate()
        .map(|(i, pod)| runs_as_its_kubelet_says(i, pod, &kubelets[i], &agents[i]))
        .collect();

    endpoint_slice_lists(&cp, &web);

    client_reaches_the_other_node(&cp, &kubelets, &web[1]);

    deleting_the_deployment_cleans_up(&cp, &kubelets, &agents, &local);

    // The node stays healthy: its lease is renewed and its Ready condition holds.
    cp.block_on(eventually(
        "n0's lease to be renewed",
        Duration::from_secs(25),
        || async { (lease_renewed(&cp, "n0") > lease_at_start).then_some(()) },
    ))
    .expect("lease renewed");
    cp.block_on(eventually(
        "n0's Ready heartbeat",
        Duration::from_secs(25),
        || async {
            let (ready, heartbeat) = node_ready(&cp, "n0");
            (ready && heartbeat > heartbeat_at_start).then_some(())
        },
    ))
    .expect("Ready heartbeat");
    assert!(node_ready(&cp, "n1").0);
    let events = cp
        .block_on(Api::<Event>::namespaced(admin, NS).list(&ListParams::default()))
        .expect("events");
    assert!(events
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("Started")
            && e.source.as_ref().and_then(|s| s.host.as_deref()) == Some("n1")));

    let (kubepods, dirs): (Vec<PathBuf>, Vec<PathBuf>) = kubelets
        .iter()
        .map(|k| (k.kubepods_root().to_path_buf(), k.dir().to_path_buf()))
        .unzip();
    for kubelet in kubelets {
        kubelet.teardown().expect("kubelet teardown");
    }
    for path in kubepods.iter().chain(&dirs) {
        assert!(!path.exists(), "{} left", path.display());
    }
    drop(agents);
    eprintln!(
        "pods ready {:.1}s after start; test took {:.1}s",
        ready_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

fn late_pod() -> Pod {
    from_json(json!({
        "metadata": {"name": "late", "namespace": NS},
        "spec": {
            "nodeName": "n0", "terminationGracePeriodSeconds": 2,
            "initContainers": [{"name": "init", "image": "shell", "args": ["-c", "echo init-ran"]}],
            "containers": [{
                "name": "app", "image": "shell",
                "args": ["-c", "touch /run/ready && exec sleep 600"],
                // exec enters the container's own mount namespace: /run is private to it.
                "readinessProbe": {"exec": {"command": ["test", "-f", "/run/ready"]}, "periodSeconds": 1},
            }],
        },
    }))
}

fn host_pod(node_ip: &str) -> Pod {
    from_json(json!({
        "metadata": {"name": "host", "namespace": NS},
        "spec": {
            "nodeName": "n0", "hostNetwork": true, "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "probe", "image": "mesh-probe", "args": ["serve", format!("{node_ip}:9090")],
                "readinessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 1},
                "ports": [{"containerPort": 9090}],
            }],
        },
    }))
}

/// No agent serves the socket: ADD fails with "try again later" (code 11), an Event and the
/// `PodReadyToStartContainers` condition say so, the failed ADD is undone and retried, and none
/// of the pod's containers runs.
fn sandbox_fails_without_an_agent(cp: &ControlPlane, kubelet: &Kubelet) {
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    let events: Api<Event> = Api::namespaced(cp.client(), NS);
    let event = cp
        .block_on(eventually(
            "a FailedCreatePodSandBox event",
            WAIT,
            || async {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .into_iter()
                    .find(|e| e.reason.as_deref() == Some("FailedCreatePodSandBox"))
            },
        ))
        .expect("event");
    let message = event.message.unwrap_or_default();
    assert!(
        message.contains("mesh-cni")
            && message.contains("code 11")
            && message.contains(&kubelet.cni_socket().display().to_string()),
        "{message}"
    );
    let deadline = Instant::now() + WAIT;
    while kubelet
        .cni_calls()
        .iter()
        .filter(|c| c.command == "ADD" && c.plugin == "mesh-cni")
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "ADD retried: {:#?}",
            kubelet.cni_calls()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let calls = kubelet.cni_calls();
    let failed = calls
        .iter()
        .find(|c| c.plugin == "mesh-cni" && c.command == "ADD")
        .expect("mesh-cni ADD");
    assert_eq!(
        (failed.exit_code, failed.error_code),
        (1, Some(11)),
        "{failed:?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.command == "DEL" && c.plugin == "mtb-cni"),
        "the failed ADD is undone: {calls:#?}"
    );
    let pod = cp.block_on(pods.get("late")).expect("pod");
    assert_eq!(phase(&pod), "Pending");
    assert_eq!(condition(&pod, "PodReadyToStartContainers"), Some(false));
    let local = kubelet.pod(NS, "late").expect("sandbox");
    assert!(!local.network_ready);
    assert!(
        local
            .containers
            .iter()
            .all(|c| c.id.is_none() && !c.running),
        "{local:?}"
    );
    assert_eq!(cgroup_procs(&local.cgroup), Vec::<u32>::new());
}

/// A host-network pod: no CNI, the node's address, its server in the node's namespace.
fn host_network_pod_runs_without_cni(cp: &ControlPlane, kubelet: &Kubelet, node_ip: &str) {
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    let calls_before = kubelet.cni_calls().len();
    cp.block_on(pods.create(&PostParams::default(), &host_pod(node_ip)))
        .expect("host pod");
    let host = cp
        .block_on(eventually("the host-network pod Ready", WAIT, || async {
            let pod = pods.get("host").await.ok()?;
            (condition(&pod, "Ready") == Some(true)).then_some(pod)
        }))
        .expect("host pod running");
    assert_eq!(pod_ip(&host), node_ip);
    let lines = eventually_log(kubelet, "host", "probe", "listening");
    assert!(lines.iter().any(|l| l.contains(node_ip)), "{lines:?}");
    assert!(kubelet.pod(NS, "host").is_some_and(|p| p.netns.is_none()));
    assert!(
        kubelet.cni_calls()[calls_before..].is_empty(),
        "no CNI for host-network pods"
    );
}

/// A container that keeps failing is restarted (restart policy Always) with backoff: the
/// status shows its restarts, its last exit and `CrashLoopBackOff`; the phase stays Running.
fn crashing_container_restarts_with_backoff(cp: &ControlPlane, kubelet: &Kubelet) {
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    let crash: Pod = from_json(json!({
        "metadata": {"name": "crash", "namespace": NS},
        "spec": {"nodeName": "n0", "containers": [
            {"name": "app", "image": "shell", "args": ["-c", "echo attempt; exit 3"]}
        ]},
    }));
    cp.block_on(pods.create(&PostParams::default(), &crash))
        .expect("crash pod");
    let pod = cp
        .block_on(eventually(
            "two restarts of the crashing container",
            WAIT,
            || async {
                let pod = pods.get("crash").await.ok()?;
                let status = pod
                    .status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .clone();
                let last_exit = status.last_state.as_ref()?.terminated.as_ref()?.exit_code;
                // Sampled while backing off (not in the moment a restart runs it).
                let backing_off = condition(&pod, "Ready") == Some(false);
                (status.restart_count >= 2 && last_exit == 3 && backing_off).then_some(pod)
            },
        ))
        .expect("restarts");
    assert_eq!(phase(&pod), "Running");
    assert_eq!(condition(&pod, "Ready"), Some(false));
    assert!(kubelet
        .logs(NS, "crash", "app")
        .contains(&"attempt".to_owned()));
    cp.block_on(pods.delete("crash", &DeleteParams::default()))
        .expect("delete crash");
    cp.block_on(eventually("the crash pod to be gone", WAIT, || async {
        pods.get_opt("crash").await.ok()?.is_none().then_some(())
    }))
    .expect("crash pod deleted");
}

#[test]
fn a_pod_waits_for_its_nodes_mesh_agent_and_the_kubelet_cleans_up_when_dropped() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let mut cp = ControlPlane::start().expect("control plane");
    let tb = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("testbed");
    create_namespace(&mut cp);
    let kubelet = Kubelet::start(&cp, &tb, 0, &KubeletOptions::default()).expect("kubelet");
    let admin = cp.client();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    cp.block_on(pods.create(&PostParams::default(), &late_pod()))
        .expect("pod");

    sandbox_fails_without_an_agent(&cp, &kubelet);

    // The agent appears: the next attempt succeeds and the pod starts and becomes Ready by its
    // exec probe.
    let agent = FakeAgent::start(kubelet.cni_socket());
    let appeared = Instant::now();
    cp.block_on(eventually("the pod Running and Ready", WAIT, || async {
        let pod = pods.get("late").await.ok()?;
        (condition(&pod, "Ready") == Some(true)).then_some(())
    }))
    .expect("pod ready");
    let start_secs = appeared.elapsed().as_secs_f64();
    assert!(
        agent
            .requests()
            .iter()
            .any(|r| r.starts_with("add web/late")),
        "{:?}",
        agent.requests()
    );
    // The init container ran to completion first.
    let pod = cp.block_on(pods.get("late")).expect("pod");
    let init = &pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.clone())
        .expect("init statuses")[0];
    let done = init
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("init terminated");
    assert_eq!(
        (done.exit_code, done.reason.as_deref()),
        (0, Some("Completed"))
    );
    assert_eq!(condition(&pod, "Initialized"), Some(true));
    assert_eq!(kubelet.logs(NS, "late", "init"), ["init-ran"]);
    // The testbed's own static pod holds the node's first address.
    let local = kubelet.pod(NS, "late").expect("running");
    assert_eq!(local.ips[0].to_string(), plan::pod_v4(0, 1).to_string());

    host_network_pod_runs_without_cni(&cp, &kubelet, &tb.node(0).link_ipv4.to_string());

    crashing_container_restarts_with_backoff(&cp, &kubelet);

    // Dropping the kubelet stops everything it started (also what a panic would drop).
    let running = kubelet.pods();
    let kubepods = kubelet.kubepods_root().to_path_buf();
    drop(kubelet);
    for pod in &running {
        assert_removed(pod);
    }
    assert!(!kubepods.exists(), "{} left", kubepods.display());
    assert!(
        agent.requests().iter().any(|r| r == "del web/late"),
        "{:?}",
        agent.requests()
    );
    eprintln!(
        "pod started {start_secs:.1}s after the agent appeared; test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

fn eventually_log(kubelet: &Kubelet, pod: &str, container: &str, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = kubelet.logs(NS, pod, container);
        if lines.iter().any(|l| l.contains(needle)) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in {pod}/{container}'s output: {lines:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "killed on purpose: run by a_killed_runs_pods_are_swept in a child process"]
fn kubelet_to_be_killed() {
    let mut cp = ControlPlane::start().expect("control plane");
    let tb = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 0,
    })
    .expect("testbed");
    create_namespace(&mut cp);
    let options = KubeletOptions {
        mesh_cni: false,
        ..KubeletOptions::default()
    };
    let kubelet = Kubelet::start(&cp, &tb, 0, &options).expect("kubelet");
    let pod: Pod = from_json(json!({
        "metadata": {"name": "victim", "namespace": NS},
        "spec": {"nodeName": "n0", "containers": [
            {"name": "app", "image": "shell", "args": ["-c", "exec sleep 600"]}
        ]},
    }));
    let pods: Api<Pod> = Api::namespaced(cp.client(), NS);
    cp.block_on(pods.create(&PostParams::default(), &pod))
        .expect("pod");
    cp.block_on(eventually("the victim running", WAIT, || async {
        (phase(&pods.get("victim").await.ok()?) == "Running").then_some(())
    }))
    .expect("victim running");
    let local = kubelet.pod(NS, "victim").expect("victim");
    println!(
        "RECORD {} {} {}",
        local.netns.expect("netns").display(),
        local.cgroup.display(),
        local.containers[0].pid.expect("pid")
    );
    thread::sleep(Duration::from_secs(600));
}

/// A test killed with SIGKILL runs no destructor: its pods' namespaces, cgroups and processes
/// outlive it, named after its testbed, until the next sweep removes them.
#[test]
fn a_killed_runs_pods_are_swept() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut child = mesh_tests::Process::spawn(
        "killed-test",
        std::process::Command::new(std::env::current_exe().unwrap()).args([
            "--exact",
            "kubelet_to_be_killed",
            "--ignored",
            "--nocapture",
        ]),
    )
    .expect("child test");
    let line = child
        .wait_for_line("the victim pod to run", Duration::from_secs(240), |l| {
            l.starts_with("RECORD ")
        })
        .expect("child's pod");
    let mut parts = line.split_whitespace().skip(1);
    let (netns, cgroup) = (
        PathBuf::from(parts.next().unwrap()),
        PathBuf::from(parts.next().unwrap()),
    );
    let pid: u32 = parts.next().unwrap().parse().unwrap();
    child
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("kill the child");
    child.wait(Duration::from_secs(10)).expect("child gone");
    assert!(netns.exists() && cgroup.exists() && alive(pid));
    mesh_tests::sweep_stale().expect("sweep");
    assert!(!netns.exists(), "{} left", netns.display());
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(!alive(pid), "pid {pid} still runs");
}
