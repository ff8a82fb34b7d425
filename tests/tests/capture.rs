//! Privileged: capture and L4 forwarding through the node agents (issue 4's test list).
//!
//! Every test builds its own testbed, writes the cluster's objects into a config directory,
//! starts one agent per node and checks both what the applications see and what the agents log.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    agent::FastpathStats,
    mesh::{Mesh, Shortcut, NS, PLAIN_NS},
    plan, probe, Agent, Pod, Process, TestbedSpec,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn mesh(nodes: usize, pods: usize, shortcut: Shortcut, unmeshed: &[(usize, usize)]) -> Mesh {
    Mesh::new(
        TestbedSpec {
            nodes,
            pods_per_node: pods,
        },
        shortcut,
        unmeshed,
    )
    .expect("meshed testbed")
}

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod.ipv4), port)
}

fn v6(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(pod.ipv6), port)
}

fn serve(pod: &Pod, mode: &str) -> Process {
    probe::serve_mode(pod, "[::]:8080".parse().unwrap(), mode).expect("server")
}

/// The peer the server application saw for its most recent connection.
fn last_peer(server: &mut Process) -> IpAddr {
    let line = server
        .wait_for_line("an accepted connection", LOG_WAIT, |l| {
            l.starts_with("accepted ")
        })
        .unwrap();
    let line = server
        .lines()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("accepted "))
        .unwrap_or(line);
    let peer: SocketAddr = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    peer.ip().to_canonical()
}

/// The peer the client application saw (`getpeername`) in `connect`'s `echo ok <local> -> <peer>`.
fn client_saw(line: &str) -> SocketAddr {
    line.rsplit(" -> ")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peer in {line:?}"))
}

/// Waits for the agent's "connection closed" line for a connection from `src_ip` to `dst`.
fn closed_line(agent: &mut Agent, direction: &str, src_ip: IpAddr, dst: SocketAddr) -> String {
    let (direction, src, dst) = (
        format!("direction=\"{direction}\""),
        format!("src={src_ip}"),
        format!("dst={dst}"),
    );
    let src6 = format!("src=[{src_ip}]");
    agent
        .wait_for_log("the connection's log line", LOG_WAIT, |l| {
            l.contains("connection closed")
                && l.contains(&direction)
                && (l.contains(&src) || l.contains(&src6))
                && l.contains(&dst)
        })
        .unwrap()
}

