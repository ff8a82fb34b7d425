//! Optimistic data: the client's first bytes go ahead of the CONNECT's answer, arrive once
//! (also when the request is retried on another connection), and never reach a handler that
//! refuses the stream.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{TcpConnector, TestServer};
use http::StatusCode;
use mesh_hbone::{
    EarlyData, HboneError, InboundRequest, OutboundRequest, Pool, PoolConfig, Responder,
    ServerConfig, EARLY_LIMIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// What a client had sent when its tunnel was opened, in pieces; then nothing more for now.
struct Sent(VecDeque<Bytes>);

impl Sent {
    fn new(pieces: &[&'static [u8]]) -> Self {
        Self(pieces.iter().map(|p| Bytes::from_static(p)).collect())
    }
}

impl EarlyData for Sent {
    fn poll_early(&mut self, _cx: &mut Context<'_>, limit: usize) -> Poll<Option<Bytes>> {
        Poll::Ready(self.0.pop_front().map(|mut piece| {
            if piece.len() > limit {
                // What does not fit stays for the stream itself.
                let rest = piece.split_off(limit);
                self.0.push_front(rest);
            }
            piece
        }))
    }
}

fn target() -> std::net::SocketAddr {
    "10.0.0.1:8080".parse().unwrap()
}

fn pool() -> Pool<TcpConnector> {
    Pool::new(TcpConnector::default(), PoolConfig::default())
}

/// A server whose handler accepts each stream after `delay`, reads it to its end and reports
/// what it read.
async fn late_reader(delay: Duration) -> (TestServer, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let handler = move |_req: InboundRequest, responder: Responder| {
        let tx = tx.clone();
        async move {
            tokio::time::sleep(delay).await;
            let mut stream = responder.accept().unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            tx.send(got).unwrap();
        }
    };
    (
        TestServer::start(ServerConfig::default(), handler).await,
        rx,
    )
}

/// The handler answers late; the client's first bytes were sent while it waited, and the
/// handler reads them, then the rest, exactly once.
#[tokio::test]
async fn early_bytes_go_ahead_of_the_answer_and_arrive_once() {
    let (server, mut rx) = late_reader(Duration::from_millis(100)).await;
    let pool = pool();
    let mut early = Sent::new(&[b"GET / HTTP/1.1\r\n", b"host: a\r\n"]);
    let (mut stream, sent) = pool
        .open_early(&server.addr, OutboundRequest::new(target()), &mut early)
        .await
        .unwrap();
    assert_eq!(sent, 25, "both pieces went ahead of the answer");
    stream.write_all(b"\r\n").await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
}

/// No more than the limit goes ahead; the rest is the stream's.
#[tokio::test]
async fn early_bytes_stop_at_the_limit() {
    static BIG: [u8; 40_000] = [7; 40_000];
    let (server, mut rx) = late_reader(Duration::from_millis(50)).await;
    let pool = pool();
    let mut early = Sent::new(&[&BIG]);
    let (mut stream, sent) = pool
        .open_early(&server.addr, OutboundRequest::new(target()), &mut early)
        .await
        .unwrap();
    assert_eq!(sent, EARLY_LIMIT);
    let rest = early.0.pop_front().unwrap();
    assert_eq!(rest.len(), BIG.len() - EARLY_LIMIT);
    stream.write_all(&rest).await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(got == BIG, "{} bytes arrived", got.len());
}

/// A refused stream's early bytes are dropped with it; the client sees the status.
#[tokio::test]
async fn a_refused_stream_drops_its_early_bytes() {
    let handler = |_req, responder: Responder| async move {
        responder.reject(StatusCode::UNAUTHORIZED).unwrap();
    };
    let server = TestServer::start(ServerConfig::default(), handler).await;
    let pool = pool();
    let mut early = Sent::new(&[b"secret"]);
    let err = pool
        .open_early(&server.addr, OutboundRequest::new(target()), &mut early)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HboneError::Status(StatusCode::UNAUTHORIZED)),
        "{err:?}"
    );
    // The connection stays usable.
    let err = pool
        .open(&server.addr, OutboundRequest::new(target()))
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::Status(StatusCode::UNAUTHORIZED)));
    assert_eq!(pool.connections_opened(), 1);
}

/// A server whose first connection refuses its first stream unprocessed (`REFUSED_STREAM`):
/// the pool retries on a new connection and sends the early bytes again there. Each
/// connection reports the body of every stream it accepted.
async fn refuse_first_stream_server(
    bodies: mpsc::UnboundedSender<Vec<u8>>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(socket).await.unwrap();
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    if first {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let bodies = bodies.clone();
                    tokio::spawn(async move {
                        let _send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        let mut body = request.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(data)) = body.data().await {
                            let _ = body.flow_control().release_capacity(data.len());
                            got.extend_from_slice(&data);
                        }
                        bodies.send(got).unwrap();
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_retried_request_sends_its_early_bytes_again_once() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let addr = refuse_first_stream_server(tx).await;
    let pool = pool();
    let mut early = Sent::new(&[b"hello"]);
    let (mut stream, sent) = pool
        .open_early(&addr, OutboundRequest::new(target()), &mut early)
        .await
        .unwrap();
    assert_eq!(sent, 5);
    stream.write_all(b" world").await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hello world");
    assert_eq!(
        pool.connections_opened(),
        2,
        "the retry took a new connection"
    );
}
