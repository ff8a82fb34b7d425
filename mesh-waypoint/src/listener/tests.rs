//! The HTTP server's limits on a tunnel: a head that never ends, and a head too large.

use std::{convert::Infallible, time::Duration};

use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{http_server, HEADER_READ_TIMEOUT, MAX_REQUEST_HEAD};

/// Serves one connection over an in-memory pipe; the client's end.
fn serve() -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let service = hyper::service::service_fn(|_: Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(Response::new(String::from("ok")))
    });
    let task = tokio::spawn(async move {
        let _ = http_server()
            .serve_connection(TokioIo::new(server), service)
            .await;
    });
    (client, task)
}

#[tokio::test(start_paused = true)]
async fn a_head_that_never_ends_is_dropped_at_the_timeout() {
    let (mut client, served) = serve();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    // The server closes: the read ends (paused time runs ahead to the timer).
    tokio::time::timeout(2 * HEADER_READ_TIMEOUT, client.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= HEADER_READ_TIMEOUT && waited < HEADER_READ_TIMEOUT + Duration::from_secs(1),
        "closed after {waited:?}"
    );
    served.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_kept_alive_connection_idle_past_the_timeout_is_closed() {
    let (mut client, served) = serve();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0; 17];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
    tokio::time::timeout(HEADER_READ_TIMEOUT + Duration::from_secs(1), served)
        .await
        .expect("closed at the timeout")
        .unwrap();
}

#[tokio::test]
async fn a_head_larger_than_the_limit_gets_431() {
    let (mut client, served) = serve();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_HEAD)
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    served.await.unwrap();
    // One just under it is served.
    let (mut client, _served) = serve();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_HEAD - 1024)
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut answer = [0; 17];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
}
