//! Istio's traffic labels, derived from the cluster view the way Istio derives them, so that
//! existing Istio dashboards (Grafana's "Istio Workload", Kiali) read the agent's metrics.

use mesh_identity::Identity;

use mesh_cluster::{Service, Workload};

/// Value of a label the agent cannot know (Istio writes the same).
pub const UNKNOWN: &str = "unknown";
/// Istio's default cluster id, used for `*_cluster`.
pub const CLUSTER_ID: &str = "Kubernetes";

/// Which agent reports: the source's or the destination's (Istio's `reporter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// Istio's `response_flags`, as ztunnel writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResponseFlags {
    /// `-`: nothing to report.
    None,
    /// `DENY`: refused by an `AuthorizationPolicy` (or `PeerAuthentication`).
    Denied,
    /// `CONNECT`: the upstream could not be reached.
    ConnectFailure,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Denied => "DENY",
            ResponseFlags::ConnectFailure => "CONNECT",
        }
    }
}

/// One side of a connection, for labels: the workload if the cluster view knows it, and the
/// identity the agent vouches for (proven by mTLS, or known for a pod of its own node).
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    pub identity: Option<&'a Identity>,
}

/// Istio's labels of one side.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerLabels {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub workload_namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
}

impl PeerLabels {
    pub fn of(peer: Peer<'_>) -> Self {
        let principal = peer
            .identity
            .map_or_else(|| UNKNOWN.to_owned(), |i| i.as_str().to_owned());
        match peer.workload {
            Some(w) => {
                let canonical_service = canonical_service(w).to_owned();
                let canonical_revision = canonical_revision(w).to_owned();
                Self {
                    workload: workload_name(w).to_owned(),
                    app: canonical_service.clone(),
                    version: canonical_revision.clone(),
                    canonical_service,
                    canonical_revision,
                    workload_namespace: w.namespace.clone(),
                    principal,
                    cluster: CLUSTER_ID.to_owned(),
                }
            }
            None => Self {
                workload: UNKNOWN.to_owned(),
                canonical_service: UNKNOWN.to_owned(),
                canonical_revision: UNKNOWN.to_owned(),
                // A proven identity still names the namespace.
                workload_namespace: peer
                    .identity
                    .map_or_else(|| UNKNOWN.to_owned(), |i| i.namespace().to_owned()),
                principal,
                app: UNKNOWN.to_owned(),
                version: UNKNOWN.to_owned(),
                cluster: UNKNOWN.to_owned(),
            },
        }
    }
}

/// Istio's labels of the destination service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceLabels {
    /// The service's hostname ([`Service::hostname`]).
    pub host: String,
    pub name: String,
    pub namespace: String,
}

impl ServiceLabels {
    pub fn of(service: Option<&Service>) -> Self {
        match service {
            Some(s) => Self {
                host: s.hostname.clone(),
                name: s.telemetry_name().to_owned(),
                namespace: s.namespace.clone(),
            },
            None => Self {
                host: UNKNOWN.to_owned(),
                name: UNKNOWN.to_owned(),
                namespace: UNKNOWN.to_owned(),
            },
        }
    }
}

/// The full label set of Istio's TCP metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source: PeerLabels,
    pub destination: PeerLabels,
    pub service: ServiceLabels,
    /// `connection_security_policy`: `mutual_tls`, `same_node` or `none`.
    pub security: &'static str,
    pub response_flags: ResponseFlags,
}

impl TrafficLabels {
    /// The label pairs, in Istio's order.
    pub fn pairs(&self) -> [(&str, &str); 23] {
        [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &self.source.workload),
            ("source_canonical_service", &self.source.canonical_service),
            ("source_canonical_revision", &self.source.canonical_revision),
            ("source_workload_namespace", &self.source.workload_namespace),
            ("source_principal", &self.source.principal),
            ("source_app", &self.source.app),
            ("source_version", &self.source.version),
            ("source_cluster", &self.source.cluster),
            ("destination_service", &self.service.host),
            ("destination_service_namespace", &self.service.namespace),
            ("destination_service_name", &self.service.name),
            ("destination_workload", &self.destination.workload),
            (
                "destination_canonical_service",
                &self.destination.canonical_service,
            ),
            (
                "destination_canonical_revision",
                &self.destination.canonical_revision,
            ),
            (
                "destination_workload_namespace",
                &self.destination.workload_namespace,
            ),
            ("destination_principal", &self.destination.principal),
            ("destination_app", &self.destination.app),
            ("destination_version", &self.destination.version),
            ("destination_cluster", &self.destination.cluster),
            ("request_protocol", "tcp"),
            ("response_flags", self.response_flags.as_str()),
            ("connection_security_policy", self.security),
        ]
    }
}

