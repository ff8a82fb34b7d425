//! A waypoint `Gateway`'s own settings, as Istio's gateway customization has them: its
//! `spec.infrastructure.parametersRef` names a `ConfigMap` of its namespace whose keys patch the
//! objects the controller makes for it.
//!
//! - `deployment`: merged over its `Deployment` (resources, replicas, affinity, tolerations, node
//!   selector, pod annotations, more containers or volumes...); the waypoint's container is
//!   `waypoint`, and `istio-proxy` (what Istio's `ConfigMaps` name) means it too.
//! - `service`: merged over its `Service`; `serviceAccount` over its `ServiceAccount`.
//! - `horizontalPodAutoscaler`: a `HorizontalPodAutoscaler` (`autoscaling/v2`) of its
//!   `Deployment` is made, this merged over it (`minReplicas`, `maxReplicas`, `metrics`...);
//!   `podDisruptionBudget`: a `PodDisruptionBudget` of its pods (`minAvailable` or
//!   `maxUnavailable`). Each is owned by the `Gateway`, and deleted when its key goes.
//!
//! Each is YAML, merged by Kubernetes' strategic merge rules for the lists these objects hold
//! ([`merge`]). What makes the waypoint the waypoint is the controller's, and a `deployment`
//! patch that sets it is refused ([`protected`]): the pods' account (its identity, and the
//! role bound to it), selector and labels (which pods the model takes as the waypoint's, out of
//! the capture), the container's image, command and arguments, and the node's namespaces.
//! Else whoever may write a `Gateway` and a `ConfigMap` could run any program under the
//! waypoint's identity, which a destination trusts as having come through its waypoint. Any
//! other key is refused too, naming it: the `Gateway` is told `Accepted` `False`
//! (`InvalidParameters`, as Gateway API names a `parametersRef` that is invalid or does not
//! exist) and its objects are left as they are until the `ConfigMap` is put right. The
//! `ConfigMap` is watched: a change applies at once.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::desired::{DATAPLANE_MODE, MANAGED_BY, WAYPOINT_CONTAINER};

/// The name waypoint containers have in Istio's `ConfigMaps`.
const ISTIO_CONTAINER: &str = "istio-proxy";

/// Why a `Gateway`'s parameters cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParametersError {
    /// `parametersRef` names something other than a core `ConfigMap`.
    #[error(
        "spec.infrastructure.parametersRef: {kind} of group {group:?} is not supported (a \
         ConfigMap of the Gateway's namespace: group \"\", kind ConfigMap)"
    )]
    NotAConfigMap { group: String, kind: String },
    /// `parametersRef` has no name.
    #[error("spec.infrastructure.parametersRef: no name")]
    NoName,
    /// The `ConfigMap` does not exist.
    #[error("ConfigMap {0} (spec.infrastructure.parametersRef) does not exist")]
    NotFound(String),
    /// A key the controller does not apply.
    #[error(
        "ConfigMap {config_map}: data.{key}: not a key this mesh applies (deployment, service, \
         serviceAccount, horizontalPodAutoscaler, podDisruptionBudget)"
    )]
    UnknownKey { config_map: String, key: String },
    /// A patch sets a field the controller keeps.
    #[error(
        "ConfigMap {config_map}: data.{key}: {field} is the controller's (it makes the \
         waypoint what it is) and cannot be set"
    )]
    Protected {
        config_map: String,
        key: String,
        field: String,
    },
    /// A key's value is not a YAML mapping.
    #[error("ConfigMap {config_map}: data.{key}: {problem}")]
    NotAMapping {
        config_map: String,
        key: String,
        problem: String,
    },
}

/// The patches of one `ConfigMap`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parameters {
    /// Merged over the `Deployment`.
    pub deployment: Option<Value>,
    /// Merged over the `Service`.
    pub service: Option<Value>,
    /// Merged over the `ServiceAccount`.
    pub service_account: Option<Value>,
    /// Merged over a `HorizontalPodAutoscaler` of the `Deployment`; none: no autoscaler.
    pub autoscaler: Option<Value>,
    /// Merged over a `PodDisruptionBudget` of its pods; none: no budget.
    pub disruption_budget: Option<Value>,
}

