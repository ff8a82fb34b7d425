//! What an object that depends on a waypoint is told in its status, as Istio tells it:
//!
//! - a Service or `ServiceEntry` that asks for a waypoint: Istio's condition [`WAYPOINT_BOUND`],
//!   `True` when its traffic goes through the waypoint, else `False` with the reason the source
//!   agents refuse its connections (an unavailable waypoint fails closed, [`crate::waypoint`]);
//! - an `AuthorizationPolicy` with `targetRefs`: Istio's condition [`WAYPOINT_ACCEPTED`], `True`
//!   when a waypoint enforces it for every target, else `False` naming the target that no
//!   waypoint serves (a policy on a Service without waypoint is enforced nowhere: Istio's users
//!   meet that as an ALLOW or DENY that silently does nothing);
//! - every other `AuthorizationPolicy` (the node agents enforce it): Istio's [`ZTUNNEL_ACCEPTED`],
//!   `True`, or `False` (`UnsupportedValue`) when a rule has HTTP fields the agents cannot
//!   evaluate, saying how each such rule is narrowed (an ALLOW matches nothing, a DENY denies
//!   more);
//! - a `RequestAuthentication` ([`crate::authn`]): [`WAYPOINT_ACCEPTED`] as an
//!   `AuthorizationPolicy` with `targetRefs`; without `targetRefs` (a selector, for sidecars)
//!   `False` (`NoTargetRefs`): nothing validates its tokens, where Istio's users meet a JWT
//!   requirement that silently does nothing;
//! - an `EnvoyFilter` with `targetRefs`, or with a local rate limit ([`crate::ratelimit`]):
//!   [`WAYPOINT_ACCEPTED`] as a policy with `targetRefs`, `False` (`UnsupportedValue`) naming
//!   each patch a waypoint does not apply, `False` (`NoTargetRefs`) for a rate limit without
//!   `targetRefs`. An `EnvoyFilter` of neither kind is for sidecars and gateways: no condition.
//!
//! A policy whose current version does not read (a field the mesh refuses) or is rejected is
//! told so instead, `False` (`UnsupportedValue`) with the problem: its last good version stays
//! in force, and the message says that too.
//!
//! Users see there why a label or a policy took no effect without reading an agent's log.
//! Objects that depend on no waypoint get no condition.

use std::collections::BTreeMap;

use crate::{
    authz::{AuthzPolicy, AuthzScope},
    error::{ErrorObject, ReadPart},
    meta::Kind,
    model::{Unavailable, WaypointBinding},
    policy_target::PolicyTarget,
    ratelimit::Filter,
    state::ClusterState,
};

/// The condition type of Services and `ServiceEntries`, Istio's.
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";
/// The condition type of `AuthorizationPolicies` with `targetRefs`, Istio's.
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";
/// The condition type of the other `AuthorizationPolicies` (the node agents', ztunnel's in
/// Istio), Istio's.
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";

/// Which object the condition is written on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BoundKind {
    /// A core `Service`.
    Service,
    /// An Istio `ServiceEntry`.
    ServiceEntry,
    /// An Istio `AuthorizationPolicy` (of a waypoint, with `targetRefs`, or of the node agents).
    AuthorizationPolicy,
    /// An Istio `RequestAuthentication`.
    RequestAuthentication,
    /// An Istio `EnvoyFilter` (a waypoint's local rate limit).
    EnvoyFilter,
}

impl BoundKind {
    /// The types of the conditions written on objects of this kind.
    #[must_use]
    pub fn condition_types(self) -> &'static [&'static str] {
        match self {
            BoundKind::Service | BoundKind::ServiceEntry => &[WAYPOINT_BOUND],
            BoundKind::AuthorizationPolicy => &[WAYPOINT_ACCEPTED, ZTUNNEL_ACCEPTED],
            BoundKind::RequestAuthentication | BoundKind::EnvoyFilter => &[WAYPOINT_ACCEPTED],
        }
    }
}

/// An object that depends on a waypoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BoundObject {
    pub kind: BoundKind,
    pub namespace: String,
    pub name: String,
}

