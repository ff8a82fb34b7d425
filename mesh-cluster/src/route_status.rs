//! What a route attached to a Service (GAMMA) or a `ServiceEntry` is told in its status, as
//! Gateway API specifies for a route's parents: for each of its Service `parentRef`s, an entry
//! of `status.parents` with this mesh's [`ROUTE_CONTROLLER`] and two conditions.
//!
//! - **`Accepted`**: `True` when the route attaches to the parent and a waypoint serves the
//!   parent, so the route is applied. `False` with `NoMatchingParent` when the parent does not
//!   exist or has no port that `port` or `sectionName` names; with `NoWaypoint` when nothing
//!   applies it: a Service without waypoint has its connections go straight to its pods, whose
//!   agents route nothing (the same silent no-op that Istio's users meet with an L7 policy on
//!   such a Service). A parent whose waypoint is asked for but unavailable still accepts the
//!   route; the Service's own `istio.io/WaypointBound` says why its traffic is refused.
//! - **`ResolvedRefs`** (for a parent it attaches to): `True` when every backend (and mirror)
//!   of the route's rules resolves for that parent; else `False` naming the first that does not: `BackendNotFound` (no such
//!   Service, port or host), `RefNotPermitted` (another namespace without a `ReferenceGrant`),
//!   `InvalidKind` (not a Service, a `ServiceEntry` or Istio's `Hostname`). Its share of the
//!   requests gets a 500, as Gateway API requires (of a `TCPRoute`'s or `TLSRoute`'s
//!   connections: refused).
//!
//! A route whose current version does not read (a field this mesh refuses, a regular expression
//! that does not compile) or is rejected is told so for each of that version's Service parents:
//! `Accepted` `False` with `UnsupportedValue` and the problem, at that version's generation, and
//! no `ResolvedRefs`. Its last good version stays in force (as a file's does), and the message
//! says which generation that is.
//!
//! `parentRef`s of other kinds (a `Gateway`) are not a waypoint's and get no entry. Every route
//! kind a waypoint reads is told: `HTTPRoute`, `GRPCRoute`, `TCPRoute`, `TLSRoute` (at whichever
//! of their versions the API server serves, [`RouteKind::resources`]).

use std::collections::{BTreeMap, HashMap};

use crate::{
    error::{ErrorObject, ReadPart},
    gateway_api::ParentRef,
    http_route::{InvalidBackend, ParentRecord},
    meta::{Kind, ObjectRef},
    model::WaypointBinding,
    state::ClusterState,
};

/// The `controllerName` of this mesh's entries in a route's `status.parents`.
pub const ROUTE_CONTROLLER: &str = "mesh.local/waypoint";

/// A route kind that is told its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
    /// `TCPRoute`.
    Tcp,
    /// `TLSRoute`.
    Tls,
}

impl RouteKind {
    /// Every route kind.
    pub const ALL: [RouteKind; 4] = [
        RouteKind::Http,
        RouteKind::Grpc,
        RouteKind::Tcp,
        RouteKind::Tls,
    ];

    /// The route kind of model `kind`, if it is one.
    fn of(kind: Kind) -> Option<Self> {
        RouteKind::ALL.into_iter().find(|k| k.model_kind() == kind)
    }

    fn model_kind(self) -> Kind {
        match self {
            RouteKind::Http => Kind::HttpRoute,
            RouteKind::Grpc => Kind::GrpcRoute,
            RouteKind::Tcp => Kind::TcpRoute,
            RouteKind::Tls => Kind::TlsRoute,
        }
    }

