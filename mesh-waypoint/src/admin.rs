//! The waypoint's own HTTP endpoints, as ztunnel's and Envoy's: `/metrics` (and
//! `/stats/prometheus`) on the metrics address (15020), `/healthz/ready` on the readiness address
//! (15021), answering 200 once the waypoint has its certificate and serves HBONE.

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
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{telemetry::Metrics, WaypointError};

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
    Ok(tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(%addr, error = %e, "accept failed on the admin endpoint");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &admin)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await
                {
                    debug!(error = %e, "admin connection ended");
                }
            });
        }
    }))
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
