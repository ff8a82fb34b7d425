//! What the loops write with: the `Gateway` resource, the field manager of their applies, a
//! status condition as the API server stores it, and the read-back of what is written.

use std::{collections::BTreeMap, fmt::Debug};

use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    Api, Client,
};
use serde_json::{json, Value};
use tracing::{debug, warn};

/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "mesh-waypoint-controller";

/// `gateway.networking.k8s.io/v1` `Gateway`.
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
        "gateways",
    )
}

/// A status condition (`metav1.Condition`): `type`, `status` (`True` when `ok`), `reason`,
/// `message` and `lastTransitionTime` (`since`).
pub fn condition(kind: &str, ok: bool, (reason, message): (&str, &str), since: &str) -> Value {
    json!({
        "type": kind, "status": if ok { "True" } else { "False" }, "reason": reason,
        "message": message, "lastTransitionTime": since,
    })
}

/// What the objects of `kinds` (each of API resource `resource(kind)`) hold now: what `read`
/// finds on each object (its key and what is written), all namespaces. A kind that cannot be
/// listed is warned about and keeps what `before` holds of it (`kind_of` a key's kind); a kind
/// the API server does not serve has no objects.
pub(crate) async fn read_back<K, O, W>(
    client: &Client,
    (kinds, resource): (&[K], impl Fn(K) -> ApiResource),
    before: &BTreeMap<O, W>,
    kind_of: impl Fn(&O) -> K,
    read: impl Fn(K, &DynamicObject) -> Option<(O, W)>,
) -> BTreeMap<O, W>
where
    K: Copy + Debug + PartialEq,
    O: Ord + Clone,
    W: Clone,
{
    let mut held = BTreeMap::new();
    for &kind in kinds {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource(kind));
        match api.list(&ListParams::default()).await {
            Ok(objects) => held.extend(objects.iter().filter_map(|o| read(kind, o))),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                debug!(?kind, "not served: nothing written to read back");
            }
            Err(e) => {
                warn!(?kind, error = %e, "listing objects to read back what is written");
                let kept = before.iter().filter(|(object, _)| kind_of(object) == kind);
                held.extend(kept.map(|(object, w)| (object.clone(), w.clone())));
            }
        }
    }
    held
}
