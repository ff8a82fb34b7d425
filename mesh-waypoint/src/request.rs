//! One HTTP request at the waypoint: routed by the newest cluster view, filtered, sent to an
//! endpoint of the chosen backend (with the rule's timeouts and retries), answered.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use mesh_cluster::{
    http_route::{Backend, EndpointPolicy, RequestFacts, ResolvedRule},
    k8s::{Abort, Filter, HeaderModifier, RouteMatch},
    Authenticated, AuthzDecision, ClusterState, HttpFacts, JwtRefusal, RouteDecision, Service,
    TokenSource, Verdict, WaypointFacts,
};
use mesh_identity::Identity;
use mesh_trace::{TraceContext, TRACEPARENT};
use tracing::{debug, debug_span, warn, Instrument};

use crate::body::Body;
use crate::{
    balance::{Answer, Keys},
    body::full,
    breaker::Overflow,
    context::Ctx,
    cors::Cors,
    filters::{modify_headers, redirect_location, replace_path, request_authority},
    grpc_reply::{for_grpc, GrpcCode, LocalReply},
    ratelimit::Limited,
    telemetry::{Counted, Flag, Outcome, Recorded, RequestLog},
    upgrade::{splice, strip_hop_by_hop, strip_hop_by_hop_keeping_upgrade, UpgradeAsk},
    upstream::UpstreamError,
};

/// Largest request body kept so that the request can be retried or mirrored; a larger one is
/// sent once, to the chosen backend only.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Retries when a rule's `retry` gives no `attempts` (Istio's default for its waypoints).
const DEFAULT_RETRIES: u32 = 2;

/// What a tunnel to the waypoint was opened for.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// A Service bound to this waypoint, by hostname (looked up again in each request's view),
    /// its port and what the port carries.
    Service {
        hostname: String,
        port: u16,
        protocol: mesh_cluster::AppProtocol,
        /// The VIP and port the client dialled.
        vip: SocketAddr,
    },
    /// A pod bound to this waypoint, at its address and port.
    Workload { addr: SocketAddr },
}

/// Why a tunnel is not for this waypoint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotOurs {
    #[error("{0} is neither a Service port nor a pod the cluster view knows")]
    Unknown(SocketAddr),
    #[error("{target} does not use waypoint {waypoint}")]
    OtherWaypoint { target: String, waypoint: String },
}

impl Target {
    /// What `authority` is for this waypoint (`namespace/name`), for a client of
    /// `client_namespace` (a `ServiceEntry`'s address is only its scope's).
    pub(crate) fn of(
        state: &ClusterState,
        (namespace, name): (&str, &str),
        (client_namespace, authority): (&str, SocketAddr),
    ) -> Result<Self, NotOurs> {
        let ours = |binding: &mesh_cluster::WaypointBinding| match binding {
            mesh_cluster::WaypointBinding::Bound(w) => w.namespace == namespace && w.name == name,
            _ => false,
        };
        let other = |target: String| NotOurs::OtherWaypoint {
            target,
            waypoint: format!("{namespace}/{name}"),
        };
        if let Some((service, port)) = state.service_for_client(client_namespace, authority) {
            if !ours(state.service_waypoint(service)) {
                return Err(other(format!("{} {service}", service.kind_name())));
            }
            return Ok(Target::Service {
                hostname: service.hostname.clone(),
                port: port.port,
                protocol: state.waypoint_protocol(service, port),
                vip: authority,
            });
        }
        if let Some(workload) = state.workload_by_ip(authority.ip()) {
            if !ours(state.workload_waypoint(workload)) {
                return Err(other(format!("Pod {workload}")));
            }
            return Ok(Target::Workload { addr: authority });
        }
        Err(NotOurs::Unknown(authority))
    }

    /// The address the client dialled.
    pub(crate) fn dialled(&self) -> SocketAddr {
        match self {
            Target::Service { vip, .. } => *vip,
            Target::Workload { addr } => *addr,
        }
    }
}

/// The `AuthorizationPolicies` of waypoint `ctx` on a request (`http`) or a TCP tunnel
/// (`None`) to `target` (`addressed`: its Service, when it is one) from `source`.
pub(crate) fn authorize(
    ctx: &Ctx,
    state: &ClusterState,
    (target, addressed): (&Target, Option<&Service>),
    source: &Source,
    http: Option<HttpFacts<'_>>,
) -> AuthzDecision {
    let facts = WaypointFacts {
        src_ip: source.addr.ip(),
        src_identity: &source.identity,
        dst: target.dialled(),
        http,
    };
    let waypoint = (ctx.config.namespace.as_str(), ctx.config.name.as_str());
    state.authorize_at_waypoint(waypoint, addressed, &facts)
}

