//! Enrollment at run time: keeps the set of pods the agent serves on this node equal to the
//! set the cluster view says should be meshed, with no pod restart. For each pod it opens the
//! listeners inside the pod's namespace, registers the pod with the kernel programs and
//! attaches them; removing a pod undoes the same steps in reverse.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use mesh_common::PodInfo;
use mesh_identity::{CertManager, CryptoProvider, Identity};
use tokio::sync::watch;
use tracing::{error, info};

use crate::{
    cluster::Shortcut,
    datapath::{Datapath, DatapathError, PodLinks},
    netns::{Netns, NetnsError},
    proxy::{
        self, hbone::HboneConnector, LocalPod, LocalPods, PodListeners, ProxyCtx, ProxyError,
        Transport,
    },
};

/// A pod the cluster view says this agent must capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPod {
    /// `namespace/name`.
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    /// Whether its mesh legs take the `sk_msg` short-cut (when the agent has it).
    pub shortcut: Shortcut,
}

impl DesiredPod {
    /// Whether `other` is captured the same way (everything but the short-cut setting, which
    /// is changed in place: a pod is never re-enrolled, and so never uncaptured, for it).
    fn same_capture(&self, other: &Self) -> bool {
        Self {
            shortcut: other.shortcut,
            ..self.clone()
        } == *other
    }

    fn pod_info(&self) -> PodInfo {
        let v4 = self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        });
        let v6 = self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        });
        PodInfo::new(v4, v6, self.shortcut == Shortcut::Enabled)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: NetnsError },
    #[error("pod {pod}: {source}")]
    Proxy { pod: String, source: ProxyError },
    #[error("pod {pod}: {source}")]
    Datapath { pod: String, source: DatapathError },
    #[error("pod {pod} has no IP address")]
    NoAddress { pod: String },
}

struct Enrolled {
    spec: DesiredPod,
    cookie: u64,
    links: PodLinks,
    _listeners: PodListeners,
}

/// The pods this agent currently captures.
pub struct PodManager {
    datapath: Datapath,
    ctx: Arc<ProxyCtx>,
    local_tx: watch::Sender<Arc<LocalPods>>,
    enrolled: HashMap<String, Enrolled>,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager")
            .field("enrolled", &self.enrolled.keys())
            .finish_non_exhaustive()
    }
}

impl PodManager {
    pub fn new(
        datapath: Datapath,
        resolver: Arc<dyn proxy::Resolve>,
        certs: Arc<CertManager>,
        provider: CryptoProvider,
        pool: mesh_hbone::PoolConfig,
        telemetry: Arc<crate::telemetry::Telemetry>,
        tracker: Arc<proxy::tracker::Tracker>,
    ) -> Self {
        let (local_tx, local_rx) = watch::channel(Arc::new(LocalPods::new()));
        let connector = HboneConnector::new(local_rx.clone(), Arc::clone(&certs), provider);
        let transport = Arc::new(Transport {
            certs,
            provider,
            pool: mesh_hbone::Pool::new(connector, pool),
            server: mesh_hbone::ServerConfig::default(),
        });
        let ctx = Arc::new(ProxyCtx {
            conn: datapath.conn_maps(),
            local: local_rx,
            resolver,
            transport,
            telemetry,
            tracker,
        });
        Self {
            datapath,
            ctx,
            local_tx,
            enrolled: HashMap::new(),
        }
    }

