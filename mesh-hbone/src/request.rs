//! The CONNECT request as the client builds it and as the server sees it.

use std::{fmt::Write as _, net::SocketAddr};

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};

use crate::error::HboneError;

/// W3C baggage: the source workload's metadata (`k8s.namespace.name=…,k8s.pod.name=…,…`).
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// RFC 7239 `forwarded`: the original client's address, `for="<ip:port>"`.
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// W3C trace context, passed through when the caller sets it.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// What the client asks for when opening a tunnel.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    /// The destination the tunnel leads to; sent as `:authority` (`ip:port`, IPv6 in brackets).
    pub authority: SocketAddr,
    /// The original client's address; sent as `forwarded: for="<ip:port>"`.
    pub forwarded_for: Option<SocketAddr>,
    /// The hostname the client asked for (the service, after resolution to `authority`); sent
    /// as the `host=` parameter of `forwarded`, as ztunnel does.
    pub forwarded_host: Option<String>,
    /// Sent as the `baggage` header when set.
    pub baggage: Option<String>,
    /// Further headers (for example `traceparent`), appended as given.
    pub headers: HeaderMap,
}

impl OutboundRequest {
    /// A request for a tunnel to `authority` with no optional headers.
    pub fn new(authority: SocketAddr) -> Self {
        Self {
            authority,
            forwarded_for: None,
            forwarded_host: None,
            baggage: None,
            headers: HeaderMap::new(),
        }
    }

    /// Sets the original client's address (`forwarded`).
    #[must_use]
    pub fn with_forwarded_for(mut self, client: SocketAddr) -> Self {
        self.forwarded_for = Some(client);
        self
    }

    /// Sets the hostname the client asked for (`forwarded`'s `host=`).
    #[must_use]
    pub fn with_forwarded_host(mut self, host: impl Into<String>) -> Self {
        self.forwarded_host = Some(host.into());
        self
    }

    /// Sets the `baggage` header.
    #[must_use]
    pub fn with_baggage(mut self, baggage: impl Into<String>) -> Self {
        self.baggage = Some(baggage.into());
        self
    }

    /// Appends a header.
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Builds the HTTP/2 CONNECT request: `:method CONNECT`, `:authority`, no `:scheme` or
    /// `:path`.
    pub(crate) fn to_http(&self) -> Result<Request<()>, HboneError> {
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = Uri::try_from(self.authority.to_string())?;
        *request.version_mut() = http::Version::HTTP_2;
        let headers = request.headers_mut();
        if let Some(baggage) = &self.baggage {
            let value = HeaderValue::try_from(baggage.as_str()).map_err(|source| {
                HboneError::InvalidHeader {
                    name: "baggage",
                    source,
                }
            })?;
            headers.insert(BAGGAGE, value);
        }
        if self.forwarded_for.is_some() || self.forwarded_host.is_some() {
            let text = format_forwarded(self.forwarded_for, self.forwarded_host.as_deref());
            let value =
                HeaderValue::try_from(text).map_err(|source| HboneError::InvalidHeader {
                    name: "forwarded",
                    source,
                })?;
            headers.insert(FORWARDED, value);
        }
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        Ok(request)
    }
}

/// What the server hands its handler for one well-formed CONNECT request.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The requested destination, parsed from `:authority`.
    pub authority: SocketAddr,
    /// The original client, parsed from the first `forwarded` element's `for=` parameter;
    /// `None` when the header is absent or holds no `ip:port` there.
    pub forwarded_for: Option<SocketAddr>,
    /// The `host=` parameter of the first `forwarded` element (the hostname the client asked
    /// for), unquoted; `None` when absent.
    pub forwarded_host: Option<String>,
    /// The `baggage` header(s), joined with `,` when repeated; `None` when absent or not
    /// visible ASCII.
    pub baggage: Option<String>,
    /// All request headers, as received.
    pub headers: HeaderMap,
}

impl InboundRequest {
    /// Reads the HBONE fields out of a CONNECT request's `:authority` and headers.
    ///
    /// Returns `None` when the authority is not `ip:port`.
    pub(crate) fn parse(uri: &Uri, headers: HeaderMap) -> Option<Self> {
        let authority = parse_authority(uri)?;
        let forwarded = headers.get(FORWARDED).and_then(|v| v.to_str().ok());
        let forwarded_for = forwarded.and_then(parse_forwarded_for);
        let forwarded_host = forwarded.and_then(|f| forwarded_param(f, "host"));
        let baggage = join_values(&headers, &BAGGAGE);
        Some(Self {
            authority,
            forwarded_for,
            forwarded_host,
            baggage,
            headers,
        })
    }
}

/// `:authority` must be a literal `ip:port` (IPv6 in brackets), as ztunnel sends it.
fn parse_authority(uri: &Uri) -> Option<SocketAddr> {
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
        return None;
    }
    uri.authority()?.as_str().parse().ok()
}

fn join_values(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut joined: Option<String> = None;
    for value in headers.get_all(name) {
        let value = value.to_str().ok()?;
        match &mut joined {
            Some(s) => {
                s.push(',');
                s.push_str(value);
            }
            None => joined = Some(value.to_owned()),
        }
    }
    joined
}

