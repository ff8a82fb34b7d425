//! Gateway API's L4 routes (`TCPRoute`, `TLSRoute`) attached to Service ports, beside the
//! `VirtualService` `tcp` and `tls` rules, for the connections a waypoint passes on as TCP.
//!
//! - Attachment is as for an `HTTPRoute` (a `parentRef` of kind `Service`, all its TCP ports or
//!   the one `port` or `sectionName` names; a route of another namespace is a consumer route for
//!   its own namespace's clients, in place of the Service's own).
//! - A connection takes, among the routes that apply to its client: for a `TLSRoute`, the first
//!   whose `hostnames` take the server name its client hello asks for, exact names before
//!   wildcards and longer wildcards before shorter ones, then the older route, then the first by
//!   `namespace/name`; else the oldest `TCPRoute` (then the first by `namespace/name`); else a
//!   `VirtualService`'s `tls` or `tcp` rule; else the Service itself.
//! - A port the Service does not declare (no `appProtocol`, no protocol name) to which only L4
//!   routes attach carries TCP: the waypoint passes its connections on without sniffing, as an
//!   `HTTPRoute` makes such a port HTTP. A port that carries HTTP (declared so, or an `HTTPRoute`,
//!   `GRPCRoute` or `VirtualService` `http` rule attaches) routes none of its connections by an
//!   L4 route, which is reported as a warning.

use std::sync::Arc;

use super::{age_order, resolve_rule, HttpRouteIndex, ResolvedRule, Resolving, Services, TlsRule};
use crate::{
    gateway_api::{l4::L4Rule, ParentRef, RouteRule, Timeouts},
    meta::{Kind, MetaExt, ObjectMeta, ObjectRef},
    reference_grant::ServiceGrants,
};

/// A `TCPRoute` or a `TLSRoute`, as the index attaches it.
pub(crate) struct L4Route<'a> {
    pub(crate) kind: Kind,
    pub(crate) meta: &'a ObjectMeta,
    pub(crate) parent_refs: &'a [ParentRef],
    /// A `TLSRoute`'s `hostnames` (empty: every server name); `None`: a `TCPRoute`.
    pub(crate) hostnames: Option<&'a [String]>,
    pub(crate) rule: &'a L4Rule,
}

/// Where one route's rule goes: a Service port, and the namespace whose clients it is for
/// (`None`: every client).
type Placement = ((String, String, u16), Option<String>);

/// A `TLSRoute` hostname's rank: exact names first, then wildcards by length, then "any".
fn specificity(hostname: &str) -> (u8, std::cmp::Reverse<usize>) {
    match hostname.strip_prefix('*') {
        None => (0, std::cmp::Reverse(0)),
        Some("") => (2, std::cmp::Reverse(0)),
        Some(domain) => (1, std::cmp::Reverse(domain.len())),
    }
}

impl HttpRouteIndex {
    /// Attaches `routes` (before any `VirtualService`: their rules come first), oldest first.
    pub(super) fn attach_l4(
        &mut self,
        routes: Vec<L4Route<'_>>,
        (services, grants): (&Services<'_>, &ServiceGrants),
    ) {
        let mut routes = routes;
        routes.sort_by_key(|r| age_order(r.meta));
        let mut tls: Vec<(Placement, TlsRule)> = Vec::new();
        for route in &routes {
            let object = ObjectRef::namespaced(route.kind, route.meta);
            for (placement, rule) in self.place(route, &object, (services, grants)) {
                self.gateway_l4.insert(placement.0.clone());
                match route.hostnames {
                    None => {
                        let routes = self.ports.entry(placement.0).or_default();
                        match placement.1 {
                            None => routes.tcp.push((rule, None)),
                            Some(ns) => routes.tcp_consumers.entry(ns).or_default().push(rule),
                        }
                    }
                    Some([]) => {
                        tls.push((placement, (vec!["*".to_owned()], rule)));
                    }
                    Some(hostnames) => tls.extend(
                        hostnames
                            .iter()
                            .map(|h| (placement.clone(), (vec![h.clone()], Arc::clone(&rule)))),
                    ),
                }
            }
        }
        // Stable: among hostnames of one rank, the older route first.
        tls.sort_by_key(|(_, (hosts, _))| specificity(&hosts[0]));
        for ((key, consumer), rule) in tls {
            let routes = self.ports.entry(key).or_default();
            match consumer {
                None => routes.tls.push((rule, None)),
                Some(ns) => routes.tls_consumers.entry(ns).or_default().push(rule),
            }
        }
    }

    /// `route`'s rule, resolved for each Service port its `parentRefs` attach it to.
    fn place(
        &mut self,
        route: &L4Route<'_>,
        object: &ObjectRef,
        (services, grants): (&Services<'_>, &ServiceGrants),
    ) -> Vec<(Placement, Arc<ResolvedRule>)> {
        let namespace = route.meta.namespace();
        let mut placed = Vec::new();
        for (index, parent) in route.parent_refs.iter().enumerate() {
            let Some((service, ports)) =
                self.parent_ports((object, route.meta), (index, parent), services)
            else {
                continue;
            };
            let mut warnings = Vec::new();
            let rule = RouteRule {
                name: route.rule.name.clone(),
                matches: Vec::new(),
                filters: Vec::new(),
                backend_refs: route.rule.backend_refs.clone(),
                timeouts: Timeouts::default(),
                retry: None,
            };
            let context = Resolving {
                services,
                policies: &self.policies,
                grants,
                parent: service,
                route: object,
            };
            let rule = Arc::new(resolve_rule(&rule, &context, &mut warnings));
            self.record_attached((object, route.meta, parent), service, [&*rule]);
            for warning in warnings {
                if !self.warnings.contains(&warning) {
                    self.warnings.push(warning);
                }
            }
            let consumer = (service.namespace != namespace).then(|| namespace.to_owned());
            for port in ports {
                let key = (service.namespace.clone(), service.name.clone(), port);
                placed.push(((key, consumer.clone()), Arc::clone(&rule)));
            }
        }
        if placed.is_empty() && route.parent_refs.iter().all(|p| !p.is_service()) {
            self.warnings.push(format!(
                "{object}: no parentRef is a Service (group \"\", kind Service) or a \
                 ServiceEntry (group networking.istio.io): a waypoint applies only routes \
                 attached to them"
            ));
        }
        placed
    }

    /// Whether a `TCPRoute` or `TLSRoute` attaches to the Service port `key`.
    pub(crate) fn l4_routes_attach(&self, key: &(String, String, u16)) -> bool {
        self.gateway_l4.contains(key)
    }

    /// Warns about each Service port an L4 route attaches to whose connections the waypoint
    /// reads as HTTP (declared so, or an HTTP route attaches to it): the route routes none of
    /// them.
    pub(super) fn warn_l4_on_http(&mut self, services: &Services<'_>) {
        let mut warnings = Vec::new();
        for (namespace, name, port) in &self.gateway_l4 {
            let Some(service) = services.get(&(namespace.as_str(), name.as_str())) else {
                continue;
            };
            let declared = service
                .ports
                .iter()
                .any(|p| p.port == *port && p.app_protocol.is_http());
            if declared || self.routes_attach(service, *port) {
                warnings.push(format!(
                    "Service {service} port {port}: the waypoint reads its connections as HTTP \
                     (the port is declared so, or an HTTP route attaches to it); the TCPRoutes \
                     and TLSRoutes attached to it route none of them"
                ));
            }
        }
        self.warnings.extend(warnings);
    }
}

#[cfg(test)]
mod tests;
