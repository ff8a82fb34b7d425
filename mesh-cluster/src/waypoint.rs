//! Waypoints, as Istio ambient attaches them: which Services (and pods) send their traffic
//! through which waypoint, and where a waypoint's pods are.
//!
//! - A **waypoint** is a Gateway API `Gateway` of class [`WAYPOINT_CLASS`]. Its label
//!   [`WAYPOINT_FOR`] says which traffic it takes: `service` (the default), `workload`, `all` or
//!   `none`. Its pods are the pods of its namespace labelled [`GATEWAY_NAME_LABEL`]` = <name>` (as
//!   the controller's Deployment labels them); the ready ones with an address serve it, each on
//!   port 15008 (HBONE) under its own identity.
//! - A **Service** uses a waypoint when its label [`USE_WAYPOINT`] names one, or else its
//!   Namespace's; the value `none` on the Service opts it out of its namespace's. The waypoint is
//!   in the labelled object's namespace unless [`USE_WAYPOINT_NAMESPACE`] (on the same object)
//!   names another. A Service binds only to a waypoint for `service` or `all` traffic.
//! - A **pod** binds the same way (the pod's labels, then its namespace's) to a waypoint for
//!   `workload` or `all` traffic; that binding is for traffic addressed to the pod itself.
//! - A waypoint's own pods never use a waypoint.
//!
//! **An unready waypoint fails closed.** A binding to a waypoint that does not exist, does not
//! take that kind of traffic, or has no ready pod is [`WaypointBinding::Unavailable`]: the source
//! agent refuses the connection rather than send it past the waypoint. Istio bypasses an unready
//! waypoint silently, and with it every L7 policy and route the waypoint enforces; its users
//! report exactly that as a hole (REFERENCE.md). A refused connection is visible (a metric, a log
//! line naming the reason) and heals when the waypoint is ready; a bypass is neither.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    error::StateError,
    k8s::Gateway,
    meta::{Kind, Labels, MetaExt, ObjectRef},
    model::Workload,
};

pub use crate::model::{
    service_account_waypoint, Attachment, Unavailable, Waypoint, WaypointBinding, WaypointFor,
    FOR_SERVICE_ACCOUNT, GATEWAY_NAME_LABEL, PER_SERVICE_ACCOUNT, USE_WAYPOINT,
    USE_WAYPOINT_NAMESPACE, WAYPOINT_CLASS, WAYPOINT_FOR, WAYPOINT_MODE, XFCC_CLIENT_IDENTITY,
};

/// Whether the waypoint `Gateway` of `meta` asks for the client's identity in
/// `x-forwarded-client-cert` ([`XFCC_CLIENT_IDENTITY`]): `true` or `false` in any case, as
/// Istio reads it; any other value is warned about and read as `false`.
fn xfcc_client_identity(meta: &crate::meta::ObjectMeta, warnings: &mut Vec<String>) -> bool {
    let Some(value) = meta.annotations().get(XFCC_CLIENT_IDENTITY) else {
        return false;
    };
    if value.eq_ignore_ascii_case("true") {
        return true;
    }
    if !value.eq_ignore_ascii_case("false") {
        warnings.push(format!(
            "{}: metadata.annotations[{XFCC_CLIENT_IDENTITY}]: {value:?} is not true or false; \
             read as false",
            ObjectRef::namespaced(Kind::Gateway, meta)
        ));
    }
    false
}

