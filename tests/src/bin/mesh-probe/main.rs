//! `mesh-probe`: the workload the testbed runs in pods. A small TCP server and client.
//!
//! Server: `mesh-probe serve <addr> [--mode echo|sink|greet|rr] [--count N]`. Prints
//! `listening <addr>` once bound and `accepted <peer> on <local>` per connection (tests read the
//! peer to check the application sees the original client). Modes:
//! - `echo` (default): echoes bytes as they arrive; after the client's EOF, closes its side and
//!   prints `echoed <n> bytes to <peer> (peer at the end <getpeername>)`.
//! - `sink`: reads to EOF, then answers `<bytes> <crc32>`. With `--past-eof-ms P` it plays a
//!   server that ignores the EOF: it prints `eof after <n> bytes`, keeps reading for P ms and
//!   prints `past_eof <m> bytes` (what still arrived) before answering.
//! - `greet`: speaks first (`hello <peer>`), then echoes.
//! - `rr`: request/response for the benchmarks. A request is a 4-byte big-endian length and that
//!   many bytes; the reply is the same bytes. Until EOF, or until a request whose length has the
//!   top bit ([`LAST`]) set, after which the server closes first.
//!
//! Client:
//! - `connect <addr> <message>`: sends, half-closes, reads the echo; `echo ok <local> -> <peer>`,
//!   the peer as `getpeername` reported it once connected.
//! - `send <addr> <bytes>`: streams that many pseudo-random bytes, half-closes, checks the sink's
//!   count and CRC-32; prints `sent <n> bytes crc=<crc> in <secs>s`.
//! - `greeted <addr> <message>`: reads the server's greeting before sending anything, then
//!   behaves like `connect`.
//!
//! Benchmark clients (against `serve --mode rr`, a thread per connection) print one line of
//! JSON at the end, times in microseconds: `rr` (request/response, closed loop or, with `--rate`,
//! open loop timed from each request's scheduled send, which avoids coordinated omission),
//! `connrate` (a 1 KiB exchange per new connection) and `hold` (opens N connections, prints
//! `holding <opened>`, keeps them idle, closes them).
//!
//! HBONE and robustness clients (for the mesh's security tests):
//! - `hbone <addr:15008> <target> --ca-dir D --identity ID --expect ID --message M
//!   [--trust-dir T] [--expired]`: speaks HBONE itself (TLS 1.3 with its own certificate, then an
//!   HTTP/2 CONNECT to `target`), as a node agent would. Its certificate for `ID` is signed by
//!   the built-in CA in `D` (created there if missing); with `--expired` it ended an hour ago.
//!   The server must prove `--expect`, checked against the root in `T` (default `D`). Sends `M`,
//!   half-closes, checks the echo; prints `result=ok bytes=<n>` (exit 0) or
//!   `result=refused error=<why>` (exit 1).
//! - `hbone-serve <addr> --ca-dir D --identity ID`: an HBONE server presenting a certificate for
//!   `ID` from the CA in `D` and accepting clients of that CA. Echoes every tunnel itself.
//!   Prints `listening <addr>`, then per connection `tls_ok peer=<addr> identity=<client id>` or
//!   `tls_error peer=<addr> error=<why>`, and per tunnel `connect authority=<a> identity=<id>`.
//! - `parallel <addr> --conns N --bytes B [--hold-ms H] [--again]`: N concurrent connections,
//!   each sends its own pseudo-random B bytes and reads them back (all at once, one task each);
//!   prints `open=<n> failed=<m>` while the verified connections are all still open, holds them
//!   H ms, with `--again` echoes B more bytes on each (a connection cut meanwhile fails here,
//!   where a plain close could not tell), then half-closes each and expects end-of-file; prints
//!   `ok=<n> failed=<m>`.
//! - `raw <addr> --send-hex HEX --wait-close-ms W [--resend-ms R]`: sends the bytes (again every
//!   R ms), prints `sent <n> bytes`, then `received <total>` as bytes arrive, and waits up to W ms
//!   for the peer to close: `closed_after_ms=<t> how=eof|reset|aborted|write:<error> received=<n>` or
//!   `still_open received=<n>`.
//!
//! HTTP server (the workload behind the waypoint): `http-echo <addr> --name N [--fail-first K]
//! [--delay-ms D]`,
//! HTTP/1.1 and h2c; one line of JSON per request naming the backend, method, path, host,
//! protocol and headers (see `http_echo`); a WebSocket upgrade to it echoes each message as
//! `<name>: <message>`. WebSocket client: `ws <addr> <message> [--count N]` checks N echoes.
//! Name server: `dns-serve <addr> --answer NAME=IPV4...` (see `dns_serve`).
//! gRPC: `grpc-serve <addr> --name N` and `grpc <addr> --service S [--count C] [--watch]` (the
//! standard health service, see `grpc`).
//!
//! HTTP client (for the agent's admin, metrics and readiness servers):
//! - `http <METHOD> <host:port> <path>`: one HTTP/1.1 request with `Connection: close` (5 s
//!   timeouts); prints the status code on the first line and the body after it. Exits 0 for any
//!   response (the caller checks the code), 1 when it cannot connect or read a response.
#![forbid(unsafe_code)]

mod dns_serve;
mod grpc;
mod http_echo;
mod http_load;
mod istio_echo;
mod loop_pair;
mod repeat;

