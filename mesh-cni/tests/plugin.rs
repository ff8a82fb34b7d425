//! The plugin binary run as a container runtime runs it (environment and stdin), against no
//! agent and against an agent built from the library's server side, with a real network
//! namespace.

mod common;

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{
    conf, fd_identity, look_inside, path_identity, pod_env, run_plugin, Netns, TempDir, TestAgent,
    PREV_RESULT,
};
use mesh_cni::handover::{PodRef, Reply, Request};

#[test]
fn version_lists_the_supported_versions() {
    let run = run_plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(run.code, 0, "{run:?}");
    let json = run.json();
    assert_eq!(json["cniVersion"], "1.0.0");
    let versions: Vec<&str> = json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(versions, ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
}

#[test]
fn invalid_environment_and_configuration_are_error_objects() {
    let dir = TempDir::new();
    let socket = dir.join("agent.sock");
    let missing_netns: Vec<_> = pod_env("ADD", "")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let run = run_plugin(&missing_netns, &conf(&socket, 1000, true));
    assert_eq!(run.error_code(), 4);
    assert!(run.error_msg().contains("CNI_NETNS"), "{run:?}");
    assert_eq!(run.json()["cniVersion"], "1.0.0");
    let run = run_plugin(
        &pod_env("ADD", "/proc/self/ns/net"),
        &conf(&socket, 0, true),
    );
    assert_eq!(run.error_code(), 7, "timeout_ms 0 is invalid");
    let run = run_plugin(
        &pod_env("ADD", "/proc/self/ns/net"),
        &conf(&socket, 1000, false),
    );
    assert_eq!(run.error_code(), 7, "no prevResult: not chained");
    let run = run_plugin(&pod_env("ADD", "/etc/hostname"), &conf(&socket, 1000, true));
    assert_eq!(
        run.error_code(),
        4,
        "CNI_NETNS that is not a namespace: {run:?}"
    );
    assert!(
        run.stderr.contains("not a network namespace"),
        "logs go to stderr: {run:?}"
    );
}

#[test]
fn add_without_an_agent_fails_with_try_again_later_naming_the_socket() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let socket = dir.join("agent.sock");
    let run = run_plugin(
        &pod_env("ADD", netns.path.to_str().unwrap()),
        &conf(&socket, 1000, true),
    );
    assert_eq!(run.error_code(), 11);
    let msg = run.error_msg();
    assert!(
        msg.contains(socket.to_str().unwrap()) && msg.contains("os error 2"),
        "{msg}"
    );

    // A socket file nobody listens on (an agent that died): connection refused.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let run = run_plugin(
        &pod_env("ADD", netns.path.to_str().unwrap()),
        &conf(&socket, 1000, true),
    );
    assert_eq!(run.error_code(), 11);
    assert!(run.error_msg().contains("os error 111"), "{run:?}");
}

#[test]
fn add_hands_the_pod_and_its_namespace_over_and_passes_the_result_through() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let (tx, rx) = mpsc::channel();
    let agent = TestAgent::start(dir.join("agent.sock"), move |request| match request {
        Request::Add { pod, netns } => {
            tx.send((pod, fd_identity(&netns), look_inside(&netns)))
                .unwrap();
            Reply::Captured
        }
        other => Reply::Error {
            message: format!("unexpected {other:?}"),
        },
    });
    let run = run_plugin(
        &pod_env("ADD", netns.path.to_str().unwrap()),
        &conf(&agent.socket, 5000, true),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout.trim_end(),
        PREV_RESULT,
        "prevResult unchanged, key order included"
    );

    let (pod, identity, (inode, lo, iface)) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        pod,
        PodRef {
            namespace: "mesh".into(),
            name: "client-0".into(),
            uid: Some("0d3c5e6f".into()),
            container_id: "3f1e0c9a7b2d".into(),
            ifname: "eth0".into(),
            ips: vec!["10.88.0.5".parse().unwrap()],
            netns_path: Some(netns.path.display().to_string()),
        }
    );
    assert_eq!(
        identity,
        path_identity(&netns.path),
        "the fd is the pod's namespace"
    );
    assert_eq!(inode, identity.1, "setns landed in it");
    assert_eq!(lo, Some(1), "its own loopback");
    assert!(
        iface.is_some(),
        "its own interface, absent from the root namespace"
    );
}

