//! Privileged: the `sk_msg` short-cut's safety (issue 12). A pod can never receive or inject
//! another pod's bytes through it, applications' own loopback connections never enter it, a
//! sender toward a reader that stops is held to a bounded amount as TCP would hold it, and in
//! the agents' default configuration no blocking reader sees a spurious `EAGAIN`.
//!
//! The tests of this file run one at a time: the bound test reads the node-wide TCP memory
//! (`/proc/net/sockstat`), which another test's transfer would move.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{binary, Agent},
    mesh::{Mesh, Shortcut},
    probe, Pod, Process,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// The user the hostile tenant's processes run as (`nobody`): no privilege at all.
const NOBODY: &str = "65534";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn mesh(nodes: usize, pods: usize, shortcut: Shortcut) -> Mesh {
    Mesh::of(nodes, pods, shortcut).expect("meshed testbed")
}

/// Whether `addr` is the agent's outbound listener in a pod (loopback, port 15001).
fn is_outbound_listener(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback() && addr.port() == 15_001
}

/// Every socket of the short-cut (`(netns, local, remote)`) is one of the mesh's legs, with its
/// pod's end on one of `pod_ips`: the application's captured connection to the outbound
/// listener (or the agent's accepted end of it), or the agent's connection to an application
/// (both ends the pod's address). No application's own loopback connection is among them.
fn assert_only_mesh_legs(sockets: &[(u64, SocketAddr, SocketAddr)], pod_ips: &[IpAddr]) {
    let pod_end = |l: &SocketAddr, r: &SocketAddr| {
        if is_outbound_listener(l) {
            Some(r.ip())
        } else if is_outbound_listener(r) || l.ip() == r.ip() {
            Some(l.ip())
        } else {
            None
        }
    };
    assert!(
        sockets
            .iter()
            .all(|(_, l, r)| pod_end(l, r).is_some_and(|ip| pod_ips.contains(&ip))),
        "sockets other than the mesh's legs in the short-cut: {sockets:?}"
    );
}

/// `mesh-probe <args>` in `pod`, as user `nobody`.
fn probe_as_nobody(pod: &Pod, name: &str, args: &[&str]) -> Process {
    let bin = binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let mut cmd = pod.command("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--",
    ])
    .arg(bin)
    .args(args);
    Process::spawn(name, &mut cmd).expect("probe as nobody")
}

/// `result c2s_own=… c2s_foreign=… s2c_own=… s2c_foreign=…` of a `loop-pair`, as numbers.
fn loop_pair_result(p: &mut Process) -> [u64; 4] {
    p.wait_success(Duration::from_secs(20)).expect("loop-pair");
    let line = p
        .lines()
        .into_iter()
        .find(|l| l.starts_with("result "))
        .expect("a result line");
    let value = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key} in {line:?}"))
    };
    [
        value("c2s_own"),
        value("c2s_foreign"),
        value("s2c_own"),
        value("s2c_foreign"),
    ]
}

