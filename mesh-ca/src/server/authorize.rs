//! Who may have a certificate for which identity: the CA's decision, as istiod takes it, as a
//! pure function of what the server fetched ([`authorize`]).
//!
//! - The token must be authenticated by the API server's `TokenReview` for the configured
//!   audience, name a `ServiceAccount` (`system:serviceaccount:<ns>:<sa>`, in group
//!   `system:serviceaccounts`) and be bound to a Pod (its name and UID in the extras).
//! - That Pod must exist with the same UID and `ServiceAccount`, not be terminated nor being
//!   deleted, and be scheduled on a node.
//! - The identity asked for (`ImpersonatedIdentity`, else the caller's own) must be of the CA's
//!   trust domain. Another identity than the caller's (impersonation) is only for the
//!   allow-listed node-agent `ServiceAccounts`, and only when at least one running Pod (phase not
//!   Succeeded nor Failed, not being deleted) of that identity's namespace and `ServiceAccount` is
//!   on the caller's node.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Pod;
use mesh_identity::spiffe::{validate_namespace, validate_service_account};
use mesh_identity::{Identity, IdentityError};

/// The group of every `ServiceAccount`'s tokens.
pub const SERVICE_ACCOUNTS_GROUP: &str = "system:serviceaccounts";
/// The prefix of a `ServiceAccount`'s user name.
pub const SERVICE_ACCOUNT_USER_PREFIX: &str = "system:serviceaccount:";
/// The `TokenReview` extra naming the Pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The `TokenReview` extra holding the UID of the Pod a token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// A `ServiceAccount`, written `<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccountRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccountRef {
    /// `namespace/name`, both checked as Kubernetes names.
    pub fn new(namespace: &str, name: &str) -> Result<Self, IdentityError> {
        validate_namespace(namespace)?;
        validate_service_account(name)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for ServiceAccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceAccountRef {
    type Err = IdentityError;

    /// Parses `<namespace>/<name>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = s.split_once('/').unwrap_or(("", s));
        Self::new(namespace, name)
    }
}

/// What the API server's `TokenReview` said of the caller's token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Review {
    /// The token is valid (signature, expiry, audience, bound object still there).
    pub authenticated: bool,
    /// The API server's reason when it is not.
    pub error: Option<String>,
    /// The user (`system:serviceaccount:<ns>:<sa>` for a `ServiceAccount`).
    pub username: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The audiences the token is valid for, among those asked.
    pub audiences: Vec<String>,
    /// The Pod the token is bound to ([`POD_NAME_EXTRA`]).
    pub pod_name: Option<String>,
    /// That Pod's UID ([`POD_UID_EXTRA`]).
    pub pod_uid: Option<String>,
}

/// A Pod, as the decision reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: Option<String>,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
}

impl PodFacts {
    /// The facts of `pod`.
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            node_name: spec.and_then(|s| s.node_name.clone()),
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }

    /// Neither finished (phase `Succeeded` or `Failed`) nor being deleted. Pending counts as
    /// running, as it does for istiod (a pod's first certificate is asked for while it starts).
    pub fn is_running(&self) -> bool {
        !self.deleting && !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the server allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The only trust domain signed for.
    pub trust_domain: String,
    /// The audience tokens must be for (`istio-ca`).
    pub audience: String,
    /// The `ServiceAccounts` that may ask for others' identities (the node agents').
    pub impersonators: Vec<ServiceAccountRef>,
}

/// The caller, as its reviewed token names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Its `ServiceAccount`.
    pub account: ServiceAccountRef,
    /// Its identity in the CA's trust domain.
    pub identity: Identity,
    /// The Pod the token is bound to.
    pub pod_name: String,
    /// That Pod's UID, as the token says.
    pub pod_uid: String,
}

/// What the server fetched for one request.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The `TokenReview`'s answer.
    pub review: &'a Review,
    /// The `ImpersonatedIdentity` of the request, if any.
    pub requested: Option<&'a str>,
    /// The caller's Pod, if it exists.
    pub caller_pod: Option<&'a PodFacts>,
    /// The Pods on the caller's Pod's node (needed for impersonation only).
    pub node_pods: &'a [PodFacts],
}

