//! Names resolved for `ServiceEntries` of resolution `DNS`: each answer is an endpoint, reached
//! in plain TCP (a name's answers are outside the cluster's pods as far as the waypoint can
//! tell), as Envoy's `STRICT_DNS` cluster has them; `DNS_ROUND_ROBIN` takes each name's first
//! answer (Envoy's `LOGICAL_DNS`).
//!
//! The waypoint is its own stub resolver, on `hickory-proto`'s messages: it asks the name servers
//! of [`conf`] for a name's A records, then, when there are none, its AAAA records
//! ([`exchange`]), following the answer's CNAME chain. Answers are kept for their TTL (at least
//! [`MIN_TTL`], at most [`MAX_TTL`]); a name that does not exist or has no address, for the
//! negative TTL its zone's SOA gives (RFC 2308, within [`MIN_TTL`] and [`MAX_NEGATIVE_TTL`]).
//! When no server answers, the name's last addresses are kept, as Envoy keeps a cluster's hosts,
//! and asked for again after [`RETRY`]. One request at a time asks for a name: the others wait
//! for its answer, or, while a name's old answer is there, take it. The name servers are read
//! when the first name is asked for: a waypoint without such entries keeps none of it.

mod conf;
mod exchange;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{Name, RData, RecordType},
};
use mesh_cluster::{DnsName, Endpoint, Service};
use tracing::{debug, info, warn};

use self::{
    conf::{ConfError, Servers},
    exchange::ExchangeError,
};

/// A Service whose names do not resolve is warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// The shortest an answer is kept: a TTL of 0 would have every request ask.
const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest an answer is kept.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest a name's absence is kept, so a name made later is found soon.
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How long an absence is kept when the answer names no SOA, and how soon a name no server
/// answered for is asked for again (Envoy's DNS refresh rate).
const RETRY: Duration = Duration::from_secs(5);
/// The system's configuration.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Why a name gave no address (or only its last ones).
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum DnsError {
    #[error("no name servers: {0}")]
    NoServers(Arc<ConfError>),
    #[error("{host}: no name server to ask")]
    NoServer { host: String },
    #[error("{host}: not a DNS name: {reason}")]
    BadName { host: String, reason: String },
    #[error("{host}: no such name")]
    NoSuchName { host: String },
    #[error("{host}: the name has no address")]
    NoAddress { host: String },
    #[error("{host}: {server} answered {code}")]
    Refused {
        host: String,
        server: SocketAddr,
        code: ResponseCode,
    },
    #[error("{host}: {source}")]
    Unanswered {
        host: String,
        source: Arc<ExchangeError>,
    },
}

/// A name's addresses as last asked for, and until when they stand.
#[derive(Clone, Debug)]
struct Known {
    addrs: Arc<[IpAddr]>,
    /// Why the last question gave no addresses (those above are then the ones before, if any).
    failure: Option<DnsError>,
    until: Instant,
}

/// One name's cache entry.
#[derive(Default)]
struct Slot {
    known: Mutex<Option<Known>>,
    /// Held by the request asking for the name.
    asking: tokio::sync::Mutex<()>,
}

impl Slot {
    fn known(&self) -> Option<Known> {
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn fresh(&self) -> Option<Known> {
        self.known().filter(|known| known.until > Instant::now())
    }
}

/// What the names of a Service port gave.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) endpoints: Vec<Endpoint>,
    /// The first name's failure, if any did not resolve.
    pub(crate) failure: Option<DnsError>,
}

/// The waypoint's resolver.
pub(crate) struct Dns {
    /// The name servers given (`--dns-server`); empty: the system's.
    given: Vec<SocketAddr>,
    servers: OnceLock<Result<Servers, DnsError>>,
    names: Mutex<HashMap<String, Arc<Slot>>>,
    /// When each Service's failure was last warned about.
    warned: Mutex<HashMap<String, Instant>>,
}

impl Dns {
    /// A resolver asking `servers` (UDP, then TCP for a truncated answer), or, when none is
    /// given, the name servers of the system's configuration, read at the first question. A
    /// configuration that cannot be read leaves names unresolved, each failure naming why.
    pub(crate) fn new(servers: &[SocketAddr]) -> Self {
        Self {
            given: servers.to_vec(),
            servers: OnceLock::new(),
            names: Mutex::default(),
            warned: Mutex::default(),
        }
    }

