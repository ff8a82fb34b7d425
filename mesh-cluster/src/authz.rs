//! `AuthorizationPolicy` at L4, as ztunnel enforces it: which policies apply to a destination
//! workload, and whether they let a connection in ([`super::ClusterState::authorize`]); and at
//! the waypoints, on each request with its HTTP fields (the [`waypoint`] module).
//!
//! **Scope.** A policy in the root namespace ([`super::EnrollmentOptions::root_namespace`])
//! without a selector (or with empty `matchLabels`) applies to every workload; with a selector,
//! to the matching workloads of every namespace. Elsewhere, a policy without a selector applies
//! to the workloads of its namespace, and with a selector to the matching ones. A policy with
//! `targetRef`/`targetRefs` is for waypoints (the node agent skips it): see the [`waypoint`]
//! module, which enforces it on each request with its HTTP fields.
//!
//! **Verdict.** A connection is denied if any DENY policy that applies matches it; otherwise, if
//! any ALLOW policy applies to the workload, one of them must match it (else it is denied);
//! otherwise it is allowed. AUDIT policies never change the verdict: those that match are listed
//! in the decision. A policy matches when one of its rules does; a policy without rules matches
//! nothing (an ALLOW policy without rules therefore denies everything it applies to, Istio's
//! "allow nothing"), and `rules: [{}]` matches everything.
//!
//! **Rules.** `from`, `to` and `when` must all match; `from` matches when one of its sources
//! does, `to` when one of its operations does, `when` when all its conditions do. Within a
//! source, an operation or a condition, every field given must match one of its values, and no
//! value of a `not…` field may match. Principals (`cluster.local/ns/shop/sa/web`, the SPIFFE id
//! without `spiffe://`) and namespaces are patterns: exact, `*` (any identity), `prefix*` or
//! `*suffix`. Service accounts are `namespace/name` (`name` alone is in the policy's namespace),
//! matched exactly. Addresses are single IPs or CIDR blocks; ports are the destination
//! workload's (after service resolution). `when` keys evaluated: `source.ip`,
//! `source.namespace`, `source.principal`, `destination.ip`, `destination.port`.
//!
//! **Connections without identity** (plaintext): as in ztunnel, no principal, namespace or
//! service-account value matches them, so a positive field (`principals`, `namespaces`,
//! `serviceAccounts`, and the `source.principal`/`source.namespace` conditions' `values`) fails,
//! and a `not…` field (`notPrincipals`, `notNamespaces`, `notServiceAccounts`, `notValues`)
//! passes. In particular `notPrincipals: ["*"]` matches exactly the connections without
//! identity: a DENY rule with it refuses plaintext, Istio's idiom.
//!
//! **HTTP (L7) fields** (`requestPrincipals`, `remoteIpBlocks`, `hosts`, `methods`, `paths`,
//! their `not…` forms, and the other `when` keys) cannot be enforced at L4. As istiod does for
//! ztunnel, an ALLOW or AUDIT rule that uses one matches nothing (it allows less), and a DENY
//! rule is enforced without them (it denies more: a source or an operation left without fields
//! matches every connection, a dropped condition always holds). Each such rule is listed in the
//! state's warnings. (ztunnel's own matcher skips a source or operation left empty, so there
//! such a DENY rule matches nothing; the agent follows what istiod's warning promises, which
//! fails closed.) DENY and AUDIT policies without rules are listed in the warnings too.
//!
//! Addresses compare IPv4-mapped IPv6 addresses as IPv4. The agent does not change a policy's
//! meaning otherwise.

use std::{borrow::Cow, collections::HashMap, fmt, net::IpAddr, sync::Arc};

use mesh_identity::Identity;
use serde::{Serialize, Serializer};

use super::{
    authn::VerifiedJwt,
    error::StateError,
    k8s::{self, AuthAttribute, AuthzAction, Labels},
    model::Workload,
};
pub use crate::ip_block::IpBlock;
pub use crate::{path_pattern::PathPattern, string_match::StringMatch};