/// What the policies make of a request: its verified tokens' header edits, or the waypoint's
/// answer (401, 403); and what the access log says of it.
struct Admitted {
    outcome: Admission,
    note: Option<String>,
}

/// Whether a request goes on.
enum Admission {
    /// On, with these header edits, and these headers for its response (`x-ratelimit-*`).
    Pass(Authenticated, HeaderMap),
    /// Answered by the waypoint.
    Answer(Response<Body>),
}

/// The waypoint's `RequestAuthentications`, then its `AuthorizationPolicies`, then its local
/// rate limits, on `request`.
fn admit<B>(
    ctx: &Ctx,
    state: &ClusterState,
    (target, addressed): (&Target, Option<&Service>),
    source: &Source,
    request: &Request<B>,
    log: &RequestLog,
) -> Admitted {
    let authenticated = match authenticate(ctx, state, (target, addressed), request) {
        Ok(authenticated) => authenticated,
        Err(refusal) => {
            return Admitted {
                outcome: Admission::Answer(unauthenticated(
                    refusal,
                    log.authority(),
                    request.uri().path(),
                )),
                note: Some(format!("token refused: {refusal}")),
            }
        }
    };
    let uri = request.uri();
    let http = HttpFacts {
        method: request.method().as_str(),
        authority: log.authority(),
        path: uri.path(),
        path_and_query: uri.path_and_query().map_or("/", PathAndQuery::as_str),
        headers: request.headers(),
        jwt: authenticated.jwt.as_deref(),
    };
    let decision = authorize(ctx, state, (target, addressed), source, Some(http));
    let note = authz_note(&decision);
    if decision.verdict == Verdict::Deny {
        let denied = local(StatusCode::FORBIDDEN, Flag::None, "RBAC: access denied");
        return Admitted {
            outcome: Admission::Answer(denied),
            note,
        };
    }
    let waypoint = (ctx.config.namespace.as_str(), ctx.config.name.as_str());
    let limits = state.rate_limits_at_waypoint(waypoint, addressed, target.dialled());
    let buckets = (&ctx.buckets, &*source.buckets);
    let mut note = note;
    let outcome = match crate::ratelimit::check(&limits, buckets, Instant::now()) {
        Limited::Pass(headers) => Admission::Pass(authenticated, headers),
        Limited::Refused { limit, headers } => {
            note = Some(format!("rate limited by {}", limit.policy));
            let mut refused = local(
                crate::ratelimit::status(&limit),
                Flag::RateLimited,
                "local_rate_limited",
            );
            refused.headers_mut().extend(headers);
            if limit.resource_exhausted {
                refused.extensions_mut().insert(GrpcCode(8));
            }
            Admission::Answer(refused)
        }
    };
    Admitted { outcome, note }
}

/// The tokens of `request` to waypoint `ctx` for `target` (`addressed`: its Service, when it is
/// one), checked against the `RequestAuthentications` that apply.
fn authenticate<B>(
    ctx: &Ctx,
    state: &ClusterState,
    (target, addressed): (&Target, Option<&Service>),
    request: &Request<B>,
) -> Result<Authenticated, JwtRefusal> {
    let waypoint = (ctx.config.namespace.as_str(), ctx.config.name.as_str());
    let rules = state.jwt_rules_at_waypoint(waypoint, addressed, target.dialled().ip());
    let source = TokenSource {
        headers: request.headers(),
        query: request.uri().query(),
    };
    mesh_cluster::authn::authenticate(&rules, &source, (&ctx.jwks.fetched(), &ctx.verified_tokens))
}

/// The request sent on: verified tokens' headers removed (unless forwarded), output headers
/// replaced by the verified tokens' payload and claims.
fn apply_authenticated(headers: &mut HeaderMap, authenticated: Authenticated) {
    for name in &authenticated.remove {
        headers.remove(name);
    }
    for (name, value) in authenticated.add {
        headers.append(name, value);
    }
}

