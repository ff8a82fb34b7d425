//! The agent's view of the cluster: workloads (pods), services, and `PeerAuthentication` and
//! `AuthorizationPolicy` policies, built from Kubernetes objects by one function, [`ClusterState::build`], whatever the
//! source (the directory of YAML files today, a Kubernetes watch later), and indexed for the
//! lookups the data path makes per connection.
//!
//! A [`ClusterState`] is immutable once built and is shared as `Arc<ClusterState>`; a change in
//! the source produces a new one. The only mutable part is the round-robin cursor of each service
//! port (an atomic), which restarts at the first endpoint in each new state.

use std::{
    collections::{hash_map::Entry, BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use super::{
    authz::{AuthzDecision, AuthzIndex, AuthzPolicy, ConnFacts},
    k8s::{self, Kind, Labels, Object, ObjectRef},
    peer_auth::{PeerAuthDecision, PeerAuthIndex, PeerAuthPolicy, DEFAULT_ROOT_NAMESPACE},
    translate::{
        check_name, is_dns_label, pod_ref, service_from, service_ref, shortcut_annotation,
        workload_from, workload_ref, BuiltPod, NameRule,
    },
};

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
}

impl EnrollmentOptions {
    /// Options for `node_name` with the default label key, trust domain and root namespace.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            label_key: DEFAULT_LABEL_KEY.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            node_name: node_name.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
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

/// A pod, as the data path needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// `metadata.uid`, if given.
    pub uid: Option<String>,
    /// Node the pod runs on (`None` while not scheduled).
    pub node: Option<String>,
    /// Service account.
    pub service_account: String,
    /// SPIFFE identity, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub identity: String,
    /// Labels.
    pub labels: Labels,
    /// Addresses, primary first, at most one IPv4 and one IPv6. Empty while none is assigned.
    pub ips: Vec<IpAddr>,
    /// Ready to serve: no `Ready` condition says `False`.
    pub ready: bool,
    /// Traffic of this pod is captured by the mesh.
    pub enrolled: bool,
    /// The pod uses its node's network namespace: it is never enrolled, and its addresses (the
    /// node's) are not indexed as the pod's.
    pub host_network: bool,
    /// Path of the pod's network namespace file ([`NETNS_ANNOTATION`]).
    pub netns: Option<PathBuf>,
    /// Path of the pod's cgroup v2 directory ([`CGROUP_ANNOTATION`]).
    pub cgroup: Option<PathBuf>,
    /// Whether the pod's mesh legs take the `sk_msg` short-cut ([`SHORTCUT_ANNOTATION`]).
    pub shortcut: Shortcut,
}

/// Whether a workload's mesh legs take the kernel's `sk_msg` short-cut: opt-in, by the
/// [`SHORTCUT_ANNOTATION`] of the pod or else of its namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Shortcut {
    #[default]
    Disabled,
    Enabled,
}

impl fmt::Display for Workload {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    /// The pod's address of the same family as `like`, if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }
}

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP, the only one the mesh captures.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A service port's target, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// The name of a container port, resolved per pod.
    Name(String),
}

/// A Service.
#[derive(Debug)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Virtual IPs, at most one per family; empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// Selector; empty means no automatic endpoints.
    pub selector: Labels,
    /// Ports with their endpoints.
    pub ports: Vec<ServicePort>,
}

/// A port of a Service, with its endpoints.
#[derive(Debug)]
pub struct ServicePort {
    /// Port name.
    pub name: Option<String>,
    /// Port on the VIPs.
    pub port: u16,
    /// Protocol; only TCP ports are indexed for [`ClusterState::resolve`].
    pub protocol: Protocol,
    /// Target as written.
    pub target_port: TargetPort,
    /// Ready pods that serve this port, sorted by pod name, with the target port resolved.
    pub endpoints: Vec<Endpoint>,
    /// Endpoint addresses per family (index into `endpoints`, address).
    v4: Vec<(usize, SocketAddr)>,
    v6: Vec<(usize, SocketAddr)>,
    /// Round-robin cursor, shared by both families; wraps around.
    next: AtomicUsize,
}

/// A pod serving a service port.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The pod.
    pub workload: Arc<Workload>,
    /// The target port on that pod.
    pub port: u16,
}

