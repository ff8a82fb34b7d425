//! Istio's `AuthorizationPolicy` (`security.istio.io` `v1` and `v1beta1`, which have the same
//! schema) and its deserialization; re-exported by [`super::k8s`], whose parser reads it like the
//! other kinds. How the agent evaluates it is in [`super::authz`].
//!
//! As for `PeerAuthentication`, the rules Istio's validation applies to the spec are checked when
//! it is parsed, so that an error names the field path and the line; a file with an invalid policy
//! keeps its last good objects (the previous policy stays in force). Checked here:
//!
//! - every struct of the spec refuses fields it does not know (`principles` is an error, not a
//!   silently ignored field that would widen or narrow the policy); `selector` has `matchLabels`
//!   only (`matchExpressions` is refused, as for `PeerAuthentication`);
//! - `action` is `ALLOW` (the default), `DENY` or `AUDIT`; `CUSTOM` is refused, as it hands the
//!   decision to an external authorizer the agent does not have, and so is `provider`, which
//!   only goes with `CUSTOM`;
//! - `selector` and `targetRef`/`targetRefs` are not both set;
//! - `from`, `to` are not empty lists; each `from` has a non-empty `source`, each `to` a
//!   non-empty `operation`; no value is an empty string;
//! - `ipBlocks`, `notIpBlocks`, `remoteIpBlocks`, `notRemoteIpBlocks` and the values of the
//!   `source.ip`, `destination.ip` and `remote.ip` conditions are IPv4 or IPv6 addresses or CIDRs
//!   with a prefix length in range;
//! - `ports`, `notPorts` and `destination.port` values are port numbers (1-65535), written as
//!   strings (as Istio does) or numbers;
//! - `serviceAccounts`/`notServiceAccounts` are `namespace/name` (or `name`, in the policy's
//!   namespace), without wildcard, at most 16, and not set with `principals` or `namespaces`;
//! - a `when` condition has a `key` Istio knows and `values` or `notValues`; a
//!   `request.headers[name]` key names a valid header (or `:authority`, `:method`, `:path`,
//!   `:scheme`);
//! - `paths` and `notPaths` are Istio's patterns, and a path with `{`/`}` a valid template
//!   ([`crate::path_pattern`]);
//! - a `targetRefs` entry has only `group`, `kind`, `name` and `namespace`.

use std::{fmt, str::FromStr};

use serde::{
    de::{self, MapAccess, Visitor},
    Deserialize, Deserializer, Serialize,
};

use super::{
    ip_block::{IpBlock, IpBlockError},
    istio::{NoExpressions, WorkloadSelector},
    meta::{nullable, Labels, ObjectMeta},
    path_pattern::{PathPattern, PathPatternError},
    schema::{deserialize_checked, values, Checked, List, Parsed},
};

/// `apiVersion`s of `AuthorizationPolicy` the agent reads.
pub const AUTHORIZATION_POLICY_VERSIONS: [&str; 2] =
    ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Most values of `serviceAccounts` (or `notServiceAccounts`) Istio accepts in one source.
const MAX_SERVICE_ACCOUNTS: usize = 16;

/// Longest `serviceAccounts` value Istio accepts.
const MAX_SERVICE_ACCOUNT_LEN: usize = 320;

