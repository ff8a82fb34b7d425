//! The subset of Kubernetes objects the agent reads (`v1` Namespace, Pod and Service,
//! `discovery.k8s.io/v1` `EndpointSlice`, and Istio's
//! `security.istio.io/v1` or `v1beta1` `PeerAuthentication` and `AuthorizationPolicy`, and Gateway
//! API's `gateway.networking.k8s.io/v1` or `v1beta1` `HTTPRoute` and `Gateway`), and the parser that turns YAML
//! text into them.
//!
//! A text holds one or more documents separated by `---`. A document is one object, or a
//! `kind: List` (or `PodList`, `ServiceList`, `EndpointSliceList`, `NamespaceList`, or `PeerAuthenticationList` or
//! `AuthorizationPolicyList` of a `security.istio.io` version, or `HTTPRouteList` or `GatewayList`) whose `items` are objects.
//! Documents and items of other kinds, or of the known kinds under another `apiVersion` (a
//! Knative `Service` is not a Kubernetes Service), are skipped with a debug log. A document or
//! item without `kind` or `apiVersion` is an error. Fields the agent does not read are ignored
//! (except in an `AuthorizationPolicy` spec, see below).
//!
//! Parsing checks shapes only (a port is an integer, a label value a string); values are checked
//! by [`super::ClusterState::build`], which names the object and the field of each problem. The
//! exceptions are the specs of `PeerAuthentication`, `AuthorizationPolicy` and `HTTPRoute`, whose rules are
//! checked when they are parsed (see [`PeerAuthentication`] and [`AuthorizationPolicy`]), so that
//! their errors carry a line too; unknown fields of an `AuthorizationPolicy` spec are errors (a
//! misspelt field must not silently change what the policy allows).

use std::{cell::Cell, fmt};

use serde::{
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Deserializer,
};
use serde_yaml::Value;
use tracing::debug;

pub use super::gateway_api::{
    parse_duration, BackendRef, BackendTarget, Filter, FilterType, Gateway, GatewaySpec, GrpcRoute,
    GrpcRouteSpec, HeaderModifier, HttpRoute, HttpRouteSpec, Mirror, ParentRef, PathMatch,
    PathModifier, Pattern, Redirect, Retry, RetryOn, Rewrite, RouteMatch, RouteRule,
    RouteSchemaError, StringMatch, Timeouts, ValueMatch, GATEWAY_GROUP,
};
pub use super::gateway_api::{L4Rule, TcpRoute, TcpRouteSpec, TlsRoute, TlsRouteSpec};
use super::gateway_api::{HTTP_ROUTE_VERSIONS, TCP_ROUTE_VERSIONS, TLS_ROUTE_VERSIONS};
use super::istio::{has_match_labels, PeerAuthSeed, PEER_AUTHENTICATION_VERSIONS};
pub use super::istio::{
    MutualTls, PeerAuthMode, PeerAuthentication, PeerAuthenticationSpec, WorkloadSelector,
};
use super::istio_authn::REQUEST_AUTHENTICATION_VERSIONS;
pub use super::istio_authn::{
    AuthnSchemaError, ClaimToHeader, JwtHeader, JwtRule, RequestAuthentication,
    RequestAuthenticationSpec,
};
use super::istio_authz::AUTHORIZATION_POLICY_VERSIONS;
pub use super::istio_authz::{
    Attribute, AuthAttribute, AuthorizationPolicy, AuthorizationPolicySpec, AuthzAction,
    AuthzSchemaError, Condition, Operation, PolicyTargetRef, Rule, RuleFrom, RuleTo,
    ServiceAccountRef, Source, Values,
};
use super::istio_envoy_filter::ENVOY_FILTER_VERSIONS;
pub use super::istio_envoy_filter::{
    ConfigPatch, EnvoyFilter, EnvoyFilterSchemaError, EnvoyFilterSpec, LocalRateLimit,
    RateLimitPatch, RuntimeFraction,
};
use super::istio_traffic::ISTIO_NETWORKING_VERSIONS;
pub use super::istio_traffic::{
    parse_istio_duration, Abort, ConnectionPool, DestinationRule, DestinationRuleSpec,
    DirectResponse, Fault, HashCookie, HashKey, Http2Keepalive, LoadBalancer, OutlierDetection,
    PolicyParts, PortPolicy, Subset, TcpKeepalive, TrafficPolicy, VirtualService,
    VirtualServiceSpec, VsDestination, VsHeaderOps, VsHeaders, VsHttpRoute, VsMatch, VsRedirect,
    VsRetries, VsRewrite, VsString, VsTarget,
};
use super::reference_grant::REFERENCE_GRANT_VERSIONS;
pub use super::reference_grant::{GrantFrom, GrantTo, ReferenceGrant, ReferenceGrantSpec};
use crate::error::ReadPart;
pub use crate::meta::{
    Kind, Labels, MetaExt, ObjectMeta, ObjectRef, DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT,
};

