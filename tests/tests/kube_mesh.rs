//! Privileged, end to end on Kubernetes: the real control plane, the testbed kubelet running
//! pods through the CNI chain (`mtb-cni`, then the real `mesh-cni`), and the real agent reading
//! the API with its least RBAC and taking the pods over `mesh-cni`'s hand-over.
//!
//! Every test runs two nodes. Proven here: a client pod in a labelled namespace whose container
//! connects at start-up
//! through a Service reaches the server, and the agent carried that very connection (its access
//! log holds it: captured before its first packet); both pods carry a `MeshCaptured` Event; a
//! pod created while the agent is down does not start (its sandbox fails, no container runs)
//! until the agent is back, and is then captured; an agent that crashed and restarted re-learns
//! its running pods from `/proc` (the hand-overs it held are gone) and carries their traffic
//! (a steady client's tries fail closed while it is down, then all are carried again);
//! labelling a namespace through the API captures its running pods, policy applies within a
//! second, unlabelling releases them; kubelet-run pods talk over HBONE with their SPIFFE identities, and Services
//! reach their endpoints through `EndpointSlices` (the controller manager's, and one written
//! through the API for a Service without selector).

use std::{
    thread,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api,
};
use mesh_tests::{
    kube::{
        mesh::{
            dump_endpoints, dump_has_policy, from_json, repeat_tries, wait_dump, wait_lines,
            KubeMesh,
        },
        Kubelet,
    },
    telemetry::{access_records_in, lines_once},
    Agent,
};
use serde_json::json;

const NS: &str = "mesh";
/// How long an agent's access record may take to reach its log after the connection ended
/// (the log is written in batches).
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Whether `agent`'s access log holds a connection from `ip` to the echo Service (waiting for
/// it a while).
fn carried(agent: &Agent, ip: &str) -> bool {
    let hit = |l: &String| {
        l.contains("\"log\":\"access\"")
            && l.contains("\"direction\":\"outbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("echo.mesh.svc.cluster.local")
    };
    lines_once(|| agent.logs(), LOG_WAIT, |l| l.iter().any(hit))
        .iter()
        .any(hit)
}

#[test]
fn pods_the_kubelet_starts_are_captured_before_their_first_packet_and_wait_for_the_agent() {
    let mut mesh = KubeMesh::start(2, NS, true).expect("cluster");
    // Everything on n0 (n1 is there as in a real cluster, with its own agent and kubelet).
    let vip = mesh.start_echo(Some("n0"), true).expect("echo");
    let kubelet = &mesh.kubelets[0];

    // Its very first connection, at start-up, through the Service VIP: carried by the agent.
    let target = format!("{vip}:80");
    mesh.start_client("first", &target, Some("n0"))
        .expect("client pod");
    assert_eq!(
        mesh.finished("first").expect("phase"),
        "Succeeded",
        "{:?}",
        kubelet.logs(NS, "first", "client")
    );
    mesh.wait_event("first", "MeshCaptured").expect("event");
    let first_ip = mesh.pod_ip("first").expect("address");
    assert!(
        carried(&mesh.agents[0], &first_ip),
        "the agent carried the start-up connection of {first_ip}"
    );
    // Its source workload is named although its address reached the API only after the
    // connection: the agent knows the pod from the hand-over.
    // (`carried` above waited for the record.)
    let named = access_records_in(&mesh.agents[0].logs()).iter().any(|r| {
        r["src"]["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{first_ip}:")))
            && r["src"]["workload"] == "first"
    });
    assert!(named, "the source workload is named in the access log");

    // The agent down: a new pod does not start (no container), until the agent is back.
    mesh.agents.remove(0).kill().expect("kill the agent");
    mesh.start_client("late", &target, Some("n0"))
        .expect("late pod");
    mesh.wait_event("late", "FailedCreatePodSandBox")
        .expect("event");
    thread::sleep(Duration::from_secs(2));
    assert!(
        mesh.kubelets[0]
            .pod(NS, "late")
            .is_none_or(|p| p.containers.iter().all(|c| c.pid.is_none() && !c.running)),
        "no container of a pod runs before its capture"
    );
    let node = mesh.tb.node(0);
    let agent = Agent::start(node, &mesh.options[0]).expect("agent back");
    assert_eq!(
        mesh.finished("late").expect("phase"),
        "Succeeded",
        "{:?}",
        mesh.kubelets[0].logs(NS, "late", "client")
    );
    mesh.wait_event("late", "MeshCaptured").expect("event");

    // The agent crashes and restarts under traffic: a steady client connects every 100 ms.
    // The hand-overs it held are gone, yet it re-learns the running echo and client pods from
    // /proc before it reports ready, and carries their connections again.
    mesh.start_probe(
        "steady",
        &[
            "repeat",
            &target,
            "--every-ms",
            "100",
            "--duration-ms",
            "10000",
        ],
        Some("n0"),
    )
    .expect("steady client");
    wait_lines(&mesh, 0, "steady", "echo ok", 5).expect("the steady client got going");
    agent.kill().expect("kill the agent");
    thread::sleep(Duration::from_secs(1));
    let agent = Agent::start(node, &mesh.options[0]).expect("agent restarted");
    let echo_captured = agent
        .logs()
        .iter()
        .any(|l| l.contains("running pod found from /proc") && l.contains("pod=mesh/echo-"));
    assert!(
        echo_captured,
        "the restarted agent re-learnt the echo pod from /proc"
    );
    restarted_under_traffic(&mesh, &agent);
    mesh.start_client("again", &target, Some("n0"))
        .expect("client pod");
    assert_eq!(mesh.finished("again").expect("phase"), "Succeeded");
    let again_ip = mesh.pod_ip("again").expect("address");
    assert!(
        carried(&agent, &again_ip),
        "the restarted agent carried the connection of {again_ip}"
    );
    // The pods stop before their agent.
    mesh.kubelets.clear();
}

