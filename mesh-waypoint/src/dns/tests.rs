use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, Metadata, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME, SOA},
        Name, RData, Record, RecordType,
    },
};
use mesh_cluster::DnsName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
};

use super::{conf::Servers, Dns, DnsError};

/// What the test's name server knows and does.
#[derive(Default)]
struct Zone {
    /// Questions asked, over UDP and TCP.
    asked: AtomicUsize,
    /// Whether it stays silent.
    silent: AtomicBool,
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap()
}

fn record(owner: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(name(owner), ttl, data)
}

/// The answer to `request`: `two.test` has two A records, `alias.test` is a CNAME of it,
/// `six.test` has only an AAAA record, `big.test` is truncated over UDP; any other name does
/// not exist (with an SOA whose negative TTL is 2 s).
fn answer(request: &Message, tcp: bool) -> Message {
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata = Metadata::response_from_request(&request.metadata);
    let query = request.queries[0].clone();
    response.queries.push(query.clone());
    let host = query.name().to_ascii();
    let a = |last| RData::A(A(Ipv4Addr::new(192, 0, 2, last)));
    match (host.as_str(), query.query_type()) {
        ("two.test.", RecordType::A) => {
            response.answers = vec![record("two.test.", 1, a(1)), record("two.test.", 60, a(2))];
        }
        ("alias.test.", RecordType::A) => {
            response.answers = vec![
                record("alias.test.", 60, RData::CNAME(CNAME(name("two.test.")))),
                record("two.test.", 60, a(1)),
                // Not on the chain: not an address of alias.test.
                record("other.test.", 60, a(9)),
            ];
        }
        ("six.test.", RecordType::AAAA) => {
            let six = RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 6)));
            response.answers = vec![record("six.test.", 60, six)];
        }
        ("big.test.", RecordType::A) if !tcp => response.metadata.truncation = true,
        ("big.test.", RecordType::A) => response.answers = vec![record("big.test.", 60, a(7))],
        ("two.test." | "six.test." | "big.test." | "alias.test.", _) => {}
        _ => {
            response.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(name("test."), name("admin.test."), 1, 60, 60, 60, 2);
            response.authorities = vec![record("test.", 60, RData::SOA(soa))];
        }
    }
    response
}

/// A name server on the loopback (UDP and TCP on one port) answering by [`answer`]; before
/// each real answer over UDP it sends garbage and an answer to another question.
async fn name_server(zone: Arc<Zone>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = TcpListener::bind(addr).await.unwrap();
    let udp_zone = Arc::clone(&zone);
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        loop {
            let (n, peer) = socket.recv_from(&mut buffer).await.unwrap();
            udp_zone.asked.fetch_add(1, Ordering::SeqCst);
            if udp_zone.silent.load(Ordering::SeqCst) {
                continue;
            }
            let request = Message::from_vec(&buffer[..n]).unwrap();
            let mut spoofed = answer(&request, false);
            spoofed.metadata.id = request.metadata.id.wrapping_add(1);
            spoofed.answers = vec![record(
                "two.test.",
                60,
                RData::A(A(Ipv4Addr::new(6, 6, 6, 6))),
            )];
            for datagram in [b"garbage".to_vec(), spoofed.to_vec().unwrap()] {
                socket.send_to(&datagram, peer).await.unwrap();
            }
            let response = answer(&request, false).to_vec().unwrap();
            socket.send_to(&response, peer).await.unwrap();
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            zone.asked.fetch_add(1, Ordering::SeqCst);
            let length = stream.read_u16().await.unwrap();
            let mut buffer = vec![0u8; usize::from(length)];
            stream.read_exact(&mut buffer).await.unwrap();
            let request = Message::from_vec(&buffer).unwrap();
            let response = answer(&request, true).to_vec().unwrap();
            let length = u16::try_from(response.len()).unwrap();
            stream.write_all(&length.to_be_bytes()).await.unwrap();
            stream.write_all(&response).await.unwrap();
        }
    });
    addr
}

/// A resolver asking only `server`, quickly.
fn dns(server: SocketAddr) -> Dns {
    let dns = Dns::new(&[server]);
    let servers = Servers {
        addrs: vec![server],
        timeout: Duration::from_millis(300),
        attempts: 1,
    };
    assert!(dns.servers.set(Ok(servers)).is_ok());
    dns
}

