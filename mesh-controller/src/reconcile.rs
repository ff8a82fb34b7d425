//! The control loop: kube-rs' `Controller` over waypoint `Gateways`, the `Deployments` they own
//! and the `ConfigMaps` of their parameters. Each reconcile applies the desired objects
//! (`apply.rs`, from `desired.rs` and the `Gateway`'s parameters) with server-side apply
//! (field manager [`FIELD_MANAGER`]: a user's changes to other fields stay), then writes the
//! `Gateway`'s status: its address (the `Service`'s), `Accepted` (`False`, `Invalid`, when the
//! mesh's model refuses this version of it: its `istio.io/waypoint-for` label;
//! `InvalidParameters` when its parameters cannot be applied), `Programmed` (its pods ready) and
//! each listener's status.
//! Failures are retried with backoff; nothing else stops the loop. A sweep removes the
//! `ClusterRoleBindings` controllers before this one gave the waypoints' accounts (they read the
//! API server then; now the controller's view, `view.rs`).

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        rbac::v1::ClusterRoleBinding,
    },
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, DynamicObject, ListParams, PartialObjectMeta, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef, watcher, Controller},
    Api, Client, Resource,
};
use serde_json::json;
use tracing::{debug, info, warn};

pub use crate::resources::{gateway_resource, FIELD_MANAGER};
use crate::{
    apply::{self, Applied},
    desired::{NotAWaypoint, WaypointGateway, WaypointTemplate, MANAGED_BY},
    error::ControllerError,
};

/// How soon a failed sweep of the old bindings is tried again.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// How soon a waypoint whose pods are not ready yet is looked at again.
const NOT_READY_RECHECK: Duration = Duration::from_secs(5);
/// How soon a waypoint whose parameters could not be applied is looked at again (at once when
/// its `ConfigMap` changes).
const PARAMETERS_RECHECK: Duration = Duration::from_secs(60);

struct Ctx {
    client: Client,
    template: WaypointTemplate,
}

/// Runs the controller until `shutdown` completes: the waypoint `Gateways` turned into what
/// runs them, and the per-service-account `Gateways` ([`crate::accounts`]).
pub async fn run(
    client: Client,
    template: WaypointTemplate,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let resource = gateway_resource();
    let gateways = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let deployments = Api::<Deployment>::all(client.clone());
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        template,
    });
    let sweeper = tokio::spawn(sweep_forever(Arc::clone(&ctx)));
    info!(image = %ctx.template.image, "waypoint controller started");
    let controller = Controller::new_with(gateways, watcher::Config::default(), resource.clone())
        .owns(deployments, watcher::Config::default().labels(&managed));
    // A Gateway's parameters (`parameters.rs`) apply when their ConfigMap changes: every
    // ConfigMap's metadata is watched (no data, nothing kept), and a change reconciles the
    // Gateways of its namespace that name it.
    let store = controller.store();
    let config_maps = Api::<PartialObjectMeta<ConfigMap>>::all(client.clone());
    let waypoints = controller
        .watches(config_maps, watcher::Config::default(), move |config_map| {
            let (ns, name) = (config_map.metadata.namespace, config_map.metadata.name);
            store
                .state()
                .into_iter()
                .filter(|gateway| gateway.metadata.namespace == ns)
                .filter(|gateway| {
                    crate::parameters::reference(&gateway.data).ok().flatten() == name
                })
                .map(|gateway| ObjectRef::from_obj_with(&*gateway, resource.clone()))
                .collect::<Vec<_>>()
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((gateway, _)) => debug!(gateway = %gateway, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        });
    // Stopping drops the loops: every reconcile is an idempotent apply, the next controller
    // picks up where this one left.
    tokio::select! {
        () = waypoints => {}
        () = crate::account_loop::run(client) => {}
        () = shutdown => {}
    }
    sweeper.abort();
    info!("waypoint controller stopped");
}