    /// Brings the enrolled pods in line with `desired`. A pod that cannot be enrolled is
    /// reported and skipped; the others are served.
    pub fn reconcile(&mut self, desired: &[DesiredPod]) -> Vec<EnrollError> {
        let wanted: HashMap<&str, &DesiredPod> =
            desired.iter().map(|d| (d.name.as_str(), d)).collect();
        let gone: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(name, e)| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|d| !d.same_capture(&e.spec))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(e) = self.enrolled.remove(&name) {
                self.remove(e);
            }
        }
        let mut errors = Vec::new();
        for d in desired {
            if let Some(e) = self.enrolled.get_mut(&d.name) {
                if e.spec.shortcut != d.shortcut {
                    // New legs follow the new setting; legs already in the short-cut stay until
                    // they close.
                    match self.datapath.register_pod(e.cookie, d.pod_info()) {
                        Ok(()) => {
                            info!(pod = %d.name, shortcut = ?d.shortcut, "short-cut setting changed");
                            e.spec.shortcut = d.shortcut;
                        }
                        Err(err) => {
                            error!(pod = %d.name, error = %err, "changing the short-cut setting");
                        }
                    }
                }
                continue;
            }
            match self.add(d) {
                Ok(e) => {
                    info!(pod = %d.name, ips = ?d.ips, cookie = e.cookie, "pod enrolled");
                    self.enrolled.insert(d.name.clone(), e);
                }
                Err(err) => {
                    error!(error = %err, "pod not enrolled");
                    errors.push(err);
                }
            }
        }
        self.publish();
        errors
    }

    /// What the proxies share (for the admin endpoints).
    pub fn ctx(&self) -> &Arc<ProxyCtx> {
        &self.ctx
    }

    /// Names of the enrolled pods.
    pub fn enrolled(&self) -> impl Iterator<Item = &str> {
        self.enrolled.keys().map(String::as_str)
    }

    fn add(&mut self, d: &DesiredPod) -> Result<Enrolled, EnrollError> {
        let pod_err = |source| EnrollError::Netns {
            pod: d.name.clone(),
            source,
        };
        if d.ips.is_empty() {
            return Err(EnrollError::NoAddress {
                pod: d.name.clone(),
            });
        }
        let netns = Netns::open(&d.netns).map_err(pod_err)?;
        let cookie = netns.cookie().map_err(pod_err)?;
        let pod = Arc::new(LocalPod {
            name: d.name.clone(),
            netns,
            netns_cookie: cookie,
            ips: d.ips.clone(),
            identity: d.identity.clone(),
        });
        let listeners = proxy::start_pod(&pod, &self.ctx).map_err(|source| EnrollError::Proxy {
            pod: d.name.clone(),
            source,
        })?;
        let dp_err = |source| EnrollError::Datapath {
            pod: d.name.clone(),
            source,
        };
        for (ip, fd) in &listeners.inbound {
            self.datapath
                .add_listener(SocketAddr::new(*ip, 0), fd)
                .map_err(dp_err)?;
        }
        self.datapath
            .register_pod(cookie, d.pod_info())
            .map_err(dp_err)?;
        let links = match self.datapath.attach_pod(&d.name, &d.cgroup, &pod.netns) {
            Ok(l) => l,
            Err(e) => {
                self.datapath.unregister_pod(cookie);
                return Err(dp_err(e));
            }
        };
        self.local_pods_insert(&pod);
        Ok(Enrolled {
            spec: d.clone(),
            cookie,
            links,
            _listeners: listeners,
        })
    }

    fn remove(&mut self, e: Enrolled) {
        // Reverse order: stop capturing first, then close the listeners.
        self.datapath.detach_pod(e.links);
        self.datapath.unregister_pod(e.cookie);
        for ip in &e.spec.ips {
            self.datapath.remove_listener(SocketAddr::new(*ip, 0));
        }
        info!(pod = %e.spec.name, "pod removed from the mesh");
    }

    fn local_pods_insert(&self, pod: &Arc<LocalPod>) {
        self.local_tx.send_modify(|m| {
            let mut next = (**m).clone();
            for ip in &pod.ips {
                next.insert(*ip, Arc::clone(pod));
            }
            *m = Arc::new(next);
        });
    }

    fn publish(&self) {
        // Rebuild from what is enrolled, dropping pods that left.
        let current = self.local_tx.borrow().clone();
        let next: LocalPods = current
            .iter()
            .filter(|(_, p)| self.enrolled.contains_key(&p.name))
            .map(|(ip, p)| (*ip, Arc::clone(p)))
            .collect();
        self.local_tx.send_replace(Arc::new(next));
    }

    /// Detaches what earlier agent instances left attached (after the first reconcile).
    pub fn remove_stale_links(&mut self) -> usize {
        self.datapath.remove_stale_links()
    }

    /// Clean shutdown: closes the listeners and, unless `keep_attached`, removes every pod from
    /// the mesh. With `keep_attached` the pinned links stay, so the pods remain captured (their
    /// new connections fail or wait) until the next agent takes over.
    pub fn shutdown(mut self, keep_attached: bool) -> Datapath {
        let all: Vec<String> = self.enrolled.keys().cloned().collect();
        for name in all {
            if let Some(e) = self.enrolled.remove(&name) {
                if keep_attached {
                    info!(pod = %name, "leaving the pod captured for the next agent");
                } else {
                    self.remove(e);
                }
            }
        }
        self.publish();
        self.datapath
    }
}
