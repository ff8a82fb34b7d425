//! Framing and descriptor passing on the `SOCK_SEQPACKET` socket: one packet per message,
//! `[version byte][JSON body]`, descriptors as `SCM_RIGHTS`.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use nix::{
    errno::Errno,
    libc,
    sys::{
        socket::{recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, MsgFlags},
        stat::fstat,
        statfs::{fstatfs, NSFS_MAGIC},
        time::{TimeVal, TimeValLike},
    },
};
use serde::Serialize;

use super::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// Control-message space for this many descriptors. A message promises at most one; room for a
/// few more lets the receiver see (and close) a peer's extras instead of losing them to
/// `MSG_CTRUNC`; beyond that the kernel drops the rest and sets `MSG_CTRUNC`, an error.
const FD_ROOM: usize = 8;

/// What can go wrong with one message on the socket.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The message to send is over the protocol's bound.
    #[error("message of {size} bytes exceeds the protocol limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge {
        /// The encoded size, header included.
        size: usize,
    },
    /// The received packet did not fit the protocol's bound (`MSG_TRUNC`).
    #[error("received a message over the protocol limit of {MAX_MESSAGE_BYTES} bytes")]
    Truncated,
    /// The kernel could not deliver all descriptors (`MSG_CTRUNC`); the ones it did were closed.
    #[error(
        "control message truncated (MSG_CTRUNC): descriptors lost, {received} received and closed"
    )]
    ControlTruncated {
        /// How many descriptors did arrive (and were closed).
        received: usize,
    },
    /// The peer speaks another protocol version.
    #[error(
        "protocol version {got} is not supported (this side speaks version {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        /// The version byte received.
        got: u8,
    },
    /// The body could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    /// The body is not a valid message.
    #[error("cannot decode message: {0}")]
    Decode(#[source] serde_json::Error),
    /// A message came with another number of descriptors than it promises; all were closed.
    #[error("a {message} message carries {expected} file descriptor(s), received {received}")]
    FdCount {
        /// Which message.
        message: &'static str,
        /// How many it promises.
        expected: usize,
        /// How many arrived.
        received: usize,
    },
    /// The descriptor passed as a network namespace is something else.
    #[error("the descriptor is not a network namespace (it is {found:?})")]
    NotNetns {
        /// What `/proc/self/fd/N` names instead.
        found: String,
    },
    /// The kernel sent fewer bytes than the packet holds (never for `SOCK_SEQPACKET`).
    #[error("sent {sent} of {size} bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Packet size.
        size: usize,
    },
    /// The socket's send or receive timeout expired.
    #[error("timed out")]
    TimedOut,
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// Which call.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn os(op: &'static str, errno: Errno) -> WireError {
    WireError::Io {
        op,
        source: io::Error::from(errno),
    }
}

/// One received message: its JSON body (header stripped) and the descriptors it carried, owned
/// (closed when dropped).
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) body: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

impl Received {
    pub(crate) fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, WireError> {
        serde_json::from_slice(&self.body).map_err(WireError::Decode)
    }
}

/// Sends `body` as one packet, with `fd` attached when given.
pub(crate) fn send(
    sock: BorrowedFd<'_>,
    body: &impl Serialize,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), WireError> {
    let mut packet = vec![PROTOCOL_VERSION];
    serde_json::to_writer(&mut packet, body).map_err(WireError::Encode)?;
    if packet.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge { size: packet.len() });
    }
    let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        let iov = [IoSlice::new(&packet)];
        // MSG_NOSIGNAL: a peer that went away is an error here, not a SIGPIPE for the agent.
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(sent) if sent == packet.len() => return Ok(()),
            Ok(sent) => {
                return Err(WireError::ShortSend {
                    sent,
                    size: packet.len(),
                })
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Err(WireError::TimedOut),
            Err(errno) => return Err(os("sendmsg", errno)),
        }
    }
}

