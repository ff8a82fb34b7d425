//! The cluster view watched from the Kubernetes API server: the second source of
//! [`ClusterState::build`], beside the directory of YAML files.
//!
//! One reflector-style watch per kind (kube-rs' `watcher`: a list, then a watch from its
//! resource version with bookmarks, a fresh list after `410 Gone`, exponential backoff on
//! errors): Namespaces, Pods, Services, `EndpointSlices`, Istio's `PeerAuthentication` and
//! `AuthorizationPolicy` (`security.istio.io/v1`), the waypoint `Gateways`
//! (`gateway.networking.k8s.io/v1`), and for a waypoint ([`KubeOptions::routes`]) also
//! `HTTPRoutes`, `GRPCRoutes`, `VirtualServices` and `DestinationRules`. Every change marks the
//! view dirty; a builder task rebuilds it at most every [`KubeOptions::debounce`] and publishes a new snapshot when
//! objects or errors changed.
//!
//! - **All pods, trimmed.** Destinations anywhere in the cluster must resolve to their workload
//!   and identity, so every Pod is watched, not only this node's; each is cut down on arrival
//!   ([`strip::pod`]) to the fields the model reads (about a tenth of a typical Pod), which
//!   keeps 10,000 pods in a few megabytes (BENCHMARKS.md).
//! - **Istio and Gateway API objects** arrive as JSON and go through the same parser as the files
//!   ([`crate::k8s::parse_documents`]), so both sources accept and refuse exactly the same specs
//!   with the same messages.
//! - **Last good per object.** An object that does not read or that breaks the state keeps its
//!   previous version, and its error is listed in the snapshot ([`ClusterState::errors`]), as
//!   the directory source does per file.
//! - **First sync.** [`KubeSource::start`] returns once every kind has been listed in full (a
//!   kind whose CRD is not installed counts as empty, and is watched again with backoff), so the
//!   agent never acts on a partial view. A kind it cannot list at all keeps it waiting, saying
//!   why in the log.
//! - **API server gone.** The last state stays published; [`ApiStatus`] says since when the
//!   server is unreachable; the watches resume, and re-list if their version expired.

mod backoff;
mod builder;
mod strip;
mod units;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    api::discovery::v1::EndpointSlice,
    serde::de::DeserializeOwned,
};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource,
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use self::{
    backoff::WatchBackoff,
    builder::{Change, Pacing},
    units::{Converted, Units},
};
use crate::{
    error::StateError,
    k8s::{parse_documents, Object},
    meta::{Kind, ObjectRef},
    options::{EndpointsFrom, EnrollmentOptions, RuntimeHandles},
    state::ClusterState,
};

/// Why the Kubernetes source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The enrollment options are invalid.
    #[error("cluster state: {0}")]
    Options(#[source] Box<StateError>),
    /// The objects already published no longer build a state (not expected: reported, never
    /// silently dropped).
    #[error("cluster state: {0}")]
    State(#[source] Box<StateError>),
    /// The builder thread could not be started, or ended before the first state.
    #[error("the cluster view's builder thread: {0}")]
    Builder(String),
}

/// How the source watches.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// The shortest time changes gather before the view is rebuilt: changes arriving together
    /// are applied together.
    pub debounce: Duration,
    /// The longest rest after a rebuild: the next one waits four times as long as the last
    /// took, so under churn the builder stays below a fifth of a core (`builder.rs`).
    pub max_wait: Duration,
    /// The longest a failing watch waits between tries (see `backoff.rs`).
    pub max_backoff: Duration,
    /// Also watch the objects only a waypoint reads (`HTTPRoute`, `GRPCRoute`,
    /// `VirtualService`, `DestinationRule`). A node agent watches `Gateways` (which Service or
    /// pod goes through which waypoint) but not these, and its RBAC does not grant them.
    pub routes: bool,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(50),
            max_wait: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            routes: false,
        }
    }
}

