//! What a waypoint `Gateway` becomes: the objects the controller applies for it, as pure
//! functions of the `Gateway` and the controller's configuration (unit-tested here; applied by
//! `reconcile.rs`).
//!
//! - `ServiceAccount` `<gateway>`: the waypoint's own identity
//!   (`spiffe://<td>/ns/<ns>/sa/<gateway>`); the model takes only pods under it as the
//!   waypoint's.
//! - `Deployment` `<gateway>`: pods labelled `gateway.networking.k8s.io/gateway-name=<gateway>`
//!   and `istio.io/dataplane-mode=none` (they speak HBONE themselves), running
//!   `mesh-agent waypoint` with their certificate from the mesh's CA (a projected token of the
//!   CA's audience, the CA's root from a `ConfigMap`), reading the cluster through the
//!   controller's view (`view.rs`) with the same token, ready when `/healthz/ready` (15021) is.
//! - `Service` `<gateway>`: 15008 (HBONE) and 15021, the Gateway's address.
//! - The CA's root `ConfigMap`, copied into the Gateway's namespace (a pod mounts only its own
//!   namespace's).
//!
//! The waypoint's account is bound to no role: any pod of its namespace may run under it, so
//! what it may read, its namespace may. The objects are owned by the `Gateway` (deleted with it
//! by the garbage collector).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        autoscaling::v2::HorizontalPodAutoscaler,
        core::v1::{Service, ServiceAccount},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use mesh_cluster::{
    meta::{Kind, ObjectRef},
    waypoint::{waypoint_traffic, GATEWAY_NAME_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR},
};
use serde_json::{json, Value};

/// The label on everything the controller makes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "mesh-waypoint-controller");
/// Istio's enrolment label: `none` keeps the waypoint's pods out of the node agent's capture.
pub(crate) const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The waypoint's container in its `Deployment` (Istio's `ConfigMaps` name it `istio-proxy`).
pub(crate) const WAYPOINT_CONTAINER: &str = "waypoint";
/// Where the waypoint container finds the CA's root and its token.
const CA_ROOT_DIR: &str = "/var/run/secrets/mesh-ca";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";

/// How the controller makes waypoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointTemplate {
    /// The image holding `mesh-agent` (the mesh's own).
    pub image: String,
    /// `IfNotPresent`, `Always`, `Never`.
    pub pull_policy: String,
    /// The mesh's CA (`https://<host>:<port>`).
    pub ca_address: String,
    /// The `ConfigMap` (`namespace`, `name`) holding the CA's root (`root-cert.pem`).
    pub ca_root: (String, String),
    /// The audience of the token sent to the CA.
    pub ca_audience: String,
    /// The controller's view (`https://<host>:<port>`), where waypoints read the cluster.
    pub view_address: String,
    /// The view's SPIFFE id, which the waypoints expect of its certificate.
    pub view_identity: mesh_identity::Identity,
    /// SPIFFE trust domain and cluster DNS domain.
    pub trust_domain: String,
    pub cluster_domain: String,
    /// `RUST_LOG` of the waypoints.
    pub log_level: String,
    /// Extra arguments of every waypoint (`--tracing-endpoint=…`).
    pub extra_args: Vec<String>,
    /// The waypoint container's `resources` (requests and limits, Kubernetes quantities).
    pub resources: WaypointResources,
}

/// A waypoint container's resources. A waypoint holds the cluster view (about 28 kB a pod,
/// BENCHMARKS.md, "The waypoint controller's view") besides its connections: without a request
/// it would be the first pod a node under memory pressure evicts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl WaypointResources {
    /// Checks each value is a Kubernetes quantity, naming the first that is not.
    pub fn validate(&self) -> Result<(), String> {
        for (what, value) in [
            ("cpu request", &self.cpu_request),
            ("memory request", &self.memory_request),
            ("memory limit", &self.memory_limit),
        ] {
            if !is_quantity(value) {
                return Err(format!(
                    "the waypoints' {what} {value:?} is not a Kubernetes quantity (such as 100m, \
                     128Mi, 1Gi)"
                ));
            }
        }
        Ok(())
    }
}