/// One object the agent reads.
// Most objects are Pods (the largest variant): boxing would add an allocation per object and
// save little.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A `v1` Namespace.
    Namespace(Namespace),
    /// A `v1` Pod.
    Pod(Pod),
    /// A `v1` Service.
    Service(Service),
    /// A `discovery.k8s.io/v1` `EndpointSlice`.
    EndpointSlice(EndpointSlice),
    /// A `security.istio.io` `PeerAuthentication`.
    PeerAuthentication(PeerAuthentication),
    /// A `security.istio.io` `AuthorizationPolicy`.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A `gateway.networking.k8s.io` `HTTPRoute`.
    HttpRoute(HttpRoute),
    /// A `gateway.networking.k8s.io` `Gateway`.
    Gateway(Gateway),
    /// A `gateway.networking.k8s.io` `GRPCRoute`.
    GrpcRoute(GrpcRoute),
    /// A `networking.istio.io` `VirtualService`.
    VirtualService(VirtualService),
    /// A `networking.istio.io` `DestinationRule`.
    DestinationRule(DestinationRule),
    /// A `gateway.networking.k8s.io` `ReferenceGrant`.
    ReferenceGrant(ReferenceGrant),
    /// A `security.istio.io` `RequestAuthentication`.
    RequestAuthentication(RequestAuthentication),
    /// A `networking.istio.io` `EnvoyFilter`.
    EnvoyFilter(EnvoyFilter),
    /// A `gateway.networking.k8s.io` `TCPRoute`.
    TcpRoute(TcpRoute),
    /// A `gateway.networking.k8s.io` `TLSRoute`.
    TlsRoute(TlsRoute),
    /// A `v1` Node (its locality labels).
    Node(Node),
    /// A `networking.istio.io` `ServiceEntry`.
    ServiceEntry(crate::service_entry::ServiceEntry),
}

