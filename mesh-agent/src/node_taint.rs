//! Pods scheduled on a node before its agent is ready. The model (Istio's, with its
//! `cni.istio.io/not-ready` taint): nodes join the cluster with a `NoSchedule` taint (kubelet's
//! `--register-with-taints <key>:NoSchedule`, or the node pool's taints), which only the mesh's
//! own pods tolerate. Once the node's agent is ready and the `mesh-cni` entry is in the runtime's
//! configuration, the CNI installer beside the agent removes the taint, and only then are
//! ordinary pods scheduled there: every one of them goes through `mesh-cni` and is captured from
//! its first packet. The taint is never put back by the mesh: once the entry is in place, a pod
//! created while the agent restarts waits in its CNI ADD instead (fail closed).
//!
//! Without the taint (a node that joined untainted) pods that start before the entry is
//! installed run unmeshed until the agent is ready; it then captures them from `/proc`, but
//! connections they opened before stay outside the mesh until they close.

use std::{net::SocketAddr, time::Duration};

use http_body_util::Empty;
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// How often the agent's readiness is asked.
const READY_POLL: Duration = Duration::from_millis(200);
/// First and largest pause between attempts to remove the taint.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// `taints` without those of `key`, or `None` when there is none to remove.
pub fn without(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    let kept: Vec<Taint> = taints.iter().filter(|t| t.key != key).cloned().collect();
    (kept.len() != taints.len()).then_some(kept)
}

/// Whether the agent's readiness endpoint at `addr` answers 200 to `GET /healthz/ready`.
pub async fn agent_ready(addr: SocketAddr) -> bool {
    let ask = async {
        let stream = TcpStream::connect(addr).await.ok()?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
        tokio::spawn(conn);
        let request = hyper::Request::get("/healthz/ready")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status() == hyper::StatusCode::OK)
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Waits until the agent at `readiness` is ready, then removes the `key` taint from node
/// `node` (retrying until it is gone).
pub async fn untaint_when_ready(
    client: kube::Client,
    node: String,
    key: String,
    readiness: SocketAddr,
) {
    while !agent_ready(readiness).await {
        tokio::time::sleep(READY_POLL).await;
    }
    info!(%node, taint = %key, "the agent is ready and the CNI entry installed; removing the not-ready taint");
    let nodes: Api<Node> = Api::all(client);
    let mut pause = RETRY.0;
    loop {
        match remove(&nodes, &node, &key).await {
            Ok(true) => {
                info!(%node, taint = %key, "not-ready taint removed: pods may be scheduled here");
                return;
            }
            Ok(false) => {
                debug!(%node, taint = %key, "the node has no not-ready taint");
                return;
            }
            Err(error) => {
                warn!(%node, taint = %key, %error, retry_in = ?pause, "cannot remove the not-ready taint");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY.1);
            }
        }
    }
}

/// One attempt: a merge patch of the taints, conditional on the node's `resourceVersion` as
/// read, so a concurrent change (another controller's taint) is never overwritten (409, and the
/// next attempt reads again); `Ok(false)` when the taint is not there.
async fn remove(nodes: &Api<Node>, node: &str, key: &str) -> Result<bool, kube::Error> {
    let current = nodes.get(node).await?;
    let version = current.metadata.resource_version.clone();
    let taints = current.spec.and_then(|s| s.taints).unwrap_or_default();
    let Some(kept) = without(&taints, key) else {
        return Ok(false);
    };
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": version},
        "spec": {"taints": kept},
    });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        }
    }

    #[test]
    fn only_the_mesh_taint_is_removed() {
        let taints = [taint("other/x"), taint("mesh-agent/not-ready"), taint("y")];
        let kept = without(&taints, "mesh-agent/not-ready").expect("present");
        assert_eq!(kept, vec![taint("other/x"), taint("y")]);
        assert_eq!(without(&kept, "mesh-agent/not-ready"), None);
        assert_eq!(without(&[], "mesh-agent/not-ready"), None);
    }
}
