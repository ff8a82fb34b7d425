//! Enrollment at run time: keeps the set of pods the agent serves on this node equal to the
//! set the cluster view says should be meshed, with no pod restart.
//!
//! For each pod it checks the runtime handles ([`checks`]), registers the pod with the kernel
//! programs and attaches them (from then on the pod is captured: its connections fail rather
//! than bypass the mesh), then opens its listeners inside the pod's namespace.
//!
//! **Never a window without capture.** A change of a pod's identity or short-cut setting is
//! applied in place. A pod whose namespace changed is replaced make-before-break (the new one is
//! captured before the old one is let go); one whose cgroup or addresses changed in the same
//! namespace keeps its capture while its listeners are rebuilt (connections fail for that
//! moment). A pod that cannot be captured or served is reported by name with the reason, holds
//! the agent's readiness, shows in `mesh_agent_uncaptured_workloads` and `/config_dump`, and is
//! retried; its earlier links (from a previous agent) are kept meanwhile, so its traffic fails
//! closed.

pub mod checks;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
};

use mesh_common::PodInfo;
use mesh_identity::{CertManager, CryptoProvider, Identity};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{links_name, Datapath, DatapathError, PodLinks},
    leg_ports::LegPorts,
    netns::{Netns, NetnsError, NetnsRef},
    proxy::{
        self, hbone::HboneConnector, LocalPod, LocalPods, PodListeners, ProxyCtx, ProxyError,
        Transport,
    },
    readiness::{BlockReady, Readiness},
};
use mesh_cluster::Shortcut;

use self::checks::{Host, NsId, Other, Refusal};

/// A pod the cluster view says this agent must capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPod {
    /// `namespace/name`.
    pub name: String,
    pub netns: NetnsRef,
    pub cgroup: PathBuf,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    /// Whether its mesh legs take the `sk_msg` short-cut (when the agent has it).
    pub shortcut: Shortcut,
}

impl DesiredPod {
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

/// The proxies' view of the pod `d` in `netns` (cookie `netns_cookie`): its ephemeral range is
/// read from the namespace; `may_shortcut` as `LocalPod::may_shortcut` says.
fn local_pod(d: &DesiredPod, netns: Netns, netns_cookie: u64, may_shortcut: bool) -> Arc<LocalPod> {
    Arc::new(LocalPod {
        name: d.name.clone(),
        leg_ports: LegPorts::of(&netns, &d.name),
        may_shortcut: AtomicBool::new(may_shortcut),
        netns,
        netns_cookie,
        ips: d.ips.clone(),
        identity: d.identity.clone(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("pod {pod}: {source}")]
    Netns { pod: String, source: NetnsError },
    #[error("pod {pod}: refused: {source}")]
    Refused { pod: String, source: Refusal },
    #[error("pod {pod}: {source}")]
    Proxy { pod: String, source: ProxyError },
    #[error("pod {pod}: {source}")]
    Datapath { pod: String, source: DatapathError },
    #[error("pod {pod} has no IP address")]
    NoAddress { pod: String },
}

/// What the proxies need, handed to the [`PodManager`] that builds their shared context.
pub struct ProxyParts {
    pub resolver: Arc<dyn proxy::Resolve>,
    pub certs: Arc<CertManager>,
    pub provider: CryptoProvider,
    pub pool: mesh_hbone::PoolConfig,
    /// A tunnel that moves no byte either way for this long is closed (`None`: never).
    pub stream_idle_timeout: Option<std::time::Duration>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub tracker: Arc<proxy::tracker::Tracker>,
    pub node: Arc<crate::node_addrs::NodeAddrs>,
}

impl std::fmt::Debug for ProxyParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyParts")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Pods of this node the agent does not capture or serve although it should, by name, with the
/// reason.
pub type Uncaptured = Arc<BTreeMap<String, String>>;

/// A pod the agent captures: programs attached, registered with the kernel programs.
struct Enrolled {
    spec: DesiredPod,
    cookie: u64,
    netns: NsId,
    /// The pod's cgroup, canonical (for the overlap check).
    cgroup: PathBuf,
    links: PodLinks,
    /// `None` while they could not be opened: captured (its connections fail) but not served.
    listeners: Option<PodListeners>,
    /// The pod as the proxies see it; its identity changes in place.
    view: watch::Sender<Arc<LocalPod>>,
}

impl Enrolled {
    fn pod(&self) -> Arc<LocalPod> {
        Arc::clone(&self.view.borrow())
    }

    fn other(&self) -> Other<'_> {
        Other {
            name: &self.spec.name,
            netns: self.netns,
            cgroup: &self.cgroup,
        }
    }
}

/// A pod that cannot be captured or served: why, and the readiness it holds.
struct Failure {
    reason: String,
    _blocker: BlockReady,
}

/// The pods this agent currently captures.
pub struct PodManager {
    datapath: Datapath,
    ctx: Arc<ProxyCtx>,
    local_tx: watch::Sender<Arc<LocalPods>>,
    host: Host,
    readiness: Readiness,
    enrolled: HashMap<String, Enrolled>,
    failed: HashMap<String, Failure>,
    uncaptured: watch::Sender<Uncaptured>,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager")
            .field("enrolled", &self.enrolled.keys())
            .field("failed", &self.failed.keys())
            .finish_non_exhaustive()
    }
}

impl PodManager {
    pub fn new(datapath: Datapath, parts: ProxyParts, host: Host, readiness: Readiness) -> Self {
        let (local_tx, local_rx) = watch::channel(Arc::new(LocalPods::new()));
        let connector =
            HboneConnector::new(local_rx.clone(), Arc::clone(&parts.certs), parts.provider);
        let transport = Arc::new(Transport {
            certs: parts.certs,
            provider: parts.provider,
            pool: mesh_hbone::Pool::new(connector, parts.pool),
            server: mesh_hbone::ServerConfig::default(),
            idle: parts.stream_idle_timeout.map(|timeout| {
                let sweep = proxy::idle::IdleSweep::new(timeout);
                tokio::spawn(Arc::clone(&sweep).run());
                sweep
            }),
            direct_tick: {
                let tick = proxy::idle::IdleSweep::ticker(proxy::DIRECT_COUNT_TICK);
                tokio::spawn(Arc::clone(&tick).run());
                tick
            },
        });
        let ctx = Arc::new(ProxyCtx {
            conn: datapath.conn_maps(),
            local: local_rx,
            resolver: parts.resolver,
            transport,
            telemetry: parts.telemetry,
            tracker: parts.tracker,
            node: parts.node,
        });
        Self {
            datapath,
            ctx,
            local_tx,
            host,
            readiness,
            enrolled: HashMap::new(),
            failed: HashMap::new(),
            uncaptured: watch::Sender::new(Arc::default()),
        }
    }