/// Which namespaces may use the waypoint of `gateway` (`object`): its HBONE listener's (port
/// 15008) `allowedRoutes.namespaces`, as Istio reads them; `Same` without one. A value that
/// cannot be read is warned about and read as `Same`, the narrowest.
fn attachment(object: &ObjectRef, gateway: &Gateway, warnings: &mut Vec<String>) -> Attachment {
    let Some((index, listener)) = gateway
        .spec
        .listeners
        .iter()
        .enumerate()
        .find(|(_, l)| l.protocol == "HBONE" && l.port == i64::from(mesh_common::HBONE_PORT))
    else {
        return Attachment::SameNamespace;
    };
    let Some(namespaces) = listener
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref())
    else {
        return Attachment::SameNamespace;
    };
    let field = format!("spec.listeners[{index}].allowedRoutes.namespaces");
    match namespaces.from.as_deref() {
        None | Some("Same") => Attachment::SameNamespace,
        Some("All") => Attachment::AllNamespaces,
        Some("Selector") => {
            let selector = namespaces.selector.clone().unwrap_or_default();
            match crate::label_selector::LabelSelector::parse(&selector) {
                Ok(selector) => Attachment::Selector(selector),
                Err(e) => {
                    warnings.push(format!(
                        "{object}: {field}.selector: {e}; only its own namespace may use it"
                    ));
                    Attachment::SameNamespace
                }
            }
        }
        Some(other) => {
            warnings.push(format!(
                "{object}: {field}.from: {other:?} is not Same, All or Selector; only its own \
                 namespace may use it"
            ));
            Attachment::SameNamespace
        }
    }
}

/// What kind of object a binding is for.
#[derive(Clone, Copy)]
pub(crate) enum BoundKind {
    Service,
    Workload,
}

/// The waypoints, by namespace and name, and by the service account they serve.
#[derive(Debug, Default)]
pub(crate) struct WaypointIndex {
    /// By namespace, then name: sorted, and looked up by `&str`s without an allocation (a
    /// waypoint looks up its own `Gateway`'s settings per request).
    waypoints: BTreeMap<String, BTreeMap<String, Arc<Waypoint>>>,
    /// Per-service-account waypoints ([`FOR_SERVICE_ACCOUNT`]), by namespace and account.
    accounts: HashMap<(String, String), Arc<Waypoint>>,
    warnings: Vec<String>,
}

/// The traffic waypoint `Gateway` `object` takes by its [`WAYPOINT_FOR`] label (`label`;
/// `service` when absent), or why the model refuses the `Gateway` for it: the one check of the
/// label, for the model and for the controller that tells the `Gateway` so in its status.
pub fn waypoint_traffic(
    object: &ObjectRef,
    label: Option<&str>,
) -> Result<WaypointFor, StateError> {
    let Some(value) = label else {
        return Ok(WaypointFor::Service);
    };
    WaypointFor::parse(value).ok_or_else(|| StateError::InvalidLabel {
        object: object.clone(),
        label: WAYPOINT_FOR,
        value: value.to_owned(),
        expected: "service, workload, all or none",
    })
}

