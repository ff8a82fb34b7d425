//! `cargo xtask bench --only l7`: HTTP through the waypoint against a direct connection, in one
//! run, with the release binaries.
//!
//! The testbed: node 0 holds the client, the waypoint's pod (outside the capture) and one
//! backend; node 1 the other backend. Two Services bound to the waypoint, `local` (the backend
//! on the client's node) and `remote`, without routes (the waypoint parses each request and
//! sends it to the Service's endpoint over HBONE). Each backend is `mesh-probe http-echo`
//! (HTTP/1.1 and h2c, a JSON echo of about 250 bytes). The client is h2load.
//!
//! For each path (same node, cross node) and protocol (HTTP/1.1, h2c), through the waypoint
//! (agents and waypoint running) and then direct (agents stopped, the client to the backend
//! pod's address):
//!
//! - **saturation**: requests/s over 8 connections (HTTP/1.1) or 2 connections of 16 streams
//!   (h2c), for the run's duration, and through a proxy its vCPU per 1,000 req/s there;
//! - **1,000 req/s**: `mesh-probe http-load`, open loop (a request held back by the one before
//!   is timed from when it was due), 10 HTTP/1.1 connections or 2 h2c connections: p50, p99 and
//!   max latency, and, through the waypoint, the waypoint's CPU time over the run (vCPU at
//!   1,000 req/s) and its resident memory after it. Through a proxy the paced run starts 10 s
//!   after the saturation run ([`SETTLE`], jemalloc's decay time), so the memory read is what
//!   1,000 req/s holds, not what the burst freed and the allocator was still returning; the
//!   resident memory right after the burst is reported too.
//!
//! Then the references (`nginx.rs`), the agents stopped, measured the same way (the proxy
//! columns are nginx's process): nginx in the waypoint's pod as a plain reverse proxy, and nginx
//! there doing the waypoint hop's cryptography (mutual TLS in and out, in a chain of three nginx
//! processes standing for source agent, waypoint and destination agent; HTTP/1.1).
//!
//! Results: `l7.md` and `l7.json` under `bench-results/<unix-time>/`.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use mesh_tests::{
    mesh::{Mesh, Shortcut, NS, PLAIN_NS},
    plan, process,
    waypoint::Waypoint,
    Pod, Process, TestbedSpec,
};
use serde_json::{json, Value};

use super::{nginx, process_ticks, rss_bytes, Plan, TICKS_PER_SEC};
use crate::residency;

/// How the waypoint's residency readings' files begin (`cargo xtask order`): `-rest.txt` once
/// it serves, `-round.txt` after its cases.
pub const WAYPOINT_RESIDENT_PREFIX: &str = "resident-waypoint-";

const APP_PORT: u16 = 8080;
/// The pause between a proxy's saturation run and its paced run: jemalloc's decay time (the
/// waypoint's default, 10 s), after which what the burst freed has gone back to the kernel.
const SETTLE: Duration = Duration::from_secs(10);

/// One measured case.
#[derive(Debug)]
struct Case {
    path: &'static str,
    protocol: &'static str,
    mode: &'static str,
    saturation_rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Through a proxy (the waypoint, or nginx): its vCPU at 1,000 req/s and its RSS after, in
    /// bytes, all and file-backed (its binary's and libraries' pages).
    waypoint: Option<(f64, u64, u64)>,
    /// Through a proxy: its vCPU per 1,000 req/s during the saturation run (its CPU time over
    /// the run, warm-up included, against the requests/s h2load measured): the cost of a
    /// request's work when requests queue up, without a wake-up for each.
    saturation_vcpu: Option<f64>,
    /// Through a proxy: its RSS right after the saturation run, in bytes (before the pause and
    /// the paced run).
    saturation_rss: Option<u64>,
    /// `--profile`, through a proxy: its system calls and context switches per request at
    /// 1,000 req/s (a second paced run, under `perf stat` and `perf record`).
    per_request: Option<PerRequest>,
}

/// How each case is measured: for how long, and where profiles go (`--profile`).
#[derive(Clone, Copy)]
struct How<'a> {
    secs: u64,
    profiles: Option<&'a Path>,
}

