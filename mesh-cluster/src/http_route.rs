//! How a waypoint routes an HTTP request for a Service: the `HTTPRoute`s attached to the Service
//! (GAMMA: a `parentRef` of kind `Service`), indexed per Service port when the state is built, and
//! the decision per request ([`HttpRouteIndex::decide`]).
//!
//! Attachment:
//! - a `parentRef` `{group: "", kind: Service, name, namespace?}` attaches the route to every TCP
//!   port of that Service, or to the one its `port` or `sectionName` (the port's name) picks;
//! - a route in the Service's own namespace is a **producer** route and applies to every client;
//!   a route in another namespace is a **consumer** route and applies only to clients in the
//!   route's namespace, where it replaces the producer routes (GAMMA);
//! - `hostnames` are ignored for Service parents (GEP-1426); Gateway parents are not a
//!   waypoint's and are skipped;
//! - a parent Service that does not exist, or a port it does not have, attaches nothing and is
//!   reported as a warning (Gateway API's `Accepted: False`), as is a route without a Service
//!   parent.
//!
//! Per request, among the matches of every rule of every applicable route, the one with the
//! highest precedence wins (Gateway API's order): an `Exact` path; the longest `PathPrefix`; a
//! `RegularExpression` path (implementation-specific: here after every prefix); a method; the
//! most header matches; the most query parameter matches; then the oldest route
//! (`creationTimestamp`), the route first by `namespace/name`, and the first rule and match in
//! list order. When routes attach to the port and none matches, the answer is 404; when none
//! attaches, the request goes to the Service itself ([`RouteDecision::Default`]).
//!
//! Backends are Services of the route's namespace, or the parent Service itself (a consumer
//! route sending its namespace's requests on to the Service they were for: GEP-1294, which lets
//! mesh routes reach other namespaces without a `ReferenceGrant` where that widens no one's
//! reach). Any other Service of another namespace needs a `ReferenceGrant` of that namespace
//! (for the route's kind and namespace, all Services or that one; [`crate::reference_grant`]):
//! the waypoint would reach it under the waypoint's own identity, which its policies may allow
//! where they refuse the route's clients. A backend that does not exist, another kind, or
//! another namespace without a grant is kept as
//! [`Backend::Invalid`], so that its share of the requests gets a 500 as Gateway API requires,
//! and is reported as a warning. A rule without backends of non-zero weight answers 500.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{
    gateway_api::{
        BackendTarget, Filter, HttpRouteSpec, ParentRef, PathMatch, Retry, RouteMatch, Timeouts,
    },
    meta::{Kind, MetaExt, ObjectMeta, ObjectRef},
    model::Service,
    reference_grant::ServiceGrants,
};

/// What a request is matched on.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// Method.
    pub method: &'a http::Method,
    /// Path, without the query.
    pub path: &'a str,
    /// Query, without the `?`.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a http::HeaderMap,
    /// `:authority` (HTTP/2), else `Host`.
    pub authority: Option<&'a str>,
    /// `:scheme`: `http` unless the request says otherwise.
    pub scheme: &'a str,
}

/// A route as the waypoint applies it: its rules with their backends resolved.
#[derive(Debug)]
pub struct AttachedRoute {
    /// The `HTTPRoute`.
    pub object: ObjectRef,
    /// Its rules, in order.
    pub rules: Vec<ResolvedRule>,
}

/// A rule with its backends resolved.
#[derive(Debug)]
pub struct ResolvedRule {
    /// `name`.
    pub name: Option<String>,
    /// `matches` (a default `PathPrefix /` when none was written).
    pub matches: Vec<RouteMatch>,
    /// `filters`, in order; the mirrors' backends are in [`ResolvedRule::mirrors`].
    pub filters: Vec<Filter>,
    /// `backendRefs` with a weight above zero.
    pub backends: Vec<ResolvedBackend>,
    /// The mirrors' backends, in the order of their filters.
    pub mirrors: Vec<Backend>,
    /// `timeouts`.
    pub timeouts: Timeouts,
    /// `retry`.
    pub retry: Option<Retry>,
    /// A `VirtualService`'s `fault`: delays and aborts the waypoint injects.
    pub fault: Option<crate::istio_traffic::Fault>,
    /// A `VirtualService`'s `directResponse`: answered by the waypoint after the filters and
    /// faults, sent nowhere.
    pub direct_response: Option<crate::istio_traffic::DirectResponse>,
    /// Sum of the backends' weights.
    total_weight: u64,
}

