//! The mesh's node agent.
//!
//! One agent runs per node. It loads the kernel programs (`mesh-ebpf`, embedded in this binary),
//! attaches them to the cgroups of the meshed pods, pins the shared maps under bpffs and turns the
//! kernel's aya-log records into `tracing` events. Later issues add the capture listeners, HBONE,
//! policy and telemetry on top of the same structure.
// Syscalls without a safe wrapper (`netns::netns_cookie`, `map_take::take`) and the allocator's
// control (`memory::release_freed`) and the C symbols the binaries define (`pow::pow`, `pow::exp`) are
// allowed case by case.
#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod ca_command;
pub mod ca_resolver;
pub mod capture_events;
pub mod cni_installer;
pub mod config;
pub mod controller_command;
pub mod datapath;
pub mod departure;
pub mod handles;
pub mod identity_flags;
pub mod kernel_btf;
pub mod leg_ports;
pub mod local_pod;
pub mod logging;
pub mod map_take;
pub mod memory;
pub mod netns;
pub mod node_addrs;
pub mod node_taint;
pub mod pods;
pub mod pow;
pub mod proxy;
pub mod readiness;
pub mod sock_destroy;
pub mod stats;
pub mod status;
pub mod telemetry;
pub mod tracing_flags;
pub mod waypoint_command;
