//! Local ports for the agent's connections to a pod's applications (the delivery leg).
//!
//! The agent binds each such socket to the pod's address before connecting, so the kernel's
//! short-cut and the application's view of its peer can be registered before the application
//! can accept. Bound with port 0, the kernel would give each socket a port no other socket holds,
//! `TIME_WAIT` ones included: when clients close first, the agent's legs end in `TIME_WAIT` in
//! the destination pod, and the pod would run out of ports after ~28,000 such connections a
//! minute, summed over all its clients (a direct connection leaves its `TIME_WAIT` in each
//! client). So the agent chooses the port itself, in turn over the pod's ephemeral range, with
//! `SO_REUSEADDR`: a port that only `TIME_WAIT` sockets hold can be bound, and `connect()` takes
//! over a `TIME_WAIT` of the same 4-tuple (the kernel allows it for explicitly bound sockets with
//! TCP timestamps). A port held by a socket without `SO_REUSEADDR` or a listener refuses the
//! bind, and a live connection with the same 4-tuple refuses the connect; both move on to the
//! next port.

use std::{
    fs,
    ops::RangeInclusive,
    sync::atomic::{AtomicU32, Ordering},
};

use tracing::warn;

use crate::netns::Netns;

/// Where the kernel keeps a namespace's ephemeral range (read from inside the namespace).
const RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default range, used if a pod's cannot be read.
const DEFAULT_RANGE: RangeInclusive<u16> = 32_768..=60_999;

/// A pod's ephemeral range and the next port to try.
#[derive(Debug)]
pub struct LegPorts {
    first: u16,
    count: u32,
    next: AtomicU32,
}

impl LegPorts {
    /// The ports of `range`, starting at `start` (taken modulo the range's size).
    pub fn new(range: RangeInclusive<u16>, start: u32) -> Self {
        let (first, last) = (*range.start(), (*range.end()).max(*range.start()));
        let count = u32::from(last - first) + 1;
        Self {
            first,
            count,
            next: AtomicU32::new(start % count),
        }
    }

    /// The range of the pod in `netns`, as the pod's own kernel settings give it (read once, when
    /// the pod is enrolled), starting from a port chosen by the clock so that restarts and pods
    /// do not all begin at the same one.
    pub fn of(netns: &Netns, pod: &str) -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let range = netns
            .run(|| fs::read_to_string(RANGE_FILE))
            .map_err(|e| e.to_string())
            .and_then(|text| parse_range(&text));
        match range {
            Ok(range) => Self::new(range, start),
            Err(error) => {
                warn!(pod, %error, file = RANGE_FILE, "reading the pod's ephemeral ports; using Linux's default range");
                Self::new(DEFAULT_RANGE, start)
            }
        }
    }

    /// How many ports the range has: the most binds worth trying for one connection.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The next port to try.
    pub fn next(&self) -> u16 {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.count;
        // `i < count <= 65536 - first`, so the sum fits.
        u16::try_from(u32::from(self.first) + i).expect("port within the range")
    }
}

/// `"<first>\t<last>\n"`, as the kernel writes the range.
fn parse_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(first)), Some(Ok(last)), None) if first >= 1 && first <= last => Ok(first..=last),
        _ => Err(format!("not a port range: {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_format_is_read() {
        assert_eq!(parse_range("32768\t60999\n"), Ok(32_768..=60_999));
        assert_eq!(parse_range("61000 61000"), Ok(61_000..=61_000));
        for bad in ["", "5", "10 5", "0 10", "1 2 3", "a b", "1 70000"] {
            assert!(parse_range(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ports_go_round_the_range_from_the_start() {
        let ports = LegPorts::new(100..=102, 4);
        let seen: Vec<u16> = (0..5).map(|_| ports.next()).collect();
        assert_eq!(seen, [101, 102, 100, 101, 102]);
        assert_eq!(ports.count(), 3);
        let top = LegPorts::new(65_535..=65_535, 7);
        assert_eq!((top.next(), top.next()), (65_535, 65_535));
    }

    #[test]
    fn a_pods_own_range_is_read_from_inside_its_namespace() {
        let netns = Netns::open(std::path::Path::new("/proc/self/ns/net")).expect("own namespace");
        let expected = parse_range(&fs::read_to_string(RANGE_FILE).expect("range")).expect("parse");
        let ports = LegPorts::of(&netns, "test/self");
        assert_eq!(
            ports.count(),
            u32::from(expected.end() - expected.start()) + 1
        );
        assert!(expected.contains(&ports.next()));
    }
}
