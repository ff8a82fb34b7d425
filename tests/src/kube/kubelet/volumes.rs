//! The pod's volumes, prepared as host directories under the pod's directory before its
//! sandbox, and the downward API's field values (also for env). Supported: `projected`
//! (service-account token by `TokenRequest` bound to the pod, `ConfigMap`, `Secret`, downward
//! API: what the `ServiceAccount` admission plugin's `kube-api-access-*` volume uses), `configMap`,
//! `secret`, `emptyDir` and `hostPath`. Everything is read with the node's credentials, so
//! the Node authorizer allows only what this node's pods reference.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Component, Path, PathBuf},
};

use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{
            ConfigMap, KeyToPath, ObjectFieldSelector, Pod, Secret, ServiceAccount, Volume,
        },
    },
    ByteString,
};
use kube::{api::PostParams, Api, Client};

/// A prepared volume: its host directory (or file), and whether it is always read-only.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Mode of projected, `ConfigMap` and `Secret` files unless the volume says otherwise (0644).
const DEFAULT_MODE: i32 = 0o644;

/// Prepares every volume of `pod` below `dir`.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    dir: &Path,
    view: &super::NodeView,
) -> Result<BTreeMap<String, Prepared>, String> {
    let mut out = BTreeMap::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for volume in volumes.into_iter().flatten() {
        let prepared = prepare_one(client, pod, volume, &dir.join(&volume.name), view)
            .await
            .map_err(|e| format!("MountVolume.SetUp failed for volume {:?}: {e}", volume.name))?;
        out.insert(volume.name.clone(), prepared);
    }
    Ok(out)
}

async fn prepare_one(
    client: &Client,
    pod: &Pod,
    volume: &Volume,
    dir: &Path,
    view: &super::NodeView,
) -> Result<Prepared, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let read_only = |path: &Path| Prepared {
        path: path.to_path_buf(),
        read_only: true,
    };
    if let Some(host) = &volume.host_path {
        host_path_ready(&host.path, host.type_.as_deref(), view)?;
        return Ok(Prepared {
            path: PathBuf::from(&host.path),
            read_only: false,
        });
    }
    create_dir(dir)?;
    if volume.empty_dir.is_some() {
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
        return Ok(Prepared {
            path: dir.to_path_buf(),
            read_only: false,
        });
    }
    if let Some(source) = &volume.config_map {
        let mode = source.default_mode.unwrap_or(DEFAULT_MODE);
        let data = config_map(client, &namespace, &source.name, source.optional).await?;
        write_items(dir, &data, source.items.as_deref(), mode)?;
        return Ok(read_only(dir));
    }
    if let Some(source) = &volume.secret {
        let name = source.secret_name.clone().unwrap_or_default();
        let mode = source.default_mode.unwrap_or(DEFAULT_MODE);
        let data = secret(client, &namespace, &name, source.optional).await?;
        write_items(dir, &data, source.items.as_deref(), mode)?;
        return Ok(read_only(dir));
    }
    if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let jwt = token_for(
                    client,
                    pod,
                    token.audience.as_deref(),
                    token.expiration_seconds,
                )
                .await?;
                write_file(dir, &token.path, jwt.as_bytes(), mode)?;
            } else if let Some(cm) = &source.config_map {
                let data = config_map(client, &namespace, &cm.name, cm.optional).await?;
                write_items(dir, &data, cm.items.as_deref(), mode)?;
            } else if let Some(s) = &source.secret {
                let data = secret(client, &namespace, &s.name, s.optional).await?;
                write_items(dir, &data, s.items.as_deref(), mode)?;
            } else if let Some(downward) = &source.downward_api {
                for item in downward.items.iter().flatten() {
                    let field = item.field_ref.as_ref().ok_or(
                        "downward API resourceFieldRef is not supported by the testbed kubelet",
                    )?;
                    let value = field_value(pod, field, &[], &[])?;
                    write_file(dir, &item.path, value.as_bytes(), item.mode.unwrap_or(mode))?;
                }
            } else {
                return Err("projected source not supported by the testbed kubelet".into());
            }
        }
        return Ok(read_only(dir));
    }
    Err("volume type not supported by the testbed kubelet (projected, configMap, secret, emptyDir, hostPath are)".into())
}

/// The pod's service account (`default` when it names none).
pub(crate) fn service_account_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into())
}

/// A token for the pod's service account, bound to the pod (dies with it), for `audience` (or
/// the API server's own audiences), as kubelet requests it.
pub(crate) async fn token_for(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> Result<String, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let account = service_account_of(pod);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(
                audience
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .into_iter()
                    .collect(),
            ),
            expiration_seconds: Some(expiration.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for service account {namespace}/{account}: {e}"))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| "the token request's answer holds no token".into())
}

async fn config_map(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let found = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| format!("configmap {namespace}/{name}: {e}"))?;
    match found {
        Some(cm) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, ByteString(v))| (k, v)),
            );
            Ok(data)
        }
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => Err(format!("configmap {namespace}/{name} not found")),
    }
}

