//! The serving loop: ties the cluster view, the pod manager and the proxies together, and
//! shuts down cleanly on SIGTERM or SIGINT.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    cluster::{self, ClusterState, EnrollmentOptions, Resolution},
    config::AgentConfig,
    datapath::{Datapath, DatapathError},
    pods::{DesiredPod, PodManager},
    proxy::{Resolve, Route},
};

/// How often the config directory is polled for changes.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cluster view: {0}")]
    Cluster(#[from] cluster::FilesError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("installing the {0} handler: {1}")]
    Signal(&'static str, std::io::Error),
}

/// Resolves destinations with the newest cluster view.
struct ClusterResolver(watch::Receiver<Arc<ClusterState>>);

impl Resolve for ClusterResolver {
    fn route(&self, dst: SocketAddr) -> Route {
        let state = Arc::clone(&self.0.borrow());
        match state.resolve(dst) {
            Resolution::Service {
                service, endpoint, ..
            } => Route::To {
                addr: endpoint,
                service: Some(Arc::from(service.to_string())),
            },
            Resolution::NoEndpoint { service } => {
                Route::Refuse(format!("service {service} has no ready endpoint for {dst}"))
            }
            Resolution::Workload { .. } | Resolution::Passthrough => Route::To {
                addr: dst,
                service: None,
            },
        }
    }
}

/// The pods of this node the cluster view enrolls, with what the agent needs to capture them.
/// (The cluster view refuses a state in which an enrolled pod of this node lacks its runtime
/// annotations, so both are present here.)
fn desired_pods(state: &ClusterState, node: &str) -> Vec<DesiredPod> {
    state
        .workloads_on_node(node)
        .filter(|w| w.enrolled)
        .filter_map(|w| {
            let (Some(netns), Some(cgroup)) = (w.netns.clone(), w.cgroup.clone()) else {
                warn!(pod = %w, "enrolled pod without runtime annotations; not captured");
                return None;
            };
            Some(DesiredPod {
                name: w.to_string(),
                netns,
                cgroup,
                ips: w.ips.clone(),
            })
        })
        .collect()
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    info!(%config, version = env!("CARGO_PKG_VERSION"), "mesh-agent starting");
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| AgentError::Signal("SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| AgentError::Signal("SIGINT", e))?;
    let mut options = EnrollmentOptions::new(config.node_name.clone());
    options.label_key.clone_from(&config.label_key);
    options.trust_domain.clone_from(&config.trust_domain);
    let (mut state_rx, _watcher) = cluster::spawn_watcher(&config.config_dir, options, POLL)?;
    let datapath = Datapath::load(
        &config.bpffs_dir,
        config.keep_pins,
        config.sockmap,
        &config.agent_cgroup,
    )?;
    let mut pods = PodManager::new(datapath, Arc::new(ClusterResolver(state_rx.clone())));
    let state = Arc::clone(&state_rx.borrow_and_update());
    pods.reconcile(&desired_pods(&state, &config.node_name));
    // Our links are in place: now the previous instance's can go, with no gap in capture.
    pods.remove_stale_links();
    info!(
        pods = pods.enrolled().count(),
        generation = state.generation(),
        "agent ready"
    );
    let signal = loop {
        tokio::select! {
            changed = state_rx.changed() => {
                if changed.is_err() {
                    warn!("cluster view watcher stopped; keeping the last state");
                    std::future::pending::<()>().await;
                }
                let state = Arc::clone(&state_rx.borrow_and_update());
                // The cluster module logs each new state (generation, counts, errors).
                debug!(generation = state.generation(), "reconciling pods");
                pods.reconcile(&desired_pods(&state, &config.node_name));
            }
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
        }
    };
    info!(signal, "shutting down");
    drop(pods.shutdown(config.keep_pins));
    info!("shutdown complete");
    Ok(())
}
