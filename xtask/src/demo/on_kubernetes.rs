//! `cargo xtask demo --kube`: the mesh installed with Helm. A real control plane (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler), two testbed nodes each with its
//! testbed kubelet, and `helm install` of `deploy/chart`: the kubelets run its DaemonSet (the
//! agent, and its installer, which chains `mesh-cni` and lifts the node's not-ready taint) and
//! its CA Deployment (Istio's certificate API). An echo Deployment runs unmeshed; labelling its namespace
//! through the API captures the running pod; a client pod on the other node then reaches it
//! through its Service over HBONE, and the demo prints the Events, both agents' access log
//! records and their metrics. An `AuthorizationPolicy` created through the API then denies the
//! client. `helm uninstall` then leaves nothing behind, and everything is torn down.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use kube::api::PostParams;
use mesh_tests::{
    http::http,
    kube::{
        install::conflist_names_mesh_cni,
        mesh::{dump_endpoints, dump_has_policy, wait_dump, KubeMesh, MESH_LABEL},
    },
    telemetry::{access_records_in, METRICS},
};

const NS: &str = "demo";
/// The chart's not-ready taint (`notReadyTaint.key`).
const NOT_READY: &str = "mesh-agent/not-ready";

pub fn run() -> Result<()> {
    println!(
        "\n== starting a Kubernetes control plane and two nodes, each with a testbed kubelet =="
    );
    let started = Instant::now();
    let mesh =
        KubeMesh::without_mesh(2, NS, false, &[NOT_READY]).context("starting the cluster")?;
    println!(
        "API server https://{} (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; {} upstream CRDs), up in {:.1}s",
        mesh.cp.apiserver_addr(),
        mesh.cp.crds().len(),
        started.elapsed().as_secs_f64()
    );
    println!("nodes n0, n1 registered with the taint {NOT_READY}:NoSchedule (no ordinary pod yet)");

    install(&mesh)?;
    println!("namespace {NS}: not labelled, nothing in it is meshed");

    println!("\n== echo Deployment and Service in {NS}, on n1 ==");
    let vip = mesh
        .start_echo(Some("n1"), false)
        .context("starting echo")?;
    let (echo, _) = mesh.echo_pod()?;
    let echo_name = echo.metadata.name.clone().unwrap_or_default();
    println!("pod {NS}/{echo_name} ready; Service echo at {vip}:80");
    let dump = wait_dump(mesh.tb.node(0), "the echo endpoint", |d| {
        !dump_endpoints(d, NS, "echo").is_empty()
    })?;
    println!(
        "agent n0 knows its endpoints from the controller manager's EndpointSlice: {}",
        serde_json::Value::Array(dump_endpoints(&dump, NS, "echo"))
    );

    println!("\n== kubectl label namespace {NS} {MESH_LABEL}=ambient (through the API) ==");
    let labelled = Instant::now();
    mesh.label_namespace(true)?;
    let event = mesh.wait_event("echo-", "MeshCaptured")?;
    println!(
        "running pod captured in {:.0} ms, no restart; its Event: {} {}: {}",
        labelled.elapsed().as_secs_f64() * 1000.0,
        event.type_.as_deref().unwrap_or_default(),
        event.reason.as_deref().unwrap_or_default(),
        event.note.as_deref().unwrap_or_default()
    );

    println!("\n== client pod on n0 connects to {vip}:80 as it starts ==");
    let target = format!("{vip}:80");
    let from = [agent_lines(&mesh, 0)?.len(), agent_lines(&mesh, 1)?.len()];
    mesh.start_client("client", &target, Some("n0"))?;
    let phase = mesh.finished("client")?;
    println!(
        "pod {NS}/client: {phase}; container output {:?}",
        mesh.kubelets[0].logs(NS, "client", "client")
    );
    ensure!(phase == "Succeeded", "the client did not get its echo");
    let event = mesh.wait_event("client", "MeshCaptured")?;
    println!(
        "captured before its first packet (CNI hand-over): {}",
        event.note.as_deref().unwrap_or_default()
    );
    let client_ip = mesh.pod_ip("client")?;
    for (i, role) in [(0, "source"), (1, "destination")] {
        let records = wait_records(&mesh, i, from[i], &client_ip)?;
        println!("\n== agent n{i} ({role}) access log: HBONE, mutual TLS, both identities ==");
        for record in &records {
            println!("{record}");
        }
    }

    policy(&mesh, &target)?;

    println!("\n== agent n1 metrics (port 15020) ==");
    let (status, metrics) = http(mesh.tb.node(1), "GET", METRICS, "/metrics")?;
    ensure!(status == 200, "metrics: HTTP {status}");
    for line in metrics.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\"")
            || l.starts_with("mesh_agent_authorization_decisions_total")
            || l.starts_with("mesh_agent_kubernetes_api_reachable")
    }) {
        println!("{line}");
    }

    uninstall(&mesh)?;

    println!("\n== teardown ==");
    let id = mesh.cp.id().to_owned();
    drop(mesh);
    println!("control plane {id}, kubelets and testbed removed");
    Ok(())
}

