//! The agent's view of the cluster: workloads (pods), services, and `PeerAuthentication` and
//! `AuthorizationPolicy` policies, built from Kubernetes objects by one function, [`ClusterState::build`], whatever the
//! source (the directory of YAML files today, a Kubernetes watch later), and indexed for the
//! lookups the data path makes per connection.
//!
//! A [`ClusterState`] is immutable once built and is shared as `Arc<ClusterState>`; a change in
//! the source produces a new one. The only mutable part is the round-robin cursor of each service
//! port (an atomic), which restarts at the first endpoint in each new state.

use std::{
    collections::{hash_map::Entry, BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    authn::{AuthnIndex, JwtProvider},
    authz::{AuthzDecision, AuthzIndex, AuthzPolicy, ConnFacts, PolicyTarget, WaypointFacts},
    by_kind::{ByKind, Named},
    endpoints::{BuiltPod, IndexedSlices, SliceIndex},
    error::{SourceError, StateError},
    http_route::{HttpRouteIndex, L4Route, RequestFacts, RouteDecision},
    k8s::{self, ConnectionPool, Kind, Object, ObjectRef},
    locality::Locality,
    model::{AppProtocol, Protocol, Resolution, Service, ServicePort, Workload},
    names::{check_name, NameRule},
    options::EnrollmentOptions,
    peer_auth::{PeerAuthDecision, PeerAuthIndex, PeerAuthPolicy},
    ratelimit::{RateLimit, RateLimitIndex},
    translate::{
        entry_ref, pod_ref, service_distribution, service_from, service_from_entry, service_ref,
        shortcut_annotation, workload_from, workload_ref,
    },
    waypoint::{Bindings, Waypoint, WaypointBinding, WaypointIndex},
};
use crate::{k8s::PodExt, meta::MetaExt, reference_grant::ServiceGrants};

/// An immutable view of the cluster, with the indexes the data path uses.
#[derive(Debug)]
pub struct ClusterState {
    generation: u64,
    errors: Vec<SourceError>,
    workloads: Vec<Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_node: HashMap<String, Vec<Arc<Workload>>>,
    services: Vec<Arc<Service>>,
    by_hostname: HashMap<String, Arc<Service>>,
    by_addr: HashMap<SocketAddr, (Arc<Service>, usize)>,
    peer_auth: PeerAuthIndex,
    authz: AuthzIndex,
    authn: AuthnIndex,
    rate_limits: RateLimitIndex,
    http_routes: HttpRouteIndex,
    waypoints: WaypointIndex,
    bindings: Bindings,
    /// For each pod (namespace, name) that a Service of its namespace targeted by a waypoint's
    /// `AuthorizationPolicy` serves: those Services (namespace, name), whose policies also
    /// hold for requests a waypoint takes to the pod's own address.
    policy_services: HashMap<(String, String), Vec<(String, String)>>,
    /// The indexes' warnings: `PeerAuthentication`'s, `AuthorizationPolicy`'s, then
    /// `HTTPRoute`'s.
    warnings: Vec<String>,
}

impl ClusterState {
    /// A state without objects, to be filled by [`Self::build`].
    fn empty() -> Self {
        ClusterState {
            generation: 0,
            errors: Vec::new(),
            workloads: Vec::new(),
            by_ip: HashMap::new(),
            by_node: HashMap::new(),
            services: Vec::new(),
            by_hostname: HashMap::new(),
            by_addr: HashMap::new(),
            peer_auth: PeerAuthIndex::default(),
            authz: AuthzIndex::default(),
            authn: AuthnIndex::default(),
            rate_limits: RateLimitIndex::default(),
            http_routes: HttpRouteIndex::default(),
            waypoints: WaypointIndex::default(),
            bindings: Bindings::default(),
            policy_services: HashMap::new(),
            warnings: Vec::new(),
        }
    }

    /// Builds and validates the state from `objects`, in any order. Pods that have finished
    /// (`Succeeded`, `Failed`) are left out: their addresses may already belong to new pods.
    /// The result has generation 0 and no source errors; the source sets both.
    pub fn build<'a>(
        objects: impl IntoIterator<Item = &'a Object>,
        opts: &EnrollmentOptions,
    ) -> Result<Self, StateError> {
        opts.validate()?;
        let ByKind {
            namespaces,
            pods,
            services,
            slices,
            peer_auths,
            authz_policies,
            http_routes,
            gateways,
            grpc_routes,
            tcp_routes,
            tls_routes,
            virtual_services,
            destination_rules,
            service_entries,
            reference_grants,
            request_authns,
            envoy_filters,
            nodes,
        } = ByKind::sort(objects)?;
        for namespace in namespaces.values() {
            let object = ObjectRef::cluster_scoped(Kind::Namespace, &namespace.metadata);
            check_name(
                &object,
                "metadata.name",
                namespace.metadata.name(),
                NameRule::Label,
            )?;
            shortcut_annotation(&object, &namespace.metadata)?;
        }

        let mut state = ClusterState::empty();
        let by_namespace = state.index_workloads(&pods, (&namespaces, &nodes), opts)?;
        let IndexedSlices {
            index: slices,
            warnings: slice_warnings,
        } = SliceIndex::build(slices.into_values())?;
        let service_warnings =
            state.index_services((&services, &service_entries), &by_namespace, &slices, opts)?;
        state.peer_auth = PeerAuthIndex::build(
            peer_auths.into_values(),
            &opts.root_namespace,
            &state.workloads,
        )?;
        state.authz = AuthzIndex::build(authz_policies.into_values(), &opts.root_namespace)?;
        state.authn = AuthnIndex::build(request_authns.into_values(), &opts.root_namespace)?;
        state.rate_limits =
            RateLimitIndex::build(envoy_filters.into_values(), &opts.root_namespace)?;
        state.index_routes(
            (&http_routes, &grpc_routes),
            (&tcp_routes, &tls_routes),
            (&virtual_services, &destination_rules),
            &reference_grants,
            &opts.root_namespace,
        )?;
        state.waypoints = WaypointIndex::build(gateways.values().copied(), &state.workloads)?;
        let accounts = crate::waypoint::service_accounts(&state.services, &state.workloads);
        state.bindings = Bindings::build(
            &state.waypoints,
            |ns| namespaces.get(ns).map(|n| n.metadata.labels()),
            services
                .iter()
                .map(|(&(ns, name), svc)| {
                    let account = accounts.get(&(ns.to_owned(), name.to_owned()));
                    (ns, name, svc.metadata.labels(), account.map(String::as_str))
                })
                // An entry is bound by its own label or its namespace's, never by a service
                // account's waypoint (its endpoints are not the account's pods).
                .chain(
                    service_entries
                        .iter()
                        .map(|(&(ns, name), entry)| (ns, name, entry.metadata.labels(), None)),
                ),
            &state.workloads,
        );
        state
            .bindings
            .guard_endpoints(&state.services, &state.workloads, &state.waypoints);
        state.policy_services = state.index_policy_services();
        let mut unenforced = state.unenforced_waypoint_policies();
        unenforced.extend(state.unresolved_entries());
        state.warnings = [
            slice_warnings,
            service_warnings,
            state.peer_auth.warnings().to_vec(),
            state.authz.warnings().to_vec(),
            state.authn.warnings().to_vec(),
            state.rate_limits.warnings().to_vec(),
            unenforced,
            state.http_routes.warnings().to_vec(),
            state.waypoints.warnings().to_vec(),
        ]
        .concat();
        Ok(state)
    }

    /// Indexes the Services, then the `ServiceEntries` (an entry never takes a Service's
    /// address or host); the warnings of both.
    fn index_services(
        &mut self,
        (services, service_entries): (
            &Named<'_, k8s::Service>,
            &Named<'_, crate::service_entry::ServiceEntry>,
        ),
        by_namespace: &HashMap<&str, Vec<BuiltPod<'_>>>,
        slices: &SliceIndex<'_>,
        opts: &EnrollmentOptions,
    ) -> Result<Vec<String>, StateError> {
        let mut service_warnings = Vec::new();
        for (&(namespace, _), &svc) in services {
            let pods = by_namespace.get(namespace).map_or(&[][..], Vec::as_slice);
            let from = (slices, &self.by_ip);
            let mut service = service_from(svc, pods, from, opts)?;
            service.traffic_distribution = service_distribution(svc, &mut service_warnings);
            let service = Arc::new(service);
            let object = service_ref(svc);
            let listed = svc
                .spec
                .as_ref()
                .and_then(|s| s.cluster_ips.as_ref())
                .is_some_and(|ips| !ips.is_empty());
            let vip_field = |index: usize| {
                if listed {
                    format!("spec.clusterIPs[{index}]")
                } else {
                    "spec.clusterIP".to_owned()
                }
            };
            let port_field = |index: usize| format!("spec.ports[{index}].port");
            self.index_service(&service, &object, (&vip_field, &port_field))?;
        }
        // After the Services: an entry never takes a Service's address or host.
        for entry in service_entries.values() {
            let namespace = entry.metadata.namespace();
            let pods = by_namespace.get(namespace).map_or(&[][..], Vec::as_slice);
            let service = service_from_entry(
                entry,
                pods,
                &self.by_ip,
                &opts.root_namespace,
                &mut service_warnings,
            )?;
            let from_status = entry.spec.addresses.is_empty();
            let vip_field = |index: usize| {
                if from_status {
                    format!("status.addresses[{index}].value")
                } else {
                    format!("spec.addresses[{index}]")
                }
            };
            let port_field = |index: usize| format!("spec.ports[{index}].number");
            self.index_service(
                &Arc::new(service),
                &entry_ref(entry),
                (&vip_field, &port_field),
            )?;
        }
        Ok(service_warnings)
    }

    /// The workloads of the pods that have not finished (their localities their nodes'),
    /// indexed, and by namespace.
    fn index_workloads<'a>(
        &mut self,
        pods: &Named<'a, k8s::Pod>,
        (namespaces, nodes): (
            &BTreeMap<&str, &k8s::Namespace>,
            &BTreeMap<&str, &k8s::Node>,
        ),
        opts: &EnrollmentOptions,
    ) -> Result<HashMap<&'a str, Vec<BuiltPod<'a>>>, StateError> {
        let localities: HashMap<&str, Locality> = nodes
            .iter()
            .map(|(&name, node)| (name, Locality::of_node(node.metadata.labels())))
            .collect();
        let mut by_namespace: HashMap<&str, Vec<BuiltPod>> = HashMap::new();
        for (&(namespace, _), &pod) in pods.iter().filter(|(_, pod)| !pod.is_terminated()) {
            let ns_meta = namespaces.get(namespace).map(|ns| &ns.metadata);
            let node = pod.node_name().and_then(|n| localities.get(n));
            let workload = Arc::new(workload_from(pod, (ns_meta, node), opts)?);
            self.index_workload(&workload, pod)?;
            by_namespace
                .entry(namespace)
                .or_default()
                .push(BuiltPod { workload, pod });
        }
        Ok(by_namespace)
    }

    /// The pods served by Services that waypoints' policies target, with those Services.
    fn index_policy_services(&self) -> HashMap<(String, String), Vec<(String, String)>> {
        let mut index: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
        let targeted = self
            .waypoint_policy_targets()
            .filter_map(|(_, namespace, target)| match target {
                PolicyTarget::Service(name) => Some((namespace, name.as_str())),
                // An entry's policies hold for what is addressed to the entry.
                PolicyTarget::ServiceEntry(_)
                | PolicyTarget::Gateway(_)
                | PolicyTarget::GatewayClass(_) => None,
            });
        for (namespace, name) in targeted {
            let Some(service) = self
                .services
                .iter()
                .find(|s| s.namespace == namespace && s.name == name && !s.is_entry())
            else {
                continue;
            };
            let key = (namespace.to_owned(), name.to_owned());
            // Only pods of the Service's own namespace: a Service of another namespace whose
            // `EndpointSlice` lists a pod's address would otherwise add its own (permissive)
            // ALLOW policy to that pod's.
            let serving = crate::waypoint::serving(service, &self.workloads)
                .filter(|w| w.namespace == service.namespace);
            for workload in serving {
                let services = index
                    .entry((workload.namespace.clone(), workload.name.clone()))
                    .or_default();
                if !services.contains(&key) {
                    services.push(key.clone());
                }
            }
        }
        index
    }

    /// Each target of the waypoints' policies (`AuthorizationPolicy`, `RequestAuthentication`):
    /// the policy (`Kind namespace/name`), its namespace and the target.
    fn waypoint_policy_targets(&self) -> impl Iterator<Item = (String, &str, &PolicyTarget)> {
        let authorization = self.authz.policies().iter().flat_map(|policy| {
            let what = format!("AuthorizationPolicy {policy}");
            let namespace = policy.namespace.as_str();
            policy
                .targets
                .iter()
                .map(move |target| (what.clone(), namespace, target))
        });
        let authentication = self.authn.all().iter().flat_map(|ra| {
            let what = format!("RequestAuthentication {}", ra.key);
            let namespace = ra.namespace.as_str();
            ra.targets
                .iter()
                .map(move |target| (what.clone(), namespace, target))
        });
        authorization
            .chain(authentication)
            .chain(self.rate_limits.targets())
    }

    /// A warning for each target of a waypoint's policy that nothing enforces:
    /// a Service that no waypoint serves (its traffic goes straight to its pods, whose agents
    /// do not read such a policy), a `Gateway` that is no waypoint. Istio users hit exactly
    /// this: the policy is in the cluster and nothing enforces it.
    fn unenforced_waypoint_policies(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (policy, namespace, target) in self.waypoint_policy_targets() {
            {
                match target {
                    PolicyTarget::Service(_) | PolicyTarget::ServiceEntry(_) => {
                        let unbound = self.targeted_service(namespace, target).is_some_and(|s| {
                            matches!(self.service_waypoint(s), WaypointBinding::None)
                        });
                        if unbound {
                            let kind = if matches!(target, PolicyTarget::Service(_)) {
                                "Service"
                            } else {
                                "ServiceEntry"
                            };
                            let name = target.addressed_name().map_or("", |(n, _)| n);
                            warnings.push(format!(
                                "{policy} targets {kind} {namespace}/{name}, \
                                 which no waypoint serves: nothing enforces it (bind the {kind} \
                                 to a waypoint with `istio.io/use-waypoint`, or use a selector)"
                            ));
                        }
                    }
                    PolicyTarget::Gateway(name) => {
                        let known = self
                            .waypoints
                            .all()
                            .any(|w| w.namespace == namespace && &w.name == name);
                        if !known {
                            warnings.push(format!(
                                "{policy} targets Gateway {namespace}/{name}, \
                                 which is not a waypoint (class `istio-waypoint`): nothing \
                                 enforces it"
                            ));
                        }
                    }
                    PolicyTarget::GatewayClass(_) => {}
                }
            }
        }
        warnings
    }

    /// Checks the routing objects' names and builds the routing index.
    fn index_routes(
        &mut self,
        (http_routes, grpc_routes): (&Named<'_, k8s::HttpRoute>, &Named<'_, k8s::GrpcRoute>),
        (tcp_routes, tls_routes): (&Named<'_, k8s::TcpRoute>, &Named<'_, k8s::TlsRoute>),
        (virtual_services, destination_rules): (
            &Named<'_, k8s::VirtualService>,
            &Named<'_, k8s::DestinationRule>,
        ),
        reference_grants: &Named<'_, k8s::ReferenceGrant>,
        root_namespace: &str,
    ) -> Result<(), StateError> {
        let routes = http_routes
            .values()
            .map(|r| (Kind::HttpRoute, &r.metadata, &r.spec))
            .chain(
                grpc_routes
                    .values()
                    .map(|r| (Kind::GrpcRoute, &r.metadata, &r.spec.0)),
            );
        let istio = virtual_services
            .values()
            .map(|o| (Kind::VirtualService, &o.metadata))
            .chain(
                destination_rules
                    .values()
                    .map(|o| (Kind::DestinationRule, &o.metadata)),
            )
            .chain(
                reference_grants
                    .values()
                    .map(|o| (Kind::ReferenceGrant, &o.metadata)),
            );
        // `v1` and `v1alpha3` require hostnames (the API server refuses a route without);
        // from files too.
        if let Some(route) = tls_routes
            .values()
            .find(|r| r.spec.hostnames.is_empty() && !r.api_version.ends_with("/v1alpha2"))
        {
            return Err(StateError::HostnamesRequired {
                object: ObjectRef::namespaced(Kind::TlsRoute, &route.metadata),
                api_version: route.api_version.clone(),
            });
        }
        let l4_routes: Vec<L4Route<'_>> = tcp_routes
            .values()
            .map(|r| L4Route {
                kind: Kind::TcpRoute,
                meta: &r.metadata,
                parent_refs: &r.spec.parent_refs,
                hostnames: None,
                rule: &r.spec.rule,
            })
            .chain(tls_routes.values().map(|r| L4Route {
                kind: Kind::TlsRoute,
                meta: &r.metadata,
                parent_refs: &r.spec.parent_refs,
                hostnames: Some(&r.spec.hostnames),
                rule: &r.spec.rule,
            }))
            .collect();
        let names = routes
            .clone()
            .map(|(kind, meta, _)| (kind, meta))
            .chain(l4_routes.iter().map(|r| (r.kind, r.meta)))
            .chain(istio);
        for (kind, meta) in names {
            let object = ObjectRef::namespaced(kind, meta);
            check_name(&object, "metadata.name", meta.name(), NameRule::Subdomain)?;
        }
        let by_name = self
            .services
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
            .collect();
        self.http_routes = HttpRouteIndex::build(
            (routes, l4_routes),
            (
                virtual_services.values().copied(),
                destination_rules.values().copied(),
            ),
            &ServiceGrants::build(reference_grants.values().copied()),
            (&by_name, root_namespace),
        );
        Ok(())
    }

    fn index_workload(
        &mut self,
        workload: &Arc<Workload>,
        pod: &k8s::Pod,
    ) -> Result<(), StateError> {
        if !workload.host_network {
            for ip in &workload.ips {
                if let Some(other) = self.by_ip.insert(*ip, Arc::clone(workload)) {
                    return Err(StateError::DuplicateIp {
                        object: pod_ref(pod),
                        field: "status.podIPs".to_owned(),
                        ip: *ip,
                        other: Box::new(workload_ref(&other)),
                    });
                }
            }
        }
        if let Some(node) = &workload.node {
            self.by_node
                .entry(node.clone())
                .or_default()
                .push(Arc::clone(workload));
        }
        self.workloads.push(Arc::clone(workload));
        Ok(())
    }

    /// Indexes `service` (written as `object`) by its addresses' TCP ports and its hosts.
    /// `vip_field(index)` and `port_field(index)` name the fields of its `index`th address and
    /// port in errors. An address that is a pod's, or an address and port another Service (or
    /// entry) claims, is refused; so is a `ServiceEntry` host another Service answers to.
    fn index_service(
        &mut self,
        service: &Arc<Service>,
        object: &ObjectRef,
        (vip_field, port_field): (&dyn Fn(usize) -> String, &dyn Fn(usize) -> String),
    ) -> Result<(), StateError> {
        for (index, vip) in service.vips.iter().enumerate() {
            if let Some(owner) = self.by_ip.get(vip) {
                return Err(StateError::DuplicateIp {
                    object: object.clone(),
                    field: vip_field(index),
                    ip: *vip,
                    other: Box::new(workload_ref(owner)),
                });
            }
        }
        let claimed_by = |other: &Service| ObjectRef {
            kind: match other.kind {
                crate::model::ServiceKind::Kubernetes => Kind::Service,
                crate::model::ServiceKind::Entry(_) => Kind::ServiceEntry,
            },
            namespace: Some(other.namespace.clone()),
            name: other.name.clone(),
        };
        for (index, port) in service.ports.iter().enumerate() {
            if port.protocol != Protocol::Tcp {
                continue;
            }
            for vip in &service.vips {
                let addr = SocketAddr::new(*vip, port.port);
                match self.by_addr.entry(addr) {
                    Entry::Occupied(entry) => {
                        return Err(StateError::DuplicateServicePort {
                            object: object.clone(),
                            field: port_field(index),
                            addr,
                            other: Box::new(claimed_by(&entry.get().0)),
                        });
                    }
                    Entry::Vacant(entry) => {
                        entry.insert((Arc::clone(service), index));
                    }
                }
            }
        }
        let entry_hosts = match &service.kind {
            crate::model::ServiceKind::Kubernetes => 0,
            crate::model::ServiceKind::Entry(facts) => facts.hosts.len(),
        };
        for (index, host) in service.hosts().enumerate() {
            if let Some(other) = self.by_hostname.get(host) {
                if entry_hosts > 0 {
                    return Err(StateError::DuplicateHost {
                        object: object.clone(),
                        field: format!("spec.hosts[{index}]"),
                        host: host.to_owned(),
                        other: Box::new(claimed_by(other)),
                    });
                }
            }
        }
        if let crate::model::ServiceKind::Entry(_) = service.kind {
            if let Some(other) = self
                .services
                .iter()
                .find(|s| s.namespace == service.namespace && s.name == service.name)
            {
                return Err(StateError::EntryNameTaken {
                    object: object.clone(),
                    other: Box::new(claimed_by(other)),
                });
            }
        }
        self.services.push(Arc::clone(service));
        for host in service.hosts() {
            // A wildcard host names the entry for routes; no lookup is by a wildcard.
            if !host.starts_with('*') {
                self.by_hostname
                    .insert(host.to_owned(), Arc::clone(service));
            }
        }
        Ok(())
    }

    /// Sets the generation and the source's current errors (done by the source that publishes).
    #[must_use]
    pub(crate) fn with_status(mut self, generation: u64, errors: Vec<SourceError>) -> Self {
        self.generation = generation;
        self.errors = errors;
        self
    }

    /// Number of this snapshot; each published snapshot has a higher one.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Problems of the source when this snapshot was made (files that failed to parse or were
    /// rejected; their last good objects are in this state).
    pub fn errors(&self) -> &[SourceError] {
        &self.errors
    }

    /// Problems of valid objects that do not stop the state from being built, one line each:
    /// `EndpointSlices` left out (`FQDN` slices, slices of no service), conflicting `PeerAuthentications` (the oldest applies), `PeerAuthentications` that apply to
    /// nothing, then `AuthorizationPolicies` for waypoints (not enforced by the agent), rules with
    /// HTTP (L7) fields (an ALLOW or AUDIT rule matches nothing, a DENY rule is enforced without
    /// them), DENY or AUDIT policies without rules. The source logs each once, when it appears.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The workload `namespace/name`, if the view has it (with or without an address yet).
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Arc<Workload>> {
        self.workloads
            .binary_search_by(|w| (w.namespace.as_str(), w.name.as_str()).cmp(&(namespace, name)))
            .ok()
            .map(|index| &self.workloads[index])
    }

    /// All workloads, sorted by namespace and name.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// Workloads scheduled on `node`, enrolled or not, sorted by namespace and name.
    pub fn workloads_on_node(&self, node: &str) -> std::slice::Iter<'_, Arc<Workload>> {
        self.by_node.get(node).map_or(&[][..], Vec::as_slice).iter()
    }

    /// The pod that has address `ip` (host-network pods excluded). IPv4-mapped IPv6 addresses
    /// are looked up as IPv4.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// All services, sorted by namespace and name.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The service whose hostname ([`Service::hostname`]) is `host`, exactly as written.
    pub fn service_by_hostname(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_hostname.get(host)
    }

    /// The Service (and the index of its port) whose address and port `dst` is, when its
    /// address captures the connections of a client of `client_namespace` (`None`: a client
    /// the view does not know): a `ServiceEntry`'s only those of its scope.
    fn captured(
        &self,
        client_namespace: Option<&str>,
        dst: SocketAddr,
    ) -> Option<&(Arc<Service>, usize)> {
        self.by_addr
            .get(&dst)
            .filter(|(service, _)| service.captured_for(client_namespace))
    }

    /// The Service and port at address `addr` whose address captures the connections of a
    /// client of `client_namespace` ([`Self::service_by_addr`], with a `ServiceEntry`'s scope).
    pub fn service_for_client(
        &self,
        client_namespace: &str,
        addr: SocketAddr,
    ) -> Option<(&Arc<Service>, &ServicePort)> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let (service, index) = self.captured(Some(client_namespace), addr)?;
        Some((service, &service.ports[*index]))
    }

    /// The service and port at VIP `addr` (TCP ports only), whoever the client.
    pub fn service_by_addr(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &ServicePort)> {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        let (service, index) = self.by_addr.get(&addr)?;
        Some((service, &service.ports[*index]))
    }

    /// All `PeerAuthentications`, sorted by namespace and name.
    pub fn peer_authentications(&self) -> &[Arc<PeerAuthPolicy>] {
        self.peer_auth.policies()
    }

    /// The inbound mTLS mode of `workload` on `port` (the workload's port, not a service port),
    /// and the policy that decided it: the workload's selector policy (its `portLevelMtls` entry
    /// for `port` first), else its namespace's policy, else the mesh-wide one, skipping `UNSET`
    /// modes; PERMISSIVE if none sets a mode. `DISABLE` gives [`MtlsMode::Permissive`] (see
    /// there). Whether the workload is enrolled is not considered; see the [`super::peer_auth`]
    /// module for the rules.
    ///
    /// [`MtlsMode::Permissive`]: super::MtlsMode::Permissive
    pub fn peer_authentication(&self, workload: &Workload, port: u16) -> PeerAuthDecision {
        self.peer_auth.decide(workload, port)
    }

    /// All `AuthorizationPolicies`, sorted by namespace and name, with their rules as enforced
    /// (serializable, for the admin interface's config dump).
    pub fn authorization_policies(&self) -> &[Arc<AuthzPolicy>] {
        self.authz.policies()
    }

    /// How many `EnvoyFilters` there are.
    pub fn envoy_filters(&self) -> usize {
        self.rate_limits.len()
    }

    /// The `EnvoyFilters`, as the waypoints read them, sorted by namespace and name.
    pub(crate) fn envoy_filter_list(&self) -> &[crate::ratelimit::Filter] {
        self.rate_limits.filters()
    }

    /// What each Service `parentRef` of each route came to.
    pub(crate) fn route_parents(&self) -> &[crate::http_route::ParentRecord] {
        self.http_routes.parents()
    }

    /// The `RequestAuthentications`, sorted by namespace and name.
    pub(crate) fn request_authentication_list(&self) -> &[Arc<crate::authn::RequestAuthn>] {
        self.authn.all()
    }

    /// The local rate limits (`EnvoyFilter`) that apply at waypoint `namespace/name` to a
    /// request to `dst` (a Service's VIP and port, or a pod's address and port) for `service`
    /// (`None`: addressed to a pod), in order; see [`super::ratelimit`].
    pub fn rate_limits_at_waypoint(
        &self,
        waypoint: (&str, &str),
        service: Option<&Service>,
        dst: SocketAddr,
    ) -> Vec<&Arc<RateLimit>> {
        if self.rate_limits.len() == 0 {
            return Vec::new();
        }
        let serving = self.policy_services_of(service, dst.ip());
        self.rate_limits.applying(waypoint, &serving, dst)
    }

    /// How many `RequestAuthentications` there are.
    pub fn request_authentications(&self) -> usize {
        self.authn.all().len()
    }

    /// Whether the `AuthorizationPolicies` let `conn` in, as ztunnel decides at L4: denied if a
    /// DENY policy that applies to the destination workload matches; else, if ALLOW policies
    /// apply, allowed only if one matches; else allowed. AUDIT policies that match are listed
    /// and do not change the verdict. Only the policies that apply to the destination's
    /// namespace (and the root namespace's) are evaluated. See the [`super::authz`] module for
    /// the rules.
    pub fn authorize(&self, conn: &ConnFacts<'_>) -> AuthzDecision {
        self.authz.decide(conn)
    }

    /// Whether the waypoint `namespace/name` lets a request (or a TCP connection it passes
    /// through) to `service` go on, by the `AuthorizationPolicies` that target it, its class or
    /// `service`. `None`: addressed to a pod bound to the waypoint (`facts.dst`), to which the
    /// policies of the Services serving it apply as well (stricter than Istio, which applies
    /// them only to traffic addressed to the Service: a client could otherwise dodge a
    /// Service's policy by dialling its pods). See the [`super::authz::waypoint`] module for
    /// the attributes and rules.
    pub fn authorize_at_waypoint(
        &self,
        waypoint: (&str, &str),
        service: Option<&Service>,
        facts: &WaypointFacts<'_>,
    ) -> AuthzDecision {
        let serving = self.policy_services_of(service, facts.dst.ip());
        self.authz.decide_at_waypoint(waypoint, &serving, facts)
    }

    /// A warning for each `ServiceEntry` of resolution `DNS` that no waypoint serves: only a
    /// waypoint resolves names, so the node agents refuse its connections (unless it also has
    /// endpoints by address).
    fn unresolved_entries(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.dns_first_answer().is_some())
            .filter(|s| !matches!(self.service_waypoint(s), WaypointBinding::Bound(_)))
            .map(|s| {
                format!(
                    "ServiceEntry {s} is resolved by DNS, which only a waypoint does: bind it to \
                     one (istio.io/use-waypoint); the node agents refuse its connections to \
                     names meanwhile"
                )
            })
            .collect()
    }

    /// The Service or `ServiceEntry` of `namespace` that policy `target` names, if any.
    pub(crate) fn targeted_service(
        &self,
        namespace: &str,
        target: &PolicyTarget,
    ) -> Option<&Arc<Service>> {
        let (name, entry) = target.addressed_name()?;
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name && s.is_entry() == entry)
    }

    /// The Services whose waypoint policies apply to a request: `service`, when addressed to
    /// one; else the Services of the pod at `dst` that waypoints' policies target.
    fn policy_services_of<'s>(
        &'s self,
        service: Option<&'s Service>,
        dst: IpAddr,
    ) -> Vec<crate::policy_target::Addressed<'s>> {
        if let Some(s) = service {
            return vec![crate::policy_target::Addressed::of(s)];
        }
        self.workload_by_ip(dst)
            .and_then(|w| {
                self.policy_services
                    .get(&(w.namespace.clone(), w.name.clone()))
            })
            .map(|services| {
                services
                    .iter()
                    .map(|(ns, name)| crate::policy_target::Addressed::Service(ns, name))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where the key sets of the `RequestAuthentication` rules waypoint `namespace/name` may
    /// apply (its class's, its own, its Services') are fetched from (their `jwksUri`s, or
    /// their issuers' discovery documents), with their fetch `timeout`s, each once.
    pub fn key_sources_at_waypoint(
        &self,
        (namespace, name): (&str, &str),
    ) -> Vec<(crate::authn::KeySource, Option<std::time::Duration>)> {
        let ours = |ra_namespace: &str, target: &PolicyTarget| match target {
            PolicyTarget::GatewayClass(_) => true,
            PolicyTarget::Gateway(gateway) => ra_namespace == namespace && gateway == name,
            PolicyTarget::Service(_) | PolicyTarget::ServiceEntry(_) => self
                .targeted_service(ra_namespace, target)
                .is_some_and(|s| match self.service_waypoint(s) {
                    WaypointBinding::Bound(w) => w.namespace == namespace && w.name == name,
                    _ => false,
                }),
        };
        let mut sources: Vec<(crate::authn::KeySource, Option<std::time::Duration>)> = Vec::new();
        for ra in self.authn.all() {
            if !ra.targets.iter().any(|t| ours(&ra.namespace, t)) {
                continue;
            }
            for provider in &ra.providers {
                if let crate::authn::JwtKeys::Remote(source) = &provider.keys {
                    if !sources.iter().any(|(s, _)| s == source) {
                        sources.push((source.clone(), provider.timeout));
                    }
                }
            }
        }
        sources
    }

    /// The `RequestAuthentication` rules that apply at waypoint `namespace/name` to a request
    /// for `service` (or, `None`, for the pod at `dst`), in order; see [`super::authn`]. Check
    /// a request's tokens against them with [`super::authn::authenticate`].
    pub fn jwt_rules_at_waypoint(
        &self,
        waypoint: (&str, &str),
        service: Option<&Service>,
        dst: IpAddr,
    ) -> Vec<&JwtProvider> {
        if self.authn.all().is_empty() {
            return Vec::new();
        }
        let serving = self.policy_services_of(service, dst);
        self.authn.providers(waypoint, &serving)
    }

    /// What a waypoint does with an HTTP `request` for `service`'s `port` from a client in
    /// `client_namespace`: the `HTTPRoute` rule that matches, a 404 when routes attach to the
    /// port and none matches, or the Service itself when none attaches. See the
    /// [`super::http_route`] module for attachment and precedence.
    pub fn route_http(
        &self,
        service: &Service,
        port: u16,
        client_namespace: &str,
        request: &RequestFacts<'_>,
    ) -> RouteDecision<'_> {
        self.http_routes
            .decide(service, port, client_namespace, request)
    }

    /// The `VirtualService` `tcp` rule that takes a connection a waypoint passes on as TCP to
    /// `service`'s `port`, from a client in `client_namespace` (a rule of the Service's or the
    /// root namespace for every client, one of another namespace for its own clients, as for
    /// HTTP); `None`: the connection goes to the Service itself ([`Self::default_backend`]).
    pub fn route_tcp(
        &self,
        service: &Service,
        port: u16,
        client_namespace: &str,
    ) -> Option<&crate::http_route::ResolvedRule> {
        self.http_routes.decide_tcp(service, port, client_namespace)
    }

    /// The `VirtualService` `tls` rule that takes a TLS connection asking for server name `sni`
    /// (its client hello's SNI), passed on as TCP to `service`'s `port`, from a client in
    /// `client_namespace`; `None`: none (the `tcp` rules, then the Service itself, apply).
    pub fn route_tls(
        &self,
        service: &Service,
        port: u16,
        client_namespace: &str,
        sni: &str,
    ) -> Option<&crate::http_route::ResolvedRule> {
        self.http_routes
            .decide_tls(service, port, client_namespace, sni)
    }

    /// Every `connectionPool` this view's `DestinationRules` give a destination (merged with
    /// their subsets' and ports' settings, as requests get them): a waypoint lets go of the
    /// connections it keeps under settings no longer given, as Envoy drains a changed
    /// cluster's.
    pub fn connection_pools(&self) -> std::collections::HashSet<&ConnectionPool> {
        self.http_routes.connection_pools().collect()
    }

    /// Whether `tls` rules attach to `service`'s `port`: a waypoint reads the server name its
    /// TLS connections ask for.
    pub fn tls_routes_attach(&self, service: &Service, port: u16) -> bool {
        self.http_routes.tls_routes_attach(service, port)
    }

    /// What a waypoint serves on `service`'s `port`: what the port declares, except that an
    /// undeclared port ([`AppProtocol::Unknown`]) to which routes attach is HTTP (TCP, passed on
    /// unsniffed, when only `TCPRoute`s or `TLSRoute`s attach). Routes say the
    /// port carries HTTP; were it sniffed, a client that sent something the sniffer does not
    /// take for HTTP (a method it does not list, a blank line first), or nothing for a while,
    /// would pass as TCP to the Service around the routes, to a server that may read it as
    /// HTTP all the same. A server-first protocol on such a port must be declared (`tcp`,
    /// `mysql`, ...), as Istio asks of undeclared ports.
    pub fn waypoint_protocol(&self, service: &Service, port: &ServicePort) -> AppProtocol {
        match port.app_protocol {
            AppProtocol::Unknown if self.http_routes.routes_attach(service, port.port) => {
                AppProtocol::Http
            }
            // Only TCPRoutes or TLSRoutes: TCP, passed on without sniffing.
            AppProtocol::Unknown
                if self.http_routes.l4_routes_attach(&(
                    service.namespace.clone(),
                    service.name.clone(),
                    port.port,
                )) =>
            {
                AppProtocol::Opaque
            }
            declared => declared,
        }
    }

    /// Whether traffic addressed to `service` goes through a waypoint; see the
    /// [`super::waypoint`] module.
    pub fn service_waypoint(&self, service: &Service) -> &WaypointBinding {
        static NONE: WaypointBinding = WaypointBinding::None;
        self.bindings
            .services
            .get(&(service.namespace.clone(), service.name.clone()))
            .unwrap_or(&NONE)
    }

    /// Whether traffic addressed to `workload` itself (its own address) goes through a waypoint.
    pub fn workload_waypoint(&self, workload: &Workload) -> &WaypointBinding {
        static NONE: WaypointBinding = WaypointBinding::None;
        self.bindings
            .workloads
            .get(&(workload.namespace.clone(), workload.name.clone()))
            .unwrap_or(&NONE)
    }

    /// The waypoint `workload` is a pod of, if any: its traffic never goes through a waypoint,
    /// and a waypoint process finds its own routes by it.
    pub fn waypoint_of_pod(&self, workload: &Workload) -> Option<&Arc<Waypoint>> {
        self.waypoints.of_pod(workload)
    }

    /// Whether a connection from `src_ip` with proven identity `src` to `dst` came through a
    /// waypoint in front of `dst`.
    pub fn waypoint_guard(
        &self,
        dst: &Workload,
        src_ip: IpAddr,
        src: Option<&mesh_identity::Identity>,
    ) -> crate::waypoint::Guard {
        self.bindings.check(dst, src_ip.to_canonical(), src)
    }

    /// The waypoint of `Gateway` `namespace/name`, if it is one.
    pub fn waypoint(&self, namespace: &str, name: &str) -> Option<&Arc<Waypoint>> {
        self.waypoints.named(namespace, name)
    }

    /// All waypoints (`Gateways` of class `istio-waypoint`), sorted by namespace and name.
    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<Waypoint>> {
        self.waypoints.all()
    }

    /// The backend for a request to `service`'s own `port` (no route applies), with the load
    /// balancer its `DestinationRule` sets.
    pub fn default_backend(&self, service: &Arc<Service>, port: u16) -> crate::http_route::Backend {
        self.http_routes.default_backend(service, port)
    }

    /// Where a TCP connection from `src` (a pod, when the caller knows it) to `dst` goes, waypoints
    /// included: a Service VIP bound to a waypoint, or a pod address bound to one, goes to the
    /// waypoint ([`Resolution::Waypoint`], or [`Resolution::WaypointUnavailable`] when it
    /// cannot take it), unless `src` is one of that waypoint's own pods; anything else as
    /// [`Self::resolve`].
    pub fn resolve_from(&self, src: Option<&Workload>, dst: SocketAddr) -> Resolution {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let (service, binding) = match self.captured(src.map(|s| s.namespace.as_str()), dst) {
            Some((service, _)) => (Some(service), self.service_waypoint(service)),
            None => match self.by_ip.get(&dst.ip()) {
                Some(workload) => (None, self.workload_waypoint(workload)),
                None => return Resolution::Passthrough,
            },
        };
        match binding {
            WaypointBinding::None if service.is_some() => self.through_endpoint_waypoint(src, dst),
            binding => self.through(binding, src, service.cloned(), dst, || {
                self.resolve_near(src, dst)
            }),
        }
    }

    /// A Service without waypoint: its endpoint, chosen as [`Self::resolve`] does; when that
    /// endpoint's pod is bound to a waypoint for workload traffic (a per-service-account
    /// waypoint, or its own label), through that waypoint with the endpoint as `:authority`
    /// (as ztunnel does), so that the destination's agent sees it come through its waypoint.
    fn through_endpoint_waypoint(&self, src: Option<&Workload>, dst: SocketAddr) -> Resolution {
        let resolved = self.resolve_near(src, dst);
        let Resolution::Service {
            service,
            endpoint,
            workload: Some(workload),
        } = &resolved
        else {
            return resolved;
        };
        let (service, endpoint) = (Arc::clone(service), *endpoint);
        let binding = self.workload_waypoint(workload);
        self.through(binding, src, Some(service), endpoint, move || resolved)
    }

    /// Where a connection from `src` for `authority` goes under `binding`: `direct` when there
    /// is no waypoint or `src` is a waypoint's own pod; else over HBONE to a pod of the waypoint
    /// (of `authority`'s family), or refused when the waypoint cannot take it (fail closed).
    fn through(
        &self,
        binding: &WaypointBinding,
        src: Option<&Workload>,
        service: Option<Arc<Service>>,
        authority: SocketAddr,
        direct: impl FnOnce() -> Resolution,
    ) -> Resolution {
        match binding {
            WaypointBinding::None => direct(),
            WaypointBinding::Bound(waypoint) if src.is_some_and(|s| waypoint.has_pod(s)) => {
                direct()
            }
            WaypointBinding::Bound(waypoint) => {
                match waypoint.pick(authority.ip(), src.map(Workload::place)) {
                    Some((pod, addr)) => Resolution::Waypoint {
                        service,
                        waypoint: Arc::clone(waypoint),
                        pod: Arc::clone(pod),
                        addr,
                        authority,
                    },
                    None => Resolution::WaypointUnavailable {
                        service,
                        reason: crate::waypoint::Unavailable::NotReady {
                            waypoint: format!("{waypoint} (no pod of the destination's family)"),
                        },
                    },
                }
            }
            WaypointBinding::Unavailable(_)
                if src.is_some_and(|s| self.waypoint_of_pod(s).is_some()) =>
            {
                direct()
            }
            WaypointBinding::Unavailable(reason) => Resolution::WaypointUnavailable {
                service,
                reason: reason.clone(),
            },
        }
    }

    /// Where a TCP connection to `dst` goes. A service VIP and port resolves to one of its ready
    /// endpoints that has an address of `dst`'s family, chosen **round-robin**: each service port
    /// keeps an `AtomicUsize` cursor in this (shared) state, advanced by every resolution, so
    /// concurrent callers spread over the endpoints; a new snapshot starts again at the first.
    /// IPv4-mapped IPv6 destinations are treated as IPv4.
    pub fn resolve(&self, dst: SocketAddr) -> Resolution {
        self.resolve_near(None, dst)
    }

    /// [`Self::resolve`] for a connection from `src`: under the Service's traffic distribution
    /// (`spec.trafficDistribution`), among the endpoints closest to `src`
    /// ([`crate::locality`]).
    pub fn resolve_near(&self, src: Option<&Workload>, dst: SocketAddr) -> Resolution {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        if let Some((service, index)) = self.captured(src.map(|s| s.namespace.as_str()), dst) {
            let port = &service.ports[*index];
            let picked = if service.keeps_destination() {
                port.endpoint_at(dst.ip())
            } else {
                port.pick(
                    dst.ip(),
                    (service.traffic_distribution, src.map(Workload::place)),
                )
            };
            return match picked {
                Some((endpoint, addr)) => Resolution::Service {
                    service: Arc::clone(service),
                    endpoint: addr,
                    workload: endpoint.workload.clone(),
                },
                None => Resolution::NoEndpoint {
                    service: Arc::clone(service),
                },
            };
        }
        match self.by_ip.get(&dst.ip()) {
            Some(workload) => Resolution::Workload {
                workload: Arc::clone(workload),
            },
            None => Resolution::Passthrough,
        }
    }
}
