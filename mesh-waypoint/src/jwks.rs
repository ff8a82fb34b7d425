//! The key sets of the `RequestAuthentication` rules with `jwksUri`, fetched by the waypoint
//! (in Istio, istiod fetches them and hands them to its Envoy waypoints inline).
//!
//! For every `jwksUri` of the rules this waypoint may apply
//! ([`ClusterState::key_sources_at_waypoint`]), and for every issuer of a rule with neither
//! `jwks` nor `jwksUri` first its OpenID discovery document
//! (`<issuer>/.well-known/openid-configuration`, as istiod reads it) and then the set its
//! `jwks_uri` names, a `GET` over HTTP or HTTPS (the server's
//! certificate checked against the Mozilla roots), within the rule's `timeout` (5 s by
//! default, Istio's), a body of at most [`MAX_BODY`] that must be a JSON Web Key Set. A set is
//! fetched again every [`REFRESH`] (Istio's default refresh interval); a failed fetch is
//! retried after 1 s, doubling up to a minute, and the last good set stays in use meanwhile.
//! Until a rule's set has been fetched once, its tokens are refused ("Jwks remote fetch is
//! failed"): it fails closed. Requests without a token are not affected.
//!
//! **Where it does not go.** A `RequestAuthentication` is a tenant's object, and the waypoint
//! (outside the capture, under its own identity) fetches what it names: a tenant could point it
//! at addresses its own pods may not reach. The waypoint refuses key sets on loopback,
//! link-local (the cloud metadata endpoint, `169.254.169.254`), unspecified and multicast
//! addresses, by every address the host resolves to. Its answer never reaches the tenant (only
//! whether its tokens pass), and cluster addresses stay allowed (an in-cluster issuer).

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use mesh_cluster::{
    authn::{FetchedKeys, KeySource},
    ClusterState,
};
use tokio::{net::TcpStream, sync::watch, time::Instant};
use tracing::{info, warn};

/// How often a fetched set is fetched again (Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
const REFRESH: Duration = Duration::from_secs(20 * 60);
/// A fetch's timeout when the rule gives none (Istio's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first and the longest pause before a failed fetch is tried again.
const RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// The largest key set read.
const MAX_BODY: usize = 1 << 20;