impl Object {
    /// The object's kind, namespace and name, as used in error messages.
    pub fn object_ref(&self) -> ObjectRef {
        match self {
            Object::Namespace(o) => ObjectRef::cluster_scoped(Kind::Namespace, &o.metadata),
            Object::Pod(o) => ObjectRef::namespaced(Kind::Pod, &o.metadata),
            Object::Service(o) => ObjectRef::namespaced(Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => ObjectRef::namespaced(Kind::EndpointSlice, &o.metadata),
            Object::PeerAuthentication(o) => {
                ObjectRef::namespaced(Kind::PeerAuthentication, &o.metadata)
            }
            Object::AuthorizationPolicy(o) => {
                ObjectRef::namespaced(Kind::AuthorizationPolicy, &o.metadata)
            }
            Object::HttpRoute(o) => ObjectRef::namespaced(Kind::HttpRoute, &o.metadata),
            Object::Gateway(o) => ObjectRef::namespaced(Kind::Gateway, &o.metadata),
            Object::GrpcRoute(o) => ObjectRef::namespaced(Kind::GrpcRoute, &o.metadata),
            Object::TcpRoute(o) => ObjectRef::namespaced(Kind::TcpRoute, &o.metadata),
            Object::TlsRoute(o) => ObjectRef::namespaced(Kind::TlsRoute, &o.metadata),
            Object::VirtualService(o) => ObjectRef::namespaced(Kind::VirtualService, &o.metadata),
            Object::DestinationRule(o) => ObjectRef::namespaced(Kind::DestinationRule, &o.metadata),
            Object::ReferenceGrant(o) => ObjectRef::namespaced(Kind::ReferenceGrant, &o.metadata),
            Object::RequestAuthentication(o) => {
                ObjectRef::namespaced(Kind::RequestAuthentication, &o.metadata)
            }
            Object::EnvoyFilter(o) => ObjectRef::namespaced(Kind::EnvoyFilter, &o.metadata),
            Object::Node(o) => ObjectRef::cluster_scoped(Kind::Node, &o.metadata),
            Object::ServiceEntry(o) => ObjectRef::namespaced(Kind::ServiceEntry, &o.metadata),
        }
    }

    /// Its `metadata.generation` (of the kinds whose status the mesh writes) and what that status
    /// is decided from: a route's `parentRefs`, whether a policy names `targetRefs`.
    pub(crate) fn status_part(&self) -> (Option<i64>, ReadPart) {
        let route = |meta: &ObjectMeta, parents: &[ParentRef]| {
            let parents = parents.to_vec();
            (meta.generation, ReadPart::Route { parents })
        };
        let policy = |meta: &ObjectMeta, targets: &[PolicyTargetRef]| {
            let targeted = !targets.is_empty();
            (meta.generation, ReadPart::Policy { targeted })
        };
        match self {
            Object::HttpRoute(o) => route(&o.metadata, &o.spec.parent_refs),
            Object::GrpcRoute(o) => route(&o.metadata, &o.spec.0.parent_refs),
            Object::TcpRoute(o) => route(&o.metadata, &o.spec.parent_refs),
            Object::TlsRoute(o) => route(&o.metadata, &o.spec.parent_refs),
            Object::AuthorizationPolicy(o) => policy(&o.metadata, &o.spec.target_refs),
            Object::RequestAuthentication(o) => policy(&o.metadata, &o.spec.target_refs),
            Object::EnvoyFilter(o) => policy(&o.metadata, &o.spec.target_refs),
            Object::Namespace(_)
            | Object::Pod(_)
            | Object::Service(_)
            | Object::EndpointSlice(_)
            | Object::PeerAuthentication(_)
            | Object::Gateway(_)
            | Object::VirtualService(_)
            | Object::DestinationRule(_)
            | Object::ReferenceGrant(_)
            | Object::Node(_)
            | Object::ServiceEntry(_) => (None, ReadPart::Other),
        }
    }
}

pub use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, Namespace, Node, Pod, PodCondition, PodIP, PodSpec, PodStatus,
        Service, ServicePort, ServiceSpec,
    },
    api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

/// What the model reads of a Pod, with Kubernetes' defaults applied.
pub trait PodExt {
    /// The service account, [`DEFAULT_SERVICE_ACCOUNT`] when absent or empty.
    fn service_account(&self) -> &str;
    /// The node the pod is bound to; `None` while pending.
    fn node_name(&self) -> Option<&str>;
    /// Whether the pod shares its node's network namespace.
    fn host_network(&self) -> bool;
    /// Whether the pod has finished (`Succeeded` or `Failed`): its address may already belong
    /// to another pod.
    fn is_terminated(&self) -> bool;
    /// Whether the pod is ready (serving): it has not finished and no `Ready` condition says
    /// `False`.
    fn is_ready(&self) -> bool;
    /// Whether the pod is being deleted (`metadata.deletionTimestamp`): as the `EndpointSlice`
    /// controller has it, it takes new connections only when no other pod can (Kubernetes'
    /// serving-terminating endpoints), and finishes those it has.
    fn is_terminating(&self) -> bool;
}

impl PodExt for Pod {
    fn service_account(&self) -> &str {
        match self
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.as_deref())
        {
            None | Some("") => DEFAULT_SERVICE_ACCOUNT,
            Some(name) => name,
        }
    }

    fn node_name(&self) -> Option<&str> {
        self.spec
            .as_ref()
            .and_then(|spec| spec.node_name.as_deref())
            .filter(|node| !node.is_empty())
    }

    fn host_network(&self) -> bool {
        self.spec
            .as_ref()
            .and_then(|spec| spec.host_network)
            .unwrap_or(false)
    }

    fn is_terminated(&self) -> bool {
        matches!(
            self.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
    }

    fn is_terminating(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    fn is_ready(&self) -> bool {
        !self.is_terminated()
            && !self
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_deref())
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
    }
}

/// The kind read for `apiVersion` and `kind`, if the agent reads it.
fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| k.name() == kind && api_versions(*k).contains(&api_version))
}

