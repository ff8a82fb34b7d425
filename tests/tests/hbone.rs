//! Privileged: what HBONE between nodes must guarantee (confidentiality on the link, mutual
//! authentication both ways, `PeerAuthentication`, certificate rotation, pooling, robustness of
//! port 15008, idle tunnels).
//!
//! Every test builds its own two-node testbed with one agent per node, and each refusal is
//! paired with a control in the same testbed that differs only in the property under test, so
//! a check that could not fail would show.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::binary,
    mesh::{Mesh, Shortcut, NS},
    probe::{self, RawEnd},
    process::run,
    telemetry::{count, scrape},
    Agent, Node, Pod, Process, TestbedSpec,
};
use nix::sys::signal::Signal;

const LOG_WAIT: Duration = Duration::from_secs(10);
const APP_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
/// The identity the `hbone` probe claims: in the mesh's trust domain, held by no pod.
const PROBE_ID: &str = "spiffe://cluster.local/ns/mesh/sa/probe";

/// A meshed testbed whose agents run with `extra_args`. The agents are started as the plain
/// mesh starts them, then (when there are extra arguments) stopped cleanly and started again
/// with them, the way a changed `DaemonSet` is rolled out.
fn mesh(nodes: usize, pods: usize, unmeshed: &[(usize, usize)], extra_args: &[&str]) -> Mesh {
    let spec = TestbedSpec {
        nodes,
        pods_per_node: pods,
    };
    let mut mesh = Mesh::new(spec, Shortcut::Default, unmeshed).expect("meshed testbed");
    if !extra_args.is_empty() {
        mesh.options.extra_args = extra_args.iter().map(ToString::to_string).collect();
        for agent in mesh.agents.drain(..) {
            agent.stop().expect("agent stops cleanly");
        }
        for node in 0..nodes {
            let agent = mesh
                .start_agent(node)
                .expect("agent with the extra arguments");
            mesh.agents.push(agent);
        }
    }
    mesh
}

fn v4(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod.ipv4), port)
}

/// A meshed pod's SPIFFE identity (service account `sa-<pod>` in [`NS`]).
fn identity(pod: &Pod) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/sa-{}", pod.name)
}

fn probe_bin() -> PathBuf {
    binary("mesh-probe", "mesh-tests").expect("mesh-probe binary")
}

fn serve(pod: &Pod, mode: &str) -> Process {
    probe::serve_mode(pod, SocketAddr::new(IpAddr::V4(pod.ipv4), APP_PORT), mode).expect("server")
}

