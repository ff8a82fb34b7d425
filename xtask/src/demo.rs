//! `cargo xtask demo`: a two-node testbed with a meshed namespace; a client pod reaches a
//! server pod on the other node through its Service, through both agents, which tunnel it over
//! HBONE (mutual TLS with both pods' SPIFFE identities); the demo prints the certificates'
//! issuance, the agents' per-connection log lines and the kernel counters. Then an
//! `AuthorizationPolicy` allows only that client: a second client is denied by the server's
//! agent, and the demo prints both access log records and the metric lines of each. Then it
//! tears everything down.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// `cargo xtask demo --kube`.
mod on_kubernetes;
use mesh_tests::{
    http::http,
    mesh::{Mesh, Shortcut, NS},
    plan, probe,
    telemetry::{access_records, METRICS},
    Pod, TestbedSpec,
};
pub use on_kubernetes::run as run_kube;

pub fn run() -> Result<()> {
    let spec = TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    };
    println!("\n== building a two-node testbed and starting an agent on each node ==");
    let mut mesh =
        Mesh::new(spec, Shortcut::Default, &[]).context("building the meshed testbed")?;
    println!("\n== testbed {} ==", mesh.tb.id());
    for node in mesh.tb.nodes() {
        println!(
            "node {} (netns {}, link {} / {})",
            node.name, node.netns, node.link_ipv4, node.link_ipv6
        );
        for pod in &node.pods {
            println!("  pod {NS}/{} {} / {}", pod.name, pod.ipv4, pod.ipv6);
        }
    }
    let (client, server) = (mesh.pod(0, 0).clone(), mesh.pod(1, 0).clone());

    let vip = plan::service_vip_v4(0);
    println!(
        "\n== service {NS}/echo: {vip}:80 -> {}:8080 ==",
        server.name
    );
    mesh.files.pod(&server, "n1", NS, &[("app", "echo")])?;
    let from = mesh.agents[0].log_len();
    mesh.files
        .service(NS, "echo", &[IpAddr::V4(vip)], 80, 8080, ("app", "echo"))?;
    mesh.agents[0].wait_for_log_from(from, "the service", Duration::from_secs(10), |l| {
        l.contains("cluster state updated") && l.contains("services=1")
    })?;

    println!("\n== {} connects to {vip}:80 ==", client.name);
    let mut srv = probe::serve(&server, "[::]:8080".parse()?).context("echo server")?;
    let reply = probe::connect(
        &client,
        SocketAddr::new(IpAddr::V4(vip), 80),
        "hello through the mesh",
    )
    .context("connect through the service")?;
    println!("client: {reply}");
    let accepted = srv.wait_for_line("the server's accept", Duration::from_secs(10), |l| {
        l.starts_with("accepted ")
    })?;
    println!("server: {accepted}   (the application sees the client pod's own address)");

    for i in 0..2 {
        let line = mesh.agents[i].wait_for_log(
            "the workload certificate",
            Duration::from_secs(10),
            |l| l.contains("obtained a workload certificate"),
        )?;
        println!("\n== agent n{i}: certificate for its pod, by CSR to the built-in CA ==\n{line}");
    }
    println!(
        "\n== the hop between the nodes is HBONE: HTTP/2 CONNECT over mutual TLS 1.3 to \
         {}:15008; both agents log both identities ==",
        server.ipv4
    );
    for (i, direction) in [(0, "outbound"), (1, "inbound")] {
        let line = mesh.agents[i].wait_for_log(
            "the connection's log line",
            Duration::from_secs(10),
            |l| l.contains("connection closed") && l.contains(direction),
        )?;
        anyhow::ensure!(
            line.contains("security=\"mutual_tls\""),
            "agent n{i}: the cross-node hop was not mutual TLS: {line}"
        );
        println!("\n== agent n{i} ({direction}) ==\n{line}");
    }
    let kernel =
        mesh.agents[0].wait_for_log("the kernel's log line", Duration::from_secs(10), |l| {
            l.contains("mesh_ebpf") && l.contains("captured=1")
        })?;
    println!("\n== agent n0, kernel program log (aya-log -> tracing) ==\n{kernel}");
    let stats = mesh.agents[0].stats_for(client.cgroup_id()?)?;
    println!(
        "\n== kernel counters: pod {} connect4={} connect6={} ==",
        client.name, stats.connect4, stats.connect6
    );

    policy_demo(&mut mesh, &client, vip)?;

    println!("\n== teardown ==");
    drop(srv);
    for agent in mesh.agents.drain(..) {
        agent.stop().context("stopping an agent")?;
    }
    let id = mesh.tb.id().to_string();
    let Mesh { tb, files, .. } = mesh;
    drop(files);
    tb.teardown().context("tearing down the testbed")?;
    println!("testbed {id} removed: namespaces, cgroups, pins and config are gone");
    Ok(())
}

/// An `AuthorizationPolicy` on the server: only `client`'s identity may connect. A second
/// client on the same node is denied by the server's agent; prints both access log records and
/// the destination agent's metric lines for each.
fn policy_demo(mesh: &mut Mesh, client: &Pod, vip: std::net::Ipv4Addr) -> Result<()> {
    let other = mesh.pod(0, 1).clone();
    let principal = format!("cluster.local/ns/{NS}/sa/sa-{}", client.name);
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: echo-clients\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      app: echo\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{principal}\"]\n"
    );
    println!("\n== AuthorizationPolicy {NS}/echo-clients: only {principal} may reach app=echo ==\n{policy}");
    let from = mesh.agents[1].log_len();
    mesh.files.write("authz-echo-clients.yaml", &policy)?;
    mesh.agents[1].wait_for_log_from(from, "the policy", Duration::from_secs(10), |l| {
        l.contains("cluster state updated") && l.contains("authorization_policies=1")
    })?;
    let target = SocketAddr::new(IpAddr::V4(vip), 80);
    let from = mesh.agents[1].log_len();
    let allowed = probe::connect(client, target, "allowed by policy");
    println!(
        "{} -> {target}: {}",
        client.name,
        allowed
            .as_ref()
            .map_or_else(ToString::to_string, Clone::clone)
    );
    anyhow::ensure!(allowed.is_ok(), "the allowed client was refused");
    let denied = probe::connect(&other, target, "denied by policy");
    match &denied {
        Ok(reply) => println!("{} -> {target}: {reply}", other.name),
        Err(e) => {
            let e = e.to_string();
            let why = e
                .rsplit("mesh-probe: ")
                .next()
                .unwrap_or(&e)
                .trim_end_matches(')');
            println!("{} -> {target}: refused by the mesh ({why})", other.name);
        }
    }
    anyhow::ensure!(denied.is_err(), "the denied client got through");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = access_records(&mesh.agents[1], from);
        if records.len() >= 2 || std::time::Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("\n== agent n1 (the server's) access log, one JSON line per connection ==");
    for r in &records {
        println!("{r}");
    }
    let (status, metrics) = http(mesh.tb.node(1), "GET", METRICS, "/metrics")?;
    anyhow::ensure!(status == 200, "metrics: HTTP {status}");
    println!("\n== agent n1 metrics (port 15020), istio_tcp_connections_opened_total ==");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"destination\""))
    {
        println!("{line}");
    }
    println!("\n== agent n1 metrics, authorization decisions ==");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("mesh_agent_authorization_decisions_total"))
    {
        println!("{line}");
    }
    Ok(())
}
