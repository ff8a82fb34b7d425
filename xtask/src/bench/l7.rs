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
//!   (h2c), for the run's duration;
//! - **1,000 req/s**: `mesh-probe http-load`, open loop (a request held back by the one before
//!   is timed from when it was due), 10 HTTP/1.1 connections or 2 h2c connections: p50, p99 and
//!   max latency, and, through the waypoint, the waypoint's CPU time over the run (vCPU at
//!   1,000 req/s) and its resident memory after it.
//!
//! Then the reference: nginx in the waypoint's pod as a plain reverse proxy (`nginx.rs`), the
//! agents stopped, measured the same way (its process's CPU and memory in the proxy columns).
//!
//! Results: `l7.md` and `l7.json` under `bench-results/<unix-time>/`.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
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

const APP_PORT: u16 = 8080;

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
    /// bytes.
    waypoint: Option<(f64, u64)>,
}

pub(super) fn run(plan: &Plan, out: &Path) -> Result<()> {
    let secs = plan.secs.max(3);
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
    let mut waypoint = Waypoint::start(&wp_pod, &mesh.options, PLAIN_NS, "wp")?;
    waypoint
        .process
        .wait_for_line("the Services", Duration::from_secs(15), |l| {
            l.contains("cluster state updated") && l.contains("services=2")
        })?;
    std::thread::sleep(Duration::from_secs(1));
    let mut cases = Vec::new();
    for (index, (name, _)) in backends.iter().enumerate() {
        let url = format!("http://{}/", plan::service_vip_v4(index));
        for protocol in ["HTTP/1.1", "h2c"] {
            println!("l7: {}, {protocol}, through the waypoint", path_of(name));
            let case = measure(
                &client,
                &url,
                (path_of(name), protocol, "waypoint"),
                secs,
                Some(waypoint.process.pid()),
            )?;
            cases.push(case);
        }
    }
    drop(waypoint);
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
                secs,
                None,
            )?);
        }
    }
    cases.extend(nginx_cases(&client, &wp_pod, &backends, secs, out)?);
    let table = markdown(&cases);
    fs::write(out.join("l7.md"), &table)?;
    fs::write(
        out.join("l7.json"),
        serde_json::to_string_pretty(&json_of(&cases))?,
    )?;
    println!("\n{table}\nin {}", out.display());
    Ok(())
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
    secs: u64,
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
            })
        })
        .collect();
    let proxy = nginx::start(wp_pod, &out.join("nginx"), &listeners)?;
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
                secs,
                Some(proxy.pid()),
            )?);
        }
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
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: {PLAIN_NS}}}\nspec: {{gatewayClassName: istio-waypoint}}\n"),
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

/// Saturation, then 1,000 req/s, for one URL and protocol.
fn measure(
    client: &Pod,
    url: &str,
    (path, protocol, mode): (&'static str, &'static str, &'static str),
    secs: u64,
    waypoint: Option<u32>,
) -> Result<Case> {
    let h1 = protocol == "HTTP/1.1";
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
    // At most this many requests are in flight when h2load's timed run ends (and may be cut).
    let in_flight = if h1 { 8 } else { 2 * 16 };
    let sat = h2load(client, &saturation, url, in_flight)?;
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
    let before = waypoint.map(process_ticks).transpose()?;
    let started = Instant::now();
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests")?;
    let paced: Value = serde_json::from_str(
        process::run(client.command(bin).args(&rate))
            .context("mesh-probe http-load")?
            .trim(),
    )
    .context("http-load's JSON")?;
    let elapsed = started.elapsed().as_secs_f64();
    let us = |key: &str| -> Result<f64> {
        paced[key]
            .as_f64()
            .with_context(|| format!("http-load: no {key}"))
    };
    if paced["errors"].as_u64() != Some(0) {
        bail!("http-load had errors: {paced}");
    }
    let waypoint = match (waypoint, before) {
        (Some(pid), Some(before)) => {
            let ticks = process_ticks(pid)? - before;
            #[allow(clippy::cast_precision_loss)]
            let vcpu = ticks as f64 / TICKS_PER_SEC / elapsed;
            Some((vcpu, rss_bytes(pid)?))
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
        waypoint,
    })
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
        "| path | protocol | mode | req/s at saturation | vs direct | p50 / p99 / max at 1,000 req/s (ms) | added p50 / p99 | proxy vCPU at 1,000 req/s | proxy RSS |\n|---|---|---|---|---|---|---|---|---|\n",
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
        let (vcpu, rss) = c.waypoint.map_or((String::new(), String::new()), |(v, r)| {
            #[allow(clippy::cast_precision_loss)]
            let mib = r as f64 / 1_048_576.0;
            (format!("{v:.3}"), format!("{mib:.1} MiB"))
        });
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.0} | {ratio} | {:.3} / {:.3} / {:.1} | {added} | {vcpu} | {rss} |",
            c.path, c.protocol, c.mode, c.saturation_rps, c.p50_ms, c.p99_ms, c.max_ms
        );
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
                    "waypoint_rss_bytes": c.waypoint.map(|w| w.1),
                })
            })
            .collect(),
    )
}