/// The `apiVersion`s `kind` is read at, the newest first: the Kubernetes source watches the
/// first one its API server serves.
pub(crate) fn api_versions(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::Node => &["v1"],
        Kind::EndpointSlice => &["discovery.k8s.io/v1"],
        Kind::PeerAuthentication => &PEER_AUTHENTICATION_VERSIONS,
        Kind::AuthorizationPolicy => &AUTHORIZATION_POLICY_VERSIONS,
        Kind::HttpRoute | Kind::Gateway => &HTTP_ROUTE_VERSIONS,
        Kind::GrpcRoute => &["gateway.networking.k8s.io/v1"],
        Kind::TcpRoute => &TCP_ROUTE_VERSIONS,
        Kind::TlsRoute => &TLS_ROUTE_VERSIONS,
        Kind::VirtualService | Kind::DestinationRule => &ISTIO_NETWORKING_VERSIONS,
        Kind::ReferenceGrant => &REFERENCE_GRANT_VERSIONS,
        Kind::RequestAuthentication => &REQUEST_AUTHENTICATION_VERSIONS,
        Kind::EnvoyFilter => &ENVOY_FILTER_VERSIONS,
        Kind::ServiceEntry => &crate::service_entry::SERVICE_ENTRY_VERSIONS,
    }
}

/// Where in a text a problem is: file, document (1-based) and, inside a list, item (0-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocPosition {
    /// The file (or other source) name given to [`parse_documents`].
    pub file: String,
    /// Document number, 1-based.
    pub document: usize,
    /// Index in the list's `items`, for objects inside a list.
    pub item: Option<usize>,
}

impl fmt::Display for DocPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        match self.item {
            Some(item) => write!(f, ", items[{item}]"),
            None => Ok(()),
        }
    }
}

/// Why a text could not be parsed. Every variant names the file and document.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The text is not YAML.
    #[error("{position}: invalid YAML: {source}")]
    Yaml {
        position: DocPosition,
        source: serde_yaml::Error,
    },
    /// A document or item is not a mapping.
    #[error("{position}: not an object (expected a mapping with `apiVersion` and `kind`)")]
    NotAnObject { position: DocPosition },
    /// A document or item lacks `kind` or `apiVersion` (or it is not a string).
    #[error("{position}: no `{field}` (every object needs `apiVersion` and `kind`)")]
    MissingField {
        position: DocPosition,
        field: &'static str,
    },
    /// A list's `items` is not a sequence.
    #[error("{position}: `items` of a {kind} is not a sequence")]
    ItemsNotASequence { position: DocPosition, kind: String },
    /// An object of a known kind does not have the expected shape; the message names the
    /// field path and the line.
    #[error("{position}: {object}: {source}")]
    Invalid {
        position: DocPosition,
        object: String,
        source: serde_yaml::Error,
    },
}

/// What the typed pass does with one document.
enum Plan {
    Skip,
    One(Target),
    List(Vec<Option<Target>>),
}

/// An object the typed pass reads: its kind, and what it needs to know from the untyped pass.
#[derive(Clone, Copy)]
struct Target {
    kind: Kind,
    /// A `PeerAuthentication` has a non-empty `spec.selector.matchLabels` (its `portLevelMtls`
    /// is only valid then, and the two fields may come in any order).
    match_labels: bool,
}

impl Target {
    fn new(kind: Kind, value: &Value) -> Self {
        Self {
            kind,
            match_labels: kind == Kind::PeerAuthentication && has_match_labels(value),
        }
    }
}

