//! Tests of what goes to an endpoint multiplexed, and how an HTTP/1.1 request is upgraded.

use http::{header, Request, Version};
use mesh_cluster::k8s::ConnectionPool;

use super::{as_asked, multiplexed, upgrade_to_h2};
use crate::body::{full, Body};

fn request(headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::get("/a/b?c=d");
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(full(bytes::Bytes::new())).unwrap()
}

#[test]
fn an_upgrade_policy_multiplexes_http1_requests_but_not_websockets() {
    let upgrade = ConnectionPool {
        h2_upgrade: true,
        ..ConnectionPool::default()
    };
    let plain = request(&[("host", "web.shop:80")]);
    assert!(!multiplexed(&plain, None), "as the client spoke");
    assert!(!multiplexed(&plain, Some(&ConnectionPool::default())));
    assert!(multiplexed(&plain, Some(&upgrade)));
    let ws = request(&[
        ("host", "web"),
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
    ]);
    assert!(
        !multiplexed(&ws, Some(&upgrade)),
        "a WebSocket stays HTTP/1.1"
    );
    let mut h2 = request(&[]);
    *h2.version_mut() = Version::HTTP_2;
    assert!(multiplexed(&h2, None));
}

#[test]
fn an_upgraded_request_has_its_host_as_authority_and_its_answer_goes_back_as_asked() {
    let mut upgraded = request(&[("host", "web.shop:80"), ("x-user", "a")]);
    upgrade_to_h2(&mut upgraded);
    assert_eq!(upgraded.version(), Version::HTTP_2);
    assert_eq!(upgraded.uri().to_string(), "http://web.shop:80/a/b?c=d");
    assert!(!upgraded.headers().contains_key(header::HOST));
    assert_eq!(upgraded.headers()["x-user"], "a");
    // Without a `Host`: left as it is, which h2 forwards as an HTTP/1.1 request (scheme
    // `http`, no `:authority`); HTTP/2 with a relative URI would be refused.
    let mut bare = request(&[]);
    upgrade_to_h2(&mut bare);
    assert_eq!(
        (bare.version(), bare.uri().to_string()),
        (Version::HTTP_11, "/a/b?c=d".to_owned())
    );
    let mut answer = http::Response::new(());
    *answer.version_mut() = Version::HTTP_2;
    assert_eq!(
        as_asked(answer, Version::HTTP_11).version(),
        Version::HTTP_11
    );
}
