//! The agent's cluster view: which pods (workloads) and services exist, which pods are enrolled
//! in the mesh, and where a connection to an address goes.
//!
//! - [`k8s`]: the Kubernetes objects read (Namespace, Pod, Service) and their YAML parser.
//! - [`ClusterState::build`]: the one translation from objects to the agent's immutable,
//!   indexed state; every source (files today, a Kubernetes watch later) goes through it.
//! - [`spawn_watcher`] / [`ConfigDir`]: the objects read from a directory of YAML files, reloaded
//!   when they change, published as `Arc<ClusterState>` snapshots on a `tokio::sync::watch`
//!   channel.
//!
//! Enrollment follows Istio ambient: a pod is enrolled when its namespace has the label
//! `istio.io/dataplane-mode=ambient` (key configurable), unless the pod has `…=none`; a pod
//! label `…=ambient` enrolls it in any namespace. Host-network pods are never enrolled.
//!
//! The local stand-in for the container runtime tells the agent where a pod lives through two
//! annotations, [`NETNS_ANNOTATION`] and [`CGROUP_ANNOTATION`]; enrolled pods on the agent's node
//! must carry both.

mod files;
pub mod k8s;
mod state;
mod translate;

pub use files::{spawn_watcher, ConfigDir, FilesError, Watcher};
pub use state::{
    ClusterState, Endpoint, EnrollmentOptions, Protocol, Resolution, Service, ServicePort,
    SourceError, StateError, TargetPort, Workload, AMBIENT, CGROUP_ANNOTATION, DEFAULT_LABEL_KEY,
    DEFAULT_TRUST_DOMAIN, NETNS_ANNOTATION, OPT_OUT,
};

#[cfg(test)]
mod tests;
