//! Translation of one Kubernetes object into the agent's types, with the checks of its fields.
//! [`super::ClusterState::build`] calls these; the cross-object checks (duplicates, conflicts)
//! and the indexes are there.

use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc};

use mesh_identity::Identity;

use super::{
    address::unusable_pod_address,
    endpoints::{BuiltPod, PortSources, SliceIndex},
    error::StateError,
    k8s::{self, IntOrString, Kind, Labels, ObjectRef},
    locality::{Locality, TrafficDistribution, TRAFFIC_DISTRIBUTION_ANNOTATION},
    model::{
        not_terminating_first, AppProtocol, Protocol, Readiness, Service, ServicePort, Shortcut,
        TargetPort, Workload,
    },
    names::{check_name, check_namespaced, NameRule},
    options::{
        EnrollmentOptions, RuntimeHandles, CGROUP_ANNOTATION, NETNS_ANNOTATION, SHORTCUT_ANNOTATION,
    },
};
use crate::{k8s::PodExt, meta::MetaExt};

mod entry;
pub(super) use entry::{entry_ref, service_from_entry};

pub(super) fn pod_ref(pod: &k8s::Pod) -> ObjectRef {
    ObjectRef::namespaced(Kind::Pod, &pod.metadata)
}

pub(super) fn service_ref(svc: &k8s::Service) -> ObjectRef {
    ObjectRef::namespaced(Kind::Service, &svc.metadata)
}

pub(super) fn workload_ref(workload: &Workload) -> ObjectRef {
    ObjectRef {
        kind: Kind::Pod,
        namespace: Some(workload.namespace.clone()),
        name: workload.name.clone(),
    }
}

/// `pod` as a workload; `ns_meta` is its Namespace object's metadata, if there is one.
pub(super) fn workload_from(
    pod: &k8s::Pod,
    (ns_meta, node_locality): (Option<&k8s::ObjectMeta>, Option<&Locality>),
    opts: &EnrollmentOptions,
) -> Result<Workload, StateError> {
    let ns_labels: Option<&Labels> = ns_meta.map(MetaExt::labels);
    let object = pod_ref(pod);
    let meta = &pod.metadata;
    check_namespaced(&object, meta)?;
    let service_account = pod.service_account();
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    check_name(
        &object,
        "spec.serviceAccountName",
        service_account,
        NameRule::Subdomain,
    )?;

    let ips = addresses(
        &object,
        status
            .and_then(|s| s.pod_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|entry| entry.ip.as_str()),
        ("status.podIPs", "status.podIP"),
        status.and_then(|s| s.pod_ip.as_deref()),
    )?;
    if let Some((ip, reason)) = ips
        .iter()
        .find_map(|ip| unusable_pod_address(*ip).map(|reason| (*ip, reason)))
    {
        return Err(StateError::UnusableAddress {
            object,
            field: "status.podIPs",
            ip,
            reason,
        });
    }
    check_container_ports(&object, spec)?;
    let host_network = pod.host_network();
    let enrolled = !host_network && opts.is_enrolled(ns_labels, meta.labels());
    let (netns, cgroup) = match opts.runtime_handles {
        RuntimeHandles::Annotations => (
            annotation_path(&object, meta, NETNS_ANNOTATION)?,
            annotation_path(&object, meta, CGROUP_ANNOTATION)?,
        ),
        RuntimeHandles::Discovered => (None, None),
    };
    // The pod's own setting wins; the namespace's was checked when it was read.
    let ns_shortcut = ns_meta.and_then(|m| {
        let object = ObjectRef::cluster_scoped(Kind::Namespace, m);
        shortcut_annotation(&object, m).ok().flatten()
    });
    let shortcut = shortcut_annotation(&object, meta)?
        .or(ns_shortcut)
        .unwrap_or_default();
    let node = pod.node_name().map(str::to_owned);
    let on_this_node = !opts.node_name.is_empty() && node.as_deref() == Some(&opts.node_name);
    if enrolled && on_this_node && opts.runtime_handles == RuntimeHandles::Annotations {
        for (path, annotation) in [(&netns, NETNS_ANNOTATION), (&cgroup, CGROUP_ANNOTATION)] {
            if path.is_none() {
                return Err(StateError::MissingAnnotation {
                    object,
                    annotation,
                    node: opts.node_name.clone(),
                });
            }
        }
    }
    Ok(Workload {
        namespace: meta.namespace().to_owned(),
        name: meta.name().to_owned(),
        uid: meta.uid.clone(),
        node,
        service_account: service_account.to_owned(),
        identity: Identity::new(&opts.trust_domain, meta.namespace(), service_account).map_err(
            |source| StateError::Identity {
                object: object.clone(),
                source,
            },
        )?,
        labels: meta.labels().clone(),
        ips,
        readiness: match (pod.is_ready(), pod.is_terminating()) {
            (false, _) => Readiness::NotReady,
            (true, false) => Readiness::Ready,
            (true, true) => Readiness::Terminating,
        },
        enrolled,
        host_network,
        netns,
        cgroup,
        shortcut,
        locality: Locality::of_pod(meta.labels(), node_locality),
    })
}

