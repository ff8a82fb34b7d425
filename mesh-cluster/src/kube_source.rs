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
//! - **Versions.** A custom kind is watched at the newest of the versions the parser reads that
//!   the API server serves ([`crate::k8s::api_versions`]): `TCPRoute` at `v1`, or at `v1alpha2`
//!   on a cluster with a Gateway API older than 1.5; Istio's kinds at `v1`, or `v1beta1` before
//!   Istio 1.22. A version that stops being served moves the watch to the next.
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

pub use strip::for_view;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use futures_util::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Namespace, Node, Pod, Service},
    api::discovery::v1::EndpointSlice,
    serde::de::DeserializeOwned,
};
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind},
    core::PartialObjectMeta,
    runtime::{utils::Backoff as _, watcher, WatchStreamExt as _},
    Api, Client, Resource,
};
use serde::Deserialize as _;
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use self::{
    backoff::WatchBackoff,
    builder::{Change, Pacing},
    units::{Converted, Units, Unreadable},
};
use crate::{
    error::{ReadPart, StateError},
    gateway_api::ParentRef,
    k8s::{api_versions, parse_documents, Object, ParseError},
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
    /// Also watch the objects only a waypoint reads (the routes, `VirtualService`,
    /// `DestinationRule`, `ReferenceGrant`, `RequestAuthentication`, `EnvoyFilter`): the
    /// waypoint and the controller that writes the waypoint conditions. A node agent watches
    /// `Gateways` (which Service or pod goes through which waypoint) but not these, and its RBAC
    /// does not grant them.
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
            // Metadata only: a node's status (often tens of kB, with its images) is updated
            // every few minutes, and every agent watches every node.
            spawn_kind(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                Kind::Node,
                max_backoff,
                &shared,
                |node| Ok(Object::Node(strip::node(node))),
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
            if let Some(plural) = custom_plural(kind) {
                tasks.push(spawn_custom(&client, kind, plural, max_backoff, &shared));
            }
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

/// Spawns the watch of one built-in kind, feeding `shared`.
fn spawn_kind<K>(
    api: Api<K>,
    kind: Kind,
    max_backoff: Duration,
    shared: &Arc<Shared>,
    convert: impl Fn(K) -> Converted + Send + Sync + 'static,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .backoff(WatchBackoff::new(max_backoff))
            .boxed();
        follow(stream, kind, &shared, &convert, None).await;
    })
}

/// Spawns the watch of a custom kind at the first of its versions
/// ([`crate::k8s::api_versions`], the newest first) the API server serves: a cluster with an
/// older release of the Gateway API or Istio serves only older versions (`TCPRoute` was
/// `v1alpha2` before Gateway API 1.5). A version that stops being served (CRDs upgraded or
/// downgraded) moves the watch to the next; when none is served, the kind reads as empty and
/// the versions are tried again after a backoff.
fn spawn_custom(
    client: &Client,
    kind: Kind,
    plural: &'static str,
    max_backoff: Duration,
    shared: &Arc<Shared>,
) -> JoinHandle<()> {
    let shared = Arc::clone(shared);
    let client = client.clone();
    let convert = move |object: DynamicObject| dynamic_object(kind, &object);
    tokio::spawn(async move {
        let versions = api_versions(kind);
        let mut rest = WatchBackoff::new(max_backoff);
        loop {
            let mut served = false;
            for &api_version in versions {
                let resource = custom_resource(kind, plural, api_version);
                let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
                let stream = watcher(api, watcher::Config::default())
                    .backoff(WatchBackoff::new(max_backoff))
                    .boxed();
                let at = Version {
                    api_version,
                    newest: api_version == versions[0],
                };
                match follow(stream, kind, &shared, &convert, Some(at)).await {
                    Followed::NotServed { after_events } => served |= after_events,
                    Followed::Ended => return,
                }
            }
            if served {
                rest.reset();
                continue;
            }
            shared.not_served(kind, versions);
            tokio::time::sleep(rest.next().unwrap_or(max_backoff)).await;
        }
    })
}

/// The version a custom kind's watch reads.
#[derive(Clone, Copy, Debug)]
struct Version {
    api_version: &'static str,
    /// The first of the kind's versions.
    newest: bool,
}

