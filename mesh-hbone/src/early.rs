//! Optimistic data: the client's first bytes sent on a tunnel while its CONNECT waits for the
//! answer, instead of a round trip behind it.
//!
//! A new connection whose client speaks first (HTTP, TLS, most request/response protocols)
//! otherwise costs the source's agent two wake-ups in a row before its first byte moves: the
//! peer's `200`, then the bytes. Sent early, the bytes travel right behind the request and the
//! destination's agent finds them buffered when it has answered. At most [`EARLY_LIMIT`] bytes
//! are sent this way; the rest waits for the answer as before.
//!
//! Nothing is passed on before authorization: the peer buffers a stream's DATA and hands it to
//! the target only after it has accepted the stream; a refused stream's bytes are dropped with
//! it. When the request must be retried on another connection (the first one went away before
//! the peer acted on it), the early bytes are sent again there.

use std::task::{Context, Poll};

use bytes::Bytes;

/// The most a tunnel sends before its answer: one first message (a request, a TLS
/// `ClientHello`). Bounded so that connections waiting for slow answers cannot pile up memory.
pub const EARLY_LIMIT: usize = 16 * 1024;

/// Where the early bytes come from: the client's connection.
pub trait EarlyData: Send {
    /// The next bytes the client sent, at most `limit` of them (no copy: the caller keeps a
    /// reference until the answer arrives; more than `limit` are all sent, and end the early
    /// phase). `None` when it will send no more for now, at its
    /// end of file or after an error, which the implementation keeps for its caller to report.
    fn poll_early(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<Option<Bytes>>;
}

/// No early data: the tunnel waits for its answer before anything is sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEarlyData;

impl EarlyData for NoEarlyData {
    fn poll_early(&mut self, _cx: &mut Context<'_>, _limit: usize) -> Poll<Option<Bytes>> {
        Poll::Ready(None)
    }
}

/// The early bytes of one tunnel across its attempts.
pub(crate) struct Early<'a, E: ?Sized> {
    source: &'a mut E,
    /// Everything taken from `source` so far, to send again on a retry.
    sent: Vec<Bytes>,
    len: usize,
    /// The source has nothing more (or the limit is reached).
    done: bool,
}

impl<'a, E: EarlyData + ?Sized> Early<'a, E> {
    pub(crate) fn new(source: &'a mut E) -> Self {
        Self {
            source,
            sent: Vec::new(),
            len: 0,
            done: false,
        }
    }

    /// Bytes taken from the source.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// What an earlier attempt sent, to send again on a new stream.
    pub(crate) fn replay(&self) -> impl Iterator<Item = Bytes> + '_ {
        self.sent.iter().cloned()
    }

    /// Takes what the source has now (registering `cx` for more), within the limit, and
    /// passes each piece to `send`.
    pub(crate) fn poll_more(&mut self, cx: &mut Context<'_>, mut send: impl FnMut(Bytes)) {
        while !self.done {
            let limit = EARLY_LIMIT - self.len;
            match self.source.poll_early(cx, limit) {
                Poll::Ready(Some(data)) => {
                    debug_assert!(data.len() <= limit, "early data over its limit");
                    self.len += data.len();
                    self.done = self.len >= EARLY_LIMIT;
                    send(data.clone());
                    self.sent.push(data);
                }
                Poll::Ready(None) => self.done = true,
                Poll::Pending => return,
            }
        }
    }
}