pub(super) fn run(plan: &Plan, out: &Path) -> Result<()> {
    let how = How {
        secs: plan.secs.max(3),
        profiles: plan.profile.then_some(out),
    };
    let mut mesh = Mesh::new(
        TestbedSpec {
            nodes: 2,
            pods_per_node: 3,
        },
        Shortcut::Default,
        &[(0, 1)],
    )
    .context("meshed testbed")?;
    // The agents again at a production agent's level (the testbed starts them at the tests').
    mesh.options.log = "info".into();
    for agent in mesh.agents.drain(..) {
        agent.stop().context("stopping an agent")?;
    }
    for node in 0..2 {
        let agent = mesh.start_agent(node)?;
        mesh.agents.push(agent);
    }
    let (client, wp_pod) = (mesh.pod(0, 0).clone(), mesh.pod(0, 1).clone());
    let backends = [
        ("local", mesh.pod(0, 2).clone()),
        ("remote", mesh.pod(1, 0).clone()),
    ];
    write_objects(&mesh, &wp_pod, &backends)?;
    let _servers: Vec<Process> = backends
        .iter()
        .map(|(name, pod)| echo(pod, name))
        .collect::<Result<_>>()?;
    // At `info`, as a deployed waypoint runs (the tests' `mesh_waypoint=debug` writes lines per
    // request).
    std::env::set_var("MESH_WAYPOINT_LOG", "info");
    let copy = WaypointCopy::new(plan, out)?;
    let mut waypoint = Waypoint::start(&wp_pod, &mesh.options, PLAIN_NS, "wp")?;
    waypoint
        .process
        .wait_for_line("the Services", Duration::from_secs(15), |l| {
            l.contains("cluster state updated") && l.contains("services=2")
        })?;
    std::thread::sleep(Duration::from_secs(1));
    let waypoint_pid = waypoint.process.pid();
    let record_pages = |when: &str| -> Result<()> {
        if !copy.profiled {
            return Ok(());
        }
        let pages = residency::file_pages(&copy.path, &[waypoint_pid])?;
        let file = out.join(format!("{WAYPOINT_RESIDENT_PREFIX}{when}.txt"));
        residency::write_pages(&file, &pages)
    };
    record_pages("rest")?;
    let mut cases = Vec::new();
    for (index, (name, _)) in backends.iter().enumerate() {
        let url = format!("http://{}/", plan::service_vip_v4(index));
        for protocol in ["HTTP/1.1", "h2c"] {
            println!("l7: {}, {protocol}, through the waypoint", path_of(name));
            let case = measure(
                &client,
                &url,
                (path_of(name), protocol, "waypoint"),
                how,
                (Some(waypoint.process.pid()), &[]),
            )?;
            cases.push(case);
        }
    }
    cases.push(jwt_case(&mesh, &mut waypoint, &client, how)?);
    cases.push(pool_case(&mesh, &mut waypoint, &client, how)?);
    record_pages("round")?;
    save_warnings(&waypoint.process, out)?;
    drop(waypoint);
    if plan.waypoint_only() {
        return write_results(&cases, plan, out);
    }
    let Mesh { agents, .. } = mesh;
    for agent in agents {
        agent
            .stop()
            .context("stopping an agent for the direct runs")?;
    }
    for (name, pod) in &backends {
        let url = format!(
            "http://{}/",
            SocketAddr::new(IpAddr::V4(pod.ipv4), APP_PORT)
        );
        for protocol in ["HTTP/1.1", "h2c"] {
            println!("l7: {}, {protocol}, direct", path_of(name));
            cases.push(measure(
                &client,
                &url,
                (path_of(name), protocol, "direct"),
                how,
                (None, &[]),
            )?);
        }
    }
    cases.extend(nginx_cases(&client, &wp_pod, &backends, how, out)?);
    cases.extend(nginx_tls_cases(&client, &wp_pod, &backends, how, out)?);
    write_results(&cases, plan, out)
}

/// `l7.md` and `l7.json` under `out`, the table on standard output too, with how much of the
/// waypoint's hot-function list the measured build has.
fn write_results(cases: &[Case], plan: &Plan, out: &Path) -> Result<()> {
    let mut table = markdown(cases);
    if plan.residency.is_none() {
        let binary = mesh_tests::agent::binary("mesh-waypoint", "mesh-agent")?;
        table.push_str(&super::hot_functions_found(
            &crate::workspace_root(),
            crate::functions::WAYPOINT_HOT_FUNCTIONS,
            &binary,
        )?);
    }
    fs::write(out.join("l7.md"), &table)?;
    fs::write(
        out.join("l7.json"),
        serde_json::to_string_pretty(&json_of(cases))?,
    )?;
    println!("\n{table}\nin {}", out.display());
    Ok(())
}