    /// Brings the enrolled pods in line with `desired`. A pod that cannot be captured is
    /// reported and retried at the next call; the others are served.
    pub async fn reconcile(&mut self, desired: &[DesiredPod]) {
        let wanted: HashMap<&str, &DesiredPod> =
            desired.iter().map(|d| (d.name.as_str(), d)).collect();
        let gone: Vec<String> = self
            .enrolled
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(e) = self.enrolled.remove(&name) {
                self.remove(e).await;
            }
        }
        self.failed
            .retain(|name, _| wanted.contains_key(name.as_str()));
        for d in desired {
            let result = match self.enrolled.remove(&d.name) {
                None => self.add(d),
                Some(e) => self.update(e, d).await,
            };
            match result {
                Ok(e) => {
                    let served = e.listeners.is_some();
                    self.enrolled.insert(d.name.clone(), e);
                    if served && self.failed.remove(&d.name).is_some() {
                        info!(pod = %d.name, "pod captured and served after an earlier failure");
                    }
                }
                Err(err) => self.fail(&d.name, &err.to_string()),
            }
        }
        self.publish();
        let keep: HashSet<String> = desired
            .iter()
            .filter(|d| !self.enrolled.contains_key(&d.name))
            .map(|d| links_name(&d.name))
            .collect();
        self.datapath.remove_stale_links(|pod| keep.contains(pod));
    }

    /// Whether some pod is waiting for a retry.
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The pods not captured or not served, with the reason (updated at each reconcile).
    pub fn uncaptured(&self) -> watch::Receiver<Uncaptured> {
        self.uncaptured.subscribe()
    }

    /// What the proxies share (for the admin endpoints).
    pub fn ctx(&self) -> &Arc<ProxyCtx> {
        &self.ctx
    }

    /// Names of the enrolled pods (captured; see [`Self::uncaptured`] for those not served).
    pub fn enrolled(&self) -> impl Iterator<Item = &str> {
        self.enrolled.keys().map(String::as_str)
    }

    /// Records that `pod` is not captured or not served: logged (at error level when the reason
    /// is new), held in readiness, reported.
    fn fail(&mut self, pod: &str, reason: &str) {
        match self.failed.get(pod) {
            Some(f) if f.reason == reason => debug!(pod, reason, "pod still not captured"),
            _ => {
                error!(pod, reason, "pod not captured; retrying");
                let blocker = self.readiness.block(&format!("pod {pod}"));
                self.failed.insert(
                    pod.to_owned(),
                    Failure {
                        reason: reason.to_owned(),
                        _blocker: blocker,
                    },
                );
            }
        }
    }