/// How a watch ended.
enum Followed {
    /// The API server does not serve the watched version (only for a custom kind's watch);
    /// `after_events` when it did serve it for a while.
    NotServed { after_events: bool },
    /// The stream ended (not expected: the watcher retries forever).
    Ended,
}

/// Feeds one watch's events to `shared` until its stream ends or, for a custom kind's watch
/// (`at`), the API server says it does not serve that version.
async fn follow<K>(
    mut stream: futures_util::stream::BoxStream<'static, watcher::Result<watcher::Event<K>>>,
    kind: Kind,
    shared: &Shared,
    convert: &impl Fn(K) -> Converted,
    at: Option<Version>,
) -> Followed
where
    K: Resource + Clone + Debug,
{
    let key = move |object: &K| {
        let meta = object.meta();
        ObjectRef {
            kind,
            namespace: (!matches!(kind, Kind::Namespace | Kind::Node))
                .then(|| crate::meta::MetaExt::namespace(meta).to_owned()),
            name: crate::meta::MetaExt::name(meta).to_owned(),
        }
    };
    let mut listed = BTreeSet::new();
    let mut after_events = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) if at.is_some() && is_not_found(&e) => {
                return Followed::NotServed { after_events };
            }
            Err(e) => {
                shared.failed(kind, &e);
                continue;
            }
        };
        // `Init` comes before a list is asked for: only what follows shows the server answers.
        if !matches!(event, watcher::Event::Init) {
            if !after_events {
                after_events = true;
                match at {
                    Some(at) if !at.newest => info!(
                        %kind,
                        api_version = at.api_version,
                        "watched at an older version: the API server does not serve the newer ones"
                    ),
                    Some(at) => debug!(%kind, api_version = at.api_version, "watched"),
                    None => {}
                }
            }
            shared.healthy(kind);
        }
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
    Followed::Ended
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

    /// The API server serves `kind` at none of `versions` (its CRD is not installed): it reads
    /// as empty, and counts as listed.
    fn not_served(&self, kind: Kind, versions: &[&str]) {
        let mut kinds = lock(&self.kinds);
        let state = kinds.entry(kind).or_default();
        let newly = !state.not_served;
        if newly {
            warn!(
                %kind,
                api_versions = ?versions,
                "the API server does not serve this kind (CRD not installed?); read as empty, watched again"
            );
        }
        // It answered: whatever failed before (the server out of reach) is over.
        if let Some((_, error)) = state.error.take() {
            info!(%kind, previous_error = %error, "the Kubernetes API answers again");
        }
        drop(kinds);
        // Objects read at a version no longer served go, once: sent at every try, the change
        // would rebuild the whole view every backoff for each kind not installed.
        if newly {
            self.send(Change::Relisted(kind, BTreeSet::new()));
        }
        self.synced(kind, true);
    }

    fn failed(&self, kind: Kind, error: &watcher::Error) {
        let message = error.to_string();
        if is_not_found(error) {
            self.not_served(kind, &[]);
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
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Gateway,
        Kind::ServiceEntry,
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

/// Whether the API server does not serve the resource: `404`, with a `NotFound` status, or
/// with the plain `404 page not found` it answers for a version or group it does not serve
/// (kube reads that body as a status with an unknown reason, which its `is_not_found` does not
/// take).
fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
            status.is_not_found() || status.code == 404
        }
        _ => false,
    }
}

/// The plural of a custom kind (Istio's, the Gateway API's); `None` for the built-in kinds,
/// watched with their typed APIs.
fn custom_plural(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::PeerAuthentication => "peerauthentications",
        Kind::AuthorizationPolicy => "authorizationpolicies",
        Kind::Gateway => "gateways",
        Kind::HttpRoute => "httproutes",
        Kind::GrpcRoute => "grpcroutes",
        Kind::TcpRoute => "tcproutes",
        Kind::TlsRoute => "tlsroutes",
        Kind::ReferenceGrant => "referencegrants",
        Kind::RequestAuthentication => "requestauthentications",
        Kind::EnvoyFilter => "envoyfilters",
        Kind::VirtualService => "virtualservices",
        Kind::DestinationRule => "destinationrules",
        Kind::ServiceEntry => "serviceentries",
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice | Kind::Node => {
            return None
        }
    })
}

/// The API resource of custom `kind` at `api_version` (`group/version`).
pub(crate) fn custom_resource(kind: Kind, plural: &str, api_version: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind.name()), plural)
}