/// Runs `cmd` to completion: whether it succeeded, and its stdout then stderr (also echoed to
/// stderr, as [`Process`] echoes its children).
fn outcome(name: &str, cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running the probe");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    text.lines().for_each(|l| eprintln!("[{name}] {l}"));
    (out.status.success(), text.into_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Waits for `agent`'s log line (from line `from` on) of a relayed connection from `src` to
/// `dst` with `security` (`mutual_tls`, `none`, ...).
fn closed(agent: &mut Agent, from: usize, src: &Pod, dst: SocketAddr, security: &str) -> String {
    let (src, dst) = (format!("src={}:", src.ipv4), format!("dst={dst} "));
    let security = format!("security=\"{security}\"");
    agent
        .wait_for_log_from(from, "the connection's log line", LOG_WAIT, |l| {
            l.contains("connection closed")
                && l.contains(&src)
                && l.contains(&dst)
                && l.contains(&security)
        })
        .unwrap()
}

/// Waits until `agent` has logged at least `n` lines containing `needle` from line `from` on.
fn wait_count(agent: &Agent, from: usize, needle: &str, n: usize) {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let logs = agent.logs();
        let seen = logs[from..].iter().filter(|l| l.contains(needle)).count();
        if seen >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{seen} of {n} lines {needle:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Established TCP connections to port 15008 in `pod`'s namespace, as (local, peer) addresses.
fn hbone_connections(pod: &Pod) -> Vec<(String, String)> {
    let out = run(pod
        .command("ss")
        .args(["-Htn", "state", "established", "( dport = :15008 )"]))
    .expect("ss");
    // With a state filter, ss leaves out the state column: Recv-Q Send-Q Local Peer.
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(((*f.get(2)?).to_string(), (*f.get(3)?).to_string()))
        })
        .collect()
}

/// Captures `node`'s inter-node link (eth1) while `traffic` runs; returns the capture file's
/// bytes (headers and full payloads) and tcpdump's one-line-per-packet reading of it.
fn capture_link(node: &Node, file: &Path, traffic: impl FnOnce()) -> (Vec<u8>, String) {
    let mut tcpdump = node.command("tcpdump");
    // Each packet to the file as it arrives (not in ring-buffer blocks), as root (Debian's
    // tcpdump otherwise drops to its own user, which cannot write here).
    tcpdump
        .args([
            "-i",
            "eth1",
            "--immediate-mode",
            "-U",
            "-n",
            "-Z",
            "root",
            "-w",
        ])
        .arg(file);
    let mut dump = Process::spawn(format!("tcpdump {}", node.name), &mut tcpdump).expect("tcpdump");
    dump.wait_for_line("tcpdump to listen", LOG_WAIT, |l| {
        l.contains("listening on eth1")
    })
    .unwrap();
    traffic();
    // Let the last packets reach the file: until it stops growing (bounded).
    let (deadline, mut last) = (Instant::now() + LOG_WAIT, None);
    loop {
        thread::sleep(Duration::from_millis(300));
        let len = fs::metadata(file).map(|m| m.len()).ok();
        if (len.is_some() && len == last) || Instant::now() > deadline {
            break;
        }
        last = len;
    }
    dump.signal(Signal::SIGINT).unwrap();
    dump.wait_success(LOG_WAIT)
        .expect("tcpdump exits after SIGINT");
    let packets = run(Command::new("tcpdump").arg("-nnr").arg(file)).expect("tcpdump -r");
    (fs::read(file).expect("capture file"), packets)
}

#[test]
fn cross_node_bytes_on_the_link_are_encrypted() {
    const MARKER: &str = "mesh-marker:these-bytes-must-never-cross-the-link-in-clear;";
    let mesh = mesh(2, 2, &[(1, 1)], &[]);
    let client = mesh.pod(0, 0).clone();
    let payload = MARKER.repeat(64 * 1024 / MARKER.len());
    // The meshed destination, then the control: an unmeshed one, reached in plaintext.
    for (target, meshed) in [(mesh.pod(1, 0), true), (mesh.pod(1, 1), false)] {
        let _server = serve(target, "echo");
        let file = mesh
            .tb
            .scratch_dir()
            .join(format!("to-{}.pcap", target.name));
        let (bytes, packets) = capture_link(mesh.tb.node(0), &file, || {
            probe::connect(&client, v4(target, APP_PORT), &payload).expect("echo across nodes");
        });
        let to_port = |port: u16| format!("> {}.{port}:", target.ipv4);
        let clear = contains(&bytes, MARKER.as_bytes());
        if meshed {
            assert!(
                packets.contains(&to_port(HBONE_PORT)),
                "no packet to port 15008 captured:\n{packets}"
            );
            assert!(
                !packets.contains(&to_port(APP_PORT)),
                "packets to the application port went around the tunnel:\n{packets}"
            );
            assert!(
                bytes.len() > 2 * payload.len(),
                "a capture of {} bytes cannot hold the {}-byte echo both ways",
                bytes.len(),
                payload.len()
            );
            assert!(!clear, "the marker crossed the link in clear text");
        } else {
            assert!(packets.contains(&to_port(APP_PORT)), "{packets}");
            assert!(
                clear,
                "control: plaintext to an unmeshed pod must show the marker"
            );
        }
    }
}

/// Runs `mesh-probe hbone` from unmeshed pod n0-p1 to meshed n1-p0's port 15008, asking for a
/// tunnel to its application: the probe presents a certificate for [`PROBE_ID`] signed by the
/// CA in `ca_dir` (`expired`: valid until an hour ago) and requires n1-p0's identity, checked
/// against the testbed's CA. Returns whether the echo came back, and the probe's output.
fn hbone_probe(mesh: &Mesh, ca_dir: &Path, expired: bool) -> (bool, String) {
    let (from, to) = (mesh.pod(0, 1), mesh.pod(1, 0));
    let mut cmd = from.command(probe_bin());
    cmd.arg("hbone")
        .arg(v4(to, HBONE_PORT).to_string())
        .arg(v4(to, APP_PORT).to_string())
        .arg("--ca-dir")
        .arg(ca_dir)
        .arg("--trust-dir")
        .arg(mesh.options.ca_dir())
        .args(["--identity", PROBE_ID, "--expect", &identity(to)])
        .args(["--message", "a tunnel of the probe's own"]);
    if expired {
        cmd.arg("--expired");
    }
    outcome("hbone probe", &mut cmd)
}

/// A testbed for [`hbone_probe`], with an echo server in n1-p0, where the control passes: a
/// valid certificate of the testbed's own CA gets its tunnel and the echo, and n1's agent
/// relays it as a mutual-TLS connection from the probe's identity.
fn hbone_probe_testbed() -> (Mesh, Process) {
    let mut mesh = mesh(2, 2, &[(0, 1)], &[]);
    let server = serve(mesh.pod(1, 0), "echo");
    let from = mesh.agents[1].log_len();
    let (ok, out) = hbone_probe(&mesh, &mesh.options.ca_dir(), false);
    assert!(
        ok && out.contains("result=ok"),
        "control: a certificate of the mesh's CA must be accepted:\n{out}"
    );
    let (src, dst) = (mesh.pod(0, 1).clone(), v4(mesh.pod(1, 0), APP_PORT));
    let line = closed(&mut mesh.agents[1], from, &src, dst, "mutual_tls");
    assert!(line.contains(&format!("src_identity={PROBE_ID}")), "{line}");
    (mesh, server)
}

/// The probe is refused, n1's agent logs the failed handshake with `reason`, and relays nothing.
fn assert_refused(mesh: &mut Mesh, ca_dir: &Path, expired: bool, reason: &str) {
    let from = mesh.agents[1].log_len();
    let (ok, out) = hbone_probe(mesh, ca_dir, expired);
    assert!(!ok && out.contains("result=refused"), "{out}");
    let line = mesh.agents[1]
        .wait_for_log_from(
            from,
            "the agent to log the failed handshake",
            LOG_WAIT,
            |l| l.contains("TLS handshake on the HBONE port failed"),
        )
        .unwrap();
    assert!(line.contains(reason), "expected {reason:?} in: {line}");
    let relayed = mesh.agents[1].logs()[from..]
        .iter()
        .any(|l| l.contains("connection closed") && l.contains(PROBE_ID));
    assert!(!relayed, "a tunnel of the refused client was relayed");
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let (mut mesh, _server) = hbone_probe_testbed();
    // Same identity, same trust domain, but signed by a CA the mesh does not trust.
    let other_ca = mesh.tb.scratch_dir().join("other-ca");
    assert_refused(&mut mesh, &other_ca, false, "UnknownIssuer");
}

#[test]
fn expired_client_certificate_is_refused() {
    let (mut mesh, _server) = hbone_probe_testbed();
    let ca = mesh.options.ca_dir();
    assert_refused(&mut mesh, &ca, true, "expired");
}

#[test]
fn server_with_the_wrong_identity_is_refused() {
    let mut mesh = mesh(2, 1, &[], &[]);
    let (client, target) = (mesh.pod(0, 0).clone(), mesh.pod(1, 0).clone());
    // n1's agent goes; a rogue HBONE server takes n1-p0's port 15008, with a certificate from the
    // mesh's own CA. n0's agent still routes to n1-p0 over HBONE, expecting its identity.
    mesh.agents
        .remove(1)
        .stop()
        .expect("agent n1 stops cleanly");
    let ca = mesh.options.ca_dir();
    let impostor = format!("spiffe://cluster.local/ns/{NS}/sa/impostor");
    // The impostor, then the control: the same server holding the right identity.
    for (id, accepted) in [(impostor.as_str(), false), (&identity(&target), true)] {
        let mut cmd = target.command(probe_bin());
        cmd.args([
            "hbone-serve",
            &v4(&target, HBONE_PORT).to_string(),
            "--ca-dir",
        ])
        .arg(&ca)
        .args(["--identity", id]);
        let mut rogue = Process::spawn(format!("rogue {id}"), &mut cmd).expect("rogue server");
        rogue
            .wait_for_line("the rogue server to listen", LOG_WAIT, |l| {
                l.starts_with("listening ")
            })
            .unwrap();
        let from = mesh.agents[0].log_len();
        let result = probe::connect(&client, v4(&target, APP_PORT), "for n1-p0 only");
        let agent = &mut mesh.agents[0];
        if accepted {
            result.expect("control: the right identity is accepted");
            let want = format!(
                "connect authority={} identity={}",
                v4(&target, APP_PORT),
                identity(&client)
            );
            rogue
                .wait_for_line("the tunnel", LOG_WAIT, |l| l == want)
                .unwrap();
            closed(agent, from, &client, v4(&target, APP_PORT), "mutual_tls");
        } else {
            let err = result.expect_err("an impostor must not get the connection");
            let line = agent
                .wait_for_log_from(from, "the refused tunnel", LOG_WAIT, |l| {
                    l.contains("could not open the HBONE tunnel")
                })
                .unwrap();
            assert!(
                line.contains("NotValidForName") && line.contains(&identity(&target)),
                "the refusal must be about the identity: {line}"
            );
            let leaked = rogue
                .lines()
                .into_iter()
                .filter(|l| l.starts_with("connect "));
            assert_eq!(leaked.count(), 0, "the impostor got a request ({err})");
        }
    }
}

/// Writes `PeerAuthentication` `name` in [`NS`] and waits until n1's agent has loaded it, with
/// `count` policies in all and no error.
fn set_policy(mesh: &mut Mesh, name: &str, mode: &str, labels: &[(&str, &str)], count: usize) {
    let from = mesh.agents[1].log_len();
    mesh.files
        .peer_authentication(NS, name, mode, labels)
        .unwrap();
    let line = mesh.agents[1]
        .wait_for_log_from(from, "the agent to load the policy", LOG_WAIT, |l| {
            l.contains("cluster state updated generation=")
        })
        .unwrap();
    let want = format!("peer_authentications={count} ");
    assert!(line.contains(&want) && line.contains("errors=0 "), "{line}");
}

/// Plaintext from `client` (unmeshed) to `target` on n1: echoed and relayed, or refused.
fn plaintext(mesh: &mut Mesh, client: &Pod, target: &Pod, accepted: bool) {
    let from = mesh.agents[1].log_len();
    let dst = v4(target, APP_PORT);
    let result = probe::connect(client, dst, "plaintext");
    if accepted {
        result.unwrap_or_else(|e| panic!("plaintext to {} refused: {e}", target.name));
        closed(&mut mesh.agents[1], from, client, dst, "none");
    } else {
        let err = result.expect_err("plaintext must be refused");
        let dst = format!("dst={dst} ");
        mesh.agents[1]
            .wait_for_log_from(from, "the refusal", LOG_WAIT, |l| {
                l.contains("plaintext connection refused") && l.contains(&dst)
            })
            .unwrap_or_else(|e| panic!("{e} (client: {err})"));
    }
}

#[test]
fn plaintext_to_a_strict_pod_is_refused_and_to_a_permissive_pod_accepted() {
    let mut mesh = mesh(2, 2, &[(0, 1)], &[]);
    let (meshed, plain) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let (p0, p1) = (mesh.pod(1, 0).clone(), mesh.pod(1, 1).clone());
    let _servers = [serve(&p0, "echo"), serve(&p1, "echo")];
    // No policy: PERMISSIVE.
    plaintext(&mut mesh, &plain, &p0, true);
    set_policy(&mut mesh, "default", "STRICT", &[], 1);
    plaintext(&mut mesh, &plain, &p0, false);
    plaintext(&mut mesh, &plain, &p1, false);
    // STRICT still takes mutual TLS.
    let from = mesh.agents[1].log_len();
    probe::connect(&meshed, v4(&p0, APP_PORT), "over HBONE").expect("mTLS under STRICT");
    closed(
        &mut mesh.agents[1],
        from,
        &meshed,
        v4(&p0, APP_PORT),
        "mutual_tls",
    );
    set_policy(&mut mesh, "default", "PERMISSIVE", &[], 1);
    plaintext(&mut mesh, &plain, &p0, true);
    plaintext(&mut mesh, &plain, &p1, true);
    // A workload policy overrides the namespace's, for the pods it selects only.
    set_policy(&mut mesh, "p0-strict", "STRICT", &[("app", &p0.name)], 2);
    plaintext(&mut mesh, &plain, &p0, false);
    plaintext(&mut mesh, &plain, &p1, true);
}

/// `obtained a workload certificate` lines of `agent` for `id`, from line `from` on.
fn issued(agent: &Agent, from: usize, id: &str) -> usize {
    let id = format!("identity={id} ");
    agent.logs()[from..]
        .iter()
        .filter(|l| l.contains("obtained a workload certificate") && l.contains(&id))
        .count()
}

/// Polls until `pod` has no HBONE connection (the pool's idle timeout closed it).
fn wait_no_hbone_connection(pod: &Pod, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let conns = hbone_connections(pod);
        if conns.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still open after {within:?}: {conns:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn certificate_rotated_under_a_long_lived_stream_keeps_it() {
    // Certificates live 4 s (rotated at about half of that); idle pooled connections close after
    // 1 s.
    let args = [
        "--cert-lifetime-secs",
        "4",
        "--hbone-idle-timeout-secs",
        "1",
    ];
    let mut mesh = mesh(2, 1, &[], &args);
    let (client, target) = (mesh.pod(0, 0).clone(), mesh.pod(1, 0).clone());
    let server = serve(&target, "rr");
    let from = [mesh.agents[0].log_len(), mesh.agents[1].log_len()];
    // One connection, request after request for 8 s: twice the certificates' lifetime.
    let out = run(client
        .command(probe_bin())
        .args(["rr", &v4(&target, APP_PORT).to_string()])
        .args(["--conns", "1", "--duration-ms", "8000"]))
    .expect("rr");
    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("rr's JSON");
    assert_eq!(report["errors"], 0, "an exchange failed: {report}");
    assert!(report["requests"].as_u64() > Some(0), "{report}");
    let accepted = server
        .lines()
        .iter()
        .filter(|l| l.starts_with("accepted "))
        .count();
    assert_eq!(accepted, 1, "the stream was reopened");
    for (agent, pod, from) in [(0, &client, from[0]), (1, &target, from[1])] {
        let rotations = issued(&mesh.agents[agent], from, &identity(pod));
        assert!(
            rotations >= 2,
            "{} rotated {rotations} times during the stream",
            pod.name
        );
    }
    closed(
        &mut mesh.agents[0],
        from[0],
        &client,
        v4(&target, APP_PORT),
        "mutual_tls",
    );
    // A new connection after rotation: the pooled one is gone, so it takes a new handshake with
    // the current certificates.
    wait_no_hbone_connection(&client, Duration::from_secs(15));
    drop(server);
    let _echo = serve(&target, "echo");
    let from = mesh.agents[1].log_len();
    probe::connect(&client, v4(&target, APP_PORT), "after rotation").expect("new connection");
    closed(
        &mut mesh.agents[1],
        from,
        &client,
        v4(&target, APP_PORT),
        "mutual_tls",
    );
}

#[test]
fn a_thousand_concurrent_streams_over_pooled_connections_are_byte_exact() {
    const STREAMS: usize = 1000;
    // The agent's default `--hbone-max-streams`.
    const PER_CONNECTION: usize = mesh_hbone::DEFAULT_MAX_STREAMS as usize;
    let mesh = mesh(2, 1, &[], &[]);
    let (client, target) = (mesh.pod(0, 0).clone(), mesh.pod(1, 0).clone());
    let _server = serve(&target, "echo");
    let mut cmd = client.command(probe_bin());
    cmd.args(["parallel", &v4(&target, APP_PORT).to_string()])
        .args([
            "--conns",
            &STREAMS.to_string(),
            "--bytes",
            "65536",
            "--hold-ms",
            "5000",
        ]);
    let mut parallel = Process::spawn("parallel", &mut cmd).expect("parallel");
    let open = parallel
        .wait_for_line("every stream echoed", Duration::from_secs(120), |l| {
            l.starts_with("open=")
        })
        .unwrap();
    assert_eq!(open, format!("open={STREAMS} failed=0"));
    // All streams are open now: count the agent's connections, dialled from inside the pod.
    let conns = hbone_connections(&client);
    parallel.wait_success(Duration::from_secs(120)).unwrap();
    assert!(parallel.lines().contains(&format!("ok={STREAMS} failed=0")));
    let peer = v4(&target, HBONE_PORT).to_string();
    let local = format!("{}:", client.ipv4);
    assert!(
        conns
            .iter()
            .all(|(l, p)| l.starts_with(&local) && *p == peer),
        "{conns:?}"
    );
    let needed = STREAMS.div_ceil(PER_CONNECTION);
    assert!(
        (needed..=needed + 2).contains(&conns.len()),
        "{} HBONE connections for {STREAMS} streams: {conns:?}",
        conns.len()
    );
}

/// Pseudo-random bytes, in hex, after a line of plaintext HTTP (not a TLS record).
fn garbage_hex() -> String {
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let noise = (0..512).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.to_le_bytes()[0]
    });
    let mut hex = String::new();
    for b in b"GET / HTTP/1.1\r\n".iter().copied().chain(noise) {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

#[test]
fn garbage_and_half_open_tls_on_the_hbone_port_leave_the_agent_serving() {
    // The first 43 bytes of a ClientHello whose record announces 244.
    const HELLO_PREFIX: &str = "16030100f4010000f00303\
        000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let mut mesh = mesh(2, 2, &[(0, 1)], &[]);
    let (meshed, plain, target) = (
        mesh.pod(0, 0).clone(),
        mesh.pod(0, 1).clone(),
        mesh.pod(1, 0).clone(),
    );
    let _server = serve(&target, "echo");
    let from = mesh.agents[1].log_len();
    let attacks = [
        ("garbage", garbage_hex(), 5_000),
        ("silent", String::new(), 20_000),
        ("ClientHello prefix", HELLO_PREFIX.to_string(), 20_000),
    ];
    let mut attackers: Vec<(&str, u64, Process)> = attacks
        .into_iter()
        .map(|(name, hex, bound_ms)| {
            let options = probe::Raw {
                send_hex: &hex,
                wait: Duration::from_secs(25),
                resend: None,
            };
            let p = probe::raw(&plain, v4(&target, HBONE_PORT), name, &options).expect("raw");
            (name, bound_ms, p)
        })
        .collect();
    let echo = |what: &str| {
        probe::connect(&meshed, v4(&target, APP_PORT), what).expect("echo through the tunnel");
    };
    echo("while port 15008 is under attack");
    for (name, _, p) in &attackers[1..] {
        let closed = p.lines().iter().any(|l| l.starts_with("closed_after_ms="));
        assert!(
            !closed,
            "{name} closed before the echo: the echo did not overlap it"
        );
    }
    for (name, bound_ms, p) in &mut attackers {
        let end = probe::raw_end(p, "the agent to close it", Duration::from_secs(30)).unwrap();
        assert!(
            matches!(&end, RawEnd::Closed { after, .. } if after.as_millis() <= u128::from(*bound_ms)),
            "{name}: {end:?} (bound {bound_ms} ms)"
        );
    }
    // One failed handshake (the garbage), two timed out (the silent peers).
    let agent = &mesh.agents[1];
    wait_count(agent, from, "TLS handshake on the HBONE port failed", 1);
    wait_count(agent, from, "TLS handshake on the HBONE port timed out", 2);
    let from = agent.log_len();
    echo("after the attack");
    closed(
        &mut mesh.agents[1],
        from,
        &meshed,
        v4(&target, APP_PORT),
        "mutual_tls",
    );
}

/// A `raw` probe from `from` to `to`'s echo server that sends 5 bytes (again every `resend`
/// if given) and waits up to `wait` for the connection to be closed under it.
fn raw_probe(from: &Pod, to: &Pod, wait: Duration, resend: Option<Duration>) -> Process {
    let options = probe::Raw {
        send_hex: "68656c6c6f",
        wait,
        resend,
    };
    probe::raw(from, v4(to, APP_PORT), &from.name, &options).expect("raw probe")
}

#[test]
fn an_idle_tunnel_is_closed_and_a_busy_one_is_not() {
    // A tunnel that moves nothing for 2 s is closed; one that carries 5 bytes every 500 ms is
    // kept. Without the timeout, a peer that stops talking holds a stream (and its relay's
    // memory) on both agents for as long as the connection lives.
    let mesh = mesh(2, 2, &[], &["--hbone-stream-idle-timeout-secs", "2"]);
    let (idle_client, busy_client, target) = (
        mesh.pod(0, 0).clone(),
        mesh.pod(0, 1).clone(),
        mesh.pod(1, 0).clone(),
    );
    let _server = serve(&target, "echo");
    let from = mesh.agents[0].log_len();
    let mut idle = raw_probe(&idle_client, &target, Duration::from_secs(20), None);
    let busy_every = Duration::from_millis(500);
    let mut busy = raw_probe(
        &busy_client,
        &target,
        Duration::from_secs(6),
        Some(busy_every),
    );
    for p in [&mut idle, &mut busy] {
        p.wait_for_line("the echo", LOG_WAIT, |l| l == "received 5")
            .unwrap();
    }
    let end = probe::raw_end(
        &mut idle,
        "the idle tunnel to close",
        Duration::from_secs(25),
    )
    .unwrap();
    assert!(
        matches!(&end, RawEnd::Closed { after, .. }
            if (1_500..=10_000).contains(&after.as_millis())),
        "the idle connection: {end:?} (expected closed after about 2 s)"
    );
    let end = probe::raw_end(
        &mut busy,
        "the busy connection's end",
        Duration::from_secs(15),
    )
    .unwrap();
    let RawEnd::StillOpen { line } = &end else {
        panic!("the busy connection: {end:?} (expected kept open)");
    };
    let received: Option<u64> = line
        .strip_prefix("still_open received=")
        .and_then(|n| n.parse().ok());
    assert!(
        received.is_some_and(|n| n >= 5 * 8),
        "the busy connection's echoes: {line}"
    );
    // Counted and logged with the reason, on whichever agent's timer fired first.
    let closed_idle: u64 = (0..2)
        .map(|n| {
            count(
                &scrape(mesh.tb.node(n)).expect("metrics"),
                "mesh_agent_tunnels_idle_closed_total",
                &[],
            )
        })
        .sum();
    assert!(closed_idle >= 1, "no idle close counted");
    let src = format!("src={}:", idle_client.ipv4);
    let logged = |agent: &Agent, from: usize| {
        agent.logs()[from..]
            .iter()
            .any(|l| l.contains("connection failed") && l.contains(&src) && l.contains("idle for"))
    };
    let deadline = Instant::now() + LOG_WAIT;
    while !(logged(&mesh.agents[0], from) || logged(&mesh.agents[1], 0)) {
        assert!(
            Instant::now() < deadline,
            "no agent logged the idle close of {src} with its reason"
        );
        thread::sleep(Duration::from_millis(50));
    }
}
