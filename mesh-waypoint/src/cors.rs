//! Cross-origin resource sharing at the waypoint: the matched rule's policy
//! ([`mesh_cluster::cors`], where the decisions and their reasons are) applied to a request and
//! its answer.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use mesh_cluster::{
    cors::{CorsRequest, CorsStep},
    http_route::ResolvedRule,
    k8s::Filter,
};

use crate::body::{full, Body};

/// What a rule's CORS policy makes of a request.
pub(crate) enum Cors {
    /// A preflight the waypoint answers itself.
    Answered(Response<Body>),
    /// Forwarded; these headers go on its answer.
    Mark(Vec<(&'static str, String)>),
}

/// The step `rule`'s CORS policy (if any) takes for `request`; `None`: nothing to do.
pub(crate) fn check<B>(rule: &ResolvedRule, request: &Request<B>) -> Option<Cors> {
    let policy = rule.filters.iter().find_map(|f| match f {
        Filter::Cors(policy) => Some(policy),
        _ => None,
    })?;
    let headers = request.headers();
    let asked = CorsRequest {
        origin: text(headers, header::ORIGIN),
        options: request.method() == Method::OPTIONS,
        request_method: text(headers, header::ACCESS_CONTROL_REQUEST_METHOD),
        request_headers: text(headers, header::ACCESS_CONTROL_REQUEST_HEADERS),
    };
    match policy.step(&asked) {
        CorsStep::Pass => None,
        CorsStep::Forward(marks) => Some(Cors::Mark(marks)),
        CorsStep::Answer(marks) => {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::OK;
            mark(&mut response, &marks);
            Some(Cors::Answered(response))
        }
    }
}

/// Sets `marks` on `response`'s headers.
pub(crate) fn mark(response: &mut Response<Body>, marks: &[(&'static str, String)]) {
    for (name, value) in marks {
        // The values are the request's own header values or lists checked when read.
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

fn text(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