#[test]
fn same_node_pod_to_pod_goes_through_the_agent_and_keeps_the_client_address() {
    let mut mesh = mesh(1, 2, Shortcut::Default, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let mut server = serve(&server_pod, "echo");
    let out = probe::connect(&client, v4(&server_pod, 8080), "same node").expect("connect");
    // The client sees the destination it asked for, not the agent's listener.
    assert_eq!(client_saw(&out), v4(&server_pod, 8080), "{out}");
    assert_eq!(
        last_peer(&mut server),
        IpAddr::V4(client.ipv4),
        "server must see the client"
    );
    let line = closed_line(
        &mut mesh.agents[0],
        "outbound",
        client.ipv4.into(),
        v4(&server_pod, 8080),
    );
    assert!(
        line.contains("bytes_sent=9") && line.contains("bytes_received=9"),
        "{line}"
    );
}

/// A Python client that binds to `argv[1]` (port 0), then sends to `argv[2]`:8080 and prints
/// the echo.
const BOUND_CLIENT: &str = "import socket, sys\n\
    s = socket.socket()\n\
    s.bind((sys.argv[1], 0))\n\
    s.connect((sys.argv[2], 8080))\n\
    s.sendall(b'bound first')\n\
    s.shutdown(socket.SHUT_WR)\n\
    print(s.recv(100).decode())\n";

/// A client that binds its socket before connecting (to the wildcard address with a port, or to
/// loopback) reaches the agent's loopback listener from a loopback address, which every pod
/// has. The mesh must still see, and show the server, the pod's own address: policy rules on it
/// (`ipBlocks`) apply to what the agent takes as the source.
#[test]
fn a_client_bound_before_connecting_is_still_seen_by_its_pods_address() {
    let mut mesh = mesh(2, 2, Shortcut::Default, &[]);
    let client = mesh.pod(0, 0).clone();
    for (node, j) in [(0, 1), (1, 0)] {
        let server_pod = mesh.pod(node, j).clone();
        let mut server = serve(&server_pod, "echo");
        for bind in ["0.0.0.0", "127.0.0.1"] {
            let out = mesh_tests::process::run(client.command("python3").args([
                "-c",
                BOUND_CLIENT,
                bind,
                &server_pod.ipv4.to_string(),
            ]))
            .expect("the bound client");
            assert_eq!(out.trim(), "bound first", "bound to {bind}");
            assert_eq!(
                last_peer(&mut server),
                IpAddr::V4(client.ipv4),
                "bound to {bind}: the server must see the client pod's address"
            );
            closed_line(
                &mut mesh.agents[0],
                "outbound",
                client.ipv4.into(),
                v4(&server_pod, 8080),
            );
        }
    }
}

#[test]
fn cross_node_pod_to_pod_passes_both_agents() {
    let mut mesh = mesh(2, 1, Shortcut::Default, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(1, 0).clone());
    let mut server = serve(&server_pod, "echo");
    let out = probe::connect(&client, v4(&server_pod, 8080), "across nodes").expect("connect");
    assert_eq!(client_saw(&out), v4(&server_pod, 8080), "{out}");
    assert_eq!(last_peer(&mut server), IpAddr::V4(client.ipv4));
    closed_line(
        &mut mesh.agents[0],
        "outbound",
        client.ipv4.into(),
        v4(&server_pod, 8080),
    );
    closed_line(
        &mut mesh.agents[1],
        "inbound",
        client.ipv4.into(),
        v4(&server_pod, 8080),
    );
}

#[test]
fn ipv6_same_node_and_cross_node() {
    let mut mesh = mesh(2, 2, Shortcut::Default, &[]);
    let client = mesh.pod(0, 0).clone();
    for (node, j) in [(0, 1), (1, 0)] {
        let server_pod = mesh.pod(node, j).clone();
        let mut server = serve(&server_pod, "echo");
        let out = probe::connect(&client, v6(&server_pod, 8080), "over IPv6").expect("connect v6");
        assert_eq!(client_saw(&out), v6(&server_pod, 8080), "{out}");
        assert_eq!(last_peer(&mut server), IpAddr::V6(client.ipv6));
        closed_line(
            &mut mesh.agents[0],
            "outbound",
            client.ipv6.into(),
            v6(&server_pod, 8080),
        );
        if node == 1 {
            closed_line(
                &mut mesh.agents[1],
                "inbound",
                client.ipv6.into(),
                v6(&server_pod, 8080),
            );
        }
    }
}

/// How many connections each of `servers` accepted, once they accepted `total` together (or
/// after [`LOG_WAIT`]). A server prints `accepted` before it echoes, but its output reaches us
/// through a reader thread: the lines are waited for rather than read once.
fn accepted_by(servers: &[Process], total: usize) -> Vec<usize> {
    let accepted = |server: &Process| {
        server
            .lines()
            .iter()
            .filter(|l| l.starts_with("accepted "))
            .count()
    };
    let deadline = std::time::Instant::now() + LOG_WAIT;
    while servers.iter().map(accepted).sum::<usize>() < total
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    servers.iter().map(accepted).collect()
}

/// Pods (0, 1) and (1, 0), labelled `tier: web`: an endpoint on each node.
fn web_on_both_nodes(mesh: &Mesh) -> [Pod; 2] {
    let web = [mesh.pod(0, 1).clone(), mesh.pod(1, 0).clone()];
    for pod in &web {
        mesh.files
            .pod(pod, &format!("n{}", pod.node), NS, &[("tier", "web")])
            .unwrap();
    }
    web
}

#[test]
fn service_with_two_endpoints_spreads_connections_over_both() {
    let mut mesh = mesh(2, 2, Shortcut::Default, &[]);
    // Endpoints: one on the client's node, one on the other node.
    let web = web_on_both_nodes(&mesh);
    let vip = plan::service_vip_v4(0);
    let from: Vec<usize> = mesh.agents.iter().map(Agent::log_len).collect();
    mesh.files
        .service(
            NS,
            "web",
            &[IpAddr::V4(vip), IpAddr::V6(plan::service_vip_v6(0))],
            80,
            8080,
            ("tier", "web"),
        )
        .unwrap();
    // Both agents: the destination's labels its records with the service only once it knows it
    // (each agent reads the config on its own; under load one can be a poll behind the other).
    for (agent, from) in mesh.agents.iter_mut().zip(from) {
        agent
            .wait_for_log_from(from, "the service to be known", LOG_WAIT, |l| {
                l.contains("cluster state updated") && l.contains("services=1")
            })
            .unwrap();
    }
    let servers: Vec<Process> = web.iter().map(|p| serve(p, "echo")).collect();
    let client = mesh.pod(0, 0).clone();
    for i in 0..4 {
        let out = probe::connect(
            &client,
            SocketAddr::new(IpAddr::V4(vip), 80),
            &format!("request {i}"),
        )
        .expect("connect through the service");
        // The client sees the service's address it dialled, whichever endpoint answered.
        assert_eq!(
            client_saw(&out),
            SocketAddr::new(IpAddr::V4(vip), 80),
            "{out}"
        );
    }
    for (pod, hits) in web.iter().zip(accepted_by(&servers, 4)) {
        assert_eq!(hits, 2, "endpoint {} got {hits} of 4 connections", pod.name);
    }
    let line = closed_line(
        &mut mesh.agents[0],
        "outbound",
        client.ipv4.into(),
        SocketAddr::new(IpAddr::V4(vip), 80),
    );
    assert!(
        line.contains("service=\"web.mesh.svc.cluster.local\""),
        "{line}"
    );
    // The other node's agent learns the service from the HBONE request (`forwarded: host=`).
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        let records = mesh_tests::telemetry::access_records(&mesh.agents[1], 0);
        let known = records
            .iter()
            .filter(|r| r["direction"] == "inbound")
            .filter(|r| r["service"] == "web.mesh.svc.cluster.local")
            .count();
        if known == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "inbound records without the service: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Nodes n0 in zone `eu-a` and n1 in zone `eu-b`, and `web` (one pod on each) asking for
/// `trafficDistribution: PreferClose`: each node's clients reach their own zone's endpoint,
/// and n0's the other zone's once theirs is gone. Without the setting they spread over both
/// (`service_with_two_endpoints_spreads_connections_over_both`).
#[test]
fn a_service_preferring_close_endpoints_keeps_connections_in_the_clients_zone() {
    let mut mesh = mesh(2, 2, Shortcut::Default, &[]);
    let web = web_on_both_nodes(&mesh);
    for (node, zone) in [("n0", "eu-a"), ("n1", "eu-b")] {
        let text = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    topology.kubernetes.io/region: eu\n    topology.kubernetes.io/zone: {zone}\n"
        );
        mesh.files
            .write(&format!("node-{node}.yaml"), &text)
            .unwrap();
    }
    let vip = plan::service_vip_v4(0);
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080}}\n  selector: {{tier: web}}\n  trafficDistribution: PreferClose\n"
    );
    let known = |mesh: &mut Mesh, from: &[usize]| {
        for (agent, from) in mesh.agents.iter_mut().zip(from) {
            agent
                .wait_for_log_from(*from, "the change to be read", LOG_WAIT, |l| {
                    l.contains("cluster state updated") && l.contains("services=1")
                })
                .unwrap();
        }
    };
    let from: Vec<usize> = mesh.agents.iter().map(Agent::log_len).collect();
    mesh.files.write("service-web.yaml", &service).unwrap();
    known(&mut mesh, &from);
    let servers: Vec<Process> = web.iter().map(|p| serve(p, "echo")).collect();
    let connect = |client: &Pod, n: usize| {
        for i in 0..n {
            probe::connect(
                client,
                SocketAddr::new(IpAddr::V4(vip), 80),
                &format!("r{i}"),
            )
            .expect("connect through the service");
        }
    };
    connect(&mesh.pod(0, 0).clone(), 6);
    assert_eq!(accepted_by(&servers, 6), [6, 0], "n0's client: zone eu-a");
    connect(&mesh.pod(1, 1).clone(), 6);
    assert_eq!(accepted_by(&servers, 12), [6, 6], "n1's client: zone eu-b");
    // Zone eu-a's endpoint gone (no longer selected): n0's client fails over to eu-b.
    let from: Vec<usize> = mesh.agents.iter().map(Agent::log_len).collect();
    mesh.files.pod(&web[0], "n0", NS, &[]).unwrap();
    known(&mut mesh, &from);
    connect(&mesh.pod(0, 0).clone(), 4);
    assert_eq!(accepted_by(&servers, 16), [6, 10], "failed over to eu-b");
}

