//! The per-service-account loop: kube-rs' `Controller` over `ServiceAccounts`, woken also by
//! their `Namespace`'s changes (the setting may be there). Each reconcile applies the account's
//! waypoint `Gateway` when its setting asks for one ([`crate::accounts`]) and deletes the one
//! the controller made when it no longer does.

use std::sync::Arc;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    api::{DeleteParams, DynamicObject, Patch, PatchParams},
    runtime::{controller::Action, reflector::ObjectRef, watcher, Controller},
    Api, Client,
};
use tracing::{debug, info, warn};

use crate::{
    accounts::{gateway, is_accounts, wants_waypoint},
    error::ControllerError,
    resources::{gateway_resource, FIELD_MANAGER},
};

/// How soon a failed reconcile is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs until dropped.
pub async fn run(client: Client) {
    let accounts = Api::<ServiceAccount>::all(client.clone());
    let namespaces = Api::<Namespace>::all(client.clone());
    let controller = Controller::new(accounts, watcher::Config::default());
    let store = controller.store();
    controller
        .watches(
            namespaces,
            watcher::Config::default(),
            move |ns: Namespace| {
                let name = ns.metadata.name.unwrap_or_default();
                store
                    .state()
                    .into_iter()
                    .filter(|sa| sa.metadata.namespace.as_deref() == Some(name.as_str()))
                    .map(|sa| ObjectRef::from_obj(&*sa))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, Arc::new(client))
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "service account not reconciled");
            }
        })
        .await;
}

async fn reconcile(
    account: Arc<ServiceAccount>,
    client: Arc<Client>,
) -> Result<Action, ControllerError> {
    let (Some(ns), Some(name), Some(uid)) = (
        account.metadata.namespace.as_deref(),
        account.metadata.name.as_deref(),
        account.metadata.uid.as_deref(),
    ) else {
        return Ok(Action::await_change());
    };
    let failed = |what: String| move |source| ControllerError::Api { what, source };
    let namespace = Api::<Namespace>::all((*client).clone())
        .get_opt(ns)
        .await
        .map_err(failed(format!("reading Namespace {ns}")))?;
    let ns_labels = namespace
        .and_then(|n| n.metadata.labels)
        .unwrap_or_default();
    let labels = account.metadata.labels.clone().unwrap_or_default();
    let gateways =
        Api::<DynamicObject>::namespaced_with((*client).clone(), ns, &gateway_resource());
    let wanted =
        wants_waypoint(&labels, &ns_labels) && account.metadata.deletion_timestamp.is_none();
    let gateway_name = mesh_cluster::waypoint::service_account_waypoint(name);
    if wanted {
        let desired = match gateway(ns, name, uid) {
            Ok(desired) => desired,
            Err(why) => {
                warn!(account = %format_args!("{ns}/{name}"), %why, "no waypoint for the service account");
                return Ok(Action::await_change());
            }
        };
        gateways
            .patch(
                &gateway_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(failed(format!("applying Gateway {ns}/{gateway_name}")))?;
        debug!(account = %format_args!("{ns}/{name}"), "per-service-account waypoint applied");
        return Ok(Action::await_change());
    }
    let existing = gateways
        .get_opt(&gateway_name)
        .await
        .map_err(failed(format!("reading Gateway {ns}/{gateway_name}")))?;
    let ours = existing
        .and_then(|g| serde_json::to_value(g).ok())
        .is_some_and(|g| is_accounts(&g, name));
    if ours {
        info!(account = %format_args!("{ns}/{name}"), "the service account no longer asks for a waypoint; deleting it");
        gateways
            .delete(&gateway_name, &DeleteParams::default())
            .await
            .map_err(failed(format!("deleting Gateway {ns}/{gateway_name}")))?;
    }
    Ok(Action::await_change())
}

#[allow(
    clippy::needless_pass_by_value,
    reason = "the signature kube-rs' Controller calls"
)]
fn error_policy(
    account: Arc<ServiceAccount>,
    error: &ControllerError,
    _client: Arc<Client>,
) -> Action {
    warn!(
        account = %format_args!(
            "{}/{}",
            account.metadata.namespace.as_deref().unwrap_or_default(),
            account.metadata.name.as_deref().unwrap_or_default()
        ),
        error = %error,
        "per-service-account waypoint not reconciled; retrying"
    );
    Action::requeue(RETRY)
}
