//! Istio's traffic objects in the routing index: `DestinationRule` subsets and load balancers
//! ([`Policies`]), and `VirtualService` `http` rules translated into the index's rules, kept in
//! their order (the first rule that matches takes the request, as in Istio).
//!
//! - A `VirtualService` applies in the mesh when it names no gateway or names `mesh`; its
//!   `hosts` are Services (`name` in its namespace, `name.namespace`, or
//!   `name.namespace.svc[.<domain>]`); a host that names none is reported as a warning.
//! - Its rules apply to every TCP port of the Service (a `match.port` narrows a match to one);
//!   when `HTTPRoute`s attach to the port, they are used instead (Gateway API first).
//! - One of the Service's namespace or the root namespace applies to every client; one of
//!   another namespace only to the clients of its own namespace, in place of those (as GAMMA's
//!   consumer routes): a tenant routes its own requests, never another's.
//! - A destination's port is its `port.number`, else the port the request came to, else the
//!   Service's only port; a `subset` is a `DestinationRule`'s: the rule of the Service's
//!   namespace, else the oldest of the root namespace (a rule of another namespace applies to
//!   nothing, with a warning); a destination that does not resolve gets a 500 for its share.
//! - Rules without `retries` get Istio's default: 2 retries on connection failures and 503.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{
    add_ordered, Backend, EndpointPolicy, HttpRouteIndex, InvalidBackend, ResolvedBackend,
    ResolvedRule, Services,
};
use crate::{
    gateway_api::{
        BackendTarget, Filter, HeaderModifier, Mirror, PathMatch, PathModifier, Pattern, Redirect,
        Retry, RetryOn, Rewrite, RouteMatch, StringMatch, Timeouts, ValueMatch,
    },
    istio_traffic::{
        merged, ConnectionPool, DestinationRule, Subset, TrafficPolicy, VirtualService,
        VsDestination, VsHeaderOps, VsHttpRoute, VsMatch, VsString, VsTarget,
    },
    meta::{Kind, MetaExt, ObjectRef},
    model::{Protocol, Service},
};

/// The `DestinationRule` policies of each Service.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    by_service: HashMap<(String, String), ServicePolicy>,
}

#[derive(Debug)]
struct ServicePolicy {
    rule: ObjectRef,
    /// Without a subset.
    default: ByPort,
    subsets: BTreeMap<String, ByPort>,
}

/// A destination's policies: for the ports with their own `portLevelSettings` (the rule's or
/// the subset's), and for the others.
#[derive(Debug)]
struct ByPort {
    others: Arc<EndpointPolicy>,
    ports: Vec<(u16, Arc<EndpointPolicy>)>,
}

impl ByPort {
    /// The policies of `service`'s destination of `rule` (in `subset`, when one), merged as
    /// Istio merges them ([`merged`]).
    fn build(service: &Service, rule: &TrafficPolicy, subset: Option<&Subset>) -> Self {
        let policy = |port: Option<u16>| {
            let parts = merged(rule, subset.map(|s| &s.traffic_policy), port);
            Arc::new(EndpointPolicy {
                subset: subset.map(|s| s.name.clone()),
                labels: subset.map(|s| s.labels.clone()).unwrap_or_default(),
                load_balancer: parts
                    .load_balancer
                    .as_ref()
                    .map(|l| l.algorithm.clone())
                    .unwrap_or_default(),
                locality_lb: parts.load_balancer.and_then(|l| l.locality).map(Arc::new),
                outlier_detection: parts.outlier_detection,
                connection_pool: parts.connection_pool.map(Arc::new),
            })
        };
        let named = |port: u16| {
            rule.port_level.iter().any(|p| p.port == port)
                || subset
                    .is_some_and(|s| s.traffic_policy.port_level.iter().any(|p| p.port == port))
        };
        let ports = service
            .ports
            .iter()
            .map(|p| p.port)
            .filter(|p| named(*p))
            .map(|p| (p, policy(Some(p))))
            .collect();
        Self {
            others: policy(None),
            ports,
        }
    }

