//! The messages of the hand-over protocol (see the module above for the table).

use std::{fmt, net::IpAddr, os::fd::OwnedFd};

use serde::{Deserialize, Serialize};

/// Who a pod is, as the container runtime knows it at CNI time. The agent matches it against
/// its cluster model (namespace and name, confirmed by uid) to decide whether it is meshed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub name: String,
    /// `K8S_POD_UID` from `CNI_ARGS`, when the runtime passes it: tells a re-created pod of the
    /// same name from the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `CNI_CONTAINERID`: the sandbox, which is what DEL later names.
    pub container_id: String,
    /// `CNI_IFNAME`: the pod's interface.
    pub ifname: String,
    /// The pod's addresses from the primary CNI's result (`prevResult.ips`); the agent checks
    /// that the namespace it receives holds them.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// `CNI_NETNS` as the runtime named it, for logs only: the descriptor passed with `add` is
    /// what the agent uses, so a path that changes meaning cannot mislead it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_path: Option<String>,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The agent's answer to `add` and `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The pod is in the mesh and its capture is in place: it may start.
    Captured,
    /// The pod is not meshed (not enrolled, host network, ...): it starts as is.
    NotMeshed,
    /// The pod should be meshed but cannot be captured (to `add`), or is meshed and not
    /// captured (to `check`). The plugin fails the call, so the pod does not start unmeshed.
    Refused {
        /// Why, for the runtime's event and the operator.
        reason: String,
    },
}

/// The agent's answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// The agent can take pods (CNI STATUS succeeds).
    Ready,
    /// The agent answers but cannot take pods yet, e.g. before its first cluster snapshot.
    NotReady {
        /// Why, for the runtime's node condition.
        reason: String,
    },
}

/// Every reply on the wire. Which reply answers which request is in the module's table;
/// [`Reply::answers`] checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// [`Verdict::Captured`].
    Captured,
    /// [`Verdict::NotMeshed`].
    NotMeshed,
    /// [`Verdict::Refused`].
    Refused {
        /// Why.
        reason: String,
    },
    /// The agent forgot the pod (or never knew it): DEL is done.
    Deleted,
    /// [`AgentStatus::Ready`].
    Ready,
    /// [`AgentStatus::NotReady`].
    NotReady {
        /// Why.
        reason: String,
    },
    /// The request could not be served (malformed, wrong descriptors, unsupported version).
    Error {
        /// What was wrong, shown to the runtime by the plugin.
        message: String,
    },
}

impl Reply {
    /// Whether this reply is a valid answer to a request of `kind` (`error` answers any).
    pub fn answers(&self, kind: RequestKind) -> bool {
        match self {
            Reply::Captured | Reply::NotMeshed | Reply::Refused { .. } => {
                matches!(kind, RequestKind::Add | RequestKind::Check)
            }
            Reply::Deleted => kind == RequestKind::Del,
            Reply::Ready | Reply::NotReady { .. } => kind == RequestKind::Status,
            Reply::Error { .. } => true,
        }
    }

    /// The reply's wire name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Captured => "captured",
            Reply::NotMeshed => "not_meshed",
            Reply::Refused { .. } => "refused",
            Reply::Deleted => "deleted",
            Reply::Ready => "ready",
            Reply::NotReady { .. } => "not_ready",
            Reply::Error { .. } => "error",
        }
    }
}

impl From<Verdict> for Reply {
    fn from(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Captured => Reply::Captured,
            Verdict::NotMeshed => Reply::NotMeshed,
            Verdict::Refused { reason } => Reply::Refused { reason },
        }
    }
}

impl From<AgentStatus> for Reply {
    fn from(status: AgentStatus) -> Self {
        match status {
            AgentStatus::Ready => Reply::Ready,
            AgentStatus::NotReady { reason } => Reply::NotReady { reason },
        }
    }
}

/// A request as the server hands it to the agent, with the descriptor it carried.
#[derive(Debug)]
pub enum Request {
    /// A new pod: its identity and its network namespace (checked to be one), which the agent
    /// keeps open for as long as it needs the namespace.
    Add {
        /// The pod.
        pod: PodRef,
        /// The pod's network namespace, close-on-exec.
        netns: OwnedFd,
    },
    /// The pod's sandbox is going away; idempotent.
    Del {
        /// The pod.
        pod: PodRef,
    },
    /// Is the pod still captured (CNI CHECK)?
    Check {
        /// The pod.
        pod: PodRef,
    },
    /// Can the agent take pods (CNI STATUS)?
    Status,
}

impl Request {
    /// The request's kind, which decides the valid replies.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::Add { .. } => RequestKind::Add,
            Request::Del { .. } => RequestKind::Del,
            Request::Check { .. } => RequestKind::Check,
            Request::Status => RequestKind::Status,
        }
    }
}

/// The four requests, without their content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `add`.
    Add,
    /// `del`.
    Del,
    /// `check`.
    Check,
    /// `status`.
    Status,
}

impl RequestKind {
    /// The request's wire name.
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Add => "add",
            RequestKind::Del => "del",
            RequestKind::Check => "check",
            RequestKind::Status => "status",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request's body on the wire (the descriptor travels beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum WireRequest {
    Add { pod: PodRef },
    Del { pod: PodRef },
    Check { pod: PodRef },
    Status,
}

impl WireRequest {
    pub(crate) fn kind(&self) -> RequestKind {
        match self {
            WireRequest::Add { .. } => RequestKind::Add,
            WireRequest::Del { .. } => RequestKind::Del,
            WireRequest::Check { .. } => RequestKind::Check,
            WireRequest::Status => RequestKind::Status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef {
            namespace: "mesh".into(),
            name: "client-0".into(),
            uid: Some("6f1c".into()),
            container_id: "abc123".into(),
            ifname: "eth0".into(),
            ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            netns_path: None,
        }
    }

    #[test]
    fn requests_and_replies_have_stable_wire_forms() {
        let add = serde_json::to_value(WireRequest::Add { pod: pod() }).unwrap();
        assert_eq!(add["type"], "add");
        assert_eq!(add["pod"]["ips"][1], "fd00::5");
        assert!(add["pod"].get("netns_path").is_none());
        assert_eq!(
            serde_json::to_string(&WireRequest::Status).unwrap(),
            r#"{"type":"status"}"#
        );
        let refused = serde_json::to_string(&Reply::Refused {
            reason: "no".into(),
        })
        .unwrap();
        assert_eq!(refused, r#"{"type":"refused","reason":"no"}"#);
        let back: Reply = serde_json::from_str(r#"{"type":"not_meshed"}"#).unwrap();
        assert_eq!(back, Reply::NotMeshed);
    }

    #[test]
    fn replies_match_their_requests() {
        assert!(Reply::Captured.answers(RequestKind::Add));
        assert!(Reply::Captured.answers(RequestKind::Check));
        assert!(!Reply::Captured.answers(RequestKind::Del));
        assert!(!Reply::Deleted.answers(RequestKind::Status));
        assert!(Reply::NotReady {
            reason: String::new()
        }
        .answers(RequestKind::Status));
        assert!(Reply::Error {
            message: String::new()
        }
        .answers(RequestKind::Del));
    }
}
