//! The agent's cluster view: which pods (workloads) and services exist, which pods are enrolled
//! in the mesh, where a connection to an address goes, and which inbound mTLS mode applies to a
//! workload's port.
//!
//! - [`k8s`]: the Kubernetes objects read (Namespace, Pod, Service, and Istio's
//!   `PeerAuthentication`) and their YAML parser.
//! - [`peer_auth`]: `PeerAuthentication` scopes, precedence and conflicts, evaluated by
//!   [`ClusterState::peer_authentication`].
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
//! `PeerAuthentication` follows Istio: without selector, mesh-wide in the root namespace
//! ([`EnrollmentOptions::root_namespace`], default [`DEFAULT_ROOT_NAMESPACE`]) and
//! namespace-wide elsewhere; with `matchLabels`, for the matching workloads of its namespace. The
//! workload policy (its `portLevelMtls` entry for the port first) overrides the namespace's, which
//! overrides the mesh's; `UNSET` inherits; PERMISSIVE applies when nothing sets a mode; the
//! oldest of competing policies wins. As in ztunnel, the result is STRICT or PERMISSIVE only:
//! `DISABLE` is enforced as PERMISSIVE ([`MtlsMode`]).
//!
//! The local stand-in for the container runtime tells the agent where a pod lives through two
//! annotations, [`NETNS_ANNOTATION`] and [`CGROUP_ANNOTATION`]; enrolled pods on the agent's node
//! must carry both.

mod files;
mod istio;
pub mod k8s;
pub mod peer_auth;
mod state;
mod translate;

pub use files::{spawn_watcher, ConfigDir, FilesError, Watcher};
pub use peer_auth::{
    MtlsMode, PeerAuthDecision, PeerAuthPolicy, PeerAuthScope, DEFAULT_ROOT_NAMESPACE,
};
pub use state::{
    ClusterState, Endpoint, EnrollmentOptions, Protocol, Resolution, Service, ServicePort,
    SourceError, StateError, TargetPort, Workload, AMBIENT, CGROUP_ANNOTATION, DEFAULT_LABEL_KEY,
    DEFAULT_TRUST_DOMAIN, NETNS_ANNOTATION, OPT_OUT,
};

#[cfg(test)]
mod tests;
