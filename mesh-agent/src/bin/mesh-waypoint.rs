//! `mesh-waypoint`: the L7 waypoint as a program of its own. The same as `mesh-agent waypoint`
//! (same flags, same code: [`mesh_agent::waypoint_command`]) without the node agent's parts (the
//! kernel programs and their loader, capture, the CA, the controller), which link-time
//! optimisation leaves out: a smaller program, so a waypoint pod keeps fewer code pages
//! resident (BENCHMARKS.md, "The L7 waypoint"). The waypoint controller's Deployments run it.

use clap::Parser;
use mesh_agent::{
    logging::{self, LogFormat},
    waypoint_command::{self, WaypointArgs},
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "L7 waypoint of the eBPF-accelerated sidecarless mesh (HTTP routing by Gateway API \
             and Istio objects), under the waypoint's identity"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MESH_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(flatten)]
    args: WaypointArgs,
}

/// jemalloc, as the agent (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Kept for the process's life: `log` changes the level at run time.
    let _log = logging::init(cli.log_format);
    waypoint_command::run(cli.args)
}
