//! Privileged, end to end: the mesh installed, upgraded and uninstalled with Helm, as users do,
//! on the real control plane; the testbed kubelets run the chart's `DaemonSet` (the agent and
//! its CNI installer) on two nodes and its CA `Deployment`, from the image `mesh-agent` (this
//! repository's binary).
//!
//! - `helm install`: a labelled namespace's pods are meshed from their first packet, traffic
//!   between the nodes is mutual TLS with the pods' identities, and the agent's metrics are
//!   scraped through its pod's port from another node.
//! - `helm upgrade` with a value that rolls the `DaemonSet`, under steady traffic: no try ever
//!   gets through without the mesh (each success is in an agent's access log), the failures are
//!   counted and reported, and so is the fate of a connection open across the roll.
//! - `helm uninstall`: the agents release their pods (programs detached), remove their pins and
//!   the CNI entry; nothing of the mesh is left in bpffs or in the CNI configuration, and the
//!   pods' traffic flows directly.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod, ServiceAccount},
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api,
};
use serde_json::json;

use mesh_tests::{
    kube::{
        install::conflist_names_mesh_cni,
        mesh::{repeat_tries, wait_lines, KubeMesh},
        AGENT_NAMESPACE,
    },
    telemetry::lines_once,
};

const NS: &str = "shop";
/// How long an agent's access record may take to reach its log after the connection ended.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Access-log records of the agent's `lines` for connections from `ip` carried with mutual TLS
/// in `direction`, and completed (no response flag).
fn carried(lines: &[String], ip: &str, direction: &str) -> usize {
    lines
        .iter()
        .filter(|l| {
            l.starts_with('{')
                && l.contains("\"log\":\"access\"")
                && l.contains(&format!("\"direction\":\"{direction}\""))
                && l.contains(&format!("\"addr\":\"{ip}:"))
                && l.contains("\"connection_security_policy\":\"mutual_tls\"")
                && l.contains("\"response_flags\":\"-\"")
        })
        .count()
}

/// The programs attached to the cgroup at `path` (`bpftool cgroup show`), one per line.
fn attached(path: &std::path::Path) -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(path)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// The chart's not-ready taint (`notReadyTaint.key`).
const NOT_READY: &str = "mesh-agent/not-ready";

