//! The mesh's CA (`mesh-agent ca`) on the tests' control plane, as the chart sets it up: its
//! `ServiceAccount` and least RBAC rendered from the chart (`helm template`) and applied as they
//! are, and a kubeconfig holding a token of that `ServiceAccount`, never the admin's. Also what
//! its callers hold: Pods placed on nodes (never run), tokens bound to them for the audience
//! asked (requested as a kubelet requests them), and an expired one, signed with the API
//! server's own key so that the API server itself judges it expired.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{api::PostParams, Api};
use serde_json::{json, Value};

use super::{
    agent_access::create_object, ControlPlane, Credentials, Error, Result, AGENT_NAMESPACE,
    SERVICE_ACCOUNT_ISSUER,
};

/// The CA's `ServiceAccount`: `<release>-ca`.
pub const CA_ACCOUNT: &str = "mesh-ca";
/// The audience the CA requires of its callers' tokens (the chart's default).
pub const CA_AUDIENCE: &str = "istio-ca";
/// The kinds of the chart's CA and agent templates applied for the CA: its identity and RBAC
/// (the agent's `ServiceAccount` too, for the agents' tokens), not its workloads.
const ACCESS_KINDS: [&str; 5] = [
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// The `ServiceAccounts` and RBAC of the chart (`helm template`, release [`RELEASE`] in
/// [`AGENT_NAMESPACE`]): the agent's and the CA's.
pub fn ca_access_manifest() -> Result<String> {
    super::helm_template(
        &["serviceaccount.yaml", "rbac.yaml", "ca.yaml"],
        "helm template of the CA's access",
    )
}

fn invalid(what: &str) -> impl FnOnce(String) -> Error + '_ {
    move |detail| Error::Invalid {
        what: what.to_owned(),
        detail,
    }
}

impl ControlPlane {
    /// Applies the chart's `ServiceAccounts` and RBAC (once; later calls find them) and writes at
    /// `path` a kubeconfig with a token of the CA's `ServiceAccount`, for the CA run as a process
    /// of the root namespace.
    pub fn ca_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = ca_access_manifest()?;
        let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<Vec<Value>, serde_yaml::Error>>()
            .map_err(|e| Error::Invalid {
                what: "the chart's access manifest".into(),
                detail: e.to_string(),
            })?;
        let namespace =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AGENT_NAMESPACE}});
        let admin = self.client();
        let wanted = documents.into_iter().filter(|d| {
            d["kind"]
                .as_str()
                .is_some_and(|kind| ACCESS_KINDS.contains(&kind))
        });
        for object in std::iter::once(namespace).chain(wanted) {
            self.block_on(create_object(&admin, object))?;
        }
        let token = self.service_account_token(AGENT_NAMESPACE, CA_ACCOUNT)?;
        self.write_kubeconfig(path, self.apiserver_addr(), &Credentials::Token(token))
    }

    /// Pod `namespace/name` of `ServiceAccount` `account` (created if missing) on `node`, as a
    /// scheduler would have bound it, with status phase `phase` (as a kubelet would write it).
    /// Nothing runs it.
    pub fn pod_on_node(
        &self,
        namespace: &str,
        name: &str,
        account: &str,
        node: &str,
        phase: &str,
    ) -> Result<Pod> {
        let client = self.client();
        self.block_on(async {
            let api_err = |what: String| move |source| Error::Api { what, source };
            let namespace_object = json!({"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": namespace}});
            create_object(&client, namespace_object).await?;
            let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
            if accounts
                .get_opt(account)
                .await
                .map_err(api_err(format!("reading service account {account}")))?
                .is_none()
            {
                let object = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                                    "metadata": {"name": account, "namespace": namespace}});
                create_object(&client, object).await?;
            }
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": node, "serviceAccountName": account,
                         "containers": [{"name": "app", "image": "mesh-probe"}]}
            }))
            .map_err(|e| invalid("a pod")(e.to_string()))?;
            pods.create(&PostParams::default(), &pod)
                .await
                .map_err(api_err(format!("creating pod {namespace}/{name}")))?;
            let status = json!({"status": {"phase": phase}});
            pods.patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&status),
            )
            .await
            .map_err(api_err(format!(
                "writing the status of pod {namespace}/{name}"
            )))
        })
    }

    /// A token of `pod`'s `ServiceAccount` bound to `pod`, for `audience` (the API server's own
    /// audiences when `None`), valid `expiration` seconds (600 at least).
    pub fn pod_token(&self, pod: &Pod, audience: Option<&str>, expiration: i64) -> Result<String> {
        let client = self.client();
        self.block_on(super::kubelet::token_for(
            &client,
            pod,
            audience,
            Some(expiration),
        ))
        .map_err(invalid("a token bound to a pod"))
    }

    /// A token of `pod`'s `ServiceAccount` bound to `pod`, for `audience`, that expired an hour
    /// ago: the claims of a bound token, signed (ES256) with the API server's service-account
    /// key, so only its expiry is wrong.
    pub fn expired_pod_token(&self, pod: &Pod, audience: &str) -> Result<String> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let account = super::kubelet::service_account_of(pod);
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client(), &namespace);
        let account_uid = self
            .block_on(accounts.get(&account))
            .map_err(|source| Error::Api {
                what: format!("reading service account {namespace}/{account}"),
                source,
            })?
            .metadata
            .uid
            .unwrap_or_default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = json!({
            "aud": [audience],
            "iss": SERVICE_ACCOUNT_ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{account}"),
            "iat": now - 7200,
            "nbf": now - 7200,
            "exp": now - 3600,
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
                "serviceaccount": {"name": account, "uid": account_uid},
            },
        });
        let pem = std::fs::read(&self.files.sa_private)
            .map_err(crate::io_err("reading the service-account signing key"))?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem)
            .map_err(|e| invalid("the service-account signing key")(e.to_string()))?;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .map_err(|e| invalid("signing an expired token")(e.to_string()))
    }
}
