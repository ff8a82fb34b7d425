//! Tests of the filters' effects.

use http::{HeaderMap, StatusCode, Uri};
use mesh_cluster::k8s::{HeaderModifier, PathMatch, PathModifier, Redirect, RouteMatch};

use super::{modify_headers, redirect_location, replace_path, request_host};

fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path: PathMatch::Prefix(prefix.to_owned()),
        headers: Vec::new(),
        query_params: Vec::new(),
        method: None,
    }
}

#[test]
fn headers_are_set_added_then_removed() {
    let mut headers = HeaderMap::new();
    headers.insert("x-a", "old".parse().unwrap());
    headers.insert("x-b", "1".parse().unwrap());
    headers.insert("x-c", "gone".parse().unwrap());
    let modifier = HeaderModifier {
        set: vec![("X-A".into(), "new".into())],
        add: vec![("x-b".into(), "2".into()), ("x-d".into(), "3".into())],
        remove: vec!["X-C".into()],
    };
    modify_headers(&mut headers, &modifier);
    assert_eq!(headers.get_all("x-a").iter().collect::<Vec<_>>(), ["new"]);
    assert_eq!(
        headers.get_all("x-b").iter().collect::<Vec<_>>(),
        ["1", "2"]
    );
    assert_eq!(headers["x-d"], "3");
    assert!(!headers.contains_key("x-c"));
}

#[test]
fn prefix_replacement_keeps_segment_boundaries() {
    let m = prefix_match("/prefix/one");
    let replace =
        |path: &str, with: &str| replace_path(path, &PathModifier::Prefix(with.into()), &m);
    assert_eq!(replace("/prefix/one/two", "/one"), "/one/two");
    assert_eq!(replace("/prefix/one/two", "/"), "/two");
    assert_eq!(replace("/prefix/one", "/"), "/");
    assert_eq!(replace("/prefix/one", "/xyz"), "/xyz");
    assert_eq!(replace("/prefix/one/", "/xyz/"), "/xyz/");
    let full = replace_path("/prefix/one/two", &PathModifier::Full("/full".into()), &m);
    assert_eq!(full, "/full");
    let m = prefix_match("/");
    assert_eq!(
        replace_path("/a/b", &PathModifier::Prefix("/x".into()), &m),
        "/x/a/b"
    );
}

#[test]
fn the_host_comes_from_the_authority_or_host_header_without_port() {
    let mut headers = HeaderMap::new();
    headers.insert("host", "web.shop:8080".parse().unwrap());
    assert_eq!(
        request_host(&"/x".parse().unwrap(), &headers).as_deref(),
        Some("web.shop")
    );
    let uri: Uri = "http://[fd00::1]:80/x".parse().unwrap();
    assert_eq!(
        request_host(&uri, &HeaderMap::new()).as_deref(),
        Some("[fd00::1]")
    );
    assert_eq!(
        request_host(&"/x".parse().unwrap(), &HeaderMap::new()),
        None
    );
}

#[test]
fn redirects_follow_gateway_api_port_rules() {
    let mut headers = HeaderMap::new();
    headers.insert("host", "web.shop".parse().unwrap());
    let uri: Uri = "/old/page?q=1".parse().unwrap();
    let m = prefix_match("/old");
    let redirect = |scheme: Option<&str>,
                    host: Option<&str>,
                    port: Option<u16>,
                    path: Option<PathModifier>,
                    status: u16| Redirect {
        scheme: scheme.map(Into::into),
        hostname: host.map(Into::into),
        path,
        port,
        status,
    };
    let location =
        |r: &Redirect, service_port: u16| redirect_location(r, &uri, &headers, &m, service_port);
    assert_eq!(
        location(&redirect(None, None, None, None, 302), 80),
        (StatusCode::FOUND, "http://web.shop/old/page?q=1".to_owned())
    );
    assert_eq!(
        location(&redirect(None, None, None, None, 302), 8080).1,
        "http://web.shop:8080/old/page?q=1",
        "no scheme: the port the request came to"
    );
    assert_eq!(
        location(
            &redirect(Some("https"), Some("example.com"), None, None, 301),
            8080
        ),
        (
            StatusCode::MOVED_PERMANENTLY,
            "https://example.com/old/page?q=1".to_owned()
        ),
        "a scheme: its well-known port, left out"
    );
    assert_eq!(
        location(
            &redirect(
                Some("https"),
                None,
                Some(8443),
                Some(PathModifier::Prefix("/new".into())),
                308
            ),
            80
        ),
        (
            StatusCode::PERMANENT_REDIRECT,
            "https://web.shop:8443/new/page?q=1".to_owned()
        )
    );
    assert_eq!(
        location(&redirect(None, None, Some(80), None, 303), 8080).0,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        location(&redirect(None, None, Some(80), None, 307), 8080).1,
        "http://web.shop/old/page?q=1"
    );
}