#[test]
fn unmeshed_pods_are_untouched_and_talk_to_meshed_ones_both_ways() {
    let mut mesh = mesh(2, 2, Shortcut::Default, &[(0, 1), (1, 1)]);
    let (meshed, plain) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let (meshed_remote, plain_remote) = (mesh.pod(1, 0).clone(), mesh.pod(1, 1).clone());
    // Unmeshed to unmeshed: no agent involved.
    let mut s = serve(&plain_remote, "echo");
    probe::connect(&plain, v4(&plain_remote, 8080), "plain").expect("plain to plain");
    assert_eq!(last_peer(&mut s), IpAddr::V4(plain.ipv4));
    drop(s);
    // Meshed to unmeshed: captured at the source, delivered as is.
    let mut s = serve(&plain_remote, "echo");
    probe::connect(&meshed, v4(&plain_remote, 8080), "to plain").expect("meshed to plain");
    assert_eq!(last_peer(&mut s), IpAddr::V4(meshed.ipv4));
    closed_line(
        &mut mesh.agents[0],
        "outbound",
        meshed.ipv4.into(),
        v4(&plain_remote, 8080),
    );
    // Unmeshed to meshed: captured at the destination.
    let mut s = serve(&meshed_remote, "echo");
    probe::connect(&plain, v4(&meshed_remote, 8080), "from plain").expect("plain to meshed");
    assert_eq!(last_peer(&mut s), IpAddr::V4(plain.ipv4));
    closed_line(
        &mut mesh.agents[1],
        "inbound",
        plain.ipv4.into(),
        v4(&meshed_remote, 8080),
    );
    // The unmeshed pod's own connections were never captured.
    let plain_src = format!("src={}:", plain.ipv4);
    assert!(
        !mesh.agents[0]
            .logs()
            .iter()
            .any(|l| l.contains("connection closed") && l.contains(&plain_src)),
        "an unmeshed pod's connection went through its node's agent"
    );
}

