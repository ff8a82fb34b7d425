//! Local rate limits at the waypoints: Istio's `EnvoyFilter` inserting Envoy's
//! `envoy.filters.http.local_ratelimit` (parsed in [`super::istio_envoy_filter`]), which Istio
//! documents as the way to rate-limit requests, and its only one for waypoints. Which limits
//! apply to a request ([`super::ClusterState::rate_limits_at_waypoint`]); the token buckets are
//! the waypoint's.
//!
//! **Which filters.** Those with `targetRefs` (the targets of a waypoint's policies,
//! [`crate::policy_target`]: the waypoint's `Gateway`, a Service it serves, or from the root
//! namespace `GatewayClass` `istio-waypoint`), whose patch matches context `WAYPOINT` or
//! `ANY`, and, with `match.waypoint.portNumber`, requests to that Service port. Every limit that
//! applies is checked, in order (policy namespace and name, then patch); the first without a
//! token answers.
//!
//! **What a limit does** (as Envoy's filter): a token bucket of `max_tokens`, full at first,
//! given `tokens_per_fill` every `fill_interval`, one per waypoint process (or, with
//! `local_rate_limit_per_downstream_connection`, one per client tunnel). `filter_enabled` is the
//! share of requests it checks and `filter_enforced` the share of those without a token it
//! refuses (both 0 % when absent, Envoy's default "for safety", with a warning). A refused
//! request gets `status` (429 by default) with the body `local_rate_limited` and
//! `response_headers_to_add`; gRPC clients get `UNAVAILABLE` (or `RESOURCE_EXHAUSTED` with
//! `rate_limited_as_resource_exhausted`); the access log and Istio's metrics say `RL`. With
//! `enable_x_ratelimit_headers: DRAFT_VERSION_03`, every checked request's response carries
//! `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset`.
//!
//! **Not applied, with a warning:** an `EnvoyFilter` without `targetRefs` (for sidecars and
//! gateways), a patch of another context, a patch matching Envoy route names, and every patch
//! that is not a local rate limit (this mesh has no Envoy configuration to patch).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, StatusCode};

use crate::{
    error::StateError,
    istio_envoy_filter::{fill_interval, fraction_of, ConfigPatch, RateLimitPatch},
    k8s::{self, Kind},
    meta::MetaExt,
    names::policy_key,
    policy_target::{self, ByTarget, PolicyTarget},
};

/// A local rate limit, as a waypoint enforces it.
#[derive(Debug)]
pub struct RateLimit {
    /// `namespace/name` of its `EnvoyFilter`.
    pub policy: Arc<str>,
    /// Its patch's index.
    pub patch: usize,
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// The bucket's size, what it gets per fill, and how often.
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    /// Shares of requests checked, and of those without a token refused.
    pub enabled: f64,
    pub enforced: f64,
    /// The refusal's status.
    pub status: StatusCode,
    /// Headers on a refusal: name, value, and whether it is appended (else set).
    pub response_headers: Vec<(HeaderName, HeaderValue, bool)>,
    /// A bucket per client tunnel.
    pub per_connection: bool,
    /// `x-ratelimit-*` on every checked request's response.
    pub x_ratelimit_headers: bool,
    /// gRPC `RESOURCE_EXHAUSTED` instead of `UNAVAILABLE`.
    pub resource_exhausted: bool,
    /// Only requests to this Service port.
    pub port: Option<u16>,
}

/// A waypoint's `EnvoyFilter`: its targets and limits.
#[derive(Debug)]
pub(crate) struct Filter {
    key: Arc<str>,
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// How many `targetRefs` it has (each valid one is in `targets`): none, and it is for
    /// sidecars and gateways.
    pub(crate) target_refs: usize,
    pub(crate) targets: Vec<PolicyTarget>,
    pub(crate) limits: Vec<Arc<RateLimit>>,
    /// Why each patch that is not applied is not (`configPatches[i]: ...`).
    pub(crate) unapplied: Vec<String>,
}

/// The `EnvoyFilters` of a state, their rate limits indexed by target.
#[derive(Debug, Default)]
pub(crate) struct RateLimitIndex {
    filters: Vec<Filter>,
    by_target: ByTarget<Vec<Arc<RateLimit>>>,
    warnings: Vec<String>,
}

impl RateLimitIndex {
    /// Translates and indexes `objects`, sorted by namespace and name.
    pub(crate) fn build<'a>(
        objects: impl IntoIterator<Item = &'a k8s::EnvoyFilter>,
        root_namespace: &str,
    ) -> Result<Self, StateError> {
        let mut index = Self::default();
        for object in objects {
            let filter = translate(object, root_namespace, &mut index.warnings)?;
            for target in &filter.targets {
                index
                    .by_target
                    .entry(&filter.namespace, target)
                    .extend(filter.limits.iter().cloned());
            }
            index.filters.push(filter);
        }
        Ok(index)
    }

    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The `EnvoyFilters`, sorted by namespace and name.
    pub(crate) fn filters(&self) -> &[Filter] {
        &self.filters
    }

    /// How many `EnvoyFilters` there are.
    pub(crate) fn len(&self) -> usize {
        self.filters.len()
    }

    /// The targets of each filter, with its namespace and `EnvoyFilter namespace/name`.
    pub(crate) fn targets(&self) -> impl Iterator<Item = (String, &str, &PolicyTarget)> {
        self.filters.iter().flat_map(|f| {
            let what = format!("EnvoyFilter {}", f.key);
            let namespace = f.namespace.as_str();
            f.targets
                .iter()
                .filter(move |_| !f.limits.is_empty())
                .map(move |t| (what.clone(), namespace, t))
        })
    }

    /// The limits that apply at `waypoint` to a request to `dst` for `services`, in order.
    pub(crate) fn applying(
        &self,
        waypoint: (&str, &str),
        services: &[policy_target::Addressed<'_>],
        dst: SocketAddr,
    ) -> Vec<&Arc<RateLimit>> {
        let mut limits: Vec<&Arc<RateLimit>> = self
            .by_target
            .applying(waypoint, services)
            .flatten()
            .filter(|l| l.port.is_none_or(|p| p == dst.port()))
            .collect();
        limits.sort_by(|a, b| (&a.policy, a.patch).cmp(&(&b.policy, b.patch)));
        limits.dedup_by(|a, b| Arc::ptr_eq(a, b));
        limits
    }
}

