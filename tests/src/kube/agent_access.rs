//! A node agent's access to the control plane, as a pod of the agent's `DaemonSet` gets it: the agent's least
//! RBAC as the chart renders it (`deploy/chart`, `helm template`, applied as it is), its own Pod object on the node, and a
//! service-account token bound to that Pod (it dies with the Pod), in a kubeconfig that points
//! at the API server as exposed inside the node's network namespace. Never the admin's
//! credentials.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{DynamicObject, GroupVersionKind, PostParams},
    Api, Client,
};
use serde_json::{json, Value};

use super::{ControlPlane, Credentials, Error, Result};
use crate::Node;

/// The namespace the chart is installed in, and its release name.
pub const AGENT_NAMESPACE: &str = "mesh-system";
pub const RELEASE: &str = "mesh";
/// The agent's service account: `<release>-agent`.
pub const AGENT_ACCOUNT: &str = "mesh-agent";

/// The agent's `ServiceAccount`, `ClusterRole` and `ClusterRoleBinding` as the chart renders them
/// (`helm template`, release [`RELEASE`] in [`AGENT_NAMESPACE`]).
pub fn agent_rbac_manifest() -> Result<String> {
    super::helm_template(
        &["serviceaccount.yaml", "rbac.yaml"],
        "helm template of the agent's RBAC",
    )
}

impl ControlPlane {
    /// Writes at `path` a kubeconfig for the agent of `node`: applies the agent's RBAC (once;
    /// later calls find it), creates the agent's Pod on `node`, and binds a token to it.
    pub fn agent_kubeconfig(&self, node: &Node, path: &Path) -> Result<()> {
        let token = self.agent_token(&node.name)?;
        let server = self.expose_on(node)?;
        self.write_kubeconfig(path, server, &Credentials::Token(token))
    }

    /// The agent's RBAC applied (once) and a token for the agent of node `node`, bound to its
    /// own Pod (created here), for a kubeconfig of the caller's making.
    pub fn agent_token(&self, node: &str) -> Result<String> {
        let admin = self.client();
        self.block_on(apply_rbac(&admin))?;
        self.block_on(bound_token(&admin, node))
    }
}

fn api_err(what: &str) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |source| Error::Api {
        what: what.to_owned(),
        source,
    }
}

fn parse<T: serde::de::DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::Invalid {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// Creates the namespace and each object of the chart's RBAC unless it exists (409 is fine:
/// applied before).
async fn apply_rbac(client: &Client) -> Result<()> {
    let what = "the chart's RBAC";
    let text = agent_rbac_manifest()?;
    let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(serde::Deserialize::deserialize)
        .collect::<Result<Vec<Value>, serde_yaml::Error>>()
        .map_err(|e| Error::Invalid {
            what: what.into(),
            detail: e.to_string(),
        })?
        .into_iter()
        .filter(|v| !v.is_null())
        .collect();
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AGENT_NAMESPACE}});
    for value in std::iter::once(namespace).chain(documents) {
        create_object(client, value).await?;
    }
    Ok(())
}

/// Creates one object of any kind the API server serves (found by discovery), in its
/// namespace if it has one; one that exists already (409) is fine.
pub(crate) async fn create_object(client: &Client, value: Value) -> Result<()> {
    let object: DynamicObject = parse(value, "a manifest object")?;
    let types = object.types.clone().unwrap_or_default();
    let gvk = GroupVersionKind::try_from(&types).map_err(|e| Error::Invalid {
        what: format!("the apiVersion and kind of {:?}", object.metadata.name),
        detail: e.to_string(),
    })?;
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(api_err(&format!("discovering {}", gvk.kind)))?;
    let api: Api<DynamicObject> = match (&object.metadata.namespace, capabilities.scope) {
        (Some(ns), kube::discovery::Scope::Namespaced) => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(api_err(&format!(
            "creating {} {:?}",
            gvk.kind, object.metadata.name
        ))(e)),
    }
}

/// The agent's own Pod on `node` (host network, its service account) and a token bound to it,
/// as kubelet mounts one.
async fn bound_token(client: &Client, node: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let pod: Pod = parse(
        json!({
            "metadata": {"name": format!("mesh-agent-{node}"), "namespace": AGENT_NAMESPACE},
            "spec": {"nodeName": node, "hostNetwork": true, "serviceAccountName": AGENT_ACCOUNT,
                     "containers": [{"name": "agent", "image": "mesh-agent"}]}
        }),
        "the agent's pod",
    )?;
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .map_err(api_err("creating the agent's pod"))?;
    // Requested as the testbed kubelet requests a pod's token (the same code).
    super::kubelet::token_for(client, &pod, None, Some(3600))
        .await
        .map_err(|detail| Error::Invalid {
            what: "the agent's bound token".into(),
            detail,
        })
}
