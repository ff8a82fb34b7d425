//! Why a node agent is stopping, decided when it stops: an uninstall releases the node, anything
//! else leaves it captured for the next agent.
//!
//! A `DaemonSet`'s pods are stopped for two reasons that look the same from inside (SIGTERM): a
//! rolling update, a drain or an eviction, after which a new agent takes over the node; or the
//! removal of the mesh (`helm uninstall`), after which none does. In the first case the pods
//! must stay captured (their new connections fail closed until the next agent is ready, never
//! around the mesh) and the CNI entry must stay (new pods wait for the next agent). In the
//! second they must be released and the node left clean (programs detached, pins and the CNI
//! entry removed), or every meshed pod would stay cut off. Istio's CNI agent makes the same
//! distinction. The owning `DaemonSet` tells: gone, or being deleted, means uninstall. When it
//! cannot be read and was not seen deleted (API server down), the agent keeps the node
//! captured: failing closed is the safe side, and a later agent, or `mesh-cni uninstall`, can
//! still release it.

use std::{fmt, str::FromStr, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How long the lookup may take at shutdown.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `DaemonSet` that runs this agent (`--owner-daemonset <namespace>/<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// A malformed `--owner-daemonset`.
#[derive(Debug, thiserror::Error)]
pub enum DepartureError {
    /// Not `<namespace>/<name>` with two non-empty parts.
    #[error("owner DaemonSet {0:?}: expected <namespace>/<name>")]
    BadOwner(String),
}

impl FromStr for Owner {
    type Err = DepartureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(DepartureError::BadOwner(s.to_owned())),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the stop means for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Another agent follows: leave the pods captured and the CNI entry in place.
    Restart,
    /// The mesh is being removed from the node: release the pods, remove pins and CNI entry.
    Uninstall,
}

/// Why the decision was made (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The `DaemonSet` no longer exists.
    OwnerGone,
    /// The `DaemonSet` has a deletion timestamp.
    OwnerDeleting,
    /// The lookup failed (an uninstall removes the agent's RBAC with the `DaemonSet`), but the
    /// watch saw the `DaemonSet` deleted or being deleted.
    WatchedDeletion,
    /// The `DaemonSet` is there: an update, drain, eviction or crash.
    OwnerPresent,
    /// The `DaemonSet` could not be read and was not seen deleted: fail closed.
    Unknown,
}

/// What the watch of the owner has seen last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Nothing yet (or the watch fails).
    Unknown,
    /// The `DaemonSet`, not being deleted.
    Present,
    /// The `DaemonSet` with a deletion timestamp.
    Deleting,
    /// Its deletion (or, after a complete listing, its absence).
    Deleted,
}

/// The answer of the lookup at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Found; whether it has a deletion timestamp.
    Found {
        /// `metadata.deletionTimestamp` is set.
        deleting: bool,
    },
    /// 404.
    NotFound,
    /// No answer, or a refusal (403 once an uninstall removed the RBAC).
    Failed,
}

/// The decision from the lookup at shutdown and what the watch saw before.
pub fn judge(lookup: Lookup, seen: Seen) -> (Departure, Reason) {
    match (lookup, seen) {
        (Lookup::NotFound, _) => (Departure::Uninstall, Reason::OwnerGone),
        (Lookup::Found { deleting: true }, _) => (Departure::Uninstall, Reason::OwnerDeleting),
        (Lookup::Found { deleting: false }, _) => (Departure::Restart, Reason::OwnerPresent),
        (Lookup::Failed, Seen::Deleting | Seen::Deleted) => {
            (Departure::Uninstall, Reason::WatchedDeletion)
        }
        (Lookup::Failed, Seen::Unknown | Seen::Present) => (Departure::Restart, Reason::Unknown),
    }
}

/// A watch of the owner for the agent's whole life. At shutdown the owner is looked up again;
/// when that fails (an uninstall deletes the agent's `Role` with its `DaemonSet`, so the lookup
/// is refused), what the watch saw decides: a watch established earlier keeps delivering events.
pub struct OwnerWatch {
    client: kube::Client,
    owner: Owner,
    seen: watch::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl OwnerWatch {
    /// Starts watching `owner` (on the current Tokio runtime).
    pub fn start(client: kube::Client, owner: Owner) -> Self {
        let (tx, seen) = watch::channel(Seen::Unknown);
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), &owner.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", owner.name));
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config).default_backoff());
            let mut listed = false;
            while let Some(event) = events.next().await {
                let next = match event {
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        continue;
                    }
                    Ok(watcher::Event::InitApply(ds) | watcher::Event::Apply(ds)) => {
                        listed = true;
                        if ds.metadata.deletion_timestamp.is_some() {
                            Seen::Deleting
                        } else {
                            Seen::Present
                        }
                    }
                    Ok(watcher::Event::InitDone) if !listed => Seen::Deleted,
                    Ok(watcher::Event::InitDone) => continue,
                    Ok(watcher::Event::Delete(_)) => Seen::Deleted,
                    Err(error) => {
                        debug!(%error, "watching the agent's DaemonSet");
                        continue;
                    }
                };
                tx.send_replace(next);
            }
        });
        Self {
            client,
            owner,
            seen,
            task,
        }
    }

    /// Looks the owner up and decides with what the watch saw; logs the decision.
    pub async fn departure(&self) -> Departure {
        let owner = &self.owner;
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &owner.namespace);
        let lookup = match tokio::time::timeout(LOOKUP_TIMEOUT, api.get_opt(&owner.name)).await {
            Ok(Ok(Some(ds))) => Lookup::Found {
                deleting: ds.metadata.deletion_timestamp.is_some(),
            },
            Ok(Ok(None)) => Lookup::NotFound,
            Ok(Err(error)) => {
                warn!(%owner, %error, "cannot read the agent's DaemonSet");
                Lookup::Failed
            }
            Err(_) => {
                warn!(%owner, timeout = ?LOOKUP_TIMEOUT, "no answer about the agent's DaemonSet");
                Lookup::Failed
            }
        };
        let seen = *self.seen.borrow();
        let (departure, reason) = judge(lookup, seen);
        info!(%owner, ?lookup, ?seen, ?departure, ?reason, "stopping");
        departure
    }
}

impl fmt::Debug for OwnerWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnerWatch")
            .field("owner", &self.owner)
            .field("seen", &*self.seen.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for OwnerWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_or_deleted_daemonset_means_uninstall() {
        use Departure::*;
        let present = Lookup::Found { deleting: false };
        let deleting = Lookup::Found { deleting: true };
        for seen in [Seen::Unknown, Seen::Present, Seen::Deleting, Seen::Deleted] {
            assert_eq!(
                judge(Lookup::NotFound, seen),
                (Uninstall, Reason::OwnerGone)
            );
            assert_eq!(judge(deleting, seen), (Uninstall, Reason::OwnerDeleting));
            // Recreated since (a re-install): another agent follows.
            assert_eq!(judge(present, seen), (Restart, Reason::OwnerPresent));
        }
        // The RBAC went with the DaemonSet: the watch decides.
        assert_eq!(
            judge(Lookup::Failed, Seen::Deleted),
            (Uninstall, Reason::WatchedDeletion)
        );
        assert_eq!(
            judge(Lookup::Failed, Seen::Deleting),
            (Uninstall, Reason::WatchedDeletion)
        );
        // Nothing known: fail closed.
        assert_eq!(
            judge(Lookup::Failed, Seen::Present),
            (Restart, Reason::Unknown)
        );
        assert_eq!(
            judge(Lookup::Failed, Seen::Unknown),
            (Restart, Reason::Unknown)
        );
    }

    #[test]
    fn owner_is_namespace_slash_name() {
        let owner: Owner = "mesh-system/mesh-agent".parse().unwrap();
        assert_eq!(owner.to_string(), "mesh-system/mesh-agent");
        for bad in ["mesh-agent", "/x", "x/", "a/b/c", ""] {
            assert!(bad.parse::<Owner>().is_err(), "{bad}");
        }
    }
}
