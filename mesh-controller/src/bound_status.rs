//! The `istio.io/WaypointBound` condition ([`mesh_cluster::waypoint_bound`]) on every `Service`
//! and `ServiceEntry` that asks for a waypoint, kept true to the cluster view. The controller
//! reads the view as a waypoint reads it (the chart binds it to the waypoint role) and, at every
//! change of the view, applies the conditions that changed (server-side apply to the status
//! subresource, field manager [`FIELD_MANAGER`]); an object that no longer asks for a waypoint
//! has its condition removed. The conditions already written are read when it starts, so a
//! label removed while it was down is seen too. A write that fails is warned about and retried
//! at the next change or after [`RETRY`]; an object that is gone is forgotten.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{api::core::v1::Service, jiff::Timestamp};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    Api, Client,
};
use mesh_cluster::{
    BoundCondition, BoundKind, BoundObject, ClusterState, EnrollmentOptions, KubeOptions,
    KubeSource, WAYPOINT_BOUND,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{resources::FIELD_MANAGER, ControllerError};

/// How soon writes that failed are tried again when the view does not change.
const RETRY: Duration = Duration::from_secs(10);

/// `networking.istio.io/v1` `ServiceEntry`.
fn service_entry_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry"),
        "serviceentries",
    )
}

/// A condition as written on an object.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    bound: bool,
    reason: String,
    message: String,
    /// Its `lastTransitionTime`: kept while `bound` stays.
    since: String,
}

impl Written {
    fn says(&self, condition: &BoundCondition) -> bool {
        self.bound == condition.bound
            && self.reason == condition.reason.as_str()
            && self.message == condition.message
    }

    /// The condition of `status` (an object's), if it has one.
    fn of(status: Option<&Value>) -> Option<Self> {
        let condition = status?
            .get("conditions")?
            .as_array()?
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(WAYPOINT_BOUND))?;
        let text = |field: &str| {
            condition
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Some(Self {
            bound: text("status") == "True",
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

/// Reads the cluster view through `client` (the waypoints' reading of it, with `options`), then
/// keeps the conditions true to it. Runs until dropped; a view that cannot be read is an error
/// in the log, and the controller's other work goes on without the conditions.
pub async fn run(client: Client, options: EnrollmentOptions) {
    let source = match KubeSource::new(client.clone(), options, KubeOptions::default()) {
        Ok(source) => source,
        Err(e) => {
            error!(error = %e, "no cluster view: WaypointBound conditions are not written");
            return;
        }
    };
    let view = match source.start().await {
        Ok(view) => view,
        Err(e) => {
            error!(error = %e, "no cluster view: WaypointBound conditions are not written");
            return;
        }
    };
    keep(&client, view.state.clone()).await;
}

/// Keeps the conditions true to `state` until the view's sender is dropped.
async fn keep(client: &Client, mut state: watch::Receiver<Arc<ClusterState>>) {
    let mut written = read_written(client).await;
    info!(
        written = written.len(),
        "writing istio.io/WaypointBound conditions"
    );
    loop {
        let view = Arc::clone(&state.borrow_and_update());
        let failed = sync(client, &view, &mut written).await;
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

/// The conditions the objects have now (those that cannot be listed are taken as having none,
/// and warned about).
async fn read_written(client: &Client) -> BTreeMap<BoundObject, Written> {
    let mut written = BTreeMap::new();
    let object = |kind, meta: &kube::api::ObjectMeta| BoundObject {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    };
    match Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(services) => {
            for service in services {
                let status = service.status.as_ref().map(|s| json!(s));
                if let Some(condition) = Written::of(status.as_ref()) {
                    written.insert(object(BoundKind::Service, &service.metadata), condition);
                }
            }
        }
        Err(e) => warn!(error = %e, "listing Services for their WaypointBound conditions"),
    }
    let entries = Api::<DynamicObject>::all_with(client.clone(), &service_entry_resource());
    match entries.list(&ListParams::default()).await {
        Ok(entries) => {
            for entry in entries {
                if let Some(condition) = Written::of(entry.data.get("status")) {
                    written.insert(object(BoundKind::ServiceEntry, &entry.metadata), condition);
                }
            }
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {
            debug!("ServiceEntries are not served: none to write on");
        }
        Err(e) => warn!(error = %e, "listing ServiceEntries for their WaypointBound conditions"),
    }
    written
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
            (Some(want), Some(have)) if have.bound == want.bound => have.since.clone(),
            _ => Timestamp::now().to_string(),
        };
        match apply(client, &object, want, &since).await {
            Ok(Applied::Done) => {
                debug!(?object, ?want, "WaypointBound written");
                match want {
                    Some(want) => written.insert(
                        object,
                        Written {
                            bound: want.bound,
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
                warn!(error = %e, "the WaypointBound condition not written: retried");
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
            json!({
                "type": WAYPOINT_BOUND,
                "status": if c.bound { "True" } else { "False" },
                "reason": c.reason.as_str(),
                "message": c.message,
                "lastTransitionTime": since,
            })
        })
        .into_iter()
        .collect();
    let (ns, name) = (object.namespace.as_str(), object.name.as_str());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let result = match object.kind {
        BoundKind::Service => {
            let status = json!({
                "apiVersion": "v1", "kind": "Service",
                "status": {"conditions": conditions},
            });
            Api::<Service>::namespaced(client.clone(), ns)
                .patch_status(name, &params, &Patch::Apply(&status))
                .await
                .map(drop)
        }
        BoundKind::ServiceEntry => {
            let status = json!({
                "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "status": {"conditions": conditions},
            });
            Api::<DynamicObject>::namespaced_with(client.clone(), ns, &service_entry_resource())
                .patch_status(name, &params, &Patch::Apply(&status))
                .await
                .map(drop)
        }
    };
    match result {
        Ok(()) => Ok(Applied::Done),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Applied::Gone),
        Err(source) => Err(ControllerError::Api {
            what: format!(
                "writing the WaypointBound condition of {kind:?} {ns}/{name}",
                kind = object.kind
            ),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use mesh_cluster::{BoundCondition, BoundReason};
    use serde_json::json;

    use super::Written;

    #[test]
    fn the_condition_written_is_read_back_and_compared() {
        let status = json!({"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "istio.io/WaypointBound", "status": "False", "reason": "WaypointNotFound",
             "message": "no waypoint Gateway shop/wp", "lastTransitionTime": "2026-12-07T12:00:00Z"},
        ]});
        let written = Written::of(Some(&status)).expect("the condition");
        assert_eq!(written.since, "2026-12-07T12:00:00Z");
        let mut condition = BoundCondition {
            bound: false,
            reason: BoundReason::NotFound,
            message: "no waypoint Gateway shop/wp".to_owned(),
        };
        assert!(written.says(&condition));
        condition.reason = BoundReason::NotReady;
        assert!(!written.says(&condition));
        assert!(Written::of(Some(&json!({"conditions": [{"type": "Ready"}]}))).is_none());
        assert!(Written::of(None).is_none());
    }
}
