//! The client pool: sharing, limits, single flight, failures, idle close.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{echo_handler, eventually, random_bytes, round_trip, TcpConnector, TestServer};
use mesh_hbone::{HboneError, OutboundRequest, Pool, PoolConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn target() -> std::net::SocketAddr {
    "10.0.0.1:8080".parse().unwrap()
}

/// 1,000 simultaneous tunnels of 64 KiB each through one pool with the default cap of 128
/// streams per connection: all byte-exact, on about eight connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams() {
    const STREAMS: u64 = 1000;
    let server = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let connector = TcpConnector::default();
    let pool = Pool::new(connector.clone(), PoolConfig::default());
    let cap = pool.config().max_streams_per_connection;

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let pool = pool.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let data = random_bytes(i, 64 * 1024);
            let stream = pool.open(&addr, OutboundRequest::new(target())).await?;
            let echoed = round_trip(stream, &data)
                .await
                .map_err(HboneError::Connect)?;
            Ok::<bool, HboneError>(echoed == data)
        }));
    }
    for task in tasks {
        assert!(
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
            "echo differs"
        );
    }
    let streams = usize::try_from(STREAMS).unwrap();
    let max_conns = streams.div_ceil(cap) + 2;
    let opened = usize::try_from(pool.connections_opened()).unwrap();
    assert!(
        opened <= max_conns,
        "{opened} connections for {streams} streams"
    );
    assert!(opened >= streams.div_ceil(cap), "cap of {cap} exceeded");
    assert!(connector.attempts.load(Ordering::SeqCst) <= max_conns);
    assert!(server.accepted.load(Ordering::SeqCst) <= max_conns);
    assert_eq!(pool.streams_opened(), STREAMS);
    assert!(eventually(WAIT, || pool.active_streams() == 0).await);
    assert_eq!(pool.connections(), opened);
}

/// Sequential requests reuse one connection; a stream that ended frees its slot.
#[tokio::test]
async fn connections_are_reused_up_to_the_cap() {
    let server = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let pool = Pool::new(
        TcpConnector::default(),
        PoolConfig {
            max_streams_per_connection: 2,
            ..PoolConfig::default()
        },
    );
    let a = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    let b = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(pool.connections_for(&server.addr), 1);
    let c = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(pool.connections_for(&server.addr), 2);
    assert_eq!(pool.active_streams(), 3);
    for stream in [a, b, c] {
        assert_eq!(round_trip(stream, b"abc").await.unwrap(), b"abc");
    }
    assert_eq!(pool.active_streams(), 0);
    // Both connections have room again: no third connection.
    for _ in 0..4 {
        let s = pool
            .open(&server.addr, OutboundRequest::new(target()))
            .await
            .unwrap();
        assert_eq!(round_trip(s, b"x").await.unwrap(), b"x");
    }
    assert_eq!(pool.connections_opened(), 2);
    assert_eq!(pool.streams_opened(), 7);
}

/// A server advertising `SETTINGS_MAX_CONCURRENT_STREAMS` 3 gets at most 3 streams per
/// connection even though the pool's cap is 128.
#[tokio::test]
async fn server_stream_limit_is_respected() {
    let config = ServerConfig {
        max_concurrent_streams: 3,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, echo_handler()).await;
    let pool = Pool::new(TcpConnector::default(), PoolConfig::default());
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            pool.open(&server.addr, OutboundRequest::new(target()))
                .await
                .unwrap(),
        );
    }
    assert_eq!(pool.connections(), 1);
    for _ in 0..3 {
        open.push(
            tokio::time::timeout(
                WAIT,
                pool.open(&server.addr, OutboundRequest::new(target())),
            )
            .await
            .expect("a stream over the server's limit must go to a new connection")
            .unwrap(),
        );
    }
    assert_eq!(pool.connections(), 2);
    for stream in open {
        assert_eq!(round_trip(stream, b"ok").await.unwrap(), b"ok");
    }
}

