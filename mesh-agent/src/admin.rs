//! The agent's HTTP side: three small HTTP/1.1 servers.
//!
//! - **admin** (`127.0.0.1:15000`): `GET /` (this list), `GET /config_dump` (the agent's state as
//!   JSON), `GET /logging` (the log filter in force), `POST /logging?level=<directives>` (change
//!   it), `GET /healthz/ready`.
//! - **metrics** (`:15020`): `GET /metrics` and `GET /stats/prometheus` (Prometheus text).
//! - **readiness** (`:15021`): `GET /healthz/ready`: `200 ready` once every
//!   [`BlockReady`](crate::readiness::BlockReady) is dropped, otherwise `503 not ready: <what>`.
//!
//! `HEAD` is answered wherever `GET` is. Unknown paths get `404` with the server's endpoints,
//! known paths with another method `405` with `Allow`. Every connection has a task of its own
//! and must send its request head within [`HEADER_READ_TIMEOUT`] (idle keep-alive connections
//! too), so slow or broken clients cannot hold up others for long.

use std::{
    convert::Infallible,
    fmt::{self, Write as _},
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

use crate::{
    logging::{LogControl, LoggingError},
    readiness::Readiness,
};

/// Default port of the admin server (bound on localhost only).
pub const ADMIN_PORT: u16 = 15000;
/// Default port of the metrics server.
pub const METRICS_PORT: u16 = 15020;
/// Default port of the readiness server.
pub const READINESS_PORT: u16 = 15021;
/// How long a connection may take to send a request head (from connecting, or after the
/// previous response on a kept-alive connection) before it is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// The Prometheus text exposition format.
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the three servers listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// The admin server; it can change the log level, so keep it on localhost.
    pub admin: SocketAddr,
    /// The Prometheus metrics server.
    pub metrics: SocketAddr,
    /// The readiness server (`/healthz/ready`).
    pub readiness: SocketAddr,
}

impl Default for AdminConfig {
    /// `127.0.0.1:15000`, `0.0.0.0:15020` and `0.0.0.0:15021`.
    fn default() -> Self {
        Self {
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)),
            metrics: SocketAddr::from((Ipv4Addr::UNSPECIFIED, METRICS_PORT)),
            readiness: SocketAddr::from((Ipv4Addr::UNSPECIFIED, READINESS_PORT)),
        }
    }
}

/// What the admin servers show; implemented by the agent. Called on the runtime's threads for
/// every request, so both should be quick (no blocking I/O).
pub trait AdminSource: Send + Sync + 'static {
    /// The complete Prometheus text exposition (`# HELP`/`# TYPE` lines and samples).
    fn metrics(&self) -> String;
    /// The agent's configuration and state, for `/config_dump`.
    fn config_dump(&self) -> serde_json::Value;
}