impl fmt::Display for Service {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ServicePort {
    /// A port with its endpoints (in order); indexes them per address family.
    pub(super) fn new(
        name: Option<String>,
        (port, protocol): (u16, Protocol),
        target_port: TargetPort,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        let family = |v4: bool| -> Vec<(usize, SocketAddr)> {
            endpoints
                .iter()
                .enumerate()
                .filter_map(|(index, ep)| {
                    let ip = ep.workload.ips.iter().find(|ip| ip.is_ipv4() == v4)?;
                    Some((index, SocketAddr::new(*ip, ep.port)))
                })
                .collect()
        };
        let (v4, v6) = (family(true), family(false));
        Self {
            name,
            port,
            protocol,
            target_port,
            endpoints,
            v4,
            v6,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks the next endpoint with an address of `dst`'s family, round-robin.
    fn pick(&self, family: IpAddr) -> Option<(&Endpoint, SocketAddr)> {
        let candidates = if family.is_ipv4() { &self.v4 } else { &self.v6 };
        if candidates.is_empty() {
            return None;
        }
        // Relaxed: the cursor only spreads load; no other memory depends on it.
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        let (index, addr) = candidates[turn];
        Some((&self.endpoints[index], addr))
    }
}

/// Where a connection to a destination address goes.
#[derive(Clone, Debug)]
pub enum Resolution {
    /// A service VIP and TCP port with a ready endpoint of the destination's address family.
    Service {
        /// The service.
        service: Arc<Service>,
        /// The chosen endpoint: pod address of the destination's family, and target port.
        endpoint: SocketAddr,
        /// The pod behind `endpoint`.
        workload: Arc<Workload>,
    },
    /// A service VIP and TCP port with no ready endpoint of the destination's family.
    NoEndpoint {
        /// The service.
        service: Arc<Service>,
    },
    /// A pod address (enrolled or not; see [`Workload::enrolled`]).
    Workload {
        /// The pod.
        workload: Arc<Workload>,
    },
    /// Nothing the mesh knows: pass the connection through unchanged.
    Passthrough,
}

/// A problem reported by a source (for the directory source, one per file), shown by the admin
/// interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    /// Where: for the directory source, the file's path.
    pub source: String,
    /// What, in one line.
    pub message: String,
}

/// Why objects do not make a valid state. Each variant names the object (`Kind ns/name`) and the
/// field, except the three about [`EnrollmentOptions`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum StateError {
    #[error("enrollment label key is empty")]
    EmptyLabelKey,
    #[error("trust domain {0:?} is not valid (lowercase letters, digits, '.', '-', '_')")]
    TrustDomain(String),
    #[error("root namespace {0:?} is not a valid namespace name (DNS label, RFC 1123)")]
    RootNamespace(String),
    #[error("{object} is defined more than once")]
    Duplicate { object: ObjectRef },
    #[error("{object}: {field}: {value:?} is not a valid {expected}")]
    InvalidName {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: {ip} is {reason}, never a pod's own address")]
    UnusableAddress {
        object: ObjectRef,
        field: &'static str,
        ip: IpAddr,
        reason: &'static str,
    },
    #[error("{object}: {field}: {value:?} is not an IP address")]
    InvalidIp {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value} is not a port number (1-65535)")]
    InvalidPort {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error(
        "{object}: {field}: {value:?} is not a port name (IANA service name; numbers unquoted)"
    )]
    InvalidPortName {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: unknown protocol {value:?} (TCP, UDP or SCTP)")]
    InvalidProtocol {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error(
        "{object}: {field}: {ip} is a second address of its family (at most one IPv4 and one IPv6)"
    )]
    SecondAddressOfFamily {
        object: ObjectRef,
        field: String,
        ip: IpAddr,
    },
    #[error("{object}: {field} {value} differs from {list_field}[0] {first}")]
    PrimaryMismatch {
        object: ObjectRef,
        field: &'static str,
        value: IpAddr,
        list_field: &'static str,
        first: IpAddr,
    },
    #[error("{object}: metadata.annotations[{annotation}]: {value:?} is not an absolute path")]
    RelativePath {
        object: ObjectRef,
        annotation: &'static str,
        value: String,
    },
    #[error("{object}: metadata.annotations[{annotation}]: {value:?} is not {expected}")]
    InvalidAnnotation {
        object: ObjectRef,
        annotation: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "{object}: metadata.annotations[{annotation}] is missing (enrolled, on this node {node})"
    )]
    MissingAnnotation {
        object: ObjectRef,
        annotation: &'static str,
        node: String,
    },
    #[error("{object}: {field}: {ip} is already the address of {other}")]
    DuplicateIp {
        object: ObjectRef,
        field: String,
        ip: IpAddr,
        other: Box<ObjectRef>,
    },
    #[error("{object}: {field}: {port}/{protocol} is listed twice")]
    RepeatedPort {
        object: ObjectRef,
        field: String,
        port: u16,
        protocol: Protocol,
    },
    #[error("{object}: {field}: {addr} (TCP) is already claimed by {other}")]
    DuplicateServicePort {
        object: ObjectRef,
        field: String,
        addr: SocketAddr,
        other: Box<ObjectRef>,
    },
    #[error("{object}: {field}: {value:?} is not an RFC 3339 timestamp")]
    InvalidTimestamp {
        object: ObjectRef,
        field: &'static str,
        value: String,
    },
}

impl StateError {
    /// The objects the error is about (none for option errors), to find where they came from.
    pub fn objects(&self) -> Vec<&ObjectRef> {
        match self {
            StateError::EmptyLabelKey
            | StateError::TrustDomain(_)
            | StateError::RootNamespace(_) => Vec::new(),
            StateError::DuplicateIp { object, other, .. }
            | StateError::DuplicateServicePort { object, other, .. } => vec![object, &**other],
            StateError::Duplicate { object }
            | StateError::InvalidName { object, .. }
            | StateError::InvalidIp { object, .. }
            | StateError::UnusableAddress { object, .. }
            | StateError::InvalidPort { object, .. }
            | StateError::InvalidPortName { object, .. }
            | StateError::InvalidProtocol { object, .. }
            | StateError::SecondAddressOfFamily { object, .. }
            | StateError::PrimaryMismatch { object, .. }
            | StateError::RelativePath { object, .. }
            | StateError::InvalidAnnotation { object, .. }
            | StateError::MissingAnnotation { object, .. }
            | StateError::RepeatedPort { object, .. }
            | StateError::InvalidTimestamp { object, .. } => vec![object],
        }
    }
}

/// An immutable view of the cluster, with the indexes the data path uses.
#[derive(Debug)]
pub struct ClusterState {
    generation: u64,
    errors: Vec<SourceError>,
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_node: HashMap<String, Vec<Arc<Workload>>>,
    services: Vec<Arc<Service>>,
    by_addr: HashMap<SocketAddr, (Arc<Service>, usize)>,
    peer_auth: PeerAuthIndex,
    authz: AuthzIndex,
    /// The indexes' warnings: `PeerAuthentication`'s, then `AuthorizationPolicy`'s.
    warnings: Vec<String>,
}

impl ClusterState {
    /// Builds and validates the state from `objects`, in any order. Pods that have finished
    /// (`Succeeded`, `Failed`) are left out: their addresses may already belong to new pods.
    /// The result has generation 0 and no source errors; the source sets both.
    pub fn build<'a>(
        objects: impl IntoIterator<Item = &'a Object>,
        opts: &EnrollmentOptions,
    ) -> Result<Self, StateError> {
        opts.validate()?;
        let mut namespaces = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let mut services = BTreeMap::new();
        let mut peer_auths = BTreeMap::new();
        let mut authz_policies = BTreeMap::new();
        for object in objects {
            let duplicate = match object {
                Object::Namespace(ns) => namespaces.insert(ns.metadata.name.as_str(), ns).is_some(),
                Object::Pod(pod) => pods
                    .insert((pod.metadata.namespace(), pod.metadata.name.as_str()), pod)
                    .is_some(),
                Object::Service(svc) => services
                    .insert((svc.metadata.namespace(), svc.metadata.name.as_str()), svc)
                    .is_some(),
                Object::PeerAuthentication(pa) => peer_auths
                    .insert((pa.metadata.namespace(), pa.metadata.name.as_str()), pa)
                    .is_some(),
                Object::AuthorizationPolicy(ap) => authz_policies
                    .insert((ap.metadata.namespace(), ap.metadata.name.as_str()), ap)
                    .is_some(),
            };
            if duplicate {
                return Err(StateError::Duplicate {
                    object: object.object_ref(),
                });
            }
        }
        for namespace in namespaces.values() {
            let object = ObjectRef::cluster_scoped(Kind::Namespace, &namespace.metadata);
            check_name(
                &object,
                "metadata.name",
                &namespace.metadata.name,
                NameRule::Label,
            )?;
            shortcut_annotation(&object, &namespace.metadata)?;
        }

        let mut state = ClusterState {
            generation: 0,
            errors: Vec::new(),
            workloads: Vec::new(),
            by_ip: HashMap::new(),
            by_node: HashMap::new(),
            services: Vec::new(),
            by_addr: HashMap::new(),
            peer_auth: PeerAuthIndex::default(),
            authz: AuthzIndex::default(),
            warnings: Vec::new(),
        };
        let mut by_namespace: HashMap<&str, Vec<BuiltPod>> = HashMap::new();
        for (&(namespace, _), &pod) in pods.iter().filter(|(_, pod)| !pod.is_terminated()) {
            let ns_meta = namespaces.get(namespace).map(|ns| &ns.metadata);
            let workload = Arc::new(workload_from(pod, ns_meta, opts)?);
            state.index_workload(&workload, pod)?;
            by_namespace
                .entry(namespace)
                .or_default()
                .push(BuiltPod { workload, pod });
        }
        for (&(namespace, _), &svc) in &services {
            let pods = by_namespace.get(namespace).map_or(&[][..], Vec::as_slice);
            let service = Arc::new(service_from(svc, pods)?);
            state.index_service(&service, svc)?;
        }
        state.peer_auth = PeerAuthIndex::build(
            peer_auths.into_values(),
            &opts.root_namespace,
            &state.workloads,
        )?;
        state.authz = AuthzIndex::build(authz_policies.into_values(), &opts.root_namespace)?;
        state.warnings = [state.peer_auth.warnings(), state.authz.warnings()].concat();
        Ok(state)
    }