mod translate;
pub mod waypoint;
pub use waypoint::{HttpFacts, PolicyTarget, WaypointFacts};

/// What the agent knows about a connection when it decides whether to let it in.
#[derive(Clone, Copy, Debug)]
pub struct ConnFacts<'a> {
    /// The connection's source address.
    pub src_ip: IpAddr,
    /// Identity proven by mTLS, or known to the agent for a pod of its own node; `None` for
    /// plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The destination workload's address.
    pub dst_ip: IpAddr,
    /// The destination workload's port (after service resolution).
    pub dst_port: u16,
    /// The destination workload: its namespace and labels select the policies.
    pub dst: &'a Workload,
}

/// Whether a connection may proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it in.
    Allow,
    /// Refuse it.
    Deny,
}

/// Why a [`Verdict`] was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionReason {
    /// No ALLOW or DENY policy applies to the workload: allowed.
    NoPolicy,
    /// An ALLOW policy matched (and no DENY policy did).
    AllowMatched,
    /// A DENY policy matched.
    DenyMatched,
    /// ALLOW policies apply to the workload, and none matched: denied.
    NoAllowMatched,
    /// A plaintext connection to a workload port whose `PeerAuthentication` is STRICT: denied
    /// (set by the agent, which checks mTLS before `AuthorizationPolicy`; `policy` names the
    /// `PeerAuthentication`).
    MtlsRequired,
    /// The destination is not a workload of the cluster view: denied. The agent only decides
    /// for pods it captured, so this is a view that lags (a pod handed over by the CNI plugin
    /// before its address reached the API) or a pod that left it: its policies cannot be known,
    /// so the connection fails closed.
    UnknownDestination,
    /// The destination is behind a waypoint (its own binding, or a Service it serves is bound to
    /// one), the connection does not come from that waypoint, and no ALLOW policy explicitly
    /// lets it in: denied (set by [`super::ClusterState::admit`]; `policy` names the waypoint).
    WaypointBypass,
    /// The destination is behind a waypoint and the plaintext connection comes from its own
    /// node (its host network: the kubelet's health probes), which is no bypass; the policies
    /// allowed it (set by [`super::ClusterState::admit`]).
    NodeLocal,
}

/// The outcome of [`super::ClusterState::authorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzDecision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Why.
    pub reason: DecisionReason,
    /// `namespace/name` of the policy that decided (the matching DENY or ALLOW); `None` for
    /// [`DecisionReason::NoPolicy`] and [`DecisionReason::NoAllowMatched`].
    pub policy: Option<Arc<str>>,
    /// `namespace/name` of the AUDIT policies whose rules matched (they never change the
    /// verdict). A boxed slice, not a `Vec`: a decision lives in every inbound connection's
    /// record, whose size is held to an allocation class.
    pub audited: Box<[Arc<str>]>,
}

impl AuthzDecision {
    fn new(verdict: Verdict, reason: DecisionReason, policy: Option<&AuthzPolicy>) -> Self {
        Self {
            verdict,
            reason,
            policy: policy.map(|p| Arc::clone(&p.key)),
            audited: Box::default(),
        }
    }
}

/// Which workloads an `AuthorizationPolicy` applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthzScope {
    /// No selector, in the root namespace: every workload.
    Mesh,
    /// A selector in the root namespace: the matching workloads of every namespace.
    MeshSelector,
    /// No selector, in another namespace: the workloads of that namespace.
    Namespace,
    /// A selector, outside the root namespace: the matching workloads of its namespace.
    Workload,
    /// `targetRef`/`targetRefs`: enforced by waypoints, not by the node agent.
    Waypoint,
}

impl fmt::Display for AuthzScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthzScope::Mesh => "mesh-wide",
            AuthzScope::MeshSelector => "mesh-wide selector",
            AuthzScope::Namespace => "namespace-wide",
            AuthzScope::Workload => "workload",
            AuthzScope::Waypoint => "waypoint",
        })
    }
}