impl ResolvedRule {
    /// The backend for a request, by weight: `roll` is a random number, any `u64`. `None` when
    /// the rule has no backend of non-zero weight (Gateway API: a 500).
    pub fn pick_backend(&self, roll: u64) -> Option<&ResolvedBackend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut point = roll % self.total_weight;
        for backend in &self.backends {
            let weight = u64::from(backend.weight);
            if point < weight {
                return Some(backend);
            }
            point -= weight;
        }
        None
    }
}

/// A weighted backend of a rule.
#[derive(Debug)]
pub struct ResolvedBackend {
    /// Where its requests go.
    pub backend: Backend,
    /// Its share.
    pub weight: u32,
    /// Filters for its requests only.
    pub filters: Vec<Filter>,
}

/// Where a backend's requests go.
#[derive(Clone, Debug)]
pub enum Backend {
    /// A port of a Service.
    Service {
        /// The Service.
        service: Arc<Service>,
        /// The Service's port.
        port: u16,
        /// Which of its endpoints, and how one is picked (`DestinationRule`).
        policy: Arc<EndpointPolicy>,
    },
    /// A reference that does not resolve: its requests get a 500.
    Invalid(InvalidBackend),
}

/// Which endpoints of a Service a backend uses and how the waypoint picks one: a
/// `DestinationRule` subset's labels and load balancer (the rule's, or the subset's own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// The subset's name, if a subset was asked for.
    pub subset: Option<String>,
    /// The labels every endpoint's pod has (empty: all endpoints).
    pub labels: crate::meta::Labels,
    /// How an endpoint is picked.
    pub load_balancer: crate::istio_traffic::LoadBalancer,
    /// By locality too (`localityLbSetting`; on by default with `outlier_detection`, as in
    /// Istio: [`Self::locality`]).
    pub locality_lb: Option<Arc<crate::locality::LocalityLbSetting>>,
    /// Which endpoints are left out for failing (`outlierDetection`).
    pub outlier_detection: Option<crate::istio_traffic::OutlierDetection>,
    /// Limits and settings of the connections and requests (`connectionPool`).
    pub connection_pool: Option<Arc<crate::istio_traffic::ConnectionPool>>,
}

impl EndpointPolicy {
    /// The locality settings the waypoint applies: with `outlierDetection` (which tells which
    /// endpoints to fail over from), the rule's `localityLbSetting`, or the default (prefer
    /// the waypoint's locality) without one; none without `outlierDetection`.
    #[must_use]
    pub fn locality(&self) -> Option<&crate::locality::LocalityLbSetting> {
        static DEFAULT: std::sync::LazyLock<crate::locality::LocalityLbSetting> =
            std::sync::LazyLock::new(crate::locality::LocalityLbSetting::default);
        self.outlier_detection.as_ref()?;
        Some(self.locality_lb.as_deref().unwrap_or(&DEFAULT))
    }

    /// Whether `endpoint` is in the subset.
    pub fn admits(&self, endpoint: &crate::model::Endpoint) -> bool {
        self.labels.is_empty()
            || endpoint
                .workload
                .as_deref()
                .is_some_and(|w| self.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }
}

/// Why a backend reference does not resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidBackend {
    /// Not a core Service.
    Kind { group: String, kind: String },
    /// In another namespace than the route: needs a `ReferenceGrant`.
    CrossNamespace { namespace: String },
    /// No such Service.
    NotFound { namespace: String, name: String },
    /// The Service has no such TCP port.
    NoPort { service: String, port: u16 },
    /// No `DestinationRule` of the Service defines the subset.
    NoSubset { service: String, subset: String },
    /// A `VirtualService` host that names no Service.
    UnknownHost { host: String },
}