/// The workload (`Deployment`, `StatefulSet`, `DaemonSet`) a pod belongs to, from the names its
/// controller gives it; the pod's own name otherwise (Istio uses the owner reference, which
/// the agent does not read; the names say the same for the built-in controllers).
pub fn workload_name(w: &Workload) -> &str {
    let name = w.name.as_str();
    // Deployment: <deployment>-<pod-template-hash>-<5 chars>.
    if let Some(hash) = w.labels.get("pod-template-hash") {
        let marker = format!("-{hash}-");
        if let Some(at) = name.rfind(&marker) {
            if at > 0 {
                return &name[..at];
            }
        }
    }
    // StatefulSet: <statefulset>-<ordinal>.
    if w.labels.get("statefulset.kubernetes.io/pod-name") == Some(&w.name) {
        if let Some((base, ordinal)) = name.rsplit_once('-') {
            if !base.is_empty() && ordinal.bytes().all(|b| b.is_ascii_digit()) {
                return base;
            }
        }
    }
    // DaemonSet: <daemonset>-<5 chars>.
    if w.labels.contains_key("controller-revision-hash") {
        if let Some((base, suffix)) = name.rsplit_once('-') {
            if !base.is_empty() && suffix.len() == 5 {
                return base;
            }
        }
    }
    name
}

/// Istio's canonical service: `service.istio.io/canonical-name`, `app.kubernetes.io/name`,
/// `app`, else the workload name.
pub fn canonical_service(w: &Workload) -> &str {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| w.labels.get(*k))
    .map_or_else(|| workload_name(w), String::as_str)
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`,
/// `app.kubernetes.io/version`, `version`, else `latest`.
pub fn canonical_revision(w: &Workload) -> &str {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| w.labels.get(*k))
    .map_or("latest", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: "shop".into(),
            name: name.into(),
            uid: None,
            node: None,
            service_account: "default".into(),
            identity: Identity::new("cluster.local", "shop", "default").expect("identity"),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ips: Vec::new(),
            readiness: mesh_cluster::Readiness::Ready,
            enrolled: true,
            host_network: false,
            netns: None,
            cgroup: None,
            shortcut: mesh_cluster::Shortcut::Disabled,
            locality: mesh_cluster::locality::Locality::default(),
        }
    }

    #[test]
    fn workload_names_follow_the_controllers_naming() {
        let cases = [
            (
                pod(
                    "cart-7d9f8b6c5d-x2x4z",
                    &[("pod-template-hash", "7d9f8b6c5d")],
                ),
                "cart",
            ),
            (
                pod("db-2", &[("statefulset.kubernetes.io/pod-name", "db-2")]),
                "db",
            ),
            (
                pod("agent-k8x2p", &[("controller-revision-hash", "6b9")]),
                "agent",
            ),
            (pod("standalone", &[]), "standalone"),
            // A hash label that the name does not carry: the name stays.
            (pod("odd", &[("pod-template-hash", "abc")]), "odd"),
        ];
        for (w, want) in &cases {
            assert_eq!(workload_name(w), *want, "{}", w.name);
        }
    }

    #[test]
    fn canonical_names_follow_istios_precedence() {
        let w = pod(
            "cart-1",
            &[
                ("app", "cart-app"),
                ("app.kubernetes.io/name", "cart-k8s"),
                ("version", "v2"),
            ],
        );
        assert_eq!(canonical_service(&w), "cart-k8s");
        assert_eq!(canonical_revision(&w), "v2");
        let bare = pod("cart-1", &[]);
        assert_eq!(canonical_service(&bare), "cart-1");
        assert_eq!(canonical_revision(&bare), "latest");
    }

    #[test]
    fn unknown_peers_keep_the_namespace_of_their_identity() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let labels = PeerLabels::of(Peer {
            workload: None,
            identity: Some(&id),
        });
        assert_eq!(labels.workload, UNKNOWN);
        assert_eq!(labels.workload_namespace, "shop");
        assert_eq!(labels.principal, id.as_str());
    }
}
