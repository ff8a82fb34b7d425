//! The cluster view the waypoints read, served by the controller as istiod serves its
//! waypoints their configuration: a waypoint's own account may then read nothing of the API
//! server. Any pod of a waypoint's namespace can run under that account, so a read right of
//! the account's (every Pod of the cluster, with its environment) would be its namespace's.
//!
//! - **What is served**: the Kubernetes API's `list` and `watch` of the kinds a waypoint reads
//!   ([`KINDS`], cluster-wide collections only), forwarded to the API server with the
//!   controller's own client. Pods are cut to the fields the model reads (no environment,
//!   volumes, images or commands) and Nodes to their name and locality labels
//!   ([`mesh_cluster::view_object`]); everything else is refused (`403`), and only `GET`.
//! - **Who is served**: a client sends its projected service-account token (audience
//!   `istio-ca`, the one it sends the CA), checked by a `TokenReview`; the account must be a
//!   waypoint's: a `Gateway` of class `istio-waypoint` of that name in its namespace. The
//!   review answers for its token for a minute ([`reviews`]: a waypoint opens a watch per kind
//!   at once); the `Gateway` is read at every request, so a `Gateway` deleted stops its
//!   account's next watch.
//! - **Over** TLS 1.3 with the controller's own certificate from the mesh's CA (its SPIFFE id,
//!   which the waypoints expect: [`mesh_identity::https_server_config`]).

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{
    api::{Api, DynamicObject, PostParams},
    Client,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::{rustls::ServerConfig, TlsAcceptor};
use tracing::{debug, info, info_span, warn, Instrument as _};

use crate::{desired::WaypointGateway, resources::gateway_resource};

mod cut;
mod reviews;

use cut::{full, BoxError, ViewBody};
use reviews::{Account, Reviews};

/// The kinds a waypoint reads, by API group (the chart's `mesh-waypoint` role): the only
/// collections served.
pub const KINDS: [(&str, &[&str]); 5] = [
    ("", &["namespaces", "pods", "services", "nodes"]),
    ("discovery.k8s.io", &["endpointslices"]),
    (
        "security.istio.io",
        &[
            "peerauthentications",
            "authorizationpolicies",
            "requestauthentications",
        ],
    ),
    (
        "gateway.networking.k8s.io",
        &[
            "gateways",
            "httproutes",
            "grpcroutes",
            "tcproutes",
            "tlsroutes",
            "referencegrants",
        ],
    ),
    (
        "networking.istio.io",
        &[
            "virtualservices",
            "destinationrules",
            "envoyfilters",
            "serviceentries",
        ],
    ),
];

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 1024;
/// How long a TLS handshake, and a request's head, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request is not served, each answered as the API server answers (a `Status`).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not a `GET`.
    #[error("the view is read-only: {0} is not served")]
    Method(Method),
    /// Not a collection of [`KINDS`] (cluster-wide).
    #[error(
        "{0} is not served: only the cluster-wide list and watch of the kinds a waypoint reads"
    )]
    Path(String),
    /// No bearer token.
    #[error("no bearer token: send the waypoint's service-account token (audience {0})")]
    NoToken(String),
    /// The `TokenReview` did not authenticate the token.
    #[error("the token is not valid: {0}")]
    BadToken(String),
    /// The token is not a service account's.
    #[error("{0} is not a service account")]
    NotAnAccount(String),
    /// The account is not a waypoint's.
    #[error("service account {namespace}/{name} is not a waypoint's (no Gateway of class istio-waypoint named {name} in {namespace})")]
    NotAWaypoint {
        /// The account's namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The API server could not be asked.
    #[error("{what}: {source}")]
    Api {
        /// What was asked.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The API server's answer could not be cut down.
    #[error("the API server's answer to {path}: {reason}")]
    Answer {
        /// The path asked.
        path: String,
        /// What is wrong with the answer.
        reason: String,
    },
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Path(_) | Self::NotAWaypoint { .. } | Self::NotAnAccount(_) => {
                StatusCode::FORBIDDEN
            }
            Self::NoToken(_) | Self::BadToken(_) => StatusCode::UNAUTHORIZED,
            Self::Api { .. } | Self::Answer { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The refusal as the API server words one (`kind: Status`), which clients show.
    fn response(&self) -> Response<ViewBody> {
        let status = self.status();
        let reason = match status {
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
            _ => "InternalError",
        };
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.to_string(), "reason": reason, "code": status.as_u16(),
        });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// What the view needs: the controller's client, the audience of the tokens it takes, and
/// the tokens it has reviewed lately.
#[derive(Clone)]
pub struct View {
    client: Client,
    audience: String,
    reviews: Arc<Reviews>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl View {
    /// A view reading with `client`, taking tokens of `audience`.
    pub fn new(client: Client, audience: impl Into<String>) -> Self {
        Self {
            client,
            audience: audience.into(),
            reviews: Arc::default(),
        }
    }
}

/// Serves `view` on `listener` over `tls` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, view: View) {
    info!(
        listen = ?listener.local_addr().ok(),
        "serving the waypoints their cluster view"
    );
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accepting a view connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            warn!(%peer, max = MAX_CONNECTIONS, "too many view connections; closing this one");
            continue;
        };
        let (acceptor, view) = (acceptor.clone(), view.clone());
        tokio::spawn(
            async move {
                connection(tcp, acceptor, view).await;
                drop(slot);
            }
            .instrument(info_span!("view", %peer)),
        );
    }
}

