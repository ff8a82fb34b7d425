//! The agent's certificate holder: one certificate per wanted identity, obtained by CSR from a
//! [`CertificateAuthority`], rotated in the background, published as immutable snapshots.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::ca::{CaError, CertificateAuthority, CsrRequest, TrustBundle};
use crate::cert::{fill_random, CertError, WorkloadCert, WorkloadKey};
use crate::spiffe::Identity;

/// Shortest wait between two signings of the same identity, whatever the certificate says.
const MIN_ROTATION_DELAY: Duration = Duration::from_secs(1);

/// Errors of the certificate manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The manager was created outside a Tokio runtime.
    #[error("the certificate manager must be created inside a Tokio runtime")]
    NoRuntime,
    /// Generating the key or the CSR of an identity failed.
    #[error("preparing the certificate request of {identity}: {source}")]
    Request {
        /// The identity.
        identity: Identity,
        /// The cause.
        source: Box<CertError>,
    },
    /// The CA refused or failed to sign.
    #[error("the CA did not sign the certificate of {identity}: {source}")]
    Signing {
        /// The identity.
        identity: Identity,
        /// The cause.
        source: Box<CaError>,
    },
    /// The CA returned a chain that does not fit the request.
    #[error("the CA returned an unusable certificate for {identity}: {source}")]
    InvalidIssued {
        /// The identity.
        identity: Identity,
        /// The cause.
        source: Box<CertError>,
    },
    /// No certificate for the identity appeared in time.
    #[error("no certificate for {identity} within {timeout:?}: {status}")]
    Timeout {
        /// The identity waited for.
        identity: Identity,
        /// How long was waited.
        timeout: Duration,
        /// What the manager knows about it (not wanted, in progress, last failure).
        status: String,
    },
}

/// Settings of the certificate manager.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// Lifetime asked for in each CSR request; `None` leaves it to the CA. Short lifetimes make
    /// rotation observable in tests.
    pub lifetime: Option<Duration>,
    /// First wait after a failed signing; doubled after each further failure.
    pub retry_initial: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self {
            lifetime: None,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// The certificates held at one moment. Immutable; the manager publishes a new one on every
/// change.
#[derive(Debug, Clone)]
pub struct CertSnapshot {
    /// The current certificate of each identity that has one.
    pub certs: HashMap<Identity, Arc<WorkloadCert>>,
    /// The roots peers are verified against.
    pub bundle: Arc<TrustBundle>,
    /// Increases with every published change.
    pub generation: u64,
}

impl CertSnapshot {
    /// A snapshot without certificates.
    pub fn empty(bundle: TrustBundle) -> Self {
        Self {
            certs: HashMap::new(),
            bundle: Arc::new(bundle),
            generation: 0,
        }
    }

    /// The current certificate of `identity`.
    pub fn get(&self, identity: &Identity) -> Option<&Arc<WorkloadCert>> {
        self.certs.get(identity)
    }
}

/// Holds a certificate for every identity of the workloads on this node.
///
/// [`CertManager::set_wanted`] declares the identities; a background task per identity obtains
/// its certificate (retrying with backoff), replaces it at about half its lifetime, and
/// publishes each change as a new [`CertSnapshot`]. Dropping the manager stops the tasks.
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<dyn CertificateAuthority>,
    options: ManagerOptions,
    runtime: Handle,
    state: Mutex<State>,
    snapshots: watch::Sender<Arc<CertSnapshot>>,
}

#[derive(Default)]
struct State {
    workers: HashMap<Identity, Worker>,
    next_token: u64,
}

/// The background task of one wanted identity.
struct Worker {
    /// Distinguishes this task from an earlier one for the same identity.
    token: u64,
    task: JoinHandle<()>,
    last_error: Option<String>,
}

