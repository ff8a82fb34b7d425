//! `PeerAuthentication`: which policies govern a workload, and the inbound mTLS mode they give it
//! on a port ([`super::ClusterState::peer_authentication`]).
//!
//! The scope of a policy follows Istio's: without a selector (or with empty `matchLabels`) it is
//! **mesh-wide** in the root namespace ([`super::EnrollmentOptions::root_namespace`], default
//! `istio-system`) and **namespace-wide** elsewhere; with a selector it applies to the workloads
//! of its namespace whose labels include all of `matchLabels`. A selector policy in the root
//! namespace applies to no workload: Istio (istiod, sidecar and ambient alike) has no mesh-wide
//! workload `PeerAuthentication`, and ignores it; the agent reports it in the state's warnings.
//!
//! The effective mode is resolved from the mesh-wide policy, then the namespace-wide one, then
//! the workload one, then that policy's `portLevelMtls` entry for the port; each level that sets
//! a mode (not `UNSET`) overrides the levels before it, and PERMISSIVE applies when none does.
//! When several policies compete at one level (two namespace-wide policies in a namespace, two
//! selector policies that select one workload), the oldest by `metadata.creationTimestamp`, then
//! by name, wins, as in Istio; a policy without a timestamp counts as the oldest (Go's zero time).
//! Each conflict is listed in the state's warnings.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
};

use k8s_openapi::jiff::Timestamp;

use super::{
    error::StateError,
    k8s::{self, Kind, Labels, ObjectRef, PeerAuthMode},
    model::Workload,
    names::{check_name, NameRule},
};
use crate::meta::MetaExt;

/// What the agent enforces on inbound connections to a workload port, as ztunnel does.
///
/// There is no "disabled": as in Istio's ambient mode (istiod drops `DISABLE` policies and
/// port-level `DISABLE` entries when it translates them for ztunnel), a `DISABLE` mode is
/// ignored and the parent level's mode applies. ztunnel does not disable mTLS: outbound, the
/// agent still uses mTLS (HBONE) to enrolled destinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// mTLS (HBONE) only: plaintext inbound connections are refused.
    Strict,
    /// mTLS and plaintext inbound connections are accepted.
    Permissive,
}

impl MtlsMode {
    /// The mode ztunnel enforces for a mode a policy sets (`UNSET` inherits, and is never passed
    /// here; it would read as PERMISSIVE, the default).
    fn enforced(mode: PeerAuthMode) -> Self {
        match mode {
            PeerAuthMode::Strict => MtlsMode::Strict,
            PeerAuthMode::Unset | PeerAuthMode::Disable | PeerAuthMode::Permissive => {
                MtlsMode::Permissive
            }
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
        })
    }
}

/// Which workloads a `PeerAuthentication` applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerAuthScope {
    /// No selector, in the root namespace: every workload.
    Mesh,
    /// No selector, in another namespace: the workloads of that namespace.
    Namespace,
    /// A selector, outside the root namespace: the matching workloads of its namespace.
    Workload,
    /// A selector in the root namespace: none (Istio ignores such policies).
    Ignored,
}

impl fmt::Display for PeerAuthScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerAuthScope::Mesh => "mesh-wide",
            PeerAuthScope::Namespace => "namespace-wide",
            PeerAuthScope::Workload => "workload",
            PeerAuthScope::Ignored => "ignored",
        })
    }
}

/// A `PeerAuthentication`, as the agent evaluates it. Displayed as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339, as the API server writes it).
    pub creation_timestamp: Option<String>,
    /// `spec.selector.matchLabels`; empty for a mesh- or namespace-wide policy.
    pub selector: Labels,
    /// `spec.mtls.mode`.
    pub mode: PeerAuthMode,
    /// `spec.portLevelMtls`: mode per workload port (only for selector policies).
    pub port_level: BTreeMap<u16, PeerAuthMode>,
    /// Which workloads it applies to.
    pub scope: PeerAuthScope,
    /// `creation_timestamp` parsed; `None` (no timestamp) is the oldest.
    created: Option<Timestamp>,
}

impl fmt::Display for PeerAuthPolicy {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PeerAuthPolicy {
    /// Whether the selector selects `workload` (its namespace is not checked). An empty selector
    /// selects every workload.
    pub fn selects(&self, workload: &Workload) -> bool {
        self.selector
            .iter()
            .all(|(key, value)| workload.labels.get(key) == Some(value))
    }

