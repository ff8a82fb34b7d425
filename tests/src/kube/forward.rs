//! Reaching the API server from a node's network namespace without touching the root
//! namespace's addresses or routes: a TCP forwarder whose listening socket lives inside the
//! node's namespace, on `127.0.0.1:<API server port>`, and which carries each connection to the
//! API server on the root namespace's loopback. This is the client-side API server load balancer
//! that k3s and rke2 agents run on every node; TLS passes through untouched, so clients verify
//! the API server's own certificate (valid for 127.0.0.1).
//!
//! A socket keeps the network namespace it was created in. So a short-lived thread enters the
//! node's namespace (`setns`), creates and binds the listener and hands it back; the forwarding
//! itself runs on the control plane's runtime, whose threads stay in the root namespace, so
//! their connections to the API server are made there.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener as StdListener},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use nix::sched::{setns, CloneFlags};
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    task::JoinHandle,
};

use super::Result;

/// A forwarder: where it listens (inside `netns`) and its accept loop.
#[derive(Debug)]
pub struct Forwarder {
    pub netns: PathBuf,
    pub listen: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Stops accepting; the listening socket closes with the task. Connections already
        // forwarded end with the runtime or when either side closes.
        self.task.abort();
    }
}

/// Starts forwarding `127.0.0.1:<upstream port>` inside the network namespace at `netns` (a
/// file such as `/run/netns/<name>`) to `upstream` in the root namespace.
pub fn start(runtime: &Handle, netns: &Path, upstream: SocketAddr) -> Result<Forwarder> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream.port()));
    start_at(runtime, netns, listen, upstream)
}

/// Starts forwarding `listen` (an address of the namespace's own) inside the network namespace
/// at `netns` to `upstream` in the root namespace.
pub fn start_at(
    runtime: &Handle,
    netns: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Result<Forwarder> {
    let listener = listen_in(netns, listen)?;
    let listener = {
        let _entered = runtime.enter();
        TcpListener::from_std(listener).map_err(crate::io_err(format!(
            "registering the listener in {} with the runtime",
            netns.display()
        )))?
    };
    let task = runtime.spawn(accept_loop(listener, upstream));
    Ok(Forwarder {
        netns: netns.to_path_buf(),
        listen,
        task,
    })
}

/// Creates, binds and returns a non-blocking listener inside the network namespace at `netns`.
fn listen_in(netns: &Path, addr: SocketAddr) -> Result<StdListener> {
    let what = format!(
        "listening on {addr} inside network namespace {}",
        netns.display()
    );
    socket_in(netns, what, move || {
        let listener = StdListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
}

/// Runs `make` (which creates a socket) inside the network namespace at `netns`, from a thread
/// of its own (which ends right after: only its socket stays in the namespace); `what` names
/// it in errors.
pub(super) fn socket_in<T, F>(netns: &Path, what: String, make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let path = netns.to_path_buf();
    let bind = move || -> io::Result<T> {
        let ns = File::open(&path)?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        make()
    };
    thread::Builder::new()
        .name("kcp-netns-bind".into())
        .spawn(bind)
        .map_err(crate::io_err(format!("starting a thread for {what}")))?
        .join()
        .map_err(|_| crate::Error::Output {
            what: what.clone(),
            detail: "the thread panicked".into(),
        })?
        .map_err(|e| crate::io_err(what)(e).into())
}

/// Accepts connections for ever, each carried to `upstream` by a task of its own. When the
/// API server is down the accepted connection is closed at once, as behind a real load
/// balancer; a failing accept (out of descriptors) is retried after a pause.
async fn accept_loop(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut downstream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut upstream) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = downstream.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        });
    }
}