use std::{
    collections::HashMap,
    fmt::Display,
    io::{BufRead as _, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::ExitCode,
    str::FromStr,
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use mesh_hbone::{Connect, InboundRequest, OutboundRequest, Pool, PoolConfig, Responder};
use mesh_identity::{
    BuiltinCa, BuiltinCaOptions, CertSnapshot, CertificateAuthority as _, CryptoProvider,
    CsrRequest, Identity, WorkloadCert, WorkloadKey,
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::watch,
};
use tokio_rustls::{rustls, TlsAcceptor, TlsConnector};

const CHUNK: usize = 64 * 1024;
/// Read timeout of the client's blocking socket.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Message size of the benchmark clients unless `--size` says otherwise.
const MESSAGE: usize = 1024;
/// Largest `rr` request; the server checks the length prefix before allocating.
const MAX_MESSAGE: usize = 16 << 20;
/// Flag in an `rr` length prefix: the server closes after replying. `connrate` sets it so the
/// server closes first and `TIME_WAIT` lands on its side, not on the client's ephemeral ports
/// (all connections go to one address, so the client would run out after ~28k of them).
const LAST: u32 = 1 << 31;
/// Pause after a failed connection or exchange, so a dead server does not spin the client.
const ERROR_BACKOFF: Duration = Duration::from_millis(1);
/// Stack of the server's per-connection threads (`hold` makes thousands; buffers are on the heap).
const WORKER_STACK: usize = 256 * 1024;

const USAGE: &str = "usage: mesh-probe <command>
  serve <addr> [--mode echo|sink|greet|rr] [--count N] [--stall-ms S] [--past-eof-ms P]
  connect <addr> <message> [--eagain fail|retry]
  repeat <addr> --every-ms E --duration-ms D
      `connect` every E ms for D ms; one line per try (`echo ok …` or `failed …`), exit 0.
  greeted <addr> <message> [--eagain fail|retry]
  send <addr> <bytes> [--progress-ms P] [--eagain fail|retry]
  loop-pair --port P --client-port C --token T --duration-ms D
  bind <addr>...
  rr <addr> --conns N --duration-ms D [--rate R] [--size S]
      R: requests/s over all connections (open loop); without it, closed loop.
      S: request and reply size in bytes (default 1024).
  connrate <addr> --duration-ms D [--conns N]
  hold <addr> --conns N --hold-ms H
  hbone <addr:15008> <target> --ca-dir D --identity ID --expect ID --message M
      [--trust-dir T] [--expired]
  hbone-serve <addr> --ca-dir D --identity ID
  parallel <addr> --conns N --bytes B [--hold-ms H] [--again]
  http-echo <addr> --name N [--fail-first K] [--delay-ms D]
  ws <addr> <message> [--count N]
  http-load <addr> --rate R [--duration-ms D] [--conns N] [--h2] [--header 'name: value']...
      Open-loop GET / at R requests/s; one JSON line with p50/p90/p99/max in µs.
  grpc-serve <addr> --name N
  grpc <addr> --service S [--count C] [--watch]
  raw <addr> --send-hex HEX --wait-close-ms W [--resend-ms R]
  http <METHOD> <host:port> <path>
  dns-serve <addr> --answer NAME=IPV4...
      A name server (UDP): A records for the names given, NXDOMAIN for others.
rr, connrate and hold talk to `serve --mode rr` and print one line of JSON (times in µs).";

/// A blocking socket's reads, watching for `EAGAIN` before the read timeout. On a socket in a
/// sockmap, the kernel's `tcp_bpf_recvmsg` returns `EAGAIN` when a blocking reader is woken
/// without data (typically by its own FIN being acknowledged after a half-close), which an
/// application written for blocking sockets takes as an error. A socket without a read timeout
/// (the server's) never times out, so there every `EAGAIN` is spurious.
///
/// [`EagainPolicy::Fail`] (the functional clients, `connect`, `greeted`, `send`): such an
/// `EAGAIN` is an error, as for those applications, so the tests see it. [`EagainPolicy::Count`]
/// (the benchmark clients and the `rr` server): retry, like a robust application, and report how
/// often (`spurious_eagain` in their JSON).
struct Reader<'a> {
    stream: &'a TcpStream,
    policy: EagainPolicy,
    spurious_eagain: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EagainPolicy {
    Fail,
    Count,
}

impl<'a> Reader<'a> {
    fn new(stream: &'a TcpStream, policy: EagainPolicy) -> Self {
        Self {
            stream,
            policy,
            spurious_eagain: 0,
        }
    }
}

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        // Without a read timeout (the server's sockets), every `EAGAIN` is spurious.
        let early = |t: Option<Duration>| t.is_none_or(|t| started.elapsed() < t);
        loop {
            match (&mut &*self.stream).read(buf) {
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock
                        && self.stream.read_timeout().is_ok_and(early) =>
                {
                    self.spurious_eagain += 1;
                    if self.policy == EagainPolicy::Fail {
                        return Err(std::io::Error::new(
                            ErrorKind::WouldBlock,
                            "spurious EAGAIN: a blocking read returned EAGAIN before its timeout",
                        ));
                    }
                }
                other => return other,
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let usage = |e: String| format!("{e}\n{USAGE}");
    // Run under the Istio echo image's own names (`server`, its entry point, and `client`, what
    // the conformance suite execs), it is that image's program.
    let program = std::env::args().next().unwrap_or_default();
    let program = Path::new(&program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let result = match (program.as_str(), args.as_slice()) {
        ("server", args) => istio_echo::serve(args),
        ("client", args) => istio_echo::client(args),
        (_, ["istio-echo", rest @ ..]) => istio_echo::serve(rest),
        (_, ["echo-client", rest @ ..]) => istio_echo::client(rest),
        (_, args) => subcommand(args, usage),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The other commands.
fn subcommand(args: &[&str], usage: impl Fn(String) -> String) -> Result<(), String> {
    match args {
        ["serve", addr, rest @ ..] => parse_serve(rest)
            .map_err(usage)
            .and_then(|o| serve(addr, o)),
        [command @ ("connect" | "greeted"), addr, message, rest @ ..] => flags(rest, &["--eagain"])
            .and_then(|f| eagain_policy(&f))
            .map_err(usage)
            .and_then(|policy| connect(addr, message, *command == "greeted", policy)),
        ["repeat", addr, rest @ ..] => repeat::parse(rest)
            .map_err(usage)
            .and_then(|(every, duration)| repeat::run(addr, every, duration)),
        ["send", addr, bytes, rest @ ..] => bytes
            .parse()
            .map_err(|e| format!("bytes {bytes:?}: {e}"))
            .and_then(|n| {
                let flags = flags(rest, &["--progress-ms", "--eagain"])?;
                let progress = positive::<u64>(&flags, "--progress-ms")?;
                Ok((
                    n,
                    progress.map(Duration::from_millis),
                    eagain_policy(&flags)?,
                ))
            })
            .map_err(usage)
            .and_then(|(n, progress, policy)| send(addr, n, progress, policy)),
        ["bind", addrs @ ..] if !addrs.is_empty() => try_binds(addrs),
        ["loop-pair", rest @ ..] => loop_pair::parse(rest)
            .map_err(usage)
            .and_then(|o| loop_pair::run(&o)),
        [command @ ("rr" | "connrate" | "hold"), addr, rest @ ..] => {
            parse_bench(command, addr, rest)
                .map_err(usage)
                .and_then(|b| match *command {
                    "rr" => rr(b),
                    "connrate" => connrate(b),
                    _ => hold(b),
                })
        }
        ["hbone", addr, target, rest @ ..] => parse_hbone(rest, true)
            .map_err(usage)
            .and_then(|o| hbone_client(addr, target, &o)),
        ["hbone-serve", addr, rest @ ..] => parse_hbone(rest, false)
            .map_err(usage)
            .and_then(|o| hbone_serve(addr, &o)),
        ["parallel", addr, rest @ ..] => parallel(addr, rest),
        ["raw", addr, rest @ ..] => raw(addr, rest),
        ["http", method, addr, path] => http(method, addr, path),
        ["dns-serve", addr, rest @ ..] => dns_serve::parse(rest)
            .map_err(usage)
            .and_then(|answers| dns_serve::run(addr, &answers)),
        [command @ ("grpc-serve" | "grpc" | "http-load" | "ws" | "http-echo"), ..] => {
            l7_command(command, &args[1..])
                .map_err(usage)
                .and_then(|run| run())
        }
        _ => Err(USAGE.into()),
    }
}

/// The HTTP, WebSocket and gRPC commands (the waypoint's workloads and clients): the command
/// to run, or why its arguments are wrong.
fn l7_command<'a>(
    command: &str,
    args: &'a [&'a str],
) -> Result<Box<dyn FnOnce() -> Result<(), String> + 'a>, String> {
    match (command, args) {
        ("grpc-serve", [addr, "--name", name]) => Ok(Box::new(move || grpc::serve(addr, name))),
        ("grpc", [addr, rest @ ..]) => {
            let watch = rest.contains(&"--watch");
            let rest: Vec<&str> = rest.iter().copied().filter(|a| *a != "--watch").collect();
            let f = flags(&rest, &["--service", "--count"])?;
            let service = f
                .iter()
                .find(|(n, _)| *n == "--service")
                .map(|(_, v)| (*v).to_owned())
                .ok_or("--service is required")?;
            let count = positive::<u64>(&f, "--count")?.unwrap_or(1);
            Ok(Box::new(move || grpc::client(addr, &service, count, watch)))
        }
        ("http-load", [addr, rest @ ..]) => {
            let h2 = rest.contains(&"--h2");
            let mut headers = Vec::new();
            let mut others: Vec<&str> = Vec::new();
            let mut args = rest.iter().copied().filter(|a| *a != "--h2");
            while let Some(arg) = args.next() {
                if arg == "--header" {
                    let header = args.next().ok_or("--header needs a value")?;
                    headers.push(http_load::header(header)?);
                } else {
                    others.push(arg);
                }
            }
            let f = flags(&others, &["--rate", "--duration-ms", "--conns"])?;
            let options = http_load::Options {
                rate: positive::<u64>(&f, "--rate")?.ok_or("--rate is required")?,
                duration: Duration::from_millis(
                    positive::<u64>(&f, "--duration-ms")?.unwrap_or(5_000),
                ),
                conns: positive::<u64>(&f, "--conns")?.unwrap_or(10),
                h2,
                headers,
            };
            Ok(Box::new(move || http_load::run(addr, &options)))
        }
        ("ws", [addr, message, rest @ ..]) => {
            let f = flags(rest, &["--count"])?;
            let count = positive::<u64>(&f, "--count")?.unwrap_or(1);
            Ok(Box::new(move || http_echo::client(addr, message, count)))
        }
        ("http-echo", [addr, rest @ ..]) => {
            let f = flags(rest, &["--name", "--fail-first", "--delay-ms"])?;
            let options = http_echo::Options {
                name: f
                    .iter()
                    .find(|(n, _)| *n == "--name")
                    .map(|(_, v)| (*v).to_owned())
                    .ok_or("--name is required")?,
                fail_first: flag::<u64>(&f, "--fail-first")?.unwrap_or(0),
                delay: positive::<u64>(&f, "--delay-ms")?.map(Duration::from_millis),
            };
            Ok(Box::new(move || http_echo::run(addr, options)))
        }
        _ => Err(format!("{command}: missing arguments")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Echo,
    Sink,
    Greet,
    Rr,
}

/// Options of `serve`.
#[derive(Clone, Copy, Debug)]
struct ServeOptions {
    mode: Mode,
    /// Serve this many connections, then exit.
    count: Option<usize>,
    /// Wait this long after accepting a connection before reading from it (a slow reader).
    stall: Option<Duration>,
    /// `sink`: keep reading this long after EOF (a server that ignores it).
    past_eof: Option<Duration>,
}

fn parse_serve(rest: &[&str]) -> Result<ServeOptions, String> {
    let flags = flags(rest, &["--mode", "--count", "--stall-ms", "--past-eof-ms"])?;
    let mode = match flag::<String>(&flags, "--mode")?.as_deref() {
        None | Some("echo") => Mode::Echo,
        Some("sink") => Mode::Sink,
        Some("greet") => Mode::Greet,
        Some("rr") => Mode::Rr,
        Some(other) => return Err(format!("unknown mode {other:?}")),
    };
    Ok(ServeOptions {
        mode,
        count: flag(&flags, "--count")?,
        stall: positive::<u64>(&flags, "--stall-ms")?.map(Duration::from_millis),
        past_eof: positive::<u64>(&flags, "--past-eof-ms")?.map(Duration::from_millis),
    })
}

/// Options of the benchmark clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bench {
    addr: SocketAddr,
    conns: usize,
    /// `--duration-ms`, or `hold`'s `--hold-ms`.
    duration: Duration,
    /// `rr`'s requests per second over all connections; `None` for closed loop.
    rate: Option<u64>,
    size: usize,
}

fn parse_bench(command: &str, addr: &str, rest: &[&str]) -> Result<Bench, String> {
    let (allowed, time): (&[&str], _) = match command {
        "rr" => (
            &["--conns", "--duration-ms", "--rate", "--size"],
            "--duration-ms",
        ),
        "connrate" => (&["--conns", "--duration-ms"], "--duration-ms"),
        _ => (&["--conns", "--hold-ms"], "--hold-ms"),
    };
    let flags = flags(rest, allowed)?;
    let conns = match positive(&flags, "--conns")? {
        None if command == "connrate" => 1,
        conns => conns.ok_or("--conns is required")?,
    };
    let ms = if command == "hold" {
        flag(&flags, time)?
    } else {
        positive(&flags, time)?
    };
    let size = flag(&flags, "--size")?.unwrap_or(MESSAGE);
    if !(1..=MAX_MESSAGE).contains(&size) {
        return Err(format!("--size must be between 1 and {MAX_MESSAGE}"));
    }
    Ok(Bench {
        addr: parse(addr)?,
        conns,
        duration: Duration::from_millis(ms.ok_or_else(|| format!("{time} is required"))?),
        rate: positive(&flags, "--rate")?,
        size,
    })
}

/// `--name value` pairs, each name at most once and one of `allowed`.
fn flags<'a>(mut rest: &[&'a str], allowed: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    while let [name, tail @ ..] = rest {
        if !allowed.contains(name) {
            return Err(format!("unknown option {name:?}"));
        }
        let [value, tail @ ..] = tail else {
            return Err(format!("{name} needs a value"));
        };
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("{name} given twice"));
        }
        out.push((name, value));
        rest = tail;
    }
    Ok(out)
}