    /// The name servers, read now if not yet.
    fn servers(&self) -> Result<&Servers, DnsError> {
        let servers = self.servers.get_or_init(|| {
            let servers = if self.given.is_empty() {
                Servers::read(Path::new(RESOLV_CONF)).map_err(|e| DnsError::NoServers(Arc::new(e)))
            } else {
                Ok(Servers::given(&self.given))
            };
            match &servers {
                Ok(s) => {
                    let (timeout, attempts) = (s.timeout, s.attempts);
                    info!(servers = ?s.addrs, ?timeout, attempts, "DNS name servers");
                }
                Err(e) => warn!(error = %e, "ServiceEntries of resolution DNS have no endpoint"),
            }
            servers
        });
        servers.as_ref().map_err(Clone::clone)
    }

    /// The endpoints `service`'s `port` has by its names (none for a Service without); a
    /// failure is warned about (at most every [`WARN_EVERY`] per Service) and leaves the port's
    /// other names' endpoints, and the failing name's last ones, so the request is answered 503
    /// when there are none.
    pub(crate) async fn endpoints_of(&self, service: &Service, port: u16) -> Vec<Endpoint> {
        let Some(first_only) = service.dns_first_answer() else {
            return Vec::new();
        };
        let Some(names) = service
            .ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| &p.dns)
            .filter(|names| !names.is_empty())
        else {
            return Vec::new();
        };
        let resolved = self.endpoints(names, first_only).await;
        if let Some(e) = &resolved.failure {
            let now = Instant::now();
            let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
            let last = warned.get(&service.hostname).copied();
            if last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                warned.insert(service.hostname.clone(), now);
                warn!(
                    service = %service.hostname, error = %e, endpoints = resolved.endpoints.len(),
                    "the entry's names did not all resolve"
                );
            }
        }
        resolved.endpoints
    }

    /// The endpoints `names` resolve to (each name's first answer only, with `first_only`), in
    /// plain TCP, and the first failure among them.
    pub(crate) async fn endpoints(&self, names: &[DnsName], first_only: bool) -> Resolved {
        let mut endpoints = Vec::new();
        let mut failure = None;
        for name in names {
            let known = match self.servers() {
                Ok(servers) => self.lookup(servers, &name.host).await,
                Err(e) => {
                    failure.get_or_insert(e);
                    continue;
                }
            };
            let answers = known
                .addrs
                .iter()
                .take(if first_only { 1 } else { usize::MAX });
            endpoints.extend(answers.map(|ip| Endpoint {
                addr: SocketAddr::new(ip.to_canonical(), name.port),
                workload: None,
            }));
            if let Some(e) = known.failure {
                failure.get_or_insert(e);
            }
        }
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        Resolved { endpoints, failure }
    }

    /// `host`'s slot, made if new (the slots of names no longer asked for, whose answers are
    /// out of date, go then).
    fn slot(&self, host: &str) -> Arc<Slot> {
        let key = host.trim_end_matches('.').to_ascii_lowercase();
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = names.get(&key) {
            return Arc::clone(slot);
        }
        names.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.fresh().is_some());
        Arc::clone(names.entry(key).or_default())
    }

    /// `host`'s addresses: kept ones while they stand, else asked for by this request, or by
    /// the one already asking (whose answer is waited for unless there are old ones to take).
    async fn lookup(&self, servers: &Servers, host: &str) -> Known {
        let slot = self.slot(host);
        let known = slot.known();
        if let Some(known) = known.as_ref().filter(|k| k.until > Instant::now()) {
            return known.clone();
        }
        let _asking = match (slot.asking.try_lock(), known) {
            (Ok(asking), _) => asking,
            (Err(_), Some(old)) => return old,
            (Err(_), None) => slot.asking.lock().await,
        };
        // Another request may have asked while this one waited.
        if let Some(known) = slot.fresh() {
            return known;
        }
        let previous = slot.known().map(|k| k.addrs);
        let known = resolve(servers, host, previous).await;
        *slot.known.lock().unwrap_or_else(PoisonError::into_inner) = Some(known.clone());
        known
    }
}

