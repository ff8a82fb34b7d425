//! Istio's `ServiceEntry` (`networking.istio.io` `v1`, `v1beta1`, `v1alpha3`): a service the
//! cluster's `Services` do not describe (an external API, a database outside the cluster, pods
//! picked by labels under other names), made a [`Service`] of the model so that everything a
//! Service has applies to it: its addresses are captured, its connections load-balanced,
//! routed and authorized, through its waypoint when it is bound to one (`istio.io/use-waypoint`
//! on the entry or its namespace: Istio's egress waypoint).
//!
//! **What is read**, checked when parsed (errors name the field and line):
//! - `hosts` (at least one; the first is the Service's hostname, in telemetry and as a route's
//!   `Hostname` backend; each host names the entry for routes and `DestinationRules`);
//! - `addresses` (single IPv4 or IPv6 addresses; a range is refused), or, when there are none,
//!   the addresses Istio's allocator wrote in `status.addresses`;
//! - `ports` (`number`, `name`, `protocol`, `targetPort`): `protocol` chooses how a waypoint
//!   reads the port, as a Service port's `appProtocol` does;
//! - `resolution`: `NONE` (the default: a connection goes on to the address it was opened to),
//!   `STATIC` (to one of the `endpoints`, by address, or of the pods its `workloadSelector`
//!   picks in its namespace), or `DNS` / `DNS_ROUND_ROBIN`: the endpoints' names (or, without
//!   endpoints, the hosts) are resolved by the entry's waypoint when it connects, every answer
//!   an endpoint (Envoy's `STRICT_DNS`), or each name's first (`LOGICAL_DNS`). The node agents
//!   resolve nothing: an entry of resolution `DNS` needs a waypoint (a warning says so), and
//!   the mesh has no DNS proxy answering for the hosts, so clients reach an entry by its
//!   `addresses`;
//! - `location` (`MESH_EXTERNAL`, the default, or `MESH_INTERNAL`), shown in the view;
//! - `exportTo`, as below; `subjectAltNames` is accepted (it checks a TLS origination this
//!   mesh does not do). An endpoint's `weight`, `locality`, `network` and `serviceAccount` are
//!   refused: nothing would honour them.
//!
//! An endpoint's identity is its address's, as for an `EndpointSlice`: a pod's address is
//! reached over HBONE with the pod's identity whatever the entry says, any other address with
//! plain TCP. Loopback, link-local, multicast and unspecified addresses are refused (a waypoint
//! would otherwise dial its own admin port).
//!
//! **Whose traffic an entry captures (stricter than Istio).** An entry's addresses are captured
//! for the clients of its own namespace; an entry of the root namespace for every namespace
//! (its `exportTo` narrows that). Istio exports entries to every namespace by default, so a
//! tenant's entry for another tenant's database address could redirect that tenant's
//! connections to the entry's endpoints: a hostile tenant reading another's traffic. A tenant's
//! `exportTo` naming other namespaces is narrowed to its own, with a warning. Addresses and
//! hosts are unique across the cluster: a second claim is refused, naming the first.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

use crate::{
    address::unusable_pod_address,
    meta::{nullable, Labels, ObjectMeta},
    model::{EntryResolution, MeshLocation},
    schema::{Checked, List, Parsed},
};

/// `apiVersion`s of `ServiceEntry` read, the newest first.
pub const SERVICE_ENTRY_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// A `ServiceEntry`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
    /// `status`: the addresses Istio's allocator gave an entry without `addresses`.
    #[serde(default)]
    pub status: Option<EntryStatus>,
}

/// `status` of a `ServiceEntry`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EntryStatus {
    /// `addresses`: `{value, host}` each.
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<StatusAddress>,
}

/// An address Istio's allocator wrote for a host of the entry.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StatusAddress {
    /// The address.
    pub value: String,
    /// The host it is for.
    #[serde(default)]
    pub host: Option<String>,
}

/// `spec` of a `ServiceEntry`, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntrySpec {
    /// `hosts`, in order, each once.
    pub hosts: Vec<String>,
    /// `addresses`, each once.
    pub addresses: Vec<IpAddr>,
    /// `ports`.
    pub ports: Vec<EntryPort>,
    /// `location`.
    pub location: MeshLocation,
    /// `resolution`.
    pub resolution: EntryResolution,
    /// `endpoints` (resolution `STATIC`).
    pub endpoints: Vec<EntryEndpoint>,
    /// `workloadSelector.labels` (resolution `STATIC`).
    pub workload_selector: Option<Labels>,
    /// `exportTo`, as written.
    pub export_to: Vec<String>,
}

