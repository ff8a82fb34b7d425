//! The conditions of [`mesh_cluster::waypoint_bound`], kept true to the cluster view:
//! `istio.io/WaypointBound` on every `Service` and `ServiceEntry` that asks for a waypoint,
//! `WaypointAccepted` on every `AuthorizationPolicy` with `targetRefs` and every
//! `RequestAuthentication`, `ZtunnelAccepted` on every other `AuthorizationPolicy`,
//! `WaypointAccepted` on every `EnvoyFilter` for waypoints (with `targetRefs` or a local rate
//! limit). The controller reads the view as a waypoint reads it (the chart binds it to the
//! waypoint role) and, at every change of the view, applies the conditions that changed
//! (server-side apply to the status subresource, field manager [`FIELD_MANAGER`]); an object
//! that no longer asks for a waypoint has its condition removed. The conditions already
//! written are read when it starts, so a label removed while it was down is seen too, and again
//! at every resync (`--status-resync-secs`, 10 minutes by default), so that a condition someone
//! else changed is put right. A write that fails
//! is warned about and retried at the next change or after [`RETRY`]; an object that is gone is
//! forgotten.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{api::core::v1::Service, jiff::Timestamp};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    Api, Client,
};
use mesh_cluster::{
    BoundCondition, BoundKind, BoundObject, ClusterState, EnrollmentOptions, KubeOptions,
    KubeSource,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    error::ControllerError,
    resources::{self, FIELD_MANAGER},
    route_status,
};

/// How soon writes that failed are tried again when the view does not change.
const RETRY: Duration = Duration::from_secs(10);

/// The kinds written on.
const KINDS: [BoundKind; 5] = [
    BoundKind::Service,
    BoundKind::ServiceEntry,
    BoundKind::AuthorizationPolicy,
    BoundKind::RequestAuthentication,
    BoundKind::EnvoyFilter,
];

/// The API resource of `kind`.
fn resource(kind: BoundKind) -> ApiResource {
    let istio = |(group, version), kind, plural| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
    };
    let (networking, security) = (("networking.istio.io", "v1"), ("security.istio.io", "v1"));
    match kind {
        BoundKind::Service => ApiResource::erase::<Service>(&()),
        BoundKind::ServiceEntry => istio(networking, "ServiceEntry", "serviceentries"),
        BoundKind::AuthorizationPolicy => {
            istio(security, "AuthorizationPolicy", "authorizationpolicies")
        }
        BoundKind::RequestAuthentication => {
            istio(security, "RequestAuthentication", "requestauthentications")
        }
        // Served at v1alpha3 only.
        BoundKind::EnvoyFilter => istio(
            ("networking.istio.io", "v1alpha3"),
            "EnvoyFilter",
            "envoyfilters",
        ),
    }
}

/// A condition as written on an object.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    condition_type: String,
    ok: bool,
    reason: String,
    message: String,
    /// Its `lastTransitionTime`: kept while its type and `ok` stay.
    since: String,
}

impl Written {
    fn says(&self, condition: &BoundCondition) -> bool {
        self.condition_type == condition.condition_type
            && self.ok == condition.ok
            && self.reason == condition.reason.as_str()
            && self.message == condition.message
    }

    /// The first condition of one of `types` in `status` (an object's), if it has one.
    fn of(status: Option<&Value>, types: &[&str]) -> Option<Self> {
        let condition = status?.get("conditions")?.as_array()?.iter().find(|c| {
            c.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| types.contains(&t))
        })?;
        let text = |field: &str| {
            condition
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Some(Self {
            condition_type: text("type"),
            ok: text("status") == "True",
            reason: text("reason"),
            message: text("message"),
            since: text("lastTransitionTime"),
        })
    }
}

/// What the apply of one object's condition came to.
enum Applied {
    Done,
    /// The object is gone.
    Gone,
}

/// Reads the cluster view through `client` (the waypoints' reading of it, with `options`: every
/// kind a waypoint watches, its policies included), then keeps the conditions true to it. Runs
/// until dropped; a view that cannot be read is an error in the log, and the controller's other
/// work goes on without the conditions. The conditions on the objects are read again every
/// `resync`. `on_view` is called with the view once it is first built in full: the first list's
/// transients (as large as the view) are free then, for the allocator to give back, and the
/// controller's own certificate can be asked for (the CA's address resolves through the view).
pub async fn run(
    client: Client,
    options: EnrollmentOptions,
    resync: Duration,
    on_view: impl FnOnce(&watch::Receiver<Arc<ClusterState>>),
) {
    let kube = KubeOptions {
        routes: true,
        ..KubeOptions::default()
    };
    let started = match KubeSource::new(client.clone(), options, kube) {
        Ok(source) => source.start().await,
        Err(e) => Err(e),
    };
    let view = match started {
        Ok(view) => view,
        Err(e) => {
            error!(error = %e, "no cluster view: the waypoint conditions are not written");
            return;
        }
    };
    on_view(&view.state);
    keep(&client, view.state.clone(), resync).await;
}

