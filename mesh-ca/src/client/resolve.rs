//! How the client finds the CA's addresses: a pluggable [`Resolve`], system DNS by default.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs as _};

/// Turns the CA's host and port into addresses to try, in order. Called at every connection
/// (from a blocking thread), so a CA that moves is found again.
pub trait Resolve: Send + Sync {
    /// The addresses of `host` (a DNS name or an IP address) at `port`; empty when unknown.
    fn resolve(&self, host: &str, port: u16) -> Vec<SocketAddr>;
}

/// The system's resolver (`getaddrinfo`: `/etc/hosts`, then DNS).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> Vec<SocketAddr> {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(error) => {
                tracing::debug!(host, port, %error, "system DNS did not resolve the CA's host");
                Vec::new()
            }
        }
    }
}

/// Fixed addresses for every host (tests, or a CA reached through a known address).
#[derive(Clone, Debug)]
pub struct StaticResolver(pub Vec<SocketAddr>);

impl Resolve for StaticResolver {
    fn resolve(&self, _host: &str, _port: u16) -> Vec<SocketAddr> {
        self.0.clone()
    }
}

/// `host:port` for messages, with brackets around an IPv6 address.
pub(crate) struct Named<'a>(pub(crate) &'a str, pub(crate) u16);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.contains(':') {
            write!(f, "[{}]:{}", self.0, self.1)
        } else {
            write!(f, "{}:{}", self.0, self.1)
        }
    }
}