/// The attack of issue 12, replayed: a victim pod's application talks to itself over
/// `127.0.0.1:7777` from client port 40000; a hostile pod on the same node, as `nobody`, opens
/// the very same address and port pair while the victim's connection is running. Both pods opt
/// into the short-cut. Before the fix both pairs had the same key in the node-wide SOCKHASH and
/// the victim's bytes went to the attacker (and back). Now neither side sees a single byte of
/// the other, and no loopback socket of either pair is in the short-cut while a mesh leg is.
#[test]
fn loopback_pairs_of_two_pods_never_see_each_others_bytes() {
    let _serial = serial();
    let mesh = mesh(1, 3, Shortcut::OptedIn);
    let (victim, attacker, server) = (mesh.pod(0, 0), mesh.pod(0, 1), mesh.pod(0, 2));
    let pair = |token: &str| {
        vec![
            "loop-pair".to_owned(),
            "--port".into(),
            "7777".into(),
            "--client-port".into(),
            "40000".into(),
            "--token".into(),
            token.into(),
            "--duration-ms".into(),
            "3000".into(),
        ]
    };
    let victim_args = pair("victim");
    let victim_args: Vec<&str> = victim_args.iter().map(String::as_str).collect();
    let mut v = probe_as_nobody(victim, "victim", &victim_args);
    v.wait_for_line("the victim's pair", Duration::from_secs(10), |l| {
        l.starts_with("ready ")
    })
    .expect("victim ready");
    let attacker_args = pair("attacker");
    let attacker_args: Vec<&str> = attacker_args.iter().map(String::as_str).collect();
    let mut a = probe_as_nobody(attacker, "attacker", &attacker_args);
    a.wait_for_line("the attacker's pair", Duration::from_secs(10), |l| {
        l.starts_with("ready ")
    })
    .expect("attacker ready");

    // Meanwhile the victim's mesh connections to a third pod work and take the short-cut, and
    // neither pair's loopback sockets are in it.
    let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let _echo = probe::serve(server, app).expect("echo server");
    probe::echo_bytes(victim, app, 1_000_000).expect("a mesh connection on the same node");
    let sockets = mesh.agents[0]
        .shortcut_sockets()
        .expect("short-cut sockets");
    assert_only_mesh_legs(
        &sockets,
        &[IpAddr::V4(victim.ipv4), IpAddr::V4(server.ipv4)],
    );

    let victim_counts = loop_pair_result(&mut v);
    let attacker_counts = loop_pair_result(&mut a);
    for (who, [c2s_own, c2s_foreign, s2c_own, s2c_foreign]) in
        [("victim", victim_counts), ("attacker", attacker_counts)]
    {
        assert_eq!(
            (c2s_foreign, s2c_foreign),
            (0, 0),
            "{who} saw another pod's bytes: {victim_counts:?} {attacker_counts:?}"
        );
        assert!(
            c2s_own > 100 && s2c_own > 100,
            "{who}'s own connection carried its bytes: {victim_counts:?} {attacker_counts:?}"
        );
    }
}

/// A short-cut mesh connection is in the map with both pods' namespaces; an application's own
/// connection to `127.0.0.1` (or to its own address, outside the mesh's legs) is not.
#[test]
fn only_the_mesh_legs_enter_the_short_cut() {
    let _serial = serial();
    let mesh = mesh(1, 2, Shortcut::OptedIn);
    let (client, server) = (mesh.pod(0, 0), mesh.pod(0, 1));
    // The client pod's own loopback server, held open while the listing is taken.
    let local = SocketAddr::from(([127, 0, 0, 1], 9090));
    let _loop_server = probe::serve(client, local).expect("loopback server");
    let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let _echo = probe::serve(server, app).expect("echo server");
    // Two connections held open: one over loopback inside the client pod, one through the mesh.
    let hold = |addr: SocketAddr, name: &str| {
        probe::hold_one(client, addr, 3_000, name).expect("held connection")
    };
    let mut over_loopback = hold(local, "loopback client");
    let mut through_mesh = hold(app, "mesh client");
    let sockets = mesh.agents[0]
        .shortcut_sockets()
        .expect("short-cut sockets");
    // The mesh connection's two legs, both ends of each: four sockets in two namespaces. In the
    // client's, its captured connection from its address to the agent's listener on loopback;
    // in the server's, the agent's connection from the server's address to itself.
    assert_eq!(sockets.len(), 4, "{sockets:?}");
    assert_only_mesh_legs(
        &sockets,
        &[IpAddr::V4(client.ipv4), IpAddr::V4(server.ipv4)],
    );
    let outbound: Vec<_> = sockets
        .iter()
        .filter(|(_, l, r)| is_outbound_listener(l) || is_outbound_listener(r))
        .collect();
    assert_eq!(outbound.len(), 2, "{sockets:?}");
    assert!(
        outbound
            .iter()
            .all(|(_, l, r)| [l.ip(), r.ip()].contains(&IpAddr::V4(client.ipv4))),
        "{sockets:?}"
    );
    assert!(
        sockets
            .iter()
            .filter(|s| !outbound.contains(s))
            .all(|(_, l, r)| l.ip() == r.ip() && l.ip() == IpAddr::V4(server.ipv4)),
        "{sockets:?}"
    );
    let namespaces: std::collections::BTreeSet<u64> = sockets.iter().map(|s| s.0).collect();
    assert_eq!(namespaces.len(), 2, "{sockets:?}");
    over_loopback.wait_success(Duration::from_secs(20)).unwrap();
    through_mesh.wait_success(Duration::from_secs(20)).unwrap();
}

