//! Both ends of the hand-over protocol: socket preparation, peer checks, descriptor rules,
//! reply ordering.

mod common;

use std::{
    fs::File,
    io::IoSlice,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    },
    path::Path,
    sync::mpsc,
    time::Duration,
};

use common::{
    conf, fd_identity, look_inside, path_identity, run_plugin_as, Netns, TempDir, TestAgent,
};
use mesh_cni::handover::{
    AgentStatus, Client, ClientError, PodRef, Reply, Request, RequestKind, Server, ServerError,
    Verdict, WireError,
};
use nix::sys::socket::{
    bind, connect, listen, sendmsg, socket, AddressFamily, Backlog, ControlMessage, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

fn pod() -> PodRef {
    PodRef {
        namespace: "mesh".into(),
        name: "server-0".into(),
        uid: None,
        container_id: "c0ffee".into(),
        ifname: "eth0".into(),
        ips: vec!["10.88.0.9".parse().unwrap()],
        netns_path: None,
    }
}

#[test]
fn the_socket_is_root_only_and_replaces_only_stale_sockets() {
    let dir = TempDir::new();
    let path = dir.join("run/mesh/cni.sock");
    let server = Server::bind(&path).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.uid(), meta.gid()),
        (0o600, 0, 0)
    );
    assert!(
        matches!(Server::bind(&path), Err(ServerError::InUse { .. })),
        "a live agent is not replaced"
    );
    drop(server);
    assert!(!path.exists(), "a clean exit removes the socket");
    // A dead agent's socket (nobody listens) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = Server::bind(&path).unwrap();
    assert!(Client::connect(&path, Duration::from_secs(1)).is_ok());
    drop(server);
    std::fs::write(&path, "not a socket").unwrap();
    assert!(matches!(
        Server::bind(&path),
        Err(ServerError::NotASocket { .. })
    ));
}

#[test]
fn a_client_and_a_server_exchange_every_request_in_order() {
    let dir = TempDir::new();
    let netns = Netns::new();
    let (tx, rx) = mpsc::channel();
    let agent = TestAgent::start(dir.join("agent.sock"), move |request| {
        let reply = match &request {
            Request::Add { netns, .. } => {
                tx.send((fd_identity(netns), look_inside(netns))).unwrap();
                Reply::Captured
            }
            Request::Del { .. } => Reply::Deleted,
            Request::Check { .. } => Reply::NotMeshed,
            Request::Status => Reply::NotReady {
                reason: "starting".into(),
            },
        };
        assert!(reply.answers(request.kind()));
        reply
    });
    let client = Client::connect(&agent.socket, Duration::from_secs(5)).unwrap();
    let file = File::open(&netns.path).unwrap();
    assert_eq!(client.add(&pod(), file.as_fd()).unwrap(), Verdict::Captured);
    let (identity, (inode, lo, iface)) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(identity, path_identity(&netns.path));
    assert_eq!((inode, lo), (identity.1, Some(1)));
    assert!(iface.is_some());
    assert_eq!(client.check(&pod()).unwrap(), Verdict::NotMeshed);
    assert_eq!(
        client.status().unwrap(),
        AgentStatus::NotReady {
            reason: "starting".into()
        }
    );
    client.del(&pod()).unwrap();
    client.del(&pod()).unwrap();
}

/// Sends a raw request (version byte + JSON) with `fds` attached, then reads the reply.
fn raw_request(path: &Path, body: &str, fds: &[i32]) -> Reply {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(sock.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    let mut packet = vec![1u8];
    packet.extend_from_slice(body.as_bytes());
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&packet)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    assert_eq!(buf[0], 1, "replies carry the version byte");
    serde_json::from_slice(&buf[1..n]).unwrap()
}

