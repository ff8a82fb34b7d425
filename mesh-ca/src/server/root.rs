//! The CA's root, kept in a Secret, and the trust bundle, published in a `ConfigMap`.
//!
//! At start the Secret is read: present, its root is written into the state directory (the key
//! with mode 0600) and loaded; absent, a new root is made there and the Secret created, and a
//! replica that loses that race (409) loads the winner's. The root key is never logged.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use mesh_identity::builtin_ca::{ROOT_CERT_FILE, ROOT_KEY_FILE};
use mesh_identity::{BuiltinCa, BuiltinCaOptions};
use tracing::info;

use super::config::{CaServerConfig, ROOT_CERT_KEY, ROOT_KEY_KEY};
use super::ServerError;

/// Labels of the objects the CA creates.
fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "mesh-ca".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "ca".to_owned()),
    ])
}

/// The root's options: certificates last `max_cert_lifetime` at most, and by default.
fn options(config: &CaServerConfig) -> BuiltinCaOptions {
    BuiltinCaOptions {
        default_lifetime: config.max_cert_lifetime,
        max_lifetime: config.max_cert_lifetime,
        ..BuiltinCaOptions::default()
    }
}

/// The CA with the root of the Secret, made (and stored) if there is none yet.
pub(super) async fn load(
    client: &Client,
    config: &CaServerConfig,
) -> Result<BuiltinCa, ServerError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let name = &config.root_secret;
    let secret_ref = format!("{}/{name}", config.namespace);
    let dir = config.state_dir.join("root");
    let read_error = |source| ServerError::ReadSecret {
        secret: secret_ref.clone(),
        source,
    };
    if let Some(secret) = secrets.get_opt(name).await.map_err(read_error)? {
        let ca = from_secret(&secret, &secret_ref, &dir, config)?;
        info!(secret = %secret_ref, "loaded the CA's root from its Secret");
        return Ok(ca);
    }
    clear(&dir)?;
    let ca = BuiltinCa::load_or_create(&dir, &config.trust_domain, options(config)).map_err(
        |source| ServerError::Root {
            origin: "a new root".to_owned(),
            source: Box::new(source),
        },
    )?;
    let file = |path: &Path| {
        fs::read(path).map_err(|source| ServerError::StateDir {
            path: path.to_owned(),
            source,
        })
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (
                ROOT_CERT_KEY.to_owned(),
                ByteString(file(ca.root_cert_path())?),
            ),
            (
                ROOT_KEY_KEY.to_owned(),
                ByteString(file(ca.root_key_path())?),
            ),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %secret_ref, "created a new root for the CA and stored it in its Secret");
            Ok(ca)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            drop(ca);
            let winner = secrets.get(name).await.map_err(read_error)?;
            let ca = from_secret(&winner, &secret_ref, &dir, config)?;
            info!(secret = %secret_ref, "another replica stored its root first; using that one");
            Ok(ca)
        }
        Err(source) => Err(ServerError::CreateSecret {
            secret: secret_ref,
            source,
        }),
    }
}

/// Writes the Secret's root into `dir` (replacing what was there) and loads it.
fn from_secret(
    secret: &Secret,
    secret_ref: &str,
    dir: &Path,
    config: &CaServerConfig,
) -> Result<BuiltinCa, ServerError> {
    let data = secret.data.clone().unwrap_or_default();
    let value = |key: &'static str| {
        data.get(key)
            .filter(|v| !v.0.is_empty())
            .map(|v| v.0.clone())
            .ok_or_else(|| ServerError::SecretIncomplete {
                secret: secret_ref.to_owned(),
                key,
            })
    };
    let (cert, key) = (value(ROOT_CERT_KEY)?, value(ROOT_KEY_KEY)?);
    clear(dir)?;
    write_new(&dir.join(ROOT_KEY_FILE), &key, 0o600)?;
    write_new(&dir.join(ROOT_CERT_FILE), &cert, 0o644)?;
    BuiltinCa::load_or_create(dir, &config.trust_domain, options(config)).map_err(|source| {
        ServerError::Root {
            origin: format!("Secret {secret_ref}"),
            source: Box::new(source),
        }
    })
}

/// Creates `dir` (mode 0700) if needed and removes the root files in it.
fn clear(dir: &Path) -> Result<(), ServerError> {
    let failed = |path: &Path| {
        let path = path.to_owned();
        move |source| ServerError::StateDir { path, source }
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(failed(dir))?;
    for file in [ROOT_CERT_FILE, ROOT_KEY_FILE] {
        let path = dir.join(file);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(failed(&path)(e)),
        }
    }
    Ok(())
}

/// Writes a new file with `mode` from its creation on.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), ServerError> {
    let failed = |source| ServerError::StateDir {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(failed)
}

/// Creates or updates the `ConfigMap` of the trust bundle (`root-cert.pem`), unless it already
/// holds `root_pem`.
pub(super) async fn publish_bundle(
    client: &Client,
    config: &CaServerConfig,
    root_pem: &str,
) -> Result<(), ServerError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &config.namespace);
    let name = &config.bundle_configmap;
    let configmap_ref = format!("{}/{name}", config.namespace);
    let failed = |source| ServerError::WriteConfigMap {
        configmap: configmap_ref.clone(),
        source,
    };
    // Another replica may write it at the same time: a conflict means reading it again.
    for _ in 0..5 {
        let written = match api.get_opt(name).await.map_err(failed)? {
            None => {
                let configmap = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(config.namespace.clone()),
                        labels: Some(labels()),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(
                        ROOT_CERT_KEY.to_owned(),
                        root_pem.to_owned(),
                    )])),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &configmap).await
            }
            Some(current)
                if current
                    .data
                    .as_ref()
                    .and_then(|d| d.get(ROOT_CERT_KEY))
                    .is_some_and(|pem| pem == root_pem) =>
            {
                info!(configmap = %configmap_ref, "the trust bundle is published");
                return Ok(());
            }
            Some(mut current) => {
                current
                    .data
                    .get_or_insert_with(BTreeMap::new)
                    .insert(ROOT_CERT_KEY.to_owned(), root_pem.to_owned());
                api.replace(name, &PostParams::default(), &current).await
            }
        };
        match written {
            Ok(_) => {
                info!(configmap = %configmap_ref, "published the trust bundle");
                return Ok(());
            }
            // Changed meanwhile: read it again.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(source) => return Err(failed(source)),
        }
    }
    Err(ServerError::ConfigMapContended {
        configmap: configmap_ref,
    })
}