/// A port of a `ServiceEntry`.
#[derive(Clone, Debug, PartialEq)]
pub struct EntryPort {
    /// `number`: the port captured on the entry's addresses.
    pub number: u16,
    /// `name`.
    pub name: String,
    /// `protocol`, upper case, when given.
    pub protocol: Option<String>,
    /// `targetPort`: the endpoints' port, unless an endpoint's `ports` says otherwise.
    pub target_port: Option<u16>,
}

/// An endpoint of a `ServiceEntry` (an inline `WorkloadEntry`).
#[derive(Clone, Debug, PartialEq)]
pub struct EntryEndpoint {
    /// `address`.
    pub address: EndpointAddress,
    /// `ports`: its port for each of the entry's port names.
    pub ports: BTreeMap<String, u16>,
    /// `labels` (a `DestinationRule` subset picks endpoints by them... of pods only: kept for
    /// the view).
    pub labels: Labels,
}

/// An endpoint's `address`: an IP address, or (resolution `DNS`) a name its waypoint resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(IpAddr),
    Name(String),
}

/// Why a `ServiceEntry`'s spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceEntrySchemaError {
    #[error("must name at least one host")]
    NoHosts,
    #[error("{0:?} is not a host name (a DNS name, or `*.` and one)")]
    Host(String),
    #[error("host {0:?} is listed twice")]
    RepeatedHost(String),
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error(
        "{0:?} is an address range: only single addresses are captured (give each address, or \
         the range's addresses as endpoints)"
    )]
    AddressRange(String),
    #[error("{ip} is {reason}: never a service's address or endpoint")]
    Unusable { ip: IpAddr, reason: &'static str },
    #[error("address {0} is listed twice")]
    RepeatedAddress(IpAddr),
    #[error("{0} is not a port number (1-65535)")]
    Port(i64),
    #[error("a port needs a name")]
    NoPortName,
    #[error("port {0} is listed twice")]
    RepeatedPort(u16),
    #[error("port name {0:?} is used twice")]
    RepeatedPortName(String),
    #[error(
        "{0:?} is not a protocol Istio knows (HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, MYSQL, \
         REDIS, TCP, TLS, UDP)"
    )]
    Protocol(String),
    #[error("{0:?} is not a location (MESH_EXTERNAL or MESH_INTERNAL)")]
    Location(String),
    #[error("{0:?} is not a resolution (NONE, STATIC, DNS or DNS_ROUND_ROBIN)")]
    Resolution(String),
    #[error(
        "host {0:?} is a wildcard: with resolution DNS and no endpoints every host is resolved, \
         and a wildcard cannot be"
    )]
    WildcardResolved(String),
    #[error(
        "resolution NONE takes no endpoints: connections go on to the address they were opened to"
    )]
    EndpointsWithNone,
    #[error("a workloadSelector needs resolution STATIC")]
    SelectorWithoutStatic,
    #[error("endpoints and workloadSelector cannot both be given")]
    SelectorAndEndpoints,
    #[error(
        "endpoints[{index}]: {address:?} is not an IP address: with resolution STATIC an \
         endpoint is an address (a host name needs resolution DNS)"
    )]
    StaticName { index: usize, address: String },
    #[error("{0:?} is neither an IP address nor a host name (a unix socket is not reached)")]
    EndpointAddress(String),
    #[error("port name {0:?} is not one of the entry's ports")]
    EndpointPort(String),
    #[error("{0:?} is not a namespace name, `.` or `*`")]
    ExportTo(String),
    #[error("{0} is not supported: nothing in this mesh would honour it")]
    Unsupported(&'static str),
}