#[test]
fn helm_install_upgrade_and_uninstall_on_two_nodes() {
    // The nodes join with the not-ready taint: a pod created before the mesh is installed is
    // not scheduled.
    let mesh = KubeMesh::without_mesh(2, NS, true, &[NOT_READY]).expect("cluster");
    mesh.start_probe("early", &["serve", "0.0.0.0:8080"], Some("n0"))
        .expect("early pod");
    thread::sleep(Duration::from_secs(2));
    let early = mesh
        .cp
        .block_on(mesh.pods().get("early"))
        .expect("early pod");
    assert_eq!(
        early.spec.as_ref().and_then(|s| s.node_name.clone()),
        None,
        "not scheduled on a tainted node: {:?}",
        early.status
    );

    let started = Instant::now();
    mesh.helm_release("install", &[]).expect("helm install");
    println!("helm install: ready in {:?}", started.elapsed());
    // Each node's CNI installer removed the taint once its agent was ready and the entry in
    // place; the early pod then went through mesh-cni: captured before its first packet.
    for node in ["n0", "n1"] {
        let taints = mesh
            .cp
            .block_on(Api::<Node>::all(mesh.cp.client()).get(node))
            .expect("node")
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default();
        assert!(
            taints.iter().all(|t| t.key != NOT_READY),
            "{node}: {taints:?}"
        );
    }
    mesh.wait_event("early", "MeshCaptured")
        .expect("early pod captured");
    let add = mesh.kubelets[0]
        .cni_calls()
        .into_iter()
        .find(|c| c.pod == format!("{NS}/early") && c.plugin == "mesh-cni" && c.command == "ADD");
    assert_eq!(add.map(|c| c.exit_code), Some(0), "captured at its CNI ADD");
    let agents = mesh.agent_pods().expect("agent pods");
    assert_eq!(agents.len(), 2, "one agent per node");
    let before = [
        mesh.agent_pod(0).expect("agent on n0"),
        mesh.agent_pod(1).expect("agent on n1"),
    ];

    // Meshed across the nodes, from the first packet.
    let vip = mesh.start_echo(Some("n1"), true).expect("echo");
    let target = format!("{vip}:80");
    mesh.start_client("first", &target, Some("n0"))
        .expect("client");
    assert_eq!(mesh.finished("first").expect("phase"), "Succeeded");
    let ip = mesh.pod_ip("first").expect("address");
    let outbound = lines_once(
        || mesh.agent_logs(0, &before[0]),
        LOG_WAIT,
        |l| carried(l, &ip, "outbound") > 0,
    );
    assert_eq!(
        carried(&outbound, &ip, "outbound"),
        1,
        "n0's agent tunnelled the first connection over mutual TLS"
    );
    let known = |l: &String| {
        l.contains("\"direction\":\"inbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains(&format!("spiffe://cluster.local/ns/{NS}/sa/default"))
    };
    let inbound = lines_once(
        || mesh.agent_logs(1, &before[1]),
        LOG_WAIT,
        |l| l.iter().any(known),
    );
    assert!(
        inbound.iter().any(known),
        "n1's agent knew the client by its identity"
    );

    // Scraped as Prometheus does: the agent pod's metrics port, from another node.
    let n0 = mesh.tb.node(0).link_ipv4;
    let (code, scrape) =
        mesh_tests::http::http(mesh.tb.node(1), "GET", &format!("{n0}:15020"), "/metrics")
            .expect("scrape");
    assert_eq!(code, 200);
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!("source_workload_namespace=\"{NS}\""))),
        "{scrape}"
    );

    upgrade(&mesh, &target, &before);
    ca_down(&mesh, &target);
    uninstall(&mesh, &target);
}

/// `helm upgrade` with a value that changes the agents' pod template, under steady traffic
/// from n0 to the echo pod on n1 (a new connection every 100 ms) and with connections held open
/// across the roll (from n0, and from n1 beside the echo pod).
fn upgrade(mesh: &KubeMesh, target: &str, before: &[String; 2]) {
    let steady = [
        "repeat",
        target,
        "--every-ms",
        "100",
        "--duration-ms",
        "40000",
    ];
    mesh.start_probe("steady", &steady, Some("n0"))
        .expect("steady client");
    let held = |node: &str| {
        let args = [
            "parallel",
            target,
            "--conns",
            "4",
            "--bytes",
            "1024",
            "--hold-ms",
            "30000",
            "--again",
        ];
        mesh.start_probe(&format!("held-{node}"), &args, Some(node))
            .expect("held connections");
    };
    held("n0");
    held("n1");
    wait_lines(mesh, 0, "steady", "echo ok", 10).expect("the steady client got through");

    let rolled = Instant::now();
    mesh.helm_release("upgrade", &[("cni.watchMs", "500")])
        .expect("helm upgrade");
    println!("helm upgrade: both agents rolled in {:?}", rolled.elapsed());
    let after = [
        mesh.agent_pod(0).expect("new agent on n0"),
        mesh.agent_pod(1).expect("new agent on n1"),
    ];
    assert_ne!(after, *before, "the upgrade replaced the agent pods");

    assert_eq!(mesh.finished("steady").expect("phase"), "Succeeded");
    let (lines, tries) = repeat_tries(mesh, 0, "steady");
    let ok = tries.iter().filter(|t| **t).count();
    // Runs of failures: each is one agent's restart (closed while it was away).
    let mut runs = Vec::new();
    let mut run = 0;
    for t in &tries {
        if *t {
            if run > 0 {
                runs.push(run);
            }
            run = 0;
        } else {
            run += 1;
        }
    }
    if run > 0 {
        runs.push(run);
    }
    println!(
        "during the roll: {} tries every 100 ms, {ok} carried, {} failed closed in runs of {runs:?} tries (~{:?} ms of failing new connections per agent restart)",
        tries.len(),
        tries.len() - ok,
        runs.iter().map(|r| r * 100).collect::<Vec<_>>()
    );
    assert!(
        tries.last() == Some(&true),
        "tries succeed again after the roll: {lines:#?}"
    );
    never_around_the_mesh(mesh, &lines, ok, [&before[0], &after[0]]);
    for node in ["n0", "n1"] {
        let name = format!("held-{node}");
        let phase = mesh.finished(&name).expect("phase");
        let index = usize::from(node == "n1");
        let result = mesh.kubelets[index].logs(NS, &name, "client");
        println!(
            "connections held open across the roll from {node}: {phase}, {:?}",
            result
                .iter()
                .filter(|l| l.starts_with("ok=") || l.starts_with("open=") || l.contains("first:"))
                .collect::<Vec<_>>()
        );
    }
}

