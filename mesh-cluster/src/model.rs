//! The model's values, as the data path needs them: workloads (pods), services with their
//! ports and endpoints, and where a connection to an address goes ([`Resolution`]).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use mesh_common::HBONE_PORT;
use mesh_identity::Identity;

use crate::{
    locality::{keep_closest, Locality, Place, Site, TrafficDistribution},
    meta::Labels,
};

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
    pub identity: Identity,
    /// Labels.
    pub labels: Labels,
    /// Addresses, primary first, at most one IPv4 and one IPv6. Empty while none is assigned.
    pub ips: Vec<IpAddr>,
    /// Whether it takes new connections.
    pub readiness: Readiness,
    /// Traffic of this pod is captured by the mesh.
    pub enrolled: bool,
    /// The pod uses its node's network namespace: it is never enrolled, and its addresses (the
    /// node's) are not indexed as the pod's.
    pub host_network: bool,
    /// Path of the pod's network namespace file ([`crate::NETNS_ANNOTATION`]).
    pub netns: Option<PathBuf>,
    /// Path of the pod's cgroup v2 directory ([`crate::CGROUP_ANNOTATION`]).
    pub cgroup: Option<PathBuf>,
    /// Whether the pod's mesh legs take the `sk_msg` short-cut ([`crate::SHORTCUT_ANNOTATION`]).
    pub shortcut: Shortcut,
    /// Region, zone and subzone: its node's, or its own `istio-locality` label's.
    pub locality: Locality,
}

impl Workload {
    /// Where it runs: its locality and node.
    #[must_use]
    pub fn place(&self) -> Place<'_> {
        Place {
            locality: &self.locality,
            node: self.node.as_deref(),
        }
    }

    /// Where it runs, with its labels (locality load balancing).
    #[must_use]
    pub fn site(&self) -> Site<'_> {
        Site {
            place: self.place(),
            labels: &self.labels,
        }
    }
}

/// Whether a pod takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Ready (no `Ready` condition says `False`), and not being deleted.
    Ready,
    /// Ready, but being deleted (`deletionTimestamp`): it takes new connections only when no
    /// other pod can (Kubernetes' serving-terminating endpoints), and finishes those it has.
    Terminating,
    /// A `Ready` condition says `False`.
    NotReady,
}

impl Readiness {
    /// Ready or terminating: it serves.
    #[must_use]
    pub fn serving(self) -> bool {
        self != Self::NotReady
    }
}

/// Of serving pods, those that take new connections: the ones not being deleted, or, when every
/// one is, all of them (a Deployment of one replica keeps serving while its replacement starts).
pub(crate) fn not_terminating_first<T>(
    mut serving: Vec<T>,
    workload: impl Fn(&T) -> &Workload,
) -> Vec<T> {
    let ready = |p: &T| workload(p).readiness == Readiness::Ready;
    if serving.iter().any(ready) {
        serving.retain(ready);
    }
    serving
}

/// Whether a workload's mesh legs take the kernel's `sk_msg` short-cut: opt-in, by the
/// [`crate::SHORTCUT_ANNOTATION`] of the pod or else of its namespace.
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
    /// Whether an agent serves the pod (it is enrolled and has a network namespace of its own),
    /// so that it speaks HBONE on port 15008.
    pub fn is_meshed(&self) -> bool {
        self.enrolled && !self.host_network
    }

    /// The identity to open an HBONE tunnel to, for the agent of `this_node`: the workload's,
    /// when another node's agent serves it. `None` for pods of this node (reached directly: the
    /// same-node path when this agent captured them, plain TCP when it could not) and for pods
    /// outside the mesh.
    pub fn tunnel_identity(&self, this_node: &str) -> Option<&Identity> {
        let remote = self.node.as_deref().is_some_and(|node| node != this_node);
        (remote && self.is_meshed()).then_some(&self.identity)
    }

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