async fn secret(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let found = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|e| format!("secret {namespace}/{name}: {e}"))?;
    match found {
        Some(s) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, ByteString(v))| (k, v))
            .collect()),
        None if optional == Some(true) => Ok(BTreeMap::new()),
        None => Err(format!("secret {namespace}/{name} not found")),
    }
}

/// Writes the selected keys (all when `items` is `None`) as files.
fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
) -> Result<(), String> {
    match items {
        None => {
            for (key, value) in data {
                write_file(dir, key, value, mode)?;
            }
        }
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .ok_or_else(|| format!("key {:?} not found", item.key))?;
                write_file(dir, &item.path, value, item.mode.unwrap_or(mode))?;
            }
        }
    }
    Ok(())
}

fn write_file(dir: &Path, relative: &str, content: &[u8], mode: i32) -> Result<(), String> {
    let relative = Path::new(relative);
    if relative.is_absolute() || relative.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "path {} must be relative and stay inside the volume",
            relative.display()
        ));
    }
    let path = dir.join(relative);
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let mode = u32::try_from(mode).unwrap_or(0o644) & 0o777;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    file.write_all(content)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn create_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

/// A downward-API field of the pod (`fieldRef.fieldPath`), given its addresses once known.
pub fn field_value(
    pod: &Pod,
    field: &ObjectFieldSelector,
    pod_ips: &[IpAddr],
    host_ips: &[IpAddr],
) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = field.field_path.as_str();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    let join = |ips: &[IpAddr]| {
        ips.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => pod_ips.first().map(ToString::to_string).unwrap_or_default(),
        "status.podIPs" => join(pod_ips),
        "status.hostIP" => host_ips
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        "status.hostIPs" => join(host_ips),
        "metadata.labels" | "metadata.annotations" => {
            let map = if path == "metadata.labels" {
                &meta.labels
            } else {
                &meta.annotations
            };
            map.iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", serde_json::Value::from(v.as_str())))
                .collect::<Vec<_>>()
                .join("\n")
        }
        _ => keyed("metadata.labels['", meta.labels.as_ref())
            .or_else(|| keyed("metadata.annotations['", meta.annotations.as_ref()))
            .ok_or_else(|| format!("fieldRef {path} is not supported"))?,
    };
    Ok(value)
}

/// Checks (or creates) a `hostPath` as its `type` asks, in the node's own file system: `""`
/// checks nothing, `DirectoryOrCreate` creates the directory (mode 0755), `Directory`,
/// `File`, `Socket` require one.
fn host_path_ready(path: &str, kind: Option<&str>, view: &super::NodeView) -> Result<(), String> {
    let on_machine = view.to_machine(Path::new(path));
    let meta = fs::metadata(&on_machine);
    match kind.unwrap_or_default() {
        "" => Ok(()),
        "DirectoryOrCreate" => create_dir(&on_machine),
        "Directory" if meta.as_ref().is_ok_and(fs::Metadata::is_dir) => Ok(()),
        "File" if meta.as_ref().is_ok_and(fs::Metadata::is_file) => Ok(()),
        "FileOrCreate" => match meta {
            Ok(_) => Ok(()),
            Err(_) => fs::write(&on_machine, b"")
                .map_err(|e| format!("creating {}: {e}", on_machine.display())),
        },
        "Socket" if meta.is_ok() => Ok(()),
        other @ ("Directory" | "File" | "Socket") => Err(format!(
            "hostPath type check failed: {path} is not a {other}"
        )),
        other => Err(format!(
            "hostPath type {other:?} is not supported by the testbed kubelet"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn downward_fields() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "web"}},
            "spec": {"nodeName": "n0", "containers": []},
        }))
        .unwrap();
        let field = |p: &str| ObjectFieldSelector {
            field_path: p.into(),
            ..ObjectFieldSelector::default()
        };
        let ips: Vec<IpAddr> = vec!["198.19.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let value = |p: &str| field_value(&pod, &field(p), &ips, &[]).unwrap();
        assert_eq!(value("metadata.name"), "p");
        assert_eq!(value("spec.nodeName"), "n0");
        assert_eq!(value("status.podIP"), "198.19.0.2");
        assert_eq!(value("status.podIPs"), "198.19.0.2,fd00::2");
        assert_eq!(value("metadata.labels['app']"), "web");
        assert_eq!(value("metadata.labels"), "app=\"web\"");
        assert!(field_value(&pod, &field("spec.bogus"), &ips, &[]).is_err());
    }

    #[test]
    fn files_stay_inside_the_volume() {
        let dir = std::env::temp_dir().join(format!("kubelet-volume-test-{}", std::process::id()));
        assert!(write_file(&dir, "../escape", b"x", 0o644).is_err());
        assert!(write_file(&dir, "/abs", b"x", 0o644).is_err());
        write_file(&dir, "a/b", b"x", 0o600).unwrap();
        assert_eq!(fs::read(dir.join("a/b")).unwrap(), b"x");
        fs::remove_dir_all(&dir).unwrap();
    }
}