/// The 401 of a refused token, as Envoy answers it.
fn unauthenticated(refusal: JwtRefusal, authority: &str, path: &str) -> Response<Body> {
    let mut response = local(StatusCode::UNAUTHORIZED, Flag::None, refusal.reason());
    let challenge = format!("Bearer realm=\"http://{authority}{path}\", error=\"invalid_token\"");
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// What the access log says of a decision that denied or audited; `None` otherwise.
pub(crate) fn authz_note(decision: &AuthzDecision) -> Option<String> {
    let audited = decision.audited.iter().map(|p| format!("audited by {p}"));
    let denied = (decision.verdict == Verdict::Deny).then(|| match &decision.policy {
        Some(policy) => format!("denied by {policy}"),
        None => "denied: no ALLOW policy matched".to_owned(),
    });
    let notes: Vec<String> = denied.into_iter().chain(audited).collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// Who sent the request.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    /// Its identity (from its certificate).
    pub(crate) identity: Identity,
    /// Its address, as its agent gave it.
    pub(crate) addr: SocketAddr,
    /// The trace context of the tunnel's CONNECT (the source agent's connection span).
    pub(crate) trace: Option<TraceContext>,
    /// The tunnel's own token buckets (limits with `local_rate_limit_per_downstream_connection`).
    pub(crate) buckets: Arc<crate::ratelimit::Buckets>,
    /// The waypoint's pod the tunnel came to (by its address), when the view has it: where
    /// the waypoint runs, for the Services that prefer close endpoints.
    pub(crate) own: Option<Arc<mesh_cluster::Workload>>,
    /// The address the client dialled (the tunnel's `:authority`): where a `ServiceEntry` of
    /// `resolution: NONE` sends it on.
    pub(crate) dialled: std::net::IpAddr,
}

/// Serves one request.
pub(crate) async fn handle(
    request: Request<Incoming>,
    ctx: Arc<Ctx>,
    target: Target,
    source: Source,
) -> Result<Response<Body>, Infallible> {
    // At debug, as the agent's span per connection: a span that the default level (info)
    // leaves out costs nothing, where one made and formatted at every request took about 4 %
    // of the waypoint's CPU time (BENCHMARKS.md, "The L7 waypoint").
    let span = debug_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        src = %source.identity,
    );
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    // Policies and routes read the normalized path, and the endpoint gets it (see `path`).
    let normalized = crate::path::normalize_uri(&mut parts.uri);
    // This request's span: the child of the request's own context (the application's trace),
    // else of the tunnel's, else a new trace; the endpoint sees this span as its parent.
    let parent = TraceContext::from_headers(&parts.headers).or(source.trace);
    let trace = TraceContext::child_or_root(parent.as_ref(), ctx.reporters.tracer.sampler());
    parts.headers.insert(TRACEPARENT, trace.header_value());
    // Envoy's request id: kept, or made up for a request without one.
    mesh_trace::ensure_request_id(&mut parts.headers);
    // One view of the cluster for the whole request.
    let state = Arc::clone(&ctx.state.borrow());
    let source_workload = state.workload_by_ip(source.addr.ip()).cloned();
    let read = Arc::new(AtomicU64::new(0));
    // The Service the tunnel was addressed to, looked up once: the route starts from it and the
    // record counts the waypoint's own answers under it.
    let addressed = match &target {
        Target::Service { hostname, .. } => state.service_by_hostname(hostname).cloned(),
        Target::Workload { .. } => None,
    };
    let mut log = RequestLog::start(
        &parts,
        (source.identity.clone(), source_workload),
        addressed.clone(),
        Arc::clone(&read),
        (trace, parent.map(|p| p.span_id)),
    );
    let grpc = log.is_grpc();
    let counted = Counted::new(body, read, log.request_messages());
    let mut request = Request::from_parts(parts, counted.boxed());
    // An HTTP/1.1 upgrade: WebSocket's bytes are spliced once both sides have switched; `h2c`
    // is served without it (`route` removes it with the other hop-by-hop headers); any other
    // is refused (see the `upgrade` module).
    let ask = UpgradeAsk::of(request.headers());
    let upgrading = (ask == UpgradeAsk::WebSocket).then(|| hyper::upgrade::on(&mut request));
    // The waypoint's `RequestAuthentications`, then its `AuthorizationPolicies`, before any
    // route, redirect or fault.
    let admitted = normalized.then(|| {
        let admitted = admit(
            &ctx,
            &state,
            (&target, addressed.as_deref()),
            &source,
            &request,
            &log,
        );
        if let Some(note) = &admitted.note {
            span.in_scope(|| debug!(authz = %note, "authentication and authorization"));
        }
        admitted
    });
    if let Some(note) = admitted.as_ref().and_then(|a| a.note.clone()) {
        log.authz(note);
    }
    let mut response = match admitted.map(|a| a.outcome) {
        None => local(StatusCode::BAD_REQUEST, Flag::None, "invalid path"),
        Some(Admission::Answer(answer)) => answer,
        Some(Admission::Pass(..)) if ask == UpgradeAsk::Refused => local(
            StatusCode::FORBIDDEN,
            Flag::None,
            "only WebSocket upgrades are allowed",
        ),
        Some(Admission::Pass(authenticated, limit_headers)) => {
            apply_authenticated(request.headers_mut(), authenticated);
            let mut response = route(
                request,
                &ctx,
                &state,
                (&target, addressed.as_ref()),
                &source,
            )
            .instrument(span.clone())
            .await;
            response.headers_mut().extend(limit_headers);
            response
        }
    };
    if grpc {
        response = for_grpc(response);
    }
    if let Some(downstream) = upgrading {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut response);
            let idle = ctx.upstream.idle_watch();
            tokio::spawn(splice(downstream, upstream, idle).instrument(span.clone()));
        }
    }
    span.in_scope(|| {
        debug!(
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_millis(),
            "request done"
        );
    });
    log.respond(&response);
    let reporters = Arc::clone(&ctx.reporters);
    Ok(Recorded::wrap(response, log, reporters).map(BodyExt::boxed))
}