    fn others(&self) -> impl Iterator<Item = Other<'_>> {
        self.enrolled.values().map(Enrolled::other)
    }

    /// Checks `d`'s runtime handles, then captures it: registered and attached first, so that
    /// from then on its connections fail rather than bypass the mesh, then served.
    fn add(&mut self, d: &DesiredPod) -> Result<Enrolled, EnrollError> {
        let pod_err = |source| EnrollError::Netns {
            pod: d.name.clone(),
            source,
        };
        let refused = |source| EnrollError::Refused {
            pod: d.name.clone(),
            source,
        };
        if d.ips.is_empty() {
            return Err(EnrollError::NoAddress {
                pod: d.name.clone(),
            });
        }
        let netns = Netns::open_ref(&d.netns).map_err(pod_err)?;
        let cookie = netns.cookie().map_err(pod_err)?;
        let netns_id = self.host.check_netns(&netns, cookie).map_err(refused)?;
        checks::check_shared_netns(&netns, netns_id, self.others()).map_err(refused)?;
        self.host.check_addresses(&netns, &d.ips).map_err(refused)?;
        let cgroup = self
            .host
            .check_cgroup(&d.cgroup, self.others())
            .map_err(refused)?;
        let dp_err = |source| EnrollError::Datapath {
            pod: d.name.clone(),
            source,
        };
        self.datapath
            .register_pod(cookie, d.pod_info())
            .map_err(dp_err)?;
        let pod = local_pod(d, netns, cookie, d.shortcut == Shortcut::Enabled);
        let links = match self.datapath.attach_pod(&d.name, &d.cgroup, &pod.netns) {
            Ok(l) => l,
            Err(e) => {
                self.datapath.unregister_pod(cookie);
                return Err(dp_err(e));
            }
        };
        let (view, _) = watch::channel(Arc::clone(&pod));
        let mut e = Enrolled {
            spec: d.clone(),
            cookie,
            netns: netns_id,
            cgroup,
            links,
            listeners: None,
            view,
        };
        self.serve(&mut e);
        info!(pod = %d.name, ips = ?d.ips, cookie, served = e.listeners.is_some(), "pod enrolled");
        Ok(e)
    }

    /// Opens the listeners of a captured pod that has none, and makes them the targets of
    /// `sk_lookup`. On a failure the pod stays captured (connections fail) and is reported.
    fn serve(&mut self, e: &mut Enrolled) {
        if e.listeners.is_some() {
            return;
        }
        let pod = e.pod();
        let listeners = match proxy::start_pod(&e.view.subscribe(), &self.ctx) {
            Ok(l) => l,
            Err(err) => {
                let reason = format!("captured, but its listeners cannot be opened: {err}");
                self.fail(&pod.name, &reason);
                return;
            }
        };
        for (ip, fd) in &listeners.inbound {
            if let Err(err) = self.datapath.add_listener(SocketAddr::new(*ip, 0), fd) {
                let reason = format!("captured, but its inbound listener is not in place: {err}");
                self.fail(&pod.name, &reason);
                return;
            }
        }
        e.listeners = Some(listeners);
        self.local_pods_insert(&pod);
    }

    /// Applies `d` to an enrolled pod: in place when only its identity or short-cut setting
    /// changed; its listeners rebuilt under its capture when its cgroup or addresses changed;
    /// make-before-break when its namespace changed.
    async fn update(&mut self, mut e: Enrolled, d: &DesiredPod) -> Result<Enrolled, EnrollError> {
        if e.spec.netns != d.netns {
            // Another namespace: a new pod sandbox. Capture it before letting the old one go.
            let new = self.add(d);
            self.remove(e).await;
            return new;
        }
        if e.spec.cgroup != d.cgroup || e.spec.ips != d.ips {
            return self.rebuild(e, d).await;
        }
        if e.spec.identity != d.identity {
            let old = e.pod();
            let netns = Netns::open_ref(&d.netns).map_err(|source| EnrollError::Netns {
                pod: d.name.clone(),
                source,
            })?;
            let may_shortcut = old.may_shortcut() || d.shortcut == Shortcut::Enabled;
            let pod = local_pod(d, netns, old.netns_cookie, may_shortcut);
            e.view.send_replace(Arc::clone(&pod));
            if e.listeners.is_some() {
                self.local_pods_insert(&pod);
            }
            info!(pod = %d.name, identity = %d.identity, "identity changed in place");
        }
        if e.spec.shortcut != d.shortcut {
            // New legs follow the new setting; legs already in the short-cut stay until they
            // close. Told before the kernel, so no leg can enter unknown to the proxies.
            if d.shortcut == Shortcut::Enabled {
                e.pod().opted_into_shortcut();
            }
            self.datapath
                .register_pod(e.cookie, d.pod_info())
                .map_err(|source| EnrollError::Datapath {
                    pod: d.name.clone(),
                    source,
                })?;
            info!(pod = %d.name, shortcut = ?d.shortcut, "short-cut setting changed");
        }
        e.spec = d.clone();
        self.serve(&mut e);
        Ok(e)
    }

    /// Same namespace, another cgroup or other addresses: the new links first (if the cgroup
    /// changed), then the listeners closed and opened again on the new addresses, then the old
    /// links go. The pod stays captured throughout; its connections fail for that moment.
    async fn rebuild(&mut self, mut e: Enrolled, d: &DesiredPod) -> Result<Enrolled, EnrollError> {
        let refused = |source| EnrollError::Refused {
            pod: d.name.clone(),
            source,
        };
        let pod = e.pod();
        let others: Vec<Other<'_>> = self.others().collect();
        let cgroup = self.host.check_cgroup(&d.cgroup, others).map_err(refused)?;
        self.host
            .check_addresses(&pod.netns, &d.ips)
            .map_err(refused)?;
        let dp_err = |source| EnrollError::Datapath {
            pod: d.name.clone(),
            source,
        };
        let old_links = if e.spec.cgroup == d.cgroup {
            None
        } else {
            let links = self
                .datapath
                .attach_pod(&d.name, &d.cgroup, &pod.netns)
                .map_err(dp_err)?;
            Some(std::mem::replace(&mut e.links, links))
        };
        if let Some(listeners) = e.listeners.take() {
            listeners.close().await;
        }
        for ip in &e.spec.ips {
            self.datapath.remove_listener(SocketAddr::new(*ip, 0));
        }
        self.datapath
            .register_pod(e.cookie, d.pod_info())
            .map_err(dp_err)?;
        let netns = Netns::open_ref(&d.netns).map_err(|source| EnrollError::Netns {
            pod: d.name.clone(),
            source,
        })?;
        let new_pod = local_pod(d, netns, e.cookie, d.shortcut == Shortcut::Enabled);
        e.view.send_replace(new_pod);
        e.spec = d.clone();
        e.cgroup = cgroup;
        self.serve(&mut e);
        if let Some(links) = old_links {
            self.datapath.detach_pod(links);
        }
        info!(pod = %d.name, ips = ?d.ips, cgroup = %d.cgroup.display(), "pod's capture rebuilt");
        Ok(e)
    }

    async fn remove(&mut self, e: Enrolled) {
        // Stop capturing first, then close the listeners.
        self.datapath.detach_pod(e.links);
        self.datapath.unregister_pod(e.cookie);
        for ip in &e.spec.ips {
            self.datapath.remove_listener(SocketAddr::new(*ip, 0));
        }
        if let Some(listeners) = e.listeners {
            listeners.close().await;
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

    /// Rebuilds the same-node map from the served pods, and the report of those not served.
    fn publish(&self) {
        let next: LocalPods = self
            .enrolled
            .values()
            .filter(|e| e.listeners.is_some())
            .flat_map(|e| {
                let pod = e.pod();
                pod.ips
                    .clone()
                    .into_iter()
                    .map(move |ip| (ip, Arc::clone(&pod)))
            })
            .collect();
        let local = Arc::new(next);
        self.local_tx.send_replace(Arc::clone(&local));
        // Pooled HBONE connections of pods no longer served: their sockets live in the pods'
        // network namespaces and would keep those alive until the idle timeout; no stream can
        // use them again (the pool key holds the namespace's cookie).
        let closed = self.ctx.transport.pool.close_where(|key| {
            local
                .get(&key.src_ip)
                .is_none_or(|pod| pod.netns_cookie != key.src_netns)
        });
        if closed > 0 {
            debug!(
                closed,
                "HBONE connections of pods that left the mesh closed"
            );
        }
        let report: BTreeMap<String, String> = self
            .failed
            .iter()
            .map(|(name, f)| (name.clone(), f.reason.clone()))
            .collect();
        self.uncaptured.send_replace(Arc::new(report));
    }

    /// Clean shutdown: closes the listeners and, unless `keep_attached`, removes every pod from
    /// the mesh. With `keep_attached` the pinned links stay, so the pods remain captured (their
    /// new connections fail or wait) until the next agent takes over.
    pub async fn shutdown(mut self, keep_attached: bool) -> Datapath {
        let all: Vec<String> = self.enrolled.keys().cloned().collect();
        for name in all {
            if let Some(e) = self.enrolled.remove(&name) {
                if keep_attached {
                    info!(pod = %name, "leaving the pod captured for the next agent");
                    if let Some(listeners) = e.listeners {
                        listeners.close().await;
                    }
                } else {
                    self.remove(e).await;
                }
            }
        }
        if !self.failed.is_empty() {
            warn!(
                pods = self.failed.len(),
                "shutting down with pods not captured"
            );
        }
        self.publish();
        self.datapath
    }
}
