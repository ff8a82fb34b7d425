//! `http-load <host:port> --rate R --duration-ms D [--conns N] [--h2] [--header 'name: value']...`:
//! open-loop HTTP load, `GET /` (with those headers) at R requests/s spread over N connections (HTTP/1.1, kept alive) or N h2c
//! connections (`--h2`, each request a stream of its own), for D ms. A request held back by the
//! answer before it (HTTP/1.1) is timed from when it was due, so a slow answer counts against
//! the requests it delays (no coordinated omission); one sent on time is timed from when the
//! timer woke it (tokio's timer rounds up to the millisecond, which is not the path's). Prints
//! one line of JSON:
//! `{"requests", "errors", "p50_us", "p90_us", "p99_us", "max_us"}`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    header::{HeaderName, HeaderValue},
    Request,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

/// The options.
pub struct Options {
    pub rate: u64,
    pub duration: Duration,
    pub conns: u64,
    pub h2: bool,
    /// Sent with every request.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A `--header` value, `name: value`.
pub fn header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("--header {text:?}: expected `name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("--header {text:?}: {e}"))?;
    let value =
        HeaderValue::from_str(value.trim()).map_err(|e| format!("--header {text:?}: {e}"))?;
    Ok((name, value))
}

// Rates, counts and quantile positions are far below 2^52: the conversions are exact.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub fn run(addr: &str, options: &Options) -> Result<(), String> {
    let addr = addr.to_owned();
    let (rate, duration, conns, h2) = (options.rate, options.duration, options.conns, options.h2);
    let headers = std::sync::Arc::new(options.headers.clone());
    super::runtime()?.block_on(async move {
        let per_conn = Duration::from_secs_f64(conns as f64 / rate as f64);
        let start = Instant::now() + Duration::from_millis(100);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let addr = addr.clone();
            // Connections start spread over one interval, so the load is even.
            let first = start + per_conn.mul_f64(c as f64 / conns as f64);
            tasks.push(tokio::spawn(connection(
                addr,
                (first, per_conn, start + duration),
                h2,
                std::sync::Arc::clone(&headers),
            )));
        }
        let mut latencies = Vec::new();
        let mut errors = 0u64;
        for task in tasks {
            let (l, e) = task.await.map_err(|e| format!("task: {e}"))??;
            latencies.extend(l);
            errors += e;
        }
        latencies.sort_unstable();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0, |d: &Duration| d.as_micros())
        };
        println!(
            "{}",
            json!({
                "requests": latencies.len(),
                "errors": errors,
                "p50_us": pick(0.50),
                "p90_us": pick(0.90),
                "p99_us": pick(0.99),
                "max_us": latencies.last().map_or(0, Duration::as_micros),
            })
        );
        Ok(())
    })
}

type Latencies = (Vec<Duration>, u64);

async fn connection(
    addr: String,
    (first, interval, end): (Instant, Duration, Instant),
    h2: bool,
    headers: std::sync::Arc<Vec<(HeaderName, HeaderValue)>>,
) -> Result<Latencies, String> {
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let io = TokioIo::new(tcp);
    // HTTP/1.1 as clients send it: origin-form and a `Host` header (hyper's connection API
    // adds none, and a proxy such as nginx refuses a request without it); HTTP/2 takes
    // `:authority` from the URI.
    let request = || {
        let mut builder = if h2 {
            Request::get(format!("http://{addr}/"))
        } else {
            Request::get("/").header(hyper::header::HOST, addr.as_str())
        };
        for (name, value) in headers.iter() {
            builder = builder.header(name, value);
        }
        builder
            .body(Empty::<Bytes>::new())
            .expect("a valid request")
    };
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut due = first;
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let mut streams = Vec::new();
        while due < end {
            let at = on_time(due).await;
            let mut sender = sender.clone();
            let req = request();
            streams.push(tokio::spawn(async move {
                let answered = match sender.send_request(req).await {
                    Ok(response) => response.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                (answered, at.elapsed())
            }));
            due += interval;
        }
        for stream in streams {
            match stream.await {
                Ok((true, latency)) => latencies.push(latency),
                _ => errors += 1,
            }
        }
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        while due < end {
            let at = on_time(due).await;
            let answered = match sender.send_request(request()).await {
                Ok(response) => response.into_body().collect().await.is_ok(),
                Err(_) => false,
            };
            if answered {
                latencies.push(at.elapsed());
            } else {
                errors += 1;
            }
            due += interval;
        }
    }
    Ok((latencies, errors))
}

/// Waits until `due`; returns when the request counts from: `due` when it is already late,
/// else the moment the timer woke.
async fn on_time(due: Instant) -> Instant {
    if Instant::now() >= due {
        return due;
    }
    tokio::time::sleep_until(due.into()).await;
    Instant::now()
}
