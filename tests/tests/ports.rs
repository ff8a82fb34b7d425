//! Privileged: a pod's connections through the mesh use its ports as a direct connection would.
//!
//! A connection the application closes first leaves its socket in `TIME_WAIT` for 60 s, holding
//! its 4-tuple. Sent to the agent's listener on the pod's own address, every captured connection
//! of a pod shared one 4-tuple space (pod address, port, pod address, 15001) whatever its
//! destination, so a pod that opened and closed more than its ~28,000 ephemeral ports' worth in
//! a minute (about 470 per second, summed over all destinations) found `connect()` failing.
//! The listener is now on the pod's loopback address, where the kernel reuses `TIME_WAIT` ports
//! (`tcp_tw_reuse` = 2, its default), and the application's socket keeps the pod's address.
//!
//! The same held on the other side: the agent's connection to the server application sends the
//! first FIN too, so its `TIME_WAIT` stays in the server's pod, and with ports chosen by
//! `bind(port 0)` every client of that server shared the server pod's ports. The agent now
//! chooses the port itself with `SO_REUSEADDR` (see `mesh-agent/src/leg_ports.rs`).
//!
//! Ports chosen by the agent may be in use by another of its connections to the same
//! application: it must skip those, and never disturb that connection (the application keeps
//! seeing its original client). A connection held open across the churn checks it.
//!
//! The test narrows every pod's ephemeral range to 40 ports and opens five times as many
//! connections, each closed by the client first, well inside a minute, at 25 per second: the
//! kernel reuses a `TIME_WAIT` port of a loopback connection once it is a second old
//! (`tcp_tw_reuse_delay`), so 40 ports carry up to 40 new connections per second.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    agent::binary,
    mesh::{Mesh, Shortcut},
    probe,
    process::run,
    Pod, Process, TestbedSpec,
};

/// Every pod's ephemeral ports: 40.
const PORT_RANGE: &str = "61000 61039";
const FIRST_PORT: u16 = 61_000;
const PORTS: u16 = 40;

fn narrow_ports(pod: &Pod) {
    run(pod
        .command("sysctl")
        .args(["-qw", &format!("net.ipv4.ip_local_port_range={PORT_RANGE}")]))
    .expect("narrowing the pod's ephemeral port range");
}

/// Runs `mesh-probe repeat` from `pod` to `addr` (connect, send, half-close first, read the
/// echo, close; every 40 ms for `ms`) and returns the local addresses of the tries that worked
/// and the lines of those that failed.
fn churn(pod: &Pod, addr: SocketAddr, ms: u64) -> (Vec<SocketAddr>, Vec<String>) {
    let bin = binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let out = run(pod.command(bin).args([
        "repeat",
        &addr.to_string(),
        "--every-ms",
        "40",
        "--duration-ms",
        &ms.to_string(),
    ]))
    .expect("the client runs");
    let ok = out
        .lines()
        .filter_map(|l| l.strip_prefix("echo ok "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let failed = out
        .lines()
        .filter(|l| l.starts_with("failed"))
        .map(str::to_owned)
        .collect();
    (ok, failed)
}

/// The peer the echo `server` application saw at the end of each connection that echoed
/// `bytes` bytes (its `getpeername` then).
fn peers_at_the_end(server: &Process, bytes: usize) -> Vec<IpAddr> {
    let prefix = format!("echoed {bytes} bytes to ");
    server
        .lines()
        .iter()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| {
            let end = l.split("peer at the end ").nth(1).unwrap_or_default();
            let addr: SocketAddr = end.trim_end_matches(')').parse().unwrap_or_else(|e| {
                panic!("the server's line {l:?}: {e}");
            });
            addr.ip().to_canonical()
        })
        .collect()
}

#[test]
fn connections_the_client_closes_first_do_not_use_up_its_pods_ports() {
    let mut mesh = Mesh::new(
        TestbedSpec {
            nodes: 2,
            pods_per_node: 2,
        },
        Shortcut::Default,
        &[],
    )
    .expect("meshed testbed");
    let client = mesh.pod(0, 0).clone();
    let same_node = mesh.pod(0, 1).clone();
    let other_node = mesh.pod(1, 0).clone();
    for pod in [&client, &same_node, &other_node] {
        narrow_ports(pod);
    }
    // The agents read a pod's range when they enroll it: restart them to see the narrow ones.
    for node in 0..2 {
        drop(mesh.agents.remove(0));
        let agent = mesh.start_agent(node).expect("restarted agent");
        mesh.agents.push(agent);
    }
    let servers: Vec<_> = [&same_node, &other_node]
        .into_iter()
        .map(|pod| probe::serve(pod, "[::]:8080".parse().unwrap()).expect("server"))
        .collect();
    let targets = [
        (
            "same node, IPv4",
            SocketAddr::new(IpAddr::V4(same_node.ipv4), 8080),
            0,
        ),
        (
            "other node, IPv4",
            SocketAddr::new(IpAddr::V4(other_node.ipv4), 8080),
            1,
        ),
        (
            "same node, IPv6",
            SocketAddr::new(IpAddr::V6(same_node.ipv6), 8080),
            0,
        ),
    ];
    let client_ip = |addr: &SocketAddr| {
        if addr.is_ipv4() {
            IpAddr::V4(client.ipv4)
        } else {
            IpAddr::V6(client.ipv6)
        }
    };
    for (what, addr, server) in targets {
        // Held across the churn, on one of the server pod's 40 ports, which the churn's
        // connections come round to again and again.
        let seen_before = peers_at_the_end(&servers[server], 1_000).len();
        let mut held = probe::hold_one(&client, addr, 12_000, "held connection").expect("held");
        // Five times the pod's ports: without reuse, every try after the 40th would fail for a
        // minute.
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        while ok.len() + failed.len() < 5 * usize::from(PORTS) {
            let (o, f) = churn(&client, addr, 2_500);
            ok.extend(o);
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{what}: {} of {} connections failed, first: {:?}",
            failed.len(),
            ok.len() + failed.len(),
            failed.first()
        );
        // The application's socket kept the pod's own address, on a port of its range.
        for local in &ok {
            assert_eq!(
                local.ip().to_canonical(),
                client_ip(&addr),
                "{what}: the client's own address"
            );
            assert!(
                (FIRST_PORT..FIRST_PORT + PORTS).contains(&local.port()),
                "{what}: port {} outside the pod's range",
                local.port()
            );
        }
        // The held connection's server still saw the client at its end.
        held.wait_success(Duration::from_secs(30))
            .expect("the held connection");
        // (The server's latest 1,000-byte connection: earlier targets' came before it. The
        // server prints it when it sees the end, which can be just after the client exits.)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let peers = loop {
            let peers = peers_at_the_end(&servers[server], 1_000);
            if peers.len() > seen_before || std::time::Instant::now() >= deadline {
                break peers;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            peers.len() > seen_before,
            "{what}: the server never reported the held connection's end: {peers:?}"
        );
        assert_eq!(
            peers.last(),
            Some(&client_ip(&addr)),
            "{what}: the held connection's server saw {peers:?} at its end, not the client"
        );
    }
}
