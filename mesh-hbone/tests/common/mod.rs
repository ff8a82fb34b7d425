//! Test helpers: a TCP connector, a loopback server harness, handlers and data.

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_hbone::{serve_connection, Connect, H2Stream, Handler, HboneError, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Connects plain TCP to the key, counting attempts.
#[derive(Clone, Default)]
pub struct TcpConnector {
    pub attempts: Arc<AtomicUsize>,
}

impl Connect for TcpConnector {
    type Io = TcpStream;
    type Key = SocketAddr;

    fn connect(&self, key: &SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        TcpStream::connect(*key)
    }
}

/// An HBONE server on 127.0.0.1 running `serve_connection` per accepted socket.
pub struct TestServer {
    pub addr: SocketAddr,
    /// One result per finished connection.
    pub results: mpsc::UnboundedReceiver<Result<(), HboneError>>,
    pub accepted: Arc<AtomicUsize>,
    pub connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.acceptor.abort();
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl TestServer {
    pub async fn start<H>(config: ServerConfig, handler: H) -> Self
    where
        H: Handler + Clone,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, results) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let accepted = Arc::clone(&accepted);
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    let config = config.clone();
                    let tx = tx.clone();
                    let task = tokio::spawn(async move {
                        let result = serve_connection(socket, &config, handler).await;
                        let _ = tx.send(result);
                    });
                    connections.lock().unwrap().push(task);
                }
            })
        };
        Self {
            addr,
            results,
            accepted,
            connections,
            acceptor,
        }
    }

    /// Kills every connection the server has accepted so far (the sockets close).
    pub fn kill_connections(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// The next connection result, within `within`.
    pub async fn next_result(&mut self, within: Duration) -> Result<(), HboneError> {
        tokio::time::timeout(within, self.results.recv())
            .await
            .expect("no connection ended in time")
            .expect("server gone")
    }
}

/// Echoes every byte back and half-closes after the client did.
pub async fn echo(mut stream: H2Stream) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// A handler that accepts and echoes.
pub fn echo_handler() -> impl Handler + Clone {
    |_req, responder: mesh_hbone::Responder| async move {
        if let Ok(stream) = responder.accept() {
            let _ = echo(stream).await;
        }
    }
}

/// Writes `data` then half-closes, while reading everything the peer sends until it
/// half-closes.
pub async fn round_trip(stream: H2Stream, data: &[u8]) -> io::Result<Vec<u8>> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer.write_all(data).await?;
        writer.shutdown().await
    };
    let read = async {
        let mut out = Vec::with_capacity(data.len());
        reader.read_to_end(&mut out).await.map(|_| out)
    };
    let (written, read) = tokio::join!(write, read);
    written?;
    read
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}