    fn at(&self, port: u16) -> Arc<EndpointPolicy> {
        let found = self.ports.iter().find(|(p, _)| *p == port);
        Arc::clone(found.map_or(&self.others, |(_, policy)| policy))
    }
}

impl Policies {
    pub(crate) fn build<'a>(
        rules: impl IntoIterator<Item = &'a DestinationRule>,
        (services, root_namespace): (&Services<'_>, &str),
        warnings: &mut Vec<String>,
    ) -> Self {
        // Each rule with the Service it names. A rule applies to a Service of its own namespace,
        // or from the root namespace to any: a tenant's rule never sets another's subsets, load
        // balancer or limits (Istio's waypoints read the rules of the Service's namespace and
        // the root namespace).
        let mut resolved = Vec::new();
        for rule in rules {
            let object = ObjectRef::namespaced(Kind::DestinationRule, &rule.metadata);
            let namespace = rule.metadata.namespace();
            let Some(service) = lookup_host(&rule.spec.host, namespace, services) else {
                warnings.push(format!(
                    "{object}: spec.host: {:?} names no Service; the rule applies to nothing",
                    rule.spec.host
                ));
                continue;
            };
            if namespace != service.namespace && namespace != root_namespace {
                warnings.push(format!(
                    "{object}: spec.host: Service {service} is in another namespace; a \
                     DestinationRule applies to the Services of its own namespace (from the root \
                     namespace {root_namespace}, to any), so this one applies to nothing"
                ));
                continue;
            }
            let export_to = &rule.spec.export_to;
            if !export_to.is_empty() && !export_to.iter().any(|e| e == "*") {
                warnings.push(format!(
                    "{object}: exportTo {export_to:?}: a waypoint applies a DestinationRule to \
                     every client of its Service, whatever their namespace"
                ));
            }
            resolved.push((rule, object, service));
        }
        // The Service's own namespace first, then the oldest.
        resolved.sort_by_key(|(rule, _, service)| {
            let created = rule.metadata.creation_timestamp.clone();
            (
                rule.metadata.namespace() != service.namespace,
                created.is_none(),
                created,
                rule.metadata.namespace().to_owned(),
                rule.metadata.name().to_owned(),
            )
        });
        let mut policies = Self::default();
        for (rule, object, service) in resolved {
            let key = (service.namespace.clone(), service.name.clone());
            if let Some(first) = policies.by_service.get(&key) {
                warnings.push(format!(
                    "{object}: Service {service} already has {} (of its own namespace, or the older); this one is ignored",
                    first.rule
                ));
                continue;
            }
            let spec = &rule.spec;
            for level in spec.traffic_policy.port_level.iter().chain(
                spec.subsets
                    .iter()
                    .flat_map(|s| &s.traffic_policy.port_level),
            ) {
                if !service.ports.iter().any(|p| p.port == level.port) {
                    warnings.push(format!(
                        "{object}: portLevelSettings for port {}: Service {service} has no such port; the setting applies to nothing",
                        level.port
                    ));
                }
            }
            let default = ByPort::build(service, &spec.traffic_policy, None);
            let subsets = spec
                .subsets
                .iter()
                .map(|subset| {
                    let by_port = ByPort::build(service, &spec.traffic_policy, Some(subset));
                    (subset.name.clone(), by_port)
                })
                .collect();
            policies.by_service.insert(
                key,
                ServicePolicy {
                    rule: object,
                    default,
                    subsets,
                },
            );
        }
        policies
    }

    /// Every `connectionPool` the rules give a destination (merged, as requests get them).
    pub(crate) fn connection_pools(&self) -> impl Iterator<Item = &ConnectionPool> {
        self.by_service
            .values()
            .flat_map(|p| std::iter::once(&p.default).chain(p.subsets.values()))
            .flat_map(|by_port| {
                std::iter::once(&by_port.others).chain(by_port.ports.iter().map(|(_, p)| p))
            })
            .filter_map(|policy| policy.connection_pool.as_deref())
    }