fn flag<T: FromStr>(flags: &[(&str, &str)], name: &str) -> Result<Option<T>, String>
where
    T::Err: Display,
{
    flags
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.parse().map_err(|e| format!("{name} {v:?}: {e}")))
        .transpose()
}

/// A flag that, when given, must be a number of at least 1.
fn positive<T: FromStr + Default + PartialEq>(
    flags: &[(&str, &str)],
    name: &str,
) -> Result<Option<T>, String>
where
    T::Err: Display,
{
    match flag::<T>(flags, name)? {
        Some(v) if v == T::default() => Err(format!("{name} must be at least 1")),
        other => Ok(other),
    }
}

fn parse(addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|e| format!("address {addr:?}: {e}"))
}

fn serve(addr: &str, options: ServeOptions) -> Result<(), String> {
    let ServeOptions {
        mode,
        count,
        stall,
        past_eof,
    } = options;
    if mode == Mode::Rr {
        raise_nofile_limit(0);
    }
    let listener = TcpListener::bind(parse(addr)?).map_err(|e| format!("bind {addr}: {e}"))?;
    // std listens with a backlog of 128: a burst of a thousand connections through the mesh
    // overflows it, and the kernel's SYN cookies then reset the streams whose data came first.
    // A server sized for the tests' bursts, as real servers are (nginx, envoy: 4096 or more).
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXCONN)
        .map_err(|e| format!("listen {addr}: {e}"))?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut workers = Vec::new();
    let mut served = 0;
    while count.is_none_or(|n| served < n) {
        let (stream, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        println!("accepted {peer} on {local}");
        let worker = thread::Builder::new()
            .stack_size(WORKER_STACK)
            .spawn(move || {
                if let Some(stall) = stall {
                    thread::sleep(stall);
                    println!("reading from {peer}");
                }
                if let Err(e) = handle(stream, peer, mode, past_eof) {
                    eprintln!("mesh-probe: connection from {peer}: {e}");
                }
            });
        match worker {
            // Without a count the server never joins: keep no handles, which would also keep
            // every finished thread's stack.
            Ok(worker) if count.is_some() => workers.push(worker),
            Ok(_) => {}
            Err(e) => eprintln!("mesh-probe: connection from {peer}: no thread: {e}"),
        }
        served += 1;
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    mode: Mode,
    past_eof: Option<Duration>,
) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    match mode {
        Mode::Echo | Mode::Greet => {
            if matches!(mode, Mode::Greet) {
                stream
                    .write_all(format!("hello {peer}\n").as_bytes())
                    .map_err(io("greet"))?;
            }
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0usize;
            loop {
                let n = stream.read(&mut buf).map_err(io("read"))?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).map_err(io("write"))?;
                total += n;
            }
            // The peer as the kernel reports it at the end (`getpeername`, while this side is
            // still open): the mesh must keep showing the original client all along.
            let now = stream
                .peer_addr()
                .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
            stream.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
            println!("echoed {total} bytes to {peer} (peer at the end {now})");
        }
        Mode::Sink => {
            let (n, crc) = drain(&mut stream).map_err(io("read"))?;
            if let Some(past_eof) = past_eof {
                println!("eof after {n} bytes");
                let m = read_past_eof(&mut stream, past_eof);
                println!("past_eof {m} bytes");
            }
            stream
                .write_all(format!("{n} {crc:08x}\n").as_bytes())
                .map_err(io("write"))?;
            stream.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
            println!("received {n} bytes crc={crc:08x} from {peer}");
        }
        Mode::Rr => {
            let eagain = answer_requests(&stream).map_err(io("rr"))?;
            if eagain > 0 {
                println!("rr {peer} spurious_eagain={eagain}");
            }
        }
    }
    Ok(())
}

/// The `rr` server loop; returns the spurious `EAGAIN` count. Returning drops (closes) the
/// stream, which after a [`LAST`] request makes the server the side that closes first.
fn answer_requests(stream: &TcpStream) -> std::io::Result<u32> {
    stream.set_nodelay(true)?;
    // Buffered: one read usually brings the prefix and the request.
    let mut reader = BufReader::new(Reader::new(stream, EagainPolicy::Count));
    let mut buf = Vec::new();
    while !reader.fill_buf()?.is_empty() {
        let mut prefix = [0u8; 4];
        reader.read_exact(&mut prefix)?;
        let prefix = u32::from_be_bytes(prefix);
        let len = usize::try_from(prefix & !LAST).unwrap_or(usize::MAX);
        if len > MAX_MESSAGE {
            let msg = format!("request of {len} bytes (at most {MAX_MESSAGE})");
            return Err(std::io::Error::new(ErrorKind::InvalidData, msg));
        }
        buf.resize(len, 0);
        reader.read_exact(&mut buf)?;
        (&mut { stream }).write_all(&buf)?;
        if prefix & LAST != 0 {
            break;
        }
    }
    Ok(reader.get_ref().spurious_eagain)
}

fn drain(stream: &mut TcpStream) -> std::io::Result<(u64, u32)> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let got = stream.read(&mut buf)?;
        if got == 0 {
            return Ok((n, hasher.finalize()));
        }
        hasher.update(&buf[..got]);
        n += got as u64;
    }
}

/// Keeps reading for `how_long` after EOF, as a server that ignores it would; the bytes that
/// still arrived. A read error (a reset) ends it.
fn read_past_eof(stream: &mut TcpStream, how_long: Duration) -> u64 {
    let deadline = Instant::now() + how_long;
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => thread::sleep(Duration::from_millis(1)),
            Ok(got) => n += got as u64,
            Err(_) => break,
        }
    }
    n
}

fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// `--eagain fail|retry` (default `fail`): what a functional client does with a spurious
/// `EAGAIN` (see [`Reader`]). `retry` is for sockets in the short-cut, where the kernel can
/// return one to a blocking reader.
fn eagain_policy(flags: &[(&str, &str)]) -> Result<EagainPolicy, String> {
    match flag::<String>(flags, "--eagain")?.as_deref() {
        None | Some("fail") => Ok(EagainPolicy::Fail),
        Some("retry") => Ok(EagainPolicy::Count),
        Some(other) => Err(format!("--eagain {other:?}: fail or retry")),
    }
}

fn connect(addr: &str, message: &str, greeted: bool, policy: EagainPolicy) -> Result<(), String> {
    let addr = parse(addr)?;
    let mut stream = dial(addr)?;
    // What the kernel reports as the peer (`getpeername`), while the connection is up.
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("getpeername: {e}"))?;
    let mut reader = Reader::new(&stream, policy);
    let mut echo = String::new();
    if greeted {
        let mut buffered = BufReader::new(&mut reader);
        let mut line = String::new();
        buffered
            .read_line(&mut line)
            .map_err(|e| format!("greeting: {e}"))?;
        if !line.starts_with("hello ") {
            return Err(format!("expected a greeting, got {line:?}"));
        }
        println!("greeting {}", line.trim_end());
        // Anything the server sent after the greeting line is part of the echo.
        echo.push_str(&String::from_utf8_lossy(buffered.buffer()));
    }
    (&stream)
        .write_all(message.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut reader = Reader::new(&stream, policy);
    reader
        .read_to_string(&mut echo)
        .map_err(|e| format!("read: {e}"))?;
    if echo != message {
        return Err(format!(
            "echo mismatch: sent {} bytes, got {} bytes",
            message.len(),
            echo.len()
        ));
    }
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    println!("echo ok {local} -> {peer}");
    stream.flush().ok();
    Ok(())
}

/// `bind <addr>...`: tries to listen on each TCP address in turn and prints `bound <addr>` or
/// `refused <addr> <error>` for each (the mesh refuses its own ports to a meshed pod).
fn try_binds(addrs: &[&str]) -> Result<(), String> {
    for addr in addrs {
        match TcpListener::bind(parse(addr)?) {
            Ok(l) => {
                println!("bound {}", l.local_addr().map_err(|e| e.to_string())?);
            }
            Err(e) => println!("refused {addr} {e}"),
        }
    }
    Ok(())
}