/// One of the three servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// The admin server (port 15000).
    Admin,
    /// The metrics server (port 15020).
    Metrics,
    /// The readiness server (port 15021).
    Readiness,
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "admin",
            Self::Metrics => "metrics",
            Self::Readiness => "readiness",
        })
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A server could not listen on its address.
    #[error("{server} server: cannot listen on {addr}: {source}")]
    Bind {
        /// Which server.
        server: Server,
        /// The address it was configured with.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The running servers. Dropping this stops them (listeners and open connections).
#[derive(Debug)]
pub struct AdminServers {
    tasks: Vec<JoinHandle<()>>,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// Where the metrics server listens.
    pub metrics_addr: SocketAddr,
    /// Where the readiness server listens.
    pub readiness_addr: SocketAddr,
}

impl Drop for AdminServers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds all three servers (port 0 picks a free port: the bound addresses are in the result)
/// and spawns their tasks on the current Tokio runtime. Nothing is left listening on error.
pub async fn start(
    config: &AdminConfig,
    source: Arc<dyn AdminSource>,
    ready: Readiness,
    log: LogControl,
) -> Result<AdminServers, AdminError> {
    start_with(config, source, ready, log, HEADER_READ_TIMEOUT).await
}

async fn start_with(
    config: &AdminConfig,
    source: Arc<dyn AdminSource>,
    ready: Readiness,
    log: LogControl,
    header_timeout: Duration,
) -> Result<AdminServers, AdminError> {
    let admin = bind(Server::Admin, config.admin).await?;
    let metrics = bind(Server::Metrics, config.metrics).await?;
    let readiness = bind(Server::Readiness, config.readiness).await?;
    let (admin_addr, metrics_addr, readiness_addr) = (admin.2, metrics.2, readiness.2);
    let state = Arc::new(State { source, ready, log });
    let tasks = [admin, metrics, readiness]
        .into_iter()
        .map(|(server, listener, _)| {
            tokio::spawn(serve(server, listener, Arc::clone(&state), header_timeout))
        })
        .collect();
    Ok(AdminServers {
        tasks,
        admin_addr,
        metrics_addr,
        readiness_addr,
    })
}

async fn bind(
    server: Server,
    addr: SocketAddr,
) -> Result<(Server, TcpListener, SocketAddr), AdminError> {
    let error = |source| AdminError::Bind {
        server,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    tracing::info!(addr = %local, "{server} server listening");
    Ok((server, listener, local))
}

/// What the handlers read.
struct State {
    source: Arc<dyn AdminSource>,
    ready: Readiness,
    log: LogControl,
}

/// Accepts connections until aborted; each is served by a task in `conns`, so aborting this
/// task (dropping the set) closes them all.
async fn serve(server: Server, listener: TcpListener, state: Arc<State>, header_timeout: Duration) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = Arc::clone(&state);
                    conns.spawn(connection(server, stream, peer, state, header_timeout));
                }
                Err(error) => {
                    tracing::warn!(%server, %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn connection(
    server: Server,
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    header_timeout: Duration,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let response = handle(server, &state, req.method(), req.uri());
        async move { Ok::<_, Infallible>(response) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = result {
        tracing::debug!(%server, %peer, %error, "connection ended with an error");
    }
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Index,
    ConfigDump,
    GetLogging,
    SetLogging,
    Ready,
    Metrics,
}

/// One method on one path of a server.
struct Endpoint {
    method: &'static str,
    path: &'static str,
    route: Route,
    help: &'static str,
}

const ADMIN_ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/",
        route: Route::Index,
        help: "this list",
    },
    Endpoint {
        method: "GET",
        path: "/config_dump",
        route: Route::ConfigDump,
        help: "the agent's configuration and state (JSON)",
    },
    Endpoint {
        method: "GET",
        path: "/logging",
        route: Route::GetLogging,
        help: "the log filter in force",
    },
    Endpoint {
        method: "POST",
        path: "/logging",
        route: Route::SetLogging,
        help: "?level=<directives>: set the log filter (e.g. info,mesh_agent::proxy=debug)",
    },
    Endpoint {
        method: "GET",
        path: "/healthz/ready",
        route: Route::Ready,
        help: "200 when ready to serve, 503 with what is pending otherwise",
    },
];

const METRICS_ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/metrics",
        route: Route::Metrics,
        help: "metrics, Prometheus text format",
    },
    Endpoint {
        method: "GET",
        path: "/stats/prometheus",
        route: Route::Metrics,
        help: "the same",
    },
];

const READINESS_ENDPOINTS: &[Endpoint] = &[Endpoint {
    method: "GET",
    path: "/healthz/ready",
    route: Route::Ready,
    help: "200 when ready to serve, 503 with what is pending otherwise",
}];

fn endpoints(server: Server) -> &'static [Endpoint] {
    match server {
        Server::Admin => ADMIN_ENDPOINTS,
        Server::Metrics => METRICS_ENDPOINTS,
        Server::Readiness => READINESS_ENDPOINTS,
    }
}

/// The server's endpoints, one per line.
fn index(server: Server) -> String {
    let mut out = String::new();
    for e in endpoints(server) {
        let _ = writeln!(out, "{:<5} {:<18} {}", e.method, e.path, e.help);
    }
    out
}

