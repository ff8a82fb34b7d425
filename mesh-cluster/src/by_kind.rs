//! The objects of one build, sorted by kind and keyed by namespace and name, each once.

use std::collections::BTreeMap;

use crate::{
    error::StateError,
    k8s::{self, Object},
    meta::{MetaExt, ObjectMeta},
};

/// Namespaced objects of one kind by (namespace, name).
pub(crate) type Named<'a, T> = BTreeMap<(&'a str, &'a str), &'a T>;

/// The objects of one build, by kind.
#[derive(Default)]
pub(crate) struct ByKind<'a> {
    pub(crate) namespaces: BTreeMap<&'a str, &'a k8s::Namespace>,
    pub(crate) pods: Named<'a, k8s::Pod>,
    pub(crate) services: Named<'a, k8s::Service>,
    pub(crate) slices: Named<'a, k8s::EndpointSlice>,
    pub(crate) peer_auths: Named<'a, k8s::PeerAuthentication>,
    pub(crate) authz_policies: Named<'a, k8s::AuthorizationPolicy>,
    pub(crate) http_routes: Named<'a, k8s::HttpRoute>,
    pub(crate) gateways: Named<'a, k8s::Gateway>,
    pub(crate) grpc_routes: Named<'a, k8s::GrpcRoute>,
    pub(crate) tcp_routes: Named<'a, k8s::TcpRoute>,
    pub(crate) tls_routes: Named<'a, k8s::TlsRoute>,
    pub(crate) virtual_services: Named<'a, k8s::VirtualService>,
    pub(crate) destination_rules: Named<'a, k8s::DestinationRule>,
    pub(crate) service_entries: Named<'a, crate::service_entry::ServiceEntry>,
    pub(crate) reference_grants: Named<'a, k8s::ReferenceGrant>,
    pub(crate) request_authns: Named<'a, k8s::RequestAuthentication>,
    pub(crate) envoy_filters: Named<'a, k8s::EnvoyFilter>,
    pub(crate) nodes: BTreeMap<&'a str, &'a k8s::Node>,
}

impl<'a> ByKind<'a> {
    /// Sorts `objects`; an object defined twice is an error naming it.
    pub(crate) fn sort(objects: impl IntoIterator<Item = &'a Object>) -> Result<Self, StateError> {
        fn put<'a, T>(map: &mut Named<'a, T>, meta: &'a ObjectMeta, object: &'a T) -> bool {
            map.insert((meta.namespace(), meta.name()), object)
                .is_some()
        }
        let mut sorted = Self::default();
        for object in objects {
            let duplicate = match object {
                Object::Namespace(ns) => sorted.namespaces.insert(ns.metadata.name(), ns).is_some(),
                Object::Pod(o) => put(&mut sorted.pods, &o.metadata, o),
                Object::Service(o) => put(&mut sorted.services, &o.metadata, o),
                Object::EndpointSlice(o) => put(&mut sorted.slices, &o.metadata, o),
                Object::PeerAuthentication(o) => put(&mut sorted.peer_auths, &o.metadata, o),
                Object::AuthorizationPolicy(o) => put(&mut sorted.authz_policies, &o.metadata, o),
                Object::HttpRoute(o) => put(&mut sorted.http_routes, &o.metadata, o),
                Object::Gateway(o) => put(&mut sorted.gateways, &o.metadata, o),
                Object::GrpcRoute(o) => put(&mut sorted.grpc_routes, &o.metadata, o),
                Object::TcpRoute(o) => put(&mut sorted.tcp_routes, &o.metadata, o),
                Object::TlsRoute(o) => put(&mut sorted.tls_routes, &o.metadata, o),
                Object::VirtualService(o) => put(&mut sorted.virtual_services, &o.metadata, o),
                Object::DestinationRule(o) => put(&mut sorted.destination_rules, &o.metadata, o),
                Object::ServiceEntry(o) => put(&mut sorted.service_entries, &o.metadata, o),
                Object::ReferenceGrant(o) => put(&mut sorted.reference_grants, &o.metadata, o),
                Object::RequestAuthentication(o) => put(&mut sorted.request_authns, &o.metadata, o),
                Object::EnvoyFilter(o) => put(&mut sorted.envoy_filters, &o.metadata, o),
                Object::Node(node) => sorted.nodes.insert(node.metadata.name(), node).is_some(),
            };
            if duplicate {
                return Err(StateError::Duplicate {
                    object: object.object_ref(),
                });
            }
        }
        Ok(sorted)
    }
}
