//! Objects cut down, on arrival, to the fields the model reads: every Pod of the cluster is
//! held, so what is not read is not kept.

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Node, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;

use crate::{
    locality::{REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL},
    options::{CGROUP_ANNOTATION, NETNS_ANNOTATION, SHORTCUT_ANNOTATION},
};

/// Annotations the model reads; the others (often large: `kubectl.kubernetes.io/
/// last-applied-configuration`) are dropped.
const READ_ANNOTATIONS: [&str; 3] = [NETNS_ANNOTATION, CGROUP_ANNOTATION, SHORTCUT_ANNOTATION];

/// What the waypoint controller's view gives its readers of an object of the core kind `plural`
/// (the API's JSON, a list's item or a watch event's object): a Pod cut as on arrival here
/// ([`pod`]), a Node reduced to its name and locality labels ([`node`], kept in the form asked
/// for: a full or a metadata-only object); other kinds whole. Each keeps its
/// `metadata.resourceVersion`, which a reader's watch resumes from.
///
/// # Errors
///
/// When the object does not read as its kind.
pub fn for_view(
    plural: &str,
    mut object: serde_json::Value,
) -> Result<serde_json::Value, serde_json::Error> {
    let version = object
        .pointer_mut("/metadata/resourceVersion")
        .map(serde_json::Value::take);
    let mut trimmed = match plural {
        "pods" => serde_json::to_value(pod(serde_json::from_value::<Pod>(object)?))?,
        "nodes" => {
            let (api_version, kind) = (object["apiVersion"].take(), object["kind"].take());
            let node = node(serde_json::from_value::<PartialObjectMeta<Node>>(object)?);
            let mut value = serde_json::json!({"metadata": serde_json::to_value(node.metadata)?});
            // A list's items carry no type; a metadata-only object stays one.
            for (key, type_field) in [("apiVersion", api_version), ("kind", kind)] {
                if !type_field.is_null() {
                    value[key] = type_field;
                }
            }
            value
        }
        _ => object,
    };
    if let (Some(version), Some(metadata)) = (version, trimmed.get_mut("metadata")) {
        metadata["resourceVersion"] = version;
    }
    Ok(trimmed)
}

/// `pod` with only: name, namespace, uid, labels, the annotations the model reads, creation
/// time; node, service account, host network, containers' names and ports; phase, addresses
/// and the `Ready` condition.
pub(super) fn pod(pod: Pod) -> Pod {
    let Pod {
        metadata,
        spec,
        status,
    } = pod;
    Pod {
        metadata: meta(metadata),
        spec: spec.map(|spec| PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            host_network: spec.host_network,
            containers: spec.containers.into_iter().map(container).collect(),
            ..PodSpec::default()
        }),
        status: status.map(|status| PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            conditions: status.conditions.map(|conditions| {
                conditions
                    .into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        ..PodCondition::default()
                    })
                    .collect()
            }),
            ..PodStatus::default()
        }),
    }
}

/// `node` (its metadata, as a metadata-only watch gives it) with only its name and its locality
/// labels (a node carries many others).
pub(super) fn node(node: PartialObjectMeta<Node>) -> Node {
    let labels = node.metadata.labels.map(|labels| {
        labels
            .into_iter()
            .filter(|(key, _)| LOCALITY_LABELS.contains(&key.as_str()))
            .collect()
    });
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name,
            labels,
            ..ObjectMeta::default()
        },
        ..Node::default()
    }
}

/// The node labels the model reads.
const LOCALITY_LABELS: [&str; 3] = [REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL];

/// `slice` with only: name, namespace, labels (its service), address type, ports, and of each
/// endpoint its addresses and conditions (no `targetRef`, hostname, node, zone or hints: the
/// model looks pods up by address).
pub(super) fn endpoint_slice(slice: EndpointSlice) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: slice.metadata.name,
            namespace: slice.metadata.namespace,
            labels: slice.metadata.labels,
            ..ObjectMeta::default()
        },
        address_type: slice.address_type,
        ports: slice.ports,
        endpoints: slice.endpoints.map(|endpoints| {
            endpoints
                .into_iter()
                .map(|endpoint| Endpoint {
                    addresses: endpoint.addresses,
                    conditions: endpoint.conditions.map(|c| EndpointConditions {
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                    }),
                    ..Endpoint::default()
                })
                .collect()
        }),
    }
}

