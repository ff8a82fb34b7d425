//! What a waypoint's policy (`AuthorizationPolicy`, `RequestAuthentication` with
//! `targetRef`/`targetRefs`) applies to, and the policies of each target, indexed.
//!
//! **Targets** (each in the policy's namespace; a `namespace` other than it is refused, as
//! Istio refuses it):
//! - `Gateway` (`gateway.networking.k8s.io`): everything through that waypoint;
//! - `Service` (core): what is addressed to that Service, at whichever waypoint serves it (and,
//!   stricter than Istio, what a workload waypoint takes to a pod of the Service's namespace
//!   that it serves: see [`crate::ClusterState::authorize_at_waypoint`]);
//! - `ServiceEntry` (`networking.istio.io`): what is addressed to that entry, at its waypoint
//!   (Istio's egress waypoint policies);
//! - `GatewayClass` `istio-waypoint` (`gateway.networking.k8s.io`), only from the root
//!   namespace: every waypoint.
//!
//! Any other target (another kind, another class) applies to nothing, with a warning.

use std::collections::HashMap;

use serde::Serialize;

use crate::k8s::PolicyTargetRef;

/// The class of the waypoints' `Gateway`s.
pub(crate) const WAYPOINT_CLASS: &str = "istio-waypoint";

/// Gateway API's group.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// What a waypoint's policy applies to (in the policy's namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "name")]
pub enum PolicyTarget {
    /// A waypoint `Gateway`: everything through it.
    Gateway(String),
    /// `GatewayClass` `istio-waypoint`, from the root namespace: every waypoint.
    GatewayClass(String),
    /// A `Service`: what is addressed to it, at its waypoint.
    Service(String),
    /// A `ServiceEntry`: what is addressed to it, at its waypoint.
    ServiceEntry(String),
}

impl PolicyTarget {
    /// The Service or `ServiceEntry` it names: the name, and whether it is an entry.
    pub(crate) fn addressed_name(&self) -> Option<(&str, bool)> {
        match self {
            PolicyTarget::Service(name) => Some((name, false)),
            PolicyTarget::ServiceEntry(name) => Some((name, true)),
            PolicyTarget::Gateway(_) | PolicyTarget::GatewayClass(_) => None,
        }
    }
}

/// What a request is addressed to, as policies target it: a `Service` or a `ServiceEntry`
/// (namespace, name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Addressed<'a> {
    Service(&'a str, &'a str),
    Entry(&'a str, &'a str),
}

impl<'a> Addressed<'a> {
    /// What a request for `service` is addressed to.
    pub(crate) fn of(service: &'a crate::model::Service) -> Self {
        match service.kind {
            crate::model::ServiceKind::Kubernetes => {
                Addressed::Service(&service.namespace, &service.name)
            }
            crate::model::ServiceKind::Entry(_) => {
                Addressed::Entry(&service.namespace, &service.name)
            }
        }
    }
}

/// The targets of policy `what` (`AuthorizationPolicy shop/web`) in `namespace`, and a warning
/// for each that applies to nothing.
pub(crate) fn targets(
    what: &str,
    (namespace, root_namespace): (&str, &str),
    refs: &[PolicyTargetRef],
    warnings: &mut Vec<String>,
) -> Vec<PolicyTarget> {
    let mut targets = Vec::new();
    for (index, target) in refs.iter().enumerate() {
        let group = target.group.as_str();
        let found = match target.kind.as_str() {
            _ if !target.namespace.is_empty() && target.namespace != namespace => {
                Err("a policy can only target objects of its own namespace (Istio refuses others)")
            }
            "Gateway" if group == GATEWAY_GROUP => Ok(PolicyTarget::Gateway(target.name.clone())),
            "Service" if group.is_empty() || group == "core" => {
                Ok(PolicyTarget::Service(target.name.clone()))
            }
            "GatewayClass" if group == GATEWAY_GROUP && target.name == WAYPOINT_CLASS => {
                if namespace == root_namespace {
                    Ok(PolicyTarget::GatewayClass(target.name.clone()))
                } else {
                    Err("only a policy of the root namespace may target the waypoints' class")
                }
            }
            "GatewayClass" if group == GATEWAY_GROUP => {
                Err("only the waypoints' class, `istio-waypoint`, has waypoints")
            }
            "ServiceEntry" if group == crate::model::ISTIO_NETWORKING_GROUP => {
                Ok(PolicyTarget::ServiceEntry(target.name.clone()))
            }
            "Gateway" | "GatewayClass" | "Service" | "ServiceEntry" => {
                Err("not of the kind's API group")
            }
            _ => Err(
                "waypoints enforce policies on Gateways, GatewayClasses, Services and \
                 ServiceEntries",
            ),
        };
        match found {
            Ok(target) => targets.push(target),
            Err(why) => warnings.push(format!(
                "{what}: targetRefs[{index}] ({target}, group {group:?}) applies to nothing: {why}"
            )),
        }
    }
    targets
}

/// Something kept per target (a group of policies), found for a waypoint and the Services a
/// request is for.
#[derive(Debug, Default)]
pub(crate) struct ByTarget<T> {
    /// `GatewayClass` `istio-waypoint` (root namespace).
    every: T,
    /// By the `Gateway`'s namespace, then name.
    gateways: HashMap<String, HashMap<String, T>>,
    /// By the `Service`'s namespace, then name.
    services: HashMap<String, HashMap<String, T>>,
    /// By the `ServiceEntry`'s namespace, then name.
    entries: HashMap<String, HashMap<String, T>>,
}

impl<T: Default> ByTarget<T> {
    /// The entry of `target` of a policy in `namespace`, made if new.
    pub(crate) fn entry(&mut self, namespace: &str, target: &PolicyTarget) -> &mut T {
        let (map, name) = match target {
            PolicyTarget::GatewayClass(_) => return &mut self.every,
            PolicyTarget::Gateway(name) => (&mut self.gateways, name),
            PolicyTarget::Service(name) => (&mut self.services, name),
            PolicyTarget::ServiceEntry(name) => (&mut self.entries, name),
        };
        map.entry(namespace.to_owned())
            .or_default()
            .entry(name.clone())
            .or_default()
    }

    /// The entries that apply to `waypoint` and to `services` (each `(namespace, name)`): the
    /// class's, the waypoint's, then each Service's.
    pub(crate) fn applying<'s, 'q>(
        &'s self,
        waypoint: (&'q str, &'q str),
        services: &'q [Addressed<'q>],
    ) -> impl Iterator<Item = &'s T> + Clone + use<'s, 'q, T> {
        std::iter::once(&self.every)
            .chain(lookup(&self.gateways, waypoint))
            .chain(services.iter().filter_map(|&s| match s {
                Addressed::Service(namespace, name) => lookup(&self.services, (namespace, name)),
                Addressed::Entry(namespace, name) => lookup(&self.entries, (namespace, name)),
            }))
    }
}

fn lookup<'m, T>(
    map: &'m HashMap<String, HashMap<String, T>>,
    (namespace, name): (&str, &str),
) -> Option<&'m T> {
    map.get(namespace).and_then(|names| names.get(name))
}
