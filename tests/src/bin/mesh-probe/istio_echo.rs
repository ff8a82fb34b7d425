//! The Istio echo workload that the Gateway API mesh conformance suite deploys (image
//! `echo-advanced`), server and client, speaking what the suite reads
//! (`conformance/utils/echo/parse.go`): `Key=value` lines.
//!
//! - Server (`mesh-probe istio-echo`, or run as `server`): `--port=N` (HTTP/1.1 and h2c),
//!   `--grpc=N` (`proto.EchoTestService/Echo`), `--tcp=N` (echoes bytes) on every address,
//!   each repeatable; a kind not named gets the image's default (8080, 7070, 9090);
//!   `--tls=N` names ports the image serves with its own certificate, which the testbed has
//!   not got: they are not served, and a line says so (no mesh scenario uses them). HTTP and
//!   gRPC answers carry `ServiceVersion`, `ServicePort`, `Host`, `URL`, `Method`, `Proto`, `IP`
//!   (the requester's), one `RequestHeader=Name:value` per request header and `Hostname` (the
//!   pod's name, from `HOSTNAME`).
//! - Client (`mesh-probe echo-client`, or run as `client`, as the suite execs it):
//!   `<http|grpc>://host[:port][/path] [--method=M] [-H name:value]... [--count=N]`. Sends N
//!   requests (one connection, in order, redirects not followed) and prints each answer as
//!   `[i] Url=`, `[i] StatusCode=` (200 for a gRPC OK), `[i] ResponseHeader=Name:value` lines
//!   and the answer's lines as `[i body] <line>`, answers separated by a blank line. Names are
//!   resolved by the system resolver (the pod's cluster DNS). A request that fails ends the
//!   client with the reason and status 1.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};

/// `Proto.EchoTestService`'s request and answer (Istio's `echo.proto`): the answer's message
/// holds the lines.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoResponse {
    #[prost(string, tag = "1")]
    pub message: String,
}

const ECHO_PATH: &str = "/proto.EchoTestService/Echo";

/// The server's ports.
#[derive(Debug, Default)]
struct Ports {
    http: Vec<u16>,
    grpc: Vec<u16>,
    tcp: Vec<u16>,
    tls: Vec<u16>,
    version: String,
}

fn parse_server(args: &[&str]) -> Result<Ports, String> {
    let mut ports = Ports::default();
    for arg in args {
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("{arg}: expected --name=value"))?;
        let port = || {
            value
                .parse::<u16>()
                .map_err(|e| format!("{arg}: not a port: {e}"))
        };
        match name {
            "--port" => ports.http.push(port()?),
            "--grpc" => ports.grpc.push(port()?),
            "--tcp" => ports.tcp.push(port()?),
            "--tls" => ports.tls.push(port()?),
            "--version" => value.clone_into(&mut ports.version),
            "--crt" | "--key" | "--cluster" | "--istio-version" => {}
            _ => return Err(format!("{arg}: unknown flag")),
        }
    }
    // The image's defaults, for a kind of port not named at all (the suite's consumer echo
    // runs without arguments).
    for (list, default) in [
        (&mut ports.http, 8080),
        (&mut ports.grpc, 7070),
        (&mut ports.tcp, 9090),
    ] {
        if list.is_empty() {
            list.push(default);
        }
    }
    Ok(ports)
}

/// Serves until killed.
pub fn serve(args: &[&str]) -> Result<(), String> {
    let ports = parse_server(args)?;
    let hostname = std::env::var("HOSTNAME").unwrap_or_default();
    super::runtime()?.block_on(async move {
        let mut tasks = Vec::new();
        for &port in &ports.http {
            if ports.tls.contains(&port) {
                println!("port {port}: TLS with the image's certificate is not served here");
                continue;
            }
            let listener = bind(port).await?;
            let info = Info::new(port, &ports.version, &hostname);
            tasks.push(tokio::spawn(serve_http(listener, info)));
        }
        for &port in &ports.grpc {
            let listener = bind(port).await?;
            let info = Info::new(port, &ports.version, &hostname);
            tasks.push(tokio::spawn(serve_http(listener, info)));
        }
        for &port in &ports.tcp {
            let listener = bind(port).await?;
            tasks.push(tokio::spawn(serve_tcp(listener)));
        }
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    })
}