/// Routes `request`, which came through a tunnel to `target` (the Service it names, as `handle`
/// looked it up: `None` when it is gone).
async fn route(
    mut request: Request<Body>,
    ctx: &Ctx,
    state: &ClusterState,
    (target, addressed): (&Target, Option<&Arc<Service>>),
    source: &Source,
) -> Response<Body> {
    crate::forwarded::append_forwarded_for(request.headers_mut(), source.addr.ip());
    let tell_client = state
        .waypoint(&ctx.config.namespace, &ctx.config.name)
        .is_some_and(|w| w.xfcc_client_identity);
    let client = tell_client.then_some((&ctx.config.identity, &source.identity));
    crate::forwarded::forward_client_cert(request.headers_mut(), client);
    strip_hop_by_hop_keeping_upgrade(request.headers_mut());
    let port = match target {
        Target::Workload { addr } => {
            let Some(workload) = state.workload_by_ip(addr.ip()) else {
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flag::NoHealthyUpstream,
                    "the pod is gone",
                );
            };
            let endpoint = mesh_cluster::Endpoint {
                addr: *addr,
                workload: Some(Arc::clone(workload)),
            };
            let host = workload.to_string();
            return match ctx
                .upstream
                .send(
                    &endpoint,
                    (*addr, &host),
                    source.addr,
                    request,
                    (None, None),
                )
                .await
            {
                Ok(mut response) => {
                    response.extensions_mut().insert(Outcome {
                        flag: Flag::None,
                        upstream: Some(*addr),
                        workload: endpoint.workload.clone(),
                        service: None,
                    });
                    response
                }
                Err(e) => upstream_failed(ctx, source, &e),
            };
        }
        Target::Service { port, .. } => *port,
    };
    let Some(service) = addressed else {
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            Flag::NoHealthyUpstream,
            "the Service is gone",
        );
    };
    let facts = RequestFacts {
        method: request.method(),
        path: request.uri().path(),
        query: request.uri().query(),
        headers: request.headers(),
        authority: request_authority(request.uri(), request.headers()),
        scheme: request.uri().scheme_str().unwrap_or("http"),
    };
    match state.route_http(service, port, source.identity.namespace(), &facts) {
        RouteDecision::Default => {
            let backend = state.default_backend(service, port);
            send(ctx, &backend, request, Plan::default(), source).await
        }
        RouteDecision::NoMatch => local(StatusCode::NOT_FOUND, Flag::NoRoute, "no route matches"),
        RouteDecision::Matched { rule, matched, .. } => {
            // CORS first, as Envoy's filter runs before the route's: a preflight it answers
            // goes nowhere; the marks go on whatever answer the rule gives (a redirect, a fault).
            let marks = match crate::cors::check(rule, &request) {
                Some(Cors::Answered(response)) => return response,
                Some(Cors::Mark(marks)) => Some(marks),
                None => None,
            };
            let mut response = matched_rule(ctx, rule, matched, request, port, source).await;
            if let Some(marks) = marks {
                crate::cors::mark(&mut response, &marks);
            }
            response
        }
    }
}

/// What a matched rule adds to sending a request.
#[derive(Default)]
struct Plan<'a> {
    response_headers: Vec<&'a HeaderModifier>,
    request_timeout: Option<Duration>,
    attempt_timeout: Option<Duration>,
    retry: Option<&'a mesh_cluster::k8s::Retry>,
    mirrors: Vec<(&'a Backend, u32, u32)>,
}

