//! The four processes of the control plane: their command lines (close to what kubeadm writes
//! into its static pod manifests, minus what needs a cloud or a front proxy) and how each is
//! started: `mesh-kcp <component>` in a leaf cgroup of its own below the control plane's.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
};

use super::{pki::CertFiles, Result};
use crate::Process;

/// IPv4 Service range: the testbed's VIPs are 198.18.128.(i+1) (`plan::service_vip_v4`). The
/// API server gives its own `kubernetes` Service the first address, 198.18.128.1.
pub const SERVICE_CIDR_V4: &str = "198.18.128.0/17";
/// IPv6 Service range: the testbed's VIPs are `fd00:6d65:7368:fffe::(i+1)` (`plan::service_vip_v6`).
pub const SERVICE_CIDR_V6: &str = "fd00:6d65:7368:fffe::/112";
/// The `kubernetes` Service's address: the first of [`SERVICE_CIDR_V4`].
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 1);
/// Issuer of service-account tokens, as in a kubeadm cluster.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// One of the control plane's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Etcd,
    ApiServer,
    ControllerManager,
    Scheduler,
}

impl Component {
    /// Every component, in start order.
    pub const ALL: [Self; 4] = [
        Self::Etcd,
        Self::ApiServer,
        Self::ControllerManager,
        Self::Scheduler,
    ];

    /// The subcommand of `mesh-kcp`, also the name of its cgroup and its output prefix.
    pub fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::ApiServer => "kube-apiserver",
            Self::ControllerManager => "kube-controller-manager",
            Self::Scheduler => "kube-scheduler",
        }
    }

    pub(super) fn index(self) -> usize {
        match self {
            Self::Etcd => 0,
            Self::ApiServer => 1,
            Self::ControllerManager => 2,
            Self::Scheduler => 3,
        }
    }
}

/// Ports on 127.0.0.1, each free when chosen.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
}

impl Ports {
    /// Asks the kernel for five free ports at once (all bound together, so they differ), then
    /// releases them for the components to bind. Another process could take one in between;
    /// the component then fails to start and says so.
    pub fn pick() -> Result<Self> {
        let listeners = (0..5)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(crate::io_err("choosing free ports on 127.0.0.1"))?;
        let port = |i: usize| -> Result<u16> {
            Ok(listeners[i]
                .local_addr()
                .map_err(crate::io_err("reading a bound port"))?
                .port())
        };
        Ok(Self {
            etcd_client: port(0)?,
            etcd_peer: port(1)?,
            apiserver: port(2)?,
            controller_manager: port(3)?,
            scheduler: port(4)?,
        })
    }
}

/// Every file the command lines name.
#[derive(Clone, Debug)]
pub struct Files {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub etcd: CertFiles,
    pub etcd_data: PathBuf,
    pub apiserver: CertFiles,
    pub apiserver_etcd_client: CertFiles,
    pub apiserver_kubelet_client: CertFiles,
    pub front_proxy_ca_cert: PathBuf,
    pub front_proxy_client: CertFiles,
    pub components_serving: CertFiles,
    pub sa_private: PathBuf,
    pub sa_public: PathBuf,
    pub controller_manager_kubeconfig: PathBuf,
    pub scheduler_kubeconfig: PathBuf,
}