/// `helm install` of the chart; prints the agent and CA pods.
fn install(mesh: &KubeMesh) -> Result<()> {
    println!("\n== helm install mesh deploy/chart -n mesh-system --wait ==");
    let installing = Instant::now();
    mesh.helm_release("install", &[]).context("helm install")?;
    println!("installed in {:.1}s:", installing.elapsed().as_secs_f64());
    for pod in mesh.agent_pods()? {
        println!(
            "  agent pod {} on {}",
            pod.metadata.name.unwrap_or_default(),
            pod.spec.and_then(|s| s.node_name).unwrap_or_default()
        );
    }
    for kubelet in &mesh.kubelets {
        for pod in kubelet
            .pods()
            .iter()
            .filter(|p| p.name.starts_with("mesh-ca-"))
        {
            println!(
                "  CA pod {} on {} (Istio's certificate API, port 15012)",
                pod.name,
                kubelet.node_name()
            );
        }
    }
    println!("  the installers chained mesh-cni and lifted the not-ready taint once their agent was ready");
    Ok(())
}

/// `helm uninstall`: no pin and no `mesh-cni` entry left.
fn uninstall(mesh: &KubeMesh) -> Result<()> {
    println!("\n== helm uninstall mesh -n mesh-system --wait ==");
    let args: Vec<String> = ["uninstall", "mesh", "--namespace", "mesh-system", "--wait"]
        .map(str::to_owned)
        .into();
    mesh.helm(&args).context("helm uninstall")?;
    mesh.wait_chart_pods_gone(Duration::from_secs(60))?;
    let pins = mesh.tb.bpffs_dir().join("mesh-agent");
    ensure!(!pins.exists(), "{} left in bpffs", pins.display());
    for kubelet in &mesh.kubelets {
        ensure!(
            !conflist_names_mesh_cni(kubelet.cni_conf_dir()),
            "mesh-cni left in {}",
            kubelet.cni_conf_dir().display()
        );
    }
    println!("agents released their pods and removed their pins; the installers removed the mesh-cni entry");
    Ok(())
}

/// A DENY `AuthorizationPolicy` created through the API for the client's identity: a second
/// client is refused by the server's agent, which logs why.
fn policy(mesh: &KubeMesh, target: &str) -> Result<()> {
    let principal = format!("cluster.local/ns/{NS}/sa/default");
    println!("\n== AuthorizationPolicy {NS}/deny-default through the API: DENY {principal} to app=echo ==");
    let api = mesh.authorization_policies();
    let object = mesh.deny_echo_from("deny-default", &principal);
    let created = Instant::now();
    mesh.cp
        .block_on(api.create(&PostParams::default(), &object))
        .context("creating the policy")?;
    wait_dump(mesh.tb.node(1), "the policy at n1", |d| {
        dump_has_policy(d, "deny-default")
    })?;
    println!(
        "enforced by agent n1 {:.0} ms after it was created",
        created.elapsed().as_secs_f64() * 1000.0
    );
    let from = agent_lines(mesh, 1)?.len();
    mesh.start_client("denied", target, Some("n0"))?;
    let phase = mesh.finished("denied")?;
    println!(
        "pod {NS}/denied: {phase}; container output {:?}",
        mesh.kubelets[0].logs(NS, "denied", "client")
    );
    ensure!(phase == "Failed", "the denied client got through");
    println!("\n== agent n1 (destination) access log ==");
    let denied_ip = mesh.pod_ip("denied")?;
    for record in wait_records(mesh, 1, from, &denied_ip)? {
        println!("{record}");
    }
    Ok(())
}

/// What the agent pod of node `index` printed so far.
fn agent_lines(mesh: &KubeMesh, index: usize) -> Result<Vec<String>> {
    let pod = mesh.agent_pod(index)?;
    Ok(mesh.agent_logs(index, &pod))
}

/// Node `index`'s agent's access log records after line `from` of connections from `src_ip`
/// (not the kubelet's readiness probes), once there is one.
fn wait_records(
    mesh: &KubeMesh,
    index: usize,
    from: usize,
    src_ip: &str,
) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let prefix = format!("{src_ip}:");
    loop {
        let lines = agent_lines(mesh, index)?;
        let records: Vec<_> = access_records_in(lines.get(from..).unwrap_or_default())
            .into_iter()
            .filter(|r| {
                r["src"]["addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&prefix))
            })
            .collect();
        if !records.is_empty() {
            return Ok(records);
        }
        ensure!(
            Instant::now() < deadline,
            "no access log record from {src_ip} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
