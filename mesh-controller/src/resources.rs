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

/// A [`condition`] observed at `generation`, whose time is kept from `before` (the conditions it
/// replaces) while its status stays ([`kept_since`]), else `now`.
pub(crate) fn observed_condition(
    before: Option<&Value>,
    (kind, ok): (&str, bool),
    words: (&str, &str),
    (now, generation): (&str, i64),
) -> Value {
    let since = kept_since(before, kind, ok).unwrap_or_else(|| now.to_owned());
    let mut value = condition(kind, ok, words, &since);
    value["observedGeneration"] = json!(generation);
    value
}

/// The `lastTransitionTime` of condition `kind` in `conditions` (a `status.conditions` list)
/// while its status is still `ok`: a condition's time changes only when its status does.
pub(crate) fn kept_since(conditions: Option<&Value>, kind: &str, ok: bool) -> Option<String> {
    let condition = conditions?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))?;
    let status = if ok { "True" } else { "False" };
    if condition.get("status").and_then(Value::as_str) != Some(status) {
        return None;
    }
    Some(condition.get("lastTransitionTime")?.as_str()?.to_owned())
}

/// The objects of the first of `resources` (one kind at its versions, the newest first) that
/// the API server serves, all namespaces, with that resource; `None` when it serves none.
pub(crate) async fn list_served(
    client: &Client,
    resources: &[ApiResource],
) -> Result<Option<(ApiResource, Vec<DynamicObject>)>, kube::Error> {
    for resource in resources {
        let api = Api::<DynamicObject>::all_with(client.clone(), resource);
        match api.list(&ListParams::default()).await {
            Ok(objects) => return Ok(Some((resource.clone(), objects.items))),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// What the objects of `kinds` hold now: what `read` finds on each object (its key and what is
/// written), all namespaces, each kind at the first of its `resources` the API server serves;
/// and those resources. A kind that cannot be listed is warned about and keeps what `before`
/// holds of it (`kind_of` a key's kind); a kind the API server does not serve has no objects.
pub(crate) async fn read_back<K, O, W>(
    client: &Client,
    (kinds, resources): (&[K], impl Fn(K) -> Vec<ApiResource>),
    before: &BTreeMap<O, W>,
    kind_of: impl Fn(&O) -> K,
    read: impl Fn(K, &DynamicObject) -> Option<(O, W)>,
) -> (BTreeMap<O, W>, BTreeMap<K, ApiResource>)
where
    K: Copy + Debug + Ord,
    O: Ord + Clone,
    W: Clone,
{
    let (mut held, mut served) = (BTreeMap::new(), BTreeMap::new());
    for &kind in kinds {
        match list_served(client, &resources(kind)).await {
            Ok(Some((resource, objects))) => {
                held.extend(objects.iter().filter_map(|o| read(kind, o)));
                served.insert(kind, resource);
            }
            Ok(None) => debug!(?kind, "not served: nothing written to read back"),
            Err(e) => {
                warn!(?kind, error = %e, "listing objects to read back what is written");
                let kept = before.iter().filter(|(object, _)| kind_of(object) == kind);
                held.extend(kept.map(|(object, w)| (object.clone(), w.clone())));
            }
        }
    }
    (held, served)
}