impl fmt::Display for InvalidBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidBackend::Kind { group, kind } => {
                write!(
                    f,
                    "kind {kind} (group {group:?}) is not a Service, a ServiceEntry or a Hostname"
                )
            }
            InvalidBackend::CrossNamespace { namespace } => write!(
                f,
                "a backend in namespace {namespace} needs a ReferenceGrant there that lets the \
                 route's kind and namespace refer to it"
            ),
            InvalidBackend::NotFound { namespace, name } => {
                write!(f, "Service {namespace}/{name} does not exist")
            }
            InvalidBackend::NoPort { service, port } => {
                write!(f, "Service {service} has no TCP port {port}")
            }
            InvalidBackend::NoSubset { service, subset } => {
                write!(
                    f,
                    "no DestinationRule of Service {service} defines subset {subset:?}"
                )
            }
            InvalidBackend::UnknownHost { host } => write!(f, "host {host:?} names no Service"),
        }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum RouteDecision<'a> {
    /// No route attaches to the Service port: the request goes to the Service itself.
    Default,
    /// Routes attach to the port, and none matches: 404.
    NoMatch,
    /// A rule matched.
    Matched {
        /// The route.
        route: &'a AttachedRoute,
        /// The rule.
        rule: &'a ResolvedRule,
        /// The match that won.
        matched: &'a RouteMatch,
    },
}

/// One match of one rule, with its precedence.
#[derive(Debug)]
struct Entry {
    key: Precedence,
    route: Arc<AttachedRoute>,
    rule: usize,
    index: usize,
    /// The client namespaces it applies to (a `VirtualService`'s `exportTo`); `None`: all.
    visible: Visibility,
}

/// The client namespaces a rule applies to; `None`: every namespace's.
pub(crate) type Visibility = Option<Arc<std::collections::BTreeSet<String>>>;

/// The rules for a client of `namespace`, in order: those of its own namespace (another than
/// the Service's), in place of the ones for every client exported to it.
fn for_client<'a: 'n, 'n, T>(
    consumers: &'a BTreeMap<String, Vec<T>>,
    everyone: &'a [(T, Visibility)],
    namespace: &'n str,
) -> impl Iterator<Item = &'a T> + 'n {
    let own = consumers.get(namespace);
    let exported = everyone
        .iter()
        .filter(move |(_, visible)| own.is_none() && sees(visible, namespace))
        .map(|(rule, _)| rule);
    own.into_iter().flatten().chain(exported)
}

/// Whether a rule of `visible` applies to a client of `namespace`.
fn sees(visible: &Visibility, namespace: &str) -> bool {
    visible.as_ref().is_none_or(|set| set.contains(namespace))
}

/// Sorts ascending from the highest precedence.
type Precedence = (
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    (bool, Option<Time>),
    String,
    usize,
    usize,
);

/// The routes of one Service port.
#[derive(Debug, Default)]
struct PortRoutes {
    producer: Vec<Entry>,
    consumers: BTreeMap<String, Vec<Entry>>,
    /// `VirtualService` rules, in order (the first match wins); used when no `HTTPRoute`
    /// attaches to the port: those of the Service's namespace and the root namespace, for every
    /// client...
    ordered: Vec<Entry>,
    /// ...and those of other namespaces, each for the clients of its own namespace only, in
    /// place of the others (as GAMMA's consumer routes): a tenant routes its own requests,
    /// never another's.
    ordered_consumers: BTreeMap<String, Vec<Entry>>,
    /// `VirtualService` `tcp` rules for the port, in order, for every client (as far as their
    /// `exportTo` lets them)...
    tcp: Vec<(Arc<ResolvedRule>, Visibility)>,
    /// ...and those of other namespaces, for their own clients, in place of the others.
    tcp_consumers: BTreeMap<String, Vec<Arc<ResolvedRule>>>,
    /// `VirtualService` `tls` rules for the port with their `sniHosts`, in order, for every
    /// client (as far as their `exportTo` lets them)...
    tls: Vec<(TlsRule, Visibility)>,
    /// ...and those of other namespaces, for their own clients, in place of the others.
    tls_consumers: BTreeMap<String, Vec<TlsRule>>,
}

/// A `tls` rule: the server names it takes, and its destinations.
pub(crate) type TlsRule = (Vec<String>, Arc<ResolvedRule>);