/// The steady client's tries across the restart: they failed while the agent was down (closed,
/// never around the mesh: the failures are one unbroken run), then all succeeded again, each
/// one carried by the restarted agent.
fn restarted_under_traffic(mesh: &KubeMesh, agent: &Agent) {
    assert_eq!(mesh.finished("steady").expect("phase"), "Succeeded");
    let (lines, tries) = repeat_tries(mesh, 0, "steady");
    let first_failure = tries
        .iter()
        .position(|ok| !ok)
        .expect("tries failed while the agent was down");
    let after = tries[first_failure..]
        .iter()
        .position(|ok| *ok)
        .map(|n| first_failure + n)
        .expect("tries succeeded after the restart");
    assert!(
        tries[after..].iter().all(|ok| *ok),
        "one run of failures, no try got through while the agent was down: {lines:#?}"
    );
    let recovered = tries.len() - after;
    assert!(recovered >= 5, "{lines:#?}");
    println!(
        "steady client: {} tries; {} failed (closed) while the agent restarted, {recovered} carried after; first failure: {:?}",
        tries.len(),
        after - first_failure,
        lines.iter().find(|l| l.starts_with("failed"))
    );
    let ip = mesh.pod_ip("steady").expect("address");
    let carried = || {
        agent
            .logs()
            .iter()
            .filter(|l| {
                l.starts_with('{')
                    && l.contains(&format!("\"addr\":\"{ip}:"))
                    && l.contains("\"response_flags\":\"-\"")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while carried() < recovered && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        carried(),
        recovered,
        "every try after the restart was carried by the restarted agent"
    );
    assert!(
        agent
            .logs()
            .iter()
            .any(|l| l.contains("running pod found from /proc") && l.contains("pod=mesh/steady")),
        "the restarted agent re-learnt the steady client from /proc"
    );
}

/// Two nodes: a client pod on n0 reaches the echo pod on n1 through the Service; the hop
/// between the agents is HBONE (mutual TLS), and the destination's agent knows the client by
/// its SPIFFE identity.
#[test]
fn pods_on_two_nodes_talk_over_hbone_with_their_identities() {
    let mesh = KubeMesh::start(2, NS, true).expect("cluster");
    let vip = mesh.start_echo(Some("n1"), true).expect("echo");
    let target = format!("{vip}:80");
    mesh.start_client("across", &target, Some("n0"))
        .expect("client pod");
    assert_eq!(
        mesh.finished("across").expect("phase"),
        "Succeeded",
        "{:?}",
        mesh.kubelets[0].logs(NS, "across", "client")
    );
    let ip = mesh.pod_ip("across").expect("address");
    let source = mesh.agents[0].logs().iter().any(|l| {
        l.contains("\"direction\":\"outbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("\"connection_security_policy\":\"mutual_tls\"")
    });
    assert!(
        source,
        "n0's agent tunnelled the connection over mutual TLS"
    );
    let destination = mesh.agents[1].logs().iter().any(|l| {
        l.contains("\"direction\":\"inbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("spiffe://cluster.local/ns/mesh/sa/default")
    });
    assert!(
        destination,
        "n1's agent received it from the client's identity"
    );
    // The client pod finished and left the mesh: its pooled HBONE connection (whose socket
    // lives in its network namespace) is closed, not kept until the idle timeout.
    wait_dump(
        mesh.tb.node(0),
        "the gone pod's HBONE connection closed",
        |d| {
            d["connections"]["hbone_pool"]["connections"] == 0
                && d["connections"]["hbone_pool"]["connections_opened"] == 1
        },
    )
    .expect("config dump");
    endpoints_from_slices(&mesh, &mesh.kubelets[0]);
    locality_from_the_api(&mesh);
}

/// Node n1 labelled with a region and zone through the API, and `echo` asking for
/// `trafficDistribution: PreferClose`: n0's agent reads both (the echo pod's locality is its
/// node's; the Service prefers close endpoints), from the Nodes it may list and watch. The
/// data path this feeds is shown in the netns testbed (`capture.rs`, `waypoint.rs`).
fn locality_from_the_api(mesh: &KubeMesh) {
    let cp = &mesh.cp;
    let zone = json!({"metadata": {"labels": {
        "topology.kubernetes.io/region": "eu",
        "topology.kubernetes.io/zone": "eu-b",
    }}});
    cp.block_on(Api::<Node>::all(cp.client()).patch(
        "n1",
        &PatchParams::default(),
        &Patch::Merge(&zone),
    ))
    .expect("n1 labelled");
    let close = json!({"spec": {"trafficDistribution": "PreferClose"}});
    cp.block_on(Api::<Service>::namespaced(cp.client(), NS).patch(
        "echo",
        &PatchParams::default(),
        &Patch::Merge(&close),
    ))
    .expect("echo prefers close endpoints");
    let (echo, _) = mesh.echo_pod().expect("echo pod");
    let echo = echo.metadata.name.expect("a name");
    wait_dump(
        mesh.tb.node(0),
        "the echo pod's zone and the Service's preference",
        |d| {
            let in_zone = d["workloads"].as_array().is_some_and(|w| {
                w.iter().any(|w| {
                    w["name"] == echo.as_str()
                        && w["locality"] == json!({"region": "eu", "zone": "eu-b", "subzone": ""})
                })
            });
            let preferring = d["services"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"] == "echo" && s["traffic_distribution"] == "PreferSameZone")
            });
            in_zone && preferring
        },
    )
    .expect("config dump");
}

/// Endpoints come from `EndpointSlices`: the controller manager's for `echo` (the agent shows
/// the echo pod as its endpoint), and one written through the API for a Service without a
/// selector, which carries traffic over HBONE to the echo pod; deleting that slice leaves the
/// Service without endpoint, and the agent refuses its connections.
fn endpoints_from_slices(mesh: &KubeMesh, kubelet: &Kubelet) {
    let cp = &mesh.cp;
    let n0 = mesh.tb.node(0);
    let (_, echo_ip) = mesh.echo_pod().expect("echo pod");
    let dump = wait_dump(n0, "the echo endpoint", |d| {
        dump_endpoints(d, NS, "echo").len() == 1
    })
    .expect("config dump");
    assert_eq!(
        dump_endpoints(&dump, NS, "echo")[0]["address"],
        format!("{echo_ip}:8080")
    );

    let service: Service = from_json(json!({
        "metadata": {"name": "manual", "namespace": NS},
        "spec": {"ports": [{"port": 80, "targetPort": 8080}]},
    }));
    let service = cp
        .block_on(
            Api::<Service>::namespaced(cp.client(), NS).create(&PostParams::default(), &service),
        )
        .expect("service");
    let vip = service.spec.and_then(|s| s.cluster_ip).expect("cluster IP");
    let slice: EndpointSlice = from_json(json!({
        "metadata": {"name": "manual-1", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "manual"}},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [echo_ip], "conditions": {"ready": true}}],
    }));
    let slices: Api<EndpointSlice> = Api::namespaced(cp.client(), NS);
    cp.block_on(slices.create(&PostParams::default(), &slice))
        .expect("endpoint slice");
    wait_dump(n0, "the written slice", |d| {
        dump_endpoints(d, NS, "manual").len() == 1
    })
    .expect("config dump");
    let target = format!("{vip}:80");
    mesh.start_client("via-slice", &target, Some("n0"))
        .expect("client pod");
    let agent_lines = || -> Vec<String> {
        mesh.agents
            .iter()
            .flat_map(Agent::logs)
            .filter(|l| !l.contains("DEBUG"))
            .collect()
    };
    assert_eq!(
        mesh.finished("via-slice").expect("phase"),
        "Succeeded",
        "{:?}\n{:#?}",
        kubelet.logs(NS, "via-slice", "client"),
        agent_lines()
    );
    let ip = mesh.pod_ip("via-slice").expect("address");
    let hbone = |l: &String| {
        l.contains("\"direction\":\"outbound\"")
            && l.contains(&format!("\"addr\":\"{ip}:"))
            && l.contains("manual.mesh.svc.cluster.local")
            && l.contains("\"connection_security_policy\":\"mutual_tls\"")
    };
    let tunnelled = lines_once(|| mesh.agents[0].logs(), LOG_WAIT, |l| l.iter().any(hbone))
        .iter()
        .any(hbone);
    assert!(tunnelled, "the slice's endpoint was reached over HBONE");

    cp.block_on(slices.delete("manual-1", &DeleteParams::default()))
        .expect("delete the slice");
    wait_dump(n0, "the slice gone", |d| {
        dump_endpoints(d, NS, "manual").is_empty()
    })
    .expect("config dump");
    mesh.start_client("no-slice", &target, Some("n0"))
        .expect("client pod");
    assert_eq!(
        mesh.finished("no-slice").expect("phase"),
        "Failed",
        "no endpoint: refused"
    );
    assert!(
        mesh.agents[0]
            .logs()
            .iter()
            .any(|l| l.contains("service mesh/manual has no ready endpoint")),
        "the agent says why"
    );
}