/// TCP memory the node has allocated, in bytes (`/proc/net/sockstat`, `TCP: … mem <pages>`).
fn tcp_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").expect("sockstat");
    let pages: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|k| *k == "mem")
                .and_then(|i| f.get(i + 1)?.parse().ok())
        })
        .expect("TCP mem in /proc/net/sockstat");
    pages * 4096
}

/// The last `written <n>` a `send --progress-ms` printed.
fn written(p: &Process) -> u64 {
    p.lines()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("written ")?.parse().ok())
        .unwrap_or(0)
}

/// A `mesh-probe serve --mode sink` for one connection in `pod` on `app` (with `extra` options),
/// once it listens.
fn sink(pod: &Pod, app: SocketAddr, name: &str, extra: &[&str]) -> Process {
    let bin = binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let mut cmd = pod.command(&bin);
    cmd.args(["serve", &app.to_string(), "--mode", "sink", "--count", "1"])
        .args(extra);
    let mut sink = Process::spawn(name, &mut cmd).expect("sink");
    sink.wait_for_line("the sink to listen", Duration::from_secs(10), |l| {
        l.starts_with("listening ")
    })
    .expect("listening");
    sink
}

/// A `mesh-probe send` of `total` bytes from `pod` to `app`, reporting progress every 50 ms.
fn sender(pod: &Pod, app: SocketAddr, total: u64) -> Process {
    let bin = binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let mut cmd = pod.command(&bin);
    cmd.args([
        "send",
        &app.to_string(),
        &total.to_string(),
        "--progress-ms",
        "50",
    ]);
    Process::spawn("sender", &mut cmd).expect("sender")
}