/// The waypoint runs a fresh copy of its binary, as the agents do (`bench.rs`: a proxy's
/// file-backed RSS depends on how its file's pages sit in the page cache, and a copy, written
/// in one go as an image layer is, is how a node gets it): the release build's, in `out`
/// (removed when the run is done); for `cargo xtask order`, the profiling build's, on the file
/// system without read-ahead, its pages out of the cache.
struct WaypointCopy {
    path: PathBuf,
    /// What it copies (the variable points there again when the copy is gone).
    build: PathBuf,
    /// `cargo xtask order`: its resident pages are read.
    profiled: bool,
}

impl WaypointCopy {
    fn new(plan: &Plan, out: &Path) -> Result<Self> {
        let (build, path) = match &plan.residency {
            Some(r) => (
                r.build.join("mesh-waypoint"),
                r.scratch.join("mesh-waypoint"),
            ),
            None => (
                mesh_tests::agent::binary("mesh-waypoint", "mesh-agent")?,
                out.join("mesh-waypoint"),
            ),
        };
        fs::copy(&build, &path)
            .with_context(|| format!("copying {} to {}", build.display(), path.display()))?;
        let profiled = plan.residency.is_some();
        if profiled {
            residency::drop_cached(&path)?;
        }
        std::env::set_var("MESH_MESH_WAYPOINT_BIN", &path);
        Ok(Self {
            path,
            build,
            profiled,
        })
    }
}

