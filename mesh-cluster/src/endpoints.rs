//! A service port's endpoints, from one of two places ([`EndpointsFrom`]):
//!
//! - **the pods its selector picks**, the model playing Kubernetes' endpoint controller (the
//!   directory source): ready pods with an address, the target port resolved per pod;
//! - **its `EndpointSlices`**, as kube-proxy reads them: the slices of the service's namespace
//!   labelled [`SERVICE_NAME_LABEL`] with its name; of each, the port whose name and protocol
//!   are the service port's, and the endpoints whose `ready` condition is not false. When no
//!   endpoint of the port is ready, the ones still `serving` while `terminating` take over, so a
//!   rolling update does not drop traffic (kube-proxy's behaviour since Kubernetes 1.28). An
//!   address listed by two slices (the controller moving it) counts once.
//!
//! A slice may name any address. The pod behind an address, and so the identity traffic is
//! tunnelled to, is looked up by address among the pods, never taken from the slice's
//! `targetRef`: a slice written in one namespace cannot lend another pod's identity to its
//! address.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    address::unusable_pod_address,
    error::StateError,
    k8s::{self, EndpointSlice, Kind, ObjectRef},
    model::{Endpoint, Protocol, TargetPort, Workload},
    options::EndpointsFrom,
};
use crate::meta::MetaExt;

/// A pod during the build: its workload and its object (for named container ports).
pub(crate) struct BuiltPod<'a> {
    pub(crate) workload: Arc<Workload>,
    pub(crate) pod: &'a k8s::Pod,
}

/// The label that ties an `EndpointSlice` to its Service (set by the controller manager, and by
/// anyone who writes slices for a service without selector).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The checked `EndpointSlices` of a state, by (namespace, service name).
#[derive(Default)]
pub(super) struct SliceIndex<'a> {
    /// Namespace → service name → slices.
    by_service: HashMap<&'a str, HashMap<&'a str, Vec<&'a EndpointSlice>>>,
}

/// How the slices of a build were read: the index, and one warning per slice left out.
pub(super) struct IndexedSlices<'a> {
    pub(super) index: SliceIndex<'a>,
    pub(super) warnings: Vec<String>,
}

impl<'a> SliceIndex<'a> {
    /// Checks every slice and indexes it under its service. Slices of the `FQDN` address type
    /// (which kube-proxy does not use either) and slices without the service label are left out
    /// with a warning.
    pub(super) fn build(
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Result<IndexedSlices<'a>, StateError> {
        let mut index = SliceIndex::default();
        let mut warnings = Vec::new();
        for slice in slices {
            let object = ObjectRef::namespaced(Kind::EndpointSlice, &slice.metadata);
            let v4 = match slice.address_type.as_str() {
                "IPv4" => true,
                "IPv6" => false,
                other => {
                    warnings.push(format!(
                        "{object}: addressType {other:?} is not used (only IPv4 and IPv6 slices are)"
                    ));
                    continue;
                }
            };
            check_slice(&object, slice, v4)?;
            let Some(service) = slice.metadata.labels().get(SERVICE_NAME_LABEL) else {
                warnings.push(format!(
                    "{object}: no {SERVICE_NAME_LABEL} label, so no Service uses it"
                ));
                continue;
            };
            index
                .by_service
                .entry(slice.metadata.namespace())
                .or_default()
                .entry(service.as_str())
                .or_default()
                .push(slice);
        }
        Ok(IndexedSlices { index, warnings })
    }

    fn of(&self, namespace: &str, service: &str) -> &[&'a EndpointSlice] {
        self.by_service
            .get(namespace)
            .and_then(|services| services.get(service))
            .map_or(&[][..], Vec::as_slice)
    }
}

