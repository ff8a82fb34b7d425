//! `mesh-agent install-cni`: the chart's CNI installer container. It installs the `mesh-cni`
//! plugin (the binary beside this one) and its entry in the runtime's configuration, keeps the
//! entry in place while it runs, and at SIGTERM removes the entry only if the mesh is being
//! uninstalled ([`crate::departure`]); on a restart or an upgrade it stays, so pods created
//! meanwhile wait for the next agent instead of starting outside the mesh. The binary always
//! stays: the runtime calls it for DEL of the pods whose ADD it served (with the configuration of
//! their ADD), and without it their sandboxes could not be torn down.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use mesh_cni::install::{self, InstallError, PluginEntry};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::departure::{Departure, Owner, OwnerWatch};

/// What the installer is told.
#[derive(Debug, Clone)]
pub struct InstallerConfig {
    /// The runtime's CNI configuration directory.
    pub conf_dir: PathBuf,
    /// The runtime's CNI plugin directory.
    pub bin_dir: PathBuf,
    /// The plugin binary to install.
    pub binary: PathBuf,
    /// The entry written into the configuration.
    pub entry: PluginEntry,
    /// How often the entry is checked.
    pub period: Duration,
    /// The `DaemonSet` whose removal means uninstall (none: the entry always stays).
    pub owner: Option<Owner>,
    /// Kubeconfig for the API (none: in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// The not-ready taint to remove from this node once the agent beside is ready
    /// ([`crate::node_taint`]).
    pub untaint: Option<Untaint>,
}

/// Which taint to remove from which node, once the agent answers ready where.
#[derive(Debug, Clone)]
pub struct Untaint {
    /// This node.
    pub node: String,
    /// The taint key.
    pub key: String,
    /// The agent's readiness endpoint.
    pub readiness: std::net::SocketAddr,
}

/// The installer's failures.
#[derive(Debug, thiserror::Error)]
pub enum InstallerError {
    /// Installing, checking or removing the plugin or its entry failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// The signal handlers could not be installed.
    #[error("installing the {0} handler: {1}")]
    Signal(&'static str, std::io::Error),
    /// No client for the owner lookup.
    #[error("the Kubernetes client for the owner lookup: {0}")]
    KubeClient(#[from] mesh_cluster::KubeClientError),
}

/// The plugin binary shipped beside `exe` (the image holds both).
pub fn plugin_beside(exe: &Path) -> PathBuf {
    exe.with_file_name(install::PLUGIN_TYPE)
}

/// Installs, keeps the entry until SIGTERM or SIGINT, then uninstalls if the owner is gone.
pub async fn run(config: InstallerConfig) -> Result<(), InstallerError> {
    info!(?config, "mesh-cni installer starting");
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| InstallerError::Signal("SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| InstallerError::Signal("SIGINT", e))?;
    let client = match (&config.owner, &config.untaint) {
        (None, None) => None,
        _ => Some(mesh_cluster::kube_client(config.kubeconfig.as_deref()).await?),
    };
    let owner = match (&config.owner, &client) {
        (Some(owner), Some(client)) => Some(OwnerWatch::start(client.clone(), owner.clone())),
        _ => None,
    };
    let installed = install::install_binary(&config.binary, &config.bin_dir)?;
    info!(path = %installed.display(), "plugin binary installed");
    let changed = install::ensure_installed(&config.conf_dir, &config.entry)?;
    info!(?changed, "CNI configuration checked");
    // The entry is in place: once the agent is ready too, pods may come.
    let untaint = match (&config.untaint, &client) {
        (Some(u), Some(client)) => Some(tokio::spawn(crate::node_taint::untaint_when_ready(
            client.clone(),
            u.node.clone(),
            u.key.clone(),
            u.readiness,
        ))),
        _ => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let keeper = {
        let (stop, conf_dir, entry, period) = (
            Arc::clone(&stop),
            config.conf_dir.clone(),
            config.entry.clone(),
            config.period,
        );
        tokio::task::spawn_blocking(move || {
            install::keep_installed(&conf_dir, &entry, period, || stop.load(Ordering::Relaxed))
        })
    };
    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    stop.store(true, Ordering::Relaxed);
    if let Some(task) = untaint {
        task.abort();
    }
    let restored = keeper.await.unwrap_or_default();
    info!(signal, restored, "mesh-cni installer stopping");
    let leaving = match &owner {
        Some(owner) => owner.departure().await,
        None => Departure::Restart,
    };
    if leaving == Departure::Restart {
        info!("leaving the mesh-cni entry and plugin in place for the next agent");
        return Ok(());
    }
    let changed = install::uninstall(&config.conf_dir)?;
    info!(?changed, path = %installed.display(), "mesh-cni entry removed; the plugin binary stays for the DEL of existing pods");
    Ok(())
}
