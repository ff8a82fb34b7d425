//! Privileged: the agent loads the kernel programs, attaches them to the cgroups of the pods its
//! config enrolls, counts those pods' connections in a map, and the kernel program's aya-log
//! lines reach the agent's log. Bad pod data is reported and the agent keeps serving.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    mesh::{Mesh, Shortcut, NS, PLAIN_NS},
    probe, Agent, TestbedSpec,
};

#[test]
fn agent_counts_a_meshed_pods_connections_and_relays_kernel_logs() {
    // n0-p0 meshed, n0-p1 and the server's pod (n1-p0) not.
    let spec = TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    };
    let mut mesh = Mesh::new(spec, Shortcut::Default, &[(0, 1), (1, 0), (1, 1)]).expect("mesh");
    let (meshed, unmeshed, server) = (
        mesh.pod(0, 0).clone(),
        mesh.pod(0, 1).clone(),
        mesh.pod(1, 0).clone(),
    );
    let _srv = probe::serve(&server, "[::]:8080".parse().unwrap()).expect("server");
    let agent = &mut mesh.agents[0];
    let meshed_id = meshed.cgroup_id().unwrap();
    let unmeshed_id = unmeshed.cgroup_id().unwrap();
    assert_eq!(
        agent.stats_for(meshed_id).unwrap().connect4,
        0,
        "nothing counted before traffic"
    );

    let v4 = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let v6 = SocketAddr::new(IpAddr::V6(server.ipv6), 8080);
    probe::connect(&meshed, v4, "across nodes, v4").expect("meshed v4");
    probe::connect(&meshed, v6, "across nodes, v6").expect("meshed v6");
    probe::connect(&unmeshed, v4, "not meshed").expect("unmeshed v4");

    let counted = agent.stats_for(meshed_id).unwrap();
    assert_eq!(
        (counted.connect4, counted.connect6),
        (1, 1),
        "meshed pod: {counted:?}"
    );
    let other = agent.stats_for(unmeshed_id).unwrap();
    assert_eq!(
        (other.connect4, other.connect6),
        (0, 0),
        "pod without programs: {other:?}"
    );

    // The kernel's aya-log records arrive as tracing events with the program's target.
    let wait = Duration::from_secs(10);
    let line4 = agent
        .wait_for_log("the connect4 kernel log line", wait, |l| {
            l.contains("mesh_ebpf") && l.contains(&format!("cgroup={meshed_id} dst={v4}"))
        })
        .unwrap();
    assert!(
        line4.contains("connect4") && line4.contains("captured=1"),
        "{line4}"
    );
    agent
        .wait_for_log("the connect6 kernel log line", wait, |l| {
            l.contains("mesh_ebpf") && l.contains(&format!("cgroup={meshed_id} dst={v6}"))
        })
        .unwrap();
    assert!(
        !agent
            .logs()
            .iter()
            .any(|l| l.contains(&format!("cgroup={unmeshed_id} "))),
        "the unmeshed pod's connection was logged"
    );

    let pins = agent.bpffs_dir().to_path_buf();
    assert!(pins.join("MESH_CGROUP_COUNTERS").exists());
    let agent = mesh.agents.remove(0);
    let logs = agent.stop().expect("clean shutdown");
    assert!(logs.iter().any(|l| l.contains("shutdown complete")));
    assert!(
        !pins.exists(),
        "a clean shutdown removes the pins: {} left",
        pins.display()
    );
}

#[test]
fn a_pod_the_agent_cannot_capture_is_reported_and_the_others_are_served() {
    let spec = TestbedSpec {
        nodes: 1,
        pods_per_node: 2,
    };
    let mut mesh = Mesh::new(spec, Shortcut::Default, &[(0, 1)]).expect("mesh");
    let bad = mesh.pod(0, 1).clone();
    // Enroll the second pod with a cgroup path that is not a cgroup v2 directory.
    let mut broken = bad.clone();
    broken.cgroup = "/proc".into();
    let from = mesh.agents[0].log_len();
    mesh.files
        .pod(
            &broken,
            "n0",
            PLAIN_NS,
            &[(mesh_tests::cluster::DATAPLANE_MODE, "ambient")],
        )
        .unwrap();
    let line = mesh.agents[0]
        .wait_for_log_from(from, "the enrollment error", Duration::from_secs(10), |l| {
            l.contains("pod not captured") && l.contains(&format!("{PLAIN_NS}/{}", bad.name))
        })
        .unwrap();
    assert!(
        line.contains("/proc"),
        "the error names the bad path: {line}"
    );
    // The good pod is still served.
    let good = mesh.pod(0, 0).clone();
    let _srv = probe::serve(&bad, "[::]:8080".parse().unwrap()).expect("server");
    probe::connect(
        &good,
        SocketAddr::new(IpAddr::V4(bad.ipv4), 8080),
        "still served",
    )
    .unwrap();
    let _ = NS;
}

#[test]
fn agent_refuses_a_missing_config_directory_naming_it() {
    let spec = TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    };
    let tb = mesh_tests::Testbed::new(spec).expect("testbed");
    let options = mesh_tests::agent::AgentOptions {
        config_dir: "/nonexistent/mesh-config".into(),
        kubeconfig: None,
        kubepods_cgroup: None,
        sockmap: true,
        keep_pins: false,
        extra_args: Vec::new(),
        log: mesh_tests::agent::TEST_LOG.into(),
    };
    let err = Agent::start(tb.node(0), &options).expect_err("must refuse");
    assert!(
        err.to_string().contains("/nonexistent/mesh-config"),
        "{err}"
    );
}

/// An upgrade that changed a map's layout: an earlier agent left `MESH_CONFIG` pinned with its
/// old 8-byte value (this build's is 32 bytes). The new agent releases that pin with a warning
/// naming it instead of adopting it, and works: every byte of a same-node transfer in the
/// short-cut crosses each leg once, or goes direct.
#[test]
fn a_pinned_map_of_another_layout_is_released_not_adopted() {
    const BYTES: u64 = 100_000;
    let mut mesh = Mesh::of(1, 2, Shortcut::OptedIn).expect("mesh");
    let old = mesh.agents.remove(0);
    let pins = old.bpffs_dir().to_path_buf();
    old.kill().expect("agent killed");
    let config = pins.join("MESH_CONFIG");
    std::fs::remove_file(&config).expect("the earlier agent's pin");
    mesh_tests::process::run(std::process::Command::new("bpftool").args([
        "map",
        "create",
        config.to_str().unwrap(),
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "1",
        "name",
        "MESH_CONFIG",
    ]))
    .expect("bpftool map create");
    let agent = mesh.start_agent(0).expect("the new agent");
    mesh.agents.push(agent);
    let released = mesh.agents[0].logs().into_iter().find(|l| {
        l.contains("pinned map from an agent of another layout") && l.contains("MESH_CONFIG")
    });
    assert!(released.is_some(), "no warning naming MESH_CONFIG");
    let (client, server) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let _srv = probe::serve(&server, app).expect("server");
    let before = mesh.agents[0].fastpath().expect("fast path");
    probe::echo_bytes(&client, app, BYTES).expect("same-node transfer");
    let fast = mesh.agents[0].fastpath().expect("fast path").since(&before);
    assert_eq!(fast.leg_bytes(), 4 * BYTES, "{fast:?}");
}
