//! The routes' entries of [`mesh_cluster::route_status`], kept true to the cluster view: on
//! every `HTTPRoute` and `GRPCRoute` with a Service or `ServiceEntry` parent, one entry of
//! `status.parents` per such parent, with `controllerName` [`ROUTE_CONTROLLER`] and the
//! conditions `Accepted` and `ResolvedRefs` (with `observedGeneration`).
//!
//! `status.parents` is one list that every controller of a route's parents writes its own
//! entries into (a `Gateway`'s controller, for a route that also has a `Gateway` parent), so
//! it cannot be applied as a whole: the route is read, the other controllers' entries are kept
//! as they are, this controller's replaced, and the list written with the route's
//! `resourceVersion` (a route changed meanwhile is refused by the API server, and written again
//! at the next try). A condition's `lastTransitionTime` is kept while its status stays. Like
//! [`crate::bound_status`], it writes only what changed, reads its entries back at start and
//! at every resync, and removes its entries from a route that no longer has such parents.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    Api, Client,
};
use mesh_cluster::{
    ClusterState, ParentRef, ParentStatus, RouteCondition, RouteKind, RouteObject, ROUTE_CONTROLLER,
};
use serde_json::{json, Map, Value};
use tracing::{debug, warn};

use crate::{error::ControllerError, resources};

/// This controller's entries of the routes as written, without their `lastTransitionTime`s
/// (what is compared), and the version of each route kind the API server was last found to
/// serve.
#[derive(Debug, Default)]
pub(crate) struct Written {
    entries: BTreeMap<RouteObject, Vec<Value>>,
    served: BTreeMap<RouteKind, ApiResource>,
}

impl Written {
    /// How many routes have entries of this controller.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The resource of `kind` at the version last found served, else the newest.
    fn resource(&self, kind: RouteKind) -> ApiResource {
        self.served
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| kind.resources().swap_remove(0))
    }
}

/// The entries of this controller in `status` (a route's), without `lastTransitionTime`.
fn ours(status: Option<&Value>) -> Vec<Value> {
    let Some(parents) = status
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    parents
        .iter()
        .filter(|p| p.get("controllerName").and_then(Value::as_str) == Some(ROUTE_CONTROLLER))
        .map(|p| {
            let mut p = p.clone();
            if let Some(conditions) = p.get_mut("conditions").and_then(Value::as_array_mut) {
                for c in conditions.iter_mut().filter_map(Value::as_object_mut) {
                    c.remove("lastTransitionTime");
                }
            }
            p
        })
        .collect()
}

/// The entries this controller has on the routes now, each kind read at the version the API
/// server serves (for a kind that cannot be listed, warned about, those of `before`; one not
/// served has no routes).
pub(crate) async fn read_written(client: &Client, before: &Written) -> Written {
    let read = |kind, route: &DynamicObject| {
        let entries = ours(route.data.get("status"));
        let at = RouteObject {
            kind,
            namespace: route.metadata.namespace.clone().unwrap_or_default(),
            name: route.metadata.name.clone().unwrap_or_default(),
        };
        (!entries.is_empty()).then_some((at, entries))
    };
    let kinds = (&RouteKind::ALL[..], RouteKind::resources);
    let (entries, served) =
        resources::read_back(client, kinds, &before.entries, |r| r.kind, read).await;
    Written { entries, served }
}

/// Writes the entries that differ from those written; whether any write failed.
pub(crate) async fn sync(client: &Client, view: &ClusterState, written: &mut Written) -> bool {
    let wanted = view.route_statuses();
    let routes: BTreeSet<RouteObject> = wanted
        .keys()
        .chain(written.entries.keys())
        .cloned()
        .collect();
    let mut failed = false;
    for route in routes {
        let want = wanted.get(&route).map(Vec::as_slice).unwrap_or_default();
        let compared: Vec<Value> = want.iter().map(|p| entry(p, |_, _| None)).collect();
        if written
            .entries
            .get(&route)
            .map(Vec::as_slice)
            .unwrap_or_default()
            == compared.as_slice()
        {
            continue;
        }
        match write(client, &route, want, written).await {
            Ok(true) => {
                debug!(?route, "route status written");
                if compared.is_empty() {
                    written.entries.remove(&route);
                } else {
                    written.entries.insert(route, compared);
                }
            }
            Ok(false) => {
                written.entries.remove(&route);
            }
            Err(e) => {
                warn!(error = %e, "a route's status not written: retried");
                failed = true;
            }
        }
    }
    failed
}

/// `status`'s entry; `since` gives the `lastTransitionTime` of a condition (type, status),
/// `None`: none (the compared form).
fn entry(status: &ParentStatus, since: impl Fn(&str, bool) -> Option<String>) -> Value {
    let condition = |kind: &str, c: &RouteCondition| {
        let since = since(kind, c.ok);
        let words = (c.reason.as_str(), c.message.as_str());
        let mut value = resources::condition(kind, c.ok, words, since.as_deref().unwrap_or(""));
        if let Some(generation) = status.generation {
            value["observedGeneration"] = json!(generation);
        }
        if since.is_none() {
            if let Some(fields) = value.as_object_mut() {
                fields.remove("lastTransitionTime");
            }
        }
        value
    };
    let mut conditions = vec![condition("Accepted", &status.accepted)];
    conditions.extend(
        status
            .resolved_refs
            .as_ref()
            .map(|c| condition("ResolvedRefs", c)),
    );
    json!({
        "parentRef": parent_ref(&status.parent),
        "controllerName": ROUTE_CONTROLLER,
        "conditions": conditions,
    })
}