impl WaypointIndex {
    /// The waypoints among `gateways` (sorted by namespace and name), with their ready pods
    /// among `workloads`.
    pub(crate) fn build<'a>(
        gateways: impl IntoIterator<Item = &'a Gateway> + Clone,
        workloads: &[Arc<Workload>],
    ) -> Result<Self, StateError> {
        let mut waypoints: BTreeMap<String, BTreeMap<String, Arc<Waypoint>>> = BTreeMap::new();
        let mut warnings = Vec::new();
        let gateways_for_accounts = gateways.clone().into_iter();
        for gateway in gateways {
            if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
                continue;
            }
            let meta = &gateway.metadata;
            let traffic = waypoint_traffic(
                &ObjectRef::namespaced(Kind::Gateway, meta),
                meta.labels().get(WAYPOINT_FOR).map(String::as_str),
            )?;
            let (namespace, name) = (meta.namespace().to_owned(), meta.name().to_owned());
            let labelled = workloads.iter().filter(|w| {
                w.namespace == namespace && w.labels.get(GATEWAY_NAME_LABEL) == Some(&name)
            });
            let (mut pods, mut members) = (Vec::new(), Vec::new());
            for pod in labelled {
                // A waypoint runs under its own service account, named after its Gateway (as
                // istiod and the controller create it): a pod merely labelled is not it.
                if pod.service_account != name {
                    warnings.push(format!(
                        "Pod {pod}: labelled {GATEWAY_NAME_LABEL}={name} but runs as service \
                         account {:?}, not {name:?}; it is not a pod of waypoint \
                         {namespace}/{name}",
                        pod.service_account
                    ));
                    continue;
                }
                if pod.ips.is_empty() {
                    continue;
                }
                members.push(Arc::clone(pod));
                if pod.readiness.serving() {
                    pods.push(Arc::clone(pod));
                }
            }
            let pods = crate::model::not_terminating_first(pods, |p| p);
            let mut waypoint = Waypoint::new(namespace.clone(), name.clone(), traffic, pods);
            waypoint.members = members;
            waypoint.xfcc_client_identity = xfcc_client_identity(meta, &mut warnings);
            let object = ObjectRef::namespaced(Kind::Gateway, meta);
            waypoint.traffic_distribution =
                crate::translate::traffic_distribution(&object, None, meta, &mut warnings);
            waypoint.attachment = attachment(&object, gateway, &mut warnings);
            waypoints
                .entry(namespace)
                .or_default()
                .insert(name, Arc::new(waypoint));
        }
        // Per-service-account waypoints, in name order: a second one for an account is reported
        // and ignored.
        let mut accounts: HashMap<(String, String), Arc<Waypoint>> = HashMap::new();
        for gateway in gateways_for_accounts {
            let meta = &gateway.metadata;
            let Some(account) = meta.labels().get(FOR_SERVICE_ACCOUNT) else {
                continue;
            };
            let namespace = meta.namespace();
            let Some(waypoint) = waypoints.get(namespace).and_then(|w| w.get(meta.name())) else {
                continue;
            };
            let slot = (namespace.to_owned(), account.clone());
            if let Some(first) = accounts.get(&slot) {
                warnings.push(format!(
                    "waypoint {waypoint} is also for service account {}/{account}, which \
                     waypoint {first} serves; ignored",
                    slot.0
                ));
                continue;
            }
            accounts.insert(slot, Arc::clone(waypoint));
        }
        Ok(Self {
            waypoints,
            accounts,
            warnings,
        })
    }

    /// Pods labelled as a waypoint's that are not its, one line each.
    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// All waypoints, sorted by namespace and name.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<Waypoint>> {
        self.waypoints.values().flat_map(BTreeMap::values)
    }

    /// The waypoint of `Gateway` `namespace/name`, if it is one.
    pub(crate) fn named(&self, namespace: &str, name: &str) -> Option<&Arc<Waypoint>> {
        self.waypoints.get(namespace)?.get(name)
    }

    /// The waypoint whose pod `workload` is, if any.
    pub(crate) fn of_pod(&self, workload: &Workload) -> Option<&Arc<Waypoint>> {
        let name = workload.labels.get(GATEWAY_NAME_LABEL)?;
        self.named(&workload.namespace, name)
            .filter(|w| w.has_pod(workload))
    }

    /// The binding of an object in `namespace` with `labels`, whose Namespace has `ns_labels`,
    /// serving `account` (a pod's service account, or the one every pod of a Service runs
    /// under): its own [`USE_WAYPOINT`] label, else the account's waypoint
    /// ([`FOR_SERVICE_ACCOUNT`]), else its namespace's label.
    pub(crate) fn bind(
        &self,
        kind: BoundKind,
        (namespace, account): (&str, Option<&str>),
        labels: &Labels,
        ns_labels: Option<&Labels>,
    ) -> WaypointBinding {
        let from = if labels.contains_key(USE_WAYPOINT) {
            labels
        } else if let Some(waypoint) =
            account.and_then(|a| self.accounts.get(&(namespace.to_owned(), a.to_owned())))
        {
            return Self::binding_to(waypoint, kind);
        } else {
            match ns_labels {
                Some(ns) if ns.contains_key(USE_WAYPOINT) => ns,
                _ => return WaypointBinding::None,
            }
        };
        let name = &from[USE_WAYPOINT];
        if name == "none" || name.is_empty() {
            return WaypointBinding::None;
        }
        let waypoint_ns = from
            .get(USE_WAYPOINT_NAMESPACE)
            .map_or(namespace, String::as_str);
        let Some(waypoint) = self.named(waypoint_ns, name) else {
            return WaypointBinding::Unavailable(Unavailable::NotFound {
                namespace: waypoint_ns.to_owned(),
                name: name.clone(),
            });
        };
        let unlabelled = Labels::new();
        if !waypoint.attachment.admits(
            &waypoint.namespace,
            namespace,
            ns_labels.unwrap_or(&unlabelled),
        ) {
            return WaypointBinding::Unavailable(Unavailable::AttachmentDenied {
                waypoint: waypoint.to_string(),
                namespace: namespace.to_owned(),
            });
        }
        Self::binding_to(waypoint, kind)
    }

    /// A binding of `kind` to `waypoint`: unavailable when it does not take that traffic or has
    /// no ready pod.
    fn binding_to(waypoint: &Arc<Waypoint>, kind: BoundKind) -> WaypointBinding {
        let takes = match kind {
            BoundKind::Service => waypoint.traffic.services(),
            BoundKind::Workload => waypoint.traffic.workloads(),
        };
        if !takes {
            return WaypointBinding::Unavailable(Unavailable::WrongTraffic {
                waypoint: waypoint.to_string(),
                traffic: waypoint.traffic,
            });
        }
        if waypoint.workloads.is_empty() {
            return WaypointBinding::Unavailable(Unavailable::NotReady {
                waypoint: waypoint.to_string(),
            });
        }
        WaypointBinding::Bound(Arc::clone(waypoint))
    }
}