/// What a Service port carries, as Istio selects it: the port's `appProtocol`, else the prefix of
/// its name before the first `-` (`http-web`, `grpc`), else unknown (a waypoint sniffs the first
/// bytes). Case is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppProtocol {
    /// `http`, or Kubernetes' `kubernetes.io/ws` (WebSocket starts as HTTP/1.1).
    Http,
    /// `http2`, or Kubernetes' `kubernetes.io/h2c`.
    Http2,
    /// `grpc` or `grpc-web`.
    Grpc,
    /// Not HTTP, or HTTP the waypoint cannot read (`tcp`, `tls`, `https`, `mongo`, `mysql`,
    /// `redis`, `kubernetes.io/wss`): passed through as TCP.
    Opaque,
    /// Not said, or a value Istio does not know: sniffed.
    Unknown,
}

impl AppProtocol {
    /// The protocol of a port with `app_protocol` and `name`.
    pub fn of(app_protocol: Option<&str>, name: Option<&str>) -> Self {
        let known = |value: &str| match value.to_ascii_lowercase().as_str() {
            "http" | "http1" | "kubernetes.io/ws" => Some(AppProtocol::Http),
            "http2" | "kubernetes.io/h2c" => Some(AppProtocol::Http2),
            "grpc" | "grpc-web" => Some(AppProtocol::Grpc),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => {
                Some(AppProtocol::Opaque)
            }
            _ => None,
        };
        if let Some(protocol) = app_protocol.and_then(known) {
            return protocol;
        }
        let prefix = name.map(|n| n.split('-').next().unwrap_or(n));
        // `grpc-web` as a name is the protocol itself, not `grpc` with a suffix.
        let whole = name.and_then(known).filter(|p| *p == AppProtocol::Grpc);
        whole
            .or_else(|| prefix.and_then(known))
            .unwrap_or(AppProtocol::Unknown)
    }

    /// Whether the waypoint serves the port as HTTP without sniffing.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }
}

/// A Service.
#[derive(Debug)]
pub struct Service {
    /// The service's DNS name, `<name>.<namespace>.svc.<cluster domain>`
    /// ([`crate::EnrollmentOptions::cluster_domain`]): Istio's `destination_service` and the
    /// `:authority` a waypoint routes by.
    pub hostname: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Virtual IPs, at most one per family; empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// Selector; empty means no automatic endpoints (see [`crate::EndpointsFrom`]).
    pub selector: Labels,
    /// Ports with their endpoints.
    pub ports: Vec<ServicePort>,
    /// Which of its endpoints a client prefers (`spec.trafficDistribution`, or Istio's
    /// annotation); `None`: all alike.
    pub traffic_distribution: Option<TrafficDistribution>,
    /// A Kubernetes `Service`, or an Istio `ServiceEntry` ([`crate::service_entry`]).
    pub kind: ServiceKind,
}

/// What a [`Service`] of the model was written as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// A Kubernetes `Service`: its hostname is `<name>.<namespace>.svc.<cluster domain>`.
    Kubernetes,
    /// An Istio `ServiceEntry`: its hostname is the first of its `hosts`.
    Entry(EntryFacts),
}

/// What a `ServiceEntry` says beyond what every Service has.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EntryFacts {
    /// `hosts`, in order (the first is the Service's hostname).
    pub hosts: Vec<String>,
    /// `location`.
    pub location: MeshLocation,
    /// `resolution`.
    pub resolution: EntryResolution,
    /// Whose connections its addresses capture.
    pub scope: EntryScope,
}

/// Which client namespaces a `ServiceEntry`'s addresses are captured for
/// ([`crate::service_entry`]): its own, or, for an entry of the root namespace, every namespace
/// its `exportTo` lets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum EntryScope {
    /// The clients of its namespace.
    Namespace,
    /// The clients of these namespaces (`None`: every namespace).
    Mesh(Option<std::collections::BTreeSet<String>>),
}

/// A `ServiceEntry`'s `location`: whether its endpoints are part of the mesh. Shown, and in
/// telemetry; an endpoint's identity comes from its address either way (a pod's address is the
/// pod's, whatever the entry says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MeshLocation {
    /// `MESH_EXTERNAL` (the default): outside the mesh.
    #[serde(rename = "MESH_EXTERNAL")]
    External,
    /// `MESH_INTERNAL`: part of the mesh (pods picked by its `workloadSelector`).
    #[serde(rename = "MESH_INTERNAL")]
    Internal,
}