#[test]
fn add_of_a_pod_the_agent_does_not_mesh_passes() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let agent = TestAgent::start(dir.join("agent.sock"), |_| Reply::NotMeshed);
    let run = run_plugin(
        &pod_env("ADD", netns.path.to_str().unwrap()),
        &conf(&agent.socket, 5000, true),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout.trim_end(), PREV_RESULT);
}

#[test]
fn add_refused_by_the_agent_fails_with_its_reason() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let agent = TestAgent::start(dir.join("agent.sock"), |_| Reply::Refused {
        reason: "namespace holds no address of the pod".into(),
    });
    let run = run_plugin(
        &pod_env("ADD", netns.path.to_str().unwrap()),
        &conf(&agent.socket, 5000, true),
    );
    assert_eq!(run.error_code(), 100);
    let msg = run.error_msg();
    assert!(
        msg.contains("mesh/client-0") && msg.contains("no address of the pod"),
        "{msg}"
    );
}

#[test]
fn add_times_out_when_the_agent_is_slow() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let agent = TestAgent::start(dir.join("agent.sock"), |_| {
        std::thread::sleep(Duration::from_millis(1500));
        Reply::Captured
    });
    let started = Instant::now();
    let run = run_plugin(
        &pod_env("ADD", netns.path.to_str().unwrap()),
        &conf(&agent.socket, 300, true),
    );
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "bounded by timeout_ms"
    );
    assert_eq!(run.error_code(), 11);
    assert!(
        run.error_msg().contains("did not answer within 300ms"),
        "{run:?}"
    );
}

#[test]
fn del_succeeds_without_an_agent_and_is_delivered_to_one() {
    let dir = TempDir::new();
    let socket = dir.join("agent.sock");
    let run = run_plugin(&pod_env("DEL", ""), &conf(&socket, 500, true));
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
    assert!(run.stderr.contains("not delivered"), "{run:?}");

    let (tx, rx) = mpsc::channel();
    let agent = TestAgent::start(socket, move |request| {
        tx.send(format!("{request:?}")).unwrap();
        Reply::Deleted
    });
    for _ in 0..2 {
        let run = run_plugin(&pod_env("DEL", ""), &conf(&agent.socket, 500, false));
        assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
        let seen = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            seen.starts_with("Del") && seen.contains("client-0"),
            "{seen}"
        );
    }
}

#[test]
fn check_reports_whether_the_pod_is_captured() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let captured = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = captured.clone();
    let agent = TestAgent::start(dir.join("agent.sock"), move |request| match request {
        Request::Check { .. } if flag.load(std::sync::atomic::Ordering::SeqCst) => Reply::Captured,
        Request::Check { .. } => Reply::Refused {
            reason: "capture links missing".into(),
        },
        _ => Reply::Error {
            message: "check only".into(),
        },
    });
    let env = pod_env("CHECK", netns.path.to_str().unwrap());
    let run = run_plugin(&env, &conf(&agent.socket, 2000, true));
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
    captured.store(false, std::sync::atomic::Ordering::SeqCst);
    let run = run_plugin(&env, &conf(&agent.socket, 2000, true));
    assert_eq!(run.error_code(), 101);
    assert!(run.error_msg().contains("capture links missing"), "{run:?}");
    drop(agent);
    let run = run_plugin(&env, &conf(&dir.join("agent.sock"), 2000, true));
    assert_eq!(run.error_code(), 11, "CHECK needs the agent: {run:?}");
}

#[test]
fn status_is_ready_only_when_the_agent_answers_ready() {
    let dir = TempDir::new();
    let socket = dir.join("agent.sock");
    let status = |socket: &std::path::Path| {
        run_plugin(&[("CNI_COMMAND", "STATUS")], &conf(socket, 1000, false))
    };
    let run = status(&socket);
    assert_eq!(run.error_code(), 50);
    assert!(
        run.error_msg().contains(socket.to_str().unwrap()),
        "{run:?}"
    );

    let agent = TestAgent::start(socket.clone(), |_| Reply::Ready);
    let run = status(&agent.socket);
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
    drop(agent);

    let agent = TestAgent::start(socket, |_| Reply::NotReady {
        reason: "no cluster snapshot yet".into(),
    });
    let run = status(&agent.socket);
    assert_eq!(run.error_code(), 50);
    assert!(
        run.error_msg().contains("no cluster snapshot yet"),
        "{run:?}"
    );
}
