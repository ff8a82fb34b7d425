//! The CA's reads of the Kubernetes API for one request: the token's review, the caller's Pod,
//! and the Pods on the caller's node (for impersonation).

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::authorize::{PodFacts, Review, POD_NAME_EXTRA, POD_UID_EXTRA};

/// The API server, as the CA's `ServiceAccount` reaches it (tokenreviews create, pods get and
/// list).
#[derive(Clone)]
pub(super) struct Cluster {
    pub(super) client: Client,
}

impl Cluster {
    /// The `TokenReview` of `token` for `audience`.
    pub(super) async fn review(&self, token: &str, audience: &str) -> Result<Review, kube::Error> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![audience.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &request)
            .await?;
        let status = answer.status.unwrap_or_default();
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        Ok(Review {
            authenticated: status.authenticated.unwrap_or(false),
            error: status.error,
            username: user.username.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            audiences: status.audiences.unwrap_or_default(),
            pod_name: first(POD_NAME_EXTRA),
            pod_uid: first(POD_UID_EXTRA),
        })
    }

    /// Pod `namespace/name`, if it exists.
    pub(super) async fn pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<PodFacts>, kube::Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        Ok(pods.get_opt(name).await?.as_ref().map(PodFacts::of))
    }

    /// Every Pod on `node` (`spec.nodeName`).
    pub(super) async fn pods_on_node(&self, node: &str) -> Result<Vec<PodFacts>, kube::Error> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let listed = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?;
        Ok(listed.items.iter().map(PodFacts::of).collect())
    }
}
