//! `dns-serve <addr> --answer NAME=IPV4...`: a name server for the testbed (UDP), the stand-in
//! for the resolver a waypoint asks about a `ServiceEntry`'s names. It answers `A` queries for
//! the names given (TTL 5 s), an empty answer for their other types, and `NXDOMAIN` for any
//! other name. Prints `listening <addr>`, then `query <name> <type>` per query.

use std::{collections::HashMap, io::Write as _, net::Ipv4Addr, net::UdpSocket};

use mesh_tests::dns_reply::{reply, Known};

/// Time to live of the answers, in seconds.
const TTL: u32 = 5;

/// Parses the flags: the answers, by lowercase name without the final dot.
pub fn parse(args: &[&str]) -> Result<HashMap<String, Vec<Ipv4Addr>>, String> {
    let mut answers: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        if *flag != "--answer" {
            return Err(format!("unknown flag {flag:?}"));
        }
        let value = rest.next().ok_or("--answer needs NAME=IPV4")?;
        let (name, ip) = value
            .split_once('=')
            .ok_or_else(|| format!("--answer {value:?}: not NAME=IPV4"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("--answer {value:?}: {e}"))?;
        answers
            .entry(name.trim_end_matches('.').to_ascii_lowercase())
            .or_default()
            .push(ip);
    }
    Ok(answers)
}

/// Serves for ever.
pub fn run(addr: &str, answers: &HashMap<String, Vec<Ipv4Addr>>) -> Result<(), String> {
    let socket = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    println!("listening {local}");
    let _ = std::io::stdout().flush();
    let mut buffer = vec![0u8; 4096];
    loop {
        let (n, peer) = socket
            .recv_from(&mut buffer)
            .map_err(|e| format!("receive: {e}"))?;
        if let Some(reply) = answer(&buffer[..n], answers) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// The reply to the query in `packet`; `None` for what is no query.
fn answer(packet: &[u8], answers: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    reply(packet, TTL, |name, query_type| {
        println!("query {name} {query_type}");
        let _ = std::io::stdout().flush();
        match answers.get(name) {
            None => Known::NoSuchName,
            Some(ips) => Known::Addresses(ips.clone()),
        }
    })
}