    /// The kind's API resource at each version the mesh reads it at, the newest first (a
    /// cluster with an older Gateway API serves only older ones: `TCPRoute` was `v1alpha2`).
    #[must_use]
    pub fn resources(self) -> Vec<kube::api::ApiResource> {
        let plural = match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
            RouteKind::Tcp => "tcproutes",
            RouteKind::Tls => "tlsroutes",
        };
        let kind = self.model_kind();
        crate::k8s::api_versions(kind)
            .iter()
            .map(|version| crate::kube_source::custom_resource(kind, plural, version))
            .collect()
    }

    /// What a backend that does not resolve costs a route of this kind.
    fn unresolved_share(self) -> &'static str {
        match self {
            RouteKind::Http | RouteKind::Grpc => "its share of the requests gets a 500",
            RouteKind::Tcp | RouteKind::Tls => "its share of the connections is refused",
        }
    }
}

/// A route that is told its status.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteObject {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

impl RouteObject {
    /// The route `object` names, if it is one.
    fn of(object: &ObjectRef) -> Option<Self> {
        Some(Self {
            kind: RouteKind::of(object.kind)?,
            namespace: object.namespace.clone().unwrap_or_default(),
            name: object.name.clone(),
        })
    }
}

/// A condition's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteReason {
    /// The route is attached and applied.
    Accepted,
    /// The parent does not exist, or has no port the `parentRef` names.
    NoMatchingParent,
    /// No waypoint serves the parent: nothing applies the route.
    NoWaypoint,
    /// Every backend resolves.
    ResolvedRefs,
    /// A backend names no Service, port or host.
    BackendNotFound,
    /// A backend in another namespace without a `ReferenceGrant`.
    RefNotPermitted,
    /// A backend of a kind no waypoint sends to.
    InvalidKind,
    /// The route's current version does not read or is rejected: not applied.
    UnsupportedValue,
}

impl RouteReason {
    /// The condition's `reason` (one CamelCase word; Gateway API's, but `NoWaypoint`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Accepted => "Accepted",
            RouteReason::NoMatchingParent => "NoMatchingParent",
            RouteReason::NoWaypoint => "NoWaypoint",
            RouteReason::ResolvedRefs => "ResolvedRefs",
            RouteReason::BackendNotFound => "BackendNotFound",
            RouteReason::RefNotPermitted => "RefNotPermitted",
            RouteReason::InvalidKind => "InvalidKind",
            RouteReason::UnsupportedValue => "UnsupportedValue",
        }
    }

    /// Why `backend` does not resolve.
    fn of(backend: &InvalidBackend) -> Self {
        match backend {
            InvalidBackend::Kind { .. } => RouteReason::InvalidKind,
            InvalidBackend::CrossNamespace { .. } => RouteReason::RefNotPermitted,
            InvalidBackend::NotFound { .. }
            | InvalidBackend::NoPort { .. }
            | InvalidBackend::NoSubset { .. }
            | InvalidBackend::UnknownHost { .. } => RouteReason::BackendNotFound,
        }
    }
}

/// One condition of a parent's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteCondition {
    /// Whether it holds (`status`).
    pub ok: bool,
    pub reason: RouteReason,
    /// For people: what the route came to, or what is wrong.
    pub message: String,
}

/// A route's entry for one of its Service `parentRef`s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    /// The `parentRef`, as the route writes it.
    pub parent: ParentRef,
    /// The route's `metadata.generation` it was decided for (`observedGeneration`).
    pub generation: Option<i64>,
    pub accepted: RouteCondition,
    /// None for a parent the route does not attach to: its backends are resolved for none.
    pub resolved_refs: Option<RouteCondition>,
}

