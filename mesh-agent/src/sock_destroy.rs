//! `SOCK_DESTROY` (netlink `sock_diag`): closes a TCP socket of another process by its
//! addresses, as `ss -K` does. The kernel aborts it (`tcp_abort`): the application sees
//! `ECONNABORTED`, and the peer a reset. The agent uses it to end a kernel-direct connection a
//! policy no longer allows; it must run in the socket's network namespace.

use std::{io, mem::size_of, net::SocketAddr};

/// `NETLINK_SOCK_DIAG`.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
/// `SOCK_DESTROY` (`linux/sock_diag.h`).
const SOCK_DESTROY: u16 = 21;
/// `NLM_F_REQUEST | NLM_F_ACK`.
const FLAGS: u16 = 0x1 | 0x4;
/// `NLMSG_ERROR`: the acknowledgement, with the call's result.
const NLMSG_ERROR: u16 = 2;
/// `INET_DIAG_NOCOOKIE`: match by addresses only.
const NO_COOKIE: u32 = !0;

/// `struct nlmsghdr`.
#[repr(C)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_req_v2` with its `struct inet_diag_sockid`.
#[repr(C)]
struct DestroyRequest {
    header: NlMsgHdr,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    /// Network byte order.
    sport: u16,
    /// Network byte order.
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct nlmsgerr`'s start, after its header.
#[repr(C)]
struct NlMsgErr {
    header: NlMsgHdr,
    error: i32,
}

/// Aborts the TCP socket whose own addresses are `local` and `remote`, in the calling thread's
/// network namespace. `Ok(false)`: there is no such socket (it closed already).
pub fn destroy_tcp(local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    let (family, src, dst) = match (local, remote) {
        (SocketAddr::V4(l), SocketAddr::V4(r)) => {
            (libc::AF_INET, pad(l.ip().octets()), pad(r.ip().octets()))
        }
        (SocketAddr::V6(l), SocketAddr::V6(r)) => {
            (libc::AF_INET6, l.ip().octets(), r.ip().octets())
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "address families differ",
            ))
        }
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small positive constants
    let request = DestroyRequest {
        header: NlMsgHdr {
            len: size_of::<DestroyRequest>() as u32,
            kind: SOCK_DESTROY,
            flags: FLAGS,
            seq: 1,
            pid: 0,
        },
        family: family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 0,
        pad: 0,
        states: !0,
        sport: local.port().to_be(),
        dport: remote.port().to_be(),
        src,
        dst,
        interface: 0,
        cookie: [NO_COOKIE, NO_COOKIE],
    };
    let socket = Netlink::open()?;
    socket.send(&request)?;
    let answer = socket.receive()?;
    match -answer {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn pad(v4: [u8; 4]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&v4);
    out
}

/// A `NETLINK_SOCK_DIAG` socket, closed when dropped.
struct Netlink(std::os::fd::OwnedFd);

impl Netlink {
    #[allow(unsafe_code)]
    fn open() -> io::Result<Self> {
        // SAFETY: plain system call; the descriptor is owned below only if valid.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new, valid descriptor that nothing else owns.
        Ok(Self(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    #[allow(unsafe_code)]
    fn send(&self, request: &DestroyRequest) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: an all-zero `sockaddr_nl` is valid; the family is set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        #[allow(clippy::cast_possible_truncation)] // AF_NETLINK fits
        {
            kernel.nl_family = libc::AF_NETLINK as u16;
        }
        // SAFETY: `request` and `kernel` are valid for the lengths given for the call.
        #[allow(clippy::cast_possible_truncation)] // a 12-byte structure
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                std::ptr::from_ref(request).cast(),
                size_of::<DestroyRequest>(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The acknowledgement's error field (0: done, else `-errno`).
    #[allow(unsafe_code)]
    fn receive(&self) -> io::Result<i32> {
        use std::os::fd::AsRawFd as _;
        let mut buf = [0u8; 512];
        // SAFETY: `buf` is valid for writes of its length for the call.
        let got = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        if got < size_of::<NlMsgErr>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short netlink answer",
            ));
        }
        // SAFETY: `buf` holds at least `size_of::<NlMsgErr>()` initialised bytes; the read is
        // unaligned-safe.
        let answer: NlMsgErr = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
        if answer.header.kind != NLMSG_ERROR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "netlink answer of type {}, not an acknowledgement",
                    answer.header.kind
                ),
            ));
        }
        Ok(answer.error)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream},
    };

    use super::destroy_tcp;

    /// Needs `CAP_NET_ADMIN` (the tests run as root, as the agent does).
    #[test]
    fn a_destroyed_socket_reads_an_abort_and_its_peer_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        let (local, remote) = (
            client.local_addr().expect("local"),
            client.peer_addr().expect("peer"),
        );
        assert!(destroy_tcp(local, remote).expect("destroy"));
        let mut buf = [0u8; 4];
        let err = client.read(&mut buf).expect_err("aborted");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        let peer = server.read(&mut buf);
        assert!(
            matches!(&peer, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{peer:?}"
        );
        assert!(
            !destroy_tcp(local, remote).expect("gone"),
            "no such socket any more"
        );
    }
}