    /// The policy of `service`'s `port` without a subset.
    pub(crate) fn of(&self, service: &Service, port: u16) -> Arc<EndpointPolicy> {
        self.by_service
            .get(&(service.namespace.clone(), service.name.clone()))
            .map_or_else(Arc::default, |p| p.default.at(port))
    }

    fn subset(&self, service: &Service, name: &str, port: u16) -> Option<Arc<EndpointPolicy>> {
        let policy = self
            .by_service
            .get(&(service.namespace.clone(), service.name.clone()))?;
        policy.subsets.get(name).map(|by_port| by_port.at(port))
    }
}

/// The Service an Istio host names, from `namespace`: the `ServiceEntry` with that host, else
/// the Kubernetes Service a short (`name`, `name.namespace`) or full name names.
fn lookup_host<'a>(
    host: &str,
    namespace: &str,
    services: &Services<'a>,
) -> Option<&'a Arc<Service>> {
    if let Some(entry) = services
        .values()
        .find(|s| s.is_entry() && s.hosts().any(|h| h == host))
    {
        return Some(entry);
    }
    let parts: Vec<&str> = host.split('.').collect();
    let (name, ns) = match parts.as_slice() {
        [name] => (*name, namespace),
        [name, ns] | [name, ns, "svc", ..] => (*name, *ns),
        _ => return None,
    };
    services.get(&(ns, name)).copied().filter(|s| !s.is_entry())
}