/// The name of the `ConfigMap` `gateway`'s `spec.infrastructure.parametersRef` names, if any
/// (`gateway`: the `Gateway` as JSON, or a `DynamicObject`'s data: what holds its `spec`).
pub fn reference(gateway: &Value) -> Result<Option<String>, ParametersError> {
    let reference = &gateway["spec"]["infrastructure"]["parametersRef"];
    if reference.is_null() {
        return Ok(None);
    }
    let (group, kind) = (
        reference["group"].as_str().unwrap_or_default(),
        reference["kind"].as_str().unwrap_or_default(),
    );
    if !group.is_empty() || kind != "ConfigMap" {
        return Err(ParametersError::NotAConfigMap {
            group: group.to_owned(),
            kind: kind.to_owned(),
        });
    }
    match reference["name"].as_str() {
        Some(name) if !name.is_empty() => Ok(Some(name.to_owned())),
        _ => Err(ParametersError::NoName),
    }
}

/// Reads the data of `ConfigMap` `config_map` (`namespace/name`, for errors).
pub fn parse(
    config_map: &str,
    data: &BTreeMap<String, String>,
) -> Result<Parameters, ParametersError> {
    let mut parameters = Parameters::default();
    for (key, text) in data {
        let slot = match key.as_str() {
            "deployment" => &mut parameters.deployment,
            "service" => &mut parameters.service,
            "serviceAccount" => &mut parameters.service_account,
            "horizontalPodAutoscaler" => &mut parameters.autoscaler,
            "podDisruptionBudget" => &mut parameters.disruption_budget,
            _ => {
                return Err(ParametersError::UnknownKey {
                    config_map: config_map.to_owned(),
                    key: key.clone(),
                })
            }
        };
        let problem = |problem: String| ParametersError::NotAMapping {
            config_map: config_map.to_owned(),
            key: key.clone(),
            problem,
        };
        let mut value: Value = serde_yaml::from_str(text).map_err(|e| problem(e.to_string()))?;
        if !value.is_object() {
            return Err(problem("not a mapping of the object's fields".to_owned()));
        }
        if key == "deployment" {
            rename_istio_container(&mut value);
        }
        if let Some(field) = protected_field(key, &value) {
            return Err(ParametersError::Protected {
                config_map: config_map.to_owned(),
                key: key.clone(),
                field,
            });
        }
        *slot = Some(value);
    }
    Ok(parameters)
}

/// The fields no patch of the object of `key` may set (JSON pointers): for every object, its
/// name, namespace and owner; for the `Deployment`, also what its pods are and run as (its pod
/// labels and the waypoint container's fields are checked besides); what the `Service`, the
/// autoscaler and the budget apply to.
pub fn protected(key: &str) -> &'static [&'static str] {
    match key {
        "deployment" => &[
            "/metadata/name",
            "/metadata/namespace",
            "/metadata/ownerReferences",
            "/spec/selector",
            "/spec/template/spec/serviceAccountName",
            "/spec/template/spec/serviceAccount",
            "/spec/template/spec/hostNetwork",
            "/spec/template/spec/hostPID",
            "/spec/template/spec/hostIPC",
        ],
        "service" | "podDisruptionBudget" => &[
            "/metadata/name",
            "/metadata/namespace",
            "/metadata/ownerReferences",
            "/spec/selector",
        ],
        "horizontalPodAutoscaler" => &[
            "/metadata/name",
            "/metadata/namespace",
            "/metadata/ownerReferences",
            "/spec/scaleTargetRef",
        ],
        _ => &[
            "/metadata/name",
            "/metadata/namespace",
            "/metadata/ownerReferences",
        ],
    }
}

/// The first field of `patch` (of the object of `key`) that is the controller's, if any.
fn protected_field(key: &str, patch: &Value) -> Option<String> {
    let dotted = |pointer: &str| pointer.trim_start_matches('/').replace('/', ".");
    if let Some(pointer) = protected(key).iter().find(|p| patch.pointer(p).is_some()) {
        return Some(dotted(pointer));
    }
    if key != "deployment" {
        return None;
    }
    let deployment = patch;
    let labels = deployment.pointer("/spec/template/metadata/labels");
    let kept = [
        mesh_cluster::waypoint::GATEWAY_NAME_LABEL,
        DATAPLANE_MODE,
        MANAGED_BY.0,
    ];
    if let Some(label) = kept
        .iter()
        .find(|l| labels.and_then(|m| m.get(**l)).is_some())
    {
        return Some(format!("spec.template.metadata.labels[{label}]"));
    }
    let containers = deployment
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array);
    let waypoint = containers
        .into_iter()
        .flatten()
        .find(|c| c["name"] == WAYPOINT_CONTAINER)?;
    ["image", "command", "args"]
        .iter()
        .find(|f| waypoint.get(**f).is_some())
        .map(|f| format!("spec.template.spec.containers[{WAYPOINT_CONTAINER}].{f}"))
}