/// Every Service port's routes.
#[derive(Debug, Default)]
pub(crate) struct HttpRouteIndex {
    ports: HashMap<(String, String, u16), PortRoutes>,
    /// The Service ports a `TCPRoute` or `TLSRoute` attaches to.
    gateway_l4: std::collections::BTreeSet<(String, String, u16)>,
    policies: istio::Policies,
    /// What each Service `parentRef` of each route came to, for the routes' status.
    parents: Vec<ParentRecord>,
    warnings: Vec<String>,
}

/// What one Service `parentRef` of a route came to ([`crate::route_status`]).
#[derive(Clone, Debug)]
pub(crate) struct ParentRecord {
    /// The route.
    pub(crate) route: ObjectRef,
    /// Its `metadata.generation`.
    pub(crate) generation: Option<i64>,
    /// The `parentRef`, as written.
    pub(crate) parent: ParentRef,
    /// The Service (namespace, name) the route attaches to through it, and the first backend
    /// of its rules that does not resolve for it, if any; or why it attaches to nothing.
    pub(crate) outcome: Result<((String, String), Option<InvalidBackend>), String>,
}

/// The Services by namespace and name.
pub(crate) type Services<'a> = HashMap<(&'a str, &'a str), &'a Arc<Service>>;

impl HttpRouteIndex {
    /// What each Service `parentRef` of each route came to.
    pub(crate) fn parents(&self) -> &[ParentRecord] {
        &self.parents
    }