impl HttpRouteIndex {
    /// Adds `vs`'s rules, in order, to every TCP port of each Service it names.
    pub(super) fn attach_virtual_service(
        &mut self,
        vs: &VirtualService,
        services: &Services<'_>,
        root_namespace: &str,
    ) {
        if !vs.spec.mesh {
            return;
        }
        let object = ObjectRef::namespaced(Kind::VirtualService, &vs.metadata);
        let namespace = vs.metadata.namespace();
        let visible = exported(&vs.spec.export_to, namespace);
        for (index, host) in vs.spec.hosts.iter().enumerate() {
            let Some(service) = lookup_host(host, namespace, services) else {
                self.warnings.push(format!(
                    "{object}: spec.hosts[{index}]: {host:?} names no Service; its rules apply \
                     to nothing"
                ));
                continue;
            };
            let ports: Vec<u16> = service
                .ports
                .iter()
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| p.port)
                .collect();
            for port in ports {
                let rules: Vec<ResolvedRule> = vs
                    .spec
                    .http
                    .iter()
                    .map(|http| self.translate(http, (namespace, port), services, &object))
                    .collect();
                let attached = Arc::new(super::AttachedRoute {
                    object: object.clone(),
                    rules,
                });
                let tcp = self.tcp_rules(vs, (namespace, port), services, &object);
                let tls = self.tls_rules(vs, (namespace, port), services, &object);
                let everyone = namespace == service.namespace || namespace == root_namespace;
                if !everyone && !super::sees(&visible, namespace) {
                    // Another namespace's rules apply to its own clients only; exported
                    // elsewhere, they apply to nobody.
                    let warning = format!(
                        "{object}: exportTo leaves out its own namespace, the only one whose \
                         clients a VirtualService of another namespace than the Service's may \
                         route; it applies to nobody"
                    );
                    if !self.warnings.contains(&warning) {
                        self.warnings.push(warning);
                    }
                    continue;
                }
                let key = (service.namespace.clone(), service.name.clone(), port);
                let routes = self.ports.entry(key).or_default();
                if everyone {
                    add_ordered(&mut routes.ordered, &attached, &visible);
                    routes
                        .tcp
                        .extend(tcp.into_iter().map(|rule| (rule, visible.clone())));
                    routes
                        .tls
                        .extend(tls.into_iter().map(|rule| (rule, visible.clone())));
                } else {
                    let consumers = routes
                        .ordered_consumers
                        .entry(namespace.to_owned())
                        .or_default();
                    add_ordered(consumers, &attached, &None);
                    routes
                        .tcp_consumers
                        .entry(namespace.to_owned())
                        .or_default()
                        .extend(tcp);
                    routes
                        .tls_consumers
                        .entry(namespace.to_owned())
                        .or_default()
                        .extend(tls);
                }
            }
        }
    }

    /// One `http` rule, for the Service port `port`.
    fn translate(
        &mut self,
        http: &VsHttpRoute,
        (namespace, port): (&str, u16),
        services: &Services<'_>,
        object: &ObjectRef,
    ) -> ResolvedRule {
        let matches: Vec<RouteMatch> = if http.matches.is_empty() {
            vec![any_request()]
        } else {
            http.matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == port))
                .filter_map(|m| self.route_match(m, object))
                .collect()
        };
        let mut filters = Vec::new();
        if let Some(cors) = &http.cors {
            filters.push(Filter::Cors(Box::new(cors.clone())));
        }
        filters.extend(header_filters(
            &http.headers.request,
            &http.headers.response,
        ));
        if let Some(redirect) = &http.redirect {
            filters.push(Filter::RequestRedirect(Redirect {
                scheme: redirect.scheme.clone(),
                hostname: redirect.authority.clone(),
                path: redirect.uri.clone().map(PathModifier::Full),
                port: redirect.port,
                status: redirect.code,
            }));
        }
        if let Some(rewrite) = &http.rewrite {
            filters.push(Filter::UrlRewrite(Rewrite {
                hostname: rewrite.authority.clone(),
                path: rewrite
                    .uri
                    .clone()
                    .map(PathModifier::Matched)
                    .or_else(|| rewrite.uri_regex.clone().map(PathModifier::Regex)),
            }));
        }
        let mut mirrors = Vec::new();
        for (mirror, share) in &http.mirrors {
            // Percent with four decimals, as a fraction of a million.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0-100 checked.
            let numerator = (share * 10_000.0).round() as u32;
            filters.push(Filter::RequestMirror(Mirror {
                backend: placeholder_target(&mirror.host),
                numerator,
                denominator: 1_000_000,
            }));
            mirrors.push(self.destination(mirror, (namespace, port), services, object));
        }
        let backends = self.weighted(&http.route, (namespace, port), services, object);
        let retry = match &http.retries {
            Some(r) => Some(Retry {
                on: r.retry_on.clone(),
                attempts: Some(r.attempts),
                backoff: None,
            }),
            None => Some(Retry {
                // Istio's default: connect-failure, refused-stream, unavailable, cancelled,
                // retriable-status-codes (503).
                on: RetryOn {
                    connect_failure: true,
                    codes: vec![503],
                    grpc: vec![1, 14],
                    ..RetryOn::default()
                },
                attempts: Some(2),
                backoff: None,
            }),
        };
        ResolvedRule {
            name: http.name.clone(),
            matches,
            filters,
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            mirrors,
            timeouts: Timeouts {
                request: http.timeout.filter(|t| !t.is_zero()),
                backend_request: http.retries.as_ref().and_then(|r| r.per_try_timeout),
            },
            retry,
            fault: http.fault.clone(),
            direct_response: http.direct_response.clone(),
        }
    }

    /// `vs`'s `tcp` rules for the Service port `port`.
    fn tcp_rules(
        &mut self,
        vs: &VirtualService,
        (namespace, port): (&str, u16),
        services: &Services<'_>,
        object: &ObjectRef,
    ) -> Vec<Arc<ResolvedRule>> {
        vs.spec
            .tcp
            .iter()
            .filter(|rule| rule.ports.is_empty() || rule.ports.contains(&port))
            .map(|rule| {
                let resolved = self.translate_tcp(&rule.route, (namespace, port), services, object);
                Arc::new(resolved)
            })
            .collect()
    }

    /// `vs`'s `tls` rules for the Service port `port`, each with the server names its matches
    /// for the port take.
    fn tls_rules(
        &mut self,
        vs: &VirtualService,
        (namespace, port): (&str, u16),
        services: &Services<'_>,
        object: &ObjectRef,
    ) -> Vec<super::TlsRule> {
        vs.spec
            .tls
            .iter()
            .filter_map(|rule| {
                let hosts: Vec<String> = rule
                    .matches
                    .iter()
                    .filter(|(_, p)| p.is_none_or(|p| p == port))
                    .flat_map(|(hosts, _)| hosts.iter().cloned())
                    .collect();
                if hosts.is_empty() {
                    return None;
                }
                let resolved = self.translate_tcp(&rule.route, (namespace, port), services, object);
                Some((hosts, Arc::new(resolved)))
            })
            .collect()
    }

    /// A route's destinations with a weight above zero (the only one takes all when none has
    /// one), resolved for the Service port `port`, each with its header operations.
    fn weighted(
        &mut self,
        route: &[VsDestination],
        (namespace, port): (&str, u16),
        services: &Services<'_>,
        object: &ObjectRef,
    ) -> Vec<ResolvedBackend> {
        let single = route.len() == 1;
        route
            .iter()
            .map(|d| ResolvedBackend {
                backend: self.destination(&d.destination, (namespace, port), services, object),
                weight: d.weight.unwrap_or(if single { 100 } else { 0 }),
                filters: header_filters(&d.headers.request, &d.headers.response).collect(),
            })
            .filter(|b| b.weight > 0)
            .collect()
    }

    /// A `tcp` or `tls` rule's `route`, for the Service port `port`: its destinations by weight,
    /// nothing else.
    fn translate_tcp(
        &mut self,
        route: &[VsDestination],
        (namespace, port): (&str, u16),
        services: &Services<'_>,
        object: &ObjectRef,
    ) -> ResolvedRule {
        let backends = self.weighted(route, (namespace, port), services, object);
        ResolvedRule {
            name: None,
            matches: vec![any_request()],
            filters: Vec::new(),
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            mirrors: Vec::new(),
            timeouts: Timeouts::default(),
            retry: None,
            fault: None,
            direct_response: None,
        }
    }

    fn route_match(&mut self, m: &VsMatch, object: &ObjectRef) -> Option<RouteMatch> {
        let path = match &m.uri {
            None | Some(VsString::Present) => PathMatch::RawPrefix(String::new()),
            Some(VsString::Exact(path)) if m.ignore_uri_case => {
                PathMatch::Regex(Pattern::ignoring_case(path, false))
            }
            Some(VsString::Prefix(prefix)) if m.ignore_uri_case => {
                PathMatch::Regex(Pattern::ignoring_case(prefix, true))
            }
            Some(VsString::Exact(path)) => PathMatch::Exact(path.clone()),
            Some(VsString::Prefix(prefix)) => PathMatch::RawPrefix(prefix.clone()),
            Some(VsString::Regex(pattern)) => PathMatch::Regex(pattern.clone()),
        };
        let method = match &m.method {
            None | Some(VsString::Present) => None,
            Some(VsString::Exact(method)) => {
                let Ok(parsed) = method.parse::<http::Method>() else {
                    self.warnings.push(format!(
                        "{object}: method {method:?} is not an HTTP method; the match never \
                         matches"
                    ));
                    return None;
                };
                Some(parsed)
            }
            Some(_) => {
                self.warnings.push(format!(
                    "{object}: a method match by prefix or regex is not supported; the match \
                     never matches"
                ));
                return None;
            }
        };
        let value = VsString::to_match;
        let condition = |name: &str, matched: StringMatch| ValueMatch {
            name: name.to_owned(),
            value: matched,
        };
        let headers = m
            .headers
            .iter()
            .map(|(name, v)| condition(name, value(v)))
            .chain(
                m.without_headers
                    .iter()
                    .map(|(name, v)| condition(name, StringMatch::Not(Box::new(value(v))))),
            )
            .chain(
                m.authority
                    .iter()
                    .map(|v| condition(":authority", value(v))),
            )
            .chain(m.scheme.iter().map(|v| condition(":scheme", value(v))))
            .collect();
        Some(RouteMatch {
            path,
            headers,
            query_params: m
                .query_params
                .iter()
                .map(|(name, v)| condition(name, value(v)))
                .collect(),
            method,
        })
    }

    /// A `destination` (or `mirror`) for a request that came to `port`.
    fn destination(
        &mut self,
        target: &VsTarget,
        (namespace, port): (&str, u16),
        services: &Services<'_>,
        object: &ObjectRef,
    ) -> Backend {
        let backend = self.resolve_destination(target, (namespace, port), services);
        if let Backend::Invalid(problem) = &backend {
            self.warnings.push(format!(
                "{object}: destination {}: {problem}; its share of the requests gets a 500",
                target.host
            ));
        }
        backend
    }

    fn resolve_destination(
        &self,
        target: &VsTarget,
        (namespace, port): (&str, u16),
        services: &Services<'_>,
    ) -> Backend {
        let Some(service) = lookup_host(&target.host, namespace, services) else {
            return Backend::Invalid(InvalidBackend::UnknownHost {
                host: target.host.clone(),
            });
        };
        let tcp: Vec<u16> = service
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Tcp)
            .map(|p| p.port)
            .collect();
        let chosen = match target.port {
            Some(p) => tcp.contains(&p).then_some(p),
            None if tcp.contains(&port) => Some(port),
            None => (tcp.len() == 1).then(|| tcp[0]),
        };
        let Some(chosen) = chosen else {
            return Backend::Invalid(InvalidBackend::NoPort {
                service: service.to_string(),
                port: target.port.unwrap_or(port),
            });
        };
        let policy = match &target.subset {
            None => self.policies.of(service, chosen),
            Some(name) => match self.policies.subset(service, name, chosen) {
                Some(policy) => policy,
                None => {
                    return Backend::Invalid(InvalidBackend::NoSubset {
                        service: service.to_string(),
                        subset: name.clone(),
                    })
                }
            },
        };
        Backend::Service {
            service: Arc::clone(service),
            port: chosen,
            policy,
        }
    }
}