/// Same node, short-cut on: a client writes toward a server that accepts and then does not read
/// for four seconds. The client is held, as TCP would hold it: it stops after a bounded amount
/// (the budget on each of the two legs, plus TCP's own buffers), the node's TCP memory stays
/// within that, and once the server reads every byte arrives, in order (count and CRC-32).
/// Before the fix the client pushed 1.5 GB into kernel memory.
#[test]
fn a_sender_toward_a_stalled_reader_is_held_to_a_bound() {
    /// Two legs' budgets (4 MiB each), their TCP buffers once held (send buffers autotune to 4
    /// MiB, receive buffers start at 128 KiB), the agent's 256 KiB read: about 17 MiB.
    const BOUND: u64 = 32 << 20;
    const TOTAL: u64 = 256 << 20;
    let _serial = serial();
    let mesh = mesh(1, 2, Shortcut::OptedIn);
    let (client, server) = (mesh.pod(0, 0), mesh.pod(0, 1));
    let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let mut sink = sink(server, app, "stalled sink", &["--stall-ms", "4000"]);
    let before = tcp_memory();
    let fast_before = mesh.agents[0].fastpath().expect("fast path");
    let mut sender = sender(client, app, TOTAL);
    // Let the sender run into the bound while the server stalls.
    std::thread::sleep(Duration::from_millis(2500));
    let stalled_at = written(&sender);
    let memory = tcp_memory().saturating_sub(before);
    let reading = sink.lines().iter().any(|l| l.starts_with("reading "));
    assert!(!reading, "the sink must still stall when the bound is read");
    assert!(
        stalled_at > 0 && stalled_at <= BOUND,
        "the sender wrote {stalled_at} bytes toward a reader that reads nothing (bound {BOUND})"
    );
    assert!(
        memory <= BOUND,
        "node TCP memory grew by {memory} bytes while the reader stalled (bound {BOUND})"
    );
    // Still held a moment later: it is waiting, not just slow.
    std::thread::sleep(Duration::from_millis(500));
    let later = written(&sender);
    assert!(later <= BOUND, "{later} bytes written, bound {BOUND}");
    // The sink reads now: everything arrives, in order.
    let started = Instant::now();
    sender
        .wait_success(Duration::from_secs(120))
        .expect("the sender finishes once the reader reads");
    sink.wait_success(Duration::from_secs(10)).expect("sink");
    let sent = sender
        .lines()
        .into_iter()
        .find(|l| l.starts_with("sent "))
        .expect("sent line");
    let crc = sent
        .split_whitespace()
        .find_map(|f| f.strip_prefix("crc="))
        .unwrap();
    let received = format!("received {TOTAL} bytes crc={crc}");
    assert!(
        sink.lines().iter().any(|l| l.starts_with(&received)),
        "sink: {:?}, sender: {sent}",
        sink.lines()
    );
    let fast = mesh.agents[0]
        .fastpath()
        .expect("fast path")
        .since(&fast_before);
    assert!(
        fast.held_bytes > 0,
        "the bound held messages to the TCP path"
    );
    // Both pods opted in: whenever neither leg held a byte of the client's, its messages went
    // straight to the server's socket, and the count and CRC above show that no byte overtook
    // another on the way between the two paths.
    assert!(fast.direct_bytes > 0, "no message went straight across");
    eprintln!(
        "held at {stalled_at} bytes (TCP memory +{memory} bytes); {} bytes took the TCP path, \
         {} went straight across; the rest took {:?}",
        fast.held_bytes,
        fast.direct_bytes,
        started.elapsed()
    );
}

/// A same-node connection whose applications talk straight to each other (both pods opted in)
/// must die with its agent, as a relayed one does. The attack: two colluding applications that
/// keep talking after their agent is gone, ignoring the FIN the kernel sent for each of the
/// agent's sockets (the client keeps writing, the server keeps reading past EOF). Were the
/// kernel to go on sending the client's messages straight to the server (the pair outlives the
/// agent in its pinned map), the connection would run unmediated: no policy, no telemetry. The
/// kernel sends direct only while the agent's sockets of both legs are open, so the client's
/// next writes reach the agent's closed socket and are reset, and nothing more reaches the
/// server.
#[test]
fn a_direct_connection_dies_with_its_agent() {
    const TOTAL: u64 = 1 << 40;
    let _serial = serial();
    let mut mesh = mesh(1, 2, Shortcut::OptedIn);
    let (client, server) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let mut sink = sink(&server, app, "sink", &["--past-eof-ms", "2000"]);
    let fast_before = mesh.agents[0].fastpath().expect("fast path");
    let mut sender = sender(&client, app, TOTAL);
    std::thread::sleep(Duration::from_millis(1000));
    let agent = mesh.agents.remove(0);
    let fast = agent.fastpath().expect("fast path").since(&fast_before);
    assert!(
        fast.direct_bytes > 0,
        "the connection went straight across before the agent died: {fast:?}"
    );
    agent.kill().expect("agent killed");
    let status = sender
        .wait(Duration::from_secs(10))
        .expect("the sender stops once its agent is gone");
    assert!(
        !status.success(),
        "the sender finished {TOTAL} bytes without its agent"
    );
    let stopped = written(&sender);
    sink.wait(Duration::from_secs(10)).expect("sink");
    let past_eof: u64 = sink
        .lines()
        .iter()
        .find_map(|l| {
            l.strip_prefix("past_eof ")?
                .strip_suffix(" bytes")?
                .parse()
                .ok()
        })
        .expect("the sink's past_eof line");
    // What was queued for the server when its leg's FIN came may be read after it; 8 MiB
    // (two budgets) bounds it. Without the check, the whole second of writing the test waits
    // (hundreds of megabytes) would arrive.
    assert!(
        past_eof <= 8 << 20,
        "{past_eof} bytes reached the server after its agent died"
    );
    eprintln!(
        "{} bytes went straight across while the agent lived; the sender failed at {stopped} \
         bytes; {past_eof} bytes reached the server after the agent's FIN",
        fast.direct_bytes
    );
    // The killed agent could not remove its pairing; the next one clears what it left.
    let node = mesh.tb.node(0).clone();
    let mut agent = Agent::start(&node, &mesh.options).expect("restarted agent");
    let line = agent
        .wait_for_log_from(
            0,
            "the stale pairing removed",
            Duration::from_secs(10),
            |l| l.contains("removed the same-node pairings an earlier agent left"),
        )
        .expect("stale pairings removed");
    assert!(line.contains("stale=2"), "{line}");
    mesh.agents.push(agent);
}