impl Drop for WaypointCopy {
    fn drop(&mut self) {
        if !self.profiled {
            std::env::set_var("MESH_MESH_WAYPOINT_BIN", &self.build);
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// "same node" for the backend on the client's node, "cross node" for the other.
fn path_of(backend: &str) -> &'static str {
    if backend == "local" {
        "same node"
    } else {
        "cross node"
    }
}

/// The reference: nginx in the waypoint's pod (the agents stopped), one hop of plain HTTP to
/// each backend, HTTP/1.1 and h2c.
fn nginx_cases(
    client: &Pod,
    wp_pod: &Pod,
    backends: &[(&str, Pod); 2],
    how: How<'_>,
    out: &Path,
) -> Result<Vec<Case>> {
    let listeners: Vec<nginx::Listener> = backends
        .iter()
        .zip([8081_u16, 8083])
        .flat_map(|((_, pod), base)| {
            let backend = SocketAddr::new(IpAddr::V4(pod.ipv4), APP_PORT);
            [(base, false), (base + 1, true)].map(|(port, h2c)| nginx::Listener {
                port,
                backend,
                h2c,
                tls_in: false,
                tls_to: None,
            })
        })
        .collect();
    let instance = nginx::Instance {
        dir: out.join("nginx"),
        certs: None,
        access_log: true,
    };
    let proxy = nginx::start(wp_pod, &instance, &listeners)?;
    let mut cases = Vec::new();
    for (i, (name, _)) in backends.iter().enumerate() {
        for (protocol, listener) in [
            ("HTTP/1.1", &listeners[2 * i]),
            ("h2c", &listeners[2 * i + 1]),
        ] {
            println!("l7: {}, {protocol}, through nginx", path_of(name));
            let url = format!("http://{}:{}/", wp_pod.ipv4, listener.port);
            cases.push(measure(
                client,
                &url,
                (path_of(name), protocol, "nginx"),
                how,
                (Some(proxy.pid()), &[]),
            )?);
        }
    }
    Ok(cases)
}

/// The second reference: nginx doing the waypoint hop's cryptography. A chain of three nginx
/// processes, each one worker, keep-alive on every leg: one in the client's pod (plain HTTP in,
/// mutual TLS 1.3 out, as the source agent), one in the waypoint's pod (mutual TLS in and out,
/// an access-log line per request: the measured hop), one in each backend's pod (mutual TLS in,
/// plain HTTP to the backend, as the destination agent). HTTP/1.1 only: nginx speaks HTTP/1.1
/// to upstreams, so the measured hop sees HTTP/1.1 over TLS whatever the client speaks. What it
/// does not do that the waypoint does: HTTP/2 framing of the tunnels (HBONE), routing by the
/// cluster model, Istio's metrics.
fn nginx_tls_cases(
    client: &Pod,
    wp_pod: &Pod,
    backends: &[(&str, Pod); 2],
    how: How<'_>,
    out: &Path,
) -> Result<Vec<Case>> {
    const DST_PORT: u16 = 8443;
    let dir = out.join("nginx-tls");
    let certs = nginx::Certs::issue(&dir.join("certs"), &["src", "wp", "dst"])?;
    let mut processes = Vec::new();
    for (name, pod) in backends {
        let listener = nginx::Listener {
            port: DST_PORT,
            backend: SocketAddr::new(IpAddr::V4(pod.ipv4), APP_PORT),
            h2c: false,
            tls_in: true,
            tls_to: None,
        };
        let instance = nginx::Instance {
            dir: dir.join(format!("dst-{name}")),
            certs: Some((&certs, "dst")),
            access_log: false,
        };
        processes.push(nginx::start(pod, &instance, &[listener])?);
    }
    let hop = |i: usize, tls_in: bool, backend: SocketAddr, peer: &'static str| nginx::Listener {
        port: 9081 + u16::try_from(i).unwrap_or(0),
        backend,
        h2c: false,
        tls_in,
        tls_to: Some(peer),
    };
    let wp_listeners: Vec<_> = backends
        .iter()
        .enumerate()
        .map(|(i, (_, pod))| {
            hop(
                i,
                true,
                SocketAddr::new(IpAddr::V4(pod.ipv4), DST_PORT),
                "dst",
            )
        })
        .collect();
    let src_listeners: Vec<_> = wp_listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            hop(
                i,
                false,
                SocketAddr::new(IpAddr::V4(wp_pod.ipv4), l.port),
                "wp",
            )
        })
        .collect();
    let measured = nginx::start(
        wp_pod,
        &nginx::Instance {
            dir: dir.join("wp"),
            certs: Some((&certs, "wp")),
            access_log: true,
        },
        &wp_listeners,
    )?;
    processes.push(nginx::start(
        client,
        &nginx::Instance {
            dir: dir.join("src"),
            certs: Some((&certs, "src")),
            access_log: false,
        },
        &src_listeners,
    )?);
    let mut cases = Vec::new();
    for ((name, _), listener) in backends.iter().zip(&src_listeners) {
        println!(
            "l7: {}, HTTP/1.1, through nginx with mutual TLS",
            path_of(name)
        );
        let url = format!("http://{}:{}/", client.ipv4, listener.port);
        cases.push(measure(
            client,
            &url,
            (path_of(name), "HTTP/1.1", "nginx, mTLS"),
            how,
            (Some(measured.pid()), &[]),
        )?);
    }
    Ok(cases)
}

fn write_objects(mesh: &Mesh, wp_pod: &Pod, backends: &[(&str, Pod); 2]) -> Result<()> {
    let files = &mesh.files;
    files.write(
        &format!("pod-{PLAIN_NS}-{}.yaml", wp_pod.name),
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {PLAIN_NS}\n  labels: {{gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}}\nspec:\n  nodeName: n0\n  serviceAccountName: wp\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n",
            name = wp_pod.name,
            ip = wp_pod.ipv4,
        ),
    )?;
    files.write(
        "gateway-wp.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: {PLAIN_NS}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {{namespaces: {{from: All}}}}}}\n"),
    )?;
    for (index, (name, pod)) in backends.iter().enumerate() {
        files.pod(pod, &format!("n{}", pod.node), NS, &[("role", name)])?;
        files.write(
            &format!("service-{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]\n  selector: {{role: {name}}}\n",
                vip = plan::service_vip_v4(index),
            ),
        )?;
    }
    Ok(())
}

fn echo(pod: &Pod, name: &str) -> Result<Process> {
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests")?;
    let mut cmd = pod.command(bin);
    cmd.args([
        "http-echo",
        &format!("{}:{APP_PORT}", pod.ipv4),
        "--name",
        name,
    ]);
    let mut p = Process::spawn(format!("echo {name}"), &mut cmd)?;
    p.wait_for_line("the echo server", Duration::from_secs(10), |l| {
        l.starts_with("listening ")
    })?;
    Ok(p)
}