fn dns_name(host: &str) -> DnsName {
    DnsName {
        host: host.to_owned(),
        port: 8443,
    }
}

async fn addrs(dns: &Dns, hosts: &[&str], first_only: bool) -> (Vec<String>, Option<DnsError>) {
    let names: Vec<DnsName> = hosts.iter().map(|h| dns_name(h)).collect();
    let resolved = dns.endpoints(&names, first_only).await;
    let addrs = resolved
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    (addrs, resolved.failure)
}

#[tokio::test]
async fn every_answer_or_the_first_and_a_failure_named() {
    let dns = dns(name_server(Arc::default()).await);
    let (all, failure) = addrs(&dns, &["two.test"], false).await;
    // The spoofed datagram (another id) and the garbage are not taken.
    assert_eq!(all, ["192.0.2.1:8443", "192.0.2.2:8443"]);
    assert!(failure.is_none());
    let (first, _) = addrs(&dns, &["two.test"], true).await;
    assert_eq!(first, ["192.0.2.1:8443"]);
    // One name failing leaves the other's answers, and is named.
    let (some, failure) = addrs(&dns, &["none.test", "two.test"], true).await;
    assert_eq!(some, ["192.0.2.1:8443"]);
    match failure {
        Some(DnsError::NoSuchName { host }) => assert_eq!(host, "none.test"),
        other => panic!("{other:?}"),
    }
    let (none, failure) = addrs(&dns, &["none.test"], false).await;
    assert!(none.is_empty());
    assert!(
        matches!(failure, Some(DnsError::NoSuchName { .. })),
        "{failure:?}"
    );
}

#[tokio::test]
async fn cnames_followed_aaaa_asked_without_a_and_truncated_answers_over_tcp() {
    let dns = dns(name_server(Arc::default()).await);
    let (alias, _) = addrs(&dns, &["alias.test."], false).await;
    assert_eq!(alias, ["192.0.2.1:8443"]);
    let (six, failure) = addrs(&dns, &["six.test"], false).await;
    assert_eq!(six, ["[2001:db8::6]:8443"], "{failure:?}");
    let (big, failure) = addrs(&dns, &["big.test"], false).await;
    assert_eq!(big, ["192.0.2.7:8443"], "{failure:?}");
    let bad = dns.endpoints(&[dns_name("bad..name")], false).await;
    assert!(
        matches!(bad.failure, Some(DnsError::BadName { .. })),
        "{bad:?}"
    );
}

#[tokio::test]
async fn answers_kept_for_their_ttl_and_the_last_kept_when_no_server_answers() {
    let zone = Arc::new(Zone::default());
    let dns = dns(name_server(Arc::clone(&zone)).await);
    let asked = || zone.asked.load(Ordering::SeqCst);
    addrs(&dns, &["two.test"], false).await;
    assert_eq!(asked(), 1);
    // Within the TTL (1 s, the lesser of the two records'), nobody is asked.
    addrs(&dns, &["two.test"], false).await;
    assert_eq!(asked(), 1);
    // A name's absence is kept too (the SOA's 2 s).
    addrs(&dns, &["none.test"], false).await;
    addrs(&dns, &["none.test"], false).await;
    assert_eq!(asked(), 2);
    // Out of date, asked again; no answer keeps the last addresses, and names why.
    zone.silent.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (kept, failure) = addrs(&dns, &["two.test"], false).await;
    assert_eq!(asked(), 3);
    assert_eq!(kept, ["192.0.2.1:8443", "192.0.2.2:8443"]);
    match failure {
        Some(e @ DnsError::Unanswered { .. }) => {
            assert!(e.to_string().contains("no answer within 300ms"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // ... and is not asked again before the retry.
    addrs(&dns, &["two.test"], false).await;
    assert_eq!(asked(), 3);
}

#[tokio::test]
async fn many_requests_ask_once() {
    let zone = Arc::new(Zone::default());
    let dns = Arc::new(dns(name_server(Arc::clone(&zone)).await));
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let dns = Arc::clone(&dns);
            tokio::spawn(async move { addrs(&dns, &["two.test"], false).await.0 })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().len(), 2);
    }
    assert_eq!(zone.asked.load(Ordering::SeqCst), 1);
}