/// Addresses must be of the slice's family and usable; ports in range.
fn check_slice(object: &ObjectRef, slice: &EndpointSlice, v4: bool) -> Result<(), StateError> {
    for (e, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        for (a, value) in endpoint.addresses.iter().enumerate() {
            let field = || format!("endpoints[{e}].addresses[{a}]");
            let ip = value.parse::<IpAddr>().map_err(|_| StateError::InvalidIp {
                object: object.clone(),
                field: field(),
                value: value.clone(),
            })?;
            if ip.is_ipv4() != v4 {
                return Err(StateError::AddressFamily {
                    object: object.clone(),
                    field: field(),
                    ip,
                    address_type: slice.address_type.clone(),
                });
            }
            if let Some(reason) = unusable_pod_address(ip) {
                return Err(StateError::UnusableEndpoint {
                    object: object.clone(),
                    field: field(),
                    ip,
                    reason,
                });
            }
        }
    }
    for (p, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(value) = port.port {
            if u16::try_from(value).map_or(true, |n| n == 0) {
                return Err(StateError::InvalidPort {
                    object: object.clone(),
                    field: format!("ports[{p}].port"),
                    value: i64::from(value),
                });
            }
        }
    }
    Ok(())
}

/// What the endpoints of one service port are computed from.
pub(super) struct PortSources<'s, 'a> {
    pub(super) from: EndpointsFrom,
    /// The service's namespace and name.
    pub(super) service: (&'s str, &'s str),
    /// The service has a selector.
    pub(super) has_selector: bool,
    /// The ready pods its selector picks (empty without selector).
    pub(super) selected: &'s [&'s BuiltPod<'a>],
    pub(super) slices: &'s SliceIndex<'a>,
    pub(super) by_ip: &'s HashMap<IpAddr, Arc<Workload>>,
}

impl PortSources<'_, '_> {
    /// The endpoints of the service port `name`, `port`/`protocol`, targeting `target_port`.
    pub(super) fn endpoints(
        &self,
        name: Option<&str>,
        protocol: Protocol,
        target_port: &TargetPort,
    ) -> Vec<Endpoint> {
        match (self.from, self.has_selector) {
            (EndpointsFrom::Selectors, true) => self.of_pods(protocol, target_port),
            (EndpointsFrom::Selectors, false) | (EndpointsFrom::Slices, _) => {
                self.of_slices(name, protocol)
            }
        }
    }

    fn of_pods(&self, protocol: Protocol, target_port: &TargetPort) -> Vec<Endpoint> {
        let mut endpoints = Vec::new();
        for pod in self.selected {
            let resolved = match target_port {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => named_port(pod.pod, name, protocol),
            };
            if let Some(port) = resolved {
                endpoints.extend(pod.workload.ips.iter().map(|ip| Endpoint {
                    addr: SocketAddr::new(*ip, port),
                    workload: Some(Arc::clone(&pod.workload)),
                }));
            }
        }
        endpoints
    }

    fn of_slices(&self, name: Option<&str>, protocol: Protocol) -> Vec<Endpoint> {
        let (namespace, service) = self.service;
        let wanted_name = name.unwrap_or_default();
        // Address → whether it is ready (else serving while terminating).
        let mut found: BTreeMap<SocketAddr, bool> = BTreeMap::new();
        for slice in self.slices.of(namespace, service) {
            let Some(port) = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or_default() == wanted_name
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
            }) else {
                continue;
            };
            // Checked by `check_slice`; a slice port without number means "all ports", which
            // kube-proxy does not serve either.
            let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for endpoint in slice.endpoints.iter().flatten() {
                let conditions = endpoint.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                if !(ready || serving && terminating) {
                    continue;
                }
                for address in &endpoint.addresses {
                    // Checked by `check_slice`.
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    let entry = found
                        .entry(SocketAddr::new(ip.to_canonical(), port))
                        .or_insert(ready);
                    *entry |= ready;
                }
            }
        }
        let any_ready = found.values().any(|ready| *ready);
        found
            .into_iter()
            .filter(|(_, ready)| *ready || !any_ready)
            .map(|(addr, _)| Endpoint {
                addr,
                workload: self.by_ip.get(&addr.ip()).cloned(),
            })
            .collect()
    }
}

/// The container port named `name` for `protocol` (already range-checked).
fn named_port(pod: &k8s::Pod, name: &str, protocol: Protocol) -> Option<u16> {
    let wanted = protocol.to_string();
    pod.spec
        .as_ref()
        .map_or(&[][..], |s| &s.containers)
        .iter()
        .flat_map(|c| c.ports.as_deref().unwrap_or_default())
        .find(|p| {
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == wanted
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
}

#[cfg(test)]
mod tests;
