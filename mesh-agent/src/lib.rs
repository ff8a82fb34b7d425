//! The mesh's node agent.
//!
//! One agent runs per node. It loads the kernel programs (`mesh-ebpf`, embedded in this binary),
//! attaches them to the cgroups of the meshed pods, pins the shared maps under bpffs and turns the
//! kernel's aya-log records into `tracing` events. Later issues add the capture listeners, HBONE,
//! policy and telemetry on top of the same structure.
#![forbid(unsafe_code)]

pub mod config;
pub mod datapath;
pub mod stats;
