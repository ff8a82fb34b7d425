//! One question put to one name server: over UDP from a fresh port, connected to the server so
//! only its datagrams are read, and only an answer to this question (its id and its question)
//! taken; a truncated answer is asked again over TCP, as RFC 7766 has it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Query},
    rr::{Name, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::{timeout_at, Instant},
};
use tracing::debug;

/// The UDP payload the waypoint says it takes (the DNS flag day's figure, below any MTU).
const UDP_PAYLOAD: u16 = 1232;

/// Why a server gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error("{server}: no answer within {waited:?}")]
    TimedOut {
        server: SocketAddr,
        waited: Duration,
    },
    #[error("{server}: {source}")]
    Io {
        server: SocketAddr,
        source: io::Error,
    },
    #[error("{server}: an answer over TCP that is not DNS: {reason}")]
    Malformed { server: SocketAddr, reason: String },
    #[error("the question for {name} cannot be written: {reason}")]
    Question { name: Name, reason: String },
}

/// The server's answer to `name`'s `kind` records, waited for at most `wait`.
pub(crate) async fn ask(
    server: SocketAddr,
    name: &Name,
    kind: RecordType,
    wait: Duration,
) -> Result<Message, ExchangeError> {
    let deadline = Instant::now() + wait;
    let mut question = Message::query();
    question.metadata.recursion_desired = true;
    question.add_query(Query::query(name.clone(), kind));
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD);
    question.set_edns(edns);
    let bytes = question.to_vec().map_err(|e| ExchangeError::Question {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let timed_out = |_| ExchangeError::TimedOut {
        server,
        waited: wait,
    };
    let answer = timeout_at(deadline, over_udp(server, &question, &bytes))
        .await
        .map_err(timed_out)??;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    debug!(%server, %name, "truncated over UDP: asked again over TCP");
    timeout_at(deadline, over_tcp(server, &question, &bytes))
        .await
        .map_err(timed_out)?
}

/// Whether `answer` answers `question`.
fn answers(answer: &Message, question: &Message) -> bool {
    answer.metadata.id == question.metadata.id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries == question.queries
}

async fn over_udp(
    server: SocketAddr,
    question: &Message,
    bytes: &[u8],
) -> Result<Message, ExchangeError> {
    let io = |source| ExchangeError::Io { server, source };
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    socket.connect(server).await.map_err(io)?;
    socket.send(bytes).await.map_err(io)?;
    let mut buffer = vec![0u8; usize::from(UDP_PAYLOAD).max(512)];
    loop {
        let n = socket.recv(&mut buffer).await.map_err(io)?;
        match Message::from_vec(&buffer[..n]) {
            Ok(answer) if answers(&answer, question) => return Ok(answer),
            // Someone else's, or garbage: the real answer may still come.
            Ok(_) => debug!(%server, "a datagram answering another question: ignored"),
            Err(e) => debug!(%server, error = %e, "a datagram that is not DNS: ignored"),
        }
    }
}

async fn over_tcp(
    server: SocketAddr,
    question: &Message,
    bytes: &[u8],
) -> Result<Message, ExchangeError> {
    let io = |source| ExchangeError::Io { server, source };
    let malformed = |reason: String| ExchangeError::Malformed { server, reason };
    let length = u16::try_from(bytes.len()).map_err(|_| malformed("question too long".into()))?;
    let mut stream = TcpStream::connect(server).await.map_err(io)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(io)?;
    let length = stream.read_u16().await.map_err(io)?;
    let mut buffer = vec![0u8; usize::from(length)];
    stream.read_exact(&mut buffer).await.map_err(io)?;
    let answer = Message::from_vec(&buffer).map_err(|e| malformed(e.to_string()))?;
    if answers(&answer, question) {
        Ok(answer)
    } else {
        Err(malformed("an answer to another question".into()))
    }
}