/// Every container port is a port number of a known protocol.
fn check_container_ports(
    object: &ObjectRef,
    spec: Option<&k8s::PodSpec>,
) -> Result<(), StateError> {
    for (c, container) in spec.map_or(&[][..], |s| &s.containers).iter().enumerate() {
        for (p, port) in container
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!("spec.containers[{c}].ports[{p}]");
            check_port(
                object,
                format!("{field}.containerPort"),
                i64::from(port.container_port),
            )?;
            protocol(
                object,
                format!("{field}.protocol"),
                port.protocol.as_deref(),
            )?;
        }
    }
    Ok(())
}

/// The [`SHORTCUT_ANNOTATION`] of an object (`enabled` or `disabled`), `None` when absent.
pub(super) fn shortcut_annotation(
    object: &ObjectRef,
    meta: &k8s::ObjectMeta,
) -> Result<Option<Shortcut>, StateError> {
    match meta
        .annotations()
        .get(SHORTCUT_ANNOTATION)
        .map(String::as_str)
    {
        None => Ok(None),
        Some("enabled") => Ok(Some(Shortcut::Enabled)),
        Some("disabled") => Ok(Some(Shortcut::Disabled)),
        Some(other) => Err(StateError::InvalidAnnotation {
            object: object.clone(),
            annotation: SHORTCUT_ANNOTATION,
            value: other.to_owned(),
            expected: "\"enabled\" or \"disabled\"",
        }),
    }
}

fn annotation_path(
    object: &ObjectRef,
    meta: &k8s::ObjectMeta,
    annotation: &'static str,
) -> Result<Option<PathBuf>, StateError> {
    match meta.annotations().get(annotation) {
        None => Ok(None),
        Some(value) if value.starts_with('/') => Ok(Some(PathBuf::from(value))),
        Some(value) => Err(StateError::RelativePath {
            object: object.clone(),
            annotation,
            value: value.clone(),
        }),
    }
}

/// Parses a list of addresses (`podIPs`, `clusterIPs`) and its primary (`podIP`, `clusterIP`):
/// at most one per family, the primary first. `None` and empty entries are skipped (headless).
fn addresses<'s>(
    object: &ObjectRef,
    list: impl Iterator<Item = &'s str>,
    (list_field, primary_field): (&'static str, &'static str),
    primary: Option<&str>,
) -> Result<Vec<IpAddr>, StateError> {
    let parse = |value: &str, field: String| {
        value
            .parse::<IpAddr>()
            .map(|ip| ip.to_canonical())
            .map_err(|_| StateError::InvalidIp {
                object: object.clone(),
                field,
                value: value.to_owned(),
            })
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for (index, value) in list
        .enumerate()
        .filter(|(_, v)| !v.is_empty() && *v != "None")
    {
        let field = format!("{list_field}[{index}]");
        let ip = parse(value, field.clone())?;
        if ips.iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
            return Err(StateError::SecondAddressOfFamily {
                object: object.clone(),
                field,
                ip,
            });
        }
        ips.push(ip);
    }
    if let Some(value) = primary.filter(|v| !v.is_empty() && *v != "None") {
        let ip = parse(value, primary_field.to_owned())?;
        match ips.first() {
            None => ips.push(ip),
            Some(first) if *first == ip => {}
            Some(first) => {
                return Err(StateError::PrimaryMismatch {
                    object: object.clone(),
                    field: primary_field,
                    value: ip,
                    list_field,
                    first: *first,
                })
            }
        }
    }
    Ok(ips)
}