/// Same node, HTTP/1.1 through the waypoint, each request with a token that a
/// `RequestAuthentication` checks and an `AuthorizationPolicy` requires (its principal): what
/// JWT validation adds (the same token each time, as a client sends it until it expires).
fn jwt_case(mesh: &Mesh, waypoint: &mut Waypoint, client: &Pod, how: How<'_>) -> Result<Case> {
    let jwks = serde_json::to_string(mesh_tests::jwt::JWKS_EC)?;
    let objects = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: local-jwt, namespace: {NS}}}\nspec:\n  targetRefs: [{{kind: Service, name: local}}]\n  jwtRules: [{{issuer: https://idp.example, jwks: {jwks}}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: local-jwt, namespace: {NS}}}\nspec:\n  targetRefs: [{{kind: Service, name: local}}]\n  rules: [{{from: [{{source: {{requestPrincipals: [\"https://idp.example/*\"]}}}}]}}]\n"
    );
    let claims =
        json!({"iss": "https://idp.example", "sub": "bench", "exp": mesh_tests::jwt::now() + 3600});
    let token = mesh_tests::jwt::sign(mesh_tests::jwt::TestKey::Ec, &claims);
    let header = format!("authorization: Bearer {token}");
    case_with(
        mesh,
        (waypoint, client),
        how,
        &objects,
        ("waypoint, JWT", &[header]),
    )
}

/// Same node, HTTP/1.1 through the waypoint, with a `DestinationRule` whose `connectionPool`
/// limits every count the waypoint keeps, high enough not to be reached: what counting
/// requests, connections and retries against them adds.
fn pool_case(mesh: &Mesh, waypoint: &mut Waypoint, client: &Pod, how: How<'_>) -> Result<Case> {
    let objects = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: local-pool, namespace: {NS}}}\nspec:\n  host: local\n  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 1024}}\n      http: {{http1MaxPendingRequests: 1024, http2MaxRequests: 1024, maxRetries: 3}}\n"
    );
    case_with(
        mesh,
        (waypoint, client),
        how,
        &objects,
        ("waypoint, connectionPool", &[]),
    )
}

/// Same node, HTTP/1.1 through the waypoint with `objects` (YAML documents) in force, each
/// request with `headers`: measured as `mode`, once the waypoint's view has them; they are
/// removed afterwards.
fn case_with(
    mesh: &Mesh,
    (waypoint, client): (&mut Waypoint, &Pod),
    how: How<'_>,
    objects: &str,
    (mode, headers): (&'static str, &[String]),
) -> Result<Case> {
    const FILE: &str = "bench-case.yaml";
    let from = waypoint.process.line_count();
    mesh.files.write(FILE, objects)?;
    waypoint
        .process
        .wait_for_line_from(from, mode, Duration::from_secs(15), |l| {
            l.contains("cluster state updated")
        })?;
    println!("l7: same node, HTTP/1.1, through the {mode}");
    let url = format!("http://{}/", plan::service_vip_v4(0));
    let case = measure(
        client,
        &url,
        ("same node", "HTTP/1.1", mode),
        how,
        (Some(waypoint.process.pid()), headers),
    )?;
    let from = waypoint.process.line_count();
    mesh.files.remove(FILE)?;
    waypoint
        .process
        .wait_for_line_from(from, mode, Duration::from_secs(15), |l| {
            l.contains("cluster state updated")
        })?;
    Ok(case)
}

/// The waypoint's warnings, errors and panics over the run, to `waypoint-warnings.log` under
/// `out` (none expected: a line there is a path the measurement took that a healthy waypoint
/// does not).
fn save_warnings(waypoint: &Process, out: &Path) -> Result<()> {
    let file = out.join("waypoint-warnings.log");
    let lines = waypoint.lines();
    let kept: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    if !kept.is_empty() {
        println!(
            "l7: the waypoint wrote {} warnings ({})",
            kept.len(),
            file.display()
        );
    }
    fs::write(&file, kept.join("\n")).with_context(|| format!("writing {}", file.display()))
}

/// Where `pid`'s memory is, mapping by mapping (`smaps`), written to `file`.
fn save_smaps(pid: u32, file: &Path) -> Result<()> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    fs::write(file, smaps).with_context(|| format!("writing {}", file.display()))
}