async fn matched_rule(
    ctx: &Ctx,
    rule: &ResolvedRule,
    matched: &RouteMatch,
    mut request: Request<Body>,
    port: u16,
    source: &Source,
) -> Response<Body> {
    let mut plan = Plan {
        request_timeout: rule.timeouts.request,
        attempt_timeout: rule.timeouts.backend_request,
        retry: rule.retry.as_ref(),
        ..Plan::default()
    };
    let mut mirrors = rule.mirrors.iter();
    for filter in &rule.filters {
        match filter {
            Filter::RequestHeaderModifier(m) => modify_headers(request.headers_mut(), m),
            Filter::ResponseHeaderModifier(m) => plan.response_headers.push(m),
            Filter::RequestRedirect(redirect) => {
                let (status, location) =
                    redirect_location(redirect, request.uri(), request.headers(), matched, port);
                return redirect_response(status, &location);
            }
            Filter::UrlRewrite(rewrite) => rewrite_request(&mut request, rewrite, matched),
            // Applied before the rule ([`crate::cors`]).
            Filter::Cors(_) => {}
            Filter::RequestMirror(mirror) => {
                if let Some(backend) = mirrors.next() {
                    plan.mirrors
                        .push((backend, mirror.numerator, mirror.denominator));
                }
            }
        }
    }
    let mut delayed = false;
    if let Some(fault) = &rule.fault {
        if let Some((delay, share)) = fault.delay {
            if fastrand::f64() * 100.0 < share {
                tokio::time::sleep(delay).await;
                delayed = true;
            }
        }
        if let Some((abort, share)) = fault.abort {
            if fastrand::f64() * 100.0 < share {
                // A gRPC status goes to a gRPC request trailers-only ([`crate::grpc_reply`]),
                // and any other request gets a 503, as from Envoy's fault filter.
                let (status, grpc) = match abort {
                    Abort::Http(status) => (StatusCode::from_u16(status).ok(), None),
                    Abort::Grpc(code) => (None, Some(GrpcCode(code))),
                };
                let status = status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let mut response = local(status, Flag::FaultAbort, "fault filter abort");
                if let Some(code) = grpc {
                    response.extensions_mut().insert(code);
                }
                return response;
            }
        }
    }
    if let Some(direct) = &rule.direct_response {
        let mut response = direct_response(direct);
        for modifier in &plan.response_headers {
            modify_headers(response.headers_mut(), modifier);
        }
        return response;
    }
    let Some(chosen) = rule.pick_backend(fastrand::u64(..)) else {
        return local(
            StatusCode::INTERNAL_SERVER_ERROR,
            Flag::InvalidBackend,
            "the rule has no backend with a weight",
        );
    };
    for filter in &chosen.filters {
        match filter {
            Filter::RequestHeaderModifier(m) => modify_headers(request.headers_mut(), m),
            Filter::ResponseHeaderModifier(m) => plan.response_headers.push(m),
            // Parsing refuses any other filter on a backend.
            Filter::RequestRedirect(_)
            | Filter::UrlRewrite(_)
            | Filter::RequestMirror(_)
            | Filter::Cors(_) => {}
        }
    }
    let mut response = send(ctx, &chosen.backend, request, plan, source).await;
    if delayed {
        if let Some(outcome) = response.extensions_mut().get_mut::<Outcome>() {
            if outcome.flag == Flag::None {
                outcome.flag = Flag::FaultDelay;
            }
        }
    }
    response
}