    fn index_workload(
        &mut self,
        workload: &Arc<Workload>,
        pod: &k8s::Pod,
    ) -> Result<(), StateError> {
        if !workload.host_network {
            for ip in &workload.ips {
                if let Some(other) = self.by_ip.insert(*ip, Arc::clone(workload)) {
                    return Err(StateError::DuplicateIp {
                        object: pod_ref(pod),
                        field: "status.podIPs".to_owned(),
                        ip: *ip,
                        other: Box::new(workload_ref(&other)),
                    });
                }
            }
        }
        if let Some(node) = &workload.node {
            self.by_node
                .entry(node.clone())
                .or_default()
                .push(Arc::clone(workload));
        }
        self.workloads.push(Arc::clone(workload));
        Ok(())
    }

    fn index_service(
        &mut self,
        service: &Arc<Service>,
        svc: &k8s::Service,
    ) -> Result<(), StateError> {
        let object = || service_ref(svc);
        for (index, vip) in service.vips.iter().enumerate() {
            if let Some(owner) = self.by_ip.get(vip) {
                return Err(StateError::DuplicateIp {
                    object: object(),
                    field: if svc.spec.cluster_ips.is_empty() {
                        "spec.clusterIP".to_owned()
                    } else {
                        format!("spec.clusterIPs[{index}]")
                    },
                    ip: *vip,
                    other: Box::new(workload_ref(owner)),
                });
            }
        }
        for (index, port) in service.ports.iter().enumerate() {
            if port.protocol != Protocol::Tcp {
                continue;
            }
            for vip in &service.vips {
                let addr = SocketAddr::new(*vip, port.port);
                match self.by_addr.entry(addr) {
                    Entry::Occupied(entry) => {
                        let other = &entry.get().0;
                        return Err(StateError::DuplicateServicePort {
                            object: object(),
                            field: format!("spec.ports[{index}].port"),
                            addr,
                            other: Box::new(ObjectRef {
                                kind: Kind::Service,
                                namespace: Some(other.namespace.clone()),
                                name: other.name.clone(),
                            }),
                        });
                    }
                    Entry::Vacant(entry) => {
                        entry.insert((Arc::clone(service), index));
                    }
                }
            }
        }
        self.services.push(Arc::clone(service));
        Ok(())
    }