/// Deterministic, non-repeating-looking bytes (xorshift), so a reordered or duplicated chunk
/// changes the checksum.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Streams `bytes` pseudo-random bytes to a `sink` server and checks its count and CRC. With
/// `progress`, a thread prints `written <n>` (bytes the kernel accepted so far) that often, so a
/// test can see where a blocking writer stops.
fn send(
    addr: &str,
    bytes: u64,
    progress: Option<Duration>,
    policy: EagainPolicy,
) -> Result<(), String> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let addr = parse(addr)?;
    let mut stream = dial(addr)?;
    let started = Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reporter = progress.map(|every| {
        let (written, done) = (Arc::clone(&written), Arc::clone(&done));
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                println!("written {}", written.load(Ordering::Relaxed));
                thread::sleep(every);
            }
        })
    });
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("chunk fits usize");
        fill(&mut buf[..n], &mut state);
        hasher.update(&buf[..n]);
        stream
            .write_all(&buf[..n])
            .map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
    done.store(true, Ordering::Relaxed);
    if let Some(reporter) = reporter {
        let _ = reporter.join();
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let crc = hasher.finalize();
    let mut reply = String::new();
    let mut reader = Reader::new(&stream, policy);
    reader
        .read_to_string(&mut reply)
        .map_err(|e| format!("read reply: {e}"))?;
    let expected = format!("{bytes} {crc:08x}\n");
    if reply != expected {
        return Err(format!("sink answered {reply:?}, expected {expected:?}"));
    }
    let secs = started.elapsed().as_secs_f64();
    println!("sent {bytes} bytes crc={crc:08x} in {secs:.3}s");
    Ok(())
}

/// Sub-buckets per power of two: a bucket spans at most 1/128 of its lower bound.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Exact below `2 * SUB`, then `SUB` buckets for each power of two up to 2^63.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) << SUB_BITS;

/// Log-linear histogram of microseconds (`HdrHistogram`'s layout with 128 sub-buckets): exact up
/// to 255 µs, then within 1/128 (0.8%), over the whole `u64` range. 59 KB each.
#[derive(Clone, Debug)]
struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        let i = if v < SUB {
            v
        } else {
            let shift = u64::from(v.ilog2() - SUB_BITS);
            (shift << SUB_BITS) + (v >> shift)
        };
        usize::try_from(i).expect("bucket index below BUCKETS")
    }

    /// The lowest value of bucket `i` and its width.
    fn bucket(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < SUB {
            return (i, 1);
        }
        let shift = (i >> SUB_BITS) - 1;
        ((SUB + (i & (SUB - 1))) << shift, 1 << shift)
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// The smallest value at least `ppm` millionths of the samples are at or below: the middle
    /// of its bucket, or the exact maximum if no bigger value was recorded. `None` if empty.
    fn percentile(&self, ppm: u64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = (u128::from(self.count) * u128::from(ppm)).div_ceil(1_000_000);
        let rank = u64::try_from(rank).unwrap_or(u64::MAX).max(1);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen == self.count {
                return Some(self.max);
            }
            if seen >= rank {
                let (low, width) = Self::bucket(i);
                return Some((low + (width - 1) / 2).min(self.max));
            }
        }
        None
    }
}

#[allow(clippy::cast_precision_loss)] // counts and sums of microseconds, far below 2^52
fn as_f64(n: impl Into<u128>) -> f64 {
    n.into() as f64
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn per_sec(n: u64, d: Duration) -> f64 {
    round2(as_f64(n) / d.as_secs_f64().max(1e-9))
}

/// Rounded to the nearest microsecond.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX)
}

fn sleep_until(t: Instant) {
    thread::sleep(t.saturating_duration_since(Instant::now()));
}

/// One benchmark thread: its request, its connection's reply buffer, what it measured.
struct Client {
    addr: SocketAddr,
    request: Vec<u8>,
    reply: Vec<u8>,
    latency: Histogram,
    errors: u64,
    spurious_eagain: u64,
}

impl Client {
    /// The request: a length prefix (with [`LAST`] if `last`) and `size` pseudo-random bytes.
    fn new(addr: SocketAddr, size: usize, last: bool) -> Self {
        let len = u32::try_from(size).expect("size checked when parsing");
        let mut request = (len | if last { LAST } else { 0 }).to_be_bytes().to_vec();
        request.resize(4 + size, 0);
        fill(&mut request[4..], &mut 0x2545_F491_4F6C_DD1D);
        Self {
            addr,
            request,
            reply: vec![0; size],
            latency: Histogram::default(),
            errors: 0,
            spurious_eagain: 0,
        }
    }

    /// Counts an error; prints only a thread's first (more would flood stderr).
    fn error(&mut self, e: &str) {
        if self.errors == 0 {
            eprintln!("mesh-probe: {e}");
        }
        self.errors += 1;
    }

    /// A connection with `TCP_NODELAY` (a request is one small write) and a write timeout.
    fn dial(&mut self) -> Option<TcpStream> {
        let stream = dial(self.addr).and_then(|s| {
            s.set_nodelay(true)
                .and_then(|()| s.set_write_timeout(Some(READ_TIMEOUT)))
                .map_err(|e| format!("socket options: {e}"))?;
            Ok(s)
        });
        stream.map_err(|e| self.error(&e)).ok()
    }

    /// Sends the request and reads the reply, which must repeat its payload. `false` on error.
    fn exchange(&mut self, stream: &TcpStream) -> bool {
        let mut reader = Reader::new(stream, EagainPolicy::Count);
        let result = match (&mut { stream }).write_all(&self.request) {
            Err(e) => Err(format!("write: {e}")),
            Ok(()) => match reader.read_exact(&mut self.reply) {
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err("read: EOF".to_string()),
                Err(e) => Err(format!("read: {e}")),
                Ok(()) if self.reply != self.request[4..] => Err("the reply differs".to_string()),
                Ok(()) => Ok(()),
            },
        };
        self.spurious_eagain += u64::from(reader.spurious_eagain);
        result.map_err(|e| self.error(&e)).is_ok()
    }

    fn merge(&mut self, other: &Self) {
        self.latency.merge(&other.latency);
        self.errors += other.errors;
        self.spurious_eagain += other.spurious_eagain;
    }
}

/// Runs `work(index, item)` on a thread per item and merges what they measured.
fn run_threads<T: Send + 'static>(
    a: Bench,
    items: Vec<T>,
    work: impl Fn(usize, T) -> Client + Send + Clone + 'static,
) -> Result<Client, String> {
    let mut threads = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let work = work.clone();
        let thread = thread::Builder::new().name(format!("conn-{i}"));
        let thread = thread.spawn(move || work(i, item));
        threads.push(thread.map_err(|e| format!("starting a thread: {e}"))?);
    }
    let mut total = Client::new(a.addr, 0, false);
    for thread in threads {
        total.merge(&thread.join().map_err(|_| "a worker thread panicked")?);
    }
    Ok(total)
}

/// When the threads start, together, a little after they are spawned.
fn start_time() -> Instant {
    Instant::now() + Duration::from_millis(20)
}

fn rr(a: Bench) -> Result<(), String> {
    let mut setup = Client::new(a.addr, 0, false);
    let streams = (0..a.conns).map(|_| setup.dial().ok_or("rr: could not connect"));
    let streams = streams.collect::<Result<Vec<_>, _>>()?;
    let start = start_time();
    let c = run_threads(a, streams, move |i, stream| rr_worker(a, i, stream, start))?;
    let fields = vec![
        ("mode", json!("rr")),
        ("conns", json!(a.conns)),
        ("size", json!(a.size)),
        ("rate", json!(a.rate)),
    ];
    report(fields, &c, start.elapsed(), ["requests", "rps"])
}

/// Prints `fields` and what `c` measured as one line of JSON; `count` and `rate` name the
/// number of samples and their rate. Fails if there was no sample.
fn report(
    mut fields: Vec<(&'static str, Value)>,
    c: &Client,
    elapsed: Duration,
    [count, rate]: [&'static str; 2],
) -> Result<(), String> {
    let h = &c.latency;
    let mean = (h.count > 0).then(|| round2(as_f64(h.sum) / as_f64(h.count)));
    fields.extend([
        ("duration_us", json!(micros(elapsed))),
        (count, json!(h.count)),
        ("errors", json!(c.errors)),
        ("p50_us", json!(h.percentile(500_000))),
        ("p90_us", json!(h.percentile(900_000))),
        ("p99_us", json!(h.percentile(990_000))),
        ("p999_us", json!(h.percentile(999_000))),
        ("max_us", json!(h.percentile(1_000_000))),
        ("mean_us", json!(mean)),
        (rate, json!(per_sec(h.count, elapsed))),
        ("spurious_eagain", json!(c.spurious_eagain)),
    ]);
    print_json(fields)?;
    match h.count {
        0 => Err(format!("no {count}")),
        _ => Ok(()),
    }
}

/// Prints one line of JSON: an object with the keys in this order (`json!` would sort them).
fn print_json(fields: Vec<(&str, Value)>) -> Result<(), String> {
    struct Ordered<'a>(Vec<(&'a str, Value)>);
    impl serde::Serialize for Ordered<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }
    let line = serde_json::to_string(&Ordered(fields)).map_err(|e| format!("JSON: {e}"))?;
    println!("{line}");
    Ok(())
}

