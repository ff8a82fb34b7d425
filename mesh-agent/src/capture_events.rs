//! On Kubernetes, each pod's capture state is visible from the API as Events on the Pod
//! (`kubectl describe pod`, `kubectl get events`): `MeshCaptured` when the agent captures and
//! serves it, `MeshCaptureFailed` (a warning, with the reason) when it should and cannot, and
//! `MeshReleased` when a running pod leaves the mesh (its namespace or pod label changed).
//!
//! Why Events rather than a pod condition or annotation (Istio's ambient mode writes the
//! annotation `ambient.istio.io/redirection`): writing either needs `patch` on every Pod (or
//! its status) of the cluster, so a compromised agent could rewrite any pod; Events are
//! separate, append-only records, need only `create`/`patch` on `events.k8s.io`, and are what
//! kubelet and most controllers use to tell users what happened to a pod.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use mesh_cluster::ClusterState;
use tokio::sync::watch;
use tracing::warn;

use crate::{local_pod::LocalPods, pods::Uncaptured};

/// A pod's capture state as last reported.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reported {
    Captured,
    Failed(String),
}

/// Publishes a pod's capture state whenever it changes, until the channels close.
pub async fn run(
    client: kube::Client,
    node: String,
    state: watch::Receiver<Arc<ClusterState>>,
    mut local: watch::Receiver<Arc<LocalPods>>,
    mut uncaptured: watch::Receiver<Uncaptured>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "mesh-agent".into(),
            instance: Some(node.clone()),
        },
    );
    let mut reported: BTreeMap<String, Reported> = BTreeMap::new();
    loop {
        let now = current(&local.borrow_and_update(), &uncaptured.borrow_and_update());
        for (pod, state_now) in &now {
            if reported.get(pod) == Some(state_now) {
                continue;
            }
            let Some(reference) = pod_reference(&state.borrow(), pod, true) else {
                continue;
            };
            let event = match state_now {
                Reported::Captured => Event {
                    type_: EventType::Normal,
                    reason: "MeshCaptured".into(),
                    note: Some(format!("captured by the mesh agent of node {node}")),
                    action: "Capture".into(),
                    secondary: None,
                },
                Reported::Failed(why) => Event {
                    type_: EventType::Warning,
                    reason: "MeshCaptureFailed".into(),
                    note: Some(truncate(why)),
                    action: "Capture".into(),
                    secondary: None,
                },
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(pod, error = %e, "capture event not published");
                continue;
            }
            reported.insert(pod.clone(), state_now.clone());
        }
        let left: Vec<String> = reported
            .keys()
            .filter(|pod| !now.contains_key(*pod))
            .cloned()
            .collect();
        for pod in left {
            reported.remove(&pod);
            // Still there and no longer enrolled: released (a deleted pod needs no event).
            let Some(reference) = pod_reference(&state.borrow(), &pod, false) else {
                continue;
            };
            let event = Event {
                type_: EventType::Normal,
                reason: "MeshReleased".into(),
                note: Some(format!(
                    "no longer enrolled; released by the mesh agent of node {node}"
                )),
                action: "Release".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(pod, error = %e, "release event not published");
            }
        }
        tokio::select! {
            changed = local.changed() => if changed.is_err() { return },
            changed = uncaptured.changed() => if changed.is_err() { return },
        }
    }
}

/// Every pod the agent serves or should: captured, or failed with why.
fn current(local: &LocalPods, uncaptured: &Uncaptured) -> BTreeMap<String, Reported> {
    let mut now: BTreeMap<String, Reported> = local
        .values()
        .map(|pod| (pod.name.clone(), Reported::Captured))
        .collect();
    for (pod, why) in uncaptured.iter() {
        now.insert(pod.clone(), Reported::Failed(why.clone()));
    }
    now
}

/// The Pod `ns/name` as the Events API refers to it (with its UID, so an event never lands
/// on a later pod of the same name), if the view has it with that enrollment.
fn pod_reference(state: &ClusterState, pod: &str, enrolled: bool) -> Option<ObjectReference> {
    let (namespace, name) = pod.split_once('/')?;
    let w = state
        .workloads()
        .iter()
        .find(|w| w.namespace == namespace && w.name == name && w.enrolled == enrolled)?;
    Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(w.namespace.clone()),
        name: Some(w.name.clone()),
        uid: w.uid.clone(),
        ..ObjectReference::default()
    })
}

/// An event note is at most 1 KiB.
fn truncate(text: &str) -> String {
    if text.len() <= 1024 {
        return text.to_owned();
    }
    let mut end = 1021;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
