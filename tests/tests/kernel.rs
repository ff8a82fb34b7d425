//! Privileged: the agent loads the kernel programs, attaches them to a pod's cgroup, counts that
//! pod's connections in a map, and the kernel program's aya-log lines reach the agent's log.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{probe, Agent, Testbed, TestbedSpec};

#[test]
fn agent_counts_a_meshed_pods_connections_and_relays_kernel_logs() {
    let tb = Testbed::new(TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .expect("testbed");
    let meshed = tb.pod(0, 0);
    let unmeshed = tb.pod(0, 1);
    let server = tb.pod(1, 0);
    let _srv = probe::serve(server, "[::]:8080".parse().unwrap()).expect("server");

    let mut agent = Agent::start(tb.node(0), &[meshed.cgroup.as_path()]).expect("agent");
    let meshed_id = meshed.cgroup_id().unwrap();
    let unmeshed_id = unmeshed.cgroup_id().unwrap();
    assert_eq!(
        agent.stats_for(meshed_id).unwrap().connect4,
        0,
        "nothing counted before traffic"
    );

    let v4 = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let v6 = SocketAddr::new(IpAddr::V6(server.ipv6), 8080);
    probe::connect(meshed, v4, "across nodes, v4").expect("meshed v4");
    probe::connect(meshed, v6, "across nodes, v6").expect("meshed v6");
    probe::connect(unmeshed, v4, "not meshed").expect("unmeshed v4");

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
    assert!(line4.contains("connect4"), "{line4}");
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
    let logs = agent.stop().expect("clean shutdown");
    assert!(logs.iter().any(|l| l.contains("shutdown complete")));
    assert!(
        !pins.exists(),
        "a clean shutdown removes the pins: {} left",
        pins.display()
    );
}

#[test]
fn agent_rejects_a_cgroup_that_is_not_cgroup_v2() {
    let tb = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 0,
    })
    .expect("testbed");
    let err = Agent::start(tb.node(0), &[std::path::Path::new("/proc")]).expect_err("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("cgroup /proc is not a cgroup v2 directory"),
        "{msg}"
    );
}