    /// Records that `parent` of `route` attaches it to `service`, with the first backend of
    /// `rules` that does not resolve.
    pub(super) fn record_attached<'r>(
        &mut self,
        (route, meta, parent): (&ObjectRef, &ObjectMeta, &ParentRef),
        service: &Service,
        rules: impl IntoIterator<Item = &'r ResolvedRule>,
    ) {
        let invalid = rules.into_iter().find_map(|rule| {
            let backends = rule.backends.iter().map(|b| &b.backend);
            backends.chain(&rule.mirrors).find_map(|b| match b {
                Backend::Invalid(problem) => Some(problem.clone()),
                Backend::Service { .. } => None,
            })
        });
        self.parents.push(ParentRecord {
            route: route.clone(),
            generation: meta.generation,
            parent: parent.clone(),
            outcome: Ok(((service.namespace.clone(), service.name.clone()), invalid)),
        });
    }

    /// Every `connectionPool` a `DestinationRule` gives a destination.
    pub(crate) fn connection_pools(
        &self,
    ) -> impl Iterator<Item = &crate::istio_traffic::ConnectionPool> {
        self.policies.connection_pools()
    }

    /// Attaches `routes` (HTTP and gRPC), `l4_routes` (TCP and TLS) and `virtual_services` to
    /// `services` (found by namespace and name), with the subsets and load balancers of
    /// `destination_rules`.
    pub(crate) fn build<'a>(
        (routes, l4_routes): (
            impl IntoIterator<Item = (Kind, &'a ObjectMeta, &'a HttpRouteSpec)>,
            Vec<L4Route<'a>>,
        ),
        (virtual_services, destination_rules): (
            impl IntoIterator<Item = &'a crate::istio_traffic::VirtualService>,
            impl IntoIterator<Item = &'a crate::istio_traffic::DestinationRule>,
        ),
        grants: &ServiceGrants,
        (services, root_namespace): (&Services<'_>, &str),
    ) -> Self {
        let mut index = Self::default();
        index.policies = istio::Policies::build(
            destination_rules,
            (services, root_namespace),
            &mut index.warnings,
        );
        for (kind, meta, spec) in routes {
            index.attach(
                (ObjectRef::namespaced(kind, meta), meta, spec),
                (services, grants),
            );
        }
        index.attach_l4(l4_routes, (services, grants));
        let mut virtual_services: Vec<_> = virtual_services.into_iter().collect();
        virtual_services.sort_by_key(|vs| age_order(&vs.metadata));
        for vs in virtual_services {
            index.attach_virtual_service(vs, services, root_namespace);
        }
        index.warn_l4_on_http(services);
        for port in index.ports.values_mut() {
            port.producer.sort_by(|a, b| a.key.cmp(&b.key));
            for entries in port.consumers.values_mut() {
                entries.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        index
    }

    fn attach(
        &mut self,
        (object, meta, spec): (ObjectRef, &ObjectMeta, &HttpRouteSpec),
        (services, grants): (&Services<'_>, &ServiceGrants),
    ) {
        let namespace = meta.namespace();
        let mut attached_any = false;
        for (index, parent) in spec.parent_refs.iter().enumerate() {
            let Some((service, ports)) =
                self.parent_ports((&object, meta), (index, parent), services)
            else {
                continue;
            };
            attached_any = true;
            // Resolved for each parent: a backend in the parent's namespace may be the parent.
            let mut warnings = Vec::new();
            let rules = spec
                .rules
                .iter()
                .map(|rule| {
                    let context = Resolving {
                        services,
                        policies: &self.policies,
                        grants,
                        parent: service,
                        route: &object,
                    };
                    resolve_rule(rule, &context, &mut warnings)
                })
                .collect();
            for warning in warnings {
                if !self.warnings.contains(&warning) {
                    self.warnings.push(warning);
                }
            }
            let attached = Arc::new(AttachedRoute {
                object: object.clone(),
                rules,
            });
            self.record_attached((&object, meta, parent), service, &attached.rules);
            let consumer = service.namespace != namespace;
            for port in ports {
                let key = (service.namespace.clone(), service.name.clone(), port);
                let routes = self.ports.entry(key).or_default();
                let entries = if consumer {
                    routes.consumers.entry(namespace.to_owned()).or_default()
                } else {
                    &mut routes.producer
                };
                add_entries(entries, &attached, meta);
            }
        }
        if !attached_any && spec.parent_refs.iter().all(|p| !p.is_service()) {
            self.warnings.push(format!(
                "{object}: no parentRef is a Service (group \"\", kind Service) or a \
                 ServiceEntry (group networking.istio.io): a waypoint applies only routes \
                 attached to them"
            ));
        }
    }

    /// The Service a route's `parentRef` (`index`, `parent`) names and the TCP ports of it the
    /// route attaches to (all, or the one its `port` or `sectionName` names); `None`, with a
    /// warning (and, for a Service parent, a record for the route's status), when the parent is
    /// not a Service, does not exist or has no such port.
    fn parent_ports<'s>(
        &mut self,
        (object, meta): (&ObjectRef, &ObjectMeta),
        (index, parent): (usize, &ParentRef),
        services: &Services<'s>,
    ) -> Option<(&'s Arc<Service>, Vec<u16>)> {
        if !parent.is_service() {
            return None;
        }
        let namespace = meta.namespace();
        let field = format!("spec.parentRefs[{index}]");
        let parent_ns = parent.namespace.as_deref().unwrap_or(namespace);
        let not_attached = |index: &mut Self, why: String| {
            index.warnings.push(format!(
                "{object}: {field}: {why}; the route does not attach to it"
            ));
            index.parents.push(ParentRecord {
                route: object.clone(),
                generation: meta.generation,
                parent: parent.clone(),
                outcome: Err(why),
            });
        };
        let Some(&service) = services
            .get(&(parent_ns, parent.name.as_str()))
            .filter(|s| s.is_kind(&parent.group, &parent.kind))
        else {
            let why = format!("{} {parent_ns}/{} does not exist", parent.kind, parent.name);
            not_attached(self, why);
            return None;
        };
        let ports: Vec<u16> = service
            .ports
            .iter()
            .filter(|p| p.protocol == crate::model::Protocol::Tcp)
            .filter(|p| parent.port.is_none_or(|port| p.port == port))
            .filter(|p| {
                parent
                    .section_name
                    .as_ref()
                    .is_none_or(|section| p.name.as_ref() == Some(section))
            })
            .map(|p| p.port)
            .collect();
        if ports.is_empty() {
            let why = format!(
                "{} {service} has no TCP port that `port` or `sectionName` names",
                service.kind_name()
            );
            not_attached(self, why);
            return None;
        }
        Some((service, ports))
    }

    /// The warnings found while attaching, one line each.
    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The backend for `service`'s own `port` (no route, or the default), with its
    /// `DestinationRule`'s load balancer.
    pub(crate) fn default_backend(&self, service: &Arc<Service>, port: u16) -> Backend {
        Backend::Service {
            service: Arc::clone(service),
            port,
            policy: self.policies.of(service, port),
        }
    }

    /// Whether any route (an `HTTPRoute`, a `GRPCRoute` or a `VirtualService`'s HTTP rules)
    /// attaches to `service`'s `port`, for any client.
    pub(crate) fn routes_attach(&self, service: &Service, port: u16) -> bool {
        let key = (service.namespace.clone(), service.name.clone(), port);
        self.ports.get(&key).is_some_and(|routes| {
            !routes.producer.is_empty()
                || !routes.ordered.is_empty()
                || routes
                    .consumers
                    .values()
                    .chain(routes.ordered_consumers.values())
                    .any(|entries| !entries.is_empty())
        })
    }

    /// The `tcp` rule of a `VirtualService` that takes a connection from a client in
    /// `client_namespace` to `service`'s `port`, passed on as TCP; `None`: the Service itself.
    pub(crate) fn decide_tcp(
        &self,
        service: &Service,
        port: u16,
        client_namespace: &str,
    ) -> Option<&ResolvedRule> {
        let key = (service.namespace.clone(), service.name.clone(), port);
        let routes = self.ports.get(&key)?;
        let mut rules = for_client(&routes.tcp_consumers, &routes.tcp, client_namespace);
        rules.next().map(AsRef::as_ref)
    }

    /// The `tls` rule of a `VirtualService` that takes a TLS connection asking for server name
    /// `sni` from a client in `client_namespace` to `service`'s `port`; `None`: none does.
    pub(crate) fn decide_tls(
        &self,
        service: &Service,
        port: u16,
        client_namespace: &str,
        sni: &str,
    ) -> Option<&ResolvedRule> {
        let key = (service.namespace.clone(), service.name.clone(), port);
        let routes = self.ports.get(&key)?;
        let takes = |(hosts, _): &&TlsRule| {
            hosts
                .iter()
                .any(|h| crate::istio_traffic::sni_matches(h, sni))
        };
        for_client(&routes.tls_consumers, &routes.tls, client_namespace)
            .find(takes)
            .map(|(_, rule)| rule.as_ref())
    }

    /// Whether `tls` rules attach to `service`'s `port` (its connections' server names are
    /// read).
    pub(crate) fn tls_routes_attach(&self, service: &Service, port: u16) -> bool {
        let key = (service.namespace.clone(), service.name.clone(), port);
        self.ports
            .get(&key)
            .is_some_and(|r| !r.tls.is_empty() || !r.tls_consumers.is_empty())
    }

    /// What to do with `request` from a client in `client_namespace` for `service`'s `port`.
    pub(crate) fn decide<'a>(
        &'a self,
        service: &Service,
        port: u16,
        client_namespace: &str,
        request: &RequestFacts<'_>,
    ) -> RouteDecision<'a> {
        let key = (service.namespace.clone(), service.name.clone(), port);
        let Some(routes) = self.ports.get(&key) else {
            return RouteDecision::Default;
        };
        let mut entries = routes
            .consumers
            .get(client_namespace)
            .unwrap_or(&routes.producer);
        if entries.is_empty() {
            entries = routes
                .ordered_consumers
                .get(client_namespace)
                .unwrap_or(&routes.ordered);
        }
        // Only the rules exported to the client's namespace; none: the Service itself.
        let mut entries = entries
            .iter()
            .filter(|e| sees(&e.visible, client_namespace))
            .peekable();
        if entries.peek().is_none() {
            return RouteDecision::Default;
        }
        for entry in entries {
            let rule = &entry.route.rules[entry.rule];
            let matched = &rule.matches[entry.index];
            if matches(matched, request) {
                return RouteDecision::Matched {
                    route: &entry.route,
                    rule,
                    matched,
                };
            }
        }
        RouteDecision::NoMatch
    }
}