/// How a `ServiceEntry`'s connections find their endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum EntryResolution {
    /// `NONE` (the default): the connection goes on to the address it was opened to (one of
    /// the entry's `addresses`), at the port's `targetPort`.
    #[serde(rename = "NONE")]
    OriginalDestination,
    /// `STATIC`: to one of its `endpoints`, or of the pods its `workloadSelector` picks.
    #[serde(rename = "STATIC")]
    Static,
    /// `DNS`: to one of the addresses its endpoints' names (or its hosts) resolve to, every
    /// answer an endpoint (Envoy's `STRICT_DNS`). Resolved by its waypoint.
    #[serde(rename = "DNS")]
    Dns,
    /// `DNS_ROUND_ROBIN`: to the first address each name resolves to (Envoy's `LOGICAL_DNS`).
    #[serde(rename = "DNS_ROUND_ROBIN")]
    DnsFirstAnswer,
}

/// A name a waypoint resolves for a `ServiceEntry` port of resolution `DNS`: each answer is an
/// endpoint at `port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DnsName {
    /// The name, absolute.
    pub host: String,
    /// The endpoints' port.
    pub port: u16,
}

impl Service {
    /// Whether `parent` names this Service: a core `Service` of that name, or a `ServiceEntry`
    /// (`networking.istio.io`) of that name.
    #[must_use]
    pub fn is_kind(&self, group: &str, kind: &str) -> bool {
        match &self.kind {
            ServiceKind::Kubernetes => (group.is_empty() || group == "core") && kind == "Service",
            ServiceKind::Entry(_) => group == ISTIO_NETWORKING_GROUP && kind == "ServiceEntry",
        }
    }

    /// Its `destination_service_name` in Istio's telemetry: a Kubernetes Service's name, a
    /// `ServiceEntry`'s host (as istiod names an entry's services).
    #[must_use]
    pub fn telemetry_name(&self) -> &str {
        match self.kind {
            ServiceKind::Kubernetes => &self.name,
            ServiceKind::Entry(_) => &self.hostname,
        }
    }

    /// How an entry's names resolve (`None` for a Kubernetes Service and an entry not resolved
    /// by DNS): `Some(true)` when only each name's first answer is used.
    #[must_use]
    pub fn dns_first_answer(&self) -> Option<bool> {
        match &self.kind {
            ServiceKind::Entry(EntryFacts {
                resolution: EntryResolution::Dns,
                ..
            }) => Some(false),
            ServiceKind::Entry(EntryFacts {
                resolution: EntryResolution::DnsFirstAnswer,
                ..
            }) => Some(true),
            _ => None,
        }
    }

    /// Whether it is a `ServiceEntry`'s.
    #[must_use]
    pub fn is_entry(&self) -> bool {
        matches!(self.kind, ServiceKind::Entry(_))
    }

    /// The kind it was written as, for messages (`Service`, `ServiceEntry`).
    #[must_use]
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ServiceKind::Kubernetes => "Service",
            ServiceKind::Entry(_) => "ServiceEntry",
        }
    }

    /// Every name it answers to: its hostname, and a `ServiceEntry`'s other hosts.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        let others: &[String] = match &self.kind {
            ServiceKind::Kubernetes => &[],
            ServiceKind::Entry(facts) => facts.hosts.get(1..).unwrap_or_default(),
        };
        std::iter::once(self.hostname.as_str()).chain(others.iter().map(String::as_str))
    }

    /// Whether a client of `client_namespace` (`None`: a client the view does not know)
    /// reaches it by its addresses: always for a Kubernetes `Service`; for a `ServiceEntry`, as
    /// its scope says (an unknown client only an entry exported everywhere).
    #[must_use]
    pub fn captured_for(&self, client_namespace: Option<&str>) -> bool {
        let ServiceKind::Entry(facts) = &self.kind else {
            return true;
        };
        match (&facts.scope, client_namespace) {
            (EntryScope::Mesh(None), _) => true,
            (_, None) => false,
            (EntryScope::Namespace, Some(ns)) => ns == self.namespace,
            (EntryScope::Mesh(Some(namespaces)), Some(ns)) => namespaces.contains(ns),
        }
    }

    /// Whether connections go on to the address they were opened to (`resolution: NONE`).
    #[must_use]
    pub fn keeps_destination(&self) -> bool {
        matches!(
            &self.kind,
            ServiceKind::Entry(EntryFacts {
                resolution: EntryResolution::OriginalDestination,
                ..
            })
        )
    }
}