    /// Sets the generation and the source's current errors (done by the source that publishes).
    #[must_use]
    pub(crate) fn with_status(mut self, generation: u64, errors: Vec<SourceError>) -> Self {
        self.generation = generation;
        self.errors = errors;
        self
    }

    /// Number of this snapshot; each published snapshot has a higher one.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Problems of the source when this snapshot was made (files that failed to parse or were
    /// rejected; their last good objects are in this state).
    pub fn errors(&self) -> &[SourceError] {
        &self.errors
    }

    /// Problems of valid objects that do not stop the state from being built, one line each:
    /// conflicting `PeerAuthentications` (the oldest applies), `PeerAuthentications` that apply to
    /// nothing, then `AuthorizationPolicies` for waypoints (not enforced by the agent), rules with
    /// HTTP (L7) fields (an ALLOW or AUDIT rule matches nothing, a DENY rule is enforced without
    /// them), DENY or AUDIT policies without rules. The source logs each once, when it appears.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// All workloads, sorted by namespace and name.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// Workloads scheduled on `node`, enrolled or not, sorted by namespace and name.
    pub fn workloads_on_node(&self, node: &str) -> std::slice::Iter<'_, Arc<Workload>> {
        self.by_node.get(node).map_or(&[][..], Vec::as_slice).iter()
    }

