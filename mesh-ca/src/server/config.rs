//! The CA server's settings (`mesh-agent ca`), parsed once, validated (each error names its
//! flag) and logged at start on one line.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_identity::spiffe::validate_trust_domain;

use super::authorize::ServiceAccountRef;

/// Default `--listen`: Istio's CA port, on every address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:15012";
/// Default `--service-name`: the Service in front of the CA (its certificate's names).
pub const DEFAULT_SERVICE_NAME: &str = "mesh-ca";
/// Default `--root-secret`.
pub const DEFAULT_ROOT_SECRET: &str = "mesh-ca-root";
/// Default `--bundle-configmap`.
pub const DEFAULT_BUNDLE_CONFIGMAP: &str = "mesh-ca-root-cert";
/// Default `--audience`: what Istio's agents ask their tokens for.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// Default `--max-cert-lifetime`, as text.
pub const DEFAULT_MAX_CERT_LIFETIME: &str = "24h";
/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/run/mesh-ca";
/// The `ServiceAccount` allowed to impersonate when no `--impersonator` is given:
/// `<namespace>/mesh-agent`.
pub const DEFAULT_IMPERSONATOR_ACCOUNT: &str = "mesh-agent";
/// The key of the root certificate in the Secret and the `ConfigMap`.
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The key of the root key in the Secret.
pub const ROOT_KEY_KEY: &str = "root-key.pem";
/// Shortest `--max-cert-lifetime` accepted.
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(10);
/// Longest `--max-cert-lifetime` accepted (a year).
pub const MAX_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The CA server's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaServerConfig {
    /// Where the gRPC API listens (`--listen`).
    pub listen: SocketAddr,
    /// The CA's namespace, where the Secret and `ConfigMap` live (`--namespace`).
    pub namespace: String,
    /// The only trust domain signed for (`--trust-domain`).
    pub trust_domain: String,
    /// The cluster's DNS domain, the last of the serving certificate's names
    /// (`--cluster-domain`).
    pub cluster_domain: String,
    /// The Service in front of the CA (`--service-name`).
    pub service_name: String,
    /// The Secret holding the root (`--root-secret`).
    pub root_secret: String,
    /// The `ConfigMap` publishing the root certificate (`--bundle-configmap`).
    pub bundle_configmap: String,
    /// The audience callers' tokens must be for (`--audience`).
    pub audience: String,
    /// The `ServiceAccounts` that may ask for other identities (`--impersonator`, repeatable);
    /// empty means `<namespace>/mesh-agent`.
    pub impersonators: Vec<ServiceAccountRef>,
    /// The longest lifetime issued (`--max-cert-lifetime`).
    pub max_cert_lifetime: Duration,
    /// Where the root's files are kept while the CA runs (`--state-dir`).
    pub state_dir: PathBuf,
    /// The kubeconfig (`--kubeconfig`); else in-cluster, or `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
}

/// What is wrong with a setting; each names its flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A Kubernetes name is invalid.
    #[error("{flag} {value:?}: {problem}")]
    Name {
        /// The flag.
        flag: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        problem: mesh_identity::IdentityError,
    },
    /// The trust domain is invalid.
    #[error("--trust-domain {value:?}: {source}")]
    TrustDomain {
        /// The value.
        value: String,
        /// The cause.
        source: mesh_identity::IdentityError,
    },
    /// A setting is empty.
    #[error("{flag} must not be empty")]
    Empty {
        /// The flag.
        flag: &'static str,
    },
    /// The maximum lifetime is out of range.
    #[error("--max-cert-lifetime {value:?} is out of range ({MIN_CERT_LIFETIME:?} to {MAX_CERT_LIFETIME:?})")]
    MaxCertLifetime {
        /// The value.
        value: Duration,
    },
    /// The state directory is not absolute.
    #[error("--state-dir {path}: must be an absolute path")]
    StateDir {
        /// The value.
        path: PathBuf,
    },
    /// The kubeconfig is not a file.
    #[error("--kubeconfig {path}: not a file (or missing)")]
    Kubeconfig {
        /// The value.
        path: PathBuf,
    },
}