/// `istio-proxy` in a `Deployment` patch's containers is the waypoint's container.
fn rename_istio_container(deployment: &mut Value) {
    let containers = deployment
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut);
    for container in containers.into_iter().flatten() {
        if container["name"] == ISTIO_CONTAINER {
            container["name"] = Value::from(WAYPOINT_CONTAINER);
        }
    }
}

/// Merges `patch` into `base` by Kubernetes' strategic merge rules, for what a waypoint's
/// objects hold: a mapping merges key by key (`null` removes the key); a list whose items name
/// themselves by a merge key (`name` for containers, volumes, environment variables and image
/// pull secrets, `mountPath` for volume mounts, `containerPort` for a container's ports, `port`
/// for a Service's) merges item by item, items of the patch not in the list appended; any other
/// list, and any other value, is replaced.
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    base.remove(key);
                    continue;
                }
                match base.get_mut(key) {
                    Some(Value::Array(items)) if value.is_array() => {
                        merge_list(key, items, value);
                    }
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

/// Merges list `field` of `patch` into `items` (see [`merge`]).
fn merge_list(field: &str, items: &mut Vec<Value>, patch: &Value) {
    let Some(patch_items) = patch.as_array() else {
        return;
    };
    let Some(key) = merge_key(field, items) else {
        items.clone_from(patch_items);
        return;
    };
    for item in patch_items {
        match items
            .iter_mut()
            .find(|existing| item.get(key).is_some() && existing.get(key) == item.get(key))
        {
            Some(existing) => merge(existing, item),
            None => items.push(item.clone()),
        }
    }
}

/// The key a list `field` (holding `items`) merges its items by, as Kubernetes' API types
/// declare it; `None`: replaced as a whole.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" if items.iter().any(|p| p.get("containerPort").is_some()) => Some("containerPort"),
        "ports" => Some("port"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::{merge, parse, reference, ParametersError};

    #[test]
    fn only_a_configmap_of_the_gateways_namespace() {
        let with = |r| json!({"spec": {"infrastructure": {"parametersRef": r}}});
        assert_eq!(reference(&json!({"spec": {}})), Ok(None));
        assert_eq!(
            reference(&with(
                json!({"group": "", "kind": "ConfigMap", "name": "wp-options"})
            )),
            Ok(Some("wp-options".to_owned()))
        );
        assert_eq!(
            reference(&with(
                json!({"group": "example.com", "kind": "Options", "name": "x"})
            ))
            .unwrap_err()
            .to_string(),
            "spec.infrastructure.parametersRef: Options of group \"example.com\" is not \
             supported (a ConfigMap of the Gateway's namespace: group \"\", kind ConfigMap)"
        );
    }

    #[test]
    fn keys_are_read_and_others_refused_by_name() {
        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let read = parse(
            "shop/wp-options",
            &data(&[
                (
                    "deployment",
                    "spec:\n  template:\n    spec:\n      containers:\n      - name: istio-proxy\n        resources: {requests: {cpu: 250m}}\n",
                ),
                ("service", "metadata: {annotations: {a: b}}\n"),
            ]),
        )
        .expect("reads");
        assert_eq!(
            read.deployment.unwrap()["spec"]["template"]["spec"]["containers"][0]["name"],
            "waypoint",
            "Istio's container name is the waypoint's"
        );
        assert_eq!(read.service.unwrap()["metadata"]["annotations"]["a"], "b");
        let pdb = parse(
            "shop/x",
            &data(&[("podDisruptionBudget", "spec: {minAvailable: 1}")]),
        );
        assert_eq!(
            pdb.unwrap().disruption_budget,
            Some(json!({"spec": {"minAvailable": 1}}))
        );
        assert_eq!(
            parse("shop/x", &data(&[("proxyConfig", "drainDuration: 30s")])),
            Err(ParametersError::UnknownKey {
                config_map: "shop/x".into(),
                key: "proxyConfig".into()
            })
        );
        for (patch, field) in [
            (
                "spec: {template: {spec: {serviceAccountName: admin}}}",
                "spec.template.spec.serviceAccountName",
            ),
            (
                "spec: {template: {spec: {containers: [{name: istio-proxy, image: evil}]}}}",
                "spec.template.spec.containers[waypoint].image",
            ),
            (
                "spec: {template: {metadata: {labels: {istio.io/dataplane-mode: ambient}}}}",
                "spec.template.metadata.labels[istio.io/dataplane-mode]",
            ),
            ("spec: {selector: {matchLabels: {a: b}}}", "spec.selector"),
            (
                "spec: {template: {spec: {hostIPC: true}}}",
                "spec.template.spec.hostIPC",
            ),
        ] {
            assert_eq!(
                parse("shop/x", &data(&[("deployment", patch)])),
                Err(ParametersError::Protected {
                    config_map: "shop/x".into(),
                    key: "deployment".into(),
                    field: field.into()
                }),
                "{patch}"
            );
        }
        let retarget = "spec: {scaleTargetRef: {kind: Deployment, name: other}}";
        assert_eq!(
            parse("shop/x", &data(&[("horizontalPodAutoscaler", retarget)]))
                .unwrap_err()
                .to_string(),
            "ConfigMap shop/x: data.horizontalPodAutoscaler: spec.scaleTargetRef is the \
             controller's (it makes the waypoint what it is) and cannot be set"
        );
        // A sidecar of its own may set its image; pod labels of the user's are theirs.
        let own = "spec: {template: {metadata: {labels: {team: a}}, spec: {containers: \
                   [{name: helper, image: busybox}]}}}";
        assert!(parse("shop/x", &data(&[("deployment", own)])).is_ok());
        let bad = parse("shop/x", &data(&[("deployment", "- a list")])).unwrap_err();
        assert_eq!(
            bad.to_string(),
            "ConfigMap shop/x: data.deployment: not a mapping of the object's fields"
        );
        let bad = parse("shop/x", &data(&[("service", "a: [")])).unwrap_err();
        assert!(
            bad.to_string()
                .starts_with("ConfigMap shop/x: data.service: "),
            "{bad}"
        );
    }

    #[test]
    fn lists_merge_by_their_keys_and_the_rest_is_replaced() {
        let mut deployment = json!({"spec": {"template": {"spec": {
            "containers": [{
                "name": "waypoint", "image": "mesh",
                "ports": [{"name": "mesh", "containerPort": 15008}],
                "env": [{"name": "RUST_LOG", "value": "info"}],
                "volumeMounts": [{"name": "t", "mountPath": "/t"}],
            }],
            "tolerations": [{"key": "a"}],
            "nodeSelector": {"zone": "a"},
        }}}});
        merge(
            &mut deployment,
            &json!({"spec": {"replicas": 2, "template": {"spec": {
                "containers": [
                    {"name": "waypoint",
                     "resources": {"requests": {"cpu": "250m"}},
                     "env": [{"name": "RUST_LOG", "value": "debug"}, {"name": "X", "value": "1"}],
                     "ports": [{"containerPort": 9090, "name": "extra"}]},
                    {"name": "sidecar", "image": "busybox"},
                ],
                "tolerations": [{"key": "b"}],
                "nodeSelector": null,
            }}}}),
        );
        let pod = &deployment["spec"]["template"]["spec"];
        let waypoint = &pod["containers"][0];
        assert_eq!(deployment["spec"]["replicas"], 2);
        assert_eq!(waypoint["image"], "mesh", "kept");
        assert_eq!(waypoint["resources"]["requests"]["cpu"], "250m");
        assert_eq!(
            waypoint["env"],
            json!([{"name": "RUST_LOG", "value": "debug"}, {"name": "X", "value": "1"}])
        );
        assert_eq!(waypoint["ports"].as_array().unwrap().len(), 2);
        assert_eq!(waypoint["volumeMounts"].as_array().unwrap().len(), 1);
        assert_eq!(pod["containers"][1]["name"], "sidecar", "appended");
        assert_eq!(pod["tolerations"], json!([{"key": "b"}]), "replaced");
        assert!(pod.get("nodeSelector").is_none(), "removed by null");

        let mut service = json!({"spec": {"ports": [
            {"name": "mesh", "port": 15008}, {"name": "status-port", "port": 15021}]}});
        merge(
            &mut service,
            &json!({"spec": {"type": "ClusterIP", "ports": [{"port": 15008, "appProtocol": "hbone"}]}}),
        );
        assert_eq!(service["spec"]["ports"][0]["appProtocol"], "hbone");
        assert_eq!(service["spec"]["ports"].as_array().unwrap().len(), 2);
    }
}
