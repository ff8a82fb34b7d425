//! Tests of the model's values.

use super::AppProtocol;

#[test]
fn app_protocol_from_app_protocol_then_port_name() {
    let of = AppProtocol::of;
    assert_eq!(
        of(Some("http"), Some("tcp-x")),
        AppProtocol::Http,
        "appProtocol first"
    );
    assert_eq!(of(Some("kubernetes.io/h2c"), None), AppProtocol::Http2);
    assert_eq!(of(Some("kubernetes.io/ws"), None), AppProtocol::Http);
    assert_eq!(of(Some("kubernetes.io/wss"), None), AppProtocol::Opaque);
    assert_eq!(of(Some("GRPC"), None), AppProtocol::Grpc, "case ignored");
    assert_eq!(
        of(Some("example.com/custom"), Some("http-web")),
        AppProtocol::Http,
        "unknown value: the name"
    );
    assert_eq!(of(None, Some("http2-api")), AppProtocol::Http2);
    assert_eq!(of(None, Some("grpc-web")), AppProtocol::Grpc);
    assert_eq!(of(None, Some("grpc")), AppProtocol::Grpc);
    assert_eq!(of(None, Some("tcp")), AppProtocol::Opaque);
    assert_eq!(of(None, Some("https-admin")), AppProtocol::Opaque);
    assert_eq!(of(None, Some("mysql")), AppProtocol::Opaque);
    assert_eq!(of(None, Some("web")), AppProtocol::Unknown);
    assert_eq!(
        of(None, Some("httpx")),
        AppProtocol::Unknown,
        "the whole prefix, not its start"
    );
    assert_eq!(of(None, None), AppProtocol::Unknown);
    assert!(AppProtocol::Grpc.is_http() && !AppProtocol::Unknown.is_http());
}
