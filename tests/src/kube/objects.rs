//! What tests against the control plane keep doing: waiting for a controller's effect, writing
//! times the way the API server does, and standing in for a kubelet that registers its node.

use std::{
    future::Future,
    net::IpAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;

use super::{Error, Result};

/// Polls `check` every 250 ms until it returns `Some` (controllers act asynchronously), or
/// fails naming `what` at `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                after: timeout,
                detail: "the condition never held".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Now, as the API server writes times (RFC 3339 in UTC, whole seconds).
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Registers Node `name` as its kubelet would: labelled with its hostname, with capacity (4
/// CPUs, 8 GiB, 110 pods), its `InternalIP` and a fresh `Ready` condition, so the scheduler can
/// bind pods to it. Nothing renews the heartbeat: the node lifecycle controller marks the node
/// `Unknown` after its grace period (about 50 s); call again to refresh it.
pub async fn register_node(client: &Client, name: &str, internal_ip: IpAddr) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let api_err = |what: &str| {
        let what = format!("{what} node {name}");
        move |source| Error::Api { what, source }
    };
    if nodes
        .get_opt(name)
        .await
        .map_err(api_err("reading"))?
        .is_none()
    {
        let node = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
        let node = serde_json::from_value(node).expect("a Node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .map_err(api_err("creating"))?;
    }
    let now = now();
    let resources = json!({"cpu": "4", "memory": "8Gi", "pods": "110"});
    let status = json!({"status": {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
        "addresses": [{"type": "InternalIP", "address": internal_ip.to_string()}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(api_err("writing the status of"))
}