crate::schema::checked!(ServiceEntrySpec, EntryPort, EntryEndpoint);

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SpecFields {
    hosts: List<Parsed<EntryHost>>,
    addresses: List<Parsed<SingleAddress>>,
    ports: List<EntryPort>,
    location: Option<String>,
    resolution: Option<String>,
    endpoints: List<EntryEndpoint>,
    workload_selector: Option<SelectorFields>,
    export_to: List<String>,
    subject_alt_names: List<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct SelectorFields {
    #[serde(deserialize_with = "nullable")]
    labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PortFields {
    number: i64,
    #[serde(default)]
    name: String,
    protocol: Option<String>,
    target_port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct EndpointFields {
    address: String,
    #[serde(default, deserialize_with = "nullable")]
    ports: BTreeMap<String, i64>,
    #[serde(default, deserialize_with = "nullable")]
    labels: Labels,
    network: Option<serde::de::IgnoredAny>,
    locality: Option<serde::de::IgnoredAny>,
    weight: Option<serde::de::IgnoredAny>,
    service_account: Option<serde::de::IgnoredAny>,
}

/// The protocols Istio knows for a port.
const PROTOCOLS: [&str; 11] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "MYSQL", "REDIS", "TCP", "TLS", "UDP",
];

fn port_number(value: i64) -> Result<u16, ServiceEntrySchemaError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(ServiceEntrySchemaError::Port(value))
}

/// A single address: an IP, or an IP with a full-length prefix (`/32`, `/128`).
pub(crate) fn single_address(text: &str) -> Result<IpAddr, ServiceEntrySchemaError> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| ServiceEntrySchemaError::Address(text.to_owned()))?;
    let full = if ip.is_ipv4() { "32" } else { "128" };
    match prefix {
        None => {}
        Some(p) if p == full => {}
        Some(p) if p.parse::<u8>().is_ok() => {
            return Err(ServiceEntrySchemaError::AddressRange(text.to_owned()))
        }
        Some(_) => return Err(ServiceEntrySchemaError::Address(text.to_owned())),
    }
    usable(ip.to_canonical())
}

fn usable(ip: IpAddr) -> Result<IpAddr, ServiceEntrySchemaError> {
    match unusable_pod_address(ip) {
        Some(reason) => Err(ServiceEntrySchemaError::Unusable { ip, reason }),
        None => Ok(ip),
    }
}

/// A host: a DNS name of lowercase labels, possibly after `*.`.
pub(crate) struct EntryHost(String);

impl std::str::FromStr for EntryHost {
    type Err = ServiceEntrySchemaError;

    fn from_str(host: &str) -> Result<Self, Self::Err> {
        let name = host.strip_prefix("*.").unwrap_or(host);
        if crate::names::is_dns_subdomain(name) {
            Ok(EntryHost(host.to_owned()))
        } else {
            Err(ServiceEntrySchemaError::Host(host.to_owned()))
        }
    }
}

/// An address of `addresses`, checked when read.
pub(crate) struct SingleAddress(IpAddr);

impl std::str::FromStr for SingleAddress {
    type Err = ServiceEntrySchemaError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        single_address(text).map(SingleAddress)
    }
}

impl Checked for ServiceEntrySpec {
    type Error = ServiceEntrySchemaError;
    type Fields = SpecFields;
    const WHAT: &'static str = "a ServiceEntry spec";