/// Why an `AuthorizationPolicy` spec is refused. The parser prefixes each with the field path
/// and appends the line.
#[derive(Debug, thiserror::Error)]
pub enum AuthzSchemaError {
    #[error(
        "action CUSTOM is not supported: it hands the decision to an external authorizer \
         (`provider`), which the node agent does not have"
    )]
    CustomAction,
    #[error(
        "unknown action {0:?}, expected `ALLOW`, `DENY` or `AUDIT` (`CUSTOM` needs an external \
         authorizer and is not supported)"
    )]
    UnknownAction(String),
    #[error(
        "`provider` is only valid with action CUSTOM, which needs an external authorizer and is \
         not supported"
    )]
    Provider,
    #[error(
        "`selector` and `{0}` cannot both be set (Istio: only one of targetRefs or \
         workloadSelector)"
    )]
    SelectorAndTargetRef(&'static str),
    #[error("must not be empty: set at least one field (Istio rejects an empty {0})")]
    EmptyMatch(&'static str),
    #[error("empty value not allowed")]
    EmptyValue,
    #[error(transparent)]
    IpBlock(#[from] IpBlockError),
    #[error(transparent)]
    Path(#[from] PathPatternError),
    #[error("{0:?} is not an HTTP header name")]
    HeaderName(String),
    #[error("{0} is not a port number (1-65535)")]
    InvalidPort(String),
    #[error("{value:?} is not a service account (`namespace/name` or `name`): {problem}")]
    InvalidServiceAccount {
        value: String,
        problem: &'static str,
    },
    #[error("{field}: at most {MAX_SERVICE_ACCOUNTS} values (Istio's limit), found {count}")]
    TooManyServiceAccounts { field: &'static str, count: usize },
    #[error("serviceAccounts and notServiceAccounts cannot be set with principals or namespaces")]
    ServiceAccountsWithPrincipals,
    #[error("`key` must not be empty")]
    EmptyKey,
    #[error("the condition on {0} needs `values` or `notValues`")]
    NoValues(String),
    #[error("unknown attribute {0:?} in `key`")]
    UnknownAttribute(String),
    #[error("attribute {key} in `key` is not supported: {reason}")]
    UnsupportedAttribute { key: String, reason: &'static str },
    #[error("bad key {0:?}: expected the form name[entry]")]
    BadMapKey(String),
    #[error("{field}[{index}]: {problem}")]
    Value {
        field: &'static str,
        index: usize,
        problem: Box<AuthzSchemaError>,
    },
}

/// A `security.istio.io` `AuthorizationPolicy` (`v1` or `v1beta1`): who may open connections to
/// the workloads it selects. See the module documentation for what parsing checks; names are
/// checked when the state is built.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct AuthorizationPolicy {
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// `spec`; absent or `null` reads as the default (an ALLOW policy without rules).
    #[serde(default, deserialize_with = "nullable")]
    pub spec: AuthorizationPolicySpec,
}

/// `spec` of an `AuthorizationPolicy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthorizationPolicySpec {
    /// `selector`: the workloads it applies to. `None`, or empty `matchLabels`, makes it
    /// namespace-wide (mesh-wide in the root namespace).
    pub selector: Option<WorkloadSelector>,
    /// `targetRef` and `targetRefs` (a Gateway, `GatewayClass`, Service or `ServiceEntry`):
    /// the policy is for waypoints, which enforce it; the node agent does not.
    pub target_refs: Vec<PolicyTargetRef>,
    /// `action`; `ALLOW` when absent.
    pub action: AuthzAction,
    /// `rules`.
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicySpec {
    /// The selector's labels; `None` for a namespace- or mesh-wide policy.
    pub fn match_labels(&self) -> Option<&Labels> {
        self.selector
            .as_ref()
            .map(|s| &s.match_labels)
            .filter(|labels| !labels.is_empty())
    }
}

/// A `targetRef` (or an entry of `targetRefs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// `group`, empty for the core group.
    pub group: String,
    /// `kind`, e.g. `Gateway` or `Service`.
    pub kind: String,
    /// `name`.
    pub name: String,
    /// `namespace`: empty, or the policy's own (Istio refuses any other).
    pub namespace: String,
}

/// `targetRef` and `targetRefs` as one list; refused (naming the field given) beside a
/// selector, as Istio refuses it.
pub(crate) fn target_refs(
    one: Option<PolicyTargetRef>,
    many: Vec<PolicyTargetRef>,
    selector: bool,
) -> Result<Vec<PolicyTargetRef>, &'static str> {
    let field = if one.is_some() {
        "targetRef"
    } else {
        "targetRefs"
    };
    let mut refs = many;
    refs.extend(one);
    if selector && !refs.is_empty() {
        return Err(field);
    }
    Ok(refs)
}

impl fmt::Display for PolicyTargetRef {
    /// `kind/name`, e.g. `Gateway/waypoint`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// `action` of an `AuthorizationPolicy` (`CUSTOM` is refused when parsed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    /// `ALLOW`: when a workload has ALLOW policies, a connection must match one of them.
    #[default]
    Allow,
    /// `DENY`: a connection that matches is refused, whatever the ALLOW policies say.
    Deny,
    /// `AUDIT`: a connection that matches is reported; the verdict does not change.
    Audit,
}

impl fmt::Display for AuthzAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
        })
    }
}