/// Receives one packet; `None` when the peer closed the connection. Descriptors come with
/// `MSG_CMSG_CLOEXEC`, so none leaks into a program the receiver runs.
pub(crate) fn recv(sock: BorrowedFd<'_>) -> Result<Option<Received>, WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    let mut control = nix::cmsg_space!([RawFd; FD_ROOM]);
    // Zeroed, so the parse below stops at the first header the kernel did not write.
    control.resize(control.capacity(), 0);
    let (bytes, flags) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break (msg.bytes, msg.flags),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Err(WireError::TimedOut),
            Err(errno) => return Err(os("recvmsg", errno)),
        }
    };
    // Take ownership of every descriptor first, so each error below closes them.
    let fds = take_fds(&control);
    if flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(WireError::ControlTruncated {
            received: fds.len(),
        });
    }
    if flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(WireError::Truncated);
    }
    if bytes == 0 {
        // End of stream (a zero-length packet is never sent: every message has a header).
        return Ok(None);
    }
    if buf[0] != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { got: buf[0] });
    }
    buf.truncate(bytes);
    buf.remove(0);
    Ok(Some(Received { body: buf, fds }))
}

/// The descriptors of every `SCM_RIGHTS` message in a control buffer filled by `recvmsg`.
///
/// Parsed here rather than with nix's iterator because that one refuses to look at a buffer
/// flagged `MSG_CTRUNC`, and the descriptors the kernel did install must still be closed.
/// Layout (Linux): `struct cmsghdr { size_t len; int level; int type; }`, data at the aligned
/// header size, next header at the aligned `len`.
fn take_fds(control: &[u8]) -> Vec<OwnedFd> {
    const WORD: usize = size_of::<usize>();
    let align = |n: usize| (n + WORD - 1) & !(WORD - 1);
    let header = size_of::<libc::cmsghdr>();
    let int = size_of::<libc::c_int>();
    let read_int =
        |at: usize| libc::c_int::from_ne_bytes(control[at..at + int].try_into().unwrap());
    let mut fds = Vec::new();
    let mut offset = 0;
    while offset + header <= control.len() {
        let len = usize::from_ne_bytes(control[offset..offset + WORD].try_into().unwrap());
        if len < header || offset + len > control.len() {
            break;
        }
        let (level, kind) = (read_int(offset + WORD), read_int(offset + WORD + int));
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for at in (offset + align(header)..offset + len).step_by(int) {
                if at + int > offset + len {
                    break;
                }
                // SAFETY: the kernel installed this descriptor in our table during the
                // `recvmsg` that filled this (fresh, zeroed) buffer; nothing else holds it, so
                // this `OwnedFd` is its only owner and closes it exactly once.
                fds.push(unsafe { OwnedFd::from_raw_fd(read_int(at)) });
            }
        }
        offset += align(len);
    }
    fds
}

/// Sets the socket's send and receive timeouts (`None`: block until the peer acts).
pub(crate) fn set_timeouts(
    sock: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> Result<(), WireError> {
    // A zero timeval means "no timeout" to the kernel, so a tiny remainder becomes 1 µs.
    let micros = timeout.map_or(0, |t| {
        i64::try_from(t.as_micros()).unwrap_or(i64::MAX).max(1)
    });
    let tv = TimeVal::microseconds(micros);
    setsockopt(&sock, sockopt::SendTimeout, &tv).map_err(|e| os("setsockopt SO_SNDTIMEO", e))?;
    setsockopt(&sock, sockopt::ReceiveTimeout, &tv).map_err(|e| os("setsockopt SO_RCVTIMEO", e))
}

// NS_GET_NSTYPE (linux/nsfs.h): `_IO(0xb7, 0x3)`, returns the namespace's CLONE_NEW* type.
nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);