/// Istio's networking API group (`ServiceEntry`, `VirtualService`, `DestinationRule`).
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

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
    /// What the port carries, for a waypoint: from `appProtocol`, else the port's name.
    pub app_protocol: AppProtocol,
    /// The addresses that serve this port, sorted, each once: from the ready pods the selector
    /// picks (target port resolved per pod), or from the service's `EndpointSlices` (see
    /// [`crate::EndpointsFrom`]).
    pub endpoints: Vec<Endpoint>,
    /// The names whose answers are endpoints too (a `ServiceEntry` of resolution `DNS`),
    /// resolved by the waypoint when it connects.
    pub dns: Vec<DnsName>,
    /// Endpoint addresses per family (index into `endpoints`, address).
    v4: Vec<(usize, SocketAddr)>,
    v6: Vec<(usize, SocketAddr)>,
    /// Round-robin cursor, shared by both families; wraps around.
    next: AtomicUsize,
}

/// An address serving a service port.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Address and target port.
    pub addr: SocketAddr,
    /// The pod that has this address, if the cluster has one: its identity is the one the
    /// connection is tunnelled to. An `EndpointSlice` may name any address (a VM, a pod of
    /// another cluster); its `targetRef` is not trusted for the identity, the address is
    /// looked up among the pods.
    pub workload: Option<Arc<Workload>>,
}

impl fmt::Display for Service {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ServicePort {
    /// A port with its endpoints (in order); indexes them per address family.
    pub(crate) fn new(
        name: Option<String>,
        (port, protocol): (u16, Protocol),
        target_port: TargetPort,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        let family = |v4: bool| -> Vec<(usize, SocketAddr)> {
            endpoints
                .iter()
                .enumerate()
                .filter(|(_, ep)| ep.addr.is_ipv4() == v4)
                .map(|(index, ep)| (index, ep.addr))
                .collect()
        };
        let (v4, v6) = (family(true), family(false));
        Self {
            app_protocol: AppProtocol::Unknown,
            dns: Vec::new(),
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

    /// The endpoint at `ip` (a `ServiceEntry` of `resolution: NONE`, whose connections go on to
    /// the address they were opened to).
    pub(crate) fn endpoint_at(&self, ip: IpAddr) -> Option<(&Endpoint, SocketAddr)> {
        self.endpoints
            .iter()
            .find(|e| e.addr.ip() == ip)
            .map(|e| (e, e.addr))
    }

    /// Picks the next endpoint with an address of `dst`'s family, round-robin; under a
    /// `distribution`, among the closest to `from` ([`crate::locality`]).
    pub(crate) fn pick(
        &self,
        family: IpAddr,
        (distribution, from): (Option<TrafficDistribution>, Option<Place<'_>>),
    ) -> Option<(&Endpoint, SocketAddr)> {
        let all = if family.is_ipv4() { &self.v4 } else { &self.v6 };
        let closest;
        let candidates = match (distribution, from) {
            (Some(_), Some(_)) => {
                let mut kept = all.clone();
                keep_closest(&mut kept, distribution, from, |(index, _)| {
                    self.endpoints[*index]
                        .workload
                        .as_deref()
                        .map(Workload::place)
                });
                closest = kept;
                &closest
            }
            _ => all,
        };
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
        /// The pod behind `endpoint`, if it is a pod's address.
        workload: Option<Arc<Workload>>,
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
    /// A destination bound to a waypoint (a Service's VIP, or a pod's address): the connection
    /// goes over HBONE to one of the waypoint's pods, with the original destination as
    /// `:authority`.
    Waypoint {
        /// The Service addressed, if a Service's VIP was.
        service: Option<Arc<Service>>,
        /// The waypoint.
        waypoint: Arc<Waypoint>,
        /// The waypoint's pod chosen, whose identity the tunnel requires.
        pod: Arc<Workload>,
        /// The pod's HBONE address (port 15008).
        addr: SocketAddr,
        /// The tunnel's `:authority`: the original destination, or, for a Service without
        /// waypoint whose chosen endpoint has one, that endpoint (`pod_ip:port`).
        authority: SocketAddr,
    },
    /// A destination bound to a waypoint that cannot take the connection: refuse it (fail
    /// closed, see [`crate::waypoint`]).
    WaypointUnavailable {
        /// The Service addressed, if a Service's VIP was.
        service: Option<Arc<Service>>,
        /// Why.
        reason: Unavailable,
    },
}

// ---------------------------------------------------------------------------------------------
// Waypoints (attached by `crate::waypoint`)

/// The `gatewayClassName` of a waypoint.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Label of a Service, Pod or Namespace naming the waypoint its traffic goes through.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// Label naming the waypoint's namespace, beside [`USE_WAYPOINT`].
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
/// Label of a waypoint `Gateway`: which traffic it takes.
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Annotation of a waypoint `Gateway` (Istio 1.30's): `"true"` (any case) makes the waypoint
/// set `x-forwarded-client-cert` on the requests it sends on to the source's identity, for
/// applications that want to know who called them through the waypoint.
pub const XFCC_CLIENT_IDENTITY: &str = "ambient.istio.io/xfcc-include-client-identity";
/// Label of a waypoint's pods naming their `Gateway`; the pods also run under the service account
/// named after it.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label of a waypoint `Gateway` naming the service account (of its namespace) whose workloads
/// it serves: the per-service-account waypoint the controller makes. The account's pods, and
/// the Services whose pods all run under it, go through it unless their own
/// [`USE_WAYPOINT`] label says otherwise.
pub const FOR_SERVICE_ACCOUNT: &str = "mesh.local/waypoint-for-service-account";
/// Label of a Namespace or `ServiceAccount` asking the controller for a waypoint per service
/// account ([`PER_SERVICE_ACCOUNT`]; `none` on a `ServiceAccount` opts it out of its
/// namespace's).
pub const WAYPOINT_MODE: &str = "mesh.local/waypoint";
/// The value of [`WAYPOINT_MODE`] that gives every service account its own waypoint.
pub const PER_SERVICE_ACCOUNT: &str = "per-service-account";
/// The name of the per-service-account waypoint of `account`.
pub fn service_account_waypoint(account: &str) -> String {
    format!("{account}-waypoint")
}

/// Which traffic a waypoint takes ([`WAYPOINT_FOR`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic addressed to Services bound to it (the default).
    Service,
    /// Traffic addressed to pods bound to it.
    Workload,
    /// Both.
    All,
    /// Neither.
    None,
}

impl WaypointFor {
    pub(crate) fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "service" => WaypointFor::Service,
            "workload" => WaypointFor::Workload,
            "all" => WaypointFor::All,
            "none" => WaypointFor::None,
            _ => return None,
        })
    }

    /// Whether it takes traffic addressed to Services.
    pub fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    /// Whether it takes traffic addressed to pods.
    pub fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

impl fmt::Display for WaypointFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        })
    }
}

