//! What a Service or `ServiceEntry` that asks for a waypoint is told in its status: Istio's
//! condition [`WAYPOINT_BOUND`], `True` when its traffic goes through the waypoint, else `False`
//! with the reason the source agents refuse its connections (an unavailable waypoint fails
//! closed, [`crate::waypoint`]). Users see there why a label took no effect, as Istio's do, without
//! reading an agent's log. Objects that ask for no waypoint get no condition.

use std::collections::BTreeMap;

use crate::{
    model::{Unavailable, WaypointBinding},
    state::ClusterState,
};

/// The condition's type, Istio's.
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";

/// Which object the condition is written on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BoundKind {
    /// A core `Service`.
    Service,
    /// An Istio `ServiceEntry`.
    ServiceEntry,
}

/// An object that asks for a waypoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BoundObject {
    pub kind: BoundKind,
    pub namespace: String,
    pub name: String,
}

/// Why the condition has its status (the condition's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundReason {
    /// Its traffic goes through the waypoint.
    Accepted,
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
            BoundReason::NotFound => "WaypointNotFound",
            BoundReason::UnsupportedTraffic => "WaypointUnsupportedTraffic",
            BoundReason::NotReady => "WaypointNotReady",
            BoundReason::AttachmentDenied => "WaypointAttachmentDenied",
        }
    }
}

/// The condition of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundCondition {
    /// Whether its traffic goes through the waypoint (`status`).
    pub bound: bool,
    pub reason: BoundReason,
    /// For people: the waypoint, or why it cannot take the traffic.
    pub message: String,
}

impl WaypointBinding {
    /// The [`WAYPOINT_BOUND`] condition this binding gives its object; none when it asks for
    /// no waypoint.
    #[must_use]
    pub fn condition(&self) -> Option<BoundCondition> {
        let (bound, reason, message) = match self {
            WaypointBinding::None => return None,
            WaypointBinding::Bound(waypoint) => {
                (true, BoundReason::Accepted, format!("bound to {waypoint}"))
            }
            WaypointBinding::Unavailable(why) => {
                let reason = match why {
                    Unavailable::NotFound { .. } => BoundReason::NotFound,
                    Unavailable::WrongTraffic { .. } => BoundReason::UnsupportedTraffic,
                    Unavailable::NotReady { .. } => BoundReason::NotReady,
                    Unavailable::AttachmentDenied { .. } => BoundReason::AttachmentDenied,
                };
                let message = format!("{why}: its connections are refused until it is");
                (false, reason, message)
            }
        };
        Some(BoundCondition {
            bound,
            reason,
            message,
        })
    }
}

impl ClusterState {
    /// The [`WAYPOINT_BOUND`] condition of every Service and `ServiceEntry` that asks for a
    /// waypoint.
    #[must_use]
    pub fn bound_conditions(&self) -> BTreeMap<BoundObject, BoundCondition> {
        self.services()
            .iter()
            .filter_map(|service| {
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
            })
            .collect()
    }
}