/// An `AuthorizationPolicy`, as the agents and the waypoints evaluate it. Displayed as
/// `namespace/name`; serialized (for the admin interface's config dump) with its rules as
/// enforced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthzPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.action`.
    pub action: AuthzAction,
    /// Which workloads it applies to.
    pub scope: AuthzScope,
    /// `spec.selector.matchLabels`; empty for a mesh- or namespace-wide policy.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub selector: Labels,
    /// The rules as enforced on a connection (by the node agent; by a waypoint on TCP it passes
    /// through): an ALLOW or AUDIT rule with HTTP fields is left out (it matches nothing), a
    /// DENY rule keeps its L4 part.
    pub rules: Vec<AuthzRule>,
    /// For a waypoint's policy (`targetRefs`): what it targets (those that apply to nothing
    /// are left out, with a warning).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<PolicyTarget>,
    /// For a waypoint's policy: its rules as enforced on an HTTP request, every field included
    /// (an ALLOW or AUDIT rule with a field nothing evaluates is left out).
    #[serde(rename = "httpRules", skip_serializing_if = "Vec::is_empty")]
    pub http_rules: Vec<AuthzRule>,
    /// For a policy of the node agents (no `targetRefs`): how each rule with HTTP fields is
    /// narrowed, since the agents see connections, not requests (empty: enforced as written).
    #[serde(skip)]
    pub unenforced_by_agents: Vec<String>,
    /// `namespace/name`, shared by the decisions that name the policy.
    #[serde(skip)]
    key: Arc<str>,
}

impl fmt::Display for AuthzPolicy {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl AuthzPolicy {
    /// Whether the selector selects `workload` (its namespace is not checked). An empty selector
    /// selects every workload.
    pub fn selects(&self, workload: &Workload) -> bool {
        self.selector
            .iter()
            .all(|(key, value)| workload.labels.get(key) == Some(value))
    }

    /// Whether one of the rules matches: the request's rules for an HTTP request, else the
    /// connection's.
    fn matches(&self, conn: &Conn<'_>) -> bool {
        let rules = if conn.http.is_some() {
            &self.http_rules
        } else {
            &self.rules
        };
        rules.iter().any(|rule| rule.matches(conn))
    }
}

/// A rule as enforced: `from`, `to` and `when` must all match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthzRule {
    /// Index of the rule in `spec.rules`.
    pub index: usize,
    /// Sources, one of which must match; empty matches any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzMatch>,
    /// Operations, one of which must match; empty matches any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzMatch>,
    /// Conditions, all of which must match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzMatch>,
}

impl AuthzRule {
    fn matches(&self, conn: &Conn<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|m| m.matches(conn)))
            && (self.to.is_empty() || self.to.iter().any(|m| m.matches(conn)))
            && self.when.iter().all(|m| m.matches(conn))
    }
}

/// One source, operation or condition, as enforced: every non-empty positive field must have a
/// value that matches, and no value of a `not…` field may match. Without fields, it matches any
/// connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzMatch {
    /// Principal patterns (`principals`, `source.principal`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// `notPrincipals`, or `notValues` of `source.principal`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// Namespace patterns (`namespaces`, `source.namespace`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    /// `notNamespaces`, or `notValues` of `source.namespace`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// `serviceAccounts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// `notServiceAccounts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source addresses (`ipBlocks`, `source.ip`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpBlock>,
    /// `notIpBlocks`, or `notValues` of `source.ip`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpBlock>,
    /// Destination addresses (`destination.ip`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpBlock>,
    /// `notValues` of `destination.ip`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpBlock>,
    /// Destination ports (`ports`, `destination.port`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    /// `notPorts`, or `notValues` of `destination.port`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
    /// HTTP: `hosts`, lower case, matched against the request's authority with and without
    /// its port, ignoring case.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    /// HTTP: `notHosts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    /// HTTP: `methods`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    /// HTTP: `notMethods`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    /// HTTP: `paths`, against the normalized path without its query.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
    /// HTTP: `notPaths`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<PathPattern>,
    /// HTTP: the client's address (`remoteIpBlocks`, `remote.ip`): the source's, as the
    /// waypoint trusts no `X-Forwarded-For` hop.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote_ips: Vec<IpBlock>,
    /// HTTP: `notRemoteIpBlocks`, or `notValues` of `remote.ip`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ips: Vec<IpBlock>,
    /// HTTP: `request.headers[...]` conditions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// HTTP: the verified JWT's attributes (`requestPrincipals`, `request.auth.*`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_auth: Vec<AuthMatch>,
    /// HTTP: attributes a request never has here (`connection.sni`) of which the match asks a
    /// value: it matches nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requires_absent: Vec<String>,
}