impl BoundObject {
    #[must_use]
    pub fn new(kind: BoundKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// Why the condition has its status (the condition's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundReason {
    /// Its traffic goes through the waypoint.
    Accepted,
    /// The policy is enforced as written: by the waypoint of every target, or by the node
    /// agents.
    PolicyAccepted,
    /// A policy's target does not exist.
    TargetNotFound,
    /// A policy's target has no waypoint: nothing enforces the policy for it.
    NoWaypoint,
    /// A rule of a node agents' policy has HTTP fields they cannot evaluate; a patch of an
    /// `EnvoyFilter` is not applied; the policy's current version does not read or is rejected.
    UnsupportedValue,
    /// A waypoint's kind of policy without `targetRefs`: it is for sidecars, and applies to
    /// nothing here.
    NoTargetRefs,
    /// No waypoint `Gateway` of that name.
    NotFound,
    /// The waypoint does not take Service traffic.
    UnsupportedTraffic,
    /// The waypoint has no ready pod.
    NotReady,
    /// The waypoint's `Gateway` does not let the object's namespace use it.
    AttachmentDenied,
}

impl BoundReason {
    /// The condition's `reason` (one CamelCase word).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            BoundReason::Accepted => "WaypointAccepted",
            BoundReason::PolicyAccepted => "Accepted",
            BoundReason::TargetNotFound => "TargetNotFound",
            BoundReason::NoWaypoint => "NoWaypoint",
            BoundReason::UnsupportedValue => "UnsupportedValue",
            BoundReason::NoTargetRefs => "NoTargetRefs",
            BoundReason::NotFound => "WaypointNotFound",
            BoundReason::UnsupportedTraffic => "WaypointUnsupportedTraffic",
            BoundReason::NotReady => "WaypointNotReady",
            BoundReason::AttachmentDenied => "WaypointAttachmentDenied",
        }
    }

    /// Why a waypoint asked for cannot take the traffic.
    fn of(why: &Unavailable) -> Self {
        match why {
            Unavailable::NotFound { .. } => BoundReason::NotFound,
            Unavailable::WrongTraffic { .. } => BoundReason::UnsupportedTraffic,
            Unavailable::NotReady { .. } => BoundReason::NotReady,
            Unavailable::AttachmentDenied { .. } => BoundReason::AttachmentDenied,
        }
    }
}

/// The condition of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundCondition {
    /// Its `type`: [`WAYPOINT_BOUND`], [`WAYPOINT_ACCEPTED`] or [`ZTUNNEL_ACCEPTED`].
    pub condition_type: &'static str,
    /// Whether it holds (`status`): bound, or enforced as written.
    pub ok: bool,
    pub reason: BoundReason,
    /// For people: the waypoint, or why it cannot take the traffic.
    pub message: String,
}

impl WaypointBinding {
    /// The [`WAYPOINT_BOUND`] condition this binding gives its object; none when it asks for
    /// no waypoint.
    #[must_use]
    pub fn condition(&self) -> Option<BoundCondition> {
        let (ok, reason, message) = match self {
            WaypointBinding::None => return None,
            WaypointBinding::Bound(waypoint) => {
                (true, BoundReason::Accepted, format!("bound to {waypoint}"))
            }
            WaypointBinding::Unavailable(why) => (
                false,
                BoundReason::of(why),
                format!("{why}: its connections are refused until it is"),
            ),
        };
        Some(BoundCondition {
            condition_type: WAYPOINT_BOUND,
            ok,
            reason,
            message,
        })
    }
}

