//! `http-echo <addr> --name N [--fail-first K] [--delay-ms D]`: the HTTP workload behind the
//! waypoint, answering
//! what the Gateway API conformance echo answers: one line of JSON per request with the backend
//! (`N`), method, path (with the query), host, protocol and request headers. Serves HTTP/1.1 and
//! h2c (HTTP/2 without TLS, told apart by its preface) on each connection. With `--fail-first K`
//! the first K requests get `503` (for retry tests), still with the JSON line; with `--delay-ms D`
//! every answer waits D ms (for timeout tests). Prints `served <n> <method> <path> <status>` per
//! request, so tests count what reached the backend.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;

/// Options of `http-echo`.
pub struct Options {
    pub name: String,
    pub fail_first: u64,
    pub delay: Option<std::time::Duration>,
}

/// Serves until killed.
pub fn run(addr: &str, options: Options) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        println!("listening {addr}");
        let shared = Arc::new((options, AtomicU64::new(0)));
        loop {
            let (tcp, _) = listener
                .accept()
                .await
                .map_err(|e| format!("accept: {e}"))?;
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| answer(request, Arc::clone(&shared)));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

async fn answer(
    request: Request<Incoming>,
    shared: Arc<(Options, AtomicU64)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (options, served) = &*shared;
    let n = served.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map_or(0, |b| b.to_bytes().len());
    let headers: BTreeMap<String, Vec<String>> =
        parts
            .headers
            .iter()
            .fold(BTreeMap::new(), |mut map, (k, v)| {
                map.entry(k.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                map
            });
    let host = parts
        .uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| headers.get("host").and_then(|h| h.first().cloned()))
        .unwrap_or_default();
    let line = json!({
        "backend": options.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "host": host,
        "protocol": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body,
    });
    if let Some(delay) = options.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::new(Full::new(Bytes::from(format!("{line}\n"))));
    if n < options.fail_first {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    println!(
        "served {n} {} {} {}",
        parts.method,
        parts.uri.path(),
        response.status().as_u16()
    );
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
