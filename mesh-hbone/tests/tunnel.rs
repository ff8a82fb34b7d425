//! One tunnel end to end: bytes, half-closes, headers, status codes, resets, flow control.

mod common;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use common::{echo_handler, random_bytes, round_trip, TcpConnector, TestServer};
use http::{HeaderValue, StatusCode};
use mesh_hbone::{
    HboneError, InboundRequest, OutboundRequest, Pool, PoolConfig, Responder, ServerConfig,
    FORWARDED, TRACEPARENT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Mutex};

const WAIT: Duration = Duration::from_secs(10);

fn pool() -> Pool<TcpConnector> {
    Pool::new(TcpConnector::default(), PoolConfig::default())
}

fn target() -> SocketAddr {
    "10.0.0.1:8080".parse().unwrap()
}

#[tokio::test]
async fn echo_round_trip_is_byte_exact() {
    let server = TestServer::start(ServerConfig::default(), echo_handler()).await;
    let pool = pool();
    let data = random_bytes(7, 3 * 1024 * 1024 + 17);
    let stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    assert_eq!(round_trip(stream, &data).await.unwrap(), data);
    assert_eq!(pool.streams_opened(), 1);
}

/// The client half-closes first and keeps reading; then the server half-closes first and
/// keeps reading.
#[tokio::test]
async fn half_close_in_both_directions() {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let handler = move |req: InboundRequest, responder: Responder| {
        let done_tx = done_tx.clone();
        async move {
            let mut stream = responder.accept().unwrap();
            let mut got = Vec::new();
            if req.authority.port() == 1 {
                // Client writes and half-closes; we read to EOF, then answer and half-close.
                stream.read_to_end(&mut got).await.unwrap();
                stream.write_all(b"answer after your EOF").await.unwrap();
                stream.shutdown().await.unwrap();
            } else {
                // We speak first and half-close; then we read the client's bytes to EOF.
                stream.write_all(b"greeting then EOF").await.unwrap();
                stream.shutdown().await.unwrap();
                stream.read_to_end(&mut got).await.unwrap();
            }
            done_tx.send(got).unwrap();
        }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let pool = pool();

    let mut stream = pool
        .open(
            &server.addr,
            OutboundRequest::new("10.0.0.1:1".parse().unwrap()),
        )
        .await
        .unwrap();
    stream.write_all(b"client speaks first").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(done_rx.recv().await.unwrap(), b"client speaks first");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer, b"answer after your EOF");

    let mut stream = pool
        .open(
            &server.addr,
            OutboundRequest::new("10.0.0.1:2".parse().unwrap()),
        )
        .await
        .unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"greeting then EOF");
    // Our direction is still open after the server's EOF.
    stream.write_all(b"late reply").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(done_rx.recv().await.unwrap(), b"late reply");
    // Both directions done: further writes fail, reads stay at EOF.
    assert!(stream.write_all(b"x").await.is_err());
    assert_eq!(stream.read(&mut [0u8; 8]).await.unwrap(), 0);
}

async fn capture_request(request: OutboundRequest) -> InboundRequest {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = move |req: InboundRequest, responder: Responder| {
        let tx = tx.clone();
        async move {
            tx.send(req).unwrap();
            if let Ok(stream) = responder.accept() {
                let _ = common::echo(stream).await;
            }
        }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let stream = pool().open(&server.addr, request).await.unwrap();
    assert_eq!(round_trip(stream, b"hi").await.unwrap(), b"hi");
    rx.recv().await.unwrap()
}

#[tokio::test]
async fn authority_forwarded_and_baggage_arrive_as_sent() {
    let baggage = "k8s.namespace.name=default,k8s.pod.name=client-0,service.name=client";
    let cases = [
        (
            "10.244.1.7:8080",
            "10.244.0.3:43210",
            "for=\"10.244.0.3:43210\"",
        ),
        (
            "[fd00:10:244::7]:8080",
            "[fd00:10:244::3]:43210",
            "for=\"[fd00:10:244::3]:43210\"",
        ),
    ];
    for (authority, client, forwarded) in cases {
        let authority: SocketAddr = authority.parse().unwrap();
        let client: SocketAddr = client.parse().unwrap();
        let request = OutboundRequest::new(authority)
            .with_forwarded_for(client)
            .with_baggage(baggage)
            .with_header(
                TRACEPARENT,
                HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            );
        let got = capture_request(request).await;
        assert_eq!(got.authority, authority);
        assert_eq!(got.forwarded_for, Some(client));
        assert_eq!(got.baggage.as_deref(), Some(baggage));
        assert_eq!(got.headers[FORWARDED], forwarded);
        assert_eq!(
            got.headers[TRACEPARENT],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }

    // No forwarded/baggage: absent, not garbage.
    let got = capture_request(OutboundRequest::new(target())).await;
    assert_eq!(got.forwarded_for, None);
    assert_eq!(got.baggage, None);
    assert!(got.headers.get(FORWARDED).is_none());

    // A forwarded header that is not ip:port is tolerated.
    let got = capture_request(
        OutboundRequest::new(target()).with_header(FORWARDED, HeaderValue::from_static("for=_x")),
    )
    .await;
    assert_eq!(got.forwarded_for, None);
}

#[tokio::test]
async fn denied_request_surfaces_401() {
    let handler = |_req, responder: Responder| async move {
        responder.reject(StatusCode::UNAUTHORIZED).unwrap();
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let pool = pool();
    let err = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, HboneError::Status(StatusCode::UNAUTHORIZED)),
        "{err:?}"
    );
    assert_eq!(pool.streams_opened(), 0);
    // The connection stays usable for later requests.
    let err = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Status(StatusCode::UNAUTHORIZED)));
    assert_eq!(pool.connections_opened(), 1);
}

