//! Why objects do not make a valid state, and what a source reports.

use std::net::{IpAddr, SocketAddr};

use crate::{gateway_api::ParentRef, meta::ObjectRef, model::Protocol};

/// A problem reported by a source (for the directory source, one per file), shown by the admin
/// interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    /// Where: for the directory source, the file's path; for the Kubernetes source, the object.
    pub source: String,
    /// What, in one line.
    pub message: String,
    /// The one object the problem is about, when the source keeps objects one by one (the
    /// Kubernetes source): what a route's status is told when its current version is not applied.
    pub object: Option<ErrorObject>,
}

/// The object a [`SourceError`] is about, and what could still be read of its version that is
/// not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorObject {
    pub object: ObjectRef,
    /// That version's `metadata.generation`.
    pub generation: Option<i64>,
    /// What its status is decided from, as far as that version read.
    pub read: ReadPart,
}

/// What the status of an object that is not applied is decided from, as far as it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadPart {
    /// A route: its `spec.parentRefs` that read, in order (an entry that does not read is left
    /// out).
    Route { parents: Vec<ParentRef> },
    /// A policy (`AuthorizationPolicy`, `RequestAuthentication`, `EnvoyFilter`): whether it
    /// names `targetRefs` or `targetRef` (a waypoint's) or not (the node agents', a sidecar's).
    Policy { targeted: bool },
    /// Any other kind.
    Other,
}

/// Why objects do not make a valid state. Each variant names the object (`Kind ns/name`) and the
/// field, except the three about [`EnrollmentOptions`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum StateError {
    #[error("enrollment label key is empty")]
    EmptyLabelKey,
    #[error("trust domain {0:?} is not valid (lowercase letters, digits, '.', '-', '_')")]
    TrustDomain(String),
    #[error("root namespace {0:?} is not a valid namespace name (DNS label, RFC 1123)")]
    RootNamespace(String),
    #[error("cluster domain {0:?} is not a valid DNS subdomain (RFC 1123)")]
    ClusterDomain(String),
    #[error("{object} is defined more than once")]
    Duplicate { object: ObjectRef },
    #[error("{object}: {field}: {value:?} is not a valid {expected}")]
    InvalidName {
        object: ObjectRef,
        field: String,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: {field}: {ip} is {reason}, never a pod's own address")]
    UnusableAddress {
        object: ObjectRef,
        field: &'static str,
        ip: IpAddr,
        reason: &'static str,
    },
    #[error("{object}: {field}: {ip} is {reason}, never an endpoint")]
    UnusableEndpoint {
        object: ObjectRef,
        field: String,
        ip: IpAddr,
        reason: &'static str,
    },
    #[error("{object}: {field}: {ip} is not of the slice's addressType {address_type}")]
    AddressFamily {
        object: ObjectRef,
        field: String,
        ip: IpAddr,
        address_type: String,
    },
    #[error("{object}: {field}: {value:?} is not an IP address")]
    InvalidIp {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: {value} is not a port number (1-65535)")]
    InvalidPort {
        object: ObjectRef,
        field: String,
        value: i64,
    },
    #[error(
        "{object}: {field}: {value:?} is not a port name (IANA service name; numbers unquoted)"
    )]
    InvalidPortName {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error("{object}: {field}: unknown protocol {value:?} (TCP, UDP or SCTP)")]
    InvalidProtocol {
        object: ObjectRef,
        field: String,
        value: String,
    },
    #[error(
        "{object}: {field}: {ip} is a second address of its family (at most one IPv4 and one IPv6)"
    )]
    SecondAddressOfFamily {
        object: ObjectRef,
        field: String,
        ip: IpAddr,
    },
    #[error("{object}: {field} {value} differs from {list_field}[0] {first}")]
    PrimaryMismatch {
        object: ObjectRef,
        field: &'static str,
        value: IpAddr,
        list_field: &'static str,
        first: IpAddr,
    },
    #[error("{object}: metadata.annotations[{annotation}]: {value:?} is not an absolute path")]
    RelativePath {
        object: ObjectRef,
        annotation: &'static str,
        value: String,
    },
    #[error("{object}: metadata.labels[{label}]: {value:?} is not {expected}")]
    InvalidLabel {
        object: ObjectRef,
        label: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{object}: metadata.annotations[{annotation}]: {value:?} is not {expected}")]
    InvalidAnnotation {
        object: ObjectRef,
        annotation: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "{object}: metadata.annotations[{annotation}] is missing (enrolled, on this node {node})"
    )]
    MissingAnnotation {
        object: ObjectRef,
        annotation: &'static str,
        node: String,
    },
    #[error("{object}: {field}: {ip} is already the address of {other}")]
    DuplicateIp {
        object: ObjectRef,
        field: String,
        ip: IpAddr,
        other: Box<ObjectRef>,
    },
    #[error("{object}: {field}: {port}/{protocol} is listed twice")]
    RepeatedPort {
        object: ObjectRef,
        field: String,
        port: u16,
        protocol: Protocol,
    },
    #[error("{object}: {field}: host {host:?} is already {other}'s")]
    DuplicateHost {
        object: ObjectRef,
        field: String,
        host: String,
        other: Box<ObjectRef>,
    },
    #[error(
        "{object}: metadata.name: {other} has this name; routes and policies name a ServiceEntry \
         and a Service of its namespace alike, so give the entry another name"
    )]
    EntryNameTaken {
        object: ObjectRef,
        other: Box<ObjectRef>,
    },
    #[error("{object}: {field}: {addr} (TCP) is already claimed by {other}")]
    DuplicateServicePort {
        object: ObjectRef,
        field: String,
        addr: SocketAddr,
        other: Box<ObjectRef>,
    },
    #[error("{object}: spec.serviceAccountName: no SPIFFE identity can be made of it: {source}")]
    Identity {
        object: ObjectRef,
        source: mesh_identity::IdentityError,
    },
    #[error(
        "{object}: spec.hostnames: at least one is required at {api_version} (only v1alpha2 \
         reads none as every server name)"
    )]
    HostnamesRequired {
        object: ObjectRef,
        api_version: String,
    },
}

impl StateError {
    /// The objects the error is about (none for option errors), to find where they came from.
    pub fn objects(&self) -> Vec<&ObjectRef> {
        match self {
            StateError::EmptyLabelKey
            | StateError::TrustDomain(_)
            | StateError::RootNamespace(_)
            | StateError::ClusterDomain(_) => Vec::new(),
            StateError::DuplicateIp { object, other, .. }
            | StateError::DuplicateServicePort { object, other, .. }
            | StateError::DuplicateHost { object, other, .. }
            | StateError::EntryNameTaken { object, other } => vec![object, &**other],
            StateError::Duplicate { object }
            | StateError::InvalidName { object, .. }
            | StateError::InvalidIp { object, .. }
            | StateError::UnusableAddress { object, .. }
            | StateError::UnusableEndpoint { object, .. }
            | StateError::AddressFamily { object, .. }
            | StateError::InvalidPort { object, .. }
            | StateError::InvalidPortName { object, .. }
            | StateError::InvalidProtocol { object, .. }
            | StateError::SecondAddressOfFamily { object, .. }
            | StateError::PrimaryMismatch { object, .. }
            | StateError::RelativePath { object, .. }
            | StateError::InvalidAnnotation { object, .. }
            | StateError::InvalidLabel { object, .. }
            | StateError::MissingAnnotation { object, .. }
            | StateError::RepeatedPort { object, .. }
            | StateError::Identity { object, .. }
            | StateError::HostnamesRequired { object, .. } => vec![object],
        }
    }
}