async fn bind(port: u16) -> Result<TcpListener, String> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening {addr}");
    Ok(listener)
}

/// What a server port says of itself.
#[derive(Clone, Debug)]
struct Info {
    port: u16,
    version: String,
    hostname: String,
}

impl Info {
    fn new(port: u16, version: &str, hostname: &str) -> Self {
        Self {
            port,
            version: version.to_owned(),
            hostname: hostname.to_owned(),
        }
    }

    /// The answer's lines for a request.
    fn lines<B>(&self, request: &Request<B>, peer: SocketAddr, proto: &str) -> String {
        let host = request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(ToString::to_string))
            .unwrap_or_default();
        let url = request
            .uri()
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let mut out = String::new();
        let _ = writeln!(out, "ServiceVersion={}", self.version);
        let _ = writeln!(out, "ServicePort={}", self.port);
        let _ = writeln!(out, "Host={host}");
        let _ = writeln!(out, "URL={url}");
        let _ = writeln!(out, "Method={}", request.method());
        let _ = writeln!(out, "Proto={proto}");
        let _ = writeln!(out, "IP={}", peer.ip());
        let mut headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    canonical(name.as_str()),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        if !request.headers().contains_key(http::header::HOST) && !host.is_empty() {
            headers.push(("Host".into(), host.clone()));
        }
        // By name only: the values of one header keep their order.
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, value) in headers {
            let _ = writeln!(out, "RequestHeader={name}:{value}");
        }
        let _ = writeln!(out, "Hostname={}", self.hostname);
        out
    }
}

/// A header name as Go writes it (`x-header-set` → `X-Header-Set`).
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}

async fn serve_http(listener: TcpListener, info: Info) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let info = info.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let info = info.clone();
                async move { Ok::<_, Infallible>(answer(&info, request, peer).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One answer: gRPC for `Echo` calls, the lines in plain text for the rest.
async fn answer(info: &Info, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return grpc_answer(info, request, peer).await;
    }
    let proto = match request.version() {
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let lines = info.lines(&request, peer, proto);
    // The request's body is read, so the connection stays usable.
    let _ = request.into_body().collect().await;
    Response::builder()
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(lines)).boxed())
        .unwrap_or_default()
}

/// `Echo`: the lines in the answer's message, `grpc-status: 0` in the trailers. Another method
/// gets `UNIMPLEMENTED` (12).
async fn grpc_answer(info: &Info, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    use prost::Message as _;
    let trailers = |status: &str| {
        let mut map = http::HeaderMap::new();
        if let Ok(value) = http::HeaderValue::from_str(status) {
            map.insert("grpc-status", value);
        }
        map
    };
    let builder = Response::builder().header(http::header::CONTENT_TYPE, "application/grpc");
    if request.uri().path() != ECHO_PATH {
        return builder
            .header("grpc-status", "12")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap_or_default();
    }
    let lines = info.lines(&request, peer, "GRPC");
    let _ = request.into_body().collect().await;
    let message = EchoResponse { message: lines }.encode_to_vec();
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(&message);
    let body = http_body_util::StreamBody::new(futures_util::stream::iter([
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(frame))),
        Ok(hyper::body::Frame::trailers(trailers("0"))),
    ]));
    builder.body(body.boxed()).unwrap_or_default()
}

async fn serve_tcp(listener: TcpListener) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let (mut read, mut write) = tcp.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

/// A client's request.
#[derive(Debug)]
struct ClientOptions {
    url: String,
    grpc: bool,
    host: String,
    port: u16,
    path: String,
    method: String,
    headers: Vec<(String, String)>,
    count: usize,
}