/// Where an object stands when objects of one kind conflict: the older first (one without a
/// creation time last), then by `namespace/name`, as Gateway API resolves conflicts.
fn age_order(meta: &ObjectMeta) -> (bool, Option<Time>, String, String) {
    let created = meta.creation_timestamp.clone();
    (
        created.is_none(),
        created,
        meta.namespace().to_owned(),
        meta.name().to_owned(),
    )
}

/// Adds every match of `attached`'s rules, in order (a `VirtualService`'s: no precedence but
/// their order).
fn add_ordered(entries: &mut Vec<Entry>, attached: &Arc<AttachedRoute>, visible: &Visibility) {
    for (rule_index, rule) in attached.rules.iter().enumerate() {
        for index in 0..rule.matches.len() {
            entries.push(Entry {
                key: (
                    0,
                    Reverse(0),
                    false,
                    Reverse(0),
                    Reverse(0),
                    (false, None),
                    String::new(),
                    rule_index,
                    index,
                ),
                route: Arc::clone(attached),
                rule: rule_index,
                index,
                visible: visible.clone(),
            });
        }
    }
}

fn add_entries(entries: &mut Vec<Entry>, attached: &Arc<AttachedRoute>, meta: &ObjectMeta) {
    let created = meta.creation_timestamp.clone();
    for (rule_index, rule) in attached.rules.iter().enumerate() {
        for (index, m) in rule.matches.iter().enumerate() {
            let (class, length) = match &m.path {
                PathMatch::Exact(path) => (0, path.len()),
                PathMatch::Prefix(path) => (1, path.trim_end_matches('/').len()),
                PathMatch::Regex(_) => (2, 0),
                PathMatch::RawPrefix(path) => (1, path.len()),
            };
            let key = (
                class,
                Reverse(length),
                m.method.is_none(),
                Reverse(m.headers.len()),
                Reverse(m.query_params.len()),
                (created.is_none(), created.clone()),
                format!("{}/{}", meta.namespace(), meta.name()),
                rule_index,
                index,
            );
            entries.push(Entry {
                key,
                route: Arc::clone(attached),
                rule: rule_index,
                index,
                visible: None,
            });
        }
    }
}

