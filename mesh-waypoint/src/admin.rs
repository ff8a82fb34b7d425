//! The waypoint's own HTTP endpoints, as ztunnel's and Envoy's: `/metrics` (and
//! `/stats/prometheus`) on the metrics address (15020), `/healthz/ready` on the readiness address
//! (15021), answering 200 once the waypoint has its certificate and serves HBONE.
//!
//! Any pod may reach them (Prometheus and the kubelet do), so, as the agent's: each connection
//! must send its request head within [`HEADER_READ_TIMEOUT`] (an idle kept-alive one is closed
//! after it too), and the connections end with the endpoint's task.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{context::WaypointError, telemetry::Metrics};

/// How long a connection may take to send a request head (from connecting, or after the
/// previous response) before it is closed: the agent's admin endpoints' limit.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the endpoints answer from.
#[derive(Clone)]
pub(crate) struct Admin {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) ready: Arc<AtomicBool>,
}

/// Binds `addr` and serves the endpoints on it until the task is dropped.
pub(crate) async fn listen(
    addr: SocketAddr,
    admin: Admin,
) -> Result<tokio::task::JoinHandle<()>, WaypointError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WaypointError::Listen { addr, source })?;
    info!(%addr, "waypoint admin endpoint listening");
    Ok(tokio::spawn(serve(listener, admin)))
}

/// Serves `listener`'s connections until dropped (with them).
async fn serve(listener: TcpListener, admin: Admin) {
    let addr = listener.local_addr().ok();
    // Dropped with this task: its connections end with it.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    conns.spawn(connection(tcp, admin.clone()));
                }
                Err(e) => {
                    warn!(?addr, error = %e, "accept failed on the admin endpoint");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            // Finished connections leave the set.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn connection(tcp: tokio::net::TcpStream, admin: Admin) {
    let service = hyper::service::service_fn(move |request| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(answer(&request, &admin)) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service)
        .await
    {
        debug!(error = %e, "admin connection ended");
    }
}

fn answer(request: &Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" | "/stats/prometheus" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            admin.metrics.encode(),
        ),
        "/healthz/ready" if admin.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        "/healthz/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: no certificate yet\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{atomic::AtomicBool, Arc},
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::{serve, Admin, HEADER_READ_TIMEOUT};
    use crate::telemetry::Metrics;

    async fn endpoint() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = Admin {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(true)),
        };
        (addr, tokio::spawn(serve(listener, admin)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_ends_is_closed_at_the_timeout() {
        let (addr, _task) = endpoint().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(3 * HEADER_READ_TIMEOUT, client.read_to_end(&mut rest))
            .await
            .expect("the endpoint closes the connection")
            .unwrap();
        assert!(
            started.elapsed() >= HEADER_READ_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn connections_end_with_the_endpoint() {
        let (addr, task) = endpoint().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0; 15];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 OK");
        task.abort();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the kept-alive connection closes with the endpoint")
            .unwrap();
    }
}