/// The one service account the pods of each Service run under, when they share one: its
/// selector's pods, ready or not (or, without selector, its endpoints'), by namespace and name.
/// A Service whose pods run under several accounts, or that has none, is not listed.
pub(crate) fn service_accounts(
    services: &[Arc<crate::model::Service>],
    workloads: &[Arc<Workload>],
) -> HashMap<(String, String), String> {
    let mut accounts = HashMap::new();
    for service in services {
        let mut found: Option<&str> = None;
        let mut shared = true;
        for workload in serving(service, workloads) {
            match found {
                None => found = Some(&workload.service_account),
                Some(account) if account == workload.service_account => {}
                Some(_) => shared = false,
            }
        }
        if let (Some(account), true) = (found, shared) {
            let key = (service.namespace.clone(), service.name.clone());
            accounts.insert(key, account.to_owned());
        }
    }
    accounts
}

/// The pods that serve `service`: those its selector picks in its namespace, ready or not, and
/// its endpoints' of its namespace (a Service without selector has only those). An endpoint
/// address of another namespace's pod (an `EndpointSlice` or a `ServiceEntry` may name any
/// address) does not make that pod the Service's: a tenant binding such a Service to a waypoint
/// would otherwise have the other tenant's pod refuse every connection that skipped it.
pub(crate) fn serving<'a>(
    service: &'a crate::model::Service,
    workloads: &'a [Arc<Workload>],
) -> impl Iterator<Item = &'a Arc<Workload>> {
    let selected = workloads.iter().filter(move |w| {
        !service.selector.is_empty()
            && w.namespace == service.namespace
            && service
                .selector
                .iter()
                .all(|(key, value)| w.labels.get(key) == Some(value))
    });
    let endpoints = service
        .ports
        .iter()
        .flat_map(|p| &p.endpoints)
        .filter_map(|e| e.workload.as_ref())
        .filter(move |w| w.namespace == service.namespace);
    selected.chain(endpoints)
}

/// Bindings of Services and pods, by namespace and name.
#[derive(Debug, Default)]
pub(crate) struct Bindings {
    pub(crate) services: HashMap<(String, String), WaypointBinding>,
    pub(crate) workloads: HashMap<(String, String), WaypointBinding>,
    /// The pods behind a waypoint (bound themselves, or endpoints of a bound Service), with the
    /// waypoints their traffic must come through (empty when every one is unavailable).
    pub(crate) guards: HashMap<(String, String), Vec<Arc<Waypoint>>>,
}

/// Whether a connection to a pod came through a waypoint in front of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// No waypoint is in front of the pod.
    Open,
    /// The source is a pod of a waypoint in front of the pod.
    ThroughWaypoint,
    /// A waypoint is in front of the pod and the source is none of its pods: `namespace/name`
    /// of the waypoints (or of the Service bound to an unavailable one).
    Bypassed(String),
}