/// What a route's backends are resolved with.
struct Resolving<'a> {
    services: &'a Services<'a>,
    policies: &'a istio::Policies,
    grants: &'a ServiceGrants,
    /// The parent Service the rules are resolved for.
    parent: &'a Service,
    /// The route.
    route: &'a ObjectRef,
}

fn resolve_rule(
    rule: &crate::gateway_api::RouteRule,
    context: &Resolving<'_>,
    warnings: &mut Vec<String>,
) -> ResolvedRule {
    let mut resolve = |target: &BackendTarget| {
        let backend = resolve_backend(target, context);
        if let Backend::Invalid(problem) = &backend {
            let share = match context.route.kind {
                Kind::TcpRoute | Kind::TlsRoute => "its share of the connections is refused",
                _ => "its share of the requests gets a 500",
            };
            warnings.push(format!(
                "{}: backend {}: {problem}; {share}",
                context.route, target.name
            ));
        }
        backend
    };
    let backends: Vec<ResolvedBackend> = rule
        .backend_refs
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| ResolvedBackend {
            backend: resolve(&b.target),
            weight: b.weight,
            filters: b.filters.clone(),
        })
        .collect();
    let mirrors = rule
        .filters
        .iter()
        .filter_map(|f| match f {
            Filter::RequestMirror(mirror) => Some(resolve(&mirror.backend)),
            _ => None,
        })
        .collect();
    ResolvedRule {
        name: rule.name.clone(),
        matches: rule.matches.clone(),
        filters: rule.filters.clone(),
        total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
        backends,
        mirrors,
        timeouts: rule.timeouts,
        retry: rule.retry.clone(),
        fault: None,
        direct_response: None,
    }
}

