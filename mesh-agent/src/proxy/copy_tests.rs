//! What the tests of both copies ([`super::relay`]'s TCP-to-TCP copy and
//! [`super::tunnel_copy`]) share: loopback socket pairs and a byte-exact exchange with
//! half-close through a copy.

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// A connected pair of loopback sockets.
pub(super) async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect()
}

/// Through a copy between `client` and `server`: the client writes `request` bytes and
/// half-closes, the server reads them to EOF while the client keeps reading, then answers
/// `response` bytes and half-closes. Both arrive byte-exact.
pub(super) async fn half_close_exchange<S>(
    mut client: TcpStream,
    server: &mut S,
    request: usize,
    response: usize,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = pattern(request, 0x5a);
    let response = pattern(response, 0xa5);
    let req = request.clone();
    let client = tokio::spawn(async move {
        client.write_all(&req).await.unwrap();
        // Half-close: the server must see EOF while the response still flows back.
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got == request, "request corrupted ({} bytes)", got.len());
    server.write_all(&response).await.unwrap();
    server.shutdown().await.unwrap();
    let back = client.await.unwrap();
    assert!(
        back == response,
        "response corrupted ({} bytes)",
        back.len()
    );
}
