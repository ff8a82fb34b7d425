//! What every object has, whatever its kind: its metadata, its labels, and how an error names it
//! ([`ObjectRef`]: kind, namespace and name). The lowest layer of the model: the Kubernetes and
//! Istio object types both build on it.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer};

/// Labels or annotations of an object.
pub type Labels = BTreeMap<String, String>;

/// Namespace of namespaced objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Service account of pods that do not name one.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Kinds of [`crate::k8s::Object`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `Namespace`.
    Namespace,
    /// `Pod`.
    Pod,
    /// `Service`.
    Service,
    /// `EndpointSlice` (`discovery.k8s.io`).
    EndpointSlice,
    /// `PeerAuthentication` (`security.istio.io`).
    PeerAuthentication,
    /// `AuthorizationPolicy` (`security.istio.io`).
    AuthorizationPolicy,
    /// `HTTPRoute` (`gateway.networking.k8s.io`).
    HttpRoute,
    /// `Gateway` (`gateway.networking.k8s.io`).
    Gateway,
    /// `GRPCRoute` (`gateway.networking.k8s.io`).
    GrpcRoute,
    /// `VirtualService` (`networking.istio.io`).
    VirtualService,
    /// `DestinationRule` (`networking.istio.io`).
    DestinationRule,
    /// `ReferenceGrant` (`gateway.networking.k8s.io`).
    ReferenceGrant,
    /// `RequestAuthentication` (`security.istio.io`).
    RequestAuthentication,
    /// `EnvoyFilter` (`networking.istio.io`).
    EnvoyFilter,
    /// `TCPRoute` (`gateway.networking.k8s.io`).
    TcpRoute,
    /// `TLSRoute` (`gateway.networking.k8s.io`).
    TlsRoute,
    /// `Node`: its locality labels.
    Node,
    /// `ServiceEntry` (`networking.istio.io`).
    ServiceEntry,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 18] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::HttpRoute,
        Kind::Gateway,
        Kind::GrpcRoute,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ReferenceGrant,
        Kind::RequestAuthentication,
        Kind::EnvoyFilter,
        Kind::TcpRoute,
        Kind::TlsRoute,
        Kind::Node,
        Kind::ServiceEntry,
    ];

    /// The kind's name, as in an object's `kind`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::Gateway => "Gateway",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::EnvoyFilter => "EnvoyFilter",
            Kind::TcpRoute => "TCPRoute",
            Kind::TlsRoute => "TLSRoute",
            Kind::Node => "Node",
            Kind::ServiceEntry => "ServiceEntry",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies an object: displayed as `Pod namespace/name`, or `Namespace name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Kind of the object.
    pub kind: Kind,
    /// Namespace, `None` for cluster-scoped kinds (Namespace).
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// The reference to a namespaced object.
    pub fn namespaced(kind: Kind, metadata: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: Some(metadata.namespace().to_owned()),
            name: metadata.name().to_owned(),
        }
    }

    /// The reference to a cluster-scoped object.
    pub fn cluster_scoped(kind: Kind, metadata: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: None,
            name: metadata.name().to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// No labels or annotations.
static NONE: Labels = BTreeMap::new();

/// What the model reads of any object's metadata, with Kubernetes' defaults applied.
pub trait MetaExt {
    /// `metadata.name`; empty when absent (refused when the state is built, naming the field).
    fn name(&self) -> &str;
    /// The namespace, [`DEFAULT_NAMESPACE`] when absent or empty.
    fn namespace(&self) -> &str;
    /// `metadata.labels`, empty when absent.
    fn labels(&self) -> &Labels;
    /// `metadata.annotations`, empty when absent.
    fn annotations(&self) -> &Labels;
}

impl MetaExt for ObjectMeta {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            None | Some("") => DEFAULT_NAMESPACE,
            Some(namespace) => namespace,
        }
    }

    fn labels(&self) -> &Labels {
        self.labels.as_ref().unwrap_or(&NONE)
    }

    fn annotations(&self) -> &Labels {
        self.annotations.as_ref().unwrap_or(&NONE)
    }
}

/// `null` reads as the default (Kubernetes manifests often carry `labels:` with nothing after).
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}
