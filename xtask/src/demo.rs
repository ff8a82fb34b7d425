//! `cargo xtask demo`: a two-node testbed with a meshed namespace; a client pod reaches a
//! server pod on the other node through its Service, through both agents, which tunnel it over
//! HBONE (mutual TLS with both pods' SPIFFE identities); the demo prints the certificates'
//! issuance, the agents' per-connection log lines and the kernel counters, then tears
//! everything down.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{
    mesh::{Mesh, NS},
    plan, probe, TestbedSpec,
};

pub fn run() -> Result<()> {
    let spec = TestbedSpec {
        nodes: 2,
        pods_per_node: 1,
    };
    println!("\n== building a two-node testbed and starting an agent on each node ==");
    let mut mesh = Mesh::new(spec, true, &[]).context("building the meshed testbed")?;
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
