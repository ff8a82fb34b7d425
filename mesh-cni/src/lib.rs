//! `mesh-cni`: the chained CNI plugin that hands each new pod to the node agent, and the
//! pieces both sides share.
//!
//! Why a CNI plugin: the container runtime calls CNI ADD after the primary CNI has set up a
//! pod's network and before any of the pod's containers start. Handing the pod to the agent
//! there, and failing ADD until the agent has captured it, means no meshed pod ever runs a
//! process outside the mesh (the gap Istio's users hit when pods start before ztunnel is ready).
//! The plugin decides nothing: the agent, which has the cluster model, answers whether the pod
//! is meshed.
//!
//! - [`handover`]: the protocol on the agent's Unix socket, both ends ([`handover::Client`]
//!   for the plugin, [`handover::Server`] for the agent).
//! - [`cni`]: the plugin's commands (ADD, DEL, CHECK, STATUS, VERSION), environment,
//!   configuration and error objects.
//! - [`install`]: adding our entry to the primary CNI's configuration (idempotent, for the
//!   agent to re-apply when another CNI rewrites its file) and copying the binary.
//! - [`json`]: a JSON value that keeps key order, for editing other CNIs' files and passing
//!   results through unchanged.

pub mod cni;
pub mod handover;
pub mod install;
pub mod json;