/// Every successful try of the steady client (its `lines`, `ok` of them), by its source address
/// and port, is in the access log of one of n0's `agents` (pods), tunnelled with mutual TLS and
/// completed: none got through around the mesh.
fn never_around_the_mesh(mesh: &KubeMesh, lines: &[String], ok: usize, agents: [&String; 2]) {
    let locals: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("echo ok "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert_eq!(locals.len(), ok);
    let records = || -> Vec<String> {
        agents
            .iter()
            .flat_map(|pod| mesh.agent_logs(0, pod))
            .filter(|l| {
                l.starts_with('{')
                    && l.contains("\"direction\":\"outbound\"")
                    && l.contains("\"connection_security_policy\":\"mutual_tls\"")
                    && l.contains("\"response_flags\":\"-\"")
            })
            .collect()
    };
    let uncarried = || -> Vec<String> {
        let records = records();
        locals
            .iter()
            .filter(|local| {
                let key = format!("\"addr\":\"{local}\"");
                !records.iter().any(|r| r.contains(&key))
            })
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !uncarried().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        uncarried(),
        Vec::<String>::new(),
        "tries that got through without an agent's record (around the mesh)"
    );
}

/// Scales the CA `Deployment` to `replicas` and waits until that many of its pods run.
fn scale_ca(mesh: &KubeMesh, replicas: i32) {
    let api: Api<Deployment> = Api::namespaced(mesh.cp.client(), AGENT_NAMESPACE);
    let patch = json!({"spec": {"replicas": replicas}});
    mesh.cp
        .block_on(api.patch("mesh-ca", &PatchParams::default(), &Patch::Merge(patch)))
        .expect("scale the CA");
    let running = || {
        mesh.kubelets
            .iter()
            .flat_map(mesh_tests::kube::Kubelet::pods)
            .filter(|p| p.name.starts_with("mesh-ca-") && p.containers.iter().all(|c| c.ready))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while running() != usize::try_from(replicas).expect("replicas") {
        assert!(
            Instant::now() < deadline,
            "the CA did not scale to {replicas}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A pod `name` on n0 under service account `account` running `mesh-probe` with `args`.
fn probe_as(mesh: &KubeMesh, name: &str, account: &str, args: &[&str]) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"restartPolicy": "Never", "serviceAccountName": account,
                 "nodeSelector": {"kubernetes.io/hostname": "n0"},
                 "containers": [{"name": "client", "image": "mesh-probe", "args": args}]},
    }))
    .expect("pod");
    mesh.cp
        .block_on(mesh.pods().create(&PostParams::default(), &pod))
        .expect("probe pod");
}

