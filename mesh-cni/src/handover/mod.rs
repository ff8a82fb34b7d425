//! The hand-over protocol between the CNI plugin (the container runtime's side) and the node
//! agent, modelled on ztunnel's ZDS.
//!
//! Why a protocol at all: the agent owns the decision whether a pod is meshed (it has the
//! cluster model), but only the container runtime knows the moment a pod's network namespace
//! exists. The plugin therefore hands every new pod to the agent and waits for its verdict, so
//! that no meshed pod starts before it is captured.
//!
//! Transport: a `SOCK_SEQPACKET` Unix socket (default [`DEFAULT_SOCKET`]); each message is one
//! packet, so message boundaries come from the kernel. Framing: one header byte, the protocol
//! version ([`PROTOCOL_VERSION`]), then a JSON body; a whole packet is at most
//! [`MAX_MESSAGE_BYTES`]. The client sends requests, the server answers each with exactly one
//! [`Reply`], in order:
//!
//! | request | file descriptors | replies |
//! |---|---|---|
//! | `{"type":"add","pod":{..}}` | exactly one: the pod's network namespace | `captured`, `not_meshed`, `refused{reason}` |
//! | `{"type":"del","pod":{..}}` | none | `deleted` |
//! | `{"type":"check","pod":{..}}` | none | `captured`, `not_meshed`, `refused{reason}` |
//! | `{"type":"status"}` | none | `ready`, `not_ready{reason}` |
//!
//! Any request may be answered with `error{message}` (malformed request, wrong number of
//! descriptors, unsupported version). Descriptors are received with `MSG_CMSG_CLOEXEC`; a
//! truncated control message (`MSG_CTRUNC`) is an error, and every descriptor received beyond
//! those a message promises is closed. The server accepts only peers with uid 0
//! (`SO_PEERCRED`): only the container runtime may hand pods over.

mod client;
mod messages;
mod server;
mod wire;

pub use client::{Client, ClientError};
pub use messages::{AgentStatus, PodRef, Reply, Request, RequestKind, Verdict};
pub use server::{Connection, PeerCred, Server, ServerError};
pub use wire::{netns_inode, WireError};

/// The agent's socket unless the CNI configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/mesh/cni.sock";

/// The version byte that starts every message. A peer speaking another version is answered
/// with an `error` reply naming both versions (and the plugin fails the call), so a skewed
/// upgrade is visible instead of silently misread.
pub const PROTOCOL_VERSION: u8 = 1;

/// The largest packet, header included. Pod identities are a few hundred bytes; the bound
/// keeps a confused or hostile peer from making either side allocate without limit.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