/// Parses every document of `text`; `file` names the source in errors and logs.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Object>, ParseError> {
    // Pass 1, untyped: find each document's kind (and each list item's), and a readable name for
    // error messages.
    let mut plans = Vec::new();
    let mut names = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let position = DocPosition {
            file: file.to_owned(),
            document: index + 1,
            item: None,
        };
        // After a syntax error the iterator repeats the error forever: stop at the first.
        let value = Value::deserialize(document).map_err(|source| ParseError::Yaml {
            position: position.clone(),
            source,
        })?;
        let (plan, doc_names) = plan_document(&value, &position)?;
        plans.push(plan);
        names.push(doc_names);
    }

    // Pass 2, typed: deserialize straight from the document so that errors carry the field path
    // and the line in the file.
    let mut objects = Vec::new();
    let documents = serde_yaml::Deserializer::from_str(text);
    for (index, (document, plan)) in documents.zip(&plans).enumerate() {
        let current_item = Cell::new(None);
        let result = match plan {
            Plan::Skip => continue,
            Plan::One(target) => KindSeed(Some(*target))
                .deserialize(document)
                .map(|object| objects.extend(object)),
            Plan::List(kinds) => ListSeed {
                kinds,
                current_item: &current_item,
            }
            .deserialize(document)
            .map(|items| objects.extend(items)),
        };
        result.map_err(|source| {
            let item = current_item.get();
            ParseError::Invalid {
                position: DocPosition {
                    file: file.to_owned(),
                    document: index + 1,
                    item,
                },
                object: names[index]
                    .get(item.unwrap_or(0))
                    .cloned()
                    .unwrap_or_default(),
                source,
            }
        })?;
    }
    Ok(objects)
}

/// Decides what pass 2 does with a document, and returns a readable name per object in it.
fn plan_document(value: &Value, position: &DocPosition) -> Result<(Plan, Vec<String>), ParseError> {
    if value.is_null() {
        return Ok((Plan::Skip, Vec::new())); // empty document, e.g. after a trailing `---`
    }
    let (api_version, kind) = type_of(value, position)?;
    if let Some(known) = kind_of(api_version, kind) {
        let target = Target::new(known, value);
        return Ok((Plan::One(target), vec![display_name(known, value)]));
    }
    if api_version == "v1" && kind == "List" {
        return plan_list(value, kind, None, position);
    }
    let item_kind = kind.strip_suffix("List");
    if let Some(item_kind) = item_kind.and_then(|item| kind_of(api_version, item)) {
        return plan_list(value, kind, Some(item_kind), position);
    }
    log_skipped(position, api_version, kind);
    Ok((Plan::Skip, Vec::new()))
}

fn plan_list(
    value: &Value,
    list_kind: &str,
    item_kind: Option<Kind>,
    position: &DocPosition,
) -> Result<(Plan, Vec<String>), ParseError> {
    let items = match value.get("items") {
        None | Some(Value::Null) => return Ok((Plan::Skip, Vec::new())),
        Some(Value::Sequence(items)) => items,
        Some(_) => {
            return Err(ParseError::ItemsNotASequence {
                position: position.clone(),
                kind: list_kind.to_owned(),
            })
        }
    };
    let mut kinds = Vec::with_capacity(items.len());
    let mut names = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let position = DocPosition {
            item: Some(index),
            ..position.clone()
        };
        // Items of a typed list (`PodList`) may omit their own type, as the API server does.
        let kind = match item_kind {
            Some(kind) if item.get("kind").is_none() && item.is_mapping() => Some(kind),
            _ => {
                let (api_version, kind) = type_of(item, &position)?;
                let known = kind_of(api_version, kind);
                if known.is_none() {
                    log_skipped(&position, api_version, kind);
                }
                known
            }
        };
        names.push(
            kind.map(|kind| display_name(kind, item))
                .unwrap_or_default(),
        );
        kinds.push(kind.map(|kind| Target::new(kind, item)));
    }
    Ok((Plan::List(kinds), names))
}

/// `apiVersion` and `kind` of a document or item.
fn type_of<'v>(value: &'v Value, position: &DocPosition) -> Result<(&'v str, &'v str), ParseError> {
    if !value.is_mapping() {
        return Err(ParseError::NotAnObject {
            position: position.clone(),
        });
    }
    let field = |field: &'static str| {
        value
            .get(field)
            .and_then(Value::as_str)
            .ok_or_else(|| ParseError::MissingField {
                position: position.clone(),
                field,
            })
    };
    Ok((field("apiVersion")?, field("kind")?))
}

fn log_skipped(position: &DocPosition, api_version: &str, kind: &str) {
    debug!(%position, api_version, kind, "skipping an object of a kind the agent does not read");
}