impl Bindings {
    /// The binding of every Service (namespace, name, labels, the one service account its pods
    /// run under if they share one) and of every pod but the waypoints' own; `ns_labels` gives
    /// a namespace's labels.
    pub(crate) fn build<'a>(
        index: &WaypointIndex,
        ns_labels: impl Fn(&str) -> Option<&'a Labels>,
        services: impl Iterator<Item = (&'a str, &'a str, &'a Labels, Option<&'a str>)>,
        workloads: &[Arc<Workload>],
    ) -> Self {
        let mut bindings = Self::default();
        for (namespace, name, labels, account) in services {
            let binding = index.bind(
                BoundKind::Service,
                (namespace, account),
                labels,
                ns_labels(namespace),
            );
            let key = (namespace.to_owned(), name.to_owned());
            bindings.services.insert(key, binding);
        }
        for workload in workloads {
            if index.of_pod(workload).is_some() {
                continue;
            }
            let namespace = workload.namespace.as_str();
            let binding = index.bind(
                BoundKind::Workload,
                (namespace, Some(workload.service_account.as_str())),
                &workload.labels,
                ns_labels(namespace),
            );
            let key = (workload.namespace.clone(), workload.name.clone());
            if !matches!(binding, WaypointBinding::None) {
                bindings.guard(workload, &binding);
            }
            bindings.workloads.insert(key, binding);
        }
        bindings
    }

    /// Marks every pod a bound Service of `services` serves as behind its waypoint: the pods
    /// its selector picks, ready or not (a pod that fails its probes is still the Service's, and
    /// must not become reachable past the waypoint while it is out of the endpoints), and its
    /// endpoints (a Service without selector, from its `EndpointSlices`). The waypoint's own
    /// pods are never behind it.
    pub(crate) fn guard_endpoints(
        &mut self,
        services: &[Arc<crate::model::Service>],
        workloads: &[Arc<Workload>],
        index: &WaypointIndex,
    ) {
        for service in services {
            let key = (service.namespace.clone(), service.name.clone());
            let Some(binding) = self.services.get(&key).cloned() else {
                continue;
            };
            if matches!(binding, WaypointBinding::None) {
                continue;
            }
            for workload in serving(service, workloads) {
                if index.of_pod(workload).is_none() {
                    self.guard(workload, &binding);
                }
            }
        }
    }

    fn guard(&mut self, workload: &Workload, binding: &WaypointBinding) {
        let key = (workload.namespace.clone(), workload.name.clone());
        let waypoints = self.guards.entry(key).or_default();
        if let WaypointBinding::Bound(waypoint) = binding {
            if !waypoints.iter().any(|w| Arc::ptr_eq(w, waypoint)) {
                waypoints.push(Arc::clone(waypoint));
            }
        }
    }

    /// Whether a connection from `src_ip` with proven identity `src` to `dst` came through a
    /// waypoint in front of `dst`: from the address of one of its pods, proving that pod's
    /// identity (another pod under the waypoint's service account is not the waypoint).
    pub(crate) fn check(
        &self,
        dst: &Workload,
        src_ip: IpAddr,
        src: Option<&mesh_identity::Identity>,
    ) -> Guard {
        let key = (dst.namespace.clone(), dst.name.clone());
        let Some(waypoints) = self.guards.get(&key) else {
            return Guard::Open;
        };
        // Any of its pods, ready or not: one being deleted (or failing its probe) takes no new
        // connections but finishes those it has.
        let through = src.is_some_and(|src| {
            waypoints
                .iter()
                .flat_map(|w| &w.members)
                .any(|pod| &pod.identity == src && pod.ips.contains(&src_ip))
        });
        if through {
            return Guard::ThroughWaypoint;
        }
        let names: Vec<String> = waypoints.iter().map(ToString::to_string).collect();
        Guard::Bypassed(if names.is_empty() {
            "an unavailable waypoint".to_owned()
        } else {
            names.join(", ")
        })
    }
}

#[cfg(test)]
mod tests;
