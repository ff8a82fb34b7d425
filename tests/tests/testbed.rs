//! Privileged: the testbed itself. Addresses, routing within and across nodes, IPv4 and IPv6,
//! processes in pods, and complete removal.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use mesh_tests::{probe, process::run, Testbed, TestbedSpec};

fn netns_list() -> String {
    run(Command::new("ip").args(["netns", "list"])).expect("ip netns list")
}

#[test]
fn pods_reach_each_other_on_one_node_and_across_nodes_over_ipv4_and_ipv6() {
    let tb = Testbed::new(TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    })
    .expect("testbed");
    let server = tb.pod(1, 1);
    let _srv = probe::serve(server, "[::]:7000".parse().unwrap()).expect("server");
    let same_node = tb.pod(1, 0);
    let other_node = tb.pod(0, 0);
    for client in [same_node, other_node] {
        for ip in [IpAddr::V4(server.ipv4), IpAddr::V6(server.ipv6)] {
            let line =
                probe::connect(client, SocketAddr::new(ip, 7000), "hello").unwrap_or_else(|e| {
                    panic!("{} -> {ip}: {e}", client.name);
                });
            // The server sees the client's own pod address: no NAT anywhere in the testbed.
            let client_ip = if ip.is_ipv4() {
                IpAddr::V4(client.ipv4)
            } else {
                IpAddr::V6(client.ipv6)
            };
            let local: SocketAddr = line.split_whitespace().nth(2).unwrap().parse().unwrap();
            assert_eq!(local.ip(), client_ip, "{line}");
        }
    }
}

#[test]
fn processes_run_in_the_pod_namespace_and_cgroup() {
    let tb = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("testbed");
    let pod = tb.pod(0, 0);
    let out = run(pod
        .command("sh")
        .args(["-c", "cat /proc/self/cgroup; ip -o -4 addr show dev eth0"]))
    .expect("run in pod");
    let rel = pod
        .cgroup
        .strip_prefix(tb.cgroup_dir().parent().unwrap().parent().unwrap())
        .unwrap();
    assert!(
        out.contains(&format!("0::/{}", rel.display())),
        "cgroup not joined:\n{out}"
    );
    assert!(
        out.contains(&format!("{}/32", pod.ipv4)),
        "not in the pod namespace:\n{out}"
    );
}

#[test]
fn names_are_unique_and_everything_is_removed_at_teardown() {
    let a = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("testbed a");
    let b = Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("testbed b");
    assert_ne!(a.id(), b.id());
    let list = netns_list();
    for ns in a.netns_names().iter().chain(b.netns_names()) {
        assert!(list.contains(ns.as_str()), "{ns} missing from:\n{list}");
    }
    // A process left running in a pod must not stop the teardown.
    let pod = a.pod(0, 0).clone();
    #[expect(
        clippy::zombie_processes,
        reason = "left running on purpose: teardown must kill it"
    )]
    let _sleeper = pod
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("sleep in pod");
    let procs = pod.cgroup.join("cgroup.procs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&procs).unwrap().trim().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sleep never joined {}",
            procs.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (id, cgroup, bpffs) = (
        a.id().to_string(),
        a.cgroup_dir().to_path_buf(),
        a.bpffs_dir().to_path_buf(),
    );
    a.teardown().expect("teardown");
    assert_gone(&id, &cgroup, &bpffs);
    let (id, cgroup, bpffs) = (
        b.id().to_string(),
        b.cgroup_dir().to_path_buf(),
        b.bpffs_dir().to_path_buf(),
    );
    drop(b);
    assert_gone(&id, &cgroup, &bpffs);
}

fn assert_gone(id: &str, cgroup: &Path, bpffs: &Path) {
    let list = netns_list();
    assert!(!list.contains(id), "namespaces of {id} left:\n{list}");
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    assert!(!bpffs.exists(), "{} left", bpffs.display());
}

/// Run by `without_root_a_privileged_test_fails_with_the_reason` as an unprivileged user.
#[test]
#[ignore = "run as an unprivileged user by without_root_a_privileged_test_fails_with_the_reason"]
fn needs_a_testbed() {
    Testbed::new(TestbedSpec {
        nodes: 1,
        pods_per_node: 1,
    })
    .expect("testbed");
}

#[test]
fn without_root_a_privileged_test_fails_with_the_reason() {
    let exe = std::env::current_exe().unwrap();
    // As `nobody`: the test must fail, and say why, rather than pass or skip.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args(["--exact", "needs_a_testbed", "--ignored", "--nocapture"])
        .output()
        .expect("setpriv (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "must fail without root:\n{text}");
    assert!(
        text.contains("1 failed"),
        "the test must have run and failed:\n{text}"
    );
    assert!(
        text.contains("privileged test cannot run: needs root (effective uid is 65534)"),
        "the failure must give the reason:\n{text}"
    );
}
