//! What both loops write with: the `Gateway` resource and the field manager of their applies.

use kube::api::{ApiResource, GroupVersionKind};

/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "mesh-waypoint-controller";

/// `gateway.networking.k8s.io/v1` `Gateway`.
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
        "gateways",
    )
}