impl ClusterState {
    /// The condition of every object that depends on a waypoint: [`WAYPOINT_BOUND`] of the
    /// Services and `ServiceEntries` that ask for one, [`WAYPOINT_ACCEPTED`] of the
    /// `AuthorizationPolicies` with `targetRefs`, [`ZTUNNEL_ACCEPTED`] of the others,
    /// [`WAYPOINT_ACCEPTED`] of the `RequestAuthentications` and of the `EnvoyFilters` for
    /// waypoints.
    #[must_use]
    pub fn bound_conditions(&self) -> BTreeMap<BoundObject, BoundCondition> {
        let services = self.services().iter().filter_map(|service| {
            let condition = self.service_waypoint(service).condition()?;
            let object = BoundObject {
                kind: if service.is_entry() {
                    BoundKind::ServiceEntry
                } else {
                    BoundKind::Service
                },
                namespace: service.namespace.clone(),
                name: service.name.clone(),
            };
            Some((object, condition))
        });
        let policies = self.authorization_policies().iter().map(|policy| {
            let object = BoundObject::new(
                BoundKind::AuthorizationPolicy,
                &policy.namespace,
                &policy.name,
            );
            let condition = if policy.scope == AuthzScope::Waypoint {
                self.targets_condition(&policy.namespace, &policy.targets)
            } else {
                agents_condition(policy)
            };
            (object, condition)
        });
        let authentications = self.request_authentication_list().iter().map(|ra| {
            let object =
                BoundObject::new(BoundKind::RequestAuthentication, &ra.namespace, &ra.name);
            let condition = if ra.target_refs == 0 {
                no_target_refs(
                    "no waypoint validates its tokens: without targetRefs a \
                     RequestAuthentication is for sidecars, which this mesh does not have",
                )
            } else {
                self.targets_condition(&ra.namespace, &ra.targets)
            };
            (object, condition)
        });
        let filters = self.envoy_filter_list().iter().filter_map(|filter| {
            let object = BoundObject::new(BoundKind::EnvoyFilter, &filter.namespace, &filter.name);
            Some((object, self.filter_condition(filter)?))
        });
        let mut conditions: BTreeMap<BoundObject, BoundCondition> = services
            .chain(policies)
            .chain(authentications)
            .chain(filters)
            .collect();
        for error in self.errors() {
            if let Some((object, condition)) = error
                .object
                .as_ref()
                .and_then(|about| not_applied(about, &error.message, &mut conditions))
            {
                conditions.insert(object, condition);
            }
        }
        conditions
    }

    /// An `EnvoyFilter`'s [`WAYPOINT_ACCEPTED`]: none for one of neither a waypoint's nor a
    /// local rate limit (for sidecars and gateways); else as a policy's with `targetRefs`, and
    /// `False` while a patch is not applied.
    fn filter_condition(&self, filter: &Filter) -> Option<BoundCondition> {
        if filter.target_refs == 0 {
            if filter.limits.is_empty() {
                return None;
            }
            return Some(no_target_refs(
                "no waypoint applies its local rate limits: without targetRefs an EnvoyFilter \
                 is for sidecars and gateways, which this mesh does not have",
            ));
        }
        let condition = self.targets_condition(&filter.namespace, &filter.targets);
        if !condition.ok || filter.unapplied.is_empty() {
            return Some(condition);
        }
        let applied = if filter.limits.is_empty() {
            "no patch is applied".to_owned()
        } else {
            format!("its local rate limits are applied, {}", condition.message)
        };
        Some(BoundCondition {
            condition_type: WAYPOINT_ACCEPTED,
            ok: false,
            reason: BoundReason::UnsupportedValue,
            message: format!("{}; {applied}", filter.unapplied.join("; ")),
        })
    }

    /// The [`WAYPOINT_ACCEPTED`] of a policy of `namespace` with `targetRefs` (`targets`, those
    /// that are valid): the waypoints that enforce it, or the first target none does.
    fn targets_condition(&self, namespace: &str, targets: &[PolicyTarget]) -> BoundCondition {
        if targets.is_empty() {
            return BoundCondition {
                condition_type: WAYPOINT_ACCEPTED,
                ok: false,
                reason: BoundReason::TargetNotFound,
                message: "none of its targetRefs names a waypoint Gateway, its GatewayClass, a \
                          Service or a ServiceEntry of its namespace: it applies to nothing"
                    .to_owned(),
            };
        }
        let mut waypoints: Vec<String> = Vec::new();
        for target in targets {
            match self.target_waypoint(namespace, target) {
                Ok(waypoint) if !waypoints.contains(&waypoint) => waypoints.push(waypoint),
                Ok(_) => {}
                Err((reason, message)) => {
                    return BoundCondition {
                        condition_type: WAYPOINT_ACCEPTED,
                        ok: false,
                        reason,
                        message,
                    }
                }
            }
        }
        BoundCondition {
            condition_type: WAYPOINT_ACCEPTED,
            ok: true,
            reason: BoundReason::PolicyAccepted,
            message: format!("bound to {}", waypoints.join(", ")),
        }
    }