async fn reconcile(gateway: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ControllerError> {
    let value =
        serde_json::to_value(&*gateway).map_err(|e| ControllerError::Gateway(e.to_string()))?;
    let waypoint = match WaypointGateway::of(&value) {
        Ok(w) => w,
        Err(NotAWaypoint::OtherClass(_)) => return Ok(Action::await_change()),
        Err(e @ NotAWaypoint::Incomplete(_)) => {
            return Err(ControllerError::Gateway(e.to_string()))
        }
    };
    if gateway.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let (client, template) = (&ctx.client, &ctx.template);
    let (address, ready) = match apply::objects(client, template, &waypoint, &value).await? {
        Applied::Done { address, ready } => (address, ready),
        Applied::Refused(problem) => {
            return not_applied(client, &gateway, &waypoint, &problem).await
        }
    };
    let accepted = match &waypoint.invalid {
        None => Acceptance::Accepted,
        Some(why) => Acceptance::Invalid(why.clone()),
    };
    write_status(client, &gateway, address.as_deref(), (ready, accepted)).await?;
    Ok(if ready {
        Action::await_change()
    } else {
        Action::requeue(NOT_READY_RECHECK)
    })
}

/// Whether the mesh takes the `Gateway` as written (its `Accepted` condition).
enum Acceptance {
    Accepted,
    /// The model refuses this version of it (its `istio.io/waypoint-for` label).
    Invalid(String),
    /// Its `parametersRef` cannot be applied: its objects are left as they are.
    InvalidParameters(String),
}

/// The `Gateway`'s objects are left as they are for `problem` (its parameters): its status says
/// so, with the address and readiness of what runs already. Looked at again in a minute (at
/// once when the `ConfigMap` changes).
async fn not_applied(
    client: &Client,
    gateway: &DynamicObject,
    waypoint: &WaypointGateway,
    problem: &impl std::fmt::Display,
) -> Result<Action, ControllerError> {
    let (ns, name) = (waypoint.namespace.as_str(), waypoint.name.as_str());
    warn!(gateway = %format_args!("{ns}/{name}"), %problem, "waypoint parameters not applied");
    let read = |what: &str| {
        let what = format!("reading {what} {ns}/{name}");
        move |source| ControllerError::Api { what, source }
    };
    let address = Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(read("Service"))?
        .and_then(|s| s.spec?.cluster_ip);
    let ready = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(read("Deployment"))?
        .and_then(|d| d.status?.ready_replicas)
        .unwrap_or(0);
    let accepted = Acceptance::InvalidParameters(problem.to_string());
    write_status(client, gateway, address.as_deref(), (ready > 0, accepted)).await?;
    Ok(Action::requeue(PARAMETERS_RECHECK))
}

/// The `Gateway`'s status: its address, whether its waypoint is ready, whether the mesh takes
/// this version of it (`accepted`), and its listeners'.
async fn write_status(
    client: &Client,
    gateway: &DynamicObject,
    address: Option<&str>,
    (ready, accepted): (bool, Acceptance),
) -> Result<(), ControllerError> {
    let (ns, name) = (
        gateway.metadata.namespace.clone().unwrap_or_default(),
        gateway.metadata.name.clone().unwrap_or_default(),
    );
    let generation = gateway.metadata.generation.unwrap_or(0);
    let now = Timestamp::now().to_string();
    // A condition's time changes only with its status: else every status write would change
    // the Gateway, and wake its reconcile again.
    let before = gateway.data.get("status").and_then(|s| s.get("conditions"));
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        let at = (now.as_str(), generation);
        crate::resources::observed_condition(before, (kind, ok), (reason, message), at)
    };
    let addresses: Vec<_> = address
        .filter(|a| !a.is_empty() && *a != "None")
        .map(|a| json!({"type": "IPAddress", "value": a}))
        .into_iter()
        .collect();
    let listeners = listener_statuses(gateway, ready, (&now, generation));
    let status = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "status": {
            "addresses": addresses,
            "listeners": listeners,
            "conditions": [
                match accepted {
                    Acceptance::Accepted => {
                        condition("Accepted", true, "Accepted", "waypoint resources applied")
                    }
                    Acceptance::Invalid(why) => condition(
                        "Accepted",
                        false,
                        "Invalid",
                        &format!(
                            "{why}: the mesh does not take this version; its last good one, if \
                             any, stays in force"
                        ),
                    ),
                    Acceptance::InvalidParameters(why) => condition(
                        "Accepted",
                        false,
                        "InvalidParameters",
                        &format!("{why}; its waypoint's objects are left as they are"),
                    ),
                },
                if ready {
                    condition("Programmed", true, "Programmed", "a waypoint pod is ready")
                } else {
                    condition("Programmed", false, "Pending", "no waypoint pod is ready yet")
                },
            ],
        },
    });
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &gateway_resource());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&name, &params, &Patch::Apply(&status))
        .await
        .map(drop)
        .map_err(|source| ControllerError::Api {
            what: format!("writing the status of Gateway {ns}/{name}"),
            source,
        })
}