/// Saturation, then 1,000 req/s, for one URL and protocol; `waypoint`: the proxy's process, and
/// `headers` sent with every request.
fn measure(
    client: &Pod,
    url: &str,
    (path, protocol, mode): (&'static str, &'static str, &'static str),
    how: How<'_>,
    (waypoint, headers): (Option<u32>, &[String]),
) -> Result<Case> {
    let secs = how.secs;
    let h1 = protocol == "HTTP/1.1";
    let saturation = saturation_args(secs, h1, headers);
    // At most this many requests are in flight when h2load's timed run ends (and may be cut).
    let in_flight = if h1 { 8 } else { 2 * 16 };
    let sat_before = waypoint.map(process_ticks).transpose()?;
    let sat_started = Instant::now();
    let sat = h2load(client, &saturation, url, in_flight)?;
    let saturation_vcpu = match (waypoint, sat_before) {
        (Some(pid), Some(before)) => {
            Some(vcpu_since(pid, before, sat_started.elapsed())? / (sat.rps / 1000.0))
        }
        _ => None,
    };
    let saturation_rss = waypoint.map(rss_bytes).transpose()?;
    if waypoint.is_some() {
        // The memory held at 1,000 req/s is measured, not what the burst before it freed and
        // the allocator has not returned yet: jemalloc returns freed pages over its decay time.
        std::thread::sleep(SETTLE);
    }
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    let mut rate: Vec<String> = vec![
        "http-load".into(),
        host,
        "--rate".into(),
        "1000".into(),
        "--duration-ms".into(),
        (secs * 1000).to_string(),
        "--conns".into(),
        if h1 { "10" } else { "2" }.into(),
    ];
    if !h1 {
        rate.push("--h2".into());
    }
    for header in headers {
        rate.extend(["--header".into(), header.clone()]);
    }
    let before = waypoint.map(process_ticks).transpose()?;
    let started = Instant::now();
    let paced = super::probe_json(client, &rate)?;
    let elapsed = started.elapsed();
    let us = |key: &str| -> Result<f64> {
        paced[key]
            .as_f64()
            .with_context(|| format!("http-load: no {key}"))
    };
    if paced["errors"].as_u64() != Some(0) {
        bail!("http-load had errors: {paced}");
    }
    let proxy = match (waypoint, before) {
        (Some(pid), Some(before)) => {
            let vcpu = vcpu_since(pid, before, elapsed)?;
            let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
            let file = super::status_kib(&status, "RssFile:")? * 1024;
            Some((vcpu, rss_bytes(pid)?, file))
        }
        _ => None,
    };
    let per_request = match (waypoint, how.profiles) {
        (Some(pid), Some(dir)) => {
            let tag = format!(
                "{mode}-{}-{}",
                path.replace(' ', "-"),
                if h1 { "h1" } else { "h2c" }
            );
            save_smaps(pid, &dir.join(format!("smaps-{tag}.txt")))?;
            Some(profile_paced(client, &rate, pid, secs, &dir.join(tag))?)
        }
        _ => None,
    };
    Ok(Case {
        path,
        protocol,
        mode,
        saturation_rps: sat.rps,
        p50_ms: us("p50_us")? / 1000.0,
        p99_ms: us("p99_us")? / 1000.0,
        max_ms: us("max_us")? / 1000.0,
        waypoint: proxy,
        saturation_vcpu,
        saturation_rss,
        per_request,
    })
}

/// h2load's arguments for the saturation run: 8 HTTP/1.1 connections or 2 h2c connections of
/// 16 streams, for `secs` after a second's warm-up.
fn saturation_args(secs: u64, h1: bool, headers: &[String]) -> Vec<String> {
    let mut saturation: Vec<String> = vec![
        "-D".into(),
        secs.to_string(),
        "--warm-up-time".into(),
        "1".into(),
    ];
    if h1 {
        saturation.extend([
            "--h1".into(),
            "-c".into(),
            "8".into(),
            "-m".into(),
            "1".into(),
        ]);
    } else {
        saturation.extend(["-c".into(), "2".into(), "-m".into(), "16".into()]);
    }
    for header in headers {
        saturation.extend(["-H".into(), header.clone()]);
    }
    saturation
}

/// The CPUs process `pid` kept busy on average over the `elapsed` time since its CPU time was
/// `before` (clock ticks).
fn vcpu_since(pid: u32, before: u64, elapsed: Duration) -> Result<f64> {
    let ticks = process_ticks(pid)? - before;
    #[allow(clippy::cast_precision_loss)]
    Ok(ticks as f64 / TICKS_PER_SEC / elapsed.as_secs_f64())
}

/// What `--profile` counts per request of a paced run, in the proxy's process (all threads).
#[derive(Clone, Copy, Debug)]
struct PerRequest {
    syscalls: f64,
    /// Switches away from a thread that waited (for an event): each a wake-up to come.
    voluntary: f64,
    /// A thread preempted while it had work.
    involuntary: f64,
}

/// `--profile`: the paced run again with the proxy `pid` under `perf stat` (system calls) and
/// `perf record` (where its CPU goes, `<base>.perf.txt`, and with callees counted in,
/// `<base>.children.txt`), its threads' context switches read
/// before and after: its calls and switches per request. Then once more for a timeline of its
/// system calls (`perf trace`, 0.2 s a second into the run: `<base>.trace.txt`).
fn profile_paced(
    client: &Pod,
    rate: &[String],
    pid: u32,
    secs: u64,
    base: &Path,
) -> Result<PerRequest> {
    let (pid_arg, wait) = (pid.to_string(), (secs + 1).to_string());
    let counts = base.with_extension("stat.txt");
    let mut stat = super::perf_stat("raw_syscalls:sys_enter", &pid_arg, &counts, &wait)?;
    let data = base.with_extension("perf.data");
    let mut record = std::process::Command::new("perf");
    record
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "--call-graph",
            "dwarf,16384",
        ])
        .args(["-p", &pid_arg, "-o"])
        .arg(&data)
        .args(["--", "sleep", &wait]);
    let mut record = Process::spawn("perf record", &mut record)?;
    let switches_before = context_switches(pid)?;
    let paced = super::probe_json(client, rate)?;
    let switches_after = context_switches(pid)?;
    stat.wait_success(Duration::from_secs(30))?;
    record.wait(Duration::from_secs(30))?;
    super::report_profile(&data)?;
    // Where the time goes with what each function calls counted in (the release build keeps
    // its unwind tables).
    let children = process::run(
        std::process::Command::new("perf")
            .args(["report", "--stdio", "--children", "--sort", "symbol"])
            .args(["--percent-limit", "2", "-g", "none", "-i"])
            .arg(&data),
    )?;
    fs::write(base.with_extension("children.txt"), children)?;
    let requests = paced["requests"]
        .as_f64()
        .with_context(|| format!("http-load: no requests in {paced}"))?
        .max(1.0);
    let text = fs::read_to_string(&counts)?;
    let syscalls = super::perf_stat_count(&text, "raw_syscalls:sys_enter")
        .with_context(|| format!("no system calls counted in {}", counts.display()))?;
    let timeline = base.with_extension("trace.txt");
    let mut trace = std::process::Command::new("sh");
    trace
        .arg("-c")
        .arg("sleep 1 && exec perf trace -p \"$0\" -o \"$1\" -- sleep 0.2")
        .arg(&pid_arg)
        .arg(&timeline);
    let mut trace = Process::spawn("perf trace", &mut trace)?;
    let traced = super::probe_json(client, rate);
    trace.wait_success(Duration::from_secs(30))?;
    traced?;
    #[allow(clippy::cast_precision_loss)]
    let per = |n: u64| n as f64 / requests;
    Ok(PerRequest {
        syscalls: syscalls / requests,
        voluntary: per(switches_after.0 - switches_before.0),
        involuntary: per(switches_after.1 - switches_before.1),
    })
}

