//! The agent's end: a root-only socket, connections from the container runtime, requests with
//! their descriptors, one reply each.
//!
//! Blocking by design: the agent runs [`Server::accept`] on a thread of its own (or wraps
//! [`Server`]'s descriptor, see `AsFd`, in its event loop) and each connection is short, one
//! CNI call.

use std::{
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::{
            fs::{FileTypeExt, MetadataExt, PermissionsExt},
            net::UnixListener,
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::socket::{
        bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag,
        SockType, UnixAddr,
    },
    unistd::{chown, Gid, Uid},
};

use super::{
    messages::WireRequest,
    wire::{self, WireError},
    Reply, Request, RequestKind,
};

/// How long an accepted connection may sit between messages before `recv` gives up: a plugin
/// sends its request at once, so a silent peer is stuck or hostile and must not hold a thread.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong on the agent's side of the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Preparing the socket's path failed (directory, stale socket, mode, owner).
    #[error("cannot prepare the hand-over socket {path}: {op}: {source}")]
    Prepare {
        /// The socket path.
        path: PathBuf,
        /// The step.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Another agent answers at the path: two agents must not share a node's pods.
    #[error("another process already serves the hand-over socket {path}")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket sits at the path; it is left alone.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// `accept` failed.
    #[error("accepting on {path}: {source}")]
    Accept {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The peer's credentials could not be read.
    #[error("reading the peer's credentials (SO_PEERCRED): {0}")]
    PeerCredentials(#[source] io::Error),
    /// A peer other than root connected; the connection was closed.
    #[error("refused a connection from pid {pid} with uid {uid}: only root may hand pods over")]
    PeerNotRoot {
        /// The peer's uid.
        uid: u32,
        /// The peer's pid.
        pid: i32,
    },
    /// A message could not be read or written; a bad request was answered with `error`.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// `reply` without a request waiting for one.
    #[error("no request is waiting for a reply")]
    NoPendingRequest,
    /// `recv` while the previous request still waits for its reply.
    #[error("the previous {0} request has not been answered")]
    ReplyPending(RequestKind),
    /// The reply does not answer the pending request (nothing was sent).
    #[error("{reply} does not answer a {request} request")]
    WrongReply {
        /// The pending request.
        request: RequestKind,
        /// The reply offered.
        reply: &'static str,
    },
}

/// The agent's listening socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl Server {
    /// Creates the socket at `path`: parent directories as needed, a stale socket (nobody
    /// answers) removed, mode 0600, owner root. A live socket or a non-socket file at the path
    /// is an error rather than replaced.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let prepare = |op, source| ServerError::Prepare {
            path: path.to_owned(),
            op,
            source,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| prepare("create parent directory", e))?;
        }
        remove_stale(path)?;
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| prepare("socket", e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| prepare("socket address", e.into()))?;
        bind(sock.as_raw_fd(), &addr).map_err(|e| prepare("bind", e.into()))?;
        // Between bind and chmod the umask's mode applies; SO_PEERCRED still refuses non-root.
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| prepare("chmod 0600", e))?;
        chown(path, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
            .map_err(|e| prepare("chown root", e.into()))?;
        let inode = fs::symlink_metadata(path)
            .map_err(|e| prepare("stat", e))?
            .ino();
        listen(&sock, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| prepare("listen", e.into()))?;
        tracing::info!(path = %path.display(), "hand-over socket listening");
        Ok(Server {
            listener: UnixListener::from(sock),
            path: path.to_owned(),
            inode,
        })
    }

    /// Waits for the next connection and checks its peer: only uid 0 is accepted. A refused
    /// peer is closed and reported as [`ServerError::PeerNotRoot`] (log it and accept again).
    pub fn accept(&self) -> Result<Connection, ServerError> {
        let (stream, _) = self
            .listener
            .accept()
            .map_err(|source| ServerError::Accept {
                path: self.path.clone(),
                source,
            })?;
        let sock = OwnedFd::from(stream);
        let cred = getsockopt(&sock, sockopt::PeerCredentials)
            .map_err(|e| ServerError::PeerCredentials(e.into()))?;
        let peer = PeerCred {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        };
        if peer.uid != 0 {
            tracing::warn!(
                pid = peer.pid,
                uid = peer.uid,
                "refused a non-root peer on the hand-over socket"
            );
            return Err(ServerError::PeerNotRoot {
                uid: peer.uid,
                pid: peer.pid,
            });
        }
        wire::set_timeouts(sock.as_fd(), Some(IDLE_TIMEOUT))?;
        tracing::debug!(pid = peer.pid, "hand-over connection accepted");
        Ok(Connection {
            sock,
            peer,
            pending: None,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for Server {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for Server {
    /// Removes the socket file, unless another server has replaced it since (same path, other
    /// inode), so a clean exit does not leave a socket that makes runtimes wait for a timeout.
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes a socket nobody answers at; refuses a live one and leaves non-sockets alone.
fn remove_stale(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Prepare {
                path: path.to_owned(),
                op: "stat",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    let probe = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| ServerError::Prepare {
        path: path.to_owned(),
        op: "socket",
        source: e.into(),
    })?;
    let addr = UnixAddr::new(path).map_err(|e| ServerError::Prepare {
        path: path.to_owned(),
        op: "socket address",
        source: e.into(),
    })?;
    match connect(probe.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN) => Err(ServerError::InUse {
            path: path.to_owned(),
        }),
        Err(_) => {
            tracing::info!(path = %path.display(), "removing a stale hand-over socket");
            fs::remove_file(path)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|source| ServerError::Prepare {
                    path: path.to_owned(),
                    op: "remove stale socket",
                    source,
                })
        }
    }
}

/// Who connected, from `SO_PEERCRED` (the kernel's record, not the peer's claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// The peer's pid (the container runtime's plugin process), for logs.
    pub pid: i32,
    /// Always 0 on an accepted connection.
    pub uid: u32,
    /// The peer's gid.
    pub gid: u32,
}

/// One accepted connection: read a request, answer it, repeat until `recv` returns `None`.
#[derive(Debug)]
pub struct Connection {
    sock: OwnedFd,
    peer: PeerCred,
    pending: Option<RequestKind>,
}

impl Connection {
    /// The peer's credentials.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// Replaces the idle timeout ([`IDLE_TIMEOUT`]) of reads and writes; `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ServerError> {
        Ok(wire::set_timeouts(self.sock.as_fd(), timeout)?)
    }

    /// The next request, or `None` when the peer closed the connection. A request that is
    /// malformed, of another version, or carries the wrong number of descriptors (`add`: one
    /// network namespace; the others: none) is answered with an `error` reply, its
    /// descriptors are closed, and the error is returned.
    pub fn recv(&mut self) -> Result<Option<Request>, ServerError> {
        if let Some(kind) = self.pending {
            return Err(ServerError::ReplyPending(kind));
        }
        let result = wire::recv(self.sock.as_fd()).and_then(|received| match received {
            None => Ok(None),
            Some(received) => request_from(received).map(Some),
        });
        match result {
            Ok(request) => {
                self.pending = request.as_ref().map(Request::kind);
                Ok(request)
            }
            Err(error @ (WireError::TimedOut | WireError::Io { .. })) => Err(error.into()),
            Err(error) => {
                tracing::warn!(pid = self.peer.pid, %error, "bad hand-over request");
                let reply = Reply::Error {
                    message: error.to_string(),
                };
                if let Err(send_error) = wire::send(self.sock.as_fd(), &reply, None) {
                    tracing::debug!(%send_error, "could not answer a bad request");
                }
                Err(error.into())
            }
        }
    }

    /// Answers the pending request; the reply must be one that answers it (see the table in
    /// the module documentation) or `error`.
    pub fn reply(&mut self, reply: &Reply) -> Result<(), ServerError> {
        let request = self.pending.ok_or(ServerError::NoPendingRequest)?;
        if !reply.answers(request) {
            return Err(ServerError::WrongReply {
                request,
                reply: reply.name(),
            });
        }
        self.pending = None;
        Ok(wire::send(self.sock.as_fd(), reply, None)?)
    }
}

fn request_from(received: wire::Received) -> Result<Request, WireError> {
    let request: WireRequest = received.decode()?;
    let expected = usize::from(request.kind() == RequestKind::Add);
    let mut fds = received.fds;
    if fds.len() != expected {
        let message = request.kind().name();
        return Err(WireError::FdCount {
            message,
            expected,
            received: fds.len(),
        });
    }
    Ok(match request {
        WireRequest::Add { pod } => {
            let netns = fds.remove(0);
            wire::netns_inode(netns.as_fd())?;
            Request::Add { pod, netns }
        }
        WireRequest::Del { pod } => Request::Del { pod },
        WireRequest::Check { pod } => Request::Check { pod },
        WireRequest::Status => Request::Status,
    })
}
