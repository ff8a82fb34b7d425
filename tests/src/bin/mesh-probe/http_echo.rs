//! `http-echo <addr> --name N [--fail-first K] [--delay-ms D]`: the HTTP workload behind the
//! waypoint, answering
//! what the Gateway API conformance echo answers: one line of JSON per request with the backend
//! (`N`), method, path (with the query), host, protocol and request headers. Serves HTTP/1.1 and
//! h2c (HTTP/2 without TLS, told apart by its preface) on each connection. With `--fail-first K`
//! the first K requests get `503` (for retry tests), still with the JSON line, or, a gRPC request
//! (`content-type: application/grpc`), gRPC's trailers-only `UNAVAILABLE` (HTTP 200,
//! `grpc-status: 14`), as a gRPC server shedding load answers; with `--delay-ms D`
//! every answer waits D ms (for timeout tests), and a request with `x-delay-ms: D` waits D ms
//! itself (at most 10 s). Prints `served <n> <method> <path> <status>` per
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
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Request, Response, StatusCode};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::json;
use tokio_tungstenite::{
    tungstenite::{handshake::derive_accept_key, protocol::Role, Message},
    WebSocketStream,
};

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
            // As Go's and most HTTP servers do: no Nagle delay between a response's frames.
            let _ = tcp.set_nodelay(true);
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| answer(request, Arc::clone(&shared)));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

async fn answer(
    mut request: Request<Incoming>,
    shared: Arc<(Options, AtomicU64)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (options, served) = &*shared;
    let n = served.fetch_add(1, Ordering::Relaxed);
    if let Some(key) = websocket_key(&request) {
        println!(
            "served {n} {} {} 101 websocket",
            request.method(),
            request.uri().path()
        );
        let upgrade = hyper::upgrade::on(&mut request);
        let name = options.name.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                ws_echo(TokioIo::new(upgraded), &name).await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        headers.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        if let Ok(accept) = http::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            headers.insert("sec-websocket-accept", accept);
        }
        return Ok(response);
    }
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
    // A request may ask for its own delay (`x-delay-ms`, at most 10 s), as the timeout test
    // on Kubernetes does through a route's header filter.
    let asked = parts
        .headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|ms| std::time::Duration::from_millis(ms.min(10_000)));
    if let Some(delay) = asked.or(options.delay) {
        tokio::time::sleep(delay).await;
    }
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let failing = n < options.fail_first;
    if failing && grpc {
        println!("served {n} {} {} grpc-14", parts.method, parts.uri.path());
        return Ok(grpc_unavailable());
    }
    let mut response = Response::new(Full::new(Bytes::from(format!("{line}\n"))));
    if failing {
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

/// gRPC's trailers-only `UNAVAILABLE`: HTTP 200, the status in the headers, no body.
fn grpc_unavailable() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from_static("14"));
    headers.insert(
        "grpc-message",
        http::HeaderValue::from_static("shedding load"),
    );
    response
}

/// The `Sec-WebSocket-Key` of a WebSocket upgrade request.
fn websocket_key(request: &Request<Incoming>) -> Option<String> {
    let upgrade = request.headers().get(http::header::UPGRADE)?;
    if !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return None;
    }
    let key = request.headers().get("sec-websocket-key")?;
    key.to_str().ok().map(str::to_owned)
}

/// Echoes every text or binary message, prefixed with the backend's name, until the client
/// closes.
async fn ws_echo<S>(io: S, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Text(text) => Message::text(format!("{name}: {text}")),
            Message::Binary(bytes) => Message::binary(bytes),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}

/// `ws <addr> <message> --count N`: opens a WebSocket to `ws://<addr>/ws` (the `Host` is the
/// address), sends the message N times, checks each echo (`<backend>: <message>`); prints
/// `ws ok messages=<N> backend=<name>`.
pub fn client(addr: &str, message: &str, count: u64) -> Result<(), String> {
    let runtime = super::runtime()?;
    runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let url = format!("ws://{addr}/ws");
        let (mut ws, response) = tokio_tungstenite::client_async(url, tcp)
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        let status = response.status();
        let mut backend = String::new();
        for i in 0..count {
            ws.send(Message::text(format!("{message} {i}")))
                .await
                .map_err(|e| format!("send: {e}"))?;
            let reply = ws
                .next()
                .await
                .ok_or("closed before the echo")?
                .map_err(|e| format!("read: {e}"))?;
            let text = reply.into_text().map_err(|e| format!("not text: {e}"))?;
            let (name, echoed) = text.split_once(": ").ok_or(format!("bad echo {text:?}"))?;
            if echoed != format!("{message} {i}") {
                return Err(format!("echo mismatch: {text:?}"));
            }
            name.clone_into(&mut backend);
        }
        let _ = ws.close(None).await;
        println!(
            "ws ok messages={count} backend={backend} status={}",
            status.as_u16()
        );
        Ok(())
    })
}
