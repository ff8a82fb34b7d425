//! Privileged: the mesh fails closed (issue 13). Each test replays an attack or a mistake that
//! once took a pod out of the mesh, or captured the node's own traffic, and checks it no longer
//! does: a pod's identity change, a pod process squatting the agent's ports, a restarted agent
//! that cannot capture a pod, and runtime handles that name the node's own namespace, address
//! or cgroup.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::binary,
    http::http,
    mesh::{Mesh, Shortcut, NS, PLAIN_NS},
    probe,
    process::run,
    telemetry::{count, scrape, ADMIN, READINESS},
    Agent, Pod, TestbedSpec,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
const APP_PORT: u16 = 8080;

/// One node of `pods` pods, those listed in `unmeshed` outside the mesh; agents' defaults.
fn one_node(pods: usize, unmeshed: &[(usize, usize)]) -> Mesh {
    let spec = TestbedSpec {
        nodes: 1,
        pods_per_node: pods,
    };
    Mesh::new(spec, Shortcut::Default, unmeshed).expect("mesh")
}

fn app(pod: &Pod) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod.ipv4), APP_PORT)
}

/// The agent's readiness on `node`: status and body.
fn readiness(mesh: &Mesh, node: usize) -> (u16, String) {
    http(mesh.tb.node(node), "GET", READINESS, "/healthz/ready").expect("readiness")
}

/// Waits until `check` holds for the agent's readiness answer.
fn wait_readiness(mesh: &Mesh, node: usize, what: &str, check: impl Fn(u16, &str) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = readiness(mesh, node);
        if check(status, &body) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status} {body}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn uncaptured_metric(mesh: &Mesh, node: usize) -> u64 {
    count(
        &scrape(mesh.tb.node(node)).expect("metrics"),
        "mesh_agent_uncaptured_workloads",
        &[],
    )
}

/// `/config_dump`'s entry for workload `ns/name`.
fn dumped_workload(mesh: &Mesh, node: usize, ns: &str, name: &str) -> Value {
    let (status, body) = http(mesh.tb.node(node), "GET", ADMIN, "/config_dump").expect("admin");
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).expect("JSON");
    dump["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .find(|w| w["namespace"] == ns && w["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{ns}/{name} not in {dump:#}"))
}

fn echoes(from: &Pod, to: &Pod) -> bool {
    probe::connect_with(from, app(to), "probe", probe::Eagain::Retry).is_ok()
}

/// An ALLOW policy on `to` (by its `app` label) naming only `from`'s principal.
fn allow_only(mesh: &Mesh, from: &Pod, to: &Pod) {
    mesh.files
        .write(
            "authz-allow-only.yaml",
            &format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-only\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      app: {}\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/{NS}/sa/sa-{}\"]\n",
                to.name, from.name
            ),
        )
        .expect("policy");
}