/// A custom object from the API, read by the same parser as a file's. When it does not read,
/// the error names the field (not the line of the text it was rendered to here, which no one
/// sees), with the object's generation and, of a route, the `parentRefs` that read (what its
/// status is told).
fn dynamic_object(kind: Kind, object: &DynamicObject) -> Converted {
    let name = format!(
        "{kind} {}/{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default()
    );
    let unreadable = |message: String| Unreadable {
        message,
        generation: object.metadata.generation,
        read: readable_part(kind, object),
    };
    let mut value = serde_json::to_value(object).map_err(|e| unreadable(e.to_string()))?;
    if let Some(map) = value.as_object_mut() {
        // Read-only bookkeeping the parser need not see.
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
        map.remove("status");
    }
    let text = serde_yaml::to_string(&value).map_err(|e| unreadable(e.to_string()))?;
    let mut objects = parse_documents(&name, &text).map_err(|e| unreadable(parse_message(e)))?;
    match (objects.pop(), objects.is_empty()) {
        (Some(object), true) => Ok(object),
        _ => Err(unreadable(format!("not one {kind}"))),
    }
}

/// What `error` says is wrong with an object: for a field, its path and the problem, without the
/// place in the text.
fn parse_message(error: ParseError) -> String {
    match error {
        ParseError::Invalid { source, .. } => {
            let text = source.to_string();
            let place = source
                .location()
                .map(|at| format!(" at line {} column {}", at.line(), at.column()));
            match place.and_then(|place| text.strip_suffix(&place).map(str::to_owned)) {
                Some(message) => message,
                None => text,
            }
        }
        other => other.to_string(),
    }
}