/// A waypoint and its ready pods.
#[derive(Debug)]
pub struct Waypoint {
    /// Namespace of its `Gateway`.
    pub namespace: String,
    /// Name of its `Gateway`.
    pub name: String,
    /// Which traffic it takes.
    pub traffic: WaypointFor,
    /// Its pods with an address that take new connections, sorted by namespace and name: the
    /// ready ones not being deleted, or, when every ready one is, those
    /// (`not_terminating_first`).
    pub workloads: Vec<Arc<Workload>>,
    /// All its pods with an address, ready or not (one being deleted finishes what it has):
    /// what comes from them came through the waypoint.
    pub members: Vec<Arc<Workload>>,
    /// Whether it tells the endpoints who called ([`XFCC_CLIENT_IDENTITY`]).
    pub xfcc_client_identity: bool,
    /// Which of its pods a client prefers (its `Gateway`'s
    /// [`crate::locality::TRAFFIC_DISTRIBUTION_ANNOTATION`]): a waypoint per zone.
    pub traffic_distribution: Option<TrafficDistribution>,
    /// Which namespaces' Services and pods may use it: its HBONE listener's
    /// `allowedRoutes.namespaces`, as Istio reads them.
    pub attachment: Attachment,
    /// Round-robin cursor over `workloads`.
    next: AtomicUsize,
}