async fn connection(tcp: tokio::net::TcpStream, acceptor: TlsAcceptor, view: View) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request| {
        let view = view.clone();
        async move { Ok::<_, Infallible>(answer(&view, request).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        debug!(error = %e, "view connection ended");
    }
}

/// One request: authenticated, checked, forwarded, cut down; or refused, saying why.
async fn answer(view: &View, request: Request<Incoming>) -> Response<ViewBody> {
    let path = request.uri().path().to_owned();
    match forward(view, &request).await {
        Ok(response) => response,
        Err(refusal) => {
            warn!(%path, error = %refusal, "view request refused");
            refusal.response()
        }
    }
}

async fn forward(view: &View, request: &Request<Incoming>) -> Result<Response<ViewBody>, Refusal> {
    if request.method() != Method::GET {
        return Err(Refusal::Method(request.method().clone()));
    }
    let path = request.uri().path();
    let plural = collection(path).ok_or_else(|| Refusal::Path(path.to_owned()))?;
    let account = authenticate(view, request).await?;
    waypoint_account(&view.client, &account).await?;
    let query = request.uri().query().unwrap_or_default();
    let watch = query
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    let target = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    // Full objects, as JSON, for the kinds cut down; a metadata-only form for the others only
    // as asked (a waypoint watches Nodes so, and that form is already cut).
    let accept = match request.headers().get(header::ACCEPT) {
        Some(asked) if asked.to_str().is_ok_and(is_metadata_form) && plural == "nodes" => {
            asked.clone()
        }
        _ => HeaderValue::from_static("application/json"),
    };
    let upstream = Request::get(&target)
        .header(header::ACCEPT, accept)
        .body(kube::client::Body::empty())
        .map_err(|e| Refusal::Answer {
            path: target.clone(),
            reason: e.to_string(),
        })?;
    let response = view
        .client
        .send(upstream)
        .await
        .map_err(|source| Refusal::Api {
            what: format!("GET {target}"),
            source,
        })?;
    debug!(%account, %target, status = %response.status(), "view request forwarded");
    let (mut parts, body) = response.into_parts();
    let content_type = parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.clear();
    if let Some(content_type) = content_type {
        parts.headers.insert(header::CONTENT_TYPE, content_type);
    }
    let cut = parts.status.is_success() && matches!(plural, "pods" | "nodes");
    let body = if !cut {
        body.map_err(BoxError::from).boxed_unsync()
    } else if watch {
        cut::watch_events(body, plural)
    } else {
        cut::list(body, plural)
            .await
            .map_err(|reason| Refusal::Answer {
                path: target.clone(),
                reason,
            })?
    };
    Ok(Response::from_parts(parts, body))
}

/// `application/json;as=PartialObjectMetadata…`: the API server's metadata-only form.
fn is_metadata_form(accept: &str) -> bool {
    accept.contains("as=PartialObjectMetadata")
}

/// The plural of the collection `path` names, if it is one of [`KINDS`], cluster-wide:
/// `/api/v1/<plural>` or `/apis/<group>/<version>/<plural>`.
pub fn collection(path: &str) -> Option<&'static str> {
    let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let (group, version, plural) = match parts.as_slice() {
        ["api", "v1", plural] => ("", "v1", *plural),
        ["apis", group, version, plural] => (*group, *version, *plural),
        _ => return None,
    };
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    KINDS
        .iter()
        .find(|(g, _)| *g == group)
        .and_then(|(_, plurals)| plurals.iter().find(|known| **known == plural))
        .copied()
}