impl CertManager {
    /// A manager obtaining certificates from `ca`. Must be called inside a Tokio runtime, on
    /// which the background tasks will run.
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        options: ManagerOptions,
    ) -> Result<Self, ManagerError> {
        let runtime = Handle::try_current().map_err(|_| ManagerError::NoRuntime)?;
        let (snapshots, _) = watch::channel(Arc::new(CertSnapshot::empty(ca.trust_bundle())));
        Ok(Self {
            inner: Arc::new(Inner {
                ca,
                options,
                runtime,
                state: Mutex::new(State::default()),
                snapshots,
            }),
        })
    }

    /// Declares the identities that need certificates: starts obtaining one for each identity
    /// not wanted before, and stops and forgets those no longer listed.
    pub fn set_wanted(&self, identities: impl IntoIterator<Item = Identity>) {
        let wanted: std::collections::HashSet<Identity> = identities.into_iter().collect();
        let inner = &self.inner;
        let mut state = inner.lock_state();
        let dropped: Vec<Identity> = state
            .workers
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for identity in &dropped {
            if let Some(worker) = state.workers.remove(identity) {
                worker.task.abort();
            }
            info!(%identity, "identity no longer wanted; dropping its certificate");
        }
        if !dropped.is_empty() {
            inner.update_snapshot(|certs| {
                for identity in &dropped {
                    certs.remove(identity);
                }
            });
        }
        for identity in wanted {
            if state.workers.contains_key(&identity) {
                continue;
            }
            let token = state.next_token;
            state.next_token += 1;
            debug!(%identity, "identity wanted; obtaining a certificate");
            let task = inner
                .runtime
                .spawn(Arc::clone(inner).run(identity.clone(), token));
            state.workers.insert(
                identity,
                Worker {
                    token,
                    task,
                    last_error: None,
                },
            );
        }
    }

    /// The identities currently wanted, sorted.
    pub fn wanted(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.inner.lock_state().workers.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// A receiver of the snapshots, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CertSnapshot>> {
        self.inner.snapshots.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<CertSnapshot> {
        Arc::clone(&self.inner.snapshots.borrow())
    }

    /// The certificate of `identity`, waiting up to `timeout` for it to be obtained (for the
    /// first connection of a workload that just appeared).
    pub async fn wait_for(
        &self,
        identity: &Identity,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCert>, ManagerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut snapshots = self.subscribe();
        loop {
            if let Some(cert) = snapshots.borrow_and_update().certs.get(identity) {
                return Ok(Arc::clone(cert));
            }
            // The sender lives in `self`, so `changed` cannot fail while we borrow `self`; treat
            // a failure like the deadline all the same.
            if !matches!(
                tokio::time::timeout_at(deadline, snapshots.changed()).await,
                Ok(Ok(()))
            ) {
                return Err(ManagerError::Timeout {
                    identity: identity.clone(),
                    timeout,
                    status: self.status(identity),
                });
            }
        }
    }

    fn status(&self, identity: &Identity) -> String {
        match self.inner.lock_state().workers.get(identity) {
            None => "the identity is not wanted (set_wanted has not listed it)".to_owned(),
            Some(Worker {
                last_error: Some(error),
                ..
            }) => format!("the last attempt failed: {error}"),
            Some(_) => "signing is in progress".to_owned(),
        }
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for worker in self.inner.lock_state().workers.values() {
            worker.task.abort();
        }
    }
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("trust_domain", &self.inner.ca.trust_domain())
            .field("wanted", &self.wanted())
            .field("generation", &self.snapshot().generation)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a snapshot with `change` applied to the certificates and the CA's current
    /// bundle. Callers hold the state lock, which serializes updates.
    fn update_snapshot(&self, change: impl FnOnce(&mut HashMap<Identity, Arc<WorkloadCert>>)) {
        let current = Arc::clone(&self.snapshots.borrow());
        let mut certs = current.certs.clone();
        change(&mut certs);
        let bundle = self.ca.trust_bundle();
        let bundle = if *current.bundle == bundle {
            Arc::clone(&current.bundle)
        } else {
            info!("the CA's trust bundle changed");
            Arc::new(bundle)
        };
        self.snapshots.send_replace(Arc::new(CertSnapshot {
            certs,
            bundle,
            generation: current.generation + 1,
        }));
    }

    /// The background task of `identity`: obtain, publish, sleep until rotation, repeat.
    async fn run(self: Arc<Self>, identity: Identity, token: u64) {
        let mut backoff = self.options.retry_initial;
        loop {
            match self.obtain(&identity).await {
                Ok(cert) => {
                    backoff = self.options.retry_initial;
                    let delay = rotation_delay(&cert, SystemTime::now(), random_unit());
                    info!(
                        %identity,
                        serial = %cert.serial_hex(),
                        not_after = %time::OffsetDateTime::from(cert.not_after()),
                        rotate_in_s = delay.as_secs(),
                        "obtained a workload certificate"
                    );
                    if !self.publish(&identity, token, Arc::new(cert)) {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    warn!(%identity, %error, retry_in = ?backoff, "obtaining a workload certificate failed");
                    if !self.record_failure(&identity, token, &error) {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.options.retry_max);
                }
            }
        }
    }

    async fn obtain(&self, identity: &Identity) -> Result<WorkloadCert, ManagerError> {
        let request_error = |source| ManagerError::Request {
            identity: identity.clone(),
            source: Box::new(source),
        };
        let key = WorkloadKey::generate().map_err(request_error)?;
        let csr_der = key.csr(identity).map_err(request_error)?;
        let issued = self
            .ca
            .sign(CsrRequest {
                csr_der,
                identity: identity.clone(),
                lifetime: self.options.lifetime,
            })
            .await
            .map_err(|source| ManagerError::Signing {
                identity: identity.clone(),
                source: Box::new(source),
            })?;
        WorkloadCert::new(identity.clone(), issued.chain, &key).map_err(|source| {
            ManagerError::InvalidIssued {
                identity: identity.clone(),
                source: Box::new(source),
            }
        })
    }

    /// Puts `cert` in the snapshot if the task `token` is still the one wanted for `identity`.
    fn publish(&self, identity: &Identity, token: u64, cert: Arc<WorkloadCert>) -> bool {
        let mut state = self.lock_state();
        match state.workers.get_mut(identity) {
            Some(worker) if worker.token == token => worker.last_error = None,
            _ => return false,
        }
        self.update_snapshot(|certs| {
            certs.insert(identity.clone(), cert);
        });
        true
    }

    /// Remembers the failure for [`CertManager::wait_for`]'s report; false if the task is stale.
    fn record_failure(&self, identity: &Identity, token: u64, error: &ManagerError) -> bool {
        match self.lock_state().workers.get_mut(identity) {
            Some(worker) if worker.token == token => {
                worker.last_error = Some(error.to_string());
                true
            }
            _ => false,
        }
    }
}

/// How long to wait before replacing `cert`: until about half its lifetime, shifted by up to
/// ±5 % of the lifetime (`unit` in `[0, 1)` picks where), never later than a tenth of the
/// lifetime before it expires, and never less than [`MIN_ROTATION_DELAY`].
fn rotation_delay(cert: &WorkloadCert, now: SystemTime, unit: f64) -> Duration {
    let lifetime = cert.lifetime();
    let spread = lifetime / 10;
    let earliest = cert
        .rotate_at()
        .checked_sub(spread / 2)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let target = earliest
        .checked_add(spread.mul_f64(unit.clamp(0.0, 1.0)))
        .unwrap_or(earliest);
    let latest = cert
        .not_after()
        .checked_sub(lifetime / 10)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    target
        .min(latest)
        .duration_since(now)
        .unwrap_or_default()
        .max(MIN_ROTATION_DELAY)
}

/// A random number in `[0, 1)` (0.5, the unshifted middle, if the generator fails).
fn random_unit() -> f64 {
    let mut bytes = [0_u8; 4];
    if fill_random(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests;