/// How the watches stand, for readiness and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiStatus {
    /// Every kind has been listed in full at least once.
    pub synced: bool,
    /// Since when the last request to the API server failed, while it keeps failing; `None`
    /// while the watches are healthy.
    pub unreachable_since: Option<SystemTime>,
    /// The last error of each kind whose watch is failing, `Kind: message`.
    pub errors: Vec<String>,
    /// Kinds whose resource the API server does not serve (their CRD is not installed).
    pub not_served: Vec<Kind>,
}

/// The running source: the snapshots, the watches' status, and the tasks (aborted on drop).
#[derive(Debug)]
pub struct KubeWatcher {
    /// Every new snapshot.
    pub state: watch::Receiver<Arc<ClusterState>>,
    /// The watches' health.
    pub status: watch::Receiver<ApiStatus>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeWatcher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the kind tasks share: their changes go to the builder, their health to the status.
#[derive(Debug)]
struct Shared {
    changes: std::sync::mpsc::Sender<Change>,
    kinds: Mutex<BTreeMap<Kind, KindState>>,
    /// Every kind watched: synced once each has been listed.
    expected: Vec<Kind>,
    status: watch::Sender<ApiStatus>,
}

#[derive(Clone, Debug, Default)]
struct KindState {
    synced: bool,
    not_served: bool,
    error: Option<(SystemTime, String)>,
}

/// The Kubernetes API as a source of the cluster view.
pub struct KubeSource {
    client: Client,
    opts: EnrollmentOptions,
    kube: KubeOptions,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("opts", &self.opts)
            .field("kube", &self.kube)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source reading through `client`. Fails if `opts` are invalid. On a real cluster pods'
    /// runtime handles are discovered ([`RuntimeHandles::Discovered`]: a Pod's author writes its
    /// annotations) and endpoints come from the controller manager's slices
    /// ([`EndpointsFrom::Slices`]), whatever `opts` say.
    pub fn new(
        client: Client,
        opts: EnrollmentOptions,
        kube: KubeOptions,
    ) -> Result<Self, KubeSourceError> {
        let opts = EnrollmentOptions {
            runtime_handles: RuntimeHandles::Discovered,
            endpoints: EndpointsFrom::Slices,
            ..opts
        };
        opts.validate()
            .map_err(|e| KubeSourceError::Options(Box::new(e)))?;
        Ok(Self { client, opts, kube })
    }