    /// Istio's order among competing policies: oldest first, then by name.
    fn age_order(&self) -> (Option<Timestamp>, &str) {
        (self.created, &self.name)
    }
}

/// The effective mTLS mode of a workload port, and what decided it (for logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthDecision {
    /// What the agent enforces.
    pub mode: MtlsMode,
    /// The mode as the deciding policy wrote it (`DISABLE` shows here, enforced as
    /// PERMISSIVE); `UNSET` when no policy sets a mode.
    pub declared: PeerAuthMode,
    /// The policy whose mode applies; `None` for the default (PERMISSIVE).
    pub policy: Option<Arc<PeerAuthPolicy>>,
    /// The port, when the policy's `portLevelMtls` decided.
    pub port: Option<u16>,
}

impl PeerAuthDecision {
    /// The default: PERMISSIVE, decided by no policy.
    fn default_permissive() -> Self {
        Self {
            mode: MtlsMode::Permissive,
            declared: PeerAuthMode::Unset,
            policy: None,
            port: None,
        }
    }

    /// Applies `mode` of `policy` over the parent levels, unless it is `UNSET` (inherit).
    fn apply(&mut self, mode: PeerAuthMode, policy: &Arc<PeerAuthPolicy>, port: Option<u16>) {
        // UNSET inherits; DISABLE is ignored in ambient mode (as istiod's translation for
        // ztunnel drops it), so the parent level's mode applies to both.
        if !matches!(mode, PeerAuthMode::Unset | PeerAuthMode::Disable) {
            self.mode = MtlsMode::enforced(mode);
            self.declared = mode;
            self.policy = Some(Arc::clone(policy));
            self.port = port;
        }
    }
}

impl fmt::Display for PeerAuthDecision {
    /// For example:
    ///
    /// - `STRICT (PeerAuthentication shop/default, namespace-wide)`
    /// - `PERMISSIVE (PeerAuthentication shop/web, port 8080)`
    /// - `PERMISSIVE (no PeerAuthentication sets a mode)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(policy) = &self.policy else {
            return write!(f, "{} (no PeerAuthentication sets a mode)", self.mode);
        };
        write!(f, "{} (PeerAuthentication {policy}, ", self.mode)?;
        match self.port {
            Some(port) => write!(f, "port {port})"),
            None => write!(f, "{})", policy.scope),
        }
    }
}

/// Policies that compete at the workload level (oldest first), and the workloads they select.
type Conflict = (Vec<Arc<PeerAuthPolicy>>, Vec<String>);

/// The `PeerAuthentications` of a state, indexed for [`PeerAuthIndex::decide`].
#[derive(Debug, Default)]
pub(super) struct PeerAuthIndex {
    /// All, sorted by namespace and name.
    policies: Vec<Arc<PeerAuthPolicy>>,
    /// The mesh-wide policy that applies (the oldest).
    mesh: Option<Arc<PeerAuthPolicy>>,
    /// The namespace-wide policy that applies in each namespace (the oldest).
    namespaces: HashMap<String, Arc<PeerAuthPolicy>>,
    /// Workload policies per namespace, oldest first.
    selectors: HashMap<String, Vec<Arc<PeerAuthPolicy>>>,
    /// Conflicts and ignored policies.
    warnings: Vec<String>,
}