/// Two nodes, pods run by the kubelets: labelling the namespace through the API captures the
/// running echo pod without a restart (an Event says so) and the next client goes over HBONE;
/// a DENY `AuthorizationPolicy` created through the API is enforced within a second, and
/// deleting it lifts it; unlabelling releases the pod (an Event) and traffic goes direct again.
#[test]
fn labelling_a_namespace_through_the_api_captures_its_running_pods_and_unlabelling_releases_them() {
    let mesh = KubeMesh::start(2, NS, false).expect("cluster");
    mesh.start_echo(Some("n1"), false).expect("echo");
    // The echo pod's own address: the testbed runs no kube-proxy, so only the mesh makes
    // Service VIPs work, and the unmeshed clients here need a reachable target.
    let (_, echo_ip) = mesh.echo_pod().expect("echo pod");
    let target = format!("{echo_ip}:8080");
    let echo_pid = |mesh: &KubeMesh| {
        mesh.kubelets[1]
            .pods()
            .into_iter()
            .find(|p| p.name.starts_with("echo-"))
            .and_then(|p| p.containers.first().and_then(|c| c.pid))
            .expect("echo container process")
    };
    let pid = echo_pid(&mesh);
    // Runs a client pod on n0; returns its phase and whether the mesh carried it: n0's agent
    // tunnelled it (mutual TLS) and n1's agent let it in. Clients reuse addresses, so only
    // the log lines written meanwhile count.
    let run_client = |name: &str| {
        let from = [mesh.agents[0].log_len(), mesh.agents[1].log_len()];
        mesh.start_client(name, &target, Some("n0"))
            .expect("client pod");
        let phase = mesh.finished(name).expect("phase");
        let ip = mesh.pod_ip(name).expect("address");
        let src = format!("\"addr\":\"{ip}:");
        let logged = |i: usize, direction: &str| {
            mesh.agents[i].logs()[from[i]..].iter().any(|l| {
                l.starts_with('{')
                    && l.contains(&src)
                    && l.contains(&format!("\"direction\":\"{direction}\""))
                    && l.contains("\"connection_security_policy\":\"mutual_tls\"")
            })
        };
        (phase, logged(0, "outbound") && logged(1, "inbound"))
    };

    assert_eq!(
        run_client("plain"),
        ("Succeeded".to_owned(), false),
        "outside the mesh before the label"
    );

    mesh.label_namespace(true).expect("label");
    let labelled = Instant::now();
    mesh.wait_event("echo-", "MeshCaptured").expect("captured");
    println!(
        "label to capture of the running echo pod: {} ms",
        labelled.elapsed().as_millis()
    );
    assert_eq!(echo_pid(&mesh), pid, "captured without a restart");
    assert_eq!(
        run_client("meshed"),
        ("Succeeded".to_owned(), true),
        "over HBONE once labelled"
    );

    // A DENY for the clients' identity, through the API.
    let policies = mesh.authorization_policies();
    let policy = mesh.deny_echo_from("deny-default", "cluster.local/ns/mesh/sa/default");
    let has_policy = |dump: &serde_json::Value| dump_has_policy(dump, "deny-default");
    let created = Instant::now();
    mesh.cp
        .block_on(policies.create(&PostParams::default(), &policy))
        .expect("policy");
    wait_dump(mesh.tb.node(1), "the policy", has_policy).expect("dump");
    let enforced = created.elapsed();
    println!(
        "policy enforced by n1's agent {} ms after it was created",
        enforced.as_millis()
    );
    assert!(enforced < Duration::from_secs(1), "{enforced:?}");
    assert_eq!(run_client("denied").0, "Failed", "denied by the policy");
    mesh.cp
        .block_on(policies.delete("deny-default", &DeleteParams::default()))
        .expect("delete the policy");
    wait_dump(mesh.tb.node(1), "the policy lifted", |d| !has_policy(d)).expect("dump");
    assert_eq!(
        run_client("allowed"),
        ("Succeeded".to_owned(), true),
        "the policy lifted"
    );

    mesh.label_namespace(false).expect("unlabel");
    mesh.wait_event("echo-", "MeshReleased").expect("released");
    assert_eq!(echo_pid(&mesh), pid, "released without a restart");
    assert_eq!(
        run_client("direct"),
        ("Succeeded".to_owned(), false),
        "outside the mesh again"
    );
}