fn parse_client(args: &[&str]) -> Result<ClientOptions, String> {
    let (url, rest) = args.split_first().ok_or("a URL is required")?;
    let (scheme, rest_url) = url
        .split_once("://")
        .ok_or_else(|| format!("{url}: expected <scheme>://host[:port][/path]"))?;
    let grpc = match scheme {
        "http" => false,
        "grpc" => true,
        other => {
            return Err(format!(
                "{url}: scheme {other} is not supported (http, grpc)"
            ))
        }
    };
    let (authority, path) = match rest_url.find('/') {
        Some(i) => (&rest_url[..i], &rest_url[i..]),
        None => (rest_url, "/"),
    };
    let (host, port) = split_host_port(authority, if grpc { 7070 } else { 80 })?;
    let mut options = ClientOptions {
        url: (*url).to_owned(),
        grpc,
        host,
        port,
        path: path.to_owned(),
        method: "GET".into(),
        headers: Vec::new(),
        count: 1,
    };
    let mut rest = rest.iter();
    while let Some(arg) = rest.next() {
        if let Some(method) = arg.strip_prefix("--method=") {
            method.clone_into(&mut options.method);
        } else if let Some(count) = arg.strip_prefix("--count=") {
            options.count = count
                .parse()
                .map_err(|e| format!("{arg}: not a count: {e}"))?;
        } else if *arg == "-H" {
            let header = rest.next().ok_or("-H needs name:value")?;
            let (name, value) = header
                .split_once(':')
                .ok_or_else(|| format!("-H {header}: expected name:value"))?;
            options
                .headers
                .push((name.trim().to_owned(), value.trim().to_owned()));
        } else {
            return Err(format!("{arg}: unknown flag"));
        }
    }
    Ok(options)
}

/// `host[:port]` or `[v6]:port`.
fn split_host_port(authority: &str, default: u16) -> Result<(String, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|e| format!("{authority}: bad port: {e}"))
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("{authority}: unclosed ["))?;
        let p = match tail.strip_prefix(':') {
            Some(p) => port(p)?,
            None => default,
        };
        return Ok((host.to_owned(), p));
    }
    match authority.rsplit_once(':') {
        Some((host, p)) => Ok((host.to_owned(), port(p)?)),
        None => Ok((authority.to_owned(), default)),
    }
}

/// Runs the client.
pub fn client(args: &[&str]) -> Result<(), String> {
    let options = parse_client(args)?;
    super::runtime()?.block_on(async move {
        let target = tokio::net::lookup_host((options.host.as_str(), options.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", options.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", options.host))?;
        let mut out = String::new();
        if options.grpc {
            grpc_calls(&options, target, &mut out).await?;
        } else {
            http_requests(&options, target, &mut out).await?;
        }
        print!("{out}");
        Ok(())
    })
}

/// Appends one answer to `out` as the suite reads it.
fn print_answer(
    out: &mut String,
    i: usize,
    url: &str,
    code: u16,
    headers: &http::HeaderMap,
    body: &str,
) {
    if i > 0 {
        out.push('\n');
    }
    let _ = writeln!(out, "[{i}] Url={url}");
    let _ = writeln!(out, "[{i}] StatusCode={code}");
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        let _ = writeln!(
            out,
            "[{i}] ResponseHeader={}:{value}",
            canonical(name.as_str())
        );
    }
    for line in body.lines().filter(|l| !l.is_empty()) {
        let _ = writeln!(out, "[{i} body] {line}");
    }
}