impl<'de> Deserialize<'de> for AuthzAction {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ActionVisitor;
        impl Visitor<'_> for ActionVisitor {
            type Value = AuthzAction;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("ALLOW, DENY or AUDIT")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AuthzAction, E> {
                match v {
                    "ALLOW" => Ok(AuthzAction::Allow),
                    "DENY" => Ok(AuthzAction::Deny),
                    "AUDIT" => Ok(AuthzAction::Audit),
                    "CUSTOM" => Err(E::custom(AuthzSchemaError::CustomAction)),
                    other => Err(E::custom(AuthzSchemaError::UnknownAction(other.to_owned()))),
                }
            }
        }
        deserializer.deserialize_str(ActionVisitor)
    }
}

/// An entry of `rules`: it matches a connection when `from`, `to` and `when` all match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `from`: matches when any source matches; empty matches any connection.
    pub from: Vec<RuleFrom>,
    /// `to`: matches when any operation matches; empty matches any connection.
    pub to: Vec<RuleTo>,
    /// `when`: every condition must match.
    pub when: Vec<Condition>,
}

/// An entry of `from`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    /// `source`.
    pub source: Source,
}

/// An entry of `to`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    /// `operation`.
    pub operation: Operation,
}

/// `from[].source`: every field given must match (any of its values), and no value of a `not…`
/// field may. Principals and namespaces are patterns: exact, `*`, `prefix*` or `*suffix`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// `principals`: SPIFFE ids without `spiffe://` (`cluster.local/ns/shop/sa/web`).
    pub principals: Vec<String>,
    /// `notPrincipals`.
    pub not_principals: Vec<String>,
    /// `requestPrincipals` (JWT, L7).
    pub request_principals: Vec<String>,
    /// `notRequestPrincipals` (L7).
    pub not_request_principals: Vec<String>,
    /// `namespaces`: of the source's identity.
    pub namespaces: Vec<String>,
    /// `notNamespaces`.
    pub not_namespaces: Vec<String>,
    /// `serviceAccounts`: of the source's identity.
    pub service_accounts: Vec<ServiceAccountRef>,
    /// `notServiceAccounts`.
    pub not_service_accounts: Vec<ServiceAccountRef>,
    /// `ipBlocks`: the connection's source address.
    pub ip_blocks: Vec<IpBlock>,
    /// `notIpBlocks`.
    pub not_ip_blocks: Vec<IpBlock>,
    /// `remoteIpBlocks` (`X-Forwarded-For` or PROXY protocol, L7).
    pub remote_ip_blocks: Vec<IpBlock>,
    /// `notRemoteIpBlocks` (L7).
    pub not_remote_ip_blocks: Vec<IpBlock>,
}

impl Source {
    /// The HTTP (L7) fields it sets, by their YAML names.
    pub fn http_fields(&self) -> Vec<&'static str> {
        [
            ("requestPrincipals", self.request_principals.is_empty()),
            (
                "notRequestPrincipals",
                self.not_request_principals.is_empty(),
            ),
            ("remoteIpBlocks", self.remote_ip_blocks.is_empty()),
            ("notRemoteIpBlocks", self.not_remote_ip_blocks.is_empty()),
        ]
        .into_iter()
        .filter_map(|(name, empty)| (!empty).then_some(name))
        .collect()
    }
}

/// `to[].operation`: every field given must match (any of its values), and no value of a
/// `not…` field may.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    /// `ports`: the destination workload's port.
    pub ports: Vec<u16>,
    /// `notPorts`.
    pub not_ports: Vec<u16>,
    /// `hosts` (L7).
    pub hosts: Vec<String>,
    /// `notHosts` (L7).
    pub not_hosts: Vec<String>,
    /// `methods` (L7).
    pub methods: Vec<String>,
    /// `notMethods` (L7).
    pub not_methods: Vec<String>,
    /// `paths` (L7), checked as Istio does (templates included).
    pub paths: Vec<PathPattern>,
    /// `notPaths` (L7).
    pub not_paths: Vec<PathPattern>,
}