impl PeerAuthIndex {
    /// Translates and indexes `objects` (sorted by namespace and name); `workloads` are those of
    /// the state, to find conflicts between selector policies.
    pub(super) fn build<'a>(
        objects: impl IntoIterator<Item = &'a k8s::PeerAuthentication>,
        root_namespace: &str,
        workloads: &[Arc<Workload>],
    ) -> Result<Self, StateError> {
        let mut index = Self::default();
        let mut mesh = Vec::new();
        let mut namespaces: BTreeMap<String, Vec<Arc<PeerAuthPolicy>>> = BTreeMap::new();
        let mut selectors: BTreeMap<String, Vec<Arc<PeerAuthPolicy>>> = BTreeMap::new();
        for object in objects {
            let policy = Arc::new(policy_from(object, root_namespace)?);
            let group = match policy.scope {
                PeerAuthScope::Mesh => &mut mesh,
                PeerAuthScope::Namespace => namespaces.entry(policy.namespace.clone()).or_default(),
                PeerAuthScope::Workload => selectors.entry(policy.namespace.clone()).or_default(),
                PeerAuthScope::Ignored => {
                    index.warnings.push(format!(
                        "PeerAuthentication {policy} is ignored: a selector in the root \
                         namespace {root_namespace} (Istio has no mesh-wide workload policies)"
                    ));
                    index.policies.push(policy);
                    continue;
                }
            };
            group.push(Arc::clone(&policy));
            index.policies.push(policy);
        }

        mesh.sort_by(|a, b| a.age_order().cmp(&b.age_order()));
        index.warn_conflict(
            &mesh,
            &format!("mesh-wide (root namespace {root_namespace})"),
        );
        index.mesh = mesh.into_iter().next();
        for (namespace, mut policies) in namespaces {
            policies.sort_by(|a, b| a.age_order().cmp(&b.age_order()));
            index.warn_conflict(&policies, &format!("namespace-wide in {namespace}"));
            if let Some(oldest) = policies.into_iter().next() {
                index.namespaces.insert(namespace, oldest);
            }
        }
        for policies in selectors.values_mut() {
            policies.sort_by(|a, b| a.age_order().cmp(&b.age_order()));
        }

        // Selector conflicts, grouped by the competing policies.
        let mut conflicts: BTreeMap<Vec<String>, Conflict> = BTreeMap::new();
        for workload in workloads {
            let Some(policies) = selectors.get(&workload.namespace) else {
                continue;
            };
            let matching: Vec<Arc<PeerAuthPolicy>> = policies
                .iter()
                .filter(|p| p.selects(workload))
                .cloned()
                .collect();
            if matching.len() > 1 {
                let key = matching.iter().map(ToString::to_string).collect();
                let entry = conflicts.entry(key).or_insert((matching, Vec::new()));
                entry.1.push(workload.to_string());
            }
        }
        for (policies, workloads) in conflicts.into_values() {
            index.warn_conflict(&policies, &format!("selecting {}", workloads.join(", ")));
        }
        index.selectors = selectors.into_iter().collect();
        Ok(index)
    }

    /// Records a warning if more than one of `policies` (oldest first) competes at one level.
    fn warn_conflict(&mut self, policies: &[Arc<PeerAuthPolicy>], what: &str) {
        if let [oldest, _, ..] = policies {
            let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
            self.warnings.push(format!(
                "PeerAuthentications {} conflict, all {what}: the oldest, {oldest}, applies",
                names.join(", ")
            ));
        }
    }

    /// All policies, sorted by namespace and name.
    pub(super) fn policies(&self) -> &[Arc<PeerAuthPolicy>] {
        &self.policies
    }

    /// Conflicts between policies and ignored policies, one line each.
    pub(super) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The effective mode of `workload` on `port`.
    pub(super) fn decide(&self, workload: &Workload, port: u16) -> PeerAuthDecision {
        let mut decision = PeerAuthDecision::default_permissive();
        if let Some(mesh) = &self.mesh {
            decision.apply(mesh.mode, mesh, None);
        }
        if let Some(namespace) = self.namespaces.get(workload.namespace.as_str()) {
            decision.apply(namespace.mode, namespace, None);
        }
        let selected = self
            .selectors
            .get(workload.namespace.as_str())
            .and_then(|policies| policies.iter().find(|p| p.selects(workload)));
        if let Some(policy) = selected {
            decision.apply(policy.mode, policy, None);
            if let Some(mode) = policy.port_level.get(&port) {
                decision.apply(*mode, policy, Some(port));
            }
        }
        decision
    }
}

fn policy_from(
    pa: &k8s::PeerAuthentication,
    root_namespace: &str,
) -> Result<PeerAuthPolicy, StateError> {
    let object = ObjectRef::namespaced(Kind::PeerAuthentication, &pa.metadata);
    let meta = &pa.metadata;
    let namespace = meta.namespace();
    check_name(&object, "metadata.namespace", namespace, NameRule::Label)?;
    check_name(&object, "metadata.name", meta.name(), NameRule::Subdomain)?;
    let created = meta.creation_timestamp.as_ref().map(|time| time.0);
    let selector = pa.spec.match_labels().cloned().unwrap_or_default();
    let scope = match (namespace == root_namespace, selector.is_empty()) {
        (true, true) => PeerAuthScope::Mesh,
        (false, true) => PeerAuthScope::Namespace,
        (false, false) => PeerAuthScope::Workload,
        (true, false) => PeerAuthScope::Ignored,
    };
    Ok(PeerAuthPolicy {
        namespace: namespace.to_owned(),
        name: meta.name().to_owned(),
        creation_timestamp: created.map(|time| time.to_string()),
        selector,
        mode: pa.spec.mode(),
        port_level: pa
            .spec
            .port_level_mtls
            .iter()
            .map(|(port, mtls)| (*port, mtls.mode))
            .collect(),
        scope,
        created,
    })
}
