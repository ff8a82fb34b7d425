//! `cargo xtask demo`: a two-node testbed, an agent per node attached to its pod, one connection
//! from the pod on node 0 to the pod on node 1, the kernel's log line and counters, teardown.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{probe, Agent, Testbed, TestbedSpec};

pub fn run() -> Result<()> {
    let tb = Testbed::new(TestbedSpec {
        nodes: 2,
        pods_per_node: 1,
    })
    .context("building the testbed")?;
    println!("\n== testbed {} ==", tb.id());
    for node in tb.nodes() {
        println!(
            "node {} (netns {}, link {} / {})",
            node.name, node.netns, node.link_ipv4, node.link_ipv6
        );
        for pod in &node.pods {
            println!(
                "  pod {} {} / {} cgroup {}",
                pod.name,
                pod.ipv4,
                pod.ipv6,
                pod.cgroup.display()
            );
        }
    }
    let (client, server) = (tb.pod(0, 0), tb.pod(1, 0));

    println!("\n== agents: load the kernel programs and attach them to each node's pod ==");
    let mut agent0 = Agent::start(tb.node(0), &[client.cgroup.as_path()]).context("agent on n0")?;
    let agent1 = Agent::start(tb.node(1), &[server.cgroup.as_path()]).context("agent on n1")?;

    println!(
        "\n== {} connects to {} across nodes ==",
        client.name, server.name
    );
    let _server = probe::serve(server, "[::]:8080".parse()?).context("echo server")?;
    let target = SocketAddr::new(IpAddr::V4(server.ipv4), 8080);
    let reply = probe::connect(client, target, "hello through the testbed").context("connect")?;
    println!("client: {reply}");

    let client_id = client.cgroup_id()?;
    let line = agent0
        .wait_for_log("the kernel's log line", Duration::from_secs(10), |l| {
            l.contains("mesh_ebpf") && l.contains(&format!("cgroup={client_id} "))
        })
        .context("waiting for the kernel log line")?;
    println!("\n== agent n0 log line from the kernel program (aya-log → tracing) ==\n{line}");

    println!("\n== kernel counters (pinned map, read with `mesh-agent stats`) ==");
    for (name, agent, pod) in [("n0", &agent0, client), ("n1", &agent1, server)] {
        let stats = agent.stats_for(pod.cgroup_id()?)?;
        println!(
            "agent {name}: pod {} (cgroup {}): connect4={} connect6={}",
            pod.name, stats.cgroup_id, stats.connect4, stats.connect6
        );
    }

    println!("\n== teardown ==");
    agent0.stop().context("stopping agent n0")?;
    agent1.stop().context("stopping agent n1")?;
    let id = tb.id().to_string();
    tb.teardown().context("tearing down the testbed")?;
    println!("testbed {id} removed: namespaces, cgroups and pins are gone");
    Ok(())
}