/// Whether `value` is a Kubernetes quantity of the forms used for CPU and memory: a decimal
/// number with an optional binary (`Ki`..`Ei`) or decimal (`m`, `k`..`E`) suffix.
fn is_quantity(value: &str) -> bool {
    const SUFFIXES: [&str; 13] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|s| value.strip_suffix(s))
        .unwrap_or(value);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    !whole.is_empty()
        && !fraction.is_empty()
        && whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
}

/// Why a `Gateway` is not turned into a waypoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAWaypoint {
    /// Another class: another controller's.
    #[error("class {0:?} is not {WAYPOINT_CLASS}")]
    OtherClass(String),
    /// Without namespace, name or uid (not an object read from the API).
    #[error("the Gateway has no {0}")]
    Incomplete(&'static str),
}

/// A waypoint `Gateway` as the controller needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointGateway {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.infrastructure.labels` and `.annotations`: Gateway API asks that they be put on
    /// every object made for the `Gateway` (the controller's own labels win over them).
    pub infrastructure: (BTreeMap<String, String>, BTreeMap<String, String>),
    /// Why the mesh's model refuses this version of the `Gateway` (its `istio.io/waypoint-for`
    /// label), if it does: the agents keep its last good version, if any. Its waypoint still
    /// runs (for that version), and its status says `Accepted` `False`.
    pub invalid: Option<String>,
}

impl WaypointGateway {
    /// Reads `gateway` (a `gateway.networking.k8s.io` `Gateway` as JSON); refuses other classes.
    pub fn of(gateway: &Value) -> Result<Self, NotAWaypoint> {
        let class = gateway["spec"]["gatewayClassName"]
            .as_str()
            .unwrap_or_default();
        if class != WAYPOINT_CLASS {
            return Err(NotAWaypoint::OtherClass(class.to_owned()));
        }
        let field = |name: &'static str| {
            gateway["metadata"][name]
                .as_str()
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or(NotAWaypoint::Incomplete(name))
        };
        let strings = |map: &Value| -> BTreeMap<String, String> {
            map.as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let infrastructure = &gateway["spec"]["infrastructure"];
        let (namespace, name) = (field("namespace")?, field("name")?);
        let object = ObjectRef {
            kind: Kind::Gateway,
            namespace: Some(namespace.clone()),
            name: name.clone(),
        };
        let traffic = waypoint_traffic(
            &object,
            gateway["metadata"]["labels"][WAYPOINT_FOR].as_str(),
        );
        Ok(Self {
            invalid: traffic.err().map(|e| e.to_string()),
            namespace,
            name,
            uid: field("uid")?,
            infrastructure: (
                strings(&infrastructure["labels"]),
                strings(&infrastructure["annotations"]),
            ),
        })
    }

    /// The owner reference its namespaced objects carry.
    fn owner(&self) -> OwnerReference {
        OwnerReference {
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    /// Its objects' labels: the `Gateway`'s infrastructure labels, then the controller's.
    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.infrastructure.0.clone();
        labels.extend([
            (GATEWAY_NAME_LABEL.to_owned(), self.name.clone()),
            (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        ]);
        labels
    }

    fn metadata(&self) -> Value {
        json!({
            "name": self.name,
            "namespace": self.namespace,
            "labels": self.labels(),
            "annotations": self.infrastructure.1,
            "ownerReferences": [self.owner()],
        })
    }

    /// Its `ServiceAccount`.
    pub fn service_account(&self) -> ServiceAccount {
        from_json(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": self.metadata(),
        }))
    }