/// Keeps the conditions and the routes' entries ([`route_status`]) true to `state` until the
/// view's sender is dropped, reading those on the objects again every `every`.
async fn keep(client: &Client, mut state: watch::Receiver<Arc<ClusterState>>, every: Duration) {
    let mut written = read_written(client, &BTreeMap::new()).await;
    let mut routes = route_status::read_written(client, &route_status::Written::default()).await;
    info!(
        written = written.len(),
        routes = routes.len(),
        "writing the waypoint conditions of Services, ServiceEntries and Istio's policies, and \
         the status of routes attached to Services"
    );
    let mut resync = tokio::time::Instant::now() + every;
    loop {
        let view = Arc::clone(&state.borrow_and_update());
        let conditions_failed = sync(client, &view, &mut written).await;
        let failed = route_status::sync(client, &view, &mut routes).await || conditions_failed;
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(RETRY), if failed => {}
            () = tokio::time::sleep_until(resync) => {
                // What someone else changed since is put right by the next sync.
                written = read_written(client, &written).await;
                routes = route_status::read_written(client, &routes).await;
                resync = tokio::time::Instant::now() + every;
            }
        }
    }
}

/// The conditions the objects have now (for a kind that cannot be listed, warned about, those
/// of `before`; one not served has no objects).
async fn read_written(
    client: &Client,
    before: &BTreeMap<BoundObject, Written>,
) -> BTreeMap<BoundObject, Written> {
    let read = |kind: BoundKind, object: &DynamicObject| {
        let condition = Written::of(object.data.get("status"), kind.condition_types())?;
        let at = BoundObject {
            kind,
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
        };
        Some((at, condition))
    };
    let resources = |kind| vec![resource(kind)];
    let (held, _) =
        resources::read_back(client, (&KINDS, resources), before, |o| o.kind, read).await;
    held
}

/// Applies the conditions that differ from those written; whether any write failed.
async fn sync(
    client: &Client,
    view: &ClusterState,
    written: &mut BTreeMap<BoundObject, Written>,
) -> bool {
    let wanted = view.bound_conditions();
    let objects: BTreeSet<BoundObject> = wanted.keys().chain(written.keys()).cloned().collect();
    let mut failed = false;
    for object in objects {
        let want = wanted.get(&object);
        let have = written.get(&object);
        let since = match (want, have) {
            (Some(want), Some(have)) if have.says(want) => continue,
            (None, None) => continue,
            (Some(want), Some(have))
                if have.ok == want.ok && have.condition_type == want.condition_type =>
            {
                have.since.clone()
            }
            _ => Timestamp::now().to_string(),
        };
        match apply(client, &object, want, &since).await {
            Ok(Applied::Done) => {
                debug!(?object, ?want, "waypoint condition written");
                match want {
                    Some(want) => written.insert(
                        object,
                        Written {
                            condition_type: want.condition_type.to_owned(),
                            ok: want.ok,
                            reason: want.reason.as_str().to_owned(),
                            message: want.message.clone(),
                            since,
                        },
                    ),
                    None => written.remove(&object),
                };
            }
            Ok(Applied::Gone) => {
                written.remove(&object);
            }
            Err(e) => {
                warn!(error = %e, "a waypoint condition not written: retried");
                failed = true;
            }
        }
    }
    failed
}

/// Writes `condition` on `object` (none: removes the controller's).
async fn apply(
    client: &Client,
    object: &BoundObject,
    condition: Option<&BoundCondition>,
    since: &str,
) -> Result<Applied, ControllerError> {
    let conditions: Vec<Value> = condition
        .map(|c| {
            let words = (c.reason.as_str(), c.message.as_str());
            resources::condition(c.condition_type, c.ok, words, since)
        })
        .into_iter()
        .collect();
    let (ns, name) = (object.namespace.as_str(), object.name.as_str());
    let resource = resource(object.kind);
    let status = json!({
        "apiVersion": resource.api_version, "kind": resource.kind,
        "status": {"conditions": conditions},
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let result = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource)
        .patch_status(name, &params, &Patch::Apply(&status))
        .await;
    match result {
        Ok(_) => Ok(Applied::Done),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Applied::Gone),
        Err(source) => Err(ControllerError::Api {
            what: format!(
                "writing the {} condition of {} {ns}/{name}",
                condition.map_or("waypoint", |c| c.condition_type),
                resource.kind
            ),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use mesh_cluster::{BoundCondition, BoundReason, WAYPOINT_BOUND, ZTUNNEL_ACCEPTED};
    use serde_json::json;

    use super::Written;

    #[test]
    fn the_condition_written_is_read_back_and_compared() {
        let status = json!({"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "istio.io/WaypointBound", "status": "False", "reason": "WaypointNotFound",
             "message": "no waypoint Gateway shop/wp", "lastTransitionTime": "2026-12-07T12:00:00Z"},
        ]});
        let written = Written::of(Some(&status), &[WAYPOINT_BOUND]).expect("the condition");
        assert_eq!(written.since, "2026-12-07T12:00:00Z");
        assert!(Written::of(Some(&status), &["WaypointAccepted"]).is_none());
        let mut condition = BoundCondition {
            condition_type: WAYPOINT_BOUND,
            ok: false,
            reason: BoundReason::NotFound,
            message: "no waypoint Gateway shop/wp".to_owned(),
        };
        assert!(written.says(&condition));
        condition.reason = BoundReason::NotReady;
        assert!(!written.says(&condition));
        // The same words under another type are another condition.
        condition.reason = BoundReason::NotFound;
        condition.condition_type = ZTUNNEL_ACCEPTED;
        assert!(!written.says(&condition));
        let ready = json!({"conditions": [{"type": "Ready"}]});
        assert!(Written::of(Some(&ready), &[WAYPOINT_BOUND]).is_none());
        assert!(Written::of(None, &[WAYPOINT_BOUND]).is_none());
    }
}
