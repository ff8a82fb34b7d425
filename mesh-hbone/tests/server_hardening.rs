//! Peers that are not HTTP/2 clients: each such connection ends within the handshake timeout
//! with an error, while other clients keep working.

mod common;

use std::time::Duration;

use common::{echo_handler, random_bytes, round_trip, TestServer};
use mesh_hbone::{HboneError, OutboundRequest, Pool, PoolConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);
const WAIT: Duration = Duration::from_secs(10);

/// An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Waits for the server to close `socket` (EOF or reset), draining what it sends.
async fn closed_by_server(socket: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(WAIT, socket.read_to_end(&mut sink))
        .await
        .is_ok()
}

#[tokio::test]
async fn bad_peers_are_dropped_while_others_keep_working() {
    let config = ServerConfig {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ..ServerConfig::default()
    };
    let mut server = TestServer::start(config, echo_handler()).await;

    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut partial_preface = TcpStream::connect(server.addr).await.unwrap();
    partial_preface.write_all(&PREFACE[..10]).await.unwrap();
    let mut partial_settings = TcpStream::connect(server.addr).await.unwrap();
    partial_settings.write_all(PREFACE).await.unwrap();
    partial_settings
        .write_all(&EMPTY_SETTINGS[..4])
        .await
        .unwrap();
    // A complete preface and SETTINGS, then silence: never answers the server's PING.
    let mut mute = TcpStream::connect(server.addr).await.unwrap();
    mute.write_all(PREFACE).await.unwrap();
    mute.write_all(&EMPTY_SETTINGS).await.unwrap();

    // Meanwhile a real client works, repeatedly, for longer than the handshake timeout.
    let pool = Pool::new(common::TcpConnector::default(), PoolConfig::default());
    for i in 0..4 {
        let data = random_bytes(i, 256 * 1024);
        let stream = pool
            .open(
                &server.addr,
                OutboundRequest::new("10.0.0.1:80".parse().unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(round_trip(stream, &data).await.unwrap(), data);
        tokio::time::sleep(HANDSHAKE_TIMEOUT / 3).await;
    }

    for socket in [
        &mut silent,
        &mut partial_preface,
        &mut partial_settings,
        &mut mute,
    ] {
        assert!(closed_by_server(socket).await, "server kept a bad peer");
    }
    for _ in 0..4 {
        let result = server.next_result(WAIT).await;
        assert!(
            matches!(result, Err(HboneError::HandshakeTimeout(t)) if t == HANDSHAKE_TIMEOUT),
            "{result:?}"
        );
    }

    // The real client's connection is still up and usable.
    assert_eq!(pool.connections(), 1);
    let stream = pool
        .open(
            &server.addr,
            OutboundRequest::new("10.0.0.1:80".parse().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(
        round_trip(stream, b"still fine").await.unwrap(),
        b"still fine"
    );
    assert_eq!(pool.connections_opened(), 1);
}

#[tokio::test]
async fn garbage_and_broken_frames_end_the_connection_with_an_error() {
    let config = ServerConfig {
        // Long: these must fail on their content, not on the timeout.
        handshake_timeout: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start(config, echo_handler()).await;

    let mut http1 = TcpStream::connect(server.addr).await.unwrap();
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut http1).await);
    let result = server.next_result(WAIT).await;
    assert!(
        matches!(result, Err(HboneError::Handshake(_))),
        "{result:?}"
    );

    let mut random = TcpStream::connect(server.addr).await.unwrap();
    random.write_all(&random_bytes(3, 4096)).await.unwrap();
    assert!(closed_by_server(&mut random).await);
    let result = server.next_result(WAIT).await;
    assert!(
        matches!(result, Err(HboneError::Handshake(_))),
        "{result:?}"
    );

    // A valid preface followed by a SETTINGS frame whose length is not a multiple of 6.
    let mut broken = TcpStream::connect(server.addr).await.unwrap();
    broken.write_all(PREFACE).await.unwrap();
    broken
        .write_all(&[0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    assert!(closed_by_server(&mut broken).await);
    let result = server.next_result(WAIT).await;
    assert!(matches!(result, Err(HboneError::Http2(_))), "{result:?}");

    // The server still serves real clients.
    let pool = Pool::new(common::TcpConnector::default(), PoolConfig::default());
    let stream = pool
        .open(
            &server.addr,
            OutboundRequest::new("10.0.0.1:80".parse().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"ok").await.unwrap(), b"ok");
}

/// Reads one frame: (type, flags, payload).
async fn read_frame(socket: &mut TcpStream) -> (u8, u8, Vec<u8>) {
    let mut header = [0u8; 9];
    socket.read_exact(&mut header).await.unwrap();
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; len];
    socket.read_exact(&mut payload).await.unwrap();
    (header[3], header[4], payload)
}

/// A peer that completes the handshake and answers the first PING, then goes silent (socket
/// open, nothing read or sent), is dropped by the keepalive.
#[tokio::test]
async fn unresponsive_peer_is_dropped_by_keepalive() {
    const PING: u8 = 6;
    const SETTINGS: u8 = 4;
    const ACK: u8 = 1;
    let config = ServerConfig {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start(config, echo_handler()).await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(PREFACE).await.unwrap();
    socket.write_all(&EMPTY_SETTINGS).await.unwrap();
    loop {
        let (kind, flags, payload) = tokio::time::timeout(WAIT, read_frame(&mut socket))
            .await
            .unwrap();
        if kind == SETTINGS && flags & ACK == 0 {
            socket
                .write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0])
                .await
                .unwrap();
        }
        if kind == PING && flags & ACK == 0 {
            let mut ack = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
            ack.extend_from_slice(&payload);
            socket.write_all(&ack).await.unwrap();
            break;
        }
    }
    // The handshake passed; now silence.
    let result = server.next_result(WAIT).await;
    assert!(
        matches!(result, Err(HboneError::KeepaliveTimeout(_))),
        "{result:?}"
    );
    drop(socket);
}