/// The voluntary and involuntary context switches of all `pid`'s threads so far.
fn context_switches(pid: u32) -> Result<(u64, u64)> {
    let mut sums = (0, 0);
    let tasks = format!("/proc/{pid}/task");
    for task in fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let status = fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            let field =
                |name: &str| -> Option<u64> { line.strip_prefix(name)?.trim().parse().ok() };
            if let Some(n) = field("voluntary_ctxt_switches:") {
                sums.0 += n;
            } else if let Some(n) = field("nonvoluntary_ctxt_switches:") {
                sums.1 += n;
            }
        }
    }
    Ok(sums)
}

/// What an h2load run reports that is used: requests/s.
struct H2load {
    rps: f64,
}

/// Runs h2load; fails when more requests failed than were in flight at the end of its timed run
/// (`in_flight`: those a proxy may see cut by the client, logged 499 by nginx).
fn h2load(client: &Pod, args: &[String], url: &str, in_flight: u64) -> Result<H2load> {
    let out = process::run(client.command("h2load").args(args).arg(url)).context("h2load")?;
    let line = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("no requests line")?;
    let failed: u64 = line
        .split(", ")
        .find_map(|part| part.strip_suffix(" failed"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no failed count in {line:?}"))?;
    if failed > in_flight {
        bail!("h2load had failures: {line}");
    }
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .context("no req/s")?
        .parse()?;
    Ok(H2load { rps })
}

fn markdown(cases: &[Case]) -> String {
    let mut t = String::from(
        "| path | protocol | mode | req/s at saturation | vs direct | p50 / p99 / max at 1,000 req/s (ms) | added p50 / p99 | proxy vCPU at 1,000 req/s (per 1,000 req/s at saturation) | proxy RSS after the paced run (file-backed); right after saturation |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cases {
        let direct = cases
            .iter()
            .find(|d| d.mode == "direct" && d.path == c.path && d.protocol == c.protocol);
        let ratio = direct.map_or(String::new(), |d| {
            format!("{:.2}×", c.saturation_rps / d.saturation_rps)
        });
        let added = direct.map_or(String::new(), |d| {
            format!(
                "{:+.3} / {:+.3} ms",
                c.p50_ms - d.p50_ms,
                c.p99_ms - d.p99_ms
            )
        });
        let (vcpu, rss) = c
            .waypoint
            .map_or((String::new(), String::new()), |(v, r, file)| {
                #[allow(clippy::cast_precision_loss)]
                let mib = |bytes: u64| bytes as f64 / 1_048_576.0;
                let at_load = c
                    .saturation_vcpu
                    .map_or(String::new(), |s| format!(" ({s:.3})"));
                let after_burst = c.saturation_rss.map_or(String::new(), |s| {
                    format!("; {:.1} after saturation", mib(s))
                });
                (
                    format!("{v:.3}{at_load}"),
                    format!("{:.1} MiB ({:.1} file){after_burst}", mib(r), mib(file)),
                )
            });
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {ratio} | {:.3} / {:.3} / {:.1} | {added} | {vcpu} | {rss} |",
            c.path, c.protocol, c.mode, c.saturation_rps, c.p50_ms, c.p99_ms, c.max_ms
        );
    }
    if cases.iter().any(|c| c.per_request.is_some()) {
        t.push_str(
            "\n`--profile`, a second paced run at 1,000 req/s:\n\n| path | protocol | proxy | system calls per request | context switches per request: voluntary (waits) / involuntary |\n|---|---|---|---|---|\n",
        );
        for c in cases {
            if let Some(p) = c.per_request {
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {:.1} | {:.2} / {:.2} |",
                    c.path, c.protocol, c.mode, p.syscalls, p.voluntary, p.involuntary
                );
            }
        }
    }
    t
}

fn json_of(cases: &[Case]) -> Value {
    Value::Array(
        cases
            .iter()
            .map(|c| {
                json!({
                    "path": c.path, "protocol": c.protocol, "mode": c.mode,
                    "saturation_rps": c.saturation_rps, "p50_ms": c.p50_ms, "p99_ms": c.p99_ms,
                    "max_ms": c.max_ms,
                    "waypoint_vcpu_at_1000": c.waypoint.map(|w| w.0),
                    "proxy_vcpu_per_1000_at_saturation": c.saturation_vcpu,
                    "waypoint_rss_bytes": c.waypoint.map(|w| w.1),
                    "waypoint_rss_file_bytes": c.waypoint.map(|w| w.2),
                    "proxy_rss_after_saturation_bytes": c.saturation_rss,
                    "proxy_syscalls_per_request": c.per_request.map(|p| p.syscalls),
                    "proxy_voluntary_switches_per_request": c.per_request.map(|p| p.voluntary),
                    "proxy_involuntary_switches_per_request": c.per_request.map(|p| p.involuntary),
                })
            })
            .collect(),
    )
}
