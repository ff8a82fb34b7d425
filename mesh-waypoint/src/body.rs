//! The body type of requests and responses inside the waypoint, and its constructors.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::{Frame, SizeHint};

/// Bodies both ways: the peer's, streamed, or one the waypoint holds.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// A body the waypoint holds.
pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// `body`, holding `guard` until its end (or until it is dropped): what a request holds while
/// its response is read (a connection, a place among the requests in flight).
pub(crate) fn hold<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    Held {
        body,
        guard: Some(guard),
    }
    .boxed()
}

struct Held<G> {
    body: Body,
    guard: Option<G>,
}

impl<G: Unpin> hyper::body::Body for Held<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