#[tokio::test]
async fn dropped_responder_gives_503() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = move |_req, responder: Responder| {
        let tx = tx.clone();
        async move {
            // Rejecting with a success status is refused, and the responder is dropped.
            tx.send(responder.reject(StatusCode::OK)).unwrap();
        }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let err = pool()
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, HboneError::Status(StatusCode::SERVICE_UNAVAILABLE)),
        "{err:?}"
    );
    assert!(matches!(
        rx.recv().await.unwrap(),
        Err(HboneError::NotAnErrorStatus(StatusCode::OK))
    ));

    // A handler that panics before answering also yields 503.
    let server = TestServer::start(
        ServerConfig::default(),
        |_req, responder: Responder| async move {
            let _keep = responder;
            panic!("handler failed");
        },
    )
    .await;
    let err = pool()
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        HboneError::Status(StatusCode::SERVICE_UNAVAILABLE)
    ));
}

/// The handler connects to the requested authority (as ztunnel's inbound does) and relays with
/// `copy_bidirectional`; an unreachable target is 503.
#[tokio::test]
async fn relays_to_upstream_with_copy_bidirectional() {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let closed_port = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };

    let handler = |req: InboundRequest, responder: Responder| async move {
        match tokio::net::TcpStream::connect(req.authority).await {
            Ok(mut upstream) => {
                let mut tunnel = responder.accept().unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await;
            }
            Err(_) => responder.reject(StatusCode::SERVICE_UNAVAILABLE).unwrap(),
        }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let pool = pool();

    let data = random_bytes(99, 2 * 1024 * 1024);
    let stream = pool
        .open(&server.addr, OutboundRequest::new(upstream_addr))
        .await
        .unwrap();
    assert_eq!(round_trip(stream, &data).await.unwrap(), data);

    // The client side relays a local TCP connection into the tunnel the same way.
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_addr = local.local_addr().unwrap();
    let relay = {
        let pool = pool.clone();
        let server_addr = server.addr;
        tokio::spawn(async move {
            let (mut app, _) = local.accept().await.unwrap();
            let mut tunnel = pool
                .open(&server_addr, OutboundRequest::new(upstream_addr))
                .await
                .unwrap();
            tokio::io::copy_bidirectional(&mut app, &mut tunnel)
                .await
                .unwrap()
        })
    };
    let mut app = tokio::net::TcpStream::connect(local_addr).await.unwrap();
    let (mut r, mut w) = app.split();
    let (written, read) = tokio::join!(
        async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        },
        async {
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.unwrap();
            out
        }
    );
    let () = written;
    assert_eq!(read, data);
    let len = u64::try_from(data.len()).unwrap();
    assert_eq!(relay.await.unwrap(), (len, len));

    let err = pool
        .open(&server.addr, OutboundRequest::new(closed_port))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        HboneError::Status(StatusCode::SERVICE_UNAVAILABLE)
    ));
}