#[test]
fn requests_with_the_wrong_descriptors_are_answered_with_an_error() {
    let dir = TempDir::new();
    let (tx, rx) = mpsc::channel();
    let server = Server::bind(&dir.join("agent.sock")).unwrap();
    let path = server.path().to_owned();
    std::thread::spawn(move || {
        while let Ok(mut conn) = server.accept() {
            let request = conn.recv().map(|r| r.map(|r| r.kind()));
            if let Ok(Some(_)) = request {
                conn.reply(&Reply::Captured).unwrap();
            }
            tx.send(request).unwrap();
        }
    });
    let add =
        r#"{"type":"add","pod":{"namespace":"a","name":"b","container_id":"c","ifname":"eth0"}}"#;
    let netns = File::open("/proc/self/ns/net").unwrap();
    let plain = File::open("/etc/hostname").unwrap();
    let cases: [(&str, Vec<i32>, &str); 5] = [
        (add, vec![], "carries 1 file descriptor(s), received 0"),
        (
            add,
            vec![netns.as_raw_fd(), netns.as_raw_fd()],
            "received 2",
        ),
        (add, vec![plain.as_raw_fd()], "not a network namespace"),
        (
            r#"{"type":"status"}"#,
            vec![netns.as_raw_fd()],
            "carries 0 file descriptor(s), received 1",
        ),
        (r#"{"type":"frob"}"#, vec![], "cannot decode"),
    ];
    for (body, fds, expected) in cases {
        match raw_request(&path, body, &fds) {
            Reply::Error { message } => {
                assert!(message.contains(expected), "{message} vs {expected}");
            }
            other => panic!("{body}: {other:?}"),
        }
        let seen = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(matches!(seen, Err(ServerError::Wire(_))), "{seen:?}");
    }
    let reply = raw_request(&path, add, &[netns.as_raw_fd()]);
    assert_eq!(reply, Reply::Captured);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap(),
        Some(RequestKind::Add)
    );
}

#[test]
fn the_server_keeps_one_reply_per_request() {
    let dir = TempDir::new();
    let server = Server::bind(&dir.join("agent.sock")).unwrap();
    let path = server.path().to_owned();
    let handle = std::thread::spawn(move || {
        let mut conn = server.accept().unwrap();
        assert!(matches!(
            conn.reply(&Reply::Ready),
            Err(ServerError::NoPendingRequest)
        ));
        assert_eq!(conn.recv().unwrap().unwrap().kind(), RequestKind::Status);
        assert!(matches!(
            conn.recv(),
            Err(ServerError::ReplyPending(RequestKind::Status))
        ));
        assert!(matches!(
            conn.reply(&Reply::Deleted),
            Err(ServerError::WrongReply { .. })
        ));
        conn.reply(&Reply::Ready).unwrap();
        assert!(conn.recv().unwrap().is_none(), "the client hung up");
        conn.peer()
    });
    let client = Client::connect(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(client.status().unwrap(), AgentStatus::Ready);
    drop(client);
    let peer = handle.join().unwrap();
    assert_eq!(
        (peer.uid, peer.pid),
        (0, i32::try_from(std::process::id()).unwrap())
    );
}

#[test]
fn a_server_of_another_version_is_named_and_a_non_root_peer_is_refused() {
    let dir = TempDir::new();
    let agent = TestAgent::start(dir.join("agent.sock"), |_| Reply::Ready);
    // Let an unprivileged user reach the socket, so that only SO_PEERCRED stops it.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = run_plugin_as(
        &[("CNI_COMMAND", "STATUS")],
        &conf(&agent.socket, 2000, false),
        Some(65534),
    );
    assert_eq!(run.error_code(), 50, "{run:?}");
    match agent.errors.recv_timeout(Duration::from_secs(5)).unwrap() {
        ServerError::PeerNotRoot { uid, pid } => assert!(uid == 65534 && pid > 0),
        other => panic!("{other:?}"),
    }

    // A peer speaking protocol version 9.
    let path = dir.join("other.sock");
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(sock.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&sock, Backlog::new(4).unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::from(sock);
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = nix::sys::socket::recv(stream.as_raw_fd(), &mut buf, MsgFlags::empty());
        nix::sys::socket::send(stream.as_raw_fd(), b"\x09{}", MsgFlags::empty()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let client = Client::connect(&path, Duration::from_secs(5)).unwrap();
    match client.status() {
        Err(ClientError::Wire {
            source: WireError::UnsupportedVersion { got: 9 },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}
