//! The server name a TLS client asks for (SNI, RFC 6066), read from its client hello for the
//! `VirtualService` `tls` rules: the bytes are only looked at, and go on to the endpoint as they
//! came (the waypoint does not terminate the client's TLS). The client hello is a hostile
//! input: every length is checked against what is there, and anything malformed is "no name".

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// How long the waypoint waits for a client hello.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// The largest TLS record (2^14 bytes and its 5-byte header): a client hello is read up to it.
const MAX_RECORD: usize = (1 << 14) + 5;

/// What a tunnel's first bytes say of the server name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// A client hello asking for this name (lower case).
    Name(String),
    /// Not TLS, a client hello without a name, or one that cannot be read.
    NoName,
    /// The start of a client hello: more bytes are needed.
    Incomplete,
}

/// Reads a tunnel's first bytes until they tell the server name (or [`HELLO_TIMEOUT`] goes by,
/// or [`MAX_RECORD`] bytes came); the name, if any, and the bytes read.
pub(crate) async fn read_server_name<IO: AsyncRead + Unpin>(
    io: &mut IO,
) -> std::io::Result<(Option<String>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        match server_name(&buf) {
            Hello::Name(name) => return Ok((Some(name), buf)),
            Hello::NoName => return Ok((None, buf)),
            Hello::Incomplete if buf.len() >= MAX_RECORD => return Ok((None, buf)),
            Hello::Incomplete => {}
        }
        let mut chunk = [0u8; 2048];
        let room = chunk.len().min(MAX_RECORD - buf.len());
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            // The client waits for the server, or closed: no name.
            Err(_) | Ok(Ok(0)) => return Ok((None, buf)),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// The server name in `bytes`, the start of a tunnel.
pub(crate) fn server_name(bytes: &[u8]) -> Hello {
    if bytes.is_empty() {
        return Hello::Incomplete;
    }
    // A handshake record.
    if bytes[0] != 0x16 {
        return Hello::NoName;
    }
    let Some(header) = bytes.get(..5) else {
        return Hello::Incomplete;
    };
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if length == 0 || length + 5 > MAX_RECORD {
        return Hello::NoName;
    }
    let Some(record) = bytes.get(5..5 + length) else {
        return Hello::Incomplete;
    };
    match client_hello_name(record) {
        Some(name) => Hello::Name(name),
        None => Hello::NoName,
    }
}

/// Reads big-endian lengths and slices of a byte string, never past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A length of `width` bytes, then that many bytes.
    fn vector(&mut self, width: usize) -> Option<Reader<'a>> {
        let n = match width {
            1 => self.u8()?,
            _ => self.u16()?,
        };
        self.take(n).map(Reader)
    }
}

/// The `host_name` of the `server_name` extension of the client hello in `record`.
fn client_hello_name(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    // Handshake type 1 (client hello), its 3-byte length: the hello's body (in this record).
    if r.u8()? != 1 {
        return None;
    }
    let length = r.take(3)?;
    let length =
        usize::from(length[0]) << 16 | usize::from(length[1]) << 8 | usize::from(length[2]);
    let mut hello = Reader(r.take(length)?);
    hello.take(2 + 32)?; // version, random
    hello.vector(1)?; // session id
    hello.vector(2)?; // cipher suites
    hello.vector(1)?; // compression methods
    let mut extensions = hello.vector(2)?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vector(2)?;
        if kind != 0 {
            continue;
        }
        let mut names = data.vector(2)?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vector(2)?.0;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                let valid = !name.is_empty()
                    && name.len() <= 253
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                return valid.then(|| name.to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{server_name, Hello};

    /// A client hello record asking for `name` (none: no `server_name` extension).
    fn hello(name: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        // An extension before it (supported_versions), as clients send several.
        extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = name {
            let n = u16::try_from(name.len()).unwrap();
            extensions.extend_from_slice(&[0x00, 0x00]);
            extensions.extend_from_slice(&(n + 5).to_be_bytes());
            extensions.extend_from_slice(&(n + 3).to_be_bytes());
            extensions.push(0);
            extensions.extend_from_slice(&n.to_be_bytes());
            extensions.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[32]);
        body.extend_from_slice(&[1; 32]);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut handshake = vec![0x01, 0x00];
        handshake.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn the_name_of_a_client_hello_is_read() {
        let bytes = hello(Some("API.Example.com"));
        assert_eq!(server_name(&bytes), Hello::Name("api.example.com".into()));
        // Every shorter start is incomplete, never a name or a failure.
        for n in 0..bytes.len() {
            assert_eq!(server_name(&bytes[..n]), Hello::Incomplete, "{n} bytes");
        }
        assert_eq!(server_name(&hello(None)), Hello::NoName);
    }

    #[test]
    fn anything_else_has_no_name_and_malformed_lengths_never_read_past_the_end() {
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Hello::NoName);
        assert_eq!(server_name(&[0x16, 0x03, 0x01, 0x00, 0x00]), Hello::NoName);
        assert_eq!(
            server_name(&[0x16, 0x03, 0x01, 0xff, 0xff]),
            Hello::NoName,
            "too long"
        );
        let good = hello(Some("a.example"));
        // Every byte of the hello set to each of a few values: a name, no name or incomplete,
        // never a panic.
        for i in 5..good.len() {
            for value in [0x00, 0x01, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = value;
                let _ = server_name(&bad);
            }
        }
        // A name that is not a host name.
        assert_eq!(server_name(&hello(Some("a b"))), Hello::NoName);
    }
}
