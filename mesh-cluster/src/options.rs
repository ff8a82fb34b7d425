//! How pods are enrolled and identified, which namespace holds mesh-wide policy, and which node
//! the reader serves: the options every build of the [`crate::ClusterState`] takes.

use crate::{
    error::StateError,
    meta::Labels,
    names::{is_dns_label, is_dns_subdomain},
};

/// Default DNS domain of the cluster (kubelet's `--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Default root namespace: its policies without selector are mesh-wide (Istio's default).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Default label that enrolls namespaces and pods (Istio ambient's).
pub const DEFAULT_LABEL_KEY: &str = "istio.io/dataplane-mode";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Pod annotation holding the path of the pod's network namespace file (written by the local
/// stand-in for the container runtime).
pub const NETNS_ANNOTATION: &str = "mesh.local/netns";
/// Pod annotation holding the path of the pod's cgroup v2 directory.
pub const CGROUP_ANNOTATION: &str = "mesh.local/cgroup";
/// Pod or Namespace annotation opting a workload's mesh legs into the `sk_msg` short-cut:
/// `enabled` or `disabled` (the default). The pod's annotation wins over its namespace's.
pub const SHORTCUT_ANNOTATION: &str = "mesh.local/sockmap-shortcut";
/// Value of the enrollment label that enrolls.
pub const AMBIENT: &str = "ambient";
/// Value of the enrollment label on a pod that opts out of an enrolled namespace.
pub const OPT_OUT: &str = "none";

/// How pods are enrolled and identified, which namespace holds mesh-wide policy, and which node
/// this agent serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentOptions {
    /// Label whose value `ambient` (on the namespace or the pod) enrolls a pod, and whose value
    /// `none` on a pod opts it out.
    pub label_key: String,
    /// SPIFFE trust domain of the identities.
    pub trust_domain: String,
    /// Node this agent serves: enrolled pods on it must carry the runtime annotations.
    pub node_name: String,
    /// Istio's root namespace: its `PeerAuthentications` and `AuthorizationPolicies` without
    /// selector are mesh-wide (and its `AuthorizationPolicies` with a selector select in every
    /// namespace).
    pub root_namespace: String,
    /// The cluster's DNS domain: a service's hostname is `<name>.<namespace>.svc.<domain>`.
    pub cluster_domain: String,
    /// Where a pod's network namespace and cgroup come from.
    pub runtime_handles: RuntimeHandles,
    /// Where a service's endpoints come from.
    pub endpoints: EndpointsFrom,
}

/// Where the model learns a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointsFrom {
    /// The model plays Kubernetes' endpoint controller (the directory source, which has no
    /// controller manager): a service with a selector is served by the ready pods it selects in
    /// its namespace; a service without one by the `EndpointSlices` labelled
    /// `kubernetes.io/service-name` with its name, as written in the files.
    #[default]
    Selectors,
    /// From `EndpointSlices` only, for every service, as kube-proxy reads them: on a real
    /// cluster the controller manager keeps them (it knows readiness gates, terminating pods
    /// and `publishNotReadyAddresses`), and users write their own for services without a
    /// selector.
    Slices,
}

/// Where the model learns a pod's network namespace and cgroup (its runtime handles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuntimeHandles {
    /// From the stand-in annotations [`NETNS_ANNOTATION`] and [`CGROUP_ANNOTATION`], written by
    /// the testbed playing the container runtime (the directory source): an enrolled pod of
    /// this node without them is refused.
    #[default]
    Annotations,
    /// From the container runtime's hand-over (the CNI plugin) or the node's `/proc`, never from
    /// the Pod object: on a real cluster a pod's author writes its annotations, so they must
    /// not say where a pod lives. The model leaves the handles empty.
    Discovered,
}

impl EnrollmentOptions {
    /// Options for `node_name` with the default label key, trust domain and root namespace.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            label_key: DEFAULT_LABEL_KEY.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            node_name: node_name.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
            runtime_handles: RuntimeHandles::default(),
            endpoints: EndpointsFrom::default(),
        }
    }

    /// Checks the label key, the trust domain and the root namespace.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.label_key.is_empty() {
            return Err(StateError::EmptyLabelKey);
        }
        let td_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
        if self.trust_domain.is_empty() || !self.trust_domain.chars().all(td_char) {
            return Err(StateError::TrustDomain(self.trust_domain.clone()));
        }
        if !is_dns_label(&self.root_namespace) {
            return Err(StateError::RootNamespace(self.root_namespace.clone()));
        }
        if !is_dns_subdomain(&self.cluster_domain) {
            return Err(StateError::ClusterDomain(self.cluster_domain.clone()));
        }
        Ok(())
    }

    /// Whether a pod with `pod_labels` in a namespace with `namespace_labels` (`None`: no such
    /// Namespace object) is enrolled. The pod's label wins over the namespace's.
    pub fn is_enrolled(&self, namespace_labels: Option<&Labels>, pod_labels: &Labels) -> bool {
        match pod_labels.get(&self.label_key).map(String::as_str) {
            Some(AMBIENT) => true,
            Some(OPT_OUT) => false,
            _ => namespace_labels
                .and_then(|labels| labels.get(&self.label_key))
                .is_some_and(|value| value == AMBIENT),
        }
    }
}
