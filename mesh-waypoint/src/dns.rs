//! Names resolved for `ServiceEntries` of resolution `DNS`: each answer is an endpoint, reached
//! in plain TCP (a name's answers are outside the cluster's pods as far as the waypoint can
//! tell), as Envoy's `STRICT_DNS` cluster has them; `DNS_ROUND_ROBIN` takes each name's first
//! answer (Envoy's `LOGICAL_DNS`). Answers are kept for their TTL by the resolver's cache, so a
//! request resolves only when a name's answer has expired. The name servers are the pod's
//! (`/etc/resolv.conf`), or those `--dns-server` names. The resolver is made when the first
//! name is asked for: a waypoint without such entries keeps none of it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    TokioResolver,
};
use mesh_cluster::{DnsName, Endpoint, Service};
use tracing::{debug, warn};

/// A Service whose names do not resolve is warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Why a name gave no endpoint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    #[error("no resolver: {0}")]
    NoResolver(String),
    #[error("{host}: {reason}")]
    Lookup { host: String, reason: String },
}

/// The waypoint's resolver.
pub(crate) struct Dns {
    /// The name servers given (`--dns-server`); empty: the system's.
    servers: Vec<SocketAddr>,
    resolver: std::sync::OnceLock<Result<TokioResolver, String>>,
    /// When each Service's failure was last warned about.
    warned: Mutex<HashMap<String, Instant>>,
}

impl Dns {
    /// A resolver (made at its first use) asking `servers` (UDP, then TCP), or, when none is
    /// given, the name servers of the system's configuration. A configuration that cannot be
    /// read leaves names unresolved, each failure naming why.
    pub(crate) fn new(servers: &[SocketAddr]) -> Self {
        Self {
            servers: servers.to_vec(),
            resolver: std::sync::OnceLock::new(),
            warned: Mutex::default(),
        }
    }

    /// The resolver, made now if not yet.
    fn resolver(&self) -> &Result<TokioResolver, String> {
        self.resolver.get_or_init(|| Self::make(&self.servers))
    }

    fn make(servers: &[SocketAddr]) -> Result<TokioResolver, String> {
        let resolver = if servers.is_empty() {
            TokioResolver::builder_tokio()
                .map(hickory_resolver::ResolverBuilder::build)
                .map_err(|e| format!("the system's resolver configuration: {e}"))
        } else {
            let name_servers = servers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    NameServerConfig::new(server.ip(), true, vec![udp, tcp])
                })
                .collect();
            let config = ResolverConfig::from_name_servers(name_servers);
            Ok(TokioResolver::builder_with_config(config, TokioRuntimeProvider::default()).build())
        };
        let resolver = resolver.and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = &resolver {
            warn!(error = %e, "no DNS resolver: ServiceEntries of resolution DNS have no endpoint");
        }
        resolver
    }

    /// The endpoints `service`'s `port` has by its names (none for a Service without); a
    /// failure is warned about (at most every [`WARN_EVERY`] per Service) and leaves only the
    /// port's other endpoints, so the request is answered 503 when there are none.
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
        match self.endpoints(names, first_only).await {
            Ok(endpoints) => endpoints,
            Err(e) => {
                let now = Instant::now();
                let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
                let last = warned.get(&service.hostname).copied();
                if last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                    warned.insert(service.hostname.clone(), now);
                    warn!(service = %service.hostname, error = %e, "the entry's names did not resolve");
                }
                Vec::new()
            }
        }
    }

    /// The endpoints `names` resolve to (each name's first answer only, with `first_only`), in
    /// plain TCP. Names that fail are left out; when every one does, the first failure.
    pub(crate) async fn endpoints(
        &self,
        names: &[DnsName],
        first_only: bool,
    ) -> Result<Vec<Endpoint>, DnsError> {
        let resolver = self
            .resolver()
            .as_ref()
            .map_err(|e| DnsError::NoResolver(e.clone()))?;
        let mut endpoints = Vec::new();
        let mut failure = None;
        for name in names {
            // Absolute: an entry's host is a full name, never one of the search domains'.
            let absolute = format!("{}.", name.host.trim_end_matches('.'));
            match resolver.lookup_ip(absolute.as_str()).await {
                Ok(answers) => {
                    let answers = answers.iter().take(if first_only { 1 } else { usize::MAX });
                    endpoints.extend(answers.map(|ip| Endpoint {
                        addr: SocketAddr::new(ip.to_canonical(), name.port),
                        workload: None,
                    }));
                }
                Err(e) => {
                    debug!(host = %name.host, error = %e, "no answer");
                    failure.get_or_insert(DnsError::Lookup {
                        host: name.host.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        match failure {
            Some(failure) if endpoints.is_empty() => Err(failure),
            _ => {
                endpoints.sort_by_key(|e| e.addr);
                endpoints.dedup_by_key(|e| e.addr);
                Ok(endpoints)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use hickory_proto::{
        op::{Message, MessageType, Metadata, ResponseCode},
        rr::{rdata::A, RData, Record, RecordType},
    };
    use mesh_cluster::DnsName;

    use super::{Dns, DnsError};

    /// A name server on the loopback that knows `two.test` (two addresses).
    async fn name_server() -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let (n, peer) = socket.recv_from(&mut buffer).await.unwrap();
                let request = Message::from_vec(&buffer[..n]).unwrap();
                let mut response = Message::new(
                    request.metadata.id,
                    MessageType::Response,
                    request.metadata.op_code,
                );
                response.metadata = Metadata::response_from_request(&request.metadata);
                let query = request.queries[0].clone();
                response.queries.push(query.clone());
                if query.name().to_ascii() != "two.test." {
                    response.metadata.response_code = ResponseCode::NXDomain;
                } else if query.query_type() == RecordType::A {
                    for last in [1, 2] {
                        response.answers.push(Record::from_rdata(
                            query.name().clone(),
                            5,
                            RData::A(A(Ipv4Addr::new(192, 0, 2, last))),
                        ));
                    }
                }
                socket
                    .send_to(&response.to_vec().unwrap(), peer)
                    .await
                    .unwrap();
            }
        });
        addr
    }

    fn name(host: &str) -> DnsName {
        DnsName {
            host: host.to_owned(),
            port: 8443,
        }
    }

    #[tokio::test]
    async fn every_answer_or_the_first_and_a_failure_named() {
        let dns = Dns::new(&[name_server().await]);
        let addrs = |endpoints: Vec<mesh_cluster::Endpoint>| -> Vec<String> {
            endpoints.iter().map(|e| e.addr.to_string()).collect()
        };
        let all = dns.endpoints(&[name("two.test")], false).await.unwrap();
        assert_eq!(addrs(all), ["192.0.2.1:8443", "192.0.2.2:8443"]);
        let first = dns.endpoints(&[name("two.test")], true).await.unwrap();
        assert_eq!(addrs(first), ["192.0.2.1:8443"]);
        // One name failing leaves the other's answers; all failing is an error naming the name.
        let some = dns
            .endpoints(&[name("none.test"), name("two.test")], true)
            .await
            .unwrap();
        assert_eq!(addrs(some), ["192.0.2.1:8443"]);
        match dns.endpoints(&[name("none.test")], false).await {
            Err(DnsError::Lookup { host, .. }) => assert_eq!(host, "none.test"),
            other => panic!("{other:?}"),
        }
    }
}