/// The inode of the network namespace `fd` refers to, or [`WireError::NotNetns`] when it
/// refers to anything else. Why: both ends check a descriptor before trusting it as a pod's
/// namespace, and the inode is the namespace's identity (what `ip netns identify` compares).
/// Checked with `fstatfs` (the namespace filesystem) then `NS_GET_NSTYPE` (a network one), not
/// with `/proc/self/fd`, which shows the mount path for a namespace bound at
/// `/var/run/netns/…`.
pub fn netns_inode(fd: BorrowedFd<'_>) -> Result<u64, WireError> {
    let not_netns = |what: Option<String>| {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let found = what
            .unwrap_or_else(|| link.map_or_else(|e| e.to_string(), |l| l.display().to_string()));
        WireError::NotNetns { found }
    };
    let fs = fstatfs(fd).map_err(|e| os("fstatfs", e))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(not_netns(None));
    }
    // SAFETY: `fd` is a valid open descriptor for the duration of the call (borrowed), it is on
    // nsfs (checked above) so the request number means NS_GET_NSTYPE, and that request takes
    // no argument and writes no memory of ours: it only returns an integer.
    let kind =
        unsafe { ns_get_nstype(fd.as_raw_fd()) }.map_err(|e| os("ioctl NS_GET_NSTYPE", e))?;
    if kind != libc::CLONE_NEWNET {
        return Err(not_netns(Some(format!("a namespace of type {kind:#x}"))));
    }
    Ok(fstat(fd.as_raw_fd()).map_err(|e| os("fstat", e))?.st_ino)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn a_message_round_trips_with_its_header() {
        let (a, b) = pair();
        send(a.as_fd(), &serde_json::json!({"type": "status"}), None).unwrap();
        let got = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(got.body, br#"{"type":"status"}"#);
        assert!(got.fds.is_empty());
        drop(a);
        assert!(
            recv(b.as_fd()).unwrap().is_none(),
            "EOF after the peer closed"
        );
    }

    #[test]
    fn oversized_messages_are_refused_on_both_sides() {
        let (a, b) = pair();
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(matches!(
            send(a.as_fd(), &big, None),
            Err(WireError::TooLarge { .. })
        ));
        let mut raw = vec![PROTOCOL_VERSION];
        raw.resize(MAX_MESSAGE_BYTES + 10, b' ');
        nix::sys::socket::send(a.as_raw_fd(), &raw, MsgFlags::empty()).unwrap();
        assert!(matches!(recv(b.as_fd()), Err(WireError::Truncated)));
    }

    #[test]
    fn another_version_is_named() {
        let (a, b) = pair();
        nix::sys::socket::send(a.as_raw_fd(), b"\x07{}", MsgFlags::empty()).unwrap();
        assert!(matches!(
            recv(b.as_fd()),
            Err(WireError::UnsupportedVersion { got: 7 })
        ));
    }

    #[test]
    fn descriptors_arrive_close_on_exec_and_too_many_are_an_error() {
        let (a, b) = pair();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        send(a.as_fd(), &1, Some(file.as_fd())).unwrap();
        let got = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(got.fds.len(), 1);
        let flags =
            nix::fcntl::fcntl(got.fds[0].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        assert_eq!(
            netns_inode(got.fds[0].as_fd()).unwrap(),
            netns_inode(file.as_fd()).unwrap()
        );

        let many: Vec<RawFd> = vec![file.as_raw_fd(); FD_ROOM + 3];
        let iov = [IoSlice::new(b"\x011")];
        let rights = [ControlMessage::ScmRights(&many)];
        sendmsg::<()>(a.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None).unwrap();
        match recv(b.as_fd()) {
            Err(WireError::ControlTruncated { received }) => assert!(received <= FD_ROOM),
            other => panic!("expected MSG_CTRUNC, got {other:?}"),
        }
    }

    #[test]
    fn only_a_network_namespace_is_one() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            netns_inode(file.as_fd()),
            Err(WireError::NotNetns { .. })
        ));
        let mnt = std::fs::File::open("/proc/self/ns/mnt").unwrap();
        match netns_inode(mnt.as_fd()) {
            Err(WireError::NotNetns { found }) => assert!(found.contains("0x20000"), "{found}"),
            other => panic!("{other:?}"),
        }
        let net = std::fs::File::open("/proc/self/ns/net").unwrap();
        let link = std::fs::read_link("/proc/self/ns/net").unwrap();
        let inode = netns_inode(net.as_fd()).unwrap();
        assert_eq!(format!("net:[{inode}]"), link.to_str().unwrap());
    }
}