/// Non-CONNECT requests and CONNECT to something that is not `ip:port` are 400, without the
/// handler being called.
#[tokio::test]
async fn bad_requests_get_400_without_the_handler() {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let handler = move |_req, _responder: Responder| {
        let tx = tx.clone();
        async move { tx.send(()).unwrap() }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(socket).await.unwrap();
    tokio::spawn(connection);

    let mut requests = Vec::new();
    let get = http::Request::get(format!("http://{}/", server.addr))
        .body(())
        .unwrap();
    requests.push(get);
    for authority in ["example.com:443", "10.0.0.1", "10.0.0.1:99999"] {
        requests.push(
            http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority)
                .body(())
                .unwrap(),
        );
    }
    for request in requests {
        let uri = request.uri().clone();
        client = client.ready().await.unwrap();
        let (response, _send) = client.send_request(request, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{uri}");
    }
    assert!(rx.try_recv().is_err(), "handler must not be called");
}

/// A stream reset by one side is an error, not an end-of-file, on the other.
#[tokio::test]
async fn reset_gives_error_on_the_other_side() {
    let (tx, mut rx) = mpsc::unbounded_channel::<io::Result<usize>>();
    let handler = move |req: InboundRequest, responder: Responder| {
        let tx = tx.clone();
        async move {
            let mut stream = responder.accept().unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            if req.authority.port() == 1 {
                // Server aborts: drop without shutdown.
                drop(stream);
            } else {
                // Client aborts: our next read must fail.
                tx.send(stream.read(&mut [0u8; 64]).await).unwrap();
            }
        }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let pool = pool();

    let mut stream = pool
        .open(
            &server.addr,
            OutboundRequest::new("10.0.0.1:1".parse().unwrap()),
        )
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    let err = tokio::time::timeout(WAIT, stream.read(&mut [0u8; 64]))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    // Writing to a reset stream fails too.
    let err = stream.write_all(b"more").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    drop(stream);

    let mut stream = pool
        .open(
            &server.addr,
            OutboundRequest::new("10.0.0.1:2".parse().unwrap()),
        )
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    // Let the bytes leave before aborting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    let err = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    // Aborted streams free their pool slots.
    assert!(common::eventually(WAIT, || pool.active_streams() == 0).await);
}

/// Writes `data` in 16 KiB pieces until a write stays pending for `stall` or all of it went
/// through. Returns how much was written.
async fn write_until_stalled(
    stream: &mut mesh_hbone::H2Stream,
    data: &[u8],
    stall: Duration,
) -> usize {
    let mut written = 0;
    while written < data.len() {
        let end = (written + 16 * 1024).min(data.len());
        match tokio::time::timeout(stall, stream.write(&data[written..end])).await {
            Ok(n) => written += n.unwrap(),
            Err(_) => break,
        }
    }
    written
}

const SMALL_WINDOW: u32 = 256 * 1024;
const CONSUMED: usize = 100 * 1024;

/// The server reads 100 KiB and stops: the client's writes must stall once the server's
/// 256 KiB stream window is used, then resume when it reads again.
#[tokio::test]
async fn slow_server_reader_stops_client_writer() {
    let (resume_tx, resume_rx) = oneshot::channel::<()>();
    let resume_rx = std::sync::Arc::new(Mutex::new(Some(resume_rx)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let handler = move |_req, responder: Responder| {
        let resume_rx = std::sync::Arc::clone(&resume_rx);
        let done_tx = done_tx.clone();
        async move {
            let mut stream = responder.accept().unwrap();
            let mut got = vec![0u8; CONSUMED];
            stream.read_exact(&mut got).await.unwrap();
            let resume = resume_rx.lock().await.take().unwrap();
            resume.await.unwrap();
            stream.read_to_end(&mut got).await.unwrap();
            done_tx.send(got).unwrap();
        }
    };
    let config = ServerConfig {
        initial_stream_window: SMALL_WINDOW,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, handler).await;
    let mut stream = pool()
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();

    let total = 4 * 1024 * 1024;
    let data = random_bytes(5, total);
    let window = usize::try_from(SMALL_WINDOW).unwrap();
    let ahead = write_until_stalled(&mut stream, &data, Duration::from_millis(500)).await;
    assert!(
        ahead >= window && ahead <= window + CONSUMED,
        "writer got {ahead} bytes ahead of a reader that consumed {CONSUMED} with a {window} window"
    );

    // The reader resumes: the rest goes through, byte-exact.
    resume_tx.send(()).unwrap();
    stream.write_all(&data[ahead..]).await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, done_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, data);
}

/// The client stops reading: the server's writes must stall once the client's 256 KiB stream
/// window is used.
#[tokio::test]
async fn slow_client_reader_stops_server_writer() {
    let (tx, mut rx) = mpsc::unbounded_channel::<usize>();
    let handler = move |_req, responder: Responder| {
        let tx = tx.clone();
        async move {
            let mut stream = responder.accept().unwrap();
            let data = vec![7u8; 8 * 1024 * 1024];
            let ahead = write_until_stalled(&mut stream, &data, Duration::from_millis(500)).await;
            tx.send(ahead).unwrap();
            // Then finish: 1 MiB more and EOF.
            stream.write_all(&vec![7u8; 1024 * 1024]).await.unwrap();
            stream.shutdown().await.unwrap();
        }
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let pool = Pool::new(
        TcpConnector::default(),
        PoolConfig {
            initial_stream_window: SMALL_WINDOW,
            ..PoolConfig::default()
        },
    );
    let mut stream = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap();
    let mut first = vec![0u8; CONSUMED];
    stream.read_exact(&mut first).await.unwrap();
    let ahead = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let window = usize::try_from(SMALL_WINDOW).unwrap();
    assert!(
        ahead >= window && ahead <= window + CONSUMED,
        "server got {ahead} bytes ahead of a reader that consumed {CONSUMED} with a {window} window"
    );
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(first.len() + rest.len(), ahead + 1024 * 1024);
    assert!(rest.iter().all(|&b| b == 7));
}