/// Offset of the `k`th request of the whole run on an open-loop schedule of `rate` per second.
fn scheduled(k: u64, rate: u64) -> Duration {
    let nanos = u128::from(k) * 1_000_000_000 / u128::from(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// One `rr` connection. Open loop: connection `i` of `n` sends requests `i`, `i + n`, ... of
/// the run's schedule, late if the previous reply was, and times each from when it was due; it
/// sends everything due before the end but gives up at twice the duration. After an error the
/// next request reconnects.
fn rr_worker(a: Bench, i: usize, stream: TcpStream, start: Instant) -> Client {
    if a.rate.is_some() {
        // Sleeps otherwise overshoot by the default 50 µs slack, which would count as latency.
        let _ = nix::sys::prctl::set_timerslack(1);
    }
    let mut c = Client::new(a.addr, a.size, false);
    let mut stream = Some(stream);
    let (end, give_up) = (start + a.duration, start + 2 * a.duration);
    sleep_until(start);
    for j in 0u64.. {
        let due = if let Some(rate) = a.rate {
            let due = start + scheduled(i as u64 + j * a.conns as u64, rate);
            if due >= end || Instant::now() >= give_up {
                break;
            }
            sleep_until(due);
            due
        } else {
            let now = Instant::now();
            if now >= end {
                break;
            }
            now
        };
        match stream.take().or_else(|| c.dial()) {
            Some(conn) if c.exchange(&conn) => {
                c.latency.record(micros(due.elapsed()));
                stream = Some(conn);
            }
            // Do not spin on a dead server.
            _ => thread::sleep(ERROR_BACKOFF),
        }
    }
    c
}

fn connrate(a: Bench) -> Result<(), String> {
    let start = start_time();
    let c = run_threads(a, vec![(); a.conns], move |_, ()| connrate_worker(a, start))?;
    report(
        vec![("mode", json!("connrate"))],
        &c,
        start.elapsed(),
        ["connections", "cps"],
    )
}

/// Connects, exchanges a [`LAST`] request, waits for the server to close, closes; again.
fn connrate_worker(a: Bench, start: Instant) -> Client {
    let mut c = Client::new(a.addr, MESSAGE, true);
    sleep_until(start);
    while Instant::now() < start + a.duration {
        let began = Instant::now();
        let Some(stream) = c.dial().filter(|s| c.exchange(s)) else {
            thread::sleep(ERROR_BACKOFF);
            continue;
        };
        let mut reader = Reader::new(&stream, EagainPolicy::Count);
        match reader.read(&mut [0u8; 1]) {
            Ok(0) => c.latency.record(micros(began.elapsed())),
            Ok(_) => c.error("data after the reply"),
            Err(e) => c.error(&format!("waiting for the server to close: {e}")),
        }
        c.spurious_eagain += u64::from(reader.spurious_eagain);
    }
    c
}

fn hold(a: Bench) -> Result<(), String> {
    raise_nofile_limit(a.conns + 16);
    let mut c = Client::new(a.addr, MESSAGE, false);
    let held: Vec<TcpStream> = (0..a.conns)
        .filter_map(|_| c.dial().filter(|s| c.exchange(s)))
        .collect();
    println!("holding {}", held.len());
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))?;
    thread::sleep(a.duration);
    let opened = held.len();
    drop(held);
    print_json(vec![
        ("mode", json!("hold")),
        ("conns", json!(a.conns)),
        ("opened", json!(opened)),
        ("errors", json!(c.errors)),
        ("spurious_eagain", json!(c.spurious_eagain)),
    ])?;
    match opened {
        0 => Err("hold: no connection opened".into()),
        _ => Ok(()),
    }
}

/// Raises the soft limit on open files (sockets) to the hard one; warns if it stays below
/// `want`. The workspace's `nix` lacks the `resource` feature and `libc::setrlimit` is unsafe,
/// so util-linux's `prlimit` does it.
fn raise_nofile_limit(want: usize) {
    let Some((soft, hard)) = nofile_limits() else {
        return;
    };
    if soft < hard {
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
        if !status.as_ref().is_ok_and(std::process::ExitStatus::success) {
            eprintln!("mesh-probe: prlimit --nofile={hard}:{hard}: {status:?}");
        }
    }
    let soft = nofile_limits().map_or(soft, |(soft, _)| soft);
    if soft < want as u64 {
        eprintln!("mesh-probe: warning: open files limited to {soft}, {want} wanted");
    }
}

/// The soft and hard `RLIMIT_NOFILE` ("unlimited" reads as `u64::MAX`).
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut fields = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(u64::MAX));
    Some((fields.next()?, fields.next()?))
}

/// How long the `hbone` client may take for everything (connection, handshakes, echo).
const HBONE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one `parallel` connection may take for its echo, and then for its close.
const PARALLEL_TIMEOUT: Duration = Duration::from_secs(60);
/// Server name given to rustls; the mesh's verifiers ignore it (peers are checked by SPIFFE id).
const TLS_NAME: &str = "hbone.mesh.invalid";

/// Options of `hbone` (client) and `hbone-serve`.
#[derive(Debug, PartialEq, Eq)]
struct HboneOpts {
    /// The built-in CA that signs the probe's own certificate.
    ca_dir: PathBuf,
    /// The CA whose root the peer is verified against.
    trust_dir: PathBuf,
    identity: Identity,
    /// Client: the identity the server must prove.
    expect: Option<Identity>,
    /// Client: present a certificate whose validity ended an hour ago.
    expired: bool,
    /// Client: what to send through the tunnel.
    message: String,
}

fn parse_hbone(rest: &[&str], client: bool) -> Result<HboneOpts, String> {
    // `--expired` takes no value: pick it out where a flag name is expected.
    let (mut expired, mut pairs, mut i) = (false, Vec::new(), 0);
    while let Some(&arg) = rest.get(i) {
        if client && arg == "--expired" {
            expired = true;
            i += 1;
        } else {
            pairs.extend(rest.get(i..(i + 2).min(rest.len())).unwrap_or_default());
            i += 2;
        }
    }
    let allowed: &[&str] = if client {
        &[
            "--ca-dir",
            "--trust-dir",
            "--identity",
            "--expect",
            "--message",
        ]
    } else {
        &["--ca-dir", "--identity"]
    };
    let flags = flags(&pairs, allowed)?;
    let id = |name: &str| -> Result<Option<Identity>, String> {
        flag::<String>(&flags, name)?
            .map(|s| Identity::parse(&s).map_err(|e| format!("{name} {s:?}: {e}")))
            .transpose()
    };
    let ca_dir: PathBuf = flag(&flags, "--ca-dir")?.ok_or("--ca-dir is required")?;
    let expect = id("--expect")?;
    let message: String = flag(&flags, "--message")?.unwrap_or_default();
    if client && (expect.is_none() || message.is_empty()) {
        return Err("--expect and a non-empty --message are required".into());
    }
    Ok(HboneOpts {
        trust_dir: flag(&flags, "--trust-dir")?.unwrap_or_else(|| ca_dir.clone()),
        ca_dir,
        identity: id("--identity")?.ok_or("--identity is required")?,
        expect,
        expired,
        message,
    })
}

