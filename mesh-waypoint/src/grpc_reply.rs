//! The waypoint's own answers to gRPC requests, as gRPC clients read them (and as Envoy sends
//! them): "trailers-only", HTTP 200 with `content-type: application/grpc`, `grpc-status` from
//! the HTTP status the answer had (gRPC's HTTP to gRPC status mapping; a 504, always a timeout
//! here, is `DEADLINE_EXCEEDED`) and `grpc-message` its text, percent-encoded. A gRPC client
//! that gets a plain-text 503 instead fails with a framing error and no status.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{full, Body};

/// Marks an answer the waypoint made itself, with its text.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalReply(pub(crate) &'static str);

/// The gRPC status of an answer the waypoint made itself, when not the one its HTTP status maps
/// to (a local rate limit's `RESOURCE_EXHAUSTED`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GrpcCode(pub(crate) u8);

/// Whether a request is gRPC (its `content-type`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status of an HTTP status the waypoint answered with.
fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        504 => 4,              // DEADLINE_EXCEEDED: the route's timeout
        429 | 502 | 503 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `text` as `grpc-message` carries it: printable ASCII but `%`, the rest percent-encoded.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `response` as a gRPC client reads it, if the waypoint made it; else unchanged.
pub(crate) fn for_grpc(mut response: Response<Body>) -> Response<Body> {
    let Some(LocalReply(text)) = response.extensions().get::<LocalReply>().copied() else {
        return response;
    };
    let code = response
        .extensions()
        .get::<GrpcCode>()
        .map_or_else(|| grpc_code(response.status()), |c| c.0);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Ok(message) = HeaderValue::from_str(&percent_encode(text)) {
        headers.insert("grpc-message", message);
    }
    *response.body_mut() = full(Bytes::new());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: StatusCode, text: &'static str) -> Response<Body> {
        let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response.extensions_mut().insert(LocalReply(text));
        response
    }

    #[test]
    fn the_waypoints_own_answers_become_trailers_only_grpc_statuses() {
        let r = for_grpc(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
        ));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy upstream");
        let r = for_grpc(reply(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
        ));
        assert_eq!(r.headers()["grpc-status"], "4");
        let r = for_grpc(reply(StatusCode::IM_A_TEAPOT, "fault filter abort 100%"));
        assert_eq!(r.headers()["grpc-status"], "2");
        assert_eq!(r.headers()["grpc-message"], "fault filter abort 100%25");
        // A local rate limit: UNAVAILABLE, or RESOURCE_EXHAUSTED when its filter says so.
        let r = for_grpc(reply(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited"));
        assert_eq!(r.headers()["grpc-status"], "14");
        let mut exhausted = reply(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
        exhausted.extensions_mut().insert(GrpcCode(8));
        let r = for_grpc(exhausted);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["grpc-message"], "local_rate_limited");
        // 401: a refused token.
        let r = for_grpc(reply(StatusCode::UNAUTHORIZED, "Jwt is expired"));
        assert_eq!(r.headers()["grpc-status"], "16");
    }

    #[test]
    fn an_endpoints_answer_is_left_alone() {
        let mut response = Response::new(full(Bytes::from_static(b"x")));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let r = for_grpc(response);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().get("grpc-status").is_none());
    }

    #[test]
    fn grpc_requests_are_told_by_their_content_type() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&headers));
    }
}