async fn http_requests(
    options: &ClientOptions,
    target: SocketAddr,
    out: &mut String,
) -> Result<(), String> {
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP/1.1 to {target}: {e}"))?;
    tokio::spawn(connection);
    let default_host = if options.port == 80 {
        options.host.clone()
    } else {
        format!("{}:{}", options.host, options.port)
    };
    for i in 0..options.count {
        let mut request = Request::builder()
            .method(options.method.as_str())
            .uri(options.path.as_str());
        if !options
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("host"))
        {
            request = request.header(http::header::HOST, default_host.as_str());
        }
        for (name, value) in &options.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        sender
            .ready()
            .await
            .map_err(|e| format!("request {i} to {target}: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request {i} to {target}: {e}"))?;
        let code = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("answer {i} from {target}: {e}"))?
            .to_bytes();
        print_answer(
            out,
            i,
            &options.url,
            code,
            &headers,
            &String::from_utf8_lossy(&body),
        );
    }
    Ok(())
}

async fn grpc_calls(
    options: &ClientOptions,
    target: SocketAddr,
    out: &mut String,
) -> Result<(), String> {
    let authority = format!("{}:{}", options.host, options.port);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| format!("endpoint {target}: {e}"))?
        .origin(
            format!("http://{authority}")
                .parse()
                .map_err(|e| format!("authority {authority}: {e}"))?,
        );
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting to {target}: {}", super::error_chain(&e)))?;
    let mut client = tonic::client::Grpc::new(channel);
    for i in 0..options.count {
        client
            .ready()
            .await
            .map_err(|e| format!("call {i} to {target}: {e}"))?;
        let mut request = tonic::Request::new(EchoRequest::default());
        for (name, value) in &options.headers {
            if let (Ok(name), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes()),
                value.parse(),
            ) {
                request.metadata_mut().insert(name, value);
            }
        }
        let path = http::uri::PathAndQuery::from_static(ECHO_PATH);
        let codec = tonic_prost::ProstCodec::<EchoRequest, EchoResponse>::default();
        match client.unary(request, path, codec).await {
            Ok(response) => {
                let headers = response.metadata().clone().into_headers();
                let message = response.into_inner().message;
                print_answer(out, i, &options.url, 200, &headers, &message);
            }
            Err(status) => {
                let headers = status.metadata().clone().into_headers();
                let code = u16::try_from(i32::from(status.code())).unwrap_or(u16::MAX);
                print_answer(out, i, &options.url, code, &headers, status.message());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_arguments_as_the_suite_gives_them() {
        let o = parse_client(&[
            "http://echo/port",
            "--method=GET",
            "-H",
            "Host:echo-v1",
            "--count=3",
        ])
        .unwrap();
        assert_eq!(
            (o.host.as_str(), o.port, o.path.as_str()),
            ("echo", 80, "/port")
        );
        assert_eq!(o.headers, vec![("Host".to_owned(), "echo-v1".to_owned())]);
        assert_eq!(o.count, 3);
        let o = parse_client(&["grpc://echo:7070"]).unwrap();
        assert!(o.grpc);
        assert_eq!((o.port, o.path.as_str()), (7070, "/"));
        let o = parse_client(&["http://[fd00::1]:8080/x"]).unwrap();
        assert_eq!((o.host.as_str(), o.port), ("fd00::1", 8080));
        assert!(parse_client(&["ftp://echo"]).is_err());
    }

    #[test]
    fn server_flags_of_the_suite_manifest() {
        let p = parse_server(&[
            "--tcp=9090",
            "--port=8080",
            "--grpc=7070",
            "--port=8443",
            "--tls=8443",
            "--crt=/cert.crt",
            "--key=/cert.key",
        ])
        .unwrap();
        assert_eq!(
            (p.http, p.grpc, p.tcp, p.tls),
            (vec![8080, 8443], vec![7070], vec![9090], vec![8443])
        );
        assert!(parse_server(&["--bogus=1"]).is_err());
        let p = parse_server(&[]).unwrap();
        assert_eq!(
            (p.http, p.grpc, p.tcp),
            (vec![8080], vec![7070], vec![9090])
        );
    }

    #[test]
    fn header_names_are_written_as_go_writes_them() {
        assert_eq!(canonical("x-header-set"), "X-Header-Set");
        assert_eq!(canonical("HOST"), "Host");
    }
}
