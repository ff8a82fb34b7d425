//! What the waypoint tells an endpoint about who called: `x-forwarded-for` (the client's
//! address appended, as proxies do) and `x-forwarded-client-cert` (XFCC).
//!
//! XFCC is the client's word until a proxy that checked a certificate writes it, so the
//! waypoint never passes on what a client sent (an application trusting it could be told
//! anyone called). When its `Gateway` asks for it
//! ([`mesh_cluster::waypoint::XFCC_CLIENT_IDENTITY`], Istio 1.30's annotation), it sets
//! `By=<its own identity>;URI=<the source's identity>`, the source's proven by the certificate
//! of its HBONE connection, as Envoy's `SANITIZE_SET` writes the two fields.

use std::net::IpAddr;

use http::{header::HeaderName, HeaderMap, HeaderValue};
use mesh_identity::Identity;

/// `x-forwarded-client-cert`.
pub(crate) const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `x-forwarded-for` gets the client's address appended, as proxies do.
pub(crate) fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(before) => format!("{before}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", value);
    }
}

/// Drops every `x-forwarded-client-cert` the client sent; with `client` (the waypoint's
/// identity, the source's), sets it to them.
pub(crate) fn forward_client_cert(headers: &mut HeaderMap, client: Option<(&Identity, &Identity)>) {
    headers.remove(XFCC);
    let Some((by, source)) = client else {
        return;
    };
    // SPIFFE ids are URIs: always a valid header value.
    if let Ok(value) = HeaderValue::try_from(format!("By={by};URI={source}")) {
        headers.insert(XFCC, value);
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};
    use mesh_identity::Identity;

    use super::{forward_client_cert, XFCC};

    fn forged() -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in ["URI=spiffe://cluster.local/ns/x/sa/admin", "By=a;URI=b"] {
            headers.append(XFCC, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn what_a_client_sends_is_dropped_and_with_the_setting_replaced_by_its_proven_identity() {
        let mut headers = forged();
        forward_client_cert(&mut headers, None);
        assert!(headers.get(XFCC).is_none());

        let waypoint = Identity::new("cluster.local", "infra", "wp").expect("valid");
        let source = Identity::new("cluster.local", "shop", "web").expect("valid");
        let mut headers = forged();
        forward_client_cert(&mut headers, Some((&waypoint, &source)));
        let values: Vec<_> = headers.get_all(XFCC).iter().collect();
        assert_eq!(
            values,
            ["By=spiffe://cluster.local/ns/infra/sa/wp;URI=spiffe://cluster.local/ns/shop/sa/web"]
        );
    }
}
