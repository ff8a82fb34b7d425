//! Tunnels that are not HTTP (a port declared TCP, or sniffed as not HTTP): after the
//! `AuthorizationPolicies` as a connection sees them, their bytes go both ways to an endpoint of
//! the Service (a `VirtualService` `tls` rule's destination for the server name the client hello
//! asks for, or a `tcp` rule's, by weight, else the Service itself,
//! the endpoint picked by its `DestinationRule`) or to the pod the tunnel was for, until both
//! sides are done; within the destination's `connectionPool` (`maxConnections`: one more is
//! refused), and with every connection made or not recorded for its outlier detection.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use mesh_cluster::{
    http_route::{Backend, EndpointPolicy},
    k8s::ConnectionPool,
    ClusterState, Endpoint, Service, Verdict,
};
use tracing::{debug, warn};

use crate::{
    balance::{Answer, InFlight, Keys},
    breaker::{Overflow, Slot},
    context::Ctx,
    request::{authorize, authz_note, Source, Target},
};

/// Where a tunnel goes: the endpoint, its address and name, and, for a Service's, the
/// destination (its Service port and policy) with the tunnel counted in flight there.
type Picked = (
    Endpoint,
    SocketAddr,
    String,
    Option<(InFlight, Arc<Service>, u16, Arc<EndpointPolicy>)>,
);

/// Passes a tunnel's bytes on to its endpoint, as the module says.
pub(crate) async fn pass_through<IO>(ctx: &Ctx, target: &Target, source: &Source, mut down: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let state = Arc::clone(&ctx.state.borrow());
    let addressed = match target {
        Target::Service { hostname, .. } => state.service_by_hostname(hostname).cloned(),
        Target::Workload { .. } => None,
    };
    // The policies as a connection sees them: an ALLOW rule with HTTP fields matches nothing.
    let decision = authorize(ctx, &state, (target, addressed.as_deref()), source, None);
    let may_warn = || ctx.reporters.log_budget.may_warn(source.addr.ip());
    if decision.verdict == Verdict::Deny {
        if may_warn() {
            warn!(
                src = %source.identity,
                client = %source.addr,
                ?target,
                authz = authz_note(&decision).unwrap_or_default(),
                "TCP tunnel refused by policy"
            );
        }
        return;
    }
    // With `tls` rules on the port, the server name its client hello asks for; the bytes read
    // go on first.
    let tls_rules = match (target, addressed.as_deref()) {
        (Target::Service { port, .. }, Some(service)) => state.tls_routes_attach(service, *port),
        _ => false,
    };
    let (sni, first) = if tls_rules {
        match crate::sni::read_server_name(&mut down).await {
            Ok(read) => read,
            Err(e) => {
                debug!(error = %e, "tunnel closed while reading its client hello");
                return;
            }
        }
    } else {
        (None, Vec::new())
    };
    let mut down = crate::protocol::Prefixed::new(first, down);
    let Some((endpoint, addr, host, destination)) = pick(
        ctx,
        &state,
        (target, addressed.as_ref()),
        (source, sni.as_deref()),
    )
    .await
    else {
        if may_warn() {
            warn!(client = %source.addr, ?target, "no endpoint for a TCP tunnel");
        }
        return;
    };
    // `_in_flight`: counted for least request while the tunnel lasts; `_connection`: one of
    // the destination's `maxConnections`, refused beyond them.
    let (_in_flight, destination, _connection) = match destination {
        Some((in_flight, service, port, policy)) => {
            let slot = match connection_slot(ctx, (&service, port, &policy), addr).await {
                Ok(slot) => slot,
                Err(overflow) => {
                    if may_warn() {
                        warn!(client = %source.addr, %overflow, ?target, "TCP tunnel refused by the destination's circuit breaker (UO)");
                    }
                    return;
                }
            };
            (Some(in_flight), Some((service, port, policy)), slot)
        }
        None => (None, None, None),
    };
    let pool = destination
        .as_ref()
        .and_then(|(_, _, policy)| policy.connection_pool.as_deref());
    // Whether the endpoint could be reached, for its `DestinationRule`'s outlier detection.
    let report = |reached: bool| {
        if let Some((service, port, policy)) = &destination {
            let at = (service.as_ref(), *port, policy.as_ref());
            let answer = if reached {
                Answer::Connected
            } else {
                Answer::Unreachable
            };
            ctx.balancer.record(at, addr, answer, Instant::now());
        }
    };
    relay(
        ctx,
        (&endpoint, addr, &host),
        source,
        &mut down,
        (pool, report),
    )
    .await;
}

