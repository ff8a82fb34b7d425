//! The plugin's end: connect to the agent, send a request, wait (bounded) for its reply.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr},
};

use super::{
    messages::WireRequest,
    wire::{self, WireError},
    AgentStatus, PodRef, Reply, RequestKind, Verdict,
};

/// Why a request to the agent failed. Every variant names the socket, so the runtime's event
/// says where the plugin looked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections at the socket (agent not running, wrong path, permissions).
    #[error("cannot reach the mesh agent at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error of `connect` (or of building the address).
        source: io::Error,
    },
    /// The agent did not accept or answer in time.
    #[error("the mesh agent at {path} did not answer within {timeout:?}")]
    TimedOut {
        /// The socket.
        path: PathBuf,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The agent closed the connection without answering.
    #[error("the mesh agent at {path} closed the connection without answering")]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The exchange itself failed (framing, encoding, socket error).
    #[error("talking to the mesh agent at {path}: {source}")]
    Wire {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: WireError,
    },
    /// The agent answered with a reply that does not belong to the request.
    #[error("the mesh agent at {path} answered {reply} to a {request} request")]
    UnexpectedReply {
        /// The socket.
        path: PathBuf,
        /// The request sent.
        request: RequestKind,
        /// The reply's wire name.
        reply: &'static str,
    },
    /// The agent could not serve the request and said why.
    #[error("the mesh agent at {path} rejected the {request} request: {message}")]
    Agent {
        /// The socket.
        path: PathBuf,
        /// The request sent.
        request: RequestKind,
        /// The agent's message.
        message: String,
    },
}

impl ClientError {
    /// Whether the agent was simply not there or not in time (as opposed to answering
    /// something wrong): the CNI plugin reports these as "try again later".
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::TimedOut { .. } | ClientError::Closed { .. }
        ) || matches!(
            self,
            ClientError::Wire {
                source: WireError::Io { .. },
                ..
            }
        )
    }
}

/// A connection to the agent. Requests are answered one at a time, in order; each request
/// (send and reply) must complete within the timeout given to [`Client::connect`].
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    /// Connects to the agent's socket, waiting at most `timeout` (a full backlog blocks
    /// `connect` on Unix sockets; `SO_SNDTIMEO` bounds it).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let connect_error = |source: io::Error| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| connect_error(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| connect_error(e.into()))?;
        let client = Client {
            sock,
            path: path.to_owned(),
            timeout,
        };
        wire::set_timeouts(client.sock.as_fd(), Some(timeout)).map_err(|e| client.wire(e))?;
        loop {
            match connect(client.sock.as_raw_fd(), &addr) {
                Ok(()) => return Ok(client),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN | Errno::EINPROGRESS) => return Err(client.timed_out()),
                Err(errno) => return Err(connect_error(errno.into())),
            }
        }
    }

    /// Hands a new pod and its network namespace to the agent and returns its verdict. The
    /// descriptor is duplicated into the agent by the kernel; the caller keeps its own.
    pub fn add(&self, pod: &PodRef, netns: BorrowedFd<'_>) -> Result<Verdict, ClientError> {
        let request = WireRequest::Add { pod: pod.clone() };
        self.exchange(&request, Some(netns))
            .and_then(|reply| self.verdict(RequestKind::Add, reply))
    }

    /// Tells the agent the pod's sandbox is going away.
    pub fn del(&self, pod: &PodRef) -> Result<(), ClientError> {
        match self.exchange(&WireRequest::Del { pod: pod.clone() }, None)? {
            Reply::Deleted => Ok(()),
            other => Err(self.unexpected(RequestKind::Del, &other)),
        }
    }

    /// Asks whether the pod is (still) as the agent wants it: captured, or not meshed.
    pub fn check(&self, pod: &PodRef) -> Result<Verdict, ClientError> {
        let reply = self.exchange(&WireRequest::Check { pod: pod.clone() }, None)?;
        self.verdict(RequestKind::Check, reply)
    }

    /// Asks whether the agent can take pods.
    pub fn status(&self) -> Result<AgentStatus, ClientError> {
        match self.exchange(&WireRequest::Status, None)? {
            Reply::Ready => Ok(AgentStatus::Ready),
            Reply::NotReady { reason } => Ok(AgentStatus::NotReady { reason }),
            other => Err(self.unexpected(RequestKind::Status, &other)),
        }
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn exchange(
        &self,
        request: &WireRequest,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        wire::set_timeouts(self.sock.as_fd(), Some(self.timeout)).map_err(|e| self.wire(e))?;
        wire::send(self.sock.as_fd(), request, fd).map_err(|e| self.wire(e))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(self.timed_out());
        }
        wire::set_timeouts(self.sock.as_fd(), Some(remaining)).map_err(|e| self.wire(e))?;
        let received = wire::recv(self.sock.as_fd())
            .map_err(|e| self.wire(e))?
            .ok_or_else(|| ClientError::Closed {
                path: self.path.clone(),
            })?;
        if !received.fds.is_empty() {
            // Replies carry no descriptors; dropping `received` closes them.
            let error = WireError::FdCount {
                message: "reply",
                expected: 0,
                received: received.fds.len(),
            };
            return Err(self.wire(error));
        }
        let reply: Reply = received.decode().map_err(|e| self.wire(e))?;
        match reply {
            Reply::Error { message } => Err(ClientError::Agent {
                path: self.path.clone(),
                request: request.kind(),
                message,
            }),
            reply if reply.answers(request.kind()) => Ok(reply),
            other => Err(self.unexpected(request.kind(), &other)),
        }
    }

    fn verdict(&self, request: RequestKind, reply: Reply) -> Result<Verdict, ClientError> {
        match reply {
            Reply::Captured => Ok(Verdict::Captured),
            Reply::NotMeshed => Ok(Verdict::NotMeshed),
            Reply::Refused { reason } => Ok(Verdict::Refused { reason }),
            other => Err(self.unexpected(request, &other)),
        }
    }

    fn wire(&self, source: WireError) -> ClientError {
        match source {
            WireError::TimedOut => self.timed_out(),
            source => ClientError::Wire {
                path: self.path.clone(),
                source,
            },
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::TimedOut {
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }

    fn unexpected(&self, request: RequestKind, reply: &Reply) -> ClientError {
        ClientError::UnexpectedReply {
            path: self.path.clone(),
            request,
            reply: reply.name(),
        }
    }
}