fn rewrite_request(
    request: &mut Request<Body>,
    rewrite: &mesh_cluster::k8s::Rewrite,
    matched: &RouteMatch,
) {
    if let Some(path) = &rewrite.path {
        let new_path = replace_path(request.uri().path(), path, matched);
        let query = request
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let mut parts = request.uri().clone().into_parts();
        match format!("{new_path}{query}").parse() {
            Ok(pq) => {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
            Err(e) => {
                warn!(path = new_path, error = %e, "rewritten path is not a valid URI path; kept the request's");
            }
        }
    }
    if let Some(host) = &rewrite.hostname {
        if let Ok(value) = HeaderValue::from_str(host) {
            request.headers_mut().insert(header::HOST, value);
        }
        if request.uri().authority().is_some() {
            let mut parts = request.uri().clone().into_parts();
            if let Ok(authority) = host.parse() {
                parts.authority = Some(authority);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
        }
    }
}

/// Sends `request` to `backend` as `plan` says: mirrors, retries, timeouts, response headers.
async fn send(
    ctx: &Ctx,
    backend: &Backend,
    request: Request<Body>,
    plan: Plan<'_>,
    source: &Source,
) -> Response<Body> {
    let (service, port, policy) = match backend {
        Backend::Service {
            service,
            port,
            policy,
        } => (service, *port, policy),
        Backend::Invalid(problem) => {
            debug!(%problem, "the backend does not resolve");
            return local(
                StatusCode::INTERNAL_SERVER_ERROR,
                Flag::InvalidBackend,
                "the backend does not resolve",
            );
        }
    };
    // Reading a body to keep for retries and mirrors is part of the request, inside its
    // timeout: a client that stops sending gets the route's 504, not a task held open.
    let attempts = async {
        let mut replay = replayable(request, &plan).await;
        for (mirror, numerator, denominator) in &plan.mirrors {
            if let (
                Some(copy),
                Backend::Service {
                    service,
                    port,
                    policy,
                },
            ) = (replay.copy(), mirror)
            {
                if fastrand::u32(..*denominator) < *numerator {
                    let target = (Arc::clone(service), *port, Arc::clone(policy));
                    spawn_mirror(ctx, target, copy, (source.addr, plan.request_timeout));
                }
            }
        }
        let retries = plan
            .retry
            .map_or(0, |r| r.attempts.unwrap_or(DEFAULT_RETRIES));
        let mut attempt = 0;
        // A retry in flight, counted against the destination's `maxRetries`.
        let mut retrying = None;
        loop {
            let Some(request) = replay.take() else {
                return local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flag::UpstreamFailure,
                    "the request cannot be sent again",
                );
            };
            let target = (service, port, policy.as_ref());
            let result = one_attempt(ctx, target, request, plan.attempt_timeout, source).await;
            let retry_this = worth_retrying(&result, plan.retry);
            let mut done = !retry_this || attempt >= retries || !replay.can_replay();
            if let (false, Some(pool)) = (done, policy.connection_pool.as_deref()) {
                let destination = (service.as_ref(), port, policy.subset.as_deref());
                match ctx.breakers.retry(destination, pool) {
                    Ok(place) => retrying = place,
                    Err(overflow) => {
                        debug!(%overflow, "not retried");
                        done = true;
                    }
                }
            }
            if done {
                drop(retrying);
                return match result {
                    Ok(response) => response,
                    Err(failure) => failure.response(ctx, source),
                };
            }
            attempt += 1;
            debug!(attempt, "retrying");
            if let Some(retry) = plan.retry {
                tokio::time::sleep(retry.wait(attempt, fastrand::f64())).await;
            }
        }
    };
    let mut response = match plan.request_timeout {
        Some(limit) => tokio::time::timeout(limit, attempts)
            .await
            .unwrap_or_else(|_| {
                local(
                    StatusCode::GATEWAY_TIMEOUT,
                    Flag::Timeout,
                    "request timeout",
                )
            }),
        None => attempts.await,
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop_keeping_upgrade(response.headers_mut());
    } else {
        strip_hop_by_hop(response.headers_mut());
    }
    for modifier in &plan.response_headers {
        modify_headers(response.headers_mut(), modifier);
    }
    response
}

/// Whether an attempt's `result` is one `retry` asks to try again.
fn worth_retrying(
    result: &Result<Response<Body>, Failure>,
    retry: Option<&mesh_cluster::k8s::Retry>,
) -> bool {
    let on = retry.map(|r| &r.on);
    match result {
        Ok(response) => on.is_some_and(|on| {
            // The headers read only when a condition looks at them.
            let headers = response.headers();
            let grpc = (!on.grpc.is_empty())
                .then(|| headers.get("grpc-status")?.to_str().ok()?.parse().ok())
                .flatten();
            let limited = on.rate_limited && headers.contains_key("x-envoy-ratelimited");
            on.answer(response.status().as_u16(), grpc, limited)
        }),
        Err(
            Failure::NoEndpoint
            | Failure::Overflow(_)
            | Failure::Upstream(UpstreamError::Overflow(_)),
        ) => false,
        Err(Failure::Upstream(UpstreamError::Connect { .. })) => {
            on.is_some_and(|on| on.connect_failure)
        }
        Err(
            Failure::Upstream(
                UpstreamError::Http { .. }
                | UpstreamError::Relay { .. }
                | UpstreamError::Lasted { .. },
            )
            | Failure::Timeout,
        ) => on.is_some_and(mesh_cluster::k8s::RetryOn::broken),
    }
}

/// Why an attempt got no response.
enum Failure {
    NoEndpoint,
    /// A circuit breaker of the destination refused it.
    Overflow(Overflow),
    Upstream(UpstreamError),
    Timeout,
}

impl Failure {
    /// The answer to `source`'s request that failed so.
    fn response(&self, ctx: &Ctx, source: &Source) -> Response<Body> {
        match self {
            Failure::NoEndpoint => local(
                StatusCode::SERVICE_UNAVAILABLE,
                Flag::NoHealthyUpstream,
                "no ready endpoint",
            ),
            Failure::Overflow(overflow) => {
                debug!(%overflow, "refused by the destination's circuit breaker");
                let mut refused = local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flag::Overflow,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                );
                refused
                    .headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
                refused
            }
            Failure::Upstream(e) => upstream_failed(ctx, source, e),
            Failure::Timeout => local(
                StatusCode::GATEWAY_TIMEOUT,
                Flag::Timeout,
                "backend request timeout",
            ),
        }
    }
}