/// `Kind namespace/name` read from an untyped object, for error messages.
fn display_name(kind: Kind, value: &Value) -> String {
    let metadata = value.get("metadata");
    let field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    let name = field("name").unwrap_or("<no name>");
    match kind {
        Kind::Namespace | Kind::Node => format!("{kind} {name}"),
        Kind::Pod
        | Kind::Service
        | Kind::EndpointSlice
        | Kind::PeerAuthentication
        | Kind::AuthorizationPolicy
        | Kind::HttpRoute
        | Kind::Gateway
        | Kind::GrpcRoute
        | Kind::TcpRoute
        | Kind::TlsRoute
        | Kind::VirtualService
        | Kind::DestinationRule
        | Kind::ReferenceGrant
        | Kind::RequestAuthentication
        | Kind::EnvoyFilter
        | Kind::ServiceEntry => {
            let namespace = field("namespace").filter(|ns| !ns.is_empty());
            format!("{kind} {}/{name}", namespace.unwrap_or(DEFAULT_NAMESPACE))
        }
    }
}

/// Deserializes one object of a known kind, or skips a value (`None`).
#[derive(Clone, Copy)]
struct KindSeed(Option<Target>);

impl<'de> DeserializeSeed<'de> for KindSeed {
    type Value = Option<Object>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Ok(Some(match self.0 {
            None => {
                IgnoredAny::deserialize(deserializer)?;
                return Ok(None);
            }
            Some(target) => match target.kind {
                Kind::Namespace => Object::Namespace(Namespace::deserialize(deserializer)?),
                Kind::Pod => Object::Pod(Pod::deserialize(deserializer)?),
                Kind::Service => Object::Service(Service::deserialize(deserializer)?),
                Kind::EndpointSlice => {
                    Object::EndpointSlice(EndpointSlice::deserialize(deserializer)?)
                }
                Kind::PeerAuthentication => Object::PeerAuthentication(
                    PeerAuthSeed {
                        match_labels: target.match_labels,
                    }
                    .deserialize(deserializer)?,
                ),
                Kind::AuthorizationPolicy => {
                    Object::AuthorizationPolicy(AuthorizationPolicy::deserialize(deserializer)?)
                }
                Kind::HttpRoute => Object::HttpRoute(HttpRoute::deserialize(deserializer)?),
                Kind::Gateway => Object::Gateway(Gateway::deserialize(deserializer)?),
                Kind::GrpcRoute => Object::GrpcRoute(GrpcRoute::deserialize(deserializer)?),
                Kind::TcpRoute => Object::TcpRoute(TcpRoute::deserialize(deserializer)?),
                Kind::TlsRoute => Object::TlsRoute(TlsRoute::deserialize(deserializer)?),
                Kind::VirtualService => {
                    Object::VirtualService(VirtualService::deserialize(deserializer)?)
                }
                Kind::DestinationRule => {
                    Object::DestinationRule(DestinationRule::deserialize(deserializer)?)
                }
                Kind::ReferenceGrant => {
                    Object::ReferenceGrant(ReferenceGrant::deserialize(deserializer)?)
                }
                Kind::RequestAuthentication => {
                    Object::RequestAuthentication(RequestAuthentication::deserialize(deserializer)?)
                }
                Kind::EnvoyFilter => Object::EnvoyFilter(EnvoyFilter::deserialize(deserializer)?),
                Kind::Node => Object::Node(Node::deserialize(deserializer)?),
                Kind::ServiceEntry => Object::ServiceEntry(
                    crate::service_entry::ServiceEntry::deserialize(deserializer)?,
                ),
            },
        }))
    }
}

/// Deserializes the known items of a list document; records the index of the item being read so
/// that an error can name it.
#[derive(Clone, Copy)]
struct ListSeed<'a> {
    kinds: &'a [Option<Target>],
    current_item: &'a Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_> {
    type Value = Vec<Object>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_> {
    type Value = Vec<Object>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut objects = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                objects = map.next_value_seed(ItemsSeed(self))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(objects)
    }
}

struct ItemsSeed<'a>(ListSeed<'a>);

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<Object>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<Object>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut objects = Vec::new();
        for index in 0.. {
            self.0.current_item.set(Some(index));
            let kind = self.0.kinds.get(index).copied().flatten();
            match seq.next_element_seed(KindSeed(kind))? {
                None => break,
                Some(object) => objects.extend(object),
            }
        }
        self.0.current_item.set(None);
        Ok(objects)
    }
}