fn handle(
    server: Server,
    state: &State,
    method: &Method,
    uri: &http::Uri,
) -> Response<Full<Bytes>> {
    let path = uri.path();
    let on_path: Vec<&Endpoint> = endpoints(server)
        .iter()
        .filter(|e| e.path == path)
        .collect();
    if on_path.is_empty() {
        let body = format!("not found: {path}\nendpoints:\n{}", index(server));
        return respond(StatusCode::NOT_FOUND, TEXT, body);
    }
    // HEAD is GET without the body (hyper leaves it out).
    let wanted = if *method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    let Some(endpoint) = on_path.iter().find(|e| e.method == wanted) else {
        let mut allow: Vec<&str> = on_path.iter().map(|e| e.method).collect();
        if allow.contains(&"GET") {
            allow.push("HEAD");
        }
        let allow = allow.join(", ");
        let body = format!("method {method} not allowed on {path}; allowed: {allow}\n");
        let mut response = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, body);
        if let Ok(value) = HeaderValue::from_str(&allow) {
            response.headers_mut().insert(header::ALLOW, value);
        }
        return response;
    };
    match endpoint.route {
        Route::Index => respond(StatusCode::OK, TEXT, index(server)),
        Route::ConfigDump => match serde_json::to_string_pretty(&state.source.config_dump()) {
            Ok(json) => respond(StatusCode::OK, JSON, json + "\n"),
            Err(e) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("config dump: {e}\n"),
            ),
        },
        Route::GetLogging => respond(StatusCode::OK, TEXT, state.log.current() + "\n"),
        Route::SetLogging => set_logging(&state.log, uri.query()),
        Route::Ready => {
            if state.ready.is_ready() {
                let mut body = String::from("ready\n");
                for note in state.ready.degraded_notes() {
                    body.push_str("degraded: ");
                    body.push_str(&note);
                    body.push('\n');
                }
                respond(StatusCode::OK, TEXT, body)
            } else {
                let pending = state.ready.pending().join(", ");
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {pending}\n"),
                )
            }
        }
        Route::Metrics => respond(StatusCode::OK, PROMETHEUS, state.source.metrics()),
    }
}

/// `POST /logging?level=<directives>`.
fn set_logging(log: &LogControl, query: Option<&str>) -> Response<Full<Bytes>> {
    const MISSING: &str =
        "missing query parameter `level`, e.g. POST /logging?level=info,mesh_agent=debug\n";
    let level = match query_param(query.unwrap_or(""), "level") {
        Ok(Some(level)) => level,
        Ok(None) => return respond(StatusCode::BAD_REQUEST, TEXT, MISSING),
        Err(e) => return respond(StatusCode::BAD_REQUEST, TEXT, format!("query: {e}\n")),
    };
    match log.set(&level) {
        Ok(()) => respond(StatusCode::OK, TEXT, log.current() + "\n"),
        Err(e @ LoggingError::InvalidDirectives { .. }) => {
            respond(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n"))
        }
        Err(e @ LoggingError::SubscriberGone) => {
            respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n"))
        }
    }
}

/// The percent-decoded value of the first `name=value` pair of `query`.
fn query_param(query: &str, name: &str) -> Result<Option<String>, String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(key)? == name {
            return percent_decode(value).map(Some);
        }
    }
    Ok(None)
}

