//! HTTP/1.1 upgrades at the waypoint, and the hop-by-hop headers a proxy removes.
//!
//! The waypoint switches protocols for WebSocket only, as Istio configures Envoy
//! (`upgrade_configs: websocket`): the request goes to the backend with its upgrade headers,
//! and once both the client and the backend have switched, their bytes are relayed
//! ([`crate::relay`], ended after an hour without a byte either way). An offer to switch to
//! HTTP/2 (`Upgrade: h2c`, which RFC 9113 retired) is declined by serving the request as
//! HTTP/1.1 without it. Any other upgrade is refused with 403, as Envoy refuses one it is not
//! configured for: passed on, a backend that switched would leave a connection whose later
//! bytes the waypoint no longer reads as requests, so later requests on it would pass the
//! routes unseen.

use http::{header, HeaderMap, HeaderValue};
use hyper_util::rt::TokioIo;
use tracing::debug;

/// What an HTTP/1.1 request's upgrade asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpgradeAsk {
    /// None (no `Connection: upgrade`, or no `Upgrade`).
    None,
    /// WebSocket: forwarded, and spliced once both ends switch.
    WebSocket,
    /// `h2c`: served as HTTP/1.1, the offer removed.
    H2c,
    /// Anything else: refused with 403.
    Refused,
}

impl UpgradeAsk {
    /// What `headers` ask for.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let Some(upgrade) = upgrade_of(headers) else {
            return UpgradeAsk::None;
        };
        let protocols: Vec<String> = upgrade
            .to_str()
            .unwrap_or("")
            .split(',')
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
            .collect();
        match protocols.as_slice() {
            [] => UpgradeAsk::None,
            [one] if one == "websocket" => UpgradeAsk::WebSocket,
            [one] if one == "h2c" => UpgradeAsk::H2c,
            _ => UpgradeAsk::Refused,
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with `Upgrade`),
/// such as `websocket`.
fn upgrade_of(headers: &HeaderMap) -> Option<&HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE)).flatten()
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), but keeps a WebSocket upgrade's
/// (`Connection: upgrade` and `Upgrade`, which the next hop must see to switch protocols).
pub(crate) fn strip_hop_by_hop_keeping_upgrade(headers: &mut HeaderMap) {
    let upgrade = (UpgradeAsk::of(headers) == UpgradeAsk::WebSocket)
        .then(|| upgrade_of(headers).cloned())
        .flatten();
    strip_hop_by_hop(headers);
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): those `Connection` names and the fixed
/// ones. `te: trailers` stays (gRPC needs it).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// Relays the bytes of an upgraded connection both ways once both ends have switched.
pub(crate) async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: mesh_hbone::idle::IdleWatch,
) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %e, "the upgrade did not complete");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    match crate::relay::relay(&mut down, &mut up, idle).await {
        Ok((sent, received)) => debug!(sent, received, "upgraded connection done"),
        Err(e) => debug!(error = %e, "upgraded connection ended"),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::{strip_hop_by_hop_keeping_upgrade, UpgradeAsk};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn websocket_alone_is_switched_h2c_declined_the_rest_refused() {
        let ask = |pairs: &[(&'static str, &'static str)]| UpgradeAsk::of(&headers(pairs));
        assert_eq!(ask(&[]), UpgradeAsk::None);
        assert_eq!(
            ask(&[("upgrade", "websocket")]),
            UpgradeAsk::None,
            "no Connection: upgrade"
        );
        assert_eq!(
            ask(&[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "WebSocket")
            ]),
            UpgradeAsk::WebSocket
        );
        assert_eq!(
            ask(&[
                ("connection", "upgrade, http2-settings"),
                ("upgrade", "h2c")
            ]),
            UpgradeAsk::H2c
        );
        for other in ["foo", "websocket, foo", "tls/1.3", "h2c, websocket"] {
            assert_eq!(
                ask(&[("connection", "upgrade"), ("upgrade", other)]),
                UpgradeAsk::Refused,
                "{other}"
            );
        }
    }

    #[test]
    fn only_a_websocket_upgrade_is_passed_on() {
        let mut ws = headers(&[
            ("connection", "upgrade, x-hop"),
            ("x-hop", "1"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop_keeping_upgrade(&mut ws);
        assert_eq!(ws["connection"], "upgrade");
        assert_eq!(ws["upgrade"], "websocket");
        assert!(ws.get("x-hop").is_none());
        let mut h2c = headers(&[
            ("connection", "upgrade, http2-settings"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("upgrade", "h2c"),
        ]);
        strip_hop_by_hop_keeping_upgrade(&mut h2c);
        assert!(h2c.is_empty(), "{h2c:?}");
    }
}