impl ClusterState {
    /// Each route with Service or `ServiceEntry` parents, and its entry for each of them, in
    /// `parentRefs` order.
    #[must_use]
    pub fn route_statuses(&self) -> BTreeMap<RouteObject, Vec<ParentStatus>> {
        let services: HashMap<(&str, &str, bool), &crate::model::Service> = self
            .services()
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str(), s.is_entry()), &**s))
            .collect();
        let mut statuses: BTreeMap<RouteObject, Vec<ParentStatus>> = BTreeMap::new();
        for record in self.route_parents() {
            let Some(route) = RouteObject::of(&record.route) else {
                continue;
            };
            let kind = route.kind;
            let binding = |(namespace, name): &(String, String)| {
                let entry = record.parent.kind == "ServiceEntry";
                services
                    .get(&(namespace.as_str(), name.as_str(), entry))
                    .map(|s| self.service_waypoint(s))
            };
            statuses
                .entry(route)
                .or_default()
                .push(parent_status(record, kind, binding));
        }
        for error in self.errors() {
            let Some(about) = &error.object else {
                continue;
            };
            let Some(route) = RouteObject::of(&about.object) else {
                continue;
            };
            let in_force = statuses
                .remove(&route)
                .and_then(|entries| entries.first()?.generation);
            let entries = not_applied(about, &error.message, in_force);
            if !entries.is_empty() {
                statuses.insert(route, entries);
            }
        }
        statuses
    }
}

/// The entries of a route whose version `about` is not applied for `message`, one per Service
/// parent it names; `in_force`: the generation of the version applied instead, if one is.
fn not_applied(about: &ErrorObject, message: &str, in_force: Option<i64>) -> Vec<ParentStatus> {
    let message = match in_force {
        Some(generation) => {
            format!("not applied: {message}; the route's generation {generation} stays in force")
        }
        None => format!("not applied: {message}"),
    };
    let ReadPart::Route { parents } = &about.read else {
        return Vec::new();
    };
    parents
        .iter()
        .filter(|parent| parent.is_service())
        .map(|parent| ParentStatus {
            parent: parent.clone(),
            generation: about.generation,
            accepted: RouteCondition {
                ok: false,
                reason: RouteReason::UnsupportedValue,
                message: message.clone(),
            },
            resolved_refs: None,
        })
        .collect()
}

/// `record`'s entry (a route of `route_kind`); `binding` finds the waypoint binding of the parent it
/// attached to.
fn parent_status<'s>(
    record: &ParentRecord,
    route_kind: RouteKind,
    binding: impl Fn(&(String, String)) -> Option<&'s WaypointBinding>,
) -> ParentStatus {
    let (accepted, resolved_refs) = match &record.outcome {
        Err(why) => (
            RouteCondition {
                ok: false,
                reason: RouteReason::NoMatchingParent,
                message: format!("{why}: the route does not attach to it"),
            },
            None,
        ),
        Ok((parent, invalid)) => {
            let (kind, (namespace, name)) = (&record.parent.kind, parent);
            let accepted = match binding(parent) {
                Some(WaypointBinding::Bound(waypoint)) => RouteCondition {
                    ok: true,
                    reason: RouteReason::Accepted,
                    message: format!("applied by waypoint {waypoint}"),
                },
                Some(WaypointBinding::Unavailable(why)) => RouteCondition {
                    ok: true,
                    reason: RouteReason::Accepted,
                    message: format!(
                        "applied by its waypoint once available ({why}; {kind} \
                         {namespace}/{name}'s connections are refused until it is)"
                    ),
                },
                Some(WaypointBinding::None) | None => RouteCondition {
                    ok: false,
                    reason: RouteReason::NoWaypoint,
                    message: format!(
                        "{kind} {namespace}/{name} has no waypoint (istio.io/use-waypoint): \
                         nothing applies this route to its traffic"
                    ),
                },
            };
            (accepted, Some(resolved(invalid.as_ref(), route_kind)))
        }
    };
    ParentStatus {
        parent: record.parent.clone(),
        generation: record.generation,
        accepted,
        resolved_refs,
    }
}

/// The `ResolvedRefs` condition of a route of `kind`: the first backend that does not resolve,
/// if any.
fn resolved(invalid: Option<&InvalidBackend>, kind: RouteKind) -> RouteCondition {
    match invalid {
        None => RouteCondition {
            ok: true,
            reason: RouteReason::ResolvedRefs,
            message: "every backend resolves".to_owned(),
        },
        Some(problem) => RouteCondition {
            ok: false,
            reason: RouteReason::of(problem),
            message: format!("{problem}: {}", kind.unresolved_share()),
        },
    }
}