fn large_transfer(shortcut: Shortcut) {
    let mesh = mesh(2, 2, shortcut, &[]);
    let client = mesh.pod(0, 0).clone();
    for server_pod in [mesh.pod(0, 1).clone(), mesh.pod(1, 0).clone()] {
        let _server = serve(&server_pod, "sink");
        // Blocking clients of pods in the short-cut can see a spurious `EAGAIN` (README).
        let eagain = if shortcut == Shortcut::OptedIn {
            probe::Eagain::Retry
        } else {
            probe::Eagain::Fail
        };
        let out = probe::send_with(&client, v4(&server_pod, 8080), 100 << 20, eagain)
            .expect("100 MiB transfer");
        assert!(out.starts_with("sent 104857600 bytes"), "{out}");
    }
}

#[test]
fn large_transfer_is_byte_exact_with_sockmap() {
    large_transfer(Shortcut::OptedIn);
}

#[test]
fn large_transfer_is_byte_exact_without_sockmap() {
    large_transfer(Shortcut::Off);
}

#[test]
fn half_close_and_server_speaks_first() {
    let mesh = mesh(2, 2, Shortcut::Default, &[]);
    let client = mesh.pod(0, 0).clone();
    for server_pod in [mesh.pod(0, 1).clone(), mesh.pod(1, 0).clone()] {
        // The client shuts its write side, then reads the whole reply.
        let echo = serve(&server_pod, "echo");
        // Below the kernel's 128 KiB limit for one command-line argument.
        let big = "x".repeat(100_000);
        probe::connect(&client, v4(&server_pod, 8080), &big).expect("half-close echo");
        drop(echo);
        // The server writes before the client sends anything.
        let _greeter = serve(&server_pod, "greet");
        let out =
            probe::greeted(&client, v4(&server_pod, 8080), "after the greeting").expect("greeted");
        // The server greeted the original client (a `[::]` listener shows it IPv4-mapped).
        let greeting = out
            .lines()
            .find(|l| l.starts_with("greeting hello "))
            .unwrap_or_default();
        assert!(greeting.contains(&client.ipv4.to_string()), "{out}");
    }
}

