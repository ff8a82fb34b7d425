//! The upstream CRDs the mesh reads, installed as their projects ship them: Istio's (all of
//! `istio.io/api`'s `kubernetes/customresourcedefinitions.gen.yaml`, with `security.istio.io`'s
//! `AuthorizationPolicy` and `PeerAuthentication`) and the Gateway API's standard channel (every
//! file of `sigs.k8s.io/gateway-api`'s `config/crd/standard`, with its upgrade-guard
//! `ValidatingAdmissionPolicy`). The files come from the Go module cache at the versions that
//! `tests/kube/go.mod` pins, found with `go list -m -json`; never from copies kept here.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    api::{DynamicObject, Patch, PatchParams},
    core::GroupVersionKind,
    discovery, Api, Client,
};
use serde::Deserialize as _;

use super::{Error, Result};
use crate::process::run;

/// Field manager of everything the harness applies.
pub const FIELD_MANAGER: &str = "mesh-tests";
/// The Go modules that carry the CRDs, with where in each module the manifests are.
const SOURCES: &[(&str, &str)] = &[
    (
        "istio.io/api",
        "kubernetes/customresourcedefinitions.gen.yaml",
    ),
    ("sigs.k8s.io/gateway-api", "config/crd/standard"),
];

/// The manifest files, in apply order: Istio's, then the Gateway API's by file name (its
/// `ValidatingAdmissionPolicy` file sorts after the CRDs it guards).
pub fn manifest_files(go_module: &Path) -> Result<Vec<PathBuf>> {
    let mut command = Command::new("go");
    command
        .current_dir(go_module)
        .args(["list", "-m", "-json"])
        .args(SOURCES.iter().map(|(module, _)| module));
    let out = run(&mut command).map_err(|e| {
        Error::Setup(format!(
            "cannot locate the CRD modules with `go list -m -json` in {} ({e}); \
             run `cargo xtask setup`",
            go_module.display()
        ))
    })?;
    let mut files = Vec::new();
    for module in serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>() {
        let module = module.map_err(|e| Error::Invalid {
            what: "`go list -m -json` output".into(),
            detail: e.to_string(),
        })?;
        let path = module["Path"].as_str().unwrap_or_default();
        let version = module["Version"].as_str().unwrap_or_default();
        let Some(dir) = module["Dir"].as_str() else {
            return Err(Error::Setup(format!(
                "Go module {path}@{version} is not in the module cache; run `cargo xtask setup` \
                 (it runs `go mod download` in {})",
                go_module.display()
            )));
        };
        let Some((_, within)) = SOURCES.iter().find(|(m, _)| *m == path) else {
            continue;
        };
        let location = Path::new(dir).join(within);
        if location.is_file() {
            files.push(location);
            continue;
        }
        let entries = std::fs::read_dir(&location)
            .map_err(crate::io_err(format!("listing {}", location.display())))?;
        let mut yaml: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        yaml.sort();
        files.extend(yaml);
    }
    if files.is_empty() {
        return Err(Error::Setup(format!(
            "no CRD manifests found through `go list -m -json` in {}",
            go_module.display()
        )));
    }
    Ok(files)
}

/// Applies every object of `files` (server-side apply, forced) and returns the names of the
/// CRDs among them.
pub async fn apply(client: &Client, files: &[PathBuf]) -> Result<Vec<String>> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut crds = Vec::new();
    for (file, object) in documents(files)? {
        let (gvk, name) = identify(&object).ok_or_else(|| Error::Invalid {
            what: format!("an object of {}", file.display()),
            detail: "no apiVersion, kind or metadata.name".into(),
        })?;
        let what = || format!("applying {} {name} from {}", gvk.kind, file.display());
        let api_err = |source| Error::Api {
            what: what(),
            source,
        };
        if gvk.group == "apiextensions.k8s.io" && gvk.kind == "CustomResourceDefinition" {
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            api.patch(&name, &params, &Patch::Apply(&object))
                .await
                .map_err(api_err)?;
            crds.push(name);
            continue;
        }
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .map_err(api_err)?;
        if caps.scope == discovery::Scope::Namespaced {
            return Err(Error::Invalid {
                what: what(),
                detail: "a namespaced object among the CRD manifests".into(),
            });
        }
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(api_err)?;
    }
    Ok(crds)
}

/// Every non-empty YAML document of `files`, with the file it came from.
fn documents(files: &[PathBuf]) -> Result<Vec<(&Path, serde_json::Value)>> {
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(crate::io_err(format!("reading {}", file.display())))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = serde_json::Value::deserialize(document).map_err(|e| Error::Invalid {
                what: format!("a YAML document of {}", file.display()),
                detail: e.to_string(),
            })?;
            if !object.is_null() {
                objects.push((file.as_path(), object));
            }
        }
    }
    Ok(objects)
}

/// Waits until every CRD in `names` has the `Established` condition (its API is served).
pub async fn wait_established(client: &Client, names: &[String], timeout: Duration) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    for name in names {
        loop {
            let crd = api.get(name).await.map_err(|e| Error::Api {
                what: format!("reading CRD {name}"),
                source: e,
            })?;
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("CRD {name} to be Established"),
                    after: timeout,
                    detail: format!("its status: {:?}", crd.status),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The group/version/kind and name of an object.
fn identify(object: &serde_json::Value) -> Option<(GroupVersionKind, String)> {
    let api_version = object["apiVersion"].as_str()?;
    let kind = object["kind"].as_str()?;
    let name = object["metadata"]["name"].as_str()?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    Some((GroupVersionKind::gvk(group, version, kind), name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_identified_by_group_version_kind_and_name() {
        let crd = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "httproutes.gateway.networking.k8s.io"},
        });
        let (gvk, name) = identify(&crd).unwrap();
        assert_eq!(
            (gvk.group.as_str(), gvk.version.as_str()),
            ("apiextensions.k8s.io", "v1")
        );
        assert_eq!(name, "httproutes.gateway.networking.k8s.io");
        let core =
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}});
        assert_eq!(identify(&core).unwrap().0.group, "");
        assert!(identify(&serde_json::json!({"kind": "X"})).is_none());
    }
}