/// A `parentRef` as the route writes it (a Service's `group` is `""`).
fn parent_ref(parent: &ParentRef) -> Value {
    let mut value = Map::new();
    value.insert("group".into(), json!(parent.group));
    value.insert("kind".into(), json!(parent.kind));
    value.insert("name".into(), json!(parent.name));
    if let Some(namespace) = &parent.namespace {
        value.insert("namespace".into(), json!(namespace));
    }
    if let Some(section) = &parent.section_name {
        value.insert("sectionName".into(), json!(section));
    }
    if let Some(port) = parent.port {
        value.insert("port".into(), json!(port));
    }
    Value::Object(value)
}

/// Reads `route` at the version of its kind last found served; when it is not found there, the
/// version the API server serves now is looked for (the route's CRD may have changed), and the
/// route read again at it. `None`: the route is gone.
async fn read_route(
    client: &Client,
    route: &RouteObject,
    written: &mut Written,
) -> Result<Option<(ApiResource, DynamicObject)>, ControllerError> {
    let api_error = |resource: &ApiResource, source| ControllerError::Api {
        what: format!(
            "reading the status of {} {}/{}",
            resource.kind, route.namespace, route.name
        ),
        source,
    };
    let get = |resource: &ApiResource| {
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &route.namespace, resource);
        async move { api.get_opt(&route.name).await }
    };
    let last = written.resource(route.kind);
    if let Some(current) = get(&last).await.map_err(|e| api_error(&last, e))? {
        return Ok(Some((last, current)));
    }
    let served = resources::list_served(client, &route.kind.resources())
        .await
        .map_err(|e| api_error(&last, e))?;
    let Some((now, _)) = served.filter(|(now, _)| *now != last) else {
        return Ok(None);
    };
    written.served.insert(route.kind, now.clone());
    let current = get(&now).await.map_err(|e| api_error(&now, e))?;
    Ok(current.map(|current| (now, current)))
}

/// Replaces this controller's entries of `route` with `want`'s, keeping the others'; `false`:
/// the route is gone.
async fn write(
    client: &Client,
    route: &RouteObject,
    want: &[ParentStatus],
    written: &mut Written,
) -> Result<bool, ControllerError> {
    let Some((resource, current)) = read_route(client, route, written).await? else {
        return Ok(false);
    };
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &route.namespace, &resource);
    let what = |doing: &str| {
        format!(
            "{doing} {} {}/{}",
            resource.kind, route.namespace, route.name
        )
    };
    let parents: Vec<Value> = current
        .data
        .get("status")
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (before, others): (Vec<Value>, Vec<Value>) = parents
        .into_iter()
        .partition(|p| p.get("controllerName").and_then(Value::as_str) == Some(ROUTE_CONTROLLER));
    let now = Timestamp::now().to_string();
    let mut list = others;
    list.extend(want.iter().map(|status| {
        let parent = parent_ref(&status.parent);
        entry(status, |kind, ok| {
            Some(kept_since(&before, (&parent, kind, ok)).unwrap_or_else(|| now.clone()))
        })
    }));
    let patch = json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "status": {"parents": list},
    });
    let result = api
        .patch_status(&route.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(source) => Err(ControllerError::Api {
            what: what("writing the status of"),
            source,
        }),
    }
}

/// The `lastTransitionTime` of the condition `kind` of `parent` among the entries `before`,
/// while its status is still `ok`.
fn kept_since(before: &[Value], (parent, kind, ok): (&Value, &str, bool)) -> Option<String> {
    let entry = before.iter().find(|p| p.get("parentRef") == Some(parent))?;
    resources::kept_since(entry.get("conditions"), kind, ok)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{kept_since, ours};

    #[test]
    fn only_this_controllers_entries_are_read_and_their_times_kept_while_the_status_stays() {
        let service = json!({"group": "", "kind": "Service", "name": "web"});
        let status = json!({"parents": [
            {"parentRef": {"name": "gw"}, "controllerName": "example.com/gateway",
             "conditions": [{"type": "Accepted", "status": "True"}]},
            {"parentRef": service, "controllerName": "mesh.local/waypoint",
             "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted",
                 "lastTransitionTime": "2026-12-07T12:00:00Z"},
                {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound",
                 "lastTransitionTime": "2026-12-07T13:00:00Z"},
             ]},
        ]});
        let read = ours(Some(&status));
        assert_eq!(read.len(), 1, "the Gateway controller's entry is not ours");
        assert_eq!(
            read[0]["conditions"][0],
            json!({"type": "Accepted", "status": "True", "reason": "Accepted"}),
            "compared without its time"
        );
        let before = status["parents"].as_array().unwrap();
        assert_eq!(
            kept_since(before, (&service, "Accepted", true)).as_deref(),
            Some("2026-12-07T12:00:00Z")
        );
        assert_eq!(kept_since(before, (&service, "ResolvedRefs", true)), None);
        let other = json!({"group": "", "kind": "Service", "name": "web", "port": 80});
        assert_eq!(kept_since(before, (&other, "Accepted", true)), None);
        assert!(ours(None).is_empty());
    }
}
