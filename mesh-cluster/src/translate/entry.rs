//! A `ServiceEntry` made a [`Service`] of the model ([`crate::service_entry`] says how).

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    endpoints::BuiltPod,
    error::StateError,
    k8s::{Kind, ObjectRef},
    meta::MetaExt,
    model::{
        not_terminating_first, AppProtocol, DnsName, Endpoint, EntryFacts, EntryResolution,
        EntryScope, Protocol, Service, ServiceKind, ServicePort, TargetPort, Workload,
    },
    service_entry::{
        single_address, EndpointAddress, EntryEndpoint, EntryPort, ServiceEntry, ServiceEntrySpec,
    },
};

/// The reference to an entry, for errors and warnings.
pub(crate) fn entry_ref(entry: &ServiceEntry) -> ObjectRef {
    ObjectRef::namespaced(Kind::ServiceEntry, &entry.metadata)
}

/// The scope of an entry of `namespace` with `export_to` (as the module says); a warning when a
/// tenant's `exportTo` asks for more than its own namespace.
fn entry_scope(
    object: &ObjectRef,
    (namespace, root_namespace): (&str, &str),
    export_to: &[String],
    warnings: &mut Vec<String>,
) -> EntryScope {
    let own = |e: &String| e == "." || e == namespace;
    if namespace != root_namespace {
        if !export_to.iter().all(own) {
            warnings.push(format!(
                "{object}: spec.exportTo {export_to:?} is narrowed to its own namespace: only \
                 entries of the root namespace ({root_namespace}) are captured for other \
                 namespaces' clients"
            ));
        }
        return EntryScope::Namespace;
    }
    if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
        return EntryScope::Mesh(None);
    }
    let namespaces = export_to
        .iter()
        .map(|e| if e == "." { namespace } else { e.as_str() })
        .map(str::to_owned)
        .collect();
    EntryScope::Mesh(Some(namespaces))
}

/// The model's Service of `entry`: its ports with their endpoints (`pods`: the pods of its
/// namespace; `by_ip`: every pod by address), its scope, and warnings.
pub(crate) fn service_from_entry(
    entry: &ServiceEntry,
    pods: &[BuiltPod],
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
    root_namespace: &str,
    warnings: &mut Vec<String>,
) -> Result<Service, StateError> {
    let object = entry_ref(entry);
    crate::names::check_namespaced(&object, &entry.metadata)?;
    let spec = &entry.spec;
    let vips = entry_addresses(entry, &object)?;
    if vips.is_empty() {
        warnings.push(format!(
            "{object}: no addresses (spec.addresses, or Istio's status.addresses): no connection \
             is captured for it; routes and policies may still name it"
        ));
    }
    let selected: Vec<&BuiltPod> = match &spec.workload_selector {
        None => Vec::new(),
        Some(selector) => {
            let ready = pods
                .iter()
                .filter(|p| p.workload.readiness.serving() && !p.workload.ips.is_empty())
                .filter(|p| {
                    selector
                        .iter()
                        .all(|(k, v)| p.workload.labels.get(k) == Some(v))
                })
                .collect();
            not_terminating_first(ready, |p| &p.workload)
        }
    };
    let ports = spec
        .ports
        .iter()
        .map(|p| entry_port(spec, p, (&vips, &selected), by_ip))
        .collect();
    let namespace = entry.metadata.namespace();
    let scope = entry_scope(
        &object,
        (namespace, root_namespace),
        &spec.export_to,
        warnings,
    );
    Ok(Service {
        hostname: spec.hosts[0].clone(),
        namespace: namespace.to_owned(),
        name: entry.metadata.name().to_owned(),
        vips,
        selector: spec.workload_selector.clone().unwrap_or_default(),
        ports,
        traffic_distribution: None,
        kind: ServiceKind::Entry(EntryFacts {
            hosts: spec.hosts.clone(),
            location: spec.location,
            resolution: spec.resolution,
            scope,
        }),
    })
}

/// The model's port of `spec`'s port `p`, with its endpoints: the entry's addresses
/// (resolution `NONE`), the `selected` pods' (a `workloadSelector`), or its endpoints' addresses;
/// and the names its waypoint resolves (resolution `DNS`: its endpoints' names, else its hosts).
fn entry_port(
    spec: &ServiceEntrySpec,
    p: &EntryPort,
    (vips, selected): (&[IpAddr], &[&BuiltPod]),
    by_ip: &HashMap<IpAddr, Arc<Workload>>,
) -> ServicePort {
    let endpoint = |ip: IpAddr, port: u16| Endpoint {
        addr: std::net::SocketAddr::new(ip, port),
        workload: by_ip.get(&ip).cloned(),
    };
    let target = p.target_port.unwrap_or(p.number);
    let port_of = |e: &EntryEndpoint| e.ports.get(&p.name).copied().unwrap_or(target);
    let mut dns: Vec<DnsName> = Vec::new();
    let mut endpoints: Vec<Endpoint> = match spec.resolution {
        EntryResolution::OriginalDestination => {
            vips.iter().map(|ip| endpoint(*ip, target)).collect()
        }
        EntryResolution::Static if spec.workload_selector.is_some() => selected
            .iter()
            .flat_map(|pod| pod.workload.ips.iter())
            .map(|ip| endpoint(*ip, target))
            .collect(),
        EntryResolution::Static | EntryResolution::Dns | EntryResolution::DnsFirstAnswer => {
            let mut ips = Vec::new();
            for e in &spec.endpoints {
                match &e.address {
                    EndpointAddress::Ip(ip) => ips.push(endpoint(*ip, port_of(e))),
                    EndpointAddress::Name(host) => dns.push(DnsName {
                        host: host.clone(),
                        port: port_of(e),
                    }),
                }
            }
            // Resolution DNS without endpoints: the hosts are the names.
            if spec.endpoints.is_empty() && spec.resolution != EntryResolution::Static {
                dns.extend(spec.hosts.iter().map(|host| DnsName {
                    host: host.clone(),
                    port: target,
                }));
            }
            ips
        }
    };
    dns.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    dns.dedup();
    endpoints.sort_by_key(|e| e.addr);
    endpoints.dedup_by_key(|e| e.addr);
    let protocol = if p.protocol.as_deref() == Some("UDP") {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    let mut port = ServicePort::new(
        Some(p.name.clone()),
        (p.number, protocol),
        TargetPort::Number(target),
        endpoints,
    );
    port.app_protocol = AppProtocol::of(p.protocol.as_deref(), Some(&p.name));
    port.dns = dns;
    port
}

/// The entry's addresses: `spec.addresses`, else those of `status.addresses` (Istio's
/// allocator, for entries that give none).
fn entry_addresses(entry: &ServiceEntry, object: &ObjectRef) -> Result<Vec<IpAddr>, StateError> {
    if !entry.spec.addresses.is_empty() {
        return Ok(entry.spec.addresses.clone());
    }
    let mut ips = Vec::new();
    let allocated = entry.status.as_ref().map_or(&[][..], |s| &s.addresses[..]);
    for (index, address) in allocated.iter().enumerate() {
        let field = format!("status.addresses[{index}].value");
        let ip = single_address(&address.value).map_err(|e| StateError::InvalidIp {
            object: object.clone(),
            field,
            value: format!("{} ({e})", address.value),
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}