    /// The pod that has address `ip` (host-network pods excluded). IPv4-mapped IPv6 addresses
    /// are looked up as IPv4.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// All services, sorted by namespace and name.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The service and port at VIP `addr` (TCP ports only).
    pub fn service_by_addr(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let (service, index) = self.by_addr.get(&addr)?;
        Some((service, &service.ports[*index]))
    }

    /// All `PeerAuthentications`, sorted by namespace and name.
    pub fn peer_authentications(&self) -> &[Arc<PeerAuthPolicy>] {
        self.peer_auth.policies()
    }

    /// The inbound mTLS mode of `workload` on `port` (the workload's port, not a service port),
    /// and the policy that decided it: the workload's selector policy (its `portLevelMtls` entry
    /// for `port` first), else its namespace's policy, else the mesh-wide one, skipping `UNSET`
    /// modes; PERMISSIVE if none sets a mode. `DISABLE` gives [`MtlsMode::Permissive`] (see
    /// there). Whether the workload is enrolled is not considered; see the [`super::peer_auth`]
    /// module for the rules.
    ///
    /// [`MtlsMode::Permissive`]: super::MtlsMode::Permissive
    pub fn peer_authentication(&self, workload: &Workload, port: u16) -> PeerAuthDecision {
        self.peer_auth.decide(workload, port)
    }

    /// All `AuthorizationPolicies`, sorted by namespace and name, with their rules as enforced
    /// (serializable, for the admin interface's config dump).
    pub fn authorization_policies(&self) -> &[Arc<AuthzPolicy>] {
        self.authz.policies()
    }

    /// Whether the `AuthorizationPolicies` let `conn` in, as ztunnel decides at L4: denied if a
    /// DENY policy that applies to the destination workload matches; else, if ALLOW policies
    /// apply, allowed only if one matches; else allowed. AUDIT policies that match are listed
    /// and do not change the verdict. Only the policies that apply to the destination's
    /// namespace (and the root namespace's) are evaluated. See the [`super::authz`] module for
    /// the rules.
    pub fn authorize(&self, conn: &ConnFacts<'_>) -> AuthzDecision {
        self.authz.decide(conn)
    }

    /// Where a TCP connection to `dst` goes. A service VIP and port resolves to one of its ready
    /// endpoints that has an address of `dst`'s family, chosen **round-robin**: each service port
    /// keeps an `AtomicUsize` cursor in this (shared) state, advanced by every resolution, so
    /// concurrent callers spread over the endpoints; a new snapshot starts again at the first.
    /// IPv4-mapped IPv6 destinations are treated as IPv4.
    pub fn resolve(&self, dst: SocketAddr) -> Resolution {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        if let Some((service, index)) = self.by_addr.get(&dst) {
            return match service.ports[*index].pick(dst.ip()) {
                Some((endpoint, addr)) => Resolution::Service {
                    service: Arc::clone(service),
                    endpoint: addr,
                    workload: Arc::clone(&endpoint.workload),
                },
                None => Resolution::NoEndpoint {
                    service: Arc::clone(service),
                },
            };
        }
        match self.by_ip.get(&dst.ip()) {
            Some(workload) => Resolution::Workload {
                workload: Arc::clone(workload),
            },
            None => Resolution::Passthrough,
        }
    }
}