/// Concurrent requests while the connection is being established share it: one connect
/// attempt, and its failure is every waiter's error. The failed connection leaves the pool.
#[tokio::test]
async fn concurrent_requests_share_one_connection_attempt() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let connector = TcpConnector::default();
    let pool = Pool::new(connector.clone(), PoolConfig::default());
    let results = futures_util::future::join_all(
        (0..50).map(|_| pool.open(&closed, OutboundRequest::new(target()))),
    )
    .await;
    for result in results {
        match result {
            Err(HboneError::ConnectionFailed(cause)) => {
                assert!(matches!(*cause, HboneError::Connect(_)), "{cause:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(connector.attempts.load(Ordering::SeqCst), 1);
    assert_eq!(pool.connections(), 0);
    assert_eq!(pool.connections_opened(), 0);
}

/// A connector that never answers is cut off by the connect timeout.
#[tokio::test]
async fn connect_timeout_applies() {
    struct Never;
    impl mesh_hbone::Connect for Never {
        type Io = tokio::io::DuplexStream;
        type Key = u8;
        fn connect(
            &self,
            _key: &u8,
        ) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send {
            std::future::pending()
        }
    }
    let pool = Pool::new(
        Never,
        PoolConfig {
            connect_timeout: Duration::from_millis(200),
            ..PoolConfig::default()
        },
    );
    let err = tokio::time::timeout(WAIT, pool.open(&1, OutboundRequest::new(target())))
        .await
        .unwrap()
        .unwrap_err();
    match err {
        HboneError::ConnectionFailed(cause) => {
            assert!(matches!(*cause, HboneError::ConnectTimeout(_)), "{cause:?}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(pool.connections(), 0);
}

/// A connection that dies leaves the pool, its streams fail, and the next request opens a new
/// connection.
#[tokio::test]
async fn dead_connection_is_removed_and_replaced() {
    let server = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let pool = Pool::new(TcpConnector::default(), PoolConfig::default());
    let mut stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(pool.connections(), 1);

    server.kill_connections();
    let read = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .unwrap();
    assert!(
        read.is_err(),
        "a dead connection must not read as EOF: {read:?}"
    );
    assert!(eventually(WAIT, || pool.connections() == 0).await);
    drop(stream);

    let stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"after").await.unwrap(), b"after");
    assert_eq!(pool.connections_opened(), 2);
}

/// A connection without streams for the idle timeout is closed (the server sees the client
/// leave cleanly); one with an open stream is kept however long the stream lasts.
#[tokio::test]
async fn idle_connection_is_closed() {
    let mut server = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let idle_timeout = Duration::from_millis(300);
    let pool = Pool::new(
        TcpConnector::default(),
        PoolConfig {
            idle_timeout,
            ..PoolConfig::default()
        },
    );
    let mut stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    // Busy for longer than the idle timeout: kept.
    tokio::time::sleep(idle_timeout * 3).await;
    assert_eq!(pool.connections(), 1);
    stream.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    stream.shutdown().await.unwrap();
    assert_eq!(stream.read(&mut buf).await.unwrap(), 0);
    drop(stream);

    assert!(eventually(WAIT, || pool.connections() == 0).await);
    server.next_result(WAIT).await.unwrap();
    assert_eq!(pool.connections_opened(), 1);

    // The pool opens a new connection on demand afterwards.
    let stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(round_trip(stream, b"again").await.unwrap(), b"again");
    assert_eq!(pool.connections_opened(), 2);
}

/// Keys are kept apart: different keys never share a connection.
#[tokio::test]
async fn keys_do_not_share_connections() {
    let one = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let two = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let pool = Arc::new(Pool::new(TcpConnector::default(), PoolConfig::default()));
    let a = pool
        .open(&one.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    let b = pool
        .open(&two.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(pool.connections_for(&one.addr), 1);
    assert_eq!(pool.connections_for(&two.addr), 1);
    assert_eq!(pool.connections(), 2);
    assert_eq!(round_trip(a, b"1").await.unwrap(), b"1");
    assert_eq!(round_trip(b, b"2").await.unwrap(), b"2");
    assert_eq!(one.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(two.accepted.load(Ordering::SeqCst), 1);
}

/// A server that answers one stream per connection and then sends GOAWAY (graceful shutdown),
/// keeping that stream open.
async fn one_stream_per_connection_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(socket).await.unwrap();
                let Some(Ok((_request, mut respond))) = conn.accept().await else {
                    return;
                };
                let response = http::Response::new(());
                let mut send = respond.send_response(response, false).unwrap();
                send.send_data(bytes::Bytes::from_static(b"first"), false)
                    .unwrap();
                conn.graceful_shutdown();
                // Refuse anything else, keep driving the connection until it ends.
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let mut response = http::Response::new(());
                    *response.status_mut() = http::StatusCode::IM_A_TEAPOT;
                    let _ = respond.send_response(response, true);
                }
                drop(send);
            });
        }
    });
    addr
}

/// After the server's GOAWAY the connection takes no new streams: a request that finds it in
/// the pool is retried on a new connection, and the old stream keeps working.
#[tokio::test]
async fn connection_that_got_goaway_is_not_reused() {
    let addr = one_stream_per_connection_server().await;
    let pool = Pool::new(TcpConnector::default(), PoolConfig::default());
    let mut first = pool
        .open(&addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    let mut buf = [0u8; 5];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"first");
    // Let the GOAWAY arrive; the first stream keeps the connection (and its pool entry) alive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = pool
        .open(&addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    second.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"first");
    assert_eq!(pool.connections_opened(), 2);
    assert_eq!(pool.streams_opened(), 2);
}

/// Dropping the pool does not cut open streams; their connection closes once they end.
#[tokio::test]
async fn dropping_the_pool_keeps_open_streams() {
    let mut server = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let pool = Pool::new(TcpConnector::default(), PoolConfig::default());
    let stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    drop(pool);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let data = random_bytes(11, 512 * 1024);
    assert_eq!(round_trip(stream, &data).await.unwrap(), data);
    // The stream is gone: the client closes the connection, which the server sees as a clean
    // end.
    server.next_result(WAIT).await.unwrap();
}

/// `close_where` takes a key's connections out of the pool: a stream open on one finishes,
/// the connection then closes, and the next request for that key opens a new one; other keys
/// keep theirs.
#[tokio::test]
async fn connections_of_a_closed_key_end_after_their_streams() {
    let one = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let two = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let pool = Pool::new(TcpConnector::default(), PoolConfig::default());
    let open = pool
        .open(&one.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    let other = pool
        .open(&two.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(round_trip(other, b"b").await.unwrap(), b"b");
    assert_eq!(pool.close_where(|key| *key == one.addr), 1);
    assert_eq!(
        pool.connections_for(&one.addr),
        0,
        "out of the pool at once"
    );
    assert_eq!(
        pool.connections_for(&two.addr),
        1,
        "the other key keeps its own"
    );
    assert_eq!(
        round_trip(open, b"still served").await.unwrap(),
        b"still served",
        "the open stream finishes"
    );
    let again = pool
        .open(&one.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(round_trip(again, b"new").await.unwrap(), b"new");
    assert_eq!(
        pool.connections_opened(),
        3,
        "a new connection for the closed key"
    );
    assert_eq!(one.accepted.load(Ordering::SeqCst), 2);
}