/// A condition on the request's verified JWT: one of `values` must match one of the
/// attribute's values, none of `not_values` any; a request without a JWT has no value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthMatch {
    /// What it reads of the JWT.
    pub attribute: AuthAttribute,
    /// `values`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<StringMatch>,
    /// `notValues`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<StringMatch>,
}

impl AuthMatch {
    fn matches(&self, jwt: Option<&VerifiedJwt>) -> bool {
        let found: Vec<Cow<'_, str>> = match (jwt, &self.attribute) {
            (None, _) => Vec::new(),
            (Some(jwt), AuthAttribute::Principal) => vec![Cow::Borrowed(jwt.principal.as_str())],
            (Some(jwt), AuthAttribute::Audiences) => jwt
                .audiences
                .iter()
                .map(|a| Cow::Borrowed(a.as_str()))
                .collect(),
            (Some(jwt), AuthAttribute::Presenter) => jwt
                .presenter
                .iter()
                .map(|p| Cow::Borrowed(p.as_str()))
                .collect(),
            (Some(jwt), AuthAttribute::Claim(path)) => {
                jwt.claim(path).into_iter().map(Cow::Owned).collect()
            }
        };
        let matches = |m: &StringMatch| found.iter().any(|v| m.matches(v));
        check(&self.values, &self.not_values, matches)
    }
}

/// A `request.headers[name]` condition: one of `values` must match the header (its values
/// joined by `,`), none of `not_values`; an absent header matches no value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// The header's name, lower case, or a pseudo-header (`:authority`, `:method`, `:path`,
    /// `:scheme`).
    pub name: String,
    /// `values`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<StringMatch>,
    /// `notValues`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<StringMatch>,
}

impl AuthzMatch {
    fn matches(&self, conn: &Conn<'_>) -> bool {
        let principal = |m: &StringMatch| conn.principal.is_some_and(|p| m.matches(p));
        let namespace = |m: &StringMatch| conn.namespace.is_some_and(|ns| m.matches(ns));
        let account = |m: &ServiceAccountMatch| {
            conn.identity
                .is_some_and(|id| id.namespace() == m.namespace && id.service_account() == m.name)
        };
        let dst_port = |port: &u16| *port == conn.dst_port;
        let src_ip = |block: &IpBlock| block.contains(conn.src_ip);
        let dst_ip = |block: &IpBlock| block.contains(conn.dst_ip);
        check(
            &self.destination_ports,
            &self.not_destination_ports,
            dst_port,
        ) && check(&self.source_ips, &self.not_source_ips, src_ip)
            && check(&self.destination_ips, &self.not_destination_ips, dst_ip)
            && check(&self.principals, &self.not_principals, principal)
            && check(&self.namespaces, &self.not_namespaces, namespace)
            && check(&self.service_accounts, &self.not_service_accounts, account)
            && self.http_matches(conn)
    }