/// The backend `target` of a route, for its parent Service `context.parent`.
fn resolve_backend(target: &BackendTarget, context: &Resolving<'_>) -> Backend {
    let Resolving {
        services,
        policies,
        grants,
        parent,
        route,
    } = context;
    let namespace = route.namespace.as_deref().unwrap_or_default();
    if target.is_hostname() {
        return hostname_backend(target, context);
    }
    if !target.is_service() {
        return Backend::Invalid(InvalidBackend::Kind {
            group: target.group.clone(),
            kind: target.kind.clone(),
        });
    }
    let target_ns = target.namespace.as_deref().unwrap_or(namespace);
    let is_parent = target_ns == parent.namespace && target.name == parent.name;
    let granted = grants.allows(route.kind, namespace, target_ns, &target.name);
    if target_ns != namespace && !is_parent && !granted {
        return Backend::Invalid(InvalidBackend::CrossNamespace {
            namespace: target_ns.to_owned(),
        });
    }
    let found = services
        .get(&(target_ns, target.name.as_str()))
        .filter(|s| s.is_kind(&target.group, &target.kind));
    let Some(service) = found else {
        return Backend::Invalid(InvalidBackend::NotFound {
            namespace: target_ns.to_owned(),
            name: target.name.clone(),
        });
    };
    backend_port(service, target, policies)
}

/// Istio's `Hostname` backend: the Service or `ServiceEntry` answering to the host, when the
/// route may send there: of the route's namespace, the parent itself, or an entry captured for
/// the route's namespace's clients (the root namespace's); another namespace's Service needs a
/// `ReferenceGrant` as by name.
fn hostname_backend(target: &BackendTarget, context: &Resolving<'_>) -> Backend {
    let (route, parent) = (context.route, context.parent);
    let namespace = route.namespace.as_deref().unwrap_or_default();
    let Some(service) = context
        .services
        .values()
        .find(|s| s.hosts().any(|h| h == target.name))
    else {
        return Backend::Invalid(InvalidBackend::UnknownHost {
            host: target.name.clone(),
        });
    };
    let is_parent = service.namespace == parent.namespace && service.name == parent.name;
    let reachable = service.namespace == namespace
        || is_parent
        || (service.is_entry() && service.captured_for(Some(namespace)))
        || context
            .grants
            .allows(route.kind, namespace, &service.namespace, &service.name);
    if !reachable {
        return Backend::Invalid(InvalidBackend::CrossNamespace {
            namespace: service.namespace.clone(),
        });
    }
    backend_port(service, target, context.policies)
}

/// The backend `service` at `target`'s port, with its `DestinationRule`'s policy.
fn backend_port(
    service: &Arc<Service>,
    target: &BackendTarget,
    policies: &istio::Policies,
) -> Backend {
    // Parsing refuses a Service backend without a port.
    let port = target.port.unwrap_or_default();
    let has_port = service
        .ports
        .iter()
        .any(|p| p.port == port && p.protocol == crate::model::Protocol::Tcp);
    if !has_port {
        return Backend::Invalid(InvalidBackend::NoPort {
            service: service.to_string(),
            port,
        });
    }
    Backend::Service {
        service: Arc::clone(service),
        port,
        policy: policies.of(service, port),
    }
}

/// Whether `request` meets every condition of `m`.
pub fn matches(m: &RouteMatch, request: &RequestFacts<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Exact(path) => request.path == path,
        PathMatch::Prefix(prefix) => prefix_matches(prefix, request.path),
        PathMatch::Regex(pattern) => pattern.is_match(request.path),
        PathMatch::RawPrefix(prefix) => request.path.starts_with(prefix.as_str()),
    };
    path_ok
        && m.method
            .as_ref()
            .is_none_or(|method| method == request.method)
        && m.headers.iter().all(|h| {
            let value = match h.name.as_str() {
                ":authority" => request.authority.map(str::to_owned),
                ":scheme" => Some(request.scheme.to_owned()),
                name => header_value(request.headers, name),
            };
            h.value.admits(value.as_deref())
        })
        && m.query_params.iter().all(|q| {
            q.value
                .admits(query_value(request.query, &q.name).as_deref())
        })
}

/// `PathPrefix` semantics: whole segments, a trailing `/` of the prefix ignored.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A header's values joined by `,` (as one value, RFC 9110 §5.3); `None` when absent or not
/// text.
fn header_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?.to_str().ok()?;
    let mut joined = first.to_owned();
    for value in values {
        joined.push(',');
        joined.push_str(value.to_str().ok()?);
    }
    Some(joined)
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key)? == name).then(|| percent_decode(value))?
    })
}

/// `%XX` decoding; `None` when the result is not UTF-8 or an escape is malformed.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

mod istio;
mod l4;

pub(crate) use l4::L4Route;

#[cfg(test)]
mod tests;