/// Why a request is refused: logged by the server, never told to the client.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The request has no bearer token.
    #[error("no bearer token in the request")]
    NoToken,
    /// The API server did not authenticate the token (expired, wrong audience, bad signature,
    /// bound object gone).
    #[error("the token is not authenticated: {}", reason.as_deref().unwrap_or("no reason given"))]
    NotAuthenticated {
        /// The API server's reason.
        reason: Option<String>,
    },
    /// The token is valid, but not for the CA's audience.
    #[error("the token's audiences {audiences:?} do not include {expected:?}")]
    WrongAudience {
        /// The audiences the review confirmed.
        audiences: Vec<String>,
        /// The CA's audience.
        expected: String,
    },
    /// The token is not a `ServiceAccount`'s.
    #[error("user {username:?} is not a service account")]
    NotServiceAccount {
        /// The user.
        username: String,
    },
    /// The token is not bound to a Pod.
    #[error("the token of {account} is not bound to a pod")]
    NotBoundToPod {
        /// The caller's `ServiceAccount`.
        account: ServiceAccountRef,
    },
    /// The caller's Pod no longer exists.
    #[error("the caller's pod {pod} does not exist")]
    CallerPodMissing {
        /// `namespace/name`.
        pod: String,
    },
    /// A Pod of that name exists, but not the one the token was bound to.
    #[error("the caller's pod {pod} has UID {current:?}, the token was bound to UID {bound}")]
    CallerPodUidMismatch {
        /// `namespace/name`.
        pod: String,
        /// The token's UID.
        bound: String,
        /// The Pod's UID.
        current: Option<String>,
    },
    /// The caller's Pod runs as another `ServiceAccount` than the token's.
    #[error("the caller's pod {pod} runs as {pod_account}, the token is {account}'s")]
    CallerPodOtherAccount {
        /// `namespace/name`.
        pod: String,
        /// The Pod's `ServiceAccount` name.
        pod_account: String,
        /// The token's `ServiceAccount`.
        account: ServiceAccountRef,
    },
    /// The caller's Pod has finished or is being deleted.
    #[error("the caller's pod {pod} is terminated or being deleted")]
    CallerPodTerminated {
        /// `namespace/name`.
        pod: String,
    },
    /// The caller's Pod is on no node.
    #[error("the caller's pod {pod} is not scheduled on a node")]
    CallerPodNotScheduled {
        /// `namespace/name`.
        pod: String,
    },
    /// The identity asked for is not a SPIFFE id of a workload.
    #[error("the identity asked for, {value:?}, is not a workload identity: {source}")]
    MalformedIdentity {
        /// The `ImpersonatedIdentity` value.
        value: String,
        /// Why.
        source: IdentityError,
    },
    /// The identity asked for is of another trust domain.
    #[error("{requested} is not in trust domain {trust_domain}")]
    OtherTrustDomain {
        /// The identity asked for.
        requested: Identity,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// The caller asks for another identity, and is not a node agent.
    #[error("{caller} may not ask for another identity ({requested})")]
    ImpersonationNotAllowed {
        /// The caller's `ServiceAccount`.
        caller: ServiceAccountRef,
        /// The identity asked for.
        requested: Identity,
    },
    /// No running Pod of the identity asked for is on the caller's node.
    #[error("no running pod of {requested} is on node {node}")]
    NoPodOnNode {
        /// The identity asked for.
        requested: Identity,
        /// The caller's node.
        node: String,
    },
}

