//! What a reconcile applies for a waypoint `Gateway`: the CA's root where its pods mount it,
//! its `ServiceAccount`, role binding, `Service` and `Deployment`, and the autoscaler and
//! disruption budget its parameters ask for, each with the `Gateway`'s parameters
//! ([`crate::parameters`]) merged over it, by server-side apply (field manager
//! [`FIELD_MANAGER`]: a user's changes to other fields stay).

use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    Api, Client, Resource,
};
use tracing::info;

use crate::{
    desired::{ca_root_copy, WaypointGateway, WaypointTemplate},
    error::ControllerError,
    parameters::{Parameters, ParametersError},
    resources::FIELD_MANAGER,
};

/// What became of a `Gateway`'s objects.
pub(crate) enum Applied {
    /// Applied: the `Service`'s address, whether a pod is ready.
    Done {
        address: Option<String>,
        ready: bool,
    },
    /// Left as they are: why its parameters cannot be applied.
    Refused(String),
}

/// Applies the objects of `waypoint` (`gateway`: its `Gateway` as JSON).
pub(crate) async fn objects(
    client: &Client,
    template: &WaypointTemplate,
    waypoint: &WaypointGateway,
    gateway: &serde_json::Value,
) -> Result<Applied, ControllerError> {
    let ns = waypoint.namespace.as_str();
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let failed = |what: String| move |source| ControllerError::Api { what, source };
    // The CA's root where the waypoint's pods can mount it.
    let (root_ns, root_name) = &template.ca_root;
    if root_ns != ns {
        let roots: Api<ConfigMap> = Api::namespaced(client.clone(), root_ns);
        let root = roots
            .get_opt(root_name)
            .await
            .map_err(failed(format!("reading ConfigMap {root_ns}/{root_name}")))?
            .and_then(|cm| cm.data?.remove("root-cert.pem"))
            .ok_or_else(|| ControllerError::CaRoot(format!("{root_ns}/{root_name}")))?;
        let copy = ca_root_copy(template, ns, &root);
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch(root_name, &apply, &Patch::Apply(&copy))
            .await
            .map_err(failed(format!("applying ConfigMap {ns}/{root_name}")))?;
    }
    let name = waypoint.name.as_str();
    let parameters = match parameters(client, gateway, ns).await? {
        Ok(parameters) => parameters,
        Err(problem) => return Ok(Applied::Refused(problem.to_string())),
    };
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let account = waypoint.service_account();
    if let Err(refused) = apply_patched(
        &accounts,
        name,
        account,
        parameters.service_account.as_ref(),
    )
    .await?
    {
        return Ok(Applied::Refused(refused));
    }
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let service = match apply_patched(
        &services,
        name,
        waypoint.service(),
        parameters.service.as_ref(),
    )
    .await?
    {
        Ok(service) => service,
        Err(refused) => return Ok(Applied::Refused(refused)),
    };
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let desired = waypoint.deployment(template);
    let deployment =
        match apply_patched(&deployments, name, desired, parameters.deployment.as_ref()).await? {
            Ok(deployment) => deployment,
            Err(refused) => return Ok(Applied::Refused(refused)),
        };
    let autoscalers = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns);
    let autoscaler = (waypoint.autoscaler(), parameters.autoscaler.as_ref());
    if let Err(refused) = keep_optional(&autoscalers, waypoint, autoscaler).await? {
        return Ok(Applied::Refused(refused));
    }
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns);
    let budget = (
        waypoint.disruption_budget(),
        parameters.disruption_budget.as_ref(),
    );
    if let Err(refused) = keep_optional(&budgets, waypoint, budget).await? {
        return Ok(Applied::Refused(refused));
    }
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .is_some_and(|ready| ready > 0);
    let address = service.spec.and_then(|s| s.cluster_ip);
    Ok(Applied::Done { address, ready })
}

/// The patches of `gateway`'s (of namespace `ns`) `parametersRef`, or why they cannot be used.
async fn parameters(
    client: &Client,
    gateway: &serde_json::Value,
    ns: &str,
) -> Result<Result<Parameters, ParametersError>, ControllerError> {
    let name = match crate::parameters::reference(gateway) {
        Ok(Some(name)) => name,
        Ok(None) => return Ok(Ok(Parameters::default())),
        Err(problem) => return Ok(Err(problem)),
    };
    let config_map = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&name)
        .await
        .map_err(|source| ControllerError::Api {
            what: format!("reading ConfigMap {ns}/{name}"),
            source,
        })?;
    let at = format!("{ns}/{name}");
    Ok(match config_map {
        None => Err(ParametersError::NotFound(at)),
        Some(config_map) => crate::parameters::parse(&at, &config_map.data.unwrap_or_default()),
    })
}

/// Applies `object` (named `name`) with `patch` merged over it; `Err` (inner) when the API server
/// refuses the patched object (a value of the `ConfigMap` it does not take), with its message.
async fn apply_patched<K>(
    api: &Api<K>,
    name: &str,
    object: K,
    patch: Option<&serde_json::Value>,
) -> Result<Result<K, String>, ControllerError>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let mut value = serde_json::to_value(&object)
        .map_err(|e| ControllerError::Gateway(format!("the {kind} as JSON: {e}")))?;
    if let Some(patch) = patch {
        crate::parameters::merge(&mut value, patch);
    }
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(name, &apply, &Patch::Apply(&value)).await {
        Ok(applied) => Ok(Ok(applied)),
        Err(kube::Error::Api(e)) if patch.is_some() && matches!(e.code, 400 | 422) => {
            Ok(Err(format!(
                "the {kind} patched by the parametersRef's ConfigMap is refused: {}",
                e.message
            )))
        }
        Err(source) => Err(ControllerError::Api {
            what: format!("applying {kind} {name}"),
            source,
        }),
    }
}

/// An object `waypoint` has only when its parameters ask for it (an autoscaler, a disruption
/// budget): applied with `patch` merged over it when there is a patch; else the object of the
/// waypoint's name is deleted if its `Gateway` owns it (one of the user's own stays).
async fn keep_optional<K>(
    api: &Api<K>,
    waypoint: &WaypointGateway,
    (object, patch): (K, Option<&serde_json::Value>),
) -> Result<Result<(), String>, ControllerError>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = waypoint.name.as_str();
    if patch.is_some() {
        return Ok(apply_patched(api, name, object, patch).await?.map(drop));
    }
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let failed = |doing: &str| {
        let what = format!("{doing} {kind} {}/{name}", waypoint.namespace);
        move |source| ControllerError::Api { what, source }
    };
    let Some(current) = api.get_opt(name).await.map_err(failed("reading"))? else {
        return Ok(Ok(()));
    };
    let ours = current
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.uid == waypoint.uid);
    if ours {
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(failed("deleting"))?;
        info!(kind = %kind, name, "waypoint parameters no longer ask for it: deleted");
    }
    Ok(Ok(()))
}