impl Operation {
    /// The HTTP (L7) fields it sets, by their YAML names.
    pub fn http_fields(&self) -> Vec<&'static str> {
        [
            ("hosts", self.hosts.is_empty()),
            ("notHosts", self.not_hosts.is_empty()),
            ("methods", self.methods.is_empty()),
            ("notMethods", self.not_methods.is_empty()),
            ("paths", self.paths.is_empty()),
            ("notPaths", self.not_paths.is_empty()),
        ]
        .into_iter()
        .filter_map(|(name, empty)| (!empty).then_some(name))
        .collect()
    }
}

/// An entry of `when`: the attribute `key` must have one of `values` and none of `notValues`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `key` as written.
    pub key: String,
    /// The attribute and its values, typed.
    pub attribute: Attribute,
}

/// The attribute of a `when` condition, with its `values` and `notValues`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// `source.ip`: the connection's source address.
    SourceIp(Values<IpBlock>),
    /// `source.namespace`: of the source's identity (patterns as in `namespaces`).
    SourceNamespace(Values<String>),
    /// `source.principal`: the source's identity (patterns as in `principals`).
    SourcePrincipal(Values<String>),
    /// `destination.ip`: the destination workload's address.
    DestinationIp(Values<IpBlock>),
    /// `destination.port`: the destination workload's port.
    DestinationPort(Values<u16>),
    /// `remote.ip` (L7): the client's address as `X-Forwarded-For` gives it; the waypoint
    /// trusts no hop, so it is the source's address.
    RemoteIp(Values<IpBlock>),
    /// `source.serviceAccount` (L7 in Istio): the service account of the source's identity.
    SourceServiceAccount(Values<ServiceAccountRef>),
    /// `request.headers[name]` (L7): the header's values, joined by `,`; patterns as in
    /// `principals`. `name` is lower case (or a pseudo-header: `:authority`, `:method`,
    /// `:path`, `:scheme`).
    RequestHeader {
        name: String,
        values: Values<String>,
    },
    /// `request.auth.principal`, `request.auth.audiences`, `request.auth.presenter` and
    /// `request.auth.claims[...]` (L7): of the request's verified JWT (`RequestAuthentication`);
    /// a request without one has no value (a value never matches, a `notValues` passes).
    RequestAuth {
        attribute: AuthAttribute,
        values: Values<String>,
    },
    /// `connection.sni` (L7): an attribute the waypoint never has (the HTTP inside a tunnel is
    /// not TLS), so a value never matches and a `notValues` always passes.
    Absent(Values<String>),
    /// `experimental.envoy.filters.*` and `request.experimental.inline.headers[...]`: Envoy's
    /// internals, which nothing here evaluates; values checked as Istio does, not kept.
    Unevaluated,
}

impl Attribute {
    /// Whether the node agent (L4) cannot enforce it.
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Attribute::RemoteIp(_)
                | Attribute::RequestAuth { .. }
                | Attribute::SourceServiceAccount(_)
                | Attribute::RequestHeader { .. }
                | Attribute::Absent(_)
                | Attribute::Unevaluated
        )
    }
}

/// What a `request.auth.*` condition (or `requestPrincipals`) reads of a verified JWT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthAttribute {
    /// `iss/sub`.
    Principal,
    /// Each of `aud`.
    Audiences,
    /// `azp`.
    Presenter,
    /// A claim, by its names from the top (`request.auth.claims[a][b]`: `a`, `b`); a list
    /// claim matches when one of its values does.
    Claim(Vec<String>),
}

/// `values` and `notValues` of a condition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Values<T> {
    /// `values`: one must match (no constraint when empty).
    pub values: Vec<T>,
    /// `notValues`: none may match.
    pub not_values: Vec<T>,
}

/// A `serviceAccounts` value: `namespace/name`, or `name` in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    /// The namespace, if written.
    pub namespace: Option<String>,
    /// The service account's name.
    pub name: String,
}