/// Why a key set could not be fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    #[error("not an http or https URL with a host")]
    Url,
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("resolving {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error(
        "{host} is only at loopback, link-local, unspecified or multicast addresses ({addrs}): \
         the waypoint does not fetch key sets from itself, its node or the metadata endpoint"
    )]
    Forbidden { host: String, addrs: String },
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the request: {0}")]
    Request(#[from] http::Error),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("reading the body (at most {MAX_BODY} bytes): {0}")]
    Body(String),
    #[error("{0}")]
    Keys(#[from] mesh_cluster::jwks::JwksError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("not an OpenID discovery document with a `jwks_uri`: {0}")]
    Discovery(String),
}

/// The fetched sets, by URI, as requests read them.
#[derive(Debug, Default)]
pub(crate) struct JwksCache {
    fetched: RwLock<Arc<FetchedKeys>>,
}

impl JwksCache {
    /// The sets fetched so far.
    pub(crate) fn fetched(&self) -> Arc<FetchedKeys> {
        Arc::clone(
            &self
                .fetched
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn publish(&self, keys: FetchedKeys) {
        *self
            .fetched
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
    }
}

/// When a URI is to be fetched next, and how long to wait after a failure.
struct Due {
    at: Instant,
    backoff: Duration,
}

/// Keeps `cache` holding the sets of the rules that waypoint `namespace/name` may apply, as the
/// cluster view (`state`) changes. Runs until the view's sender is gone.
pub(crate) async fn keep_fetched(
    cache: Arc<JwksCache>,
    waypoint: (String, String),
    mut state: watch::Receiver<Arc<ClusterState>>,
) {
    let mut due: HashMap<KeySource, Due> = HashMap::new();
    loop {
        let wanted = state
            .borrow_and_update()
            .key_sources_at_waypoint((&waypoint.0, &waypoint.1));
        let mut keys: FetchedKeys = (*cache.fetched()).clone();
        keys.retain(|url, _| wanted.iter().any(|(s, _)| s.url() == url));
        due.retain(|source, _| wanted.iter().any(|(s, _)| s == source));
        let now = Instant::now();
        for (source, timeout) in &wanted {
            let entry = due.entry(source.clone()).or_insert(Due {
                at: now,
                backoff: RETRY.0,
            });
            if entry.at > now {
                continue;
            }
            let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
            match fetch(source, timeout).await {
                Ok(set) => {
                    info!(?source, keys = set.len(), "fetched a JSON Web Key Set");
                    keys.insert(source.url().to_owned(), set.into());
                    *entry = Due {
                        at: Instant::now() + REFRESH,
                        backoff: RETRY.0,
                    };
                }
                Err(error) => {
                    warn!(
                        ?source,
                        %error,
                        retry_in = ?entry.backoff,
                        kept = keys.contains_key(source.url()),
                        "cannot fetch a JSON Web Key Set: its tokens are refused until it is \
                         (a set fetched before stays in use)"
                    );
                    entry.at = Instant::now() + entry.backoff;
                    entry.backoff = (entry.backoff * 2).min(RETRY.1);
                }
            }
        }
        cache.publish(keys);
        let next = due.values().map(|d| d.at).min();
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = sleep_until(next) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Which addresses a fetch may go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// Not loopback, link-local, unspecified or multicast ones (the waypoint's).
    Remote,
    /// Loopback too (the unit tests' servers).
    #[cfg(test)]
    Loopback,
}

impl Reach {
    fn allows(self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        let link_local = match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        let local = ip.is_unspecified() || ip.is_multicast() || link_local;
        match self {
            Reach::Remote => !local && !ip.is_loopback(),
            #[cfg(test)]
            Reach::Loopback => !local,
        }
    }
}

/// Fetches and reads the key set `source` names.
async fn fetch(
    source: &KeySource,
    timeout: Duration,
) -> Result<Vec<mesh_cluster::jwks::JwtKey>, JwksError> {
    fetch_within(source, timeout, Reach::Remote).await
}

/// The set at `source`, each `GET` within `timeout`: a `jwksUri`'s, or the one at the
/// `jwks_uri` of an issuer's discovery document (which must be an http or https URL, fetched
/// with the same care).
async fn fetch_within(
    source: &KeySource,
    timeout: Duration,
    reach: Reach,
) -> Result<Vec<mesh_cluster::jwks::JwtKey>, JwksError> {
    let get = |uri: String| async move {
        tokio::time::timeout(timeout, get(&uri, reach))
            .await
            .map_err(|_| JwksError::Timeout(timeout))?
    };
    let uri = match source {
        KeySource::Uri(uri) => uri.clone(),
        KeySource::Discovery(document) => {
            let body = get(document.clone()).await?;
            let discovered: Discovery =
                serde_json::from_slice(&body).map_err(|e| JwksError::Discovery(e.to_string()))?;
            discovered.jwks_uri
        }
    };
    let body = get(uri).await?;
    let text = String::from_utf8_lossy(&body);
    Ok(mesh_cluster::jwks::parse_jwks(&text)?)
}

/// What the waypoint reads of an OpenID discovery document.
#[derive(serde::Deserialize)]
struct Discovery {
    jwks_uri: String,
}

async fn get(uri: &str, reach: Reach) -> Result<Bytes, JwksError> {
    let parsed: http::Uri = uri.parse().map_err(|_| JwksError::Url)?;
    let host = parsed.host().ok_or(JwksError::Url)?.to_owned();
    let tls = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(JwksError::Url),
    };
    let port = parsed.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|source| JwksError::Resolve {
            host: host.clone(),
            source,
        })?
        .collect();
    let allowed: Vec<std::net::SocketAddr> = resolved
        .iter()
        .copied()
        .filter(|a| reach.allows(a.ip()))
        .collect();
    if allowed.is_empty() {
        let addrs: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
        return Err(JwksError::Forbidden {
            host,
            addrs: addrs.join(", "),
        });
    }
    let stream = TcpStream::connect(&allowed[..])
        .await
        .map_err(JwksError::Connect)?;
    let authority = parsed
        .authority()
        .map_or_else(|| host.clone(), ToString::to_string);
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let response = if tls {
        let name =
            rustls::pki_types::ServerName::try_from(bare.to_owned()).map_err(|_| JwksError::Url)?;
        let stream = tls_connector()
            .connect(name, stream)
            .await
            .map_err(JwksError::Tls)?;
        send(stream, request).await?
    } else {
        send(stream, request).await?
    };
    if response.status() != http::StatusCode::OK {
        return Err(JwksError::Status(response.status()));
    }
    Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| JwksError::Body(e.to_string()))
}

async fn send<S>(
    stream: S,
    request: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, JwksError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(request).await?)
}