/// The status of each of the `Gateway`'s listeners, as Gateway API asks: a waypoint takes HBONE
/// on port 15008 (Istio's `mesh` listener) and nothing else; routes attach to the Services it
/// serves, never to it, so it has no route kinds and no attached routes. A condition keeps its
/// time while its status stays (`now` else, with `generation` observed).
fn listener_statuses(
    gateway: &DynamicObject,
    ready: bool,
    (now, generation): (&str, i64),
) -> Vec<serde_json::Value> {
    let before = gateway.data["status"]["listeners"].as_array();
    let listeners = gateway.data["spec"]["listeners"].as_array();
    listeners
        .into_iter()
        .flatten()
        .map(|listener| {
            let name = listener["name"].as_str().unwrap_or_default();
            let (protocol, port) = (
                listener["protocol"].as_str().unwrap_or_default(),
                &listener["port"],
            );
            let hbone = protocol == "HBONE" && port == 15008;
            let prior = before
                .and_then(|b| b.iter().find(|l| l["name"] == name))
                .and_then(|l| l.get("conditions"));
            let condition = |kind: &str, ok: bool, words: (&str, &str)| {
                crate::resources::observed_condition(prior, (kind, ok), words, (now, generation))
            };
            let unsupported =
                format!("a waypoint listens for HBONE on port 15008, not {protocol} on {port}");
            let conditions = if hbone {
                vec![
                    condition("Accepted", true, ("Accepted", "HBONE on port 15008")),
                    if ready {
                        condition(
                            "Programmed",
                            true,
                            ("Programmed", "a waypoint pod is ready"),
                        )
                    } else {
                        condition(
                            "Programmed",
                            false,
                            ("Pending", "no waypoint pod is ready yet"),
                        )
                    },
                    condition("ResolvedRefs", true, ("ResolvedRefs", "no references")),
                ]
            } else {
                vec![
                    condition("Accepted", false, ("UnsupportedProtocol", &unsupported)),
                    condition("Programmed", false, ("Invalid", "not accepted")),
                    condition("ResolvedRefs", true, ("ResolvedRefs", "no references")),
                ]
            };
            json!({
                "name": name, "supportedKinds": [], "attachedRoutes": 0,
                "conditions": conditions,
            })
        })
        .collect()
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "the signature kube-rs' Controller calls"
)]
fn error_policy(gateway: Arc<DynamicObject>, error: &ControllerError, _ctx: Arc<Ctx>) -> Action {
    warn!(
        gateway = %format_args!(
            "{}/{}",
            gateway.metadata.namespace.as_deref().unwrap_or_default(),
            gateway.metadata.name.as_deref().unwrap_or_default()
        ),
        error = %error,
        "waypoint not reconciled; retrying"
    );
    Action::requeue(NOT_READY_RECHECK)
}

async fn sweep_forever(ctx: Arc<Ctx>) {
    while let Err(e) = sweep(&ctx.client).await {
        warn!(error = %e, "deleting the waypoints' old ClusterRoleBindings failed; retrying");
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// Deletes every binding the controller made (those before this version bound each waypoint's
/// account to the cluster-wide read role, which any pod of the waypoint's namespace could use).
async fn sweep(client: &Client) -> Result<(), ControllerError> {
    let bindings = Api::<ClusterRoleBinding>::all(client.clone());
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let list = bindings
        .list(&ListParams::default().labels(&managed))
        .await
        .map_err(|source| ControllerError::Api {
            what: "listing the waypoints' old ClusterRoleBindings".into(),
            source,
        })?;
    for binding in list.items {
        let name = binding.meta().name.clone().unwrap_or_default();
        info!(binding = %name, "deleting a waypoint's ClusterRoleBinding: waypoints read the controller's view now");
        bindings
            .delete(&name, &DeleteParams::default())
            .await
            .map(drop)
            .map_err(|source| ControllerError::Api {
                what: format!("deleting ClusterRoleBinding {name}"),
                source,
            })?;
    }
    Ok(())
}