/// The service account whose token the request carries (`namespace`, `name`), by a
/// `TokenReview` for the view's audience (or a recent one of the same token).
async fn authenticate(view: &View, request: &Request<Incoming>) -> Result<Account, Refusal> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Refusal::NoToken(view.audience.clone()))?;
    if let Some(account) = view.reviews.get(token, Instant::now()) {
        return Ok(account);
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_owned(),
            audiences: Some(vec![view.audience.clone()]),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(view.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|source| Refusal::Api {
            what: "reviewing a token".into(),
            source,
        })?;
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(Refusal::BadToken(
            status
                .error
                .unwrap_or_else(|| "not authenticated".to_owned()),
        ));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let account = Account::of_username(&username).ok_or(Refusal::NotAnAccount(username))?;
    view.reviews.put(token, account.clone(), Instant::now());
    Ok(account)
}

/// Whether `account` is a waypoint's: the `Gateway` of its name in its namespace is of class
/// `istio-waypoint` (a waypoint's pods run under its Gateway's name).
async fn waypoint_account(client: &Client, account: &Account) -> Result<(), Refusal> {
    let Account { namespace, name } = account;
    let gateway =
        Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &gateway_resource())
            .get_opt(name)
            .await
            .map_err(|source| Refusal::Api {
                what: format!("reading Gateway {namespace}/{name}"),
                source,
            })?;
    let waypoint = gateway
        .and_then(|g| serde_json::to_value(g).ok())
        .is_some_and(|g| WaypointGateway::of(&g).is_ok());
    if waypoint {
        Ok(())
    } else {
        Err(Refusal::NotAWaypoint {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_cluster_wide_collections_a_waypoint_reads_are_served() {
        assert_eq!(collection("/api/v1/pods"), Some("pods"));
        assert_eq!(collection("/api/v1/nodes"), Some("nodes"));
        assert_eq!(
            collection("/apis/gateway.networking.k8s.io/v1alpha2/tcproutes"),
            Some("tcproutes")
        );
        assert_eq!(
            collection("/apis/networking.istio.io/v1/serviceentries"),
            Some("serviceentries")
        );
        for refused in [
            "/api/v1/secrets",
            "/api/v1/configmaps",
            "/api/v1/namespaces/shop/pods",
            "/api/v1/namespaces/shop/pods/web-1",
            "/api/v1/pods/x",
            "/api/v2/pods",
            "/apis/apps/v1/deployments",
            "/apis/discovery.k8s.io/v1/pods",
            "/apis/security.istio.io/v1/../../api/v1/secrets",
            "/apis/security.istio.io/v%31/authorizationpolicies",
            "/api",
            "/apis",
            "",
            "api/v1/pods",
        ] {
            assert_eq!(collection(refused), None, "{refused}");
        }
    }
}