/// Bypass 1 of issue 13: changing an enrolled pod's service account used to remove and
/// re-enroll it before its old listeners were closed; enrolment failed ("Address already in
/// use"), the pod stayed uncaptured and an unmeshed client reached a port a policy denied. Now
/// the identity changes in place: the pod is never re-enrolled, the policy keeps holding.
#[test]
fn an_identity_change_keeps_the_pod_captured_and_its_policy_enforced() {
    let mut mesh = one_node(3, &[(0, 2)]);
    let (client, server, plain) = (
        mesh.pod(0, 0).clone(),
        mesh.pod(0, 1).clone(),
        mesh.pod(0, 2).clone(),
    );
    let _srv = probe::serve(&server, app(&server)).expect("server");
    allow_only(&mesh, &client, &server);
    let deadline = Instant::now() + WAIT;
    while echoes(&plain, &server) {
        assert!(Instant::now() < deadline, "the policy never held");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(echoes(&client, &server), "the named client is refused");
    let from = mesh.agents[0].log_len();
    // The server pod's service account changes.
    let file = format!("pod-{NS}-{}.yaml", server.name);
    let text = std::fs::read_to_string(mesh.files.dir().join(&file)).expect("pod file");
    let changed = text.replace(
        &format!("serviceAccountName: sa-{}", server.name),
        "serviceAccountName: renamed",
    );
    assert_ne!(text, changed);
    mesh.files.write(&file, &changed).expect("pod file");
    // Once the agent has the new view, the policy must still hold: the attack was an unmeshed
    // client reaching the server while the pod was out of the mesh.
    mesh.agents[0]
        .wait_for_log_from(from, "the new view", WAIT, |l| {
            l.contains("cluster state updated")
        })
        .expect("new view");
    for _ in 0..10 {
        assert!(!echoes(&plain, &server), "the unmeshed client got through");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(echoes(&client, &server), "the named client is refused");
    assert_eq!(readiness(&mesh, 0).0, 200);
    assert_eq!(uncaptured_metric(&mesh, 0), 0);
    let logs = mesh.agents[0].logs();
    let after = &logs[from..];
    assert!(
        after
            .iter()
            .any(|l| l.contains("identity changed in place") && l.contains(&server.name)),
        "changed in place: {after:#?}"
    );
    assert!(
        !after.iter().any(|l| l.contains("pod not captured")
            || l.contains("removed from the mesh")
            || l.contains("pod enrolled")),
        "the pod was re-enrolled: {after:#?}"
    );
}

/// `mesh-probe bind` as user `nobody` in `pod`: each address's line.
fn bind_as_nobody(pod: &Pod, addrs: &[String]) -> Vec<String> {
    let bin = binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let mut cmd = pod.command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin)
        .arg("bind")
        .args(addrs);
    run(&mut cmd)
        .expect("mesh-probe bind")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn assert_binds(pod: &Pod, when: &str) {
    let reserved = [
        format!("{}:15001", pod.ipv4),
        format!("{}:15006", pod.ipv4),
        format!("{}:15008", pod.ipv4),
        "0.0.0.0:15001".to_owned(),
        "[::]:15006".to_owned(),
        format!("[{}]:15008", pod.ipv6),
    ];
    let mut addrs = reserved.to_vec();
    addrs.push(format!("{}:8080", pod.ipv4));
    let lines = bind_as_nobody(pod, &addrs);
    for (addr, line) in reserved.iter().zip(&lines) {
        assert!(
            line.starts_with(&format!("refused {addr} ")) && line.contains("not permitted"),
            "{when}: {addr}: {line}"
        );
    }
    assert!(
        lines.last().is_some_and(|l| l.starts_with("bound ")),
        "{when}: an ordinary port is refused: {lines:?}"
    );
}

/// Bypass 2 of issue 13: while the agent was down, a pod process (`nobody`) bound the pod's
/// 15001 and 15006; the restarted agent could not enroll the pod and the pod's traffic went
/// direct. Now a meshed pod's processes can never bind the agent's ports (a `cgroup/bind` hook,
/// pinned with the other links, so also while the agent is down), and the restarted agent
/// captures the pod.
#[test]
fn pod_processes_cannot_bind_the_agents_ports_even_while_it_is_down() {
    let mut mesh = Mesh::of(1, 2, Shortcut::Default).expect("mesh");
    let (client, server) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    mesh.agents.remove(0).kill().expect("agent killed");
    assert_binds(&client, "agent down");
    // Inbound connections to a meshed pod fail at once while no agent serves it.
    let _srv = probe::serve(&server, app(&server)).expect("server");
    let started = Instant::now();
    let err = probe::connect(&client, app(&server), "while down").expect_err("must fail");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let agent = mesh.start_agent(0).expect("restarted agent");
    mesh.agents.push(agent);
    assert!(echoes(&client, &server), "served again after the restart");
    assert_binds(&client, "agent up");
}

/// Bypass 2, second half: a restarted agent detached an earlier agent's links for a pod it could
/// not capture itself. Now it keeps them until its own are in place: the pod's connections fail
/// (never go direct) while the new agent refuses the pod, readiness and metrics say so, and once
/// the pod can be captured it is, and the earlier links go.
#[test]
fn a_restarted_agent_keeps_the_earlier_links_of_a_pod_it_cannot_capture() {
    let mut mesh = one_node(2, &[(0, 1)]);
    let (pod, plain) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let _srv = probe::serve(&plain, app(&plain)).expect("server");
    assert!(
        echoes(&pod, &plain),
        "through the mesh to an unmeshed server"
    );
    mesh.agents.remove(0).kill().expect("agent killed");
    // Meanwhile the pod's record names a cgroup the new agent must refuse: the node's, which
    // contains the agent's own.
    let node = mesh.tb.node(0).clone();
    let mut wrong = pod.clone();
    wrong.cgroup.clone_from(&node.cgroup);
    mesh.files.pod(&wrong, "n0", NS, &[]).expect("pod file");
    // `Agent::start` returns once the agent has reconciled (and detached earlier links).
    let agent = Agent::start(&node, &mesh.options).expect("restarted agent");
    mesh.agents.push(agent);
    // The earlier agent's links still capture the pod: its connection fails, never goes direct.
    for _ in 0..3 {
        assert!(!echoes(&pod, &plain), "the uncaptured pod went direct");
    }
    let line = mesh.agents[0]
        .wait_for_log_from(0, "the refusal", WAIT, |l| {
            l.contains("pod not captured") && l.contains(&pod.name)
        })
        .expect("refusal");
    assert!(
        line.contains("contains the agent's own cgroup"),
        "the reason: {line}"
    );
    wait_readiness(&mesh, 0, "not ready, naming the pod", |status, body| {
        status == 503 && body.contains(&format!("pod {NS}/{}", pod.name))
    });
    assert_eq!(uncaptured_metric(&mesh, 0), 1);
    let entry = dumped_workload(&mesh, 0, NS, &pod.name);
    assert!(
        entry["not_captured_because"]
            .as_str()
            .is_some_and(|r| r.contains("contains the agent's own cgroup")),
        "{entry:#}"
    );
    // The record is right again: the agent captures the pod and lets the earlier links go.
    let from = mesh.agents[0].log_len();
    mesh.files.pod(&pod, "n0", NS, &[]).expect("pod file");
    mesh.agents[0]
        .wait_for_log_from(from, "the pod to be captured", WAIT, |l| {
            l.contains("pod enrolled") && l.contains(&pod.name)
        })
        .expect("enrolled");
    mesh.agents[0]
        .wait_for_log_from(from, "the earlier links to go", WAIT, |l| {
            l.contains("detached the links of an earlier agent")
        })
        .expect("earlier links detached");
    wait_readiness(&mesh, 0, "ready", |status, _| status == 200);
    assert!(echoes(&pod, &plain), "served again");
    assert_eq!(uncaptured_metric(&mesh, 0), 0);
}

/// Bypass 3 of issue 13: the agent trusted whatever namespace, cgroup and address it was given.
/// A pod record naming the node's own network namespace, one of the node's addresses, or a
/// cgroup that contains the agent is refused naming the pod and the reason (readiness and
/// metrics say so), nothing is attached, and the node's own traffic is untouched. A pod IP of
/// `0.0.0.0` or `127.0.0.1` is refused as soon as the config is read.
#[test]
fn runtime_handles_that_are_the_nodes_own_are_refused() {
    const UNCAPTURED: &str = "pod not captured";
    const UNUSABLE: &str = "never a pod's own address";
    let mut mesh = one_node(2, &[(0, 1)]);
    let node = mesh.tb.node(0).clone();
    let victim = mesh.pod(0, 1).clone();
    let mut agent_netns = victim.clone();
    agent_netns.netns.clone_from(&node.netns);
    let mut node_address = victim.clone();
    node_address.ipv4 = node.link_ipv4;
    let mut agent_cgroup = victim.clone();
    agent_cgroup.cgroup.clone_from(&node.cgroup);
    let mut unspecified = victim.clone();
    unspecified.ipv4 = Ipv4Addr::UNSPECIFIED;
    let mut loopback = victim.clone();
    loopback.ipv4 = Ipv4Addr::LOCALHOST;
    // The runtime handles are refused when the agent checks them (the pod is reported
    // uncaptured); an unusable pod IP (`0.0.0.0` once refused every inbound connection of the
    // node, the agent's metrics port included) already when the config is read, naming the pod,
    // the field and why, and the file's last good version stays.
    for (record, needle, reason) in [
        (&agent_netns, UNCAPTURED, "is the agent's own".to_owned()),
        (
            &node_address,
            UNCAPTURED,
            "is one of this node's own".to_owned(),
        ),
        (
            &agent_cgroup,
            UNCAPTURED,
            "contains the agent's own cgroup".to_owned(),
        ),
        (&unspecified, UNUSABLE, "0.0.0.0 is unspecified".to_owned()),
        (&loopback, UNUSABLE, "127.0.0.1 is loopback".to_owned()),
    ] {
        let from = mesh.agents[0].log_len();
        mesh.files
            .pod(
                record,
                "n0",
                PLAIN_NS,
                &[(mesh_tests::cluster::DATAPLANE_MODE, "ambient")],
            )
            .expect("pod file");
        let line = mesh.agents[0]
            .wait_for_log_from(from, "the refusal", WAIT, |l| {
                l.contains(needle) && l.contains(&victim.name)
            })
            .expect("refusal");
        assert!(line.contains(&reason), "{reason}: {line}");
        let uncaptured = needle == UNCAPTURED;
        if uncaptured {
            wait_readiness(&mesh, 0, "not ready", |status, body| {
                status == 503 && body.contains(&victim.name)
            });
        }
        assert_eq!(
            uncaptured_metric(&mesh, 0),
            u64::from(uncaptured),
            "{reason}"
        );
        // The node's own endpoints still answer (a capture of the node's namespace, or of
        // 0.0.0.0, refused them all once).
        let m = scrape(&node).expect("the node's metrics port still answers");
        assert!(!m.is_empty());
        // Back out of the mesh: ready again.
        mesh.files
            .pod(&victim, "n0", PLAIN_NS, &[])
            .expect("pod file");
        wait_readiness(&mesh, 0, "ready", |status, _| status == 200);
    }
    // The meshed pod was served all along.
    let meshed = mesh.pod(0, 0).clone();
    let _srv = probe::serve(&meshed, app(&meshed)).expect("server");
    assert!(echoes(&victim, &meshed), "the meshed pod is served");
}