    fn check(f: SpecFields) -> Result<Self, ServiceEntrySchemaError> {
        if f.hosts.0.is_empty() {
            return Err(ServiceEntrySchemaError::NoHosts);
        }
        let mut hosts: Vec<String> = Vec::with_capacity(f.hosts.0.len());
        for Parsed(EntryHost(host)) in f.hosts.0 {
            if hosts.contains(&host) {
                return Err(ServiceEntrySchemaError::RepeatedHost(host));
            }
            hosts.push(host);
        }
        let mut addresses: Vec<IpAddr> = Vec::new();
        for Parsed(SingleAddress(ip)) in f.addresses.0 {
            if addresses.contains(&ip) {
                return Err(ServiceEntrySchemaError::RepeatedAddress(ip));
            }
            addresses.push(ip);
        }
        for (i, port) in f.ports.0.iter().enumerate() {
            let earlier = &f.ports.0[..i];
            if earlier.iter().any(|p| p.number == port.number) {
                return Err(ServiceEntrySchemaError::RepeatedPort(port.number));
            }
            if earlier.iter().any(|p| p.name == port.name) {
                return Err(ServiceEntrySchemaError::RepeatedPortName(port.name.clone()));
            }
        }
        let location = match f.location.as_deref() {
            None | Some("MESH_EXTERNAL") => MeshLocation::External,
            Some("MESH_INTERNAL") => MeshLocation::Internal,
            Some(other) => return Err(ServiceEntrySchemaError::Location(other.to_owned())),
        };
        let resolution = match f.resolution.as_deref() {
            None | Some("NONE") => EntryResolution::OriginalDestination,
            Some("STATIC") => EntryResolution::Static,
            Some("DNS") => EntryResolution::Dns,
            Some("DNS_ROUND_ROBIN") => EntryResolution::DnsFirstAnswer,
            Some(other) => return Err(ServiceEntrySchemaError::Resolution(other.to_owned())),
        };
        let workload_selector = f.workload_selector.map(|s| s.labels);
        match (resolution, f.endpoints.0.is_empty(), &workload_selector) {
            (EntryResolution::OriginalDestination, false, _) => {
                return Err(ServiceEntrySchemaError::EndpointsWithNone)
            }
            (EntryResolution::Static, false, Some(_)) => {
                return Err(ServiceEntrySchemaError::SelectorAndEndpoints)
            }
            (EntryResolution::Static, _, _) | (_, _, None) => {}
            (_, _, Some(_)) => return Err(ServiceEntrySchemaError::SelectorWithoutStatic),
        }
        let dns = matches!(
            resolution,
            EntryResolution::Dns | EntryResolution::DnsFirstAnswer
        );
        if dns && f.endpoints.0.is_empty() {
            if let Some(host) = hosts.iter().find(|h| h.starts_with('*')) {
                return Err(ServiceEntrySchemaError::WildcardResolved(host.clone()));
            }
        }
        if !dns {
            for (index, endpoint) in f.endpoints.0.iter().enumerate() {
                if let EndpointAddress::Name(name) = &endpoint.address {
                    return Err(ServiceEntrySchemaError::StaticName {
                        index,
                        address: name.clone(),
                    });
                }
            }
        }
        for endpoint in &f.endpoints.0 {
            if let Some(name) = endpoint
                .ports
                .keys()
                .find(|name| !f.ports.0.iter().any(|p| &p.name == *name))
            {
                return Err(ServiceEntrySchemaError::EndpointPort(name.clone()));
            }
        }
        for entry in &f.export_to.0 {
            if !crate::names::is_export_target(entry) {
                return Err(ServiceEntrySchemaError::ExportTo(entry.clone()));
            }
        }
        // Checked by a TLS origination, which this mesh does not do: accepted, as Istio's
        // sidecar-less data plane does.
        let _ = f.subject_alt_names;
        Ok(Self {
            hosts,
            addresses,
            ports: f.ports.0,
            location,
            resolution,
            endpoints: f.endpoints.0,
            workload_selector,
            export_to: f.export_to.0,
        })
    }
}

impl Checked for EntryPort {
    type Error = ServiceEntrySchemaError;
    type Fields = PortFields;
    const WHAT: &'static str = "a ServiceEntry port";

    fn check(f: PortFields) -> Result<Self, ServiceEntrySchemaError> {
        if f.name.is_empty() {
            return Err(ServiceEntrySchemaError::NoPortName);
        }
        let protocol = match f.protocol {
            None => None,
            Some(p) => {
                let upper = p.to_ascii_uppercase();
                if !PROTOCOLS.contains(&upper.as_str()) {
                    return Err(ServiceEntrySchemaError::Protocol(p));
                }
                Some(upper)
            }
        };
        Ok(Self {
            number: port_number(f.number)?,
            name: f.name,
            protocol,
            target_port: f.target_port.map(port_number).transpose()?,
        })
    }
}

impl Checked for EntryEndpoint {
    type Error = ServiceEntrySchemaError;
    type Fields = EndpointFields;
    const WHAT: &'static str = "a ServiceEntry endpoint";

    fn check(f: EndpointFields) -> Result<Self, ServiceEntrySchemaError> {
        for (present, field) in [
            (f.network.is_some(), "endpoints[].network"),
            (f.locality.is_some(), "endpoints[].locality"),
            (f.weight.is_some(), "endpoints[].weight"),
            (f.service_account.is_some(), "endpoints[].serviceAccount"),
        ] {
            if present {
                return Err(ServiceEntrySchemaError::Unsupported(field));
            }
        }
        let address = match f.address.parse::<IpAddr>() {
            Ok(ip) => EndpointAddress::Ip(usable(ip.to_canonical())?),
            Err(_) if crate::names::is_dns_subdomain(&f.address) => {
                EndpointAddress::Name(f.address.clone())
            }
            Err(_) => return Err(ServiceEntrySchemaError::EndpointAddress(f.address.clone())),
        };
        let mut ports = BTreeMap::new();
        for (name, port) in f.ports {
            ports.insert(name, port_number(port)?);
        }
        Ok(Self {
            address,
            ports,
            labels: f.labels,
        })
    }
}

#[cfg(test)]
mod tests;