/// The caller named by an authenticated token of the policy's audience, bound to a Pod.
pub fn caller(policy: &Policy, review: &Review) -> Result<Caller, Refusal> {
    if !review.authenticated {
        return Err(Refusal::NotAuthenticated {
            reason: review.error.clone().filter(|e| !e.is_empty()),
        });
    }
    if !review.audiences.contains(&policy.audience) {
        return Err(Refusal::WrongAudience {
            audiences: review.audiences.clone(),
            expected: policy.audience.clone(),
        });
    }
    let not_service_account = || Refusal::NotServiceAccount {
        username: review.username.clone(),
    };
    if !review.groups.iter().any(|g| g == SERVICE_ACCOUNTS_GROUP) {
        return Err(not_service_account());
    }
    let (namespace, name) = review
        .username
        .strip_prefix(SERVICE_ACCOUNT_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(not_service_account)?;
    let account = ServiceAccountRef::new(namespace, name).map_err(|_| not_service_account())?;
    let identity =
        Identity::new(&policy.trust_domain, namespace, name).map_err(|_| not_service_account())?;
    let bound = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
    let (Some(pod_name), Some(pod_uid)) = (bound(&review.pod_name), bound(&review.pod_uid)) else {
        return Err(Refusal::NotBoundToPod { account });
    };
    Ok(Caller {
        account,
        identity,
        pod_name,
        pod_uid,
    })
}

/// The identity asked for: `requested` if given (checked to be a workload identity of the
/// policy's trust domain), else the caller's own.
pub fn requested_identity(
    policy: &Policy,
    caller: &Caller,
    requested: Option<&str>,
) -> Result<Identity, Refusal> {
    let Some(value) = requested else {
        return Ok(caller.identity.clone());
    };
    let requested = Identity::parse(value).map_err(|source| Refusal::MalformedIdentity {
        value: value.to_owned(),
        source,
    })?;
    if requested.trust_domain() != policy.trust_domain {
        return Err(Refusal::OtherTrustDomain {
            requested,
            trust_domain: policy.trust_domain.clone(),
        });
    }
    Ok(requested)
}

/// The decision: the identity to certify, or why not.
pub fn authorize(policy: &Policy, inputs: &Inputs<'_>) -> Result<Identity, Refusal> {
    let caller = caller(policy, inputs.review)?;
    let pod = format!("{}/{}", caller.account.namespace, caller.pod_name);
    let Some(caller_pod) = inputs.caller_pod else {
        return Err(Refusal::CallerPodMissing { pod });
    };
    if caller_pod.namespace != caller.account.namespace || caller_pod.name != caller.pod_name {
        return Err(Refusal::CallerPodMissing { pod });
    }
    if caller_pod.uid.as_deref() != Some(caller.pod_uid.as_str()) {
        return Err(Refusal::CallerPodUidMismatch {
            pod,
            bound: caller.pod_uid,
            current: caller_pod.uid.clone(),
        });
    }
    if caller_pod.service_account != caller.account.name {
        return Err(Refusal::CallerPodOtherAccount {
            pod,
            pod_account: caller_pod.service_account.clone(),
            account: caller.account,
        });
    }
    if !caller_pod.is_running() {
        return Err(Refusal::CallerPodTerminated { pod });
    }
    let Some(node) = caller_pod.node_name.as_deref().filter(|n| !n.is_empty()) else {
        return Err(Refusal::CallerPodNotScheduled { pod });
    };
    let requested = requested_identity(policy, &caller, inputs.requested)?;
    if requested == caller.identity {
        return Ok(requested);
    }
    if !policy.impersonators.contains(&caller.account) {
        return Err(Refusal::ImpersonationNotAllowed {
            caller: caller.account,
            requested,
        });
    }
    let present = inputs.node_pods.iter().any(|p| {
        p.node_name.as_deref() == Some(node)
            && p.namespace == requested.namespace()
            && p.service_account == requested.service_account()
            && p.is_running()
    });
    if !present {
        return Err(Refusal::NoPodOnNode {
            requested,
            node: node.to_owned(),
        });
    }
    tracing::debug!(caller = %caller.account, pod = %caller_pod.reference(), %requested, node, "node agent impersonates a workload of its node");
    Ok(requested)
}

#[cfg(test)]
mod tests;