/// The endpoint of a tunnel to `target`: the pod it names, or one of its Service's (or of the
/// Service its `tcp` rule picks).
async fn pick(
    ctx: &Ctx,
    state: &ClusterState,
    (target, addressed): (&Target, Option<&Arc<Service>>),
    (source, sni): (&Source, Option<&str>),
) -> Option<Picked> {
    match target {
        Target::Workload { addr } => state.workload_by_ip(addr.ip()).map(|w| {
            let endpoint = Endpoint {
                addr: *addr,
                workload: Some(Arc::clone(w)),
            };
            (endpoint, *addr, w.to_string(), None)
        }),
        // A `VirtualService` `tls` rule's destination for the server name, else a `tcp` rule's,
        // by weight, else the Service's own backend; an endpoint picked as its
        // `DestinationRule` says, as for HTTP.
        Target::Service { port, .. } => {
            let service = addressed?;
            let client_ns = source.identity.namespace();
            let rule = sni
                .and_then(|sni| state.route_tls(service, *port, client_ns, sni))
                .or_else(|| state.route_tcp(service, *port, client_ns));
            let backend = match rule {
                Some(rule) => rule.pick_backend(fastrand::u64(..))?.backend.clone(),
                None => state.default_backend(service, *port),
            };
            let Backend::Service {
                service,
                port,
                policy,
            } = backend
            else {
                return None;
            };
            let resolved = ctx.dns.endpoints_of(&service, port).await;
            let keys = Keys {
                client: source.addr,
                request: None,
                near: source.own.as_deref(),
                dialled: Some(source.dialled),
            };
            let (endpoint, addr, in_flight) =
                ctx.balancer
                    .pick_among(&service, (port, &resolved), &policy, &keys)?;
            let host = service.hostname.clone();
            Some((
                endpoint,
                addr,
                host,
                Some((in_flight, service, port, policy)),
            ))
        }
    }
}

/// One of the destination's `maxConnections` for a tunnel to `addr`, when its pool limits
/// them; `Err` past them (a tunnel does not wait).
async fn connection_slot(
    ctx: &Ctx,
    (service, port, policy): (&Service, u16, &EndpointPolicy),
    addr: SocketAddr,
) -> Result<Option<Slot>, Overflow> {
    let Some(pool) = policy.connection_pool.as_ref() else {
        return Ok(None);
    };
    let at = (service, port, policy.subset.as_deref());
    match ctx.breakers.at(at, pool) {
        Some(breaker) => breaker.connection(pool, addr, false).await,
        None => Ok(None),
    }
}

/// Relays a TCP tunnel's bytes to `endpoint` and back.
async fn relay<IO>(
    ctx: &Ctx,
    (endpoint, addr, host): (&Endpoint, SocketAddr, &str),
    source: &Source,
    down: &mut IO,
    (pool, report): (Option<&ConnectionPool>, impl FnOnce(bool)),
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let client = (source.addr, source.trace);
    match ctx
        .upstream
        .relay(endpoint, (addr, host), client, down, (pool, report))
        .await
    {
        Ok((sent, received)) => debug!(%addr, sent, received, "TCP tunnel done"),
        Err(e) => {
            if ctx.reporters.log_budget.may_warn(source.addr.ip()) {
                warn!(client = %source.addr, %addr, error = %e, "TCP tunnel failed");
            }
        }
    }
}