impl CaServerConfig {
    /// Checks every setting, and fills in the default impersonator.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let label = |flag: &'static str, value: &str| {
            mesh_identity::spiffe::validate_namespace(value).map_err(|problem| ConfigError::Name {
                flag,
                value: value.to_owned(),
                problem,
            })
        };
        let subdomain = |flag: &'static str, value: &str| {
            mesh_identity::spiffe::validate_service_account(value).map_err(|problem| {
                ConfigError::Name {
                    flag,
                    value: value.to_owned(),
                    problem,
                }
            })
        };
        label("--namespace", &self.namespace)?;
        label("--service-name", &self.service_name)?;
        subdomain("--root-secret", &self.root_secret)?;
        subdomain("--bundle-configmap", &self.bundle_configmap)?;
        subdomain("--cluster-domain", &self.cluster_domain)?;
        validate_trust_domain(&self.trust_domain).map_err(|source| ConfigError::TrustDomain {
            value: self.trust_domain.clone(),
            source,
        })?;
        if self.audience.is_empty() {
            return Err(ConfigError::Empty { flag: "--audience" });
        }
        if !(MIN_CERT_LIFETIME..=MAX_CERT_LIFETIME).contains(&self.max_cert_lifetime) {
            return Err(ConfigError::MaxCertLifetime {
                value: self.max_cert_lifetime,
            });
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::StateDir {
                path: self.state_dir,
            });
        }
        if let Some(path) = &self.kubeconfig {
            if !path.is_file() {
                return Err(ConfigError::Kubeconfig { path: path.clone() });
            }
        }
        if self.impersonators.is_empty() {
            self.impersonators =
                vec![
                    ServiceAccountRef::new(&self.namespace, DEFAULT_IMPERSONATOR_ACCOUNT).map_err(
                        |problem| ConfigError::Name {
                            flag: "--namespace",
                            value: self.namespace.clone(),
                            problem,
                        },
                    )?,
                ];
        }
        Ok(self)
    }

    /// The names of the CA's serving certificate: `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc` and
    /// `<svc>.<ns>.svc.<cluster domain>`.
    pub fn serving_names(&self) -> Vec<String> {
        let (svc, ns) = (&self.service_name, &self.namespace);
        vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.{}", self.cluster_domain),
        ]
    }
}

impl fmt::Display for CaServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let impersonators: Vec<String> =
            self.impersonators.iter().map(ToString::to_string).collect();
        write!(
            f,
            "listen={} namespace={} trust_domain={} cluster_domain={} service_name={} \
             root_secret={} bundle_configmap={} audience={} impersonators={} \
             max_cert_lifetime={}s state_dir={} kubeconfig={}",
            self.listen,
            self.namespace,
            self.trust_domain,
            self.cluster_domain,
            self.service_name,
            self.root_secret,
            self.bundle_configmap,
            self.audience,
            impersonators.join(","),
            self.max_cert_lifetime.as_secs(),
            self.state_dir.display(),
            self.kubeconfig
                .as_ref()
                .map_or_else(|| "in-cluster".to_owned(), |p| p.display().to_string()),
        )
    }
}

/// Parses a lifetime: whole seconds (`86400`) or a human duration (`24h`, `90m`, `1h 30m`).
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| format!("{text:?}: {e}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 86400 or 24h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CaServerConfig {
        CaServerConfig {
            listen: DEFAULT_LISTEN.parse().unwrap(),
            namespace: "mesh-system".into(),
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            service_name: DEFAULT_SERVICE_NAME.into(),
            root_secret: DEFAULT_ROOT_SECRET.into(),
            bundle_configmap: DEFAULT_BUNDLE_CONFIGMAP.into(),
            audience: DEFAULT_AUDIENCE.into(),
            impersonators: Vec::new(),
            max_cert_lifetime: parse_lifetime(DEFAULT_MAX_CERT_LIFETIME).unwrap(),
            state_dir: DEFAULT_STATE_DIR.into(),
            kubeconfig: None,
        }
    }

    #[test]
    fn defaults_validate_and_print_on_one_line() {
        let c = config().validate().unwrap();
        assert_eq!(c.impersonators, ["mesh-system/mesh-agent".parse().unwrap()]);
        assert_eq!(
            c.to_string(),
            "listen=0.0.0.0:15012 namespace=mesh-system trust_domain=cluster.local \
             cluster_domain=cluster.local service_name=mesh-ca root_secret=mesh-ca-root \
             bundle_configmap=mesh-ca-root-cert audience=istio-ca \
             impersonators=mesh-system/mesh-agent max_cert_lifetime=86400s \
             state_dir=/var/run/mesh-ca kubeconfig=in-cluster"
        );
        assert_eq!(
            c.serving_names(),
            [
                "mesh-ca",
                "mesh-ca.mesh-system",
                "mesh-ca.mesh-system.svc",
                "mesh-ca.mesh-system.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn errors_name_the_flag() {
        type Change = fn(&mut CaServerConfig);
        let cases: [(Change, &str); 6] = [
            (|c| c.namespace = "Mesh".into(), "--namespace \"Mesh\""),
            (|c| c.trust_domain = "A B".into(), "--trust-domain"),
            (
                |c| c.audience = String::new(),
                "--audience must not be empty",
            ),
            (
                |c| c.max_cert_lifetime = Duration::from_secs(1),
                "--max-cert-lifetime",
            ),
            (|c| c.state_dir = "relative".into(), "--state-dir relative"),
            (
                |c| c.kubeconfig = Some("/nonexistent/kubeconfig".into()),
                "--kubeconfig /nonexistent/kubeconfig",
            ),
        ];
        for (change, expected) in cases {
            let mut c = config();
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(expected), "{e}");
        }
    }

    #[test]
    fn lifetimes_in_seconds_or_human_units() {
        assert_eq!(parse_lifetime("86400"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_lifetime("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_lifetime("90m"), Ok(Duration::from_secs(5_400)));
        assert!(parse_lifetime("soon").is_err());
        assert!(parse_lifetime("").is_err());
    }
}