    /// Its `Service`: HBONE and the readiness port, on its pods.
    pub fn service(&self) -> Service {
        from_json(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": self.metadata(),
            "spec": {
                "selector": {GATEWAY_NAME_LABEL: self.name},
                "ports": [
                    {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"},
                    {"name": "status-port", "port": 15021, "targetPort": 15021,
                     "protocol": "TCP"},
                ],
            },
        }))
    }

    /// A `HorizontalPodAutoscaler` of its `Deployment`, for its parameters to complete
    /// (`maxReplicas` at least: [`crate::parameters`]).
    pub fn autoscaler(&self) -> HorizontalPodAutoscaler {
        from_json(json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": self.metadata(),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                   "name": self.name},
                "maxReplicas": 1,
            },
        }))
    }

    /// A `PodDisruptionBudget` of its pods, for its parameters to complete (`minAvailable` or
    /// `maxUnavailable`).
    pub fn disruption_budget(&self) -> PodDisruptionBudget {
        from_json(json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": self.metadata(),
            "spec": {"selector": {"matchLabels": {GATEWAY_NAME_LABEL: self.name}}},
        }))
    }

    /// Its `Deployment`, without `replicas`: one pod when created (Kubernetes' default), then
    /// as many as its users or an autoscaler set (`kubectl scale`, a `HorizontalPodAutoscaler`):
    /// the controller's server-side apply does not own the field, so it never scales them
    /// back. Its rolling update starts a new pod before the old one goes (one replica: `maxSurge`
    /// 25 % rounds up to one, `maxUnavailable` down to none).
    pub fn deployment(&self, template: &WaypointTemplate) -> Deployment {
        let mut args = vec![
            format!("--namespace={}", self.namespace),
            format!("--name={}", self.name),
            format!("--trust-domain={}", template.trust_domain),
            format!("--cluster-domain={}", template.cluster_domain),
            format!("--ca-address={}", template.ca_address),
            format!("--ca-root-cert={CA_ROOT_DIR}/root-cert.pem"),
            format!("--ca-token-file={TOKEN_DIR}/istio-token"),
            format!("--view-address={}", template.view_address),
            format!("--view-identity={}", template.view_identity),
        ];
        args.extend(template.extra_args.iter().cloned());
        // The infrastructure labels first: never the controller's (a pod labelled into the
        // capture, or as another waypoint's, is not this waypoint).
        let mut pod_labels = self.labels();
        pod_labels.insert(DATAPLANE_MODE.to_owned(), "none".to_owned());
        from_json(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": self.metadata(),
            "spec": {
                "selector": {"matchLabels": {GATEWAY_NAME_LABEL: self.name}},
                "template": {
                    "metadata": {"labels": pod_labels, "annotations": self.infrastructure.1},
                    "spec": {
                        "serviceAccountName": self.name,
                        // The drain (5 s by default) fits well inside.
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{
                            "name": WAYPOINT_CONTAINER,
                            "image": template.image,
                            "imagePullPolicy": template.pull_policy,
                            "command": ["mesh-waypoint"],
                            "args": args,
                            "env": [{"name": "RUST_LOG", "value": template.log_level}],
                            "ports": [
                                {"name": "mesh", "containerPort": 15008},
                                {"name": "metrics", "containerPort": 15020},
                                {"name": "status-port", "containerPort": 15021},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz/ready", "port": 15021},
                                "periodSeconds": 2,
                            },
                            "resources": {
                                "requests": {
                                    "cpu": template.resources.cpu_request,
                                    "memory": template.resources.memory_request,
                                },
                                "limits": {"memory": template.resources.memory_limit},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "runAsNonRoot": true,
                                "runAsUser": 1337,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "istio-token", "mountPath": TOKEN_DIR,
                                 "readOnly": true},
                                {"name": "ca-root", "mountPath": CA_ROOT_DIR, "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "istio-token", "projected": {"sources": [
                                {"serviceAccountToken": {"audience": template.ca_audience,
                                 "expirationSeconds": 43200, "path": "istio-token"}},
                            ]}},
                            {"name": "ca-root", "configMap": {"name": template.ca_root.1}},
                        ],
                    },
                },
            },
        }))
    }
}