/// The probe's certificate for its identity, made as an agent makes one (a fresh key, a CSR,
/// the built-in CA's signature), with the trust bundle of `trust_dir`, as the snapshots the
/// mesh's TLS configurations read.
fn own_certs(o: &HboneOpts) -> Result<watch::Receiver<Arc<CertSnapshot>>, String> {
    let open = |dir: &Path| {
        let options = BuiltinCaOptions::default();
        BuiltinCa::load_or_create(dir, o.identity.trust_domain(), options)
            .map_err(|e| format!("CA in {}: {e}", dir.display()))
    };
    let ca = open(&o.ca_dir)?;
    let bundle = open(&o.trust_dir)?.trust_bundle();
    let key = WorkloadKey::generate().map_err(|e| e.to_string())?;
    let request = CsrRequest {
        csr_der: key.csr(&o.identity).map_err(|e| e.to_string())?,
        identity: o.identity.clone(),
        lifetime: Some(Duration::from_secs(3600)),
    };
    let chain = if o.expired {
        let ago = |secs| SystemTime::now().checked_sub(Duration::from_secs(secs));
        let (Some(from), Some(to)) = (ago(7200), ago(3600)) else {
            return Err("clock too close to the epoch".into());
        };
        ca.issue_with_validity(&request, from, to)
    } else {
        ca.issue(&request)
    };
    let chain = chain.map_err(|e| format!("signing: {e}"))?.chain;
    let cert = WorkloadCert::new(o.identity.clone(), chain, &key).map_err(|e| e.to_string())?;
    let snapshot = CertSnapshot {
        certs: HashMap::from([(o.identity.clone(), Arc::new(cert))]),
        bundle: Arc::new(bundle),
        generation: 1,
    };
    // The receiver keeps the last value after the sender is gone.
    Ok(watch::channel(Arc::new(snapshot)).1)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// An error with its causes, each once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The `hbone` client's pool connector: TCP to the key, then TLS with the probe's certificate.
struct TlsDial(Arc<rustls::ClientConfig>);

impl Connect for TlsDial {
    type Io = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
    type Key = SocketAddr;

    async fn connect(&self, key: &SocketAddr) -> std::io::Result<Self::Io> {
        let tcp = tokio::net::TcpStream::connect(key).await?;
        tcp.set_nodelay(true)?;
        let name =
            rustls::pki_types::ServerName::try_from(TLS_NAME).map_err(std::io::Error::other)?;
        TlsConnector::from(Arc::clone(&self.0))
            .connect(name, tcp)
            .await
    }
}

fn hbone_client(addr: &str, target: &str, o: &HboneOpts) -> Result<(), String> {
    let (addr, target) = (parse(addr)?, parse(target)?);
    let expect = o.expect.clone().ok_or("--expect is required")?;
    let config = mesh_identity::client_config(
        CryptoProvider::default(),
        own_certs(o)?,
        o.identity.clone(),
        expect,
    )
    .map_err(|e| e.to_string())?;
    let message = o.message.as_bytes();
    let result = runtime()?.block_on(async {
        let pool = Pool::new(TlsDial(config), PoolConfig::default());
        tokio::time::timeout(HBONE_TIMEOUT, tunnel_echo(&pool, addr, target, message))
            .await
            .unwrap_or_else(|_| Err(format!("no echo within {HBONE_TIMEOUT:?}")))
    });
    match result {
        Ok(()) => {
            println!("result=ok bytes={}", message.len());
            Ok(())
        }
        Err(e) => {
            println!("result=refused error={e}");
            Err("the HBONE tunnel failed".into())
        }
    }
}

/// Opens a tunnel to `target`, sends `message`, half-closes and checks the echo.
async fn tunnel_echo(
    pool: &Pool<TlsDial>,
    addr: SocketAddr,
    target: SocketAddr,
    message: &[u8],
) -> Result<(), String> {
    let stream = pool
        .open(&addr, OutboundRequest::new(target))
        .await
        .map_err(|e| error_chain(&e))?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write_and_close = async {
        wr.write_all(message).await?;
        wr.shutdown().await
    };
    let mut echo = Vec::new();
    let (sent, read) = tokio::join!(write_and_close, rd.read_to_end(&mut echo));
    sent.map_err(|e| format!("write: {}", error_chain(&e)))?;
    read.map_err(|e| format!("read: {}", error_chain(&e)))?;
    if echo != message {
        return Err(format!(
            "echo mismatch: sent {} bytes, got {}",
            message.len(),
            echo.len()
        ));
    }
    Ok(())
}

fn hbone_serve(addr: &str, o: &HboneOpts) -> Result<(), String> {
    let addr = parse(addr)?;
    let config =
        mesh_identity::server_config(CryptoProvider::default(), own_certs(o)?, o.identity.clone())
            .map_err(|e| e.to_string())?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        println!(
            "listening {}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        loop {
            let (tcp, peer) = listener
                .accept()
                .await
                .map_err(|e| format!("accept: {e}"))?;
            tokio::spawn(serve_hbone_connection(tcp, peer, Arc::clone(&config)));
        }
    })
}

/// One connection of `hbone-serve`: TLS, then every CONNECT stream echoed.
async fn serve_hbone_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) {
    let tls = match TlsAcceptor::from(config).accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            println!("tls_error peer={peer} error={}", error_chain(&e));
            return;
        }
    };
    let client = mesh_identity::peer_identity(tls.get_ref().1)
        .map_or_else(|| "none".to_string(), |id| id.to_string());
    println!("tls_ok peer={peer} identity={client}");
    let handler = move |request: InboundRequest, responder: Responder| {
        let client = client.clone();
        async move {
            println!("connect authority={} identity={client}", request.authority);
            match responder.accept() {
                Ok(stream) => {
                    let (mut rd, mut wr) = tokio::io::split(stream);
                    let copied = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                    println!("echoed {copied:?}");
                }
                Err(e) => println!("answering failed: {e}"),
            }
        }
    };
    let config = mesh_hbone::ServerConfig::default();
    if let Err(e) = mesh_hbone::serve_connection(tls, &config, handler).await {
        println!("connection from {peer} ended: {}", error_chain(&e));
    }
}

fn parallel(addr: &str, rest: &[&str]) -> Result<(), String> {
    let again = rest.contains(&"--again");
    let rest: Vec<&str> = rest.iter().copied().filter(|a| *a != "--again").collect();
    let flags = flags(&rest, &["--conns", "--bytes", "--hold-ms"])?;
    let conns: usize = positive(&flags, "--conns")?.ok_or("--conns is required")?;
    let bytes: usize = positive(&flags, "--bytes")?.ok_or("--bytes is required")?;
    let hold = Duration::from_millis(flag(&flags, "--hold-ms")?.unwrap_or(0));
    let addr = parse(addr)?;
    raise_nofile_limit(conns + 64);
    let (ok, errors) = runtime()?.block_on(async move {
        let mut errors = Vec::new();
        let echoes: Vec<_> = (0..conns)
            .map(|i| {
                tokio::spawn(tokio::time::timeout(
                    PARALLEL_TIMEOUT,
                    echo_pattern(addr, i, bytes),
                ))
            })
            .collect();
        let mut open = Vec::new();
        for echo in echoes {
            match echo.await {
                Ok(Ok(Ok(stream))) => open.push(stream),
                Ok(Ok(Err(e))) => errors.push(e),
                Ok(Err(_)) => errors.push(format!("no echo within {PARALLEL_TIMEOUT:?}")),
                Err(e) => errors.push(format!("task: {e}")),
            }
        }
        println!("open={} failed={}", open.len(), conns - open.len());
        tokio::time::sleep(hold).await;
        let closes: Vec<_> = open
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                tokio::spawn(tokio::time::timeout(PARALLEL_TIMEOUT, async move {
                    let s = if again {
                        echo_again(s, i, bytes).await?
                    } else {
                        s
                    };
                    close_after_echo(s).await
                }))
            })
            .collect();
        let mut ok = 0;
        for close in closes {
            match close.await {
                Ok(Ok(Ok(()))) => ok += 1,
                Ok(Ok(Err(e))) => errors.push(e),
                Ok(Err(_)) => errors.push(format!("no end-of-file within {PARALLEL_TIMEOUT:?}")),
                Err(e) => errors.push(format!("task: {e}")),
            }
        }
        (ok, errors)
    });
    println!("ok={ok} failed={}", conns - ok);
    match errors.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} connections failed; first: {first}",
            errors.len()
        )),
    }
}

/// Connection `i` of `parallel`: sends its own pattern while reading the echo, compares.
async fn echo_pattern(
    addr: SocketAddr,
    i: usize,
    bytes: usize,
) -> Result<tokio::net::TcpStream, String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connection {i}: connect: {e}"))?;
    let mut data = vec![0u8; bytes];
    // Distinct and never zero (xorshift's fixed point).
    let mut state = (0x9E37_79B9_7F4A_7C15 ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)) | 1;
    fill(&mut data, &mut state);
    let mut echo = vec![0u8; bytes];
    {
        let (mut rd, mut wr) = stream.split();
        let (sent, read) = tokio::join!(wr.write_all(&data), rd.read_exact(&mut echo));
        sent.map_err(|e| format!("connection {i}: write: {e}"))?;
        read.map_err(|e| format!("connection {i}: read: {e}"))?;
    }
    if echo != data {
        let at = echo.iter().zip(&data).position(|(a, b)| a != b);
        return Err(format!("connection {i}: the echo differs at byte {at:?}"));
    }
    Ok(stream)
}

/// Sends connection `i`'s `bytes` pattern again on an open connection and checks the echo.
async fn echo_again(
    mut stream: tokio::net::TcpStream,
    i: usize,
    bytes: usize,
) -> Result<tokio::net::TcpStream, String> {
    let mut data = vec![0u8; bytes];
    let mut state = (0x2545_F491_4F6C_DD1D ^ (i as u64).wrapping_mul(0x9E37_79B9)) | 1;
    fill(&mut data, &mut state);
    let mut echo = vec![0u8; bytes];
    {
        let (mut rd, mut wr) = stream.split();
        let (sent, read) = tokio::join!(wr.write_all(&data), rd.read_exact(&mut echo));
        sent.map_err(|e| format!("connection {i}: write after the hold: {e}"))?;
        read.map_err(|e| format!("connection {i}: read after the hold: {e}"))?;
    }
    if echo != data {
        return Err(format!("connection {i}: the echo after the hold differs"));
    }
    Ok(stream)
}

/// Half-closes a connection whose echo is complete and expects end-of-file, nothing more.
async fn close_after_echo(mut stream: tokio::net::TcpStream) -> Result<(), String> {
    stream
        .shutdown()
        .await
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .map_err(|e| format!("reading to end-of-file: {e}"))?;
    match rest.len() {
        0 => Ok(()),
        n => Err(format!("{n} unexpected bytes after the echo")),
    }
}