/// What the status of `object` (of `kind`) is decided from, read from its parts one by one, so
/// that a version that does not read as a whole still tells that much: a route's `parentRefs`
/// that read, whether a policy names `targetRefs`.
fn readable_part(kind: Kind, object: &DynamicObject) -> ReadPart {
    let spec = object.data.get("spec");
    match kind {
        Kind::HttpRoute | Kind::GrpcRoute | Kind::TcpRoute | Kind::TlsRoute => {
            let parents = spec
                .and_then(|spec| spec.get("parentRefs"))
                .and_then(serde_json::Value::as_array)
                .map(|refs| {
                    refs.iter()
                        .filter_map(|r| ParentRef::deserialize(r).ok())
                        .collect()
                })
                .unwrap_or_default();
            ReadPart::Route { parents }
        }
        Kind::AuthorizationPolicy | Kind::RequestAuthentication | Kind::EnvoyFilter => {
            let named = |field: &str| spec.and_then(|spec| spec.get(field));
            let targeted = named("targetRef").is_some_and(serde_json::Value::is_object)
                || named("targetRefs")
                    .and_then(serde_json::Value::as_array)
                    .is_some_and(|refs| !refs.is_empty());
            ReadPart::Policy { targeted }
        }
        _ => ReadPart::Other,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use kube::{core::Status, runtime::watcher};

    use super::{custom_plural, custom_resource, is_not_found};
    use crate::{k8s::api_versions, meta::Kind};

    fn list_failed(status: Status) -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(status.boxed()))
    }

    #[test]
    fn a_plain_404_says_the_resource_is_not_served() {
        // What the API server answers for a version or group it does not serve: a plain-text
        // body, which kube reads as a status with a reason of its own.
        let plain = Status::failure("404 page not found", "Failed to parse error data");
        assert!(is_not_found(&list_failed(plain.with_code(404))));
        let status = Status::failure("the server could not find the resource", "NotFound");
        assert!(is_not_found(&list_failed(status.with_code(404))));
        let forbidden = Status::failure("tcproutes is forbidden", "Forbidden");
        assert!(!is_not_found(&list_failed(forbidden.with_code(403))));
    }

    #[test]
    fn a_custom_kind_is_watched_at_the_versions_the_parser_reads_newest_first() {
        let at = |kind: Kind| -> Vec<(String, String)> {
            let plural = custom_plural(kind).expect("a custom kind");
            api_versions(kind)
                .iter()
                .map(|v| custom_resource(kind, plural, v))
                .map(|r| (r.api_version, r.plural))
                .collect()
        };
        let tcp = |v: &str| (format!("gateway.networking.k8s.io/{v}"), "tcproutes".into());
        assert_eq!(at(Kind::TcpRoute), [tcp("v1"), tcp("v1alpha2")]);
        let tls: Vec<_> = at(Kind::TlsRoute).into_iter().map(|r| r.0).collect();
        assert_eq!(
            tls,
            [
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1alpha3",
                "gateway.networking.k8s.io/v1alpha2"
            ]
        );
        assert_eq!(at(Kind::VirtualService)[0].0, "networking.istio.io/v1");
        // Every custom kind has a group; the built-in ones are watched with their typed APIs.
        for kind in Kind::ALL {
            match custom_plural(kind) {
                Some(_) => assert!(at(kind).iter().all(|(v, _)| v.contains('/')), "{kind}"),
                None => assert!(matches!(
                    kind,
                    Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice | Kind::Node
                )),
            }
        }
    }

    /// `web`'s `HTTPRoute` at `generation`, whose path match is `path` (a regular expression).
    fn web_route(generation: i64, path: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "generation": generation},
            "spec": {
                "parentRefs": [
                    {"group": "", "kind": "Service", "name": "web", "port": 80},
                    {"name": "edge"},
                ],
                "rules": [{
                    "matches": [{"path": {"type": "RegularExpression", "value": path}}],
                    "backendRefs": [{"name": "web", "port": 80}],
                }],
            },
        })
    }

    fn read_route(route: serde_json::Value) -> super::Converted {
        let object = serde_json::from_value(route).expect("a DynamicObject");
        super::dynamic_object(Kind::HttpRoute, &object)
    }

    #[test]
    fn a_route_that_does_not_read_is_told_so_at_its_generation_while_its_last_good_stays() {
        use super::units::Units;
        use crate::{k8s::parse_documents, options::EnrollmentOptions, RouteKind, RouteObject};

        let mut units = Units::new(EnrollmentOptions::new("n0"));
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                       spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        for object in parse_documents("test", service).expect("a Service") {
            units.apply(&object.object_ref(), Ok(object));
        }
        let key = crate::meta::ObjectRef {
            kind: Kind::HttpRoute,
            namespace: Some("shop".to_owned()),
            name: "web".to_owned(),
        };
        let route = RouteObject {
            kind: RouteKind::Http,
            namespace: "shop".to_owned(),
            name: "web".to_owned(),
        };
        let accepted = |units: &mut Units| {
            let state = units.rebuild().expect("builds");
            let entries = state.route_statuses().remove(&route).expect("entries");
            let summary: Vec<_> = entries
                .iter()
                .map(|e| {
                    let a = &e.accepted;
                    (
                        e.parent.name.clone(),
                        e.generation,
                        a.reason.as_str(),
                        a.message.clone(),
                    )
                })
                .collect();
            (summary, state.errors().len())
        };
        units.apply(&key, read_route(web_route(1, "/a.*")));
        let (good, errors) = accepted(&mut units);
        assert_eq!(errors, 0);
        assert_eq!(good.len(), 1, "one Service parent: {good:?}");
        assert_eq!(good[0].1, Some(1));

        // Generation 2's regular expression does not compile: not applied, generation 1 stays;
        // a parentRef that does not read (no name) would get no entry.
        let mut unnamed = web_route(2, "/a.*");
        let parent = serde_json::json!({"group": "", "kind": "Service"});
        unnamed["spec"]["parentRefs"]
            .as_array_mut()
            .expect("a list")
            .push(parent);
        let unnamed = read_route(unnamed).expect_err("does not read");
        assert_eq!(unnamed.message, "spec.parentRefs[2]: missing field `name`");
        let crate::ReadPart::Route { parents } = &unnamed.read else {
            panic!("a route's part: {:?}", unnamed.read);
        };
        let names: Vec<&str> = parents.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web", "edge"]);
        let bad = read_route(web_route(2, "/(unclosed"));
        let problem = bad.as_ref().expect_err("does not read");
        // The field, not the line of a text no one sees; in one line.
        assert_eq!(
            problem.message,
            "spec.rules[0].matches[0]: \"/(unclosed\" is not a regular expression: unclosed group"
        );
        assert_eq!(problem.generation, Some(2));
        units.apply(&key, bad);
        let (told, errors) = accepted(&mut units);
        assert_eq!(errors, 1);
        let [(parent, generation, reason, message)] = &told[..] else {
            panic!("one entry: {told:?}");
        };
        assert_eq!(
            (parent.as_str(), *generation, *reason),
            ("web", Some(2), "UnsupportedValue")
        );
        assert!(
            message.starts_with("not applied: spec.rules[0]"),
            "{message}"
        );
        assert!(
            message.ends_with("the route's generation 1 stays in force"),
            "{message}"
        );
        let state = units.rebuild().expect("builds");
        let in_force: Vec<_> = state.route_parents().iter().map(|r| r.generation).collect();
        assert_eq!(
            in_force,
            [Some(1)],
            "the last good version is still applied"
        );

        // Generation 3 reads again: applied, told so.
        units.apply(&key, read_route(web_route(3, "/b.*")));
        let (fixed, errors) = accepted(&mut units);
        assert_eq!(errors, 0);
        assert_eq!((fixed[0].1, fixed[0].2), (Some(3), "NoWaypoint"));
    }

    #[test]
    fn a_policy_that_does_not_read_is_told_so_in_its_condition_while_its_last_good_stays() {
        use super::units::Units;
        use crate::options::EnrollmentOptions;

        let read = |kind: Kind, name: &str, spec: serde_json::Value| {
            let (api_version, kind_name) = match kind {
                Kind::EnvoyFilter => ("networking.istio.io/v1alpha3", "EnvoyFilter"),
                _ => ("security.istio.io/v1", "AuthorizationPolicy"),
            };
            let object = serde_json::from_value(serde_json::json!({
                "apiVersion": api_version, "kind": kind_name,
                "metadata": {"name": name, "namespace": "shop", "generation": 1},
                "spec": spec,
            }))
            .expect("a DynamicObject");
            let key = crate::meta::ObjectRef {
                kind,
                namespace: Some("shop".to_owned()),
                name: name.to_owned(),
            };
            (key, super::dynamic_object(kind, &object))
        };
        let mut units = Units::new(EnrollmentOptions::new("n0"));
        let conditions = |units: &mut Units| {
            let state = units.rebuild().expect("builds");
            state
                .bound_conditions()
                .into_iter()
                .map(|(o, c)| (o.name, (c.condition_type, c.reason.as_str(), c.message)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let on_web = serde_json::json!([{"kind": "Service", "group": "", "name": "web"}]);
        let good = serde_json::json!({"targetRefs": on_web, "action": "DENY",
            "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]});
        let (key, object) = read(Kind::AuthorizationPolicy, "deny", good);
        units.apply(&key, object);
        let told = conditions(&mut units);
        assert_eq!(told["deny"].1, "TargetNotFound", "{told:?}");

        // Its next version names a port by name; a new policy of the agents' does too; a new
        // EnvoyFilter for sidecars does not read either.
        let named = serde_json::json!([{"to": [{"operation": {"ports": ["http"]}}]}]);
        let bad = serde_json::json!({"targetRefs": on_web, "action": "DENY", "rules": named});
        let agents = serde_json::json!({"action": "DENY", "rules": named});
        let sidecars = serde_json::json!({"priority": "first"});
        for (kind, name, spec) in [
            (Kind::AuthorizationPolicy, "deny", bad),
            (Kind::AuthorizationPolicy, "agents", agents),
            (Kind::EnvoyFilter, "sidecars", sidecars),
        ] {
            let (key, object) = read(kind, name, spec);
            assert!(object.is_err(), "{name} does not read");
            units.apply(&key, object);
        }
        let told = conditions(&mut units);
        let (kind, reason, message) = &told["deny"];
        assert_eq!((*kind, *reason), ("WaypointAccepted", "UnsupportedValue"));
        assert!(
            message.starts_with("not applied: spec.rules[0].to[0].operation.ports[0]")
                && message.ends_with("; its last good version stays in force"),
            "{message}"
        );
        let (kind, reason, message) = &told["agents"];
        assert_eq!((*kind, *reason), ("ZtunnelAccepted", "UnsupportedValue"));
        assert!(!message.contains("last good"), "none: {message}");
        assert!(!told.contains_key("sidecars"), "{told:?}");
        let state = units.rebuild().expect("builds");
        assert_eq!(
            state.authorization_policies().len(),
            1,
            "the last good stays"
        );
    }
}