/// Asks the servers for `host`'s A records, then, if there are none, its AAAA records.
/// `previous`: the addresses to keep if no server answers.
async fn resolve(servers: &Servers, host: &str, previous: Option<Arc<[IpAddr]>>) -> Known {
    let now = Instant::now();
    let failed = |failure: DnsError, addrs: Option<Arc<[IpAddr]>>, kept: Duration| Known {
        addrs: addrs.unwrap_or_else(|| Arc::new([])),
        failure: Some(failure),
        until: now + kept,
    };
    let name = match Name::from_ascii(host) {
        Ok(mut name) => {
            // Absolute: an entry's host is a full name, never one of the search domains'.
            name.set_fqdn(true);
            name
        }
        Err(e) => {
            let failure = DnsError::BadName {
                host: host.to_owned(),
                reason: e.to_string(),
            };
            return failed(failure, None, MAX_NEGATIVE_TTL);
        }
    };
    let mut absent = MAX_NEGATIVE_TTL;
    for kind in [RecordType::A, RecordType::AAAA] {
        let answer = match ask(servers, host, &name, kind).await {
            Ok(answer) => answer,
            Err(failure) => return failed(failure, previous, RETRY),
        };
        absent = absent.min(negative_ttl(&answer));
        if answer.metadata.response_code == ResponseCode::NXDomain {
            let failure = DnsError::NoSuchName {
                host: host.to_owned(),
            };
            return failed(failure, None, absent);
        }
        let (addrs, ttl) = addresses(&answer, &name);
        if !addrs.is_empty() {
            debug!(host, ?addrs, ?ttl, "resolved");
            return Known {
                addrs: addrs.into(),
                failure: None,
                until: now + ttl,
            };
        }
    }
    let failure = DnsError::NoAddress {
        host: host.to_owned(),
    };
    failed(failure, None, absent)
}

/// The first answer of a name server that answers (with a name's records, or that it has
/// none): every server in turn, for the configured attempts.
async fn ask(
    servers: &Servers,
    host: &str,
    name: &Name,
    kind: RecordType,
) -> Result<Message, DnsError> {
    let mut last = None;
    for _ in 0..servers.attempts {
        for &server in &servers.addrs {
            match exchange::ask(server, name, kind, servers.timeout).await {
                Ok(answer)
                    if matches!(
                        answer.metadata.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    return Ok(answer)
                }
                Ok(answer) => {
                    last = Some(DnsError::Refused {
                        host: host.to_owned(),
                        server,
                        code: answer.metadata.response_code,
                    });
                }
                Err(e) => {
                    debug!(host, %server, error = %e, "no answer");
                    last = Some(DnsError::Unanswered {
                        host: host.to_owned(),
                        source: Arc::new(e),
                    });
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| DnsError::NoServer {
        host: host.to_owned(),
    }))
}

/// The addresses `answer` gives `name`, by its CNAME chain, and the least of their records'
/// TTLs (the chain's included).
fn addresses(answer: &Message, name: &Name) -> (Vec<IpAddr>, Duration) {
    let mut owner = name.clone();
    let mut ttl = u32::MAX;
    // Each CNAME moves the owner on; a chain longer than the answer is a loop.
    for _ in 0..=answer.answers.len() {
        let next = answer.answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if record.name == owner => Some((target.0.clone(), record.ttl)),
            _ => None,
        });
        let Some((target, cname_ttl)) = next else {
            break;
        };
        owner = target;
        ttl = ttl.min(cname_ttl);
    }
    let mut addrs = Vec::new();
    for record in answer.answers.iter().filter(|r| r.name == owner) {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        ttl = ttl.min(record.ttl);
        addrs.push(ip);
    }
    let ttl = Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL);
    (addrs, ttl)
}

/// How long `answer`'s absence of records stands: its SOA's (the lesser of the record's TTL and
/// its MINIMUM, RFC 2308), else [`RETRY`].
fn negative_ttl(answer: &Message) -> Duration {
    answer
        .authorities
        .iter()
        .find_map(|record| match &record.data {
            RData::SOA(soa) => Some(record.ttl.min(soa.minimum)),
            _ => None,
        })
        .map_or(RETRY, |secs| Duration::from_secs(u64::from(secs)))
        .clamp(MIN_TTL, MAX_NEGATIVE_TTL)
}

#[cfg(test)]
mod tests;