#[test]
fn agent_restart_then_new_connections_work() {
    let mut mesh = mesh(1, 2, Shortcut::Default, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let _server = serve(&server_pod, "echo");
    probe::connect(&client, v4(&server_pod, 8080), "before").expect("before the restart");
    // Killed hard: no cleanup runs.
    mesh.agents.remove(0).kill().expect("agent killed");
    // While the agent is down, a meshed pod's connection fails: it never goes around the mesh.
    let err = probe::connect(&client, v4(&server_pod, 8080), "while down").expect_err("must fail");
    assert!(
        err.to_string().contains("refused") || err.to_string().contains("timed out"),
        "{err}"
    );
    let agent = mesh.start_agent(0).expect("restarted agent");
    mesh.agents.push(agent);
    probe::connect(&client, v4(&server_pod, 8080), "after").expect("after the restart");
    closed_line(
        &mut mesh.agents[0],
        "outbound",
        client.ipv4.into(),
        v4(&server_pod, 8080),
    );
}

#[test]
fn pod_enrolled_and_removed_at_runtime() {
    let mut mesh = mesh(1, 2, Shortcut::Default, &[(0, 0)]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let mut server = serve(&server_pod, "echo");
    let client_src = format!("src={}:", client.ipv4);
    let captured = |agent: &Agent| {
        agent
            .logs()
            .iter()
            .filter(|l| {
                l.contains("connection closed") && l.contains(&client_src) && l.contains("outbound")
            })
            .count()
    };
    probe::connect(&client, v4(&server_pod, 8080), "unmeshed").unwrap();
    assert_eq!(captured(&mesh.agents[0]), 0);
    // Enroll the running pod: label it; no restart.
    let from = mesh.agents[0].log_len();
    mesh.files
        .pod(
            &client,
            "n0",
            PLAIN_NS,
            &[(mesh_tests::cluster::DATAPLANE_MODE, "ambient")],
        )
        .unwrap();
    mesh.agents[0]
        .wait_enrolled(&format!("{PLAIN_NS}/{}", client.name), from)
        .unwrap();
    probe::connect(&client, v4(&server_pod, 8080), "meshed").unwrap();
    closed_line(
        &mut mesh.agents[0],
        "outbound",
        client.ipv4.into(),
        v4(&server_pod, 8080),
    );
    assert_eq!(last_peer(&mut server), IpAddr::V4(client.ipv4));
    // Opt it out again.
    let from = mesh.agents[0].log_len();
    mesh.files
        .pod(
            &client,
            "n0",
            PLAIN_NS,
            &[(mesh_tests::cluster::DATAPLANE_MODE, "none")],
        )
        .unwrap();
    mesh.agents[0]
        .wait_for_log_from(from, "the pod to leave the mesh", LOG_WAIT, |l| {
            l.contains("pod removed from the mesh")
        })
        .unwrap();
    let before = captured(&mesh.agents[0]);
    probe::connect(&client, v4(&server_pod, 8080), "unmeshed again").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        captured(&mesh.agents[0]),
        before,
        "connection captured after opting out"
    );
}

#[test]
fn bad_config_file_is_rejected_and_the_last_state_kept() {
    let mut mesh = mesh(1, 2, Shortcut::Default, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let _server = serve(&server_pod, "echo");
    let from = mesh.agents[0].log_len();
    // Break the server pod's own file: its previous content must stay in force.
    mesh.files
        .write(
            &format!("pod-{NS}-{}.yaml", server_pod.name),
            "kind: Pod\nmetadata: [unclosed\n",
        )
        .unwrap();
    let line = mesh.agents[0]
        .wait_for_log_from(from, "the error about the bad file", LOG_WAIT, |l| {
            l.contains("ERROR") && l.contains(&format!("pod-{NS}-{}.yaml", server_pod.name))
        })
        .unwrap();
    assert!(line.contains("pod-mesh-"), "{line}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !mesh.agents[0].logs()[from..]
            .iter()
            .any(|l| l.contains("pod removed from the mesh")),
        "a bad file must not remove what it described"
    );
    probe::connect(&client, v4(&server_pod, 8080), "still served").expect("still served");
    closed_line(
        &mut mesh.agents[0],
        "outbound",
        client.ipv4.into(),
        v4(&server_pod, 8080),
    );
}

/// Bytes of the `sink` server's answer to `probe::send` of 1,000,000 bytes:
/// `"1000000 <crc32 as 8 hex digits>\n"`.
const SINK_REPLY_1M: u64 = 17;

/// One `echo` exchange of `bytes` each way and one `send` of `bytes` to a `sink`, from the
/// client pod to `server_pod`; the agents' fast-path deltas over each, `(echo, send)`, one pair
/// per agent.
fn fastpath_deltas(
    mesh: &Mesh,
    client: &Pod,
    server_pod: &Pod,
    bytes: u64,
) -> Vec<(FastpathStats, FastpathStats)> {
    let read = || -> Vec<FastpathStats> {
        mesh.agents
            .iter()
            .map(|a| a.fastpath().expect("fast-path counters"))
            .collect()
    };
    let since = |before: &[FastpathStats]| -> Vec<FastpathStats> {
        read().iter().zip(before).map(|(a, b)| a.since(b)).collect()
    };
    let echo = {
        let _server = serve(server_pod, "echo");
        let before = read();
        let out = probe::echo_bytes(client, v4(server_pod, 8080), bytes).expect("echo exchange");
        assert!(out.ends_with("ok=1 failed=0"), "{out}");
        since(&before)
    };
    let send = {
        let _server = serve(server_pod, "sink");
        let before = read();
        // The short-cut's blocking readers can see a spurious `EAGAIN` (README): retry.
        let out = probe::send_with(client, v4(server_pod, 8080), bytes, probe::Eagain::Retry)
            .expect("send to sink");
        assert!(out.starts_with(&format!("sent {bytes} bytes")), "{out}");
        since(&before)
    };
    echo.into_iter().zip(send).collect()
}

/// Same node, sockmap on (both pods opted in): every byte goes straight from one application
/// to the other, once (`direct`), or, where it cannot yet (bytes sent before the agent paired
/// the connection, or held back for the budget), once on each of its two pod-local legs
/// (client → agent's 15001 socket, agent → server; and back), redirected or held. Nothing takes
/// the plain TCP path. Bytes are exact; messages are not (one per `sendmsg` chunk, sizes up to
/// the senders and the kernel), so they are only bounded.
#[test]
fn sockmap_fast_path_counts_each_same_node_byte_once_per_leg() {
    const BYTES: u64 = 1_000_000;
    let mesh = mesh(1, 2, Shortcut::OptedIn, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let deltas = fastpath_deltas(&mesh, &client, &server_pod, BYTES);
    let (echo, send) = deltas[0];
    let msgs = |f: &FastpathStats| f.direct_msgs + f.redirected_msgs + f.held_msgs;
    // BYTES client → server and BYTES back.
    assert_eq!(echo.leg_bytes(), 4 * BYTES, "echo: {echo:?}");
    assert!(echo.direct_bytes > 0, "echo: nothing went direct: {echo:?}");
    assert_eq!(
        (echo.passed_msgs, echo.passed_bytes),
        (0, 0),
        "echo: {echo:?}"
    );
    // At least one message each way, at most one per byte and leg.
    assert!((2..=4 * BYTES).contains(&msgs(&echo)), "echo: {echo:?}");
    // BYTES to the sink and its 17-byte answer.
    assert_eq!(
        send.leg_bytes(),
        2 * (BYTES + SINK_REPLY_1M),
        "send: {send:?}"
    );
    assert!(send.direct_bytes > 0, "send: nothing went direct: {send:?}");
    assert_eq!(
        (send.passed_msgs, send.passed_bytes),
        (0, 0),
        "send: {send:?}"
    );
    assert!(
        (2..=2 * (BYTES + SINK_REPLY_1M)).contains(&msgs(&send)),
        "send: {send:?}"
    );
    // The table form prints the same totals after the per-cgroup rows.
    let total = mesh.agents[0].fastpath().unwrap();
    let table = mesh.agents[0].stats_table().unwrap();
    assert_eq!(
        table.lines().last(),
        Some(
            format!(
                "fastpath: redirected {} msgs {} bytes, passed {} msgs {} bytes, held {} msgs {} \
                 bytes, direct {} msgs {} bytes",
                total.redirected_msgs,
                total.redirected_bytes,
                total.passed_msgs,
                total.passed_bytes,
                total.held_msgs,
                total.held_bytes,
                total.direct_msgs,
                total.direct_bytes
            )
            .as_str()
        ),
        "{table}"
    );
}

/// `--no-sockmap`: no socket enters the SOCKHASH, so `sk_msg` never runs and counts nothing,
/// while the same transfers go through the agent over TCP.
#[test]
fn without_sockmap_the_fast_path_counts_nothing() {
    let mesh = mesh(1, 2, Shortcut::Off, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let deltas = fastpath_deltas(&mesh, &client, &server_pod, 1_000_000);
    let (echo, send) = deltas[0];
    assert_eq!(echo, FastpathStats::default(), "echo");
    assert_eq!(send, FastpathStats::default(), "send");
    assert_eq!(mesh.agents[0].fastpath().unwrap(), FastpathStats::default());
}

/// Across nodes, the source pod's leg leaves the short-cut (the agent removes the application's
/// socket from the SOCKHASH right after `accept()`), the destination pod's leg keeps it.
/// Source node: the agent's socket is still in the map, so every byte it writes toward the
/// client runs `sk_msg`, finds no peer and is counted as passed; the client's bytes take TCP
/// without running `sk_msg`, except any it sent before the agent's `accept()` (redirected into
/// the agent's socket, a race with the client's first write: bounded, not exact).
/// Destination node: both directions are redirected, exactly once each.
#[test]
fn legs_that_left_the_short_cut_count_as_passed() {
    const BYTES: u64 = 1_000_000;
    let mesh = mesh(2, 1, Shortcut::OptedIn, &[]);
    let (client, server_pod) = (mesh.pod(0, 0).clone(), mesh.pod(1, 0).clone());
    let deltas = fastpath_deltas(&mesh, &client, &server_pod, BYTES);
    let ((src_echo, src_send), (dst_echo, dst_send)) = (deltas[0], deltas[1]);
    assert_eq!(
        src_echo.passed_bytes, BYTES,
        "source node, echo: {src_echo:?}"
    );
    assert!(
        src_echo.redirected_bytes <= BYTES,
        "source node, echo: {src_echo:?}"
    );
    assert_eq!(
        src_send.passed_bytes, SINK_REPLY_1M,
        "source node, send: {src_send:?}"
    );
    assert!(
        src_send.redirected_bytes <= BYTES,
        "source node, send: {src_send:?}"
    );
    assert_eq!(
        (dst_echo.redirected_bytes, dst_echo.passed_bytes),
        (2 * BYTES, 0),
        "destination node, echo: {dst_echo:?}"
    );
    assert_eq!(
        (dst_send.redirected_bytes, dst_send.passed_bytes),
        (BYTES + SINK_REPLY_1M, 0),
        "destination node, send: {dst_send:?}"
    );
}

/// A server on a node's own address (outside every pod): the stand-in for a host outside the
/// cluster.
fn serve_outside(mesh: &Mesh, node: usize, port: u16) -> (Process, SocketAddr) {
    let node = mesh.tb.node(node);
    let addr = SocketAddr::new(IpAddr::V4(node.link_ipv4), port);
    let process =
        probe::on_node(node, &["serve", &addr.to_string(), "--mode", "echo"]).expect("server");
    (process, addr)
}

#[test]
fn a_service_entry_sends_its_namespaces_connections_outside_and_no_one_elses() {
    let mut mesh = mesh(2, 2, Shortcut::Default, &[]);
    // `n0-p1` moves to namespace `other` (meshed too).
    let other = mesh.pod(0, 1).clone();
    mesh.files.namespace("other", true).unwrap();
    mesh.files
        .remove(&format!("pod-{NS}-{}.yaml", other.name))
        .unwrap();
    mesh.files.pod(&other, "n0", "other", &[]).unwrap();
    let (mut outside, outside_addr) = serve_outside(&mesh, 1, 9443);
    // The entry's address is another host's, which namespace `other` talks to: the attack of a
    // tenant redirecting others' connections to a destination to its own endpoint.
    let (mut real, real_addr) = serve_outside(&mesh, 0, 443);
    let vip = real_addr.ip();
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: payments\n  namespace: {NS}\nspec:\n  hosts: [payments.example.com]\n  addresses: [{vip}]\n  exportTo: ['*']\n  ports:\n  - {{number: 443, name: tls, protocol: TLS, targetPort: {port}}}\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  endpoints:\n  - address: {ip}\n",
        ip = outside_addr.ip(),
        port = outside_addr.port(),
    );
    let from: Vec<usize> = mesh.agents.iter().map(Agent::log_len).collect();
    mesh.files
        .write("serviceentry-payments.yaml", &entry)
        .unwrap();
    for (agent, from) in mesh.agents.iter_mut().zip(from) {
        agent
            .wait_for_log_from(from, "the entry to be read", LOG_WAIT, |l| {
                l.contains("cluster state updated") && l.contains("services=1")
            })
            .unwrap();
    }
    let dst = real_addr;
    // Its namespace's client, on either node, reaches the server outside through the entry.
    for client in [mesh.pod(0, 0).clone(), mesh.pod(1, 1).clone()] {
        let answer = probe::connect(&client, dst, "to payments").expect("through the entry");
        assert!(answer.starts_with("echo ok"), "{answer}");
        assert_eq!(last_peer(&mut outside), IpAddr::V4(client.ipv4));
    }
    let first = IpAddr::V4(mesh.pod(0, 0).ipv4);
    let line = closed_line(&mut mesh.agents[0], "outbound", first, dst);
    assert!(
        line.contains("service=\"payments.example.com\"")
            && line.contains(&format!("upstream={outside_addr}")),
        "{line}"
    );
    // Another namespace's client is not captured by a tenant's entry (its `exportTo: ['*']`
    // narrowed, with a warning): its connection goes to the host it dialled.
    let answer = probe::connect(&other, dst, "not ours").expect("to the real host");
    assert!(answer.starts_with("echo ok"), "{answer}");
    assert_eq!(last_peer(&mut real), IpAddr::V4(other.ipv4));
    mesh.agents[0]
        .wait_for_log("the narrowed exportTo", LOG_WAIT, |l| {
            l.contains("ServiceEntry mesh/payments: spec.exportTo")
                && l.contains("is narrowed to its own namespace")
        })
        .unwrap();
    assert_eq!(
        outside
            .lines()
            .iter()
            .filter(|l| l.starts_with("accepted "))
            .count(),
        2,
        "only the entry's namespace reached the server"
    );
}