impl FromStr for ServiceAccountRef {
    type Err = AuthzSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |problem| AuthzSchemaError::InvalidServiceAccount {
            value: value.to_owned(),
            problem,
        };
        if value.is_empty() {
            return Err(AuthzSchemaError::EmptyValue);
        }
        if value.contains('*') {
            return Err(invalid("wildcards are not allowed"));
        }
        if value.len() > MAX_SERVICE_ACCOUNT_LEN {
            return Err(invalid("longer than 320 characters"));
        }
        match value.split_once('/') {
            None => Ok(Self {
                namespace: None,
                name: value.to_owned(),
            }),
            Some((_, name)) if name.contains('/') => Err(invalid("more than one '/'")),
            Some(("", _)) => Err(invalid("empty namespace")),
            Some((_, "")) => Err(invalid("empty name")),
            Some((namespace, name)) => Ok(Self {
                namespace: Some(namespace.to_owned()),
                name: name.to_owned(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deserialization

/// A value of a list of strings: not empty.
struct Text(String);

impl FromStr for Text {
    type Err = AuthzSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err(AuthzSchemaError::EmptyValue);
        }
        Ok(Text(value.to_owned()))
    }
}

impl From<Text> for String {
    fn from(text: Text) -> String {
        text.0
    }
}

/// A port number, written as a number or a string of digits.
struct Port(u16);

impl FromStr for Port {
    type Err = AuthzSchemaError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.parse::<u16>() {
            Ok(port) if port != 0 && value.bytes().all(|b| b.is_ascii_digit()) => Ok(Port(port)),
            _ => Err(AuthzSchemaError::InvalidPort(value.to_owned())),
        }
    }
}

impl From<Port> for u16 {
    fn from(port: Port) -> u16 {
        port.0
    }
}

/// `selector`: only `matchLabels` (and an empty `matchExpressions`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SelectorFields {
    #[serde(default, deserialize_with = "nullable")]
    match_labels: Labels,
    #[serde(default, rename = "matchExpressions")]
    _match_expressions: Option<NoExpressions>,
}

impl SelectorFields {
    pub(crate) fn into_selector(self) -> WorkloadSelector {
        WorkloadSelector {
            match_labels: self.match_labels,
        }
    }
}

/// `provider`: refused unless `null` (it only goes with CUSTOM).
struct NoProvider;

impl<'de> Deserialize<'de> for NoProvider {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProviderVisitor;
        impl<'de> Visitor<'de> for ProviderVisitor {
            type Value = NoProvider;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("no provider")
            }
            fn visit_unit<E: de::Error>(self) -> Result<NoProvider, E> {
                Ok(NoProvider)
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<NoProvider, A::Error> {
                Err(de::Error::custom(AuthzSchemaError::Provider))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<NoProvider, E> {
                Err(E::custom(AuthzSchemaError::Provider))
            }
        }
        deserializer.deserialize_any(ProviderVisitor)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SpecFields {
    selector: Option<SelectorFields>,
    target_ref: Option<PolicyTargetRef>,
    target_refs: List<PolicyTargetRef>,
    #[serde(deserialize_with = "nullable")]
    action: AuthzAction,
    #[serde(rename = "provider")]
    _provider: Option<NoProvider>,
    rules: List<Rule>,
}

impl Checked for AuthorizationPolicySpec {
    type Error = AuthzSchemaError;
    type Fields = SpecFields;
    const WHAT: &'static str = "an AuthorizationPolicy spec";

    fn check(fields: SpecFields) -> Result<Self, AuthzSchemaError> {
        let target_refs = target_refs(
            fields.target_ref,
            fields.target_refs.0,
            fields.selector.is_some(),
        )
        .map_err(AuthzSchemaError::SelectorAndTargetRef)?;
        Ok(Self {
            selector: fields.selector.map(SelectorFields::into_selector),
            target_refs,
            action: fields.action,
            rules: fields.rules.0,
        })
    }
}

impl<'de> Deserialize<'de> for AuthorizationPolicySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RuleFields {
    from: List<RuleFrom, true>,
    to: List<RuleTo, true>,
    when: List<Condition>,
}

impl Checked for Rule {
    type Error = AuthzSchemaError;
    type Fields = RuleFields;
    const WHAT: &'static str = "a rule (`{}` matches every connection)";

    fn check(fields: RuleFields) -> Result<Self, AuthzSchemaError> {
        Ok(Self {
            from: fields.from.0,
            to: fields.to.0,
            when: fields.when.0,
        })
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SourceFields {
    principals: List<Parsed<Text>>,
    not_principals: List<Parsed<Text>>,
    request_principals: List<Parsed<Text>>,
    not_request_principals: List<Parsed<Text>>,
    namespaces: List<Parsed<Text>>,
    not_namespaces: List<Parsed<Text>>,
    service_accounts: List<Parsed<ServiceAccountRef>>,
    not_service_accounts: List<Parsed<ServiceAccountRef>>,
    ip_blocks: List<Parsed<IpBlock>>,
    not_ip_blocks: List<Parsed<IpBlock>>,
    remote_ip_blocks: List<Parsed<IpBlock>>,
    not_remote_ip_blocks: List<Parsed<IpBlock>>,
}

impl Checked for Source {
    type Error = AuthzSchemaError;
    type Fields = SourceFields;
    const WHAT: &'static str = "a source";

    fn check(f: SourceFields) -> Result<Self, AuthzSchemaError> {
        for (field, count) in [
            ("serviceAccounts", f.service_accounts.0.len()),
            ("notServiceAccounts", f.not_service_accounts.0.len()),
        ] {
            if count > MAX_SERVICE_ACCOUNTS {
                return Err(AuthzSchemaError::TooManyServiceAccounts { field, count });
            }
        }
        let accounts = f.service_accounts.0.len() + f.not_service_accounts.0.len();
        let identities = f.principals.0.len()
            + f.not_principals.0.len()
            + f.namespaces.0.len()
            + f.not_namespaces.0.len();
        if accounts > 0 && identities > 0 {
            return Err(AuthzSchemaError::ServiceAccountsWithPrincipals);
        }
        let source = Self {
            principals: values(f.principals),
            not_principals: values(f.not_principals),
            request_principals: values(f.request_principals),
            not_request_principals: values(f.not_request_principals),
            namespaces: values(f.namespaces),
            not_namespaces: values(f.not_namespaces),
            service_accounts: values(f.service_accounts),
            not_service_accounts: values(f.not_service_accounts),
            ip_blocks: values(f.ip_blocks),
            not_ip_blocks: values(f.not_ip_blocks),
            remote_ip_blocks: values(f.remote_ip_blocks),
            not_remote_ip_blocks: values(f.not_remote_ip_blocks),
        };
        if source == Self::default() {
            return Err(AuthzSchemaError::EmptyMatch("source"));
        }
        Ok(source)
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct OperationFields {
    ports: List<Parsed<Port>>,
    not_ports: List<Parsed<Port>>,
    hosts: List<Parsed<Text>>,
    not_hosts: List<Parsed<Text>>,
    methods: List<Parsed<Text>>,
    not_methods: List<Parsed<Text>>,
    paths: List<Parsed<PathPattern>>,
    not_paths: List<Parsed<PathPattern>>,
}

impl Checked for Operation {
    type Error = AuthzSchemaError;
    type Fields = OperationFields;
    const WHAT: &'static str = "an operation";

    fn check(f: OperationFields) -> Result<Self, AuthzSchemaError> {
        let operation = Self {
            ports: values(f.ports),
            not_ports: values(f.not_ports),
            hosts: values(f.hosts),
            not_hosts: values(f.not_hosts),
            methods: values(f.methods),
            not_methods: values(f.not_methods),
            paths: values(f.paths),
            not_paths: values(f.not_paths),
        };
        if operation == Self::default() {
            return Err(AuthzSchemaError::EmptyMatch("operation"));
        }
        Ok(operation)
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ConditionFields {
    key: String,
    values: List<Parsed<Text>>,
    not_values: List<Parsed<Text>>,
}

impl Checked for Condition {
    type Error = AuthzSchemaError;
    type Fields = ConditionFields;
    const WHAT: &'static str = "a condition";

    fn check(f: ConditionFields) -> Result<Self, AuthzSchemaError> {
        let key = f.key;
        if key.is_empty() {
            return Err(AuthzSchemaError::EmptyKey);
        }
        if f.values.0.is_empty() && f.not_values.0.is_empty() {
            return Err(AuthzSchemaError::NoValues(key));
        }
        let values = Values {
            values: values(f.values),
            not_values: values(f.not_values),
        };
        let unsupported = |reason| AuthzSchemaError::UnsupportedAttribute {
            key: key.clone(),
            reason,
        };
        let attribute = match key.as_str() {
            "source.ip" => Attribute::SourceIp(typed(&values)?),
            "destination.ip" => Attribute::DestinationIp(typed(&values)?),
            "destination.port" => {
                let Values { values, not_values } = typed::<Port>(&values)?;
                let port = |ports: Vec<Port>| ports.into_iter().map(|p| p.0).collect();
                Attribute::DestinationPort(Values {
                    values: port(values),
                    not_values: port(not_values),
                })
            }
            "source.namespace" => Attribute::SourceNamespace(values),
            "source.principal" => Attribute::SourcePrincipal(values),
            "remote.ip" => Attribute::RemoteIp(typed(&values)?),
            "source.serviceAccount" => Attribute::SourceServiceAccount(typed(&values)?),
            "request.auth.principal" => Attribute::RequestAuth {
                attribute: AuthAttribute::Principal,
                values,
            },
            "request.auth.audiences" => Attribute::RequestAuth {
                attribute: AuthAttribute::Audiences,
                values,
            },
            "request.auth.presenter" => Attribute::RequestAuth {
                attribute: AuthAttribute::Presenter,
                values,
            },
            "connection.sni" => Attribute::Absent(values),
            "destination.namespace" => return Err(unsupported("use metadata.namespace")),
            "destination.name" | "destination.user" => {
                return Err(unsupported("only in Istio's v1alpha1 RBAC"))
            }
            _ if key.starts_with("destination.labels") => {
                return Err(unsupported("use the workload selector"))
            }
            _ if key.starts_with("request.headers[") => {
                let name = check_map_key(&key)?.to_ascii_lowercase();
                let pseudo = [":authority", ":method", ":path", ":scheme"];
                if !pseudo.contains(&name.as_str())
                    && http::HeaderName::from_bytes(name.as_bytes()).is_err()
                {
                    return Err(AuthzSchemaError::HeaderName(name));
                }
                Attribute::RequestHeader { name, values }
            }
            _ if key.starts_with("request.auth.claims[") => {
                let path: Vec<String> = check_map_key(&key)?
                    .split("][")
                    .map(str::to_owned)
                    .collect();
                if path
                    .iter()
                    .any(|name| name.is_empty() || name.contains(['[', ']']))
                {
                    return Err(AuthzSchemaError::BadMapKey(key));
                }
                Attribute::RequestAuth {
                    attribute: AuthAttribute::Claim(path),
                    values,
                }
            }
            _ if MAP_KEY_PREFIXES
                .iter()
                .any(|prefix| key.starts_with(prefix)) =>
            {
                check_map_key(&key)?;
                Attribute::Unevaluated
            }
            _ => return Err(AuthzSchemaError::UnknownAttribute(key)),
        };
        Ok(Self { key, attribute })
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

/// Parses `values` and `notValues` of a condition; an error names the list and the index.
fn typed<T: FromStr>(values: &Values<String>) -> Result<Values<T>, AuthzSchemaError>
where
    AuthzSchemaError: From<T::Err>,
{
    let parse = |field: &'static str, list: &[String]| {
        list.iter()
            .enumerate()
            .map(|(index, value)| {
                value
                    .parse::<T>()
                    .map_err(|problem| AuthzSchemaError::Value {
                        field,
                        index,
                        problem: Box::new(problem.into()),
                    })
            })
            .collect::<Result<Vec<T>, _>>()
    };
    Ok(Values {
        values: parse("values", &values.values)?,
        not_values: parse("notValues", &values.not_values)?,
    })
}

/// Attributes Istio names `prefix[entry]` (all L7).
const MAP_KEY_PREFIXES: [&str; 4] = [
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
    "experimental.envoy.filters.",
];

/// Istio's check of `request.headers[name]` and similar keys; the entry's name.
fn check_map_key(key: &str) -> Result<&str, AuthzSchemaError> {
    match key.find('[') {
        Some(open) if key.ends_with(']') && open > 0 && open + 2 < key.len() => {
            Ok(&key[open + 1..key.len() - 1])
        }
        _ => Err(AuthzSchemaError::BadMapKey(key.to_owned())),
    }
}

#[cfg(test)]
mod tests;
