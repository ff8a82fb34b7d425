//! The name servers the waypoint asks, and how patiently: `--dns-server`'s, or the pod's
//! `/etc/resolv.conf` read as the C library reads it (`nameserver` lines, at most three, port 53;
//! `options timeout:N attempts:N`; none given: the loopback's). Search domains and `ndots` do not
//! apply: an entry's host is always asked as an absolute name.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use tracing::warn;

/// The C library's limits and defaults (`resolv.h`).
const MAX_SERVERS: usize = 3;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_TIMEOUT_SECS: u64 = 30;
const DEFAULT_ATTEMPTS: u32 = 2;
const MAX_ATTEMPTS: u32 = 5;
const PORT: u16 = 53;

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub(crate) struct ConfError {
    path: String,
    source: std::io::Error,
}

/// Whom to ask, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Servers {
    /// Asked in this order, each in turn for every attempt.
    pub(crate) addrs: Vec<SocketAddr>,
    /// How long one server is waited for, per attempt.
    pub(crate) timeout: Duration,
    /// How many rounds over the servers a question gets.
    pub(crate) attempts: u32,
}

impl Servers {
    /// `addrs` (`--dns-server`), with the C library's timeout and attempts.
    pub(crate) fn given(addrs: &[SocketAddr]) -> Self {
        Self {
            addrs: addrs.to_vec(),
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        }
    }

    /// The servers `path` (a `resolv.conf`) names.
    pub(crate) fn read(path: &Path) -> Result<Self, ConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfError {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&text, &path.display().to_string()))
    }

    /// The servers `text` (the contents of `origin`) names; a line that cannot be read is warned
    /// about, naming `origin` and its line, and left out.
    pub(crate) fn parse(text: &str, origin: &str) -> Self {
        let mut servers = Self::given(&[]);
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with(['#', ';']) {
                continue;
            }
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => match words.next().map(server_address) {
                    Some(Ok(addr)) if servers.addrs.len() < MAX_SERVERS => servers.addrs.push(addr),
                    Some(Ok(addr)) => warn!(
                        file = origin, line = number + 1, %addr,
                        "more than {MAX_SERVERS} name servers: this one is not asked"
                    ),
                    Some(Err(word)) => warn!(
                        file = origin,
                        line = number + 1,
                        word,
                        "not a name server's address: left out"
                    ),
                    None => warn!(
                        file = origin,
                        line = number + 1,
                        "a nameserver line without an address"
                    ),
                },
                Some("options") => {
                    for option in words {
                        servers.option(option, origin, number + 1);
                    }
                }
                _ => {}
            }
        }
        if servers.addrs.is_empty() {
            servers
                .addrs
                .push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT));
        }
        servers
    }

    /// One word of an `options` line; those not about asking are none of the waypoint's concern.
    fn option(&mut self, option: &str, origin: &str, line: usize) {
        let (name, value) = option.split_once(':').unwrap_or((option, ""));
        match name {
            "timeout" => {
                if let Ok(secs) = value.parse::<u64>() {
                    self.timeout = Duration::from_secs(secs.clamp(1, MAX_TIMEOUT_SECS));
                } else {
                    warn!(
                        file = origin,
                        line, option, "not a number of seconds: ignored"
                    );
                }
            }
            "attempts" => {
                if let Ok(attempts) = value.parse::<u32>() {
                    self.attempts = attempts.clamp(1, MAX_ATTEMPTS);
                } else {
                    warn!(
                        file = origin,
                        line, option, "not a number of attempts: ignored"
                    );
                }
            }
            _ => {}
        }
    }
}

/// A `nameserver` line's address (an IPv6 one may name its interface after `%`, which the
/// waypoint, in its own namespace, has no use for: such a server is left out).
fn server_address(word: &str) -> Result<SocketAddr, &str> {
    word.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, PORT))
        .map_err(|_| word)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Servers;

    #[test]
    fn the_c_librarys_reading_of_resolv_conf() {
        let servers = Servers::parse(
            "# comment\nsearch default.svc.cluster.local svc.cluster.local\n\
             nameserver 10.96.0.10\nnameserver fd00::a\n; other comment\nnameserver not-an-ip\n\
             nameserver 10.0.0.3\nnameserver 10.0.0.4\noptions ndots:5 timeout:2 attempts:9\n",
            "resolv.conf",
        );
        let addrs: Vec<String> = servers.addrs.iter().map(ToString::to_string).collect();
        // At most three; the unreadable one left out.
        assert_eq!(addrs, ["10.96.0.10:53", "[fd00::a]:53", "10.0.0.3:53"]);
        assert_eq!(servers.timeout, Duration::from_secs(2));
        // Attempts are capped at five, as the C library does.
        assert_eq!(servers.attempts, 5);
    }

    #[test]
    fn without_servers_the_loopbacks_and_the_defaults() {
        let servers = Servers::parse("options timeout:x\n", "resolv.conf");
        assert_eq!(servers.addrs, ["127.0.0.1:53".parse().unwrap()]);
        assert_eq!(servers.timeout, Duration::from_secs(5));
        assert_eq!(servers.attempts, 2);
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Servers::read("/nonexistent/resolv.conf".as_ref()).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("reading /nonexistent/resolv.conf: "),
            "{error}"
        );
    }
}