/// The CA down: the agents keep serving with the certificates they hold; an identity new to
/// the node gets none (its connections fail closed) while the agent retries, and gets one once
/// the CA is back.
fn ca_down(mesh: &KubeMesh, target: &str) {
    let accounts: Api<ServiceAccount> = Api::namespaced(mesh.cp.client(), NS);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "late", "namespace": NS}}))
            .expect("service account");
    mesh.cp
        .block_on(accounts.create(&PostParams::default(), &account))
        .expect("service account");
    scale_ca(mesh, 0);
    probe_as(
        mesh,
        "ca-down-known",
        "default",
        &["connect", target, "hello"],
    );
    assert_eq!(
        mesh.finished("ca-down-known").expect("phase"),
        "Succeeded",
        "an identity the agents hold a certificate for is served while the CA is down"
    );
    // A steady client of an identity new to the node.
    let steady = [
        "repeat",
        target,
        "--every-ms",
        "500",
        "--duration-ms",
        "90000",
    ];
    probe_as(mesh, "late", "late", &steady);
    let agent = mesh.agent_pod(0).expect("agent on n0");
    let late = format!("spiffe://cluster.local/ns/{NS}/sa/late");
    let lines = || mesh.kubelets[0].logs(NS, "late", "client");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines().iter().any(|l| l.starts_with("failed")) {
        assert!(
            Instant::now() < deadline,
            "the new identity's tries never failed"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        mesh.agent_logs(0, &agent)
            .iter()
            .any(|l| l.contains("obtaining a workload certificate failed") && l.contains(&late)),
        "the agent says it cannot get the certificate, and retries"
    );
    let back = Instant::now();
    scale_ca(mesh, 1);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !lines().iter().any(|l| l.starts_with("echo ok")) {
        assert!(
            Instant::now() < deadline,
            "no try got through after the CA came back"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        mesh.agent_logs(0, &agent)
            .iter()
            .any(|l| l.contains("obtained a workload certificate") && l.contains(&late)),
        "the agent's retry got the certificate"
    );
    let tries: Vec<String> = lines()
        .into_iter()
        .filter(|l| l.starts_with("echo ok") || l.starts_with("failed"))
        .collect();
    let first_ok = tries
        .iter()
        .position(|l| l.starts_with("echo ok"))
        .expect("ok");
    println!(
        "CA down: the held identity served; the new one's {first_ok} tries failed closed; the first got through {:?} after the CA was scaled back up",
        back.elapsed()
    );
    assert!(
        tries[..first_ok].iter().all(|l| l.starts_with("failed")),
        "{tries:#?}"
    );
}

/// `helm uninstall`: nothing of the mesh is left, and the pods' traffic flows directly.
fn uninstall(mesh: &KubeMesh, target: &str) {
    let echo = mesh.kubelets[1]
        .pods()
        .into_iter()
        .find(|p| p.name.starts_with("echo-"))
        .expect("echo pod");
    assert!(
        !attached(&echo.cgroup).is_empty(),
        "the echo pod's cgroup has the capture programs before"
    );
    let args: Vec<String> = [
        "uninstall",
        "mesh",
        "--namespace",
        AGENT_NAMESPACE,
        "--wait",
    ]
    .map(str::to_owned)
    .into();
    mesh.helm(&args).expect("helm uninstall");
    mesh.wait_chart_pods_gone(Duration::from_secs(60))
        .expect("chart pods gone");
    assert_eq!(
        attached(&echo.cgroup),
        Vec::<String>::new(),
        "programs detached from the echo pod"
    );
    let pins = mesh.tb.bpffs_dir().join("mesh-agent");
    assert!(!pins.exists(), "{} left in bpffs", pins.display());
    for kubelet in &mesh.kubelets {
        assert!(
            !conflist_names_mesh_cni(kubelet.cni_conf_dir()),
            "mesh-cni entry left in {}",
            kubelet.cni_conf_dir().display()
        );
    }
    // A new pod starts (no CNI entry waits for an agent) and reaches the echo pod directly.
    let (_, echo_ip) = mesh.echo_pod().expect("echo pod");
    let _ = target;
    mesh.start_client("after", &format!("{echo_ip}:8080"), Some("n0"))
        .expect("client");
    assert_eq!(mesh.finished("after").expect("phase"), "Succeeded");
}