    /// The HTTP fields; a connection without a request (they are never set on the rules a
    /// connection is checked against) matches no value and passes every `not…`.
    fn http_matches(&self, conn: &Conn<'_>) -> bool {
        let http = conn.http.as_ref();
        let remote_ip = |block: &IpBlock| block.contains(conn.src_ip);
        let host = |m: &StringMatch| http.is_some_and(|h| h.host_matches(m));
        let method = |m: &StringMatch| http.is_some_and(|h| m.matches(h.method));
        let path = |p: &PathPattern| http.is_some_and(|h| p.matches(h.path));
        self.requires_absent.is_empty()
            && self
                .request_auth
                .iter()
                .all(|m| m.matches(http.and_then(|h| h.jwt)))
            && check(&self.remote_ips, &self.not_remote_ips, remote_ip)
            && check(&self.hosts, &self.not_hosts, host)
            && check(&self.methods, &self.not_methods, method)
            && check(&self.paths, &self.not_paths, path)
            && self.headers.iter().all(|header| {
                let value = http.and_then(|h| h.header(&header.name));
                let matches = |m: &StringMatch| value.as_deref().is_some_and(|v| m.matches(v));
                check(&header.values, &header.not_values, matches)
            })
    }
}

/// A field and its `not…` form: one of `values` must match (if any), none of `not_values` may.
fn check<T>(values: &[T], not_values: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (values.is_empty() || values.iter().any(&matches)) && !not_values.iter().any(matches)
}

/// A service account of a source's identity, `namespace/name` (serialized so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    /// Namespace.
    pub namespace: String,
    /// Service account name.
    pub name: String,
}

impl Serialize for ServiceAccountMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}/{}", self.namespace, self.name))
    }
}

/// [`ConnFacts`] (or a waypoint's [`WaypointFacts`]) in the form the matchers read.
struct Conn<'a> {
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
    identity: Option<&'a Identity>,
    /// The identity without `spiffe://`: `td/ns/namespace/sa/name`.
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    /// The request, at a waypoint serving HTTP.
    http: Option<HttpFacts<'a>>,
}

impl<'a> Conn<'a> {
    fn new(facts: &ConnFacts<'a>) -> Self {
        Self::of(
            facts.src_ip,
            facts.src_identity,
            (facts.dst_ip, facts.dst_port),
            None,
        )
    }

    fn of(
        src_ip: IpAddr,
        identity: Option<&'a Identity>,
        (dst_ip, dst_port): (IpAddr, u16),
        http: Option<HttpFacts<'a>>,
    ) -> Self {
        Self {
            src_ip: src_ip.to_canonical(),
            dst_ip: dst_ip.to_canonical(),
            dst_port,
            identity,
            principal: identity.and_then(|id| id.as_str().strip_prefix("spiffe://")),
            namespace: identity.map(Identity::namespace),
            http,
        }
    }
}

/// The policies of one scope group, by action, each sorted by namespace and name.
#[derive(Debug, Default)]
struct Group {
    deny: Vec<Arc<AuthzPolicy>>,
    allow: Vec<Arc<AuthzPolicy>>,
    audit: Vec<Arc<AuthzPolicy>>,
}

impl Group {
    fn push(&mut self, policy: &Arc<AuthzPolicy>) {
        let list = match policy.action {
            AuthzAction::Deny => &mut self.deny,
            AuthzAction::Allow => &mut self.allow,
            AuthzAction::Audit => &mut self.audit,
        };
        list.push(Arc::clone(policy));
    }
}

/// The `AuthorizationPolicies` of a state, indexed for [`AuthzIndex::decide`].
#[derive(Debug, Default)]
pub(super) struct AuthzIndex {
    /// All, sorted by namespace and name.
    policies: Vec<Arc<AuthzPolicy>>,
    /// The root namespace's policies (mesh-wide, with or without selector).
    mesh: Group,
    /// The other namespaces' policies.
    namespaces: HashMap<String, Group>,
    /// The waypoints' policies (`targetRefs`), by target.
    waypoints: waypoint::WaypointPolicies,
    /// Skipped policies and rules with HTTP fields.
    warnings: Vec<String>,
}