/// The command-line flags of `component`.
pub fn args(component: Component, ports: &Ports, files: &Files) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let flag = |name: &str, value: String| format!("--{name}={value}");
    let etcd_client = format!("https://127.0.0.1:{}", ports.etcd_client);
    let etcd_peer = format!("https://127.0.0.1:{}", ports.etcd_peer);
    match component {
        Component::Etcd => vec![
            flag("name", "default".into()),
            flag("data-dir", p(&files.etcd_data)),
            flag("listen-client-urls", etcd_client.clone()),
            flag("advertise-client-urls", etcd_client),
            flag("listen-peer-urls", etcd_peer.clone()),
            flag("initial-advertise-peer-urls", etcd_peer.clone()),
            flag("initial-cluster", format!("default={etcd_peer}")),
            flag("initial-cluster-state", "new".into()),
            flag("client-cert-auth", "true".into()),
            flag("trusted-ca-file", p(&files.ca_cert)),
            flag("cert-file", p(&files.etcd.cert)),
            flag("key-file", p(&files.etcd.key)),
            flag("peer-client-cert-auth", "true".into()),
            flag("peer-trusted-ca-file", p(&files.ca_cert)),
            flag("peer-cert-file", p(&files.etcd.cert)),
            flag("peer-key-file", p(&files.etcd.key)),
            // A throw-away store: durability buys nothing here and fsync costs seconds.
            flag("unsafe-no-fsync", "true".into()),
            flag("log-level", "warn".into()),
        ],
        Component::ApiServer => vec![
            flag("bind-address", "127.0.0.1".into()),
            flag("advertise-address", "127.0.0.1".into()),
            flag("secure-port", ports.apiserver.to_string()),
            flag(
                "etcd-servers",
                format!("https://127.0.0.1:{}", ports.etcd_client),
            ),
            flag("etcd-cafile", p(&files.ca_cert)),
            flag("etcd-certfile", p(&files.apiserver_etcd_client.cert)),
            flag("etcd-keyfile", p(&files.apiserver_etcd_client.key)),
            flag("tls-cert-file", p(&files.apiserver.cert)),
            flag("tls-private-key-file", p(&files.apiserver.key)),
            flag("client-ca-file", p(&files.ca_cert)),
            flag(
                "kubelet-client-certificate",
                p(&files.apiserver_kubelet_client.cert),
            ),
            flag("kubelet-client-key", p(&files.apiserver_kubelet_client.key)),
            // The aggregation layer, as kubeadm sets it up: the controller manager and the
            // scheduler read this CA from the API server to authenticate proxied requests.
            flag(
                "requestheader-client-ca-file",
                p(&files.front_proxy_ca_cert),
            ),
            flag("requestheader-allowed-names", "front-proxy-client".into()),
            flag("requestheader-username-headers", "X-Remote-User".into()),
            flag("requestheader-group-headers", "X-Remote-Group".into()),
            flag(
                "requestheader-extra-headers-prefix",
                "X-Remote-Extra-".into(),
            ),
            flag("proxy-client-cert-file", p(&files.front_proxy_client.cert)),
            flag("proxy-client-key-file", p(&files.front_proxy_client.key)),
            flag("authorization-mode", "Node,RBAC".into()),
            // Added to the default plugins, as kubeadm does.
            flag("enable-admission-plugins", "NodeRestriction".into()),
            flag("allow-privileged", "true".into()),
            flag(
                "service-cluster-ip-range",
                format!("{SERVICE_CIDR_V4},{SERVICE_CIDR_V6}"),
            ),
            flag("service-account-issuer", SERVICE_ACCOUNT_ISSUER.into()),
            flag("service-account-key-file", p(&files.sa_public)),
            flag("service-account-signing-key-file", p(&files.sa_private)),
            // The API server listens on loopback only, an address Endpoints may not hold: the
            // `kubernetes` Service keeps no endpoints (nothing in the testbed uses it yet).
            flag("endpoint-reconciler-type", "none".into()),
            flag("profiling", "false".into()),
        ],
        Component::ControllerManager => {
            let kubeconfig = p(&files.controller_manager_kubeconfig);
            let mut args = common_component_args(ports.controller_manager, &kubeconfig, files);
            args.extend([
                flag("use-service-account-credentials", "true".into()),
                flag("service-account-private-key-file", p(&files.sa_private)),
                flag("root-ca-file", p(&files.ca_cert)),
                flag("cluster-signing-cert-file", p(&files.ca_cert)),
                flag("cluster-signing-key-file", p(&files.ca_key)),
                flag("cluster-name", "mesh-tests".into()),
            ]);
            args
        }
        Component::Scheduler => {
            let kubeconfig = p(&files.scheduler_kubeconfig);
            common_component_args(ports.scheduler, &kubeconfig, files)
        }
    }
}

/// What the controller manager and the scheduler share: their identity, delegated
/// authentication and authorization of their own endpoints, a loopback HTTPS port for
/// `/healthz`, and no leader election (each control plane has one of each).
fn common_component_args(port: u16, kubeconfig: &str, files: &Files) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        format!("--client-ca-file={}", p(&files.ca_cert)),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", p(&files.components_serving.cert)),
        format!(
            "--tls-private-key-file={}",
            p(&files.components_serving.key)
        ),
        "--leader-elect=false".into(),
        "--profiling=false".into(),
    ]
}

/// Starts `binary <component> <args>` in the leaf cgroup `<cgroup_root>/<component>`: the shell
/// moves itself into the cgroup, then execs the component under the same pid, so a killed test's
/// leftovers are found (and killed) through the cgroup.
pub fn spawn(
    binary: &Path,
    cgroup_root: &Path,
    component: Component,
    args: &[String],
) -> Result<Process> {
    let cgroup = cgroup_root.join(component.name());
    fs::create_dir_all(&cgroup).map_err(crate::io_err(format!("creating {}", cgroup.display())))?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cgroup.join("cgroup.procs"))
        .arg(binary)
        .arg(component.name())
        .args(args);
    Ok(Process::spawn(
        format!("kcp-{}", component.name()),
        &mut command,
    )?)
}

/// `https://127.0.0.1:<port>`.
pub fn loopback_url(port: u16) -> String {
    format!("https://{}", SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}
