//! The agent's side of `mesh-cni`'s hand-over: the container runtime's plugin hands each new
//! pod's network namespace (a descriptor) to the agent and waits for its verdict, so that a
//! meshed pod never starts before it is captured.
//!
//! - `add`: the pod is looked up in the cluster view by namespace and name, confirmed by UID
//!   (waiting briefly for the watch to bring a pod just created). Not enrolled, or on the host
//!   network: `not_meshed`, at once. Enrolled: its cgroup is found from its UID
//!   ([`super::find_pod_cgroup`]), the handles are stored, and the answer waits until the pod
//!   manager has captured and serves the pod (`captured`) or reports why not (`refused`, with
//!   the reason; the runtime retries ADD, so the pod does not start meanwhile).
//! - `del`: the handles are forgotten (the sandbox is gone); always `deleted`.
//! - `check`: `captured` while the pod is served, else `refused` with the reason.
//! - `status`: `ready` once the agent is ready.
//!
//! One blocking thread serves the socket, one connection at a time (a runtime's calls for one
//! node are short and few); every call is logged with its verdict.

use std::{
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use mesh_cluster::{ClusterState, Workload};
use mesh_cni::handover::{AgentStatus, PodRef, Reply, Request, Server, Verdict};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{find_pod_cgroup, HandleStore, PodHandles};
use crate::{local_pod::LocalPods, pods::Uncaptured, readiness::Readiness};

/// How long `add` waits for a pod just created to reach the agent's view.
const VIEW_WAIT: Duration = Duration::from_secs(5);
/// How long `add` waits for the capture (the plugin's own timeout is 10 s by default).
const CAPTURE_WAIT: Duration = Duration::from_secs(8);

/// What the hand-over reads of the agent.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub store: Arc<HandleStore>,
    /// Pods served, by address.
    pub local: watch::Receiver<Arc<LocalPods>>,
    /// Pods that should be captured and are not, with why.
    pub uncaptured: watch::Receiver<Uncaptured>,
    pub readiness: Readiness,
}

/// Binds `socket` and serves it on a thread of its own until the process exits.
pub fn spawn(socket: PathBuf, view: AgentView) -> Result<(), mesh_cni::handover::ServerError> {
    let server = Server::bind(&socket)?;
    thread::Builder::new()
        .name("cni-handover".into())
        .spawn(move || serve(&server, &view))
        .map_err(|source| mesh_cni::handover::ServerError::Prepare {
            path: socket,
            op: "spawn the hand-over thread",
            source,
        })?;
    Ok(())
}

fn serve(server: &Server, view: &AgentView) {
    loop {
        let mut conn = match server.accept() {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "hand-over connection refused");
                continue;
            }
        };
        loop {
            let request = match conn.recv() {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "bad hand-over request (answered with an error)");
                    continue;
                }
            };
            let reply = answer(request, view);
            if let Err(e) = conn.reply(&reply) {
                warn!(error = %e, "hand-over reply not sent");
                break;
            }
        }
    }
}

fn answer(request: Request, view: &AgentView) -> Reply {
    match request {
        Request::Add { pod, netns } => {
            let verdict = add(&pod, netns, view);
            info!(pod = %pod, uid = ?pod.uid, ?verdict, "CNI ADD");
            verdict.into()
        }
        Request::Del { pod } => {
            if let Some(uid) = &pod.uid {
                view.store.remove(uid);
            } else if let Some(w) = workload(&view.state.borrow(), &pod) {
                if let Some(uid) = &w.uid {
                    view.store.remove(uid);
                }
            }
            info!(pod = %pod, "CNI DEL");
            Reply::Deleted
        }
        Request::Check { pod } => check(&pod, view).into(),
        Request::Status => {
            if view.readiness.is_ready() {
                AgentStatus::Ready.into()
            } else {
                AgentStatus::NotReady {
                    reason: format!("not ready: {}", view.readiness.pending().join(", ")),
                }
                .into()
            }
        }
    }
}

/// The pod `p` names in `state`: same namespace and name, and the same UID when both say one.
fn workload(state: &ClusterState, p: &PodRef) -> Option<Arc<Workload>> {
    state
        .workloads()
        .iter()
        .find(|w| w.namespace == p.namespace && w.name == p.name)
        .filter(|w| match (&p.uid, &w.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
        .cloned()
}

fn add(p: &PodRef, netns: std::os::fd::OwnedFd, view: &AgentView) -> Verdict {
    let deadline = Instant::now() + VIEW_WAIT;
    let w = loop {
        if let Some(w) = workload(&view.state.borrow(), p) {
            break w;
        }
        if Instant::now() >= deadline {
            return Verdict::Refused {
                reason: format!("pod {p} (uid {:?}) is not in the agent's view yet", p.uid),
            };
        }
        thread::sleep(Duration::from_millis(50));
    };
    if w.host_network || !w.enrolled {
        return Verdict::NotMeshed;
    }
    let Some(uid) = w.uid.clone() else {
        return Verdict::Refused {
            reason: format!("pod {p} has no UID in the agent's view"),
        };
    };
    let Some(cgroup) = find_pod_cgroup(view.store.kubepods(), &uid) else {
        return Verdict::Refused {
            reason: format!(
                "no cgroup for pod UID {uid} below {} (kubelet layouts: kubepods/…/pod<uid>, kubepods.slice/…)",
                view.store.kubepods().display()
            ),
        };
    };
    // Reports from before the hand-over do not count: only a reconcile that saw it.
    let mut reports = view.uncaptured.clone();
    reports.mark_unchanged();
    view.store.insert(
        &uid,
        PodHandles {
            netns: Arc::new(netns),
            cgroup,
            from: "cni",
            ips: p.ips.clone(),
        },
    );
    wait_captured(&w, view, &mut reports)
}

/// Waits until the pod manager serves `w` (captured) or, in a report made after the
/// hand-over, says why not.
fn wait_captured(
    w: &Workload,
    view: &AgentView,
    reports: &mut watch::Receiver<Uncaptured>,
) -> Verdict {
    let name = w.to_string();
    let deadline = Instant::now() + CAPTURE_WAIT;
    loop {
        if served(w, view) {
            return Verdict::Captured;
        }
        if reports.has_changed().unwrap_or(false) {
            let reason = reports.borrow_and_update().get(&name).cloned();
            if let Some(reason) = reason {
                return Verdict::Refused { reason };
            }
        }
        if Instant::now() >= deadline {
            return Verdict::Refused {
                reason: format!("pod {name} not captured within {CAPTURE_WAIT:?}"),
            };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn served(w: &Workload, view: &AgentView) -> bool {
    let name = w.to_string();
    view.local.borrow().values().any(|pod| pod.name == name)
}

fn check(p: &PodRef, view: &AgentView) -> Verdict {
    let Some(w) = workload(&view.state.borrow(), p) else {
        return Verdict::NotMeshed;
    };
    if w.host_network || !w.enrolled {
        return Verdict::NotMeshed;
    }
    if served(&w, view) {
        return Verdict::Captured;
    }
    let reason = view
        .uncaptured
        .borrow()
        .get(&w.to_string())
        .cloned()
        .unwrap_or_else(|| "not captured".to_owned());
    Verdict::Refused { reason }
}