/// Decodes `%XX` escapes and `+` (a space, as in HTML forms); the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = s
                    .get(i + 1..i + 3)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or_else(|| format!("invalid percent-escape at byte {i} of {s:?}"))?;
                out.push(byte);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use std::{io::ErrorKind, time::Instant};

    use serde_json::json;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tracing_subscriber::EnvFilter;

    use super::*;
    use crate::logging::FilterLayer;

    struct Source;

    impl AdminSource for Source {
        fn metrics(&self) -> String {
            "# HELP mesh_up Whether the agent runs.\n# TYPE mesh_up gauge\nmesh_up 1\n".into()
        }
        fn config_dump(&self) -> serde_json::Value {
            json!({ "node": "node-1", "pods": [] })
        }
    }

    /// Servers on free localhost ports; the filter layer must outlive the log control.
    struct Fixture {
        servers: AdminServers,
        ready: Readiness,
        log: LogControl,
        _layer: FilterLayer,
    }

    fn local() -> AdminConfig {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        AdminConfig {
            admin: any,
            metrics: any,
            readiness: any,
        }
    }

    async fn fixture_with(header_timeout: Duration) -> Fixture {
        let ready = Readiness::new();
        let (layer, log) = LogControl::layer(EnvFilter::new("info"));
        let servers = start_with(
            &local(),
            Arc::new(Source),
            ready.clone(),
            log.clone(),
            header_timeout,
        )
        .await
        .expect("servers start");
        Fixture {
            servers,
            ready,
            log,
            _layer: layer,
        }
    }

    async fn fixture() -> Fixture {
        fixture_with(HEADER_READ_TIMEOUT).await
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    fn parse_reply(raw: &[u8]) -> Reply {
        let text = String::from_utf8(raw.to_vec()).expect("UTF-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("complete head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// Sends `method target` with `Connection: close` and reads the whole response.
    async fn request(addr: SocketAddr, method: &str, target: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .expect("read");
        parse_reply(&raw)
    }

    async fn get(addr: SocketAddr, target: &str) -> Reply {
        request(addr, "GET", target).await
    }

    #[tokio::test]
    async fn readiness_follows_the_blockers() {
        let f = fixture().await;
        let config = f.ready.block("config");
        let certs = f.ready.block("certificates");
        for addr in [f.servers.readiness_addr, f.servers.admin_addr] {
            let r = get(addr, "/healthz/ready").await;
            assert_eq!(r.status, 503);
            assert_eq!(r.header("content-type"), Some(TEXT));
            assert_eq!(r.body, "not ready: certificates, config\n");
        }
        drop(certs);
        let r = get(f.servers.readiness_addr, "/healthz/ready").await;
        assert_eq!((r.status, r.body.as_str()), (503, "not ready: config\n"));
        drop(config);
        for addr in [f.servers.readiness_addr, f.servers.admin_addr] {
            let r = get(addr, "/healthz/ready").await;
            assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
            assert_eq!(r.header("content-type"), Some(TEXT));
        }
    }

    #[tokio::test]
    async fn metrics_on_both_paths() {
        let f = fixture().await;
        for path in ["/metrics", "/stats/prometheus"] {
            let r = get(f.servers.metrics_addr, path).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.header("content-type"), Some(PROMETHEUS));
            assert_eq!(r.body, Source.metrics());
            assert_eq!(
                r.header("content-length"),
                Some(r.body.len().to_string().as_str())
            );
        }
    }

    #[tokio::test]
    async fn admin_index_and_config_dump() {
        let f = fixture().await;
        let r = get(f.servers.admin_addr, "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(TEXT));
        let lines: Vec<&str> = r.body.lines().collect();
        assert_eq!(lines.len(), ADMIN_ENDPOINTS.len(), "{}", r.body);
        for path in ["/config_dump", "/logging", "/healthz/ready"] {
            assert!(lines.iter().any(|l| l.contains(path)), "{path}: {}", r.body);
        }

        let r = get(f.servers.admin_addr, "/config_dump").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(JSON));
        let value: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(value, Source.config_dump());
        assert!(r.body.contains("\n  \"node\""), "pretty: {}", r.body);
    }

    #[tokio::test]
    async fn logging_get_and_set() {
        let f = fixture().await;
        let admin = f.servers.admin_addr;
        let r = get(admin, "/logging").await;
        assert_eq!((r.status, r.body.as_str()), (200, "info\n"));
        assert_eq!(r.header("content-type"), Some(TEXT));

        let r = request(admin, "POST", "/logging?level=debug").await;
        assert_eq!((r.status, r.body.as_str()), (200, "debug\n"));
        assert_eq!(f.log.current(), "debug");

        // Percent-encoded `info,mesh_agent::proxy=debug`.
        let r = request(
            admin,
            "POST",
            "/logging?x=1&level=info%2Cmesh_agent%3A%3Aproxy%3Ddebug",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("mesh_agent::proxy=debug"), "{}", r.body);
        let good = f.log.current();
        assert_eq!(get(admin, "/logging").await.body, format!("{good}\n"));

        for (target, expect) in [
            ("/logging?level=debgu", "debgu"),
            ("/logging?level=mesh_agent%3Dloud", "mesh_agent=loud"),
            ("/logging", "missing query parameter `level`"),
            ("/logging?lvl=debug", "missing query parameter `level`"),
            ("/logging?level=", "no directive"),
            ("/logging?level=%zz", "percent-escape"),
            ("/logging?level=%ff", "UTF-8"),
        ] {
            let r = request(admin, "POST", target).await;
            assert_eq!(r.status, 400, "{target}: {}", r.body);
            assert_eq!(r.header("content-type"), Some(TEXT));
            assert!(r.body.contains(expect), "{target}: {}", r.body);
            assert_eq!(f.log.current(), good, "{target} changed the filter");
        }
    }

    #[tokio::test]
    async fn unknown_paths_and_wrong_methods() {
        let f = fixture().await;
        let r = get(f.servers.admin_addr, "/nope").await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some(TEXT));
        assert!(r.body.starts_with("not found: /nope\n"), "{}", r.body);
        assert!(r.body.contains("/config_dump"), "{}", r.body);

        let r = get(f.servers.metrics_addr, "/healthz/ready").await;
        assert_eq!(r.status, 404);
        assert!(r.body.contains("/stats/prometheus"), "{}", r.body);
        let r = get(f.servers.readiness_addr, "/metrics").await;
        assert_eq!(r.status, 404);
        assert!(r.body.contains("/healthz/ready"), "{}", r.body);

        let r = request(f.servers.metrics_addr, "POST", "/metrics").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(r.header("content-type"), Some(TEXT));
        let r = request(f.servers.admin_addr, "DELETE", "/logging").await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, POST, HEAD"));
        let r = request(f.servers.readiness_addr, "PUT", "/healthz/ready").await;
        assert_eq!(r.status, 405);

        let r = request(f.servers.readiness_addr, "HEAD", "/healthz/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, ""));
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests() {
        let f = fixture().await;
        let mut stream = TcpStream::connect(f.servers.metrics_addr).await.unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..3 {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let r = parse_reply(&buf[..n]);
            assert_eq!((r.status, r.body), (200, Source.metrics()));
        }
    }

    #[tokio::test]
    async fn silent_and_garbage_clients_do_not_block_others() {
        let timeout = Duration::from_millis(300);
        let f = fixture_with(timeout).await;
        let addr = f.servers.readiness_addr;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET /healthz/re").await.unwrap();
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();

        let r = get(addr, "/healthz/ready").await;
        assert_eq!(r.status, 200);

        // The garbage gets an error response and is closed.
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut raw))
            .await
            .expect("garbage connection closed")
            .unwrap();
        assert!(raw.starts_with(b"HTTP/1.1 400"), "{raw:?}");

        // The silent and the slow client are closed after the header timeout.
        let started = Instant::now();
        for stream in [&mut silent, &mut partial] {
            let mut buf = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("closed by the server");
            match read {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
            }
        }
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_are_closed() {
        let f = fixture_with(Duration::from_millis(300)).await;
        let mut stream = TcpStream::connect(f.servers.metrics_addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        // The response, then end of stream once the connection idled past the timeout.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("idle connection closed")
            .unwrap();
        assert_eq!(parse_reply(&raw).status, 200);
    }

    #[tokio::test]
    async fn bind_failure_names_server_and_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let config = AdminConfig {
            metrics: addr,
            ..local()
        };
        let (_layer, log) = LogControl::layer(EnvFilter::new("info"));
        let err = start(&config, Arc::new(Source), Readiness::new(), log)
            .await
            .unwrap_err();
        let AdminError::Bind {
            server, addr: a, ..
        } = &err;
        assert_eq!((*server, *a), (Server::Metrics, addr));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("metrics server: cannot listen on {addr}: ")),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn dropping_the_servers_stops_them() {
        let f = fixture().await;
        let addr = f.servers.admin_addr;
        assert_eq!(get(addr, "/").await.status, 200);
        drop(f.servers);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                _ if Instant::now() > deadline => panic!("{addr} still accepts"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    #[test]
    fn default_addresses() {
        let c = AdminConfig::default();
        assert_eq!(c.admin.to_string(), "127.0.0.1:15000");
        assert_eq!(c.metrics.to_string(), "0.0.0.0:15020");
        assert_eq!(c.readiness.to_string(), "0.0.0.0:15021");
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            query_param("level=a%3Db+c", "level").unwrap().as_deref(),
            Some("a=b c")
        );
        assert_eq!(query_param("", "level").unwrap(), None);
        assert_eq!(query_param("level", "level").unwrap().as_deref(), Some(""));
        assert_eq!(
            query_param("a=1&&level=x&level=y", "level")
                .unwrap()
                .as_deref(),
            Some("x")
        );
        assert!(percent_decode("%2").is_err());
        assert!(percent_decode("%é1").is_err());
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
    }
}
