//! The node's side of the node lifecycle, as kubelet does it with its own credentials
//! (`system:node:<name>`, so the Node authorizer and `NodeRestriction` judge every request):
//! register the Node (labels, capacity, addresses, conditions), then renew its Lease in
//! `kube-node-lease` and post the `Ready` heartbeat every interval.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Node,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference},
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::{json, Value};

use super::super::{now, Error, Result};

/// The namespace of node leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long a lease holds without renewal (kubelet's default).
const LEASE_DURATION_SECS: i32 = 40;

/// What the Node says about itself.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub capacity: Value,
    pub labels: Value,
    /// Taints the Node is registered with (kubelet's `--register-with-taints`), as
    /// `spec.taints` JSON.
    pub taints: Value,
    /// When `Ready` became true (kept across heartbeats).
    pub ready_since: String,
}

fn api_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { what, source }
}

/// Creates the Node (or keeps the existing one, as a restarted kubelet does) and writes its
/// status.
pub async fn register(client: &Client, info: &NodeInfo) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": info.name, "labels": info.labels},
        "spec": {"taints": info.taints},
    }))
    .expect("a Node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(api_err(format!("registering node {}", info.name))(e)),
    }
    post_status(client, info).await
}

/// The Node's status: capacity, addresses, node info and the conditions, `lastHeartbeatTime`
/// now (a strategic merge: conditions merge by type).
pub async fn post_status(client: &Client, info: &NodeInfo) -> Result<Node> {
    let now = now();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": info.ready_since})
    };
    let mut addresses: Vec<Value> = info
        .addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": info.name}));
    // Addresses merge by type in a strategic merge patch, and a dual-stack node has two
    // InternalIPs: replace the list instead.
    addresses.push(json!({"$patch": "replace"}));
    let status = json!({"status": {
        "capacity": info.capacity,
        "allocatable": info.capacity,
        "addresses": addresses,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": kernel_version(),
            "osImage": "mesh testbed", "containerRuntimeVersion": "mtb://0.1.0",
            "kubeletVersion": "v1.37.2", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
        },
    }});
    Api::<Node>::all(client.clone())
        .patch_status(
            &info.name,
            &PatchParams::default(),
            &Patch::Strategic(&status),
        )
        .await
        .map_err(api_err(format!("posting the status of node {}", info.name)))
}

/// Renews the node's Lease (creating it, owned by the Node, the first time).
pub async fn renew_lease(client: &Client, node: &Node) -> Result<Lease> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let renew = json!({"spec": {"holderIdentity": name, "renewTime": now,
                                "leaseDurationSeconds": LEASE_DURATION_SECS}});
    match leases
        .patch(&name, &PatchParams::default(), &Patch::Merge(&renew))
        .await
    {
        Ok(lease) => return Ok(lease),
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(api_err(format!("renewing the lease of node {name}"))(e)),
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.clone(),
                uid: node.metadata.uid.clone().unwrap_or_default(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.clone()),
            lease_duration_seconds: Some(LEASE_DURATION_SECS),
            renew_time: Some(now),
            ..LeaseSpec::default()
        }),
    };
    leases
        .create(&PostParams::default(), &lease)
        .await
        .map_err(api_err(format!("creating the lease of node {name}")))
}

/// Renews the lease and posts the heartbeat every `interval`, for ever (the kubelet aborts the
/// task when it stops). Failures are logged and retried at the next tick.
pub async fn heartbeat(client: Client, info: NodeInfo, node: Node, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = renew_lease(&client, &node).await {
            super::echo(&info.name, &format!("lease renewal failed: {e}"));
        }
        if let Err(e) = post_status(&client, &info).await {
            super::echo(&info.name, &format!("node status heartbeat failed: {e}"));
        }
    }
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