    /// Starts the watches and returns once every kind has been listed, with the first complete
    /// state published.
    pub async fn start(self) -> Result<KubeWatcher, KubeSourceError> {
        let (status_tx, mut status_rx) = watch::channel(ApiStatus::default());
        let pacing = Pacing {
            debounce: self.kube.debounce,
            max_wait: self.kube.max_wait,
        };
        let changes = builder::spawn(Units::new(self.opts.clone()), pacing)
            .map_err(|e| KubeSourceError::Builder(e.to_string()))?;
        let shared = Arc::new(Shared {
            changes,
            kinds: Mutex::new(BTreeMap::new()),
            expected: watched_kinds(self.kube.routes),
            status: status_tx,
        });
        let client = self.client;
        let max_backoff = self.kube.max_backoff;
        let mut tasks = vec![
            spawn_kind(
                Api::<Namespace>::all(client.clone()),
                Kind::Namespace,
                max_backoff,
                &shared,
                |ns| Ok(Object::Namespace(ns)),
            ),
            spawn_kind(
                Api::<Pod>::all(client.clone()),
                Kind::Pod,
                max_backoff,
                &shared,
                |pod| Ok(Object::Pod(strip::pod(pod))),
            ),
            spawn_kind(
                Api::<Service>::all(client.clone()),
                Kind::Service,
                max_backoff,
                &shared,
                |svc| Ok(Object::Service(svc)),
            ),
            spawn_kind(
                Api::<EndpointSlice>::all(client.clone()),
                Kind::EndpointSlice,
                max_backoff,
                &shared,
                |slice| Ok(Object::EndpointSlice(strip::endpoint_slice(slice))),
            ),
        ];
        for &kind in &shared.expected {
            let Some(resource) = dynamic_resource(kind) else {
                continue;
            };
            let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
            tasks.push(spawn_kind(api, kind, max_backoff, &shared, move |object| {
                dynamic_object(kind, &object)
            }));
        }
        let mut synced = false;
        while !synced {
            if status_rx.changed().await.is_err() {
                break;
            }
            synced = status_rx.borrow_and_update().synced;
        }
        // Every kind's list was sent to the builder before it counted as synced, so the first
        // state has them all.
        let (reply, first) = oneshot::channel();
        shared.send(Change::First(reply));
        let state_rx = first
            .await
            .map_err(|_| KubeSourceError::Builder("ended before the first state".into()))?
            .map_err(|e| KubeSourceError::State(Box::new(e)))?;
        {
            let first = state_rx.borrow();
            info!(
                generation = first.generation(),
                workloads = first.workloads().len(),
                "first full list from the Kubernetes API"
            );
        }
        Ok(KubeWatcher {
            state: state_rx,
            status: status_rx,
            tasks,
        })
    }
}

/// Spawns the watch of one kind, feeding `shared`.
fn spawn_kind<K>(
    api: Api<K>,
    kind: Kind,
    max_backoff: Duration,
    shared: &Arc<Shared>,
    convert: impl Fn(K) -> Converted + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let shared = Arc::clone(shared);
    let key = move |object: &K| {
        let meta = object.meta();
        ObjectRef {
            kind,
            namespace: (kind != Kind::Namespace)
                .then(|| crate::meta::MetaExt::namespace(meta).to_owned()),
            name: crate::meta::MetaExt::name(meta).to_owned(),
        }
    };
    tokio::spawn(async move {
        let mut listed = BTreeSet::new();
        let mut stream = watcher(api, watcher::Config::default())
            .backoff(WatchBackoff::new(max_backoff))
            .boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    shared.healthy(kind);
                    match event {
                        watcher::Event::Init => listed.clear(),
                        watcher::Event::InitApply(object) => {
                            let key = key(&object);
                            listed.insert(key.clone());
                            shared.send(Change::Apply(key, Box::new(convert(object))));
                        }
                        watcher::Event::InitDone => {
                            shared.send(Change::Relisted(kind, std::mem::take(&mut listed)));
                            shared.synced(kind, false);
                        }
                        watcher::Event::Apply(object) => {
                            shared.send(Change::Apply(key(&object), Box::new(convert(object))));
                        }
                        watcher::Event::Delete(object) => {
                            shared.send(Change::Delete(key(&object)));
                        }
                    }
                }
                Err(e) => shared.failed(kind, &e),
            }
        }
    })
}

impl Shared {
    /// Hands a change to the builder (it runs as long as the source does).
    fn send(&self, change: Change) {
        if self.changes.send(change).is_err() {
            warn!("the cluster view's builder has stopped; change dropped");
        }
    }

    fn healthy(&self, kind: Kind) {
        let mut kinds = lock(&self.kinds);
        let state = kinds.entry(kind).or_default();
        if let Some((_, error)) = state.error.take() {
            info!(%kind, previous_error = %error, "watch of the Kubernetes API works again");
            state.not_served = false;
            self.publish(&kinds);
        }
    }

    fn synced(&self, kind: Kind, not_served: bool) {
        let mut kinds = lock(&self.kinds);
        let state = kinds.entry(kind).or_default();
        if !state.synced {
            debug!(%kind, not_served, "kind listed in full");
        }
        state.synced = true;
        state.not_served = not_served;
        self.publish(&kinds);
    }

    fn failed(&self, kind: Kind, error: &watcher::Error) {
        let message = error.to_string();
        if is_not_found(error) {
            let first = !lock(&self.kinds).get(&kind).is_some_and(|s| s.not_served);
            if first {
                warn!(%kind, "the API server does not serve this kind (CRD not installed?); read as empty, watched again");
            }
            self.synced(kind, true);
            return;
        }
        let mut kinds = lock(&self.kinds);
        let state = kinds.entry(kind).or_default();
        match &state.error {
            Some((_, previous)) if *previous == message => {}
            _ => {
                warn!(%kind, error = %message, "watch of the Kubernetes API failed; retrying with backoff, the last state stays");
            }
        }
        let since = state
            .error
            .as_ref()
            .map_or_else(SystemTime::now, |(t, _)| *t);
        state.error = Some((since, message));
        self.publish(&kinds);
    }