impl AuthzIndex {
    /// Translates and indexes `objects`, sorted by namespace and name.
    pub(super) fn build<'a>(
        objects: impl IntoIterator<Item = &'a k8s::AuthorizationPolicy>,
        root_namespace: &str,
    ) -> Result<Self, StateError> {
        let mut index = Self::default();
        for object in objects {
            let policy = Arc::new(translate::policy_from(
                object,
                root_namespace,
                &mut index.warnings,
            )?);
            match policy.scope {
                AuthzScope::Mesh | AuthzScope::MeshSelector => index.mesh.push(&policy),
                AuthzScope::Namespace | AuthzScope::Workload => index
                    .namespaces
                    .entry(policy.namespace.clone())
                    .or_default()
                    .push(&policy),
                AuthzScope::Waypoint => index.waypoints.push(&policy),
            }
            index.policies.push(policy);
        }
        Ok(index)
    }

    /// All policies, sorted by namespace and name.
    pub(super) fn policies(&self) -> &[Arc<AuthzPolicy>] {
        &self.policies
    }

    /// Skipped policies and rules with HTTP fields, one line each.
    pub(super) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The decision for a connection: see the module documentation. When several policies
    /// match, the one named is the first of the root namespace's, then of the workload's
    /// namespace, each by name.
    pub(super) fn decide(&self, facts: &ConnFacts<'_>) -> AuthzDecision {
        let groups = [
            Some(&self.mesh),
            self.namespaces.get(facts.dst.namespace.as_str()),
        ];
        let applying = |list: fn(&Group) -> &Vec<Arc<AuthzPolicy>>| {
            groups
                .into_iter()
                .flatten()
                .flat_map(list)
                .filter(move |policy| policy.selects(facts.dst))
        };
        verdict(applying, &Conn::new(facts))
    }

    /// The decision of waypoint `namespace/name` for a request or a connection through it to
    /// `services` (`namespace`, `name`: the one addressed, or those serving the pod addressed):
    /// see the [`waypoint`] module.
    pub(super) fn decide_at_waypoint(
        &self,
        waypoint: (&str, &str),
        services: &[crate::policy_target::Addressed<'_>],
        facts: &WaypointFacts<'_>,
    ) -> AuthzDecision {
        let groups = self.waypoints.groups(waypoint, services);
        let applying = |list: fn(&Group) -> &Vec<Arc<AuthzPolicy>>| groups.clone().flat_map(list);
        verdict(applying, &facts.conn())
    }
}

/// DENY first, then ALLOW, with the AUDIT policies that match listed, among the policies that
/// `applying` gives for each action.
fn verdict<'p, I: Iterator<Item = &'p Arc<AuthzPolicy>>>(
    applying: impl Fn(fn(&Group) -> &Vec<Arc<AuthzPolicy>>) -> I,
    conn: &Conn<'_>,
) -> AuthzDecision {
    let audited: Vec<Arc<str>> = applying(|g| &g.audit)
        .filter(|policy| policy.matches(conn))
        .map(|policy| Arc::clone(&policy.key))
        .collect();
    let mut decision = if let Some(deny) = applying(|g| &g.deny).find(|p| p.matches(conn)) {
        AuthzDecision::new(Verdict::Deny, DecisionReason::DenyMatched, Some(deny))
    } else {
        let mut allows = applying(|g| &g.allow).peekable();
        if allows.peek().is_none() {
            AuthzDecision::new(Verdict::Allow, DecisionReason::NoPolicy, None)
        } else if let Some(allow) = allows.find(|p| p.matches(conn)) {
            AuthzDecision::new(Verdict::Allow, DecisionReason::AllowMatched, Some(allow))
        } else {
            AuthzDecision::new(Verdict::Deny, DecisionReason::NoAllowMatched, None)
        }
    };
    decision.audited = audited.into_boxed_slice();
    decision
}

#[cfg(test)]
mod tests;