impl fmt::Display for Waypoint {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Waypoint {
    /// A waypoint with its ready pods.
    pub(crate) fn new(
        namespace: String,
        name: String,
        traffic: WaypointFor,
        workloads: Vec<Arc<Workload>>,
    ) -> Self {
        Self {
            namespace,
            name,
            traffic,
            members: workloads.clone(),
            workloads,
            xfcc_client_identity: false,
            traffic_distribution: None,
            attachment: Attachment::SameNamespace,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks a ready pod with an address of `family`'s family, round-robin (under a traffic
    /// distribution, among those closest to `from`): the pod and its HBONE address (port
    /// 15008).
    pub fn pick(
        &self,
        family: IpAddr,
        from: Option<Place<'_>>,
    ) -> Option<(&Arc<Workload>, SocketAddr)> {
        let mut candidates: Vec<(&Arc<Workload>, IpAddr)> = self
            .workloads
            .iter()
            .filter_map(|w| w.ip_like(family).map(|ip| (w, ip)))
            .collect();
        keep_closest(
            &mut candidates,
            self.traffic_distribution,
            from,
            |(w, _)| Some(w.place()),
        );
        if candidates.is_empty() {
            return None;
        }
        // Relaxed: the cursor only spreads load.
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        let (workload, ip) = candidates[turn];
        Some((workload, SocketAddr::new(ip, HBONE_PORT)))
    }

    /// Whether `workload` is one of this waypoint's pods (ready or not): labelled with its
    /// Gateway, under its service account.
    pub fn has_pod(&self, workload: &Workload) -> bool {
        workload.namespace == self.namespace
            && workload.labels.get(GATEWAY_NAME_LABEL) == Some(&self.name)
            && workload.service_account == self.name
    }
}

/// Which namespaces may bind their Services and pods to a waypoint (Istio reads its `Gateway`'s
/// HBONE listener, port 15008: `allowedRoutes.namespaces.from`, `Same` when absent). A waypoint
/// is its namespace's own; another namespace uses it only with its owner's consent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// `Same` (the default): its own namespace only.
    SameNamespace,
    /// `All`.
    AllNamespaces,
    /// `Selector`: the namespaces whose labels match.
    Selector(crate::label_selector::LabelSelector),
}

impl Attachment {
    /// Whether an object of `namespace` (its Namespace's labels `ns_labels`) may use a
    /// waypoint of `waypoint_namespace` with this attachment.
    #[must_use]
    pub fn admits(&self, waypoint_namespace: &str, namespace: &str, ns_labels: &Labels) -> bool {
        namespace == waypoint_namespace
            || match self {
                Attachment::SameNamespace => false,
                Attachment::AllNamespaces => true,
                Attachment::Selector(selector) => selector.matches(ns_labels),
            }
    }
}

/// Whether a Service's (or pod's) traffic goes through a waypoint.
#[derive(Clone, Debug, Default)]
pub enum WaypointBinding {
    /// No waypoint: L4 only.
    #[default]
    None,
    /// Through this waypoint, which has a ready pod.
    Bound(Arc<Waypoint>),
    /// A waypoint is asked for and cannot take the traffic: refuse it (fail closed).
    Unavailable(Unavailable),
}

/// Why a bound waypoint cannot take traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No waypoint `Gateway` of that name.
    NotFound { namespace: String, name: String },
    /// The waypoint does not take this kind of traffic.
    WrongTraffic {
        waypoint: String,
        traffic: WaypointFor,
    },
    /// The waypoint has no ready pod with an address.
    NotReady { waypoint: String },
    /// The waypoint's `Gateway` does not let the object's namespace use it.
    AttachmentDenied { waypoint: String, namespace: String },
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NotFound { namespace, name } => {
                write!(
                    f,
                    "no waypoint Gateway {namespace}/{name} (class {WAYPOINT_CLASS})"
                )
            }
            Unavailable::WrongTraffic { waypoint, traffic } => write!(
                f,
                "waypoint {waypoint} is for {traffic} traffic ({WAYPOINT_FOR})"
            ),
            Unavailable::NotReady { waypoint } => {
                write!(f, "waypoint {waypoint} has no ready pod")
            }
            Unavailable::AttachmentDenied {
                waypoint,
                namespace,
            } => write!(
                f,
                "waypoint {waypoint} does not let namespace {namespace} use it (its HBONE \
                 listener's allowedRoutes.namespaces)"
            ),
        }
    }
}

#[cfg(test)]
mod tests;