async fn one_attempt(
    ctx: &Ctx,
    (service, port, policy): (&Arc<Service>, u16, &EndpointPolicy),
    request: Request<Body>,
    timeout: Option<Duration>,
    source: &Source,
) -> Result<Response<Body>, Failure> {
    let pool = policy.connection_pool.as_ref();
    let destination = (service.as_ref(), port, policy.subset.as_deref());
    // The destination's counts, looked up once, when its pool limits any.
    let breaker = pool.and_then(|pool| Some((ctx.breakers.at(destination, pool)?, pool)));
    let in_flight = match &breaker {
        Some((breaker, pool)) => Some(breaker.request(pool).map_err(Failure::Overflow)?),
        None => None,
    };
    let resolved = ctx.dns.endpoints_of(service, port).await;
    let keys = Keys {
        client: source.addr,
        request: Some((request.headers(), request.uri().query())),
        near: source.own.as_deref(),
        dialled: Some(source.dialled),
    };
    let picked = ctx
        .balancer
        .pick_among(service, (port, &resolved), policy, &keys);
    let Some((endpoint, addr, _in_flight)) = picked else {
        return Err(Failure::NoEndpoint);
    };
    let set_cookie = crate::balance::cookie_to_set(policy, &keys);
    // An HTTP/1.1 request (not upgraded to HTTP/2) holds one of the destination's connections
    // until its answer is read.
    let connection = match &breaker {
        Some((breaker, pool)) if !crate::upstream::multiplexed(&request, Some(pool)) => breaker
            .connection(pool, addr, true)
            .await
            .map_err(Failure::Overflow)?,
        _ => None,
    };
    let sent = ctx.upstream.send(
        &endpoint,
        (addr, &service.hostname),
        source.addr,
        request,
        (pool, breaker.as_ref().map(|(breaker, _)| breaker)),
    );
    let result = match timeout {
        Some(limit) => tokio::time::timeout(limit, sent).await,
        None => Ok(sent.await),
    };
    // What the endpoint did, for outlier detection (its `DestinationRule`'s).
    let answer = match &result {
        Ok(Ok(response)) => Some(Answer::Status(response.status().as_u16())),
        // Refused by the destination's limits: nothing the endpoint did.
        Ok(Err(UpstreamError::Overflow(_))) => None,
        Ok(Err(_)) | Err(_) => Some(Answer::Unreachable),
    };
    if let Some(answer) = answer {
        ctx.balancer
            .record((service, port, policy), addr, answer, Instant::now());
    }
    let result = result.map_err(|_| Failure::Timeout)?;
    let mut response = result.map_err(|e| match e {
        UpstreamError::Overflow(overflow) => Failure::Overflow(overflow),
        e => Failure::Upstream(e),
    })?;
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if in_flight.is_some() || connection.is_some() {
        response = response.map(|body| crate::body::hold(body, (in_flight, connection)));
    }
    response.extensions_mut().insert(Outcome {
        flag: Flag::None,
        upstream: Some(addr),
        workload: endpoint.workload.clone(),
        service: Some(Arc::clone(service)),
    });
    Ok(response)
}

/// A request that may be sent more than once: its body kept when small enough.
enum Replay {
    /// The body is held: any number of copies.
    Held(http::request::Parts, Bytes),
    /// Streamed: one send.
    Once(Option<Request<Body>>),
}

impl Replay {
    fn take(&mut self) -> Option<Request<Body>> {
        match self {
            Replay::Held(..) => self.copy(),
            Replay::Once(request) => request.take(),
        }
    }

    fn copy(&self) -> Option<Request<Body>> {
        match self {
            Replay::Held(parts, body) => {
                Some(Request::from_parts(parts.clone(), full(body.clone())))
            }
            Replay::Once(_) => None,
        }
    }

    fn can_replay(&self) -> bool {
        matches!(self, Replay::Held(..))
    }
}

/// Keeps the body when a retry or a mirror may need it and it is small enough.
async fn replayable(request: Request<Body>, plan: &Plan<'_>) -> Replay {
    let wanted = plan.retry.is_some() || !plan.mirrors.is_empty() || request.body().is_end_stream();
    let small = request
        .body()
        .size_hint()
        .upper()
        .is_some_and(|upper| upper <= REPLAY_LIMIT);
    if !wanted || !small {
        return Replay::Once(Some(request));
    }
    let (parts, body) = request.into_parts();
    match body.collect().await {
        Ok(collected) => Replay::Held(parts, collected.to_bytes()),
        Err(e) => {
            debug!(error = %e, "the request body could not be read");
            Replay::Once(None)
        }
    }
}