/// The client namespaces a `VirtualService` of `namespace` applies to by its `exportTo` (`.`:
/// its own); `None`: every namespace's.
fn exported(export_to: &[String], namespace: &str) -> super::Visibility {
    if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
        return None;
    }
    let names = export_to
        .iter()
        .map(|e| if e == "." { namespace } else { e.as_str() })
        .map(str::to_owned)
        .collect();
    Some(Arc::new(names))
}

/// A match of every request.
fn any_request() -> RouteMatch {
    RouteMatch {
        path: PathMatch::RawPrefix(String::new()),
        headers: Vec::new(),
        query_params: Vec::new(),
        method: None,
    }
}

/// The header modifiers of Istio's `headers` (request, then response).
fn header_filters(request: &VsHeaderOps, response: &VsHeaderOps) -> impl Iterator<Item = Filter> {
    let modifier = |ops: &VsHeaderOps| {
        let empty = ops.set.is_empty() && ops.add.is_empty() && ops.remove.is_empty();
        (!empty).then(|| HeaderModifier {
            set: ops.set.clone().into_iter().collect(),
            add: ops.add.clone().into_iter().collect(),
            remove: ops.remove.clone(),
        })
    };
    let request = modifier(request).map(Filter::RequestHeaderModifier);
    let response = modifier(response).map(Filter::ResponseHeaderModifier);
    request.into_iter().chain(response)
}

/// The `Mirror` filter's target as written (its resolved backend is in the rule's `mirrors`).
fn placeholder_target(host: &str) -> BackendTarget {
    BackendTarget {
        group: String::new(),
        kind: "Service".to_owned(),
        name: host.to_owned(),
        namespace: None,
        port: None,
    }
}