/// The agents' default: the short-cut is offered only to pods that opt in, so a blocking client
/// that half-closes and then reads (the case where the kernel's `tcp_bpf_recvmsg` returns
/// `EAGAIN` on a sockmap socket) never sees it: 100 such clients, same node and across nodes,
/// all get their echo. `mesh-probe connect` fails on a spurious `EAGAIN`.
#[test]
fn blocking_half_close_clients_never_see_eagain_by_default() {
    let _serial = serial();
    let mesh = mesh(2, 2, Shortcut::Default);
    let client = mesh.pod(0, 0);
    let mut failures = Vec::new();
    let mut servers = Vec::new();
    for server in [mesh.pod(0, 1), mesh.pod(1, 0)] {
        let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
        servers.push(probe::serve(server, app).expect("echo server"));
        for i in 0..50 {
            if let Err(e) = probe::connect(client, app, &format!("half-close {i}")) {
                // The command line is long; its last words say what happened.
                let e = e.to_string();
                let tail = e.rsplit("mesh-probe: ").next().unwrap_or(&e);
                failures.push(format!("{app} #{i}: {tail}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 100 failed: {failures:?}",
        failures.len()
    );
}

/// Opting a running workload in (its namespace's annotation) changes the setting in place: the
/// pods stay enrolled (no moment without capture), and the next mesh connection's legs enter
/// the short-cut. Opting out again takes new legs back to TCP.
#[test]
fn the_shortcut_setting_changes_in_place() {
    let _serial = serial();
    let mesh = mesh(1, 2, Shortcut::Default);
    let (client, server) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let app = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let _echo = probe::serve(&server, app).expect("echo server");
    let held_connection = |sockets_wanted: usize, mesh: &Mesh| {
        let mut p = probe::hold_one(&client, app, 1_500, "held client").expect("client");
        let sockets = mesh.agents[0]
            .shortcut_sockets()
            .expect("short-cut sockets");
        assert_eq!(sockets.len(), sockets_wanted, "{sockets:?}");
        p.wait_success(Duration::from_secs(20)).expect("client");
    };
    held_connection(0, &mesh);
    for (setting, sockets) in [("enabled", 4), ("disabled", 0)] {
        let from = mesh.agents[0].log_len();
        mesh.files
            .namespace_with(
                mesh_tests::mesh::NS,
                true,
                &[(mesh_tests::cluster::SHORTCUT, setting)],
            )
            .expect("namespace");
        // Both pods of the namespace change.
        let changed = |mesh: &Mesh| {
            mesh.agents[0].logs()[from..]
                .iter()
                .filter(|l| l.contains("short-cut setting changed"))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while changed(&mesh) < 2 {
            assert!(
                Instant::now() < deadline,
                "both pods' setting changes in place"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let removed = mesh.agents[0].logs()[from..]
            .iter()
            .any(|l| l.contains("removed from the mesh") || l.contains("pod enrolled"));
        assert!(!removed, "a pod was re-enrolled for a short-cut change");
        held_connection(sockets, &mesh);
    }
}