    /// The waypoint that enforces a policy of `namespace` for `target`, or why none does.
    fn target_waypoint(
        &self,
        namespace: &str,
        target: &PolicyTarget,
    ) -> Result<String, (BoundReason, String)> {
        let (kind, name) = match target {
            PolicyTarget::Gateway(name) => {
                return match self.waypoint(namespace, name) {
                    Some(waypoint) => Ok(waypoint.to_string()),
                    None => Err((
                        BoundReason::TargetNotFound,
                        format!("no waypoint Gateway {namespace}/{name}"),
                    )),
                };
            }
            PolicyTarget::GatewayClass(class) => return Ok(format!("every {class} waypoint")),
            PolicyTarget::Service(name) => ("Service", name),
            PolicyTarget::ServiceEntry(name) => ("ServiceEntry", name),
        };
        let Some(service) = self.targeted_service(namespace, target) else {
            return Err((
                BoundReason::TargetNotFound,
                format!("no {kind} {namespace}/{name}"),
            ));
        };
        match self.service_waypoint(service) {
            WaypointBinding::Bound(waypoint) => Ok(waypoint.to_string()),
            WaypointBinding::None => Err((
                BoundReason::NoWaypoint,
                format!(
                    "{kind} {namespace}/{name} has no waypoint (istio.io/use-waypoint): \
                     nothing enforces this policy for it"
                ),
            )),
            WaypointBinding::Unavailable(why) => Err((
                BoundReason::of(why),
                format!("{kind} {namespace}/{name}: {why}"),
            )),
        }
    }
}

/// The [`WAYPOINT_ACCEPTED`] of a policy of a waypoint's kind without `targetRefs`: `message`
/// says what does not happen.
fn no_target_refs(message: &str) -> BoundCondition {
    BoundCondition {
        condition_type: WAYPOINT_ACCEPTED,
        ok: false,
        reason: BoundReason::NoTargetRefs,
        message: format!(
            "{message}; target a waypoint Gateway, a Service it serves or (from the root \
             namespace) the istio-waypoint GatewayClass"
        ),
    }
}

/// A node agents' `policy`'s [`ZTUNNEL_ACCEPTED`]: enforced as written, or how its rules with
/// HTTP fields are narrowed.
fn agents_condition(policy: &AuthzPolicy) -> BoundCondition {
    if policy.unenforced_by_agents.is_empty() {
        return BoundCondition {
            condition_type: ZTUNNEL_ACCEPTED,
            ok: true,
            reason: BoundReason::PolicyAccepted,
            message: "enforced by the node agents".to_owned(),
        };
    }
    BoundCondition {
        condition_type: ZTUNNEL_ACCEPTED,
        ok: false,
        reason: BoundReason::UnsupportedValue,
        message: format!(
            "{}; HTTP fields are enforced by a waypoint, for a policy with targetRefs",
            policy.unenforced_by_agents.join("; ")
        ),
    }
}

/// The condition of a policy whose current version `about` is not applied for `message`, in
/// place of the condition of its version in force (taken out of `conditions`), if any: of that
/// condition's type, else of the type the version would have (an `EnvoyFilter` without
/// `targetRefs` is for sidecars: none). `None` for other kinds.
fn not_applied(
    about: &ErrorObject,
    message: &str,
    conditions: &mut BTreeMap<BoundObject, BoundCondition>,
) -> Option<(BoundObject, BoundCondition)> {
    let ReadPart::Policy { targeted } = about.read else {
        return None;
    };
    let kind = match about.object.kind {
        Kind::AuthorizationPolicy => BoundKind::AuthorizationPolicy,
        Kind::RequestAuthentication => BoundKind::RequestAuthentication,
        Kind::EnvoyFilter => BoundKind::EnvoyFilter,
        _ => return None,
    };
    let namespace = about.object.namespace.as_deref().unwrap_or_default();
    let object = BoundObject::new(kind, namespace, &about.object.name);
    let (condition_type, message) = if let Some(before) = conditions.remove(&object) {
        let message = format!("not applied: {message}; its last good version stays in force");
        (before.condition_type, message)
    } else {
        let condition_type = match (kind, targeted) {
            (BoundKind::EnvoyFilter, false) => return None,
            (BoundKind::AuthorizationPolicy, false) => ZTUNNEL_ACCEPTED,
            _ => WAYPOINT_ACCEPTED,
        };
        (condition_type, format!("not applied: {message}"))
    };
    let condition = BoundCondition {
        condition_type,
        ok: false,
        reason: BoundReason::UnsupportedValue,
        message,
    };
    Some((object, condition))
}