/// `svc` as a service; `pods` are the pods of its namespace, `slices` and `by_ip` what its
/// endpoints may come from (see [`crate::endpoints`]).
pub(super) fn service_from(
    svc: &k8s::Service,
    pods: &[BuiltPod],
    (slices, by_ip): (&SliceIndex, &HashMap<IpAddr, Arc<Workload>>),
    opts: &EnrollmentOptions,
) -> Result<Service, StateError> {
    let object = service_ref(svc);
    check_name(
        &object,
        "metadata.namespace",
        svc.metadata.namespace(),
        NameRule::Label,
    )?;
    check_name(
        &object,
        "metadata.name",
        svc.metadata.name(),
        NameRule::Label,
    )?;
    let default_spec = k8s::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);
    let selector = spec.selector.clone().unwrap_or_default();
    let vips = addresses(
        &object,
        spec.cluster_ips
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(String::as_str),
        ("spec.clusterIPs", "spec.clusterIP"),
        spec.cluster_ip.as_deref(),
    )?;
    let selected: Vec<&BuiltPod> = if selector.is_empty() {
        Vec::new()
    } else {
        let ready = pods
            .iter()
            .filter(|p| p.workload.readiness.serving() && !p.workload.ips.is_empty())
            .filter(|p| {
                let labels = &p.workload.labels;
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        not_terminating_first(ready, |p| &p.workload)
    };
    let sources = PortSources {
        from: opts.endpoints,
        service: (svc.metadata.namespace(), svc.metadata.name()),
        has_selector: !selector.is_empty(),
        selected: &selected,
        slices,
        by_ip,
    };
    let spec_ports = spec.ports.as_deref().unwrap_or_default();
    let mut ports: Vec<ServicePort> = Vec::with_capacity(spec_ports.len());
    for (index, spec) in spec_ports.iter().enumerate() {
        let field = |name: &str| format!("spec.ports[{index}].{name}");
        let port = check_port(&object, field("port"), i64::from(spec.port))?;
        let protocol = protocol(&object, field("protocol"), spec.protocol.as_deref())?;
        if ports
            .iter()
            .any(|p| p.port == port && p.protocol == protocol)
        {
            return Err(StateError::RepeatedPort {
                object,
                field: field("port"),
                port,
                protocol,
            });
        }
        let target_port = match &spec.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(check_port(&object, field("targetPort"), i64::from(*n))?)
            }
            Some(IntOrString::String(name)) if is_port_name(name) => TargetPort::Name(name.clone()),
            Some(IntOrString::String(name)) => {
                return Err(StateError::InvalidPortName {
                    object,
                    field: field("targetPort"),
                    value: name.clone(),
                })
            }
        };
        let endpoints = sources.endpoints(spec.name.as_deref(), protocol, &target_port);
        let mut service_port =
            ServicePort::new(spec.name.clone(), (port, protocol), target_port, endpoints);
        service_port.app_protocol =
            AppProtocol::of(spec.app_protocol.as_deref(), spec.name.as_deref());
        ports.push(service_port);
    }
    Ok(Service {
        hostname: format!(
            "{}.{}.svc.{}",
            svc.metadata.name(),
            svc.metadata.namespace(),
            opts.cluster_domain
        ),
        namespace: svc.metadata.namespace().to_owned(),
        name: svc.metadata.name().to_owned(),
        vips,
        selector,
        ports,
        // Read with the warnings of the view ([`service_distribution`]).
        traffic_distribution: None,
        kind: crate::model::ServiceKind::Kubernetes,
    })
}

/// The traffic distribution `svc` asks for ([`traffic_distribution`]).
pub(super) fn service_distribution(
    svc: &k8s::Service,
    warnings: &mut Vec<String>,
) -> Option<TrafficDistribution> {
    let field = svc
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref());
    traffic_distribution(&service_ref(svc), field, &svc.metadata, warnings)
}

/// The traffic distribution `object` asks for: its `spec.trafficDistribution` (`field`, a
/// Service's), else Istio's annotation. A value this mesh does not know (a newer Kubernetes
/// may add some) spreads the traffic as without one, with a warning naming it.
pub(crate) fn traffic_distribution(
    object: &ObjectRef,
    field: Option<&str>,
    meta: &k8s::ObjectMeta,
    warnings: &mut Vec<String>,
) -> Option<TrafficDistribution> {
    let (value, from) = match field {
        Some(value) => (value, "spec.trafficDistribution"),
        None => (
            meta.annotations
                .as_ref()?
                .get(TRAFFIC_DISTRIBUTION_ANNOTATION)?
                .as_str(),
            TRAFFIC_DISTRIBUTION_ANNOTATION,
        ),
    };
    TrafficDistribution::parse(value)
        .map_err(|why| warnings.push(format!("{object}: {from}: {why}")))
        .ok()
}

fn check_port(object: &ObjectRef, field: String, value: i64) -> Result<u16, StateError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(StateError::InvalidPort {
            object: object.clone(),
            field,
            value,
        }),
    }
}

fn protocol(
    object: &ObjectRef,
    field: String,
    value: Option<&str>,
) -> Result<Protocol, StateError> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(StateError::InvalidProtocol {
            object: object.clone(),
            field,
            value: other.to_owned(),
        }),
    }
}

/// IANA service name, as Kubernetes requires of named ports.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}