fn raw(addr: &str, rest: &[&str]) -> Result<(), String> {
    let flags = flags(rest, &["--send-hex", "--wait-close-ms", "--resend-ms"])?;
    let data = unhex(&flag::<String>(&flags, "--send-hex")?.unwrap_or_default())?;
    let wait = Duration::from_millis(
        positive(&flags, "--wait-close-ms")?.ok_or("--wait-close-ms is required")?,
    );
    let resend = positive::<u64>(&flags, "--resend-ms")?.map(Duration::from_millis);
    let mut stream = dial(parse(addr)?)?;
    stream.write_all(&data).map_err(|e| format!("write: {e}"))?;
    println!("sent {} bytes", data.len());
    let started = Instant::now();
    let mut next_send = resend.map(|every| started + every);
    let (mut received, mut buf) = (0usize, [0u8; 4096]);
    loop {
        if let Some(at) = next_send.filter(|at| Instant::now() >= *at) {
            if let Err(e) = stream.write_all(&data) {
                let ms = started.elapsed().as_millis();
                println!("closed_after_ms={ms} how=write:{e} received={received}");
                return Ok(());
            }
            next_send = resend.map(|every| at + every);
        }
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            println!("still_open received={received}");
            return Ok(());
        }
        let until_send = next_send.map_or(left, |at| at.saturating_duration_since(Instant::now()));
        stream
            .set_read_timeout(Some(left.min(until_send).max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        let how = match stream.read(&mut buf) {
            Ok(0) => "eof",
            Ok(n) => {
                received += n;
                // Progress, so a caller can wait for the peer's answer before acting.
                println!("received {received}");
                continue;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
            // The socket itself aborted (`SOCK_DESTROY`: a kernel-direct connection revoked).
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => "aborted",
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("read: {e}")),
        };
        let ms = started.elapsed().as_millis();
        println!("closed_after_ms={ms} how={how} received={received}");
        return Ok(());
    }
}

fn unhex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("--send-hex: odd length {}", hex.len()));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| format!("--send-hex: not hex at {i}"))
        })
        .collect()
}

/// Timeout of `http`'s connect, and of each of its reads and writes.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response `http` reads (head and body).
const HTTP_MAX: usize = 16 << 20;

/// `http <METHOD> <host:port> <path>`: one HTTP/1.1 request with `Connection: close`. Prints the
/// status code on the first line, then the body as received. Any response is a success (the
/// caller checks the code); failing to connect or to read a response is an error.
fn http(method: &str, addr: &str, path: &str) -> Result<(), String> {
    let (status, body) = http_request(method, addr, path)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{status}")
        .and_then(|()| out.write_all(&body))
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// Sends the request and returns the status code and the (de-chunked) body.
fn http_request(method: &str, addr: &str, path: &str) -> Result<(u16, Vec<u8>), String> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!("method {method:?}: expected upper-case letters"));
    }
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
        return Err(format!(
            "path {path:?}: must start with / and have no spaces"
        ));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("address {addr:?}: {e}"))?
        .collect();
    let mut last_error = format!("address {addr:?} resolves to nothing");
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, HTTP_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = format!("connect {a}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HTTP_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    let length = if matches!(method, "GET" | "HEAD") {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-probe\r\nAccept: */*\r\n\
         {length}Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send request: {e}"))?;
    read_response(&mut stream, method == "HEAD")
}

/// Reads one HTTP/1.1 response (after any `1xx` interim ones): the status code and the body,
/// delimited by `Content-Length`, chunked encoding, or the end of the stream.
fn read_response(stream: &mut impl Read, head_request: bool) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut eof = false;
    // Reads more into `buf`; `false` at end of stream.
    let mut fill = |buf: &mut Vec<u8>, eof: &mut bool| -> Result<bool, String> {
        if *eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("read response: {e}"))?;
        if buf.len() + n > HTTP_MAX {
            return Err(format!("response larger than {HTTP_MAX} bytes"));
        }
        buf.extend_from_slice(&chunk[..n]);
        *eof = n == 0;
        Ok(n > 0)
    };
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut buf, &mut eof)? {
                return Err(if buf.is_empty() {
                    "connection closed without a response".into()
                } else {
                    "connection closed within the response head".into()
                });
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = match status_line.split(' ').collect::<Vec<_>>().as_slice() {
            [version, code, ..] if version.starts_with("HTTP/1.") && code.len() == 3 => code
                .parse()
                .map_err(|_| format!("bad status line {status_line:?}"))?,
            _ => return Err(format!("bad status line {status_line:?}")),
        };
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let header = |name: &str| {
            lines.clone().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        if head_request || status == 204 || status == 304 {
            return Ok((status, Vec::new()));
        }
        if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                if let Some(body) = dechunk(&buf)? {
                    return Ok((status, body));
                }
                if !fill(&mut buf, &mut eof)? {
                    return Err("connection closed within the chunked body".into());
                }
            }
        }
        if let Some(length) = header("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| format!("bad Content-Length {length:?}"))?;
            if length > HTTP_MAX {
                return Err(format!("Content-Length {length} larger than {HTTP_MAX}"));
            }
            while buf.len() < length {
                if !fill(&mut buf, &mut eof)? {
                    return Err(format!(
                        "connection closed after {} of {length} body bytes",
                        buf.len()
                    ));
                }
            }
            buf.truncate(length);
            return Ok((status, buf));
        }
        while fill(&mut buf, &mut eof)? {}
        return Ok((status, buf));
    }
}

