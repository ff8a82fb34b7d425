//! The body type of requests and responses inside the waypoint, and its constructors.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};

/// Bodies both ways: the peer's, streamed, or one the waypoint holds.
pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// A body the waypoint holds.
pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}
