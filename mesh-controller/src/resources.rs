//! What the loops write with: the `Gateway` resource, the field manager of their applies, and
//! a status condition as the API server stores it.

use kube::api::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

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