/// Decodes a chunked body; `None` while `data` does not hold all of it yet.
fn dechunk(data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let line_end = |from: usize| {
        data.get(from..)
            .and_then(|rest| rest.windows(2).position(|w| w == b"\r\n"))
            .map(|i| from + i)
    };
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(end) = line_end(pos) else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&data[pos..end]);
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size line {line:?}"))?;
        pos = end + 2;
        if size == 0 {
            // Trailer lines up to an empty one.
            loop {
                let Some(end) = line_end(pos) else {
                    return Ok(None);
                };
                if end == pos {
                    return Ok(Some(body));
                }
                pos = end + 2;
            }
        }
        let Some(chunk) = data.get(pos..pos + size) else {
            return Ok(None);
        };
        body.extend_from_slice(chunk);
        pos += size;
        match data.get(pos..pos + 2) {
            None | Some(b"\r") => return Ok(None),
            Some(b"\r\n") => pos += 2,
            Some(_) => return Err("chunk not followed by CRLF".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(line: &str) -> Result<Bench, String> {
        let args: Vec<&str> = line.split_whitespace().collect();
        parse_bench(args[0], args[1], &args[2..])
    }

    fn filled(values: impl IntoIterator<Item = u64>) -> Histogram {
        let mut h = Histogram::default();
        values.into_iter().for_each(|v| h.record(v));
        h
    }

    #[test]
    fn exact_below_256() {
        let h = filled(1..=100);
        assert_eq!(h.percentile(500_000), Some(50));
        assert_eq!(h.percentile(900_000), Some(90));
        assert_eq!(h.percentile(990_000), Some(99));
        assert_eq!(h.percentile(999_000), Some(100));
        assert_eq!(h.percentile(1_000_000), Some(100));
        assert_eq!(h.percentile(0), Some(1));
        assert_eq!((h.count, h.sum), (100, 5050));
        assert_eq!(Histogram::default().percentile(500_000), None);
    }

    #[test]
    fn percentiles_within_precision() {
        let h = filled((1..=100_000).map(|v| v * 10));
        for (ppm, want) in [
            (500_000, 500_000.0),
            (990_000, 990_000.0),
            (999_000, 999_000.0),
        ] {
            let got = as_f64(h.percentile(ppm).expect("samples"));
            assert!((got - want).abs() / want <= 1.0 / 256.0, "{ppm}: {got}");
        }
        assert_eq!(h.percentile(1_000_000), Some(1_000_000));
        // One slow outlier among fast samples: p99.9 sees it only when it is in the top 0.1%.
        let h = filled((0..999).map(|_| 20).chain([10_000_000]));
        assert_eq!(h.percentile(999_000), Some(20));
        assert_eq!(h.percentile(999_001), Some(10_000_000));
        // Rank rounds up: of 10 samples, p50 is the 5th and p99 the 10th.
        let h = filled(1..=10);
        assert_eq!(h.percentile(500_000), Some(5));
        assert_eq!(h.percentile(990_000), Some(10));
    }

    #[test]
    fn buckets_cover_every_value_within_one_128th() {
        let mut values: Vec<u64> = (0..2_000).collect();
        let mut v = 2_000u64;
        while let Some(next) = v.checked_add(v / 97 + 1) {
            values.push(next);
            v = next;
        }
        values.extend([10_000_000, (1 << 40) - 1, 1 << 40, u64::MAX]);
        values.sort_unstable();
        let mut last = 0;
        for v in values {
            let i = Histogram::index(v);
            assert!(i < BUCKETS && i >= last, "{v}: bucket {i}");
            last = i;
            let (low, width) = Histogram::bucket(i);
            assert!(
                low <= v && v - low < width,
                "{v}: bucket {i} = {low}+{width}"
            );
            assert!(width == 1 || width <= low / SUB, "{v}: {low}+{width}");
            // The middle of the bucket stands for every value in it.
            let h = filled([v, v, v.saturating_add(width)]);
            let p = as_f64(h.percentile(500_000).expect("samples"));
            assert!((p - as_f64(v)).abs() <= as_f64(v) / 128.0, "{v}: {p}");
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn merge_adds_up() {
        let mut a = filled(1..=50);
        a.merge(&filled(51..=100));
        assert_eq!(a.count, 100);
        assert_eq!(a.percentile(500_000), Some(50));
        assert_eq!(a.percentile(1_000_000), Some(100));
    }

    #[test]
    fn schedule_spreads_requests_evenly() {
        assert_eq!(scheduled(0, 1_000), Duration::ZERO);
        assert_eq!(scheduled(3, 1_000), Duration::from_millis(3));
        assert_eq!(scheduled(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(scheduled(u64::MAX, 1), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn parses_serve() {
        let short = |args: &[&str]| parse_serve(args).map(|o| (o.mode, o.count, o.stall));
        assert_eq!(
            parse_serve(&["--mode", "sink", "--past-eof-ms", "200"]).map(|o| o.past_eof),
            Ok(Some(Duration::from_millis(200)))
        );
        assert_eq!(short(&[]), Ok((Mode::Echo, None, None)));
        assert_eq!(
            short(&["--count", "3", "--mode", "rr"]),
            Ok((Mode::Rr, Some(3), None))
        );
        assert_eq!(
            short(&["--mode", "sink", "--stall-ms", "1500"]),
            Ok((Mode::Sink, None, Some(Duration::from_millis(1500))))
        );
        assert_eq!(short(&["--mode", "greet"]), Ok((Mode::Greet, None, None)));
        for (args, want) in [
            (&["--mode", "bogus"][..], "unknown mode \"bogus\""),
            (&["--mode"], "--mode needs a value"),
            (&["--count", "x"], "--count \"x\""),
            (&["--stall-ms", "0"], "--stall-ms must be at least 1"),
            (&["--past-eof-ms", "0"], "--past-eof-ms must be at least 1"),
            (&["extra"], "unknown option \"extra\""),
        ] {
            let e = parse_serve(args).expect_err(want);
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn parses_the_benchmark_commands() {
        let addr: SocketAddr = "127.0.0.1:9100".parse().expect("address");
        let (conns, size, rate) = (4, MESSAGE, None);
        let duration = Duration::from_secs(2);
        let b = Bench {
            addr,
            conns,
            duration,
            rate,
            size,
        };
        assert_eq!(
            bench("rr 127.0.0.1:9100 --conns 4 --duration-ms 2000"),
            Ok(b)
        );
        assert_eq!(
            bench("rr 127.0.0.1:9100 --size 64 --rate 1000 --duration-ms 5 --conns 1"),
            Ok(Bench {
                conns: 1,
                duration: Duration::from_millis(5),
                rate: Some(1000),
                size: 64,
                ..b
            })
        );
        assert_eq!(
            bench("connrate 127.0.0.1:9100 --duration-ms 2000"),
            Ok(Bench { conns: 1, ..b })
        );
        assert_eq!(
            bench("hold [::1]:9100 --conns 2000 --hold-ms 0"),
            Ok(Bench {
                addr: "[::1]:9100".parse().expect("address"),
                conns: 2000,
                duration: Duration::ZERO,
                ..b
            })
        );
        for (line, want) in [
            ("rr 127.0.0.1:9100 --duration-ms 1", "--conns is required"),
            ("rr 127.0.0.1:9100 --conns 1", "--duration-ms is required"),
            (
                "rr 127.0.0.1:9100 --conns 0 --duration-ms 1",
                "--conns must be",
            ),
            (
                "rr 127.0.0.1:9100 --conns 1 --duration-ms 0",
                "--duration-ms must",
            ),
            (
                "rr 127.0.0.1:9100 --conns 1 --duration-ms 1 --rate 0",
                "--rate must",
            ),
            (
                "rr 127.0.0.1:9100 --conns 1 --duration-ms 1 --size 0",
                "--size must",
            ),
            (
                "rr 127.0.0.1:9100 --conns 1 --duration-ms 1 --size 999999999",
                "--size must",
            ),
            (
                "rr 127.0.0.1:9100 --conns -1 --duration-ms 1",
                "--conns \"-1\"",
            ),
            (
                "rr 127.0.0.1:9100 --conns 1 --conns 2",
                "--conns given twice",
            ),
            (
                "rr 127.0.0.1:9100 --conns 1 --verbose",
                "unknown option \"--verbose\"",
            ),
            ("rr 127.0.0.1:9100 --conns", "--conns needs a value"),
            (
                "rr localhost:9100 --conns 1 --duration-ms 1",
                "address \"localhost:9100\"",
            ),
            (
                "connrate 127.0.0.1:9100 --duration-ms 1 --rate 5",
                "unknown option",
            ),
            (
                "connrate 127.0.0.1:9100 --conns 2",
                "--duration-ms is required",
            ),
            ("hold 127.0.0.1:9100 --conns 5", "--hold-ms is required"),
            ("hold 127.0.0.1:9100 --hold-ms 5", "--conns is required"),
            (
                "hold 127.0.0.1:9100 --conns 5 --duration-ms 5",
                "unknown option",
            ),
        ] {
            let e = bench(line).expect_err(line);
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn requests_carry_their_length() {
        let addr = "127.0.0.1:1".parse().expect("address");
        let c = Client::new(addr, 1024, false);
        assert_eq!((c.request.len(), c.reply.len()), (1028, 1024));
        assert_eq!(c.request[..4], 1024u32.to_be_bytes());
        let c = Client::new(addr, 0xA, true);
        assert_eq!(c.request[..4], (0xA | LAST).to_be_bytes());
    }

    #[test]
    fn reads_the_open_files_limit() {
        let (soft, hard) = nofile_limits().expect("limits");
        assert!(soft > 0 && soft <= hard, "{soft} {hard}");
    }

    #[test]
    fn parses_the_hbone_commands() {
        let args = "--ca-dir /ca --identity spiffe://td/ns/a/sa/b --expired --expect spiffe://td/ns/a/sa/c --message hi";
        let args: Vec<&str> = args.split_whitespace().collect();
        let o = parse_hbone(&args, true).expect("client options");
        assert_eq!(o.ca_dir, Path::new("/ca"));
        assert_eq!(o.trust_dir, Path::new("/ca"));
        assert!(o.expired);
        assert_eq!(o.identity.as_str(), "spiffe://td/ns/a/sa/b");
        assert_eq!(
            o.expect.as_ref().map(Identity::as_str),
            Some("spiffe://td/ns/a/sa/c")
        );
        assert_eq!(o.message, "hi");
        let server = parse_hbone(
            &["--identity", "spiffe://td/ns/a/sa/b", "--ca-dir", "/x"],
            false,
        )
        .expect("server options");
        assert!(!server.expired && server.expect.is_none());
        for (args, client, want) in [
            (
                &["--ca-dir", "/x", "--expired"][..],
                false,
                "unknown option \"--expired\"",
            ),
            (&["--ca-dir", "/x"], false, "--identity is required"),
            (
                &["--identity", "spiffe://td/ns/a/sa/b"],
                false,
                "--ca-dir is required",
            ),
            (
                &["--ca-dir", "/x", "--identity", "nope"],
                false,
                "--identity \"nope\"",
            ),
            (
                &["--ca-dir", "/x", "--identity", "spiffe://td/ns/a/sa/b"],
                true,
                "--expect",
            ),
        ] {
            let e = parse_hbone(args, client).expect_err(want);
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn decodes_hex() {
        assert_eq!(unhex(""), Ok(vec![]));
        assert_eq!(unhex("00ff7A"), Ok(vec![0, 0xff, 0x7a]));
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
        assert!(unhex("é0").is_err());
    }

    fn response(raw: &[u8], head: bool) -> Result<(u16, String), String> {
        read_response(&mut std::io::Cursor::new(raw.to_vec()), head)
            .map(|(s, b)| (s, String::from_utf8(b).unwrap()))
    }

    #[test]
    fn reads_http_responses() {
        let ok = |s: u16, b: &str| Ok((s, b.to_string()));
        assert_eq!(
            response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nready\nextra",
                false
            ),
            ok(200, "ready\n")
        );
        assert_eq!(
            response(
                b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: x\n",
                false
            ),
            ok(503, "not ready: x\n")
        );
        assert_eq!(
            response(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
                false
            ),
            ok(200, "abcde")
        );
        assert_eq!(
            response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno", false),
            ok(404, "no")
        );
        assert_eq!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n", true),
            ok(200, "")
        );
        for (raw, want) in [
            (&b""[..], "without a response"),
            (b"HTTP/1.1 200 OK\r\n", "within the response head"),
            (b"SSH-2.0-x\r\n\r\n", "bad status line"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", "3 of 9"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                "chunked body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
        ] {
            let e = response(raw, false).expect_err(want);
            assert!(e.contains(want), "{raw:?}: {e}");
        }
    }

    #[test]
    fn http_request_against_a_local_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 5\r\n\r\nnope\n")
                .unwrap();
            String::from_utf8(head).unwrap()
        });
        let (status, body) =
            http_request("POST", &addr.to_string(), "/logging?level=debug").unwrap();
        assert_eq!((status, body.as_slice()), (405, &b"nope\n"[..]));
        let head = server.join().unwrap();
        assert!(
            head.starts_with("POST /logging?level=debug HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Length: 0\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nHost: {addr}\r\n")), "{head}");

        // Nothing listens on a port just freed: a connection error.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = http_request("GET", &free.to_string(), "/").unwrap_err();
        assert!(e.starts_with(&format!("connect {free}: ")), "{e}");
        assert!(http_request("get", "127.0.0.1:1", "/").is_err());
        assert!(http_request("GET", "127.0.0.1:1", "no-slash").is_err());
    }
}