/// TLS toward key-set servers: the Mozilla roots, as a browser would check them.
fn tls_connector() -> tokio_rustls::TlsConnector {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("aws-lc-rs supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[cfg(test)]
mod tests {
    //! The fetcher against real local servers: a key set served over HTTP, and every way a
    //! server can fail it (a status, garbage, too much, silence, an untrusted certificate).

    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use mesh_cluster::authn::KeySource;

    use super::{fetch, fetch_within, JwksError, Reach, MAX_BODY};

    fn at(uri: &str) -> KeySource {
        KeySource::Uri(uri.to_owned())
    }

    const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": "WmuLj1s4rSYpKgUUoqmKT1jLWS8U0qHsc7cmXs4nJQ4", "y": "RNh5kTV1HSLbS1gmv3DpGDjmgHr58xoKwJDAe9059nw"}]}"#;

    /// Serves one answer of `status` and `body` to every connection on a loopback port; with
    /// `silent`, reads the request and answers nothing.
    async fn serve(status: &'static str, body: Arc<Vec<u8>>, silent: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let body = Arc::clone(&body);
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = tcp.read(&mut request).await;
                    if silent {
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                        return;
                    }
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n",
                        body.len()
                    );
                    let _ = tcp.write_all(head.as_bytes()).await;
                    let _ = tcp.write_all(&body).await;
                });
            }
        });
        format!("http://{addr}/keys.json")
    }

    fn short() -> std::time::Duration {
        std::time::Duration::from_millis(500)
    }

    #[tokio::test]
    async fn a_key_set_served_over_http_is_read() {
        let uri = serve("200 OK", Arc::new(JWKS.as_bytes().to_vec()), false).await;
        let keys = fetch_within(&at(&uri), short(), Reach::Loopback)
            .await
            .expect("fetched");
        assert_eq!(keys.len(), 1);
    }

    #[tokio::test]
    async fn an_issuers_discovery_document_names_its_key_set() {
        let keys = serve("200 OK", Arc::new(JWKS.as_bytes().to_vec()), false).await;
        let document = |jwks_uri: &str| {
            let body = format!(r#"{{"issuer": "https://idp.example", "jwks_uri": "{jwks_uri}"}}"#);
            Arc::new(body.into_bytes())
        };
        let discovery = serve("200 OK", document(&keys), false).await;
        let fetched = fetch_within(&KeySource::Discovery(discovery), short(), Reach::Loopback)
            .await
            .expect("the document, then its set");
        assert_eq!(fetched.len(), 1);
        // A document that names no set, or sends the waypoint where it does not go.
        let garbage = serve("200 OK", Arc::new(b"{\"issuer\": \"x\"}".to_vec()), false).await;
        let metadata = serve("200 OK", document("http://169.254.169.254/latest/"), false).await;
        for (uri, expected) in [
            (
                garbage,
                "not an OpenID discovery document with a `jwks_uri`",
            ),
            (metadata, "is only at loopback, link-local"),
        ] {
            let error = fetch_within(&KeySource::Discovery(uri.clone()), short(), Reach::Loopback)
                .await
                .expect_err(&uri)
                .to_string();
            assert!(error.contains(expected), "{expected:?} in {error:?}");
        }
    }

    #[tokio::test]
    async fn every_failure_is_named() {
        let not_found = serve("404 Not Found", Arc::new(b"no".to_vec()), false).await;
        let garbage = serve("200 OK", Arc::new(b"<html>".to_vec()), false).await;
        let huge = serve("200 OK", Arc::new(vec![b' '; MAX_BODY + 1]), false).await;
        let silent = serve("200 OK", Arc::new(Vec::new()), true).await;
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            format!("http://{addr}/k")
        };
        for (uri, expected) in [
            (not_found, "answered 404 Not Found"),
            (garbage, "not a JSON Web Key Set"),
            (huge, "reading the body (at most 1048576 bytes)"),
            (silent, "no answer within 500ms"),
            (closed, "connecting: Connection refused"),
            ("ftp://example.com/k".to_owned(), "not an http or https URL"),
        ] {
            let error = fetch_within(&at(&uri), short(), Reach::Loopback)
                .await
                .expect_err(&uri)
                .to_string();
            assert!(error.contains(expected), "{expected:?} in {error:?}");
        }
    }

    #[tokio::test]
    async fn an_https_server_must_have_a_certificate_the_roots_trust() {
        // A self-signed certificate for `localhost`: no root trusts it, so the set is not
        // fetched (and its issuer's tokens stay refused).
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let uri = format!("https://localhost:{port}/keys.json");
        let error = fetch_within(&at(&uri), short(), Reach::Loopback)
            .await
            .expect_err("an untrusted certificate");
        assert!(matches!(error, JwksError::Tls(_)), "{error}");
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    }

    #[tokio::test]
    async fn loopback_link_local_and_metadata_addresses_are_refused() {
        let served = serve("200 OK", Arc::new(JWKS.as_bytes().to_vec()), false).await;
        for uri in [
            served.as_str(),
            "http://localhost:9/keys",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]:80/k",
            "http://0.0.0.0/k",
            "http://[::ffff:127.0.0.1]/k",
        ] {
            let error = fetch(&at(uri), short()).await.expect_err(uri);
            assert!(
                matches!(error, JwksError::Forbidden { .. }),
                "{uri}: {error}"
            );
        }
    }
}