    fn publish(&self, kinds: &BTreeMap<Kind, KindState>) {
        let all = self
            .expected
            .iter()
            .all(|k| kinds.get(k).is_some_and(|s| s.synced));
        let status = ApiStatus {
            synced: all,
            unreachable_since: kinds
                .values()
                .filter_map(|s| s.error.as_ref().map(|e| e.0))
                .min(),
            errors: kinds
                .iter()
                .filter_map(|(kind, s)| s.error.as_ref().map(|(_, e)| format!("{kind}: {e}")))
                .collect(),
            not_served: kinds
                .iter()
                .filter(|(_, s)| s.not_served)
                .map(|(kind, _)| *kind)
                .collect(),
        };
        self.status.send_if_modified(|current| {
            // Once synced, a source stays synced: later lists only refresh.
            let status = ApiStatus {
                synced: status.synced || current.synced,
                ..status.clone()
            };
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// The kinds the source watches: the node agent's (`routes: false`), or also the routes a
/// waypoint reads.
fn watched_kinds(routes: bool) -> Vec<Kind> {
    let mut kinds = vec![
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Gateway,
    ];
    if routes {
        kinds.extend([
            Kind::HttpRoute,
            Kind::GrpcRoute,
            Kind::TcpRoute,
            Kind::TlsRoute,
            Kind::VirtualService,
            Kind::DestinationRule,
            Kind::ReferenceGrant,
            Kind::RequestAuthentication,
            Kind::EnvoyFilter,
        ]);
    }
    kinds
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.is_not_found(),
        _ => false,
    }
}

/// The API resource of a custom kind (Istio's, the Gateway API's), at the version the source
/// reads; `None` for the built-in kinds, watched with their typed APIs.
fn dynamic_resource(kind: Kind) -> Option<ApiResource> {
    let (group, version, name, plural) = match kind {
        Kind::PeerAuthentication => (
            "security.istio.io",
            "v1",
            "PeerAuthentication",
            "peerauthentications",
        ),
        Kind::AuthorizationPolicy => (
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
        Kind::Gateway => ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
        Kind::HttpRoute => ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
        Kind::GrpcRoute => ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
        // v1: standard since Gateway API 1.5 (a cluster with older CRDs serves none: not found,
        // as a kind whose CRD is not installed).
        Kind::TcpRoute => ("gateway.networking.k8s.io", "v1", "TCPRoute", "tcproutes"),
        Kind::TlsRoute => ("gateway.networking.k8s.io", "v1", "TLSRoute", "tlsroutes"),
        // v1beta1: served by every release with the kind (v1 since Gateway API 1.5).
        Kind::ReferenceGrant => (
            "gateway.networking.k8s.io",
            "v1beta1",
            "ReferenceGrant",
            "referencegrants",
        ),
        Kind::RequestAuthentication => (
            "security.istio.io",
            "v1",
            "RequestAuthentication",
            "requestauthentications",
        ),
        // v1alpha3: its only version.
        Kind::EnvoyFilter => (
            "networking.istio.io",
            "v1alpha3",
            "EnvoyFilter",
            "envoyfilters",
        ),
        Kind::VirtualService => (
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
        ),
        Kind::DestinationRule => (
            "networking.istio.io",
            "v1",
            "DestinationRule",
            "destinationrules",
        ),
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice => return None,
    };
    Some(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, name),
        plural,
    ))
}

/// A custom object from the API, read by the same parser as a file's.
fn dynamic_object(kind: Kind, object: &DynamicObject) -> Converted {
    let name = format!(
        "{kind} {}/{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default()
    );
    let mut value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    if let Some(map) = value.as_object_mut() {
        // Read-only bookkeeping the parser need not see.
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
        map.remove("status");
    }
    let text = serde_yaml::to_string(&value).map_err(|e| e.to_string())?;
    let mut objects = parse_documents(&name, &text).map_err(|e| e.to_string())?;
    match (objects.pop(), objects.is_empty()) {
        (Some(object), true) => Ok(object),
        _ => Err(format!("{name}: not one {kind}")),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