/// Sends a copy of a request to a mirror, its answer read and dropped, within `timeout` (else
/// [`crate::context::MIRROR_TIMEOUT`]); skipped and counted when as many mirrors are in flight as the
/// waypoint allows.
fn spawn_mirror(
    ctx: &Ctx,
    (service, port, policy): (Arc<Service>, u16, Arc<EndpointPolicy>),
    request: Request<Body>,
    (client, timeout): (SocketAddr, Option<Duration>),
) {
    let Ok(permit) = Arc::clone(&ctx.mirrors).try_acquire_owned() else {
        ctx.reporters.metrics.mirror_skipped();
        debug!(service = %service, "mirror skipped: as many mirrors in flight as allowed");
        return;
    };
    // A mirror counts among its destination's requests in flight, and is skipped beyond them.
    let destination = (service.as_ref(), port, policy.subset.as_deref());
    let breaker = policy
        .connection_pool
        .as_deref()
        .and_then(|pool| Some((ctx.breakers.at(destination, pool)?, pool)));
    let counted = match breaker
        .as_ref()
        .map(|(breaker, pool)| breaker.request(pool))
    {
        Some(Ok(slot)) => Some(slot),
        Some(Err(overflow)) => {
            debug!(service = %service, %overflow, "mirror skipped");
            return;
        }
        None => None,
    };
    // Only the counts go with the mirror (the pool is the policy's, which goes too).
    let breaker = breaker.map(|(breaker, _)| breaker);
    let (upstream, balancer, dns) = (
        Arc::clone(&ctx.upstream),
        Arc::clone(&ctx.balancer),
        Arc::clone(&ctx.dns),
    );
    let exchange = async move {
        // A mirror spreads over the mirror's endpoints, wherever they run; a `ServiceEntry`'s
        // names are resolved here, off the request's path.
        let resolved = dns.endpoints_of(&service, port).await;
        let keys = Keys {
            client,
            request: Some((request.headers(), request.uri().query())),
            near: None,
            dialled: None,
        };
        let picked = balancer.pick_among(&service, (port, &resolved), &policy, &keys);
        let Some((endpoint, addr, _in_flight)) = picked else {
            debug!(service = %service, "no endpoint to mirror to");
            return Ok(());
        };
        let to = (addr, service.hostname.as_str());
        let pool = policy.connection_pool.as_ref();
        let response = upstream
            .send(&endpoint, to, client, request, (pool, breaker.as_ref()))
            .await?;
        // The mirror's answer is read and dropped.
        drop(response.into_body().collect().await);
        Ok::<_, UpstreamError>(())
    };
    let timeout = timeout.unwrap_or(crate::context::MIRROR_TIMEOUT);
    tokio::spawn(
        async move {
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "mirrored request failed"),
                Err(_) => debug!(?timeout, "mirrored request timed out"),
            }
            drop((permit, counted));
        }
        .in_current_span(),
    );
}

/// 503 for a request no endpoint answered; a warning within the source's share of the log
/// budget (a client sending requests it knows will fail cannot flood the waypoint's log).
fn upstream_failed(ctx: &Ctx, source: &Source, error: &UpstreamError) -> Response<Body> {
    if ctx.reporters.log_budget.may_warn(source.addr.ip()) {
        warn!(src = %source.addr, %error, "no response from the endpoint");
    }
    local(
        StatusCode::SERVICE_UNAVAILABLE,
        Flag::UpstreamFailure,
        "upstream connect error or disconnect",
    )
}

/// An answer the waypoint makes itself, with a short text body and the flag that says why.
pub(crate) fn local(status: StatusCode, flag: Flag, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.extensions_mut().insert(Outcome {
        flag,
        ..Outcome::default()
    });
    response.extensions_mut().insert(LocalReply(text));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A `VirtualService`'s `directResponse`: its status and body (`text/plain` when it has one and
/// the rule's response headers set no other, as Envoy answers), the flag none.
fn direct_response(direct: &mesh_cluster::k8s::DirectResponse) -> Response<Body> {
    let body = Bytes::from_owner(Arc::clone(&direct.body));
    let empty = body.is_empty();
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::from_u16(direct.status).unwrap_or(StatusCode::OK);
    if !empty {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

fn redirect_response(status: StatusCode, location: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = status;
    match HeaderValue::from_str(location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => local(
            StatusCode::INTERNAL_SERVER_ERROR,
            Flag::None,
            "the redirect is not a valid URL",
        ),
    }
}