fn translate(
    ef: &k8s::EnvoyFilter,
    root_namespace: &str,
    warnings: &mut Vec<String>,
) -> Result<Filter, StateError> {
    let key = policy_key(Kind::EnvoyFilter, &ef.metadata)?;
    let namespace = ef.metadata.namespace();
    let what = format!("EnvoyFilter {key}");
    let spec = &ef.spec;
    let targets = policy_target::targets(
        &what,
        (namespace, root_namespace),
        &spec.target_refs,
        warnings,
    );
    let (mut limits, mut unapplied) = (Vec::new(), Vec::new());
    for (index, patch) in spec.config_patches.iter().enumerate() {
        let at = format!("{what}: configPatches[{index}]");
        let not_applied = match patch {
            ConfigPatch::Other { apply_to, filter } => format!(
                "({apply_to}{}) is not applied: a waypoint here applies only local rate limits \
                 (an HTTP_FILTER patch adding envoy.filters.http.local_ratelimit)",
                filter
                    .as_deref()
                    .map(|f| format!(", {f}"))
                    .unwrap_or_default()
            ),
            ConfigPatch::LocalRateLimit(patch) => {
                match limit_of(&key, index, patch, (&at, warnings)) {
                    Ok(limit) => {
                        limits.push(Arc::new(limit));
                        continue;
                    }
                    Err(why) => why,
                }
            }
        };
        warnings.push(format!("{at} {not_applied}"));
        unapplied.push(format!("configPatches[{index}] {not_applied}"));
    }
    if spec.target_refs.is_empty() && !limits.is_empty() {
        warnings.push(format!(
            "{what} has no targetRefs: it is for sidecars and gateways, which this mesh does not \
             have; waypoints apply the EnvoyFilters that target them, their Services or their \
             class"
        ));
    }
    Ok(Filter {
        key,
        namespace: namespace.to_owned(),
        name: ef.metadata.name().to_owned(),
        target_refs: spec.target_refs.len(),
        targets,
        limits,
        unapplied,
    })
}

/// The limit of a patch (with a warning at `at` when it refuses nothing), or why it does not
/// apply to waypoints (after the patch's place: "is not applied: ...").
fn limit_of(
    policy: &Arc<str>,
    patch: usize,
    p: &RateLimitPatch,
    (at, warnings): (&str, &mut Vec<String>),
) -> Result<RateLimit, String> {
    if !["WAYPOINT", "ANY"].contains(&p.context.as_str()) {
        return Err(format!(
            "is not applied: its context {} is not the waypoints' (WAYPOINT or ANY)",
            p.context
        ));
    }
    if p.route_match {
        return Err(
            "is not applied: it matches Envoy route names, which a waypoint here does \
                    not have"
                .to_owned(),
        );
    }
    let config = &p.config;
    // Checked when read.
    let fraction = |f: &Option<k8s::RuntimeFraction>| {
        f.as_ref()
            .map_or(0.0, |f| fraction_of(&f.default_value).unwrap_or(0.0))
    };
    let (enabled, enforced) = (
        fraction(&config.filter_enabled),
        fraction(&config.filter_enforced),
    );
    if enabled == 0.0 || enforced == 0.0 {
        warnings.push(format!(
            "{at}: it refuses no request: filter_enabled and filter_enforced are {:.0} % and \
             {:.0} % (Envoy's default, when absent, is 0 %)",
            enabled * 100.0,
            enforced * 100.0
        ));
    }
    let bucket = &config.token_bucket;
    Ok(RateLimit {
        policy: Arc::clone(policy),
        patch,
        stat_prefix: config.stat_prefix.clone(),
        max_tokens: bucket.max_tokens,
        tokens_per_fill: bucket.tokens_per_fill.unwrap_or(1),
        fill_interval: fill_interval(&bucket.fill_interval).unwrap_or(Duration::from_secs(1)),
        enabled,
        enforced,
        status: config
            .status
            .as_ref()
            .and_then(|s| StatusCode::from_u16(s.code).ok())
            .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
        response_headers: config
            .response_headers_to_add
            .iter()
            .filter_map(|o| {
                let name = HeaderName::from_bytes(o.header.key.as_bytes()).ok()?;
                let value = HeaderValue::from_str(&o.header.value).ok()?;
                let append = match o.append_action.as_deref() {
                    Some(action) => action == "APPEND_IF_EXISTS_OR_ADD",
                    None => o.append.unwrap_or(true),
                };
                Some((name, value, append))
            })
            .collect(),
        per_connection: config.local_rate_limit_per_downstream_connection,
        x_ratelimit_headers: config.enable_x_ratelimit_headers.as_deref()
            == Some("DRAFT_VERSION_03"),
        resource_exhausted: config.rate_limited_as_resource_exhausted,
        port: p.port,
    })
}

#[cfg(test)]
mod tests;