/// The CA's root `ConfigMap` copied into `namespace` (only its `root-cert.pem`).
pub fn ca_root_copy(
    template: &WaypointTemplate,
    namespace: &str,
    root_pem: &str,
) -> k8s_openapi::api::core::v1::ConfigMap {
    from_json(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": template.ca_root.1, "namespace": namespace,
                     "labels": {MANAGED_BY.0: MANAGED_BY.1}},
        "data": {"root-cert.pem": root_pem},
    }))
}

/// Builds a typed object from JSON written in this module (its shape is fixed here; a failure
/// is a bug, caught by the unit tests).
fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("the object written here has the type's shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> WaypointTemplate {
        WaypointTemplate {
            image: "mesh-agent:0.1.0".into(),
            pull_policy: "IfNotPresent".into(),
            ca_address: "https://mesh-ca.mesh-system.svc:15012".into(),
            ca_root: ("mesh-system".into(), "mesh-ca-root-cert".into()),
            ca_audience: "istio-ca".into(),
            view_address: "https://mesh-waypoint-controller.mesh-system.svc:15012".into(),
            view_identity: mesh_identity::Identity::new(
                "cluster.local",
                "mesh-system",
                "mesh-waypoint-controller",
            )
            .unwrap(),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            log_level: "info".into(),
            extra_args: vec!["--tracing-endpoint=http://jaeger:4317".into()],
            resources: WaypointResources {
                cpu_request: "100m".into(),
                memory_request: "128Mi".into(),
                memory_limit: "1Gi".into(),
            },
        }
    }

    #[test]
    fn waypoint_resources_are_kubernetes_quantities() {
        for good in ["100m", "1", "0.5", "128Mi", "1Gi", "2G", "1.5Gi"] {
            assert!(is_quantity(good), "{good}");
        }
        for bad in ["", "Mi", "1.", ".5", "12MB", "1 Gi", "-1", "1e3", "lots"] {
            assert!(!is_quantity(bad), "{bad}");
        }
        let mut resources = template().resources;
        assert_eq!(resources.validate(), Ok(()));
        resources.memory_limit = "1GB".into();
        assert_eq!(
            resources.validate(),
            Err(
                "the waypoints' memory limit \"1GB\" is not a Kubernetes quantity (such as \
                 100m, 128Mi, 1Gi)"
                    .to_owned()
            )
        );
    }

    fn gateway(class: &str) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "reviews-wp", "namespace": "shop", "uid": "u-1"},
            "spec": {"gatewayClassName": class,
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        })
    }

    #[test]
    fn a_waypoint_for_label_the_model_refuses_is_named() {
        let wp = WaypointGateway::of(&gateway(WAYPOINT_CLASS)).unwrap();
        assert_eq!(wp.invalid, None, "no label: service");
        let mut labelled = gateway(WAYPOINT_CLASS);
        labelled["metadata"]["labels"] = json!({"istio.io/waypoint-for": "all"});
        assert_eq!(WaypointGateway::of(&labelled).unwrap().invalid, None);
        labelled["metadata"]["labels"] = json!({"istio.io/waypoint-for": "everything"});
        assert_eq!(
            WaypointGateway::of(&labelled).unwrap().invalid.as_deref(),
            Some(
                "Gateway shop/reviews-wp: metadata.labels[istio.io/waypoint-for]: \"everything\" \
                 is not service, workload, all or none"
            )
        );
    }

    #[test]
    fn only_waypoint_gateways() {
        assert_eq!(
            WaypointGateway::of(&gateway("istio")),
            Err(NotAWaypoint::OtherClass("istio".into()))
        );
        let mut no_uid = gateway(WAYPOINT_CLASS);
        no_uid["metadata"].as_object_mut().unwrap().remove("uid");
        assert_eq!(
            WaypointGateway::of(&no_uid),
            Err(NotAWaypoint::Incomplete("uid"))
        );
        let wp = WaypointGateway::of(&gateway(WAYPOINT_CLASS)).unwrap();
        assert_eq!(
            (wp.namespace.as_str(), wp.name.as_str()),
            ("shop", "reviews-wp")
        );
    }

    #[test]
    fn the_deployment_runs_the_waypoint_under_its_own_account_outside_the_capture() {
        let wp = WaypointGateway::of(&gateway(WAYPOINT_CLASS)).unwrap();
        let deployment = serde_json::to_value(wp.deployment(&template())).unwrap();
        let pod = &deployment["spec"]["template"];
        assert_eq!(pod["spec"]["serviceAccountName"], "reviews-wp");
        assert_eq!(pod["metadata"]["labels"][GATEWAY_NAME_LABEL], "reviews-wp");
        assert_eq!(pod["metadata"]["labels"][DATAPLANE_MODE], "none");
        assert_eq!(
            deployment["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL],
            "reviews-wp"
        );
        let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(pod["spec"]["containers"][0]["command"][0], "mesh-waypoint");
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}})
        );
        // The replicas are its users' (or an autoscaler's): never applied, never scaled back.
        assert!(deployment["spec"].get("replicas").is_none(), "{deployment}");
        for expected in [
            "--namespace=shop",
            "--name=reviews-wp",
            "--ca-address=https://mesh-ca.mesh-system.svc:15012",
            "--view-address=https://mesh-waypoint-controller.mesh-system.svc:15012",
            "--view-identity=spiffe://cluster.local/ns/mesh-system/sa/mesh-waypoint-controller",
            "--tracing-endpoint=http://jaeger:4317",
        ] {
            assert!(args.contains(&expected), "{expected} in {args:?}");
        }
        assert_eq!(
            pod["spec"]["volumes"][1]["configMap"]["name"],
            "mesh-ca-root-cert"
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "istio-ca"
        );
        let owner = &deployment["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["uid"].as_str()),
            (Some("Gateway"), Some("u-1"))
        );
    }

    #[test]
    fn account_and_service() {
        let wp = WaypointGateway::of(&gateway(WAYPOINT_CLASS)).unwrap();
        let sa = serde_json::to_value(wp.service_account()).unwrap();
        assert_eq!(sa["metadata"]["name"], "reviews-wp");
        assert_eq!(sa["kind"], "ServiceAccount");
        let svc = serde_json::to_value(wp.service()).unwrap();
        assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
        assert_eq!(svc["spec"]["selector"][GATEWAY_NAME_LABEL], "reviews-wp");
        let cm = serde_json::to_value(ca_root_copy(&template(), "shop", "PEM")).unwrap();
        assert_eq!(cm["metadata"]["namespace"], "shop");
        assert_eq!(cm["data"]["root-cert.pem"], "PEM");
    }

    #[test]
    fn the_gateways_infrastructure_labels_and_annotations_go_on_what_is_made() {
        let mut gw = gateway(WAYPOINT_CLASS);
        gw["spec"]["infrastructure"] = json!({
            "labels": {
                "team": "shop",
                // Neither into the capture, nor another waypoint's.
                "istio.io/dataplane-mode": "ambient",
                GATEWAY_NAME_LABEL: "other",
            },
            "annotations": {"example.com/owner": "shop-team"},
        });
        let wp = WaypointGateway::of(&gw).unwrap();
        let deployment = serde_json::to_value(wp.deployment(&template())).unwrap();
        let service = serde_json::to_value(wp.service()).unwrap();
        let account = serde_json::to_value(wp.service_account()).unwrap();
        let pod = &deployment["spec"]["template"]["metadata"];
        for meta in [
            &deployment["metadata"],
            &service["metadata"],
            &account["metadata"],
            pod,
        ] {
            assert_eq!(meta["labels"]["team"], "shop", "{meta}");
            assert_eq!(meta["labels"][GATEWAY_NAME_LABEL], "reviews-wp", "{meta}");
            assert_eq!(
                meta["annotations"]["example.com/owner"], "shop-team",
                "{meta}"
            );
        }
        assert_eq!(pod["labels"][DATAPLANE_MODE], "none");
    }
}
