//! gRPC for the waypoint tests, with the standard health service (`grpc.health.v1.Health`) of
//! tonic: a server that says its own name is SERVING (and knows no other service), and a client
//! that asks, so a test learns which backend answered a call from its status.
//!
//! - `grpc-serve <addr> --name N`: prints `listening <addr>`.
//! - `grpc <addr> --service S --count C`: C unary `Check(S)` calls on one h2c connection; prints
//!   `grpc ok serving=<calls answered SERVING> not_found=<calls answered NOT_FOUND>` (the
//!   backend named S answered, or another one did). With `--watch`: one server-streaming
//!   `Watch(S)`, its first message; prints `watch status=<status>`.

use tonic::transport::{Endpoint, Server};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Serves the health service until killed.
pub fn serve(addr: &str, name: &str) -> Result<(), String> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let name = name.to_owned();
    super::runtime()?.block_on(async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(&name, tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        println!("listening {addr}");
        let incoming = tokio_stream_of(listener);
        Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
            .map_err(|e| format!("gRPC server: {e}"))
    })
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(tcp, _)| tcp);
        Some((accepted, listener))
    })
}

/// The client: `count` checks, or one watch.
pub fn client(addr: &str, service: &str, count: u64, watch: bool) -> Result<(), String> {
    let uri = format!("http://{addr}");
    let service = service.to_owned();
    super::runtime()?.block_on(async move {
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| format!("endpoint: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: service.clone(),
        };
        if watch {
            let mut stream = client
                .watch(request())
                .await
                .map_err(|e| format!("watch: {e}"))?
                .into_inner();
            let first = stream
                .message()
                .await
                .map_err(|e| format!("watch stream: {e}"))?
                .ok_or("the watch stream ended without a message")?;
            println!("watch status={}", first.status().as_str_name());
            return Ok(());
        }
        let (mut serving, mut not_found) = (0, 0);
        for _ in 0..count {
            match client.check(request()).await {
                Ok(reply)
                    if reply.get_ref().status()
                        == tonic_health::pb::health_check_response::ServingStatus::Serving =>
                {
                    serving += 1;
                }
                Ok(reply) => {
                    return Err(format!("unexpected status {:?}", reply.get_ref().status()))
                }
                Err(status) if status.code() == tonic::Code::NotFound => not_found += 1,
                Err(status) => return Err(format!("check: {status}")),
            }
        }
        println!("grpc ok serving={serving} not_found={not_found}");
        Ok(())
    })
}