/// `for="1.2.3.4:5"` / `for="[::1]:5"` (RFC 7239 requires the quotes once a port is present),
/// then `;host="<host>"` when given (quoted: a host is a token only when it has no `:`).
pub(crate) fn format_forwarded(client: Option<SocketAddr>, host: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(client) = client {
        let _ = write!(out, "for=\"{client}\"");
    }
    if let Some(host) = host {
        if !out.is_empty() {
            out.push(';');
        }
        let escaped = host.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = write!(out, "host=\"{escaped}\"");
    }
    out
}

/// The `for=` parameter of the first element of a `forwarded` header, when it is an `ip:port`.
pub(crate) fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    forwarded_param(value, "for")?.parse().ok()
}

/// Parameter `name` of the first element of a `forwarded` header, unquoted.
pub(crate) fn forwarded_param(value: &str, name: &str) -> Option<String> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, val) = pair.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case(name) {
            return None;
        }
        let val = val.trim();
        Some(
            match val.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(quoted) => unquote(quoted),
                None => val.to_owned(),
            },
        )
    })
}

/// The content of an RFC 7230 quoted string: `\x` stands for `x`.
fn unquote(quoted: &str) -> String {
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip() {
        for addr in ["10.1.2.3:4567", "[2001:db8::1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(
                parse_forwarded_for(&format_forwarded(Some(addr), None)),
                Some(addr)
            );
        }
        assert_eq!(
            format_forwarded(Some("[::1]:9".parse().unwrap()), None),
            "for=\"[::1]:9\""
        );
        let both = format_forwarded(
            Some("10.0.0.1:5".parse().unwrap()),
            Some("web.shop.svc.cluster.local"),
        );
        assert_eq!(
            both,
            "for=\"10.0.0.1:5\";host=\"web.shop.svc.cluster.local\""
        );
        assert_eq!(
            forwarded_param(&both, "host").as_deref(),
            Some("web.shop.svc.cluster.local")
        );
        assert_eq!(
            parse_forwarded_for(&both),
            Some("10.0.0.1:5".parse().unwrap())
        );
        let odd = format_forwarded(None, Some("a\"b\\c"));
        assert_eq!(forwarded_param(&odd, "host").as_deref(), Some("a\"b\\c"));
        assert_eq!(
            forwarded_param("for=1.2.3.4:5;host=x.y", "host").as_deref(),
            Some("x.y")
        );
    }

    #[test]
    fn forwarded_tolerates_other_forms() {
        assert_eq!(
            parse_forwarded_for("proto=https; For=\"1.2.3.4:5\";by=x, for=\"9.9.9.9:9\""),
            Some("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("for=1.2.3.4:5"),
            Some("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=1.2.3.4"), None);
        assert_eq!(parse_forwarded_for("for=_hidden"), None);
        assert_eq!(parse_forwarded_for("garbage"), None);
        assert_eq!(parse_forwarded_for(""), None);
        assert_eq!(parse_forwarded_for("for=\"[::1]:5"), None);
    }

    #[test]
    fn authority_must_be_ip_and_port() {
        let ok = |s: &str| parse_authority(&Uri::try_from(s).unwrap());
        assert_eq!(ok("10.0.0.1:80"), Some("10.0.0.1:80".parse().unwrap()));
        assert_eq!(
            ok("[fd00::1]:8080"),
            Some("[fd00::1]:8080".parse().unwrap())
        );
        assert_eq!(ok("example.com:80"), None);
        assert_eq!(ok("10.0.0.1"), None);
        assert_eq!(ok("http://10.0.0.1:80/x"), None);
    }

    #[test]
    fn outbound_request_shape() {
        let req = OutboundRequest::new("[fd00::7]:15008".parse().unwrap())
            .with_forwarded_for("10.0.0.9:3333".parse().unwrap())
            .with_baggage("k8s.namespace.name=a,k8s.pod.name=b")
            .with_header(TRACEPARENT, HeaderValue::from_static("00-abc-def-01"))
            .to_http()
            .unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "[fd00::7]:15008");
        assert!(req.uri().scheme().is_none());
        assert_eq!(req.headers()[FORWARDED], "for=\"10.0.0.9:3333\"");
        assert_eq!(
            req.headers()[BAGGAGE],
            "k8s.namespace.name=a,k8s.pod.name=b"
        );
        assert_eq!(req.headers()[TRACEPARENT], "00-abc-def-01");

        let bad = OutboundRequest::new("1.1.1.1:1".parse().unwrap()).with_baggage("a\nb");
        assert!(matches!(
            bad.to_http(),
            Err(HboneError::InvalidHeader {
                name: "baggage",
                ..
            })
        ));
    }

    #[test]
    fn inbound_joins_repeated_baggage() {
        let mut headers = HeaderMap::new();
        headers.append(BAGGAGE, HeaderValue::from_static("a=1"));
        headers.append(BAGGAGE, HeaderValue::from_static("b=2"));
        headers.insert(FORWARDED, HeaderValue::from_static("nonsense"));
        let req = InboundRequest::parse(&Uri::from_static("1.2.3.4:5"), headers).unwrap();
        assert_eq!(req.baggage.as_deref(), Some("a=1,b=2"));
        assert_eq!(req.forwarded_for, None);
    }
}
