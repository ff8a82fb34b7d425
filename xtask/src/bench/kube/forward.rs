//! The counting TCP forwarder between the agent and the API server.

use std::{
    fs, io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// Bytes carried by the counting forwarder, all connections together.
#[derive(Debug, Default)]
pub(super) struct Counter {
    /// API server → agent.
    to_agent: AtomicU64,
    /// Agent → API server.
    from_agent: AtomicU64,
    connections: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Bytes {
    pub(super) to_agent: u64,
    pub(super) from_agent: u64,
    pub(super) connections: u64,
}

impl Counter {
    pub(super) fn read(&self) -> Bytes {
        Bytes {
            to_agent: self.to_agent.load(Ordering::Relaxed),
            from_agent: self.from_agent.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

impl Bytes {
    pub(super) fn since(self, earlier: Self) -> Self {
        Self {
            to_agent: self.to_agent - earlier.to_agent,
            from_agent: self.from_agent - earlier.from_agent,
            connections: self.connections - earlier.connections,
        }
    }
}

/// A listener on `127.0.0.1:<free port>` inside the network namespace at `netns`, made by a
/// thread of its own that enters it (a socket keeps the namespace it was made in).
pub(super) fn listen_in(netns: &Path) -> Result<StdListener> {
    let path = netns.to_path_buf();
    let listener = thread::spawn(move || -> io::Result<StdListener> {
        setns(fs::File::open(&path)?, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread binding in {} panicked", netns.display()))?;
    listener.with_context(|| format!("listening inside {}", netns.display()))
}

/// Carries each accepted connection to `upstream` (the API server in the root namespace),
/// counting the bytes each way.
pub(super) async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    counter: Arc<Counter>,
) {
    loop {
        let Ok((downstream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        counter.connections.fetch_add(1, Ordering::Relaxed);
        let counter = Arc::clone(&counter);
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = downstream.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (down_r, down_w) = downstream.into_split();
            let (up_r, up_w) = upstream.into_split();
            let to_agent = pump(up_r, down_w, Arc::clone(&counter), true);
            let from_agent = pump(down_r, up_w, counter, false);
            tokio::join!(to_agent, from_agent);
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Arc<Counter>,
    to_agent: bool,
) {
    let mut buf = vec![0_u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let field = if to_agent {
            &counter.to_agent
        } else {
            &counter.from_agent
        };
        field.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