fn meta(metadata: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        labels: metadata.labels,
        annotations: metadata.annotations.map(|annotations| {
            annotations
                .into_iter()
                .filter(|(key, _)| READ_ANNOTATIONS.contains(&key.as_str()))
                .collect()
        }),
        creation_timestamp: metadata.creation_timestamp,
        // A pod being deleted takes no new connections.
        deletion_timestamp: metadata.deletion_timestamp,
        ..ObjectMeta::default()
    }
}

fn container(container: Container) -> Container {
    Container {
        name: container.name,
        ports: container.ports.map(|ports| {
            ports
                .into_iter()
                .map(|port| ContainerPort {
                    name: port.name,
                    container_port: port.container_port,
                    protocol: port.protocol,
                    ..ContainerPort::default()
                })
                .collect()
        }),
        ..Container::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::k8s::PodExt;

    #[test]
    fn a_stripped_pod_reads_the_same_and_keeps_nothing_else() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u1",
                "labels": {"app": "web"},
                "annotations": {
                    "mesh.local/sockmap-shortcut": "enabled",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}"
                },
                "managedFields": [{"manager": "kubectl"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "r"}]
            },
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web", "hostNetwork": false,
                "containers": [{"name": "app", "image": "web:1", "env": [{"name": "A", "value": "b"}],
                                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}],
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "PodScheduled", "status": "True"}
                ],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "web:1", "imageID": "x"}]
            }
        });
        let full: Pod = serde_json::from_value(json).expect("a pod");
        let small = pod(full.clone());
        assert_eq!(small.service_account(), "web");
        assert_eq!(small.node_name(), Some("n1"));
        assert!(small.is_ready() && !small.host_network());
        assert_eq!(
            small.metadata.annotations,
            Some(BTreeMap::from([(
                "mesh.local/sockmap-shortcut".to_owned(),
                "enabled".to_owned()
            )]))
        );
        assert!(
            small.metadata.managed_fields.is_none() && small.metadata.owner_references.is_none()
        );
        let spec = small.spec.as_ref().expect("spec");
        assert!(spec.volumes.is_none() && spec.containers[0].image.is_none());
        assert_eq!(
            spec.containers[0].ports.as_ref().expect("ports")[0].container_port,
            8080
        );
        let status = small.status.as_ref().expect("status");
        assert!(status.container_statuses.is_none());
        assert_eq!(status.conditions.as_ref().expect("conditions").len(), 1);
        let size = |p: &Pod| serde_json::to_vec(p).expect("json").len();
        assert!(
            size(&small) * 10 < size(&full) * 6,
            "{} vs {}",
            size(&small),
            size(&full)
        );
    }

    #[test]
    fn a_node_keeps_its_name_and_locality_labels_only() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": "n1", "uid": "u1",
                "labels": {
                    "kubernetes.io/hostname": "n1",
                    "topology.kubernetes.io/region": "eu",
                    "topology.kubernetes.io/zone": "eu-a",
                    "topology.istio.io/subzone": "rack-4"
                },
                "managedFields": [{"manager": "kubelet"}]
            }
        });
        let full: PartialObjectMeta<Node> = serde_json::from_value(json).expect("a node");
        let small = node(full);
        assert_eq!(small.metadata.name.as_deref(), Some("n1"));
        let labels = small.metadata.labels.expect("labels");
        assert_eq!(
            labels.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "topology.istio.io/subzone",
                "topology.kubernetes.io/region",
                "topology.kubernetes.io/zone"
            ]
        );
        assert!(small.metadata.managed_fields.is_none() && small.status.is_none());
    }
}
