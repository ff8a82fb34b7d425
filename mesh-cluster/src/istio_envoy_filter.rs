//! Istio's `EnvoyFilter` (`networking.istio.io/v1alpha3`), as far as a waypoint applies it: the
//! local rate limit (`envoy.filters.http.local_ratelimit`) that Istio documents as the way to
//! rate-limit requests (its only one for waypoints). Re-exported by [`super::k8s`]; what the
//! waypoints do with it is in [`super::ratelimit`].
//!
//! An `EnvoyFilter` patches Envoy's configuration, which this mesh does not have, so it is read
//! leniently: a `configPatches` entry that is not a local rate limit is kept only as what it
//! patches, and applies to nothing (the state warns). A local rate limit (an `HTTP_FILTER` patch
//! whose `value.name` is `envoy.filters.http.local_ratelimit`) is read strictly, as Envoy would
//! refuse it, and an error names the field and the line:
//!
//! - `typed_config` is the filter's `LocalRateLimit`, given directly (`@type`
//!   `type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`) or in
//!   a `TypedStruct` (`type_url` that type, `value` its fields); fields in snake case (as Istio's
//!   examples write them) or camel case (proto3 JSON); unknown fields are refused;
//! - `stat_prefix` is set; `token_bucket` is set, with `max_tokens` > 0, `tokens_per_fill` > 0
//!   (1 when absent) and `fill_interval` a duration of at least 50 ms (Envoy's floor);
//! - `filter_enabled`/`filter_enforced` percentages are at most 100 %;
//! - `response_headers_to_add` are valid header names and values; `status.code` is 400-599;
//! - `descriptors` (per-route descriptors need Envoy's route actions), `stage` other than 0 and
//!   the other fields that configure Envoy's internals are refused, so a limit is never enforced
//!   other than as written.

use serde::{Deserialize, Deserializer};

use super::{
    istio::WorkloadSelector,
    istio_authz::{target_refs, PolicyTargetRef},
    meta::{nullable, Labels, ObjectMeta},
    schema::{deserialize_checked, Checked, List},
};

/// `apiVersion`s of `EnvoyFilter` the agent reads.
pub const ENVOY_FILTER_VERSIONS: [&str; 1] = ["networking.istio.io/v1alpha3"];

/// The Envoy filter of a local rate limit.
pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
/// Its configuration's type.
const LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
/// A `TypedStruct`'s types (`udpa` and `xds`).
const TYPED_STRUCT_TYPES: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];

/// Why an `EnvoyFilter` spec is refused when read.
#[derive(Debug, thiserror::Error)]
pub enum EnvoyFilterSchemaError {
    #[error(
        "`workloadSelector` and `{0}` cannot both be set (Istio: only one of targetRefs or \
         workloadSelector can be set)"
    )]
    SelectorAndTargetRef(&'static str),
    #[error("configPatches[{index}]: {problem}")]
    Patch { index: usize, problem: String },
}

/// An entry of `configPatches`.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigPatch {
    /// A local rate limit on the HTTP requests of the waypoint (or sidecar) it matches.
    LocalRateLimit(Box<RateLimitPatch>),
    /// Anything else: what it patches (`applyTo`) and the filter it names, if any.
    Other {
        apply_to: String,
        filter: Option<String>,
    },
}

/// A local rate limit patch.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitPatch {
    /// `match.context`: `ANY` when absent.
    pub context: String,
    /// `match.waypoint.portNumber` (or `match.listener.portNumber`): only that port.
    pub port: Option<u16>,
    /// `match.waypoint.route` or `match.routeConfiguration`: Envoy route names, which a
    /// waypoint here does not have.
    pub route_match: bool,
    /// `typed_config`.
    pub config: LocalRateLimit,
}

/// Envoy's `LocalRateLimit` (the HTTP filter), the fields a waypoint enforces.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRateLimit {
    #[serde(alias = "statPrefix")]
    pub stat_prefix: String,
    #[serde(alias = "tokenBucket")]
    pub token_bucket: TokenBucket,
    #[serde(default, alias = "filterEnabled")]
    pub filter_enabled: Option<RuntimeFraction>,
    #[serde(default, alias = "filterEnforced")]
    pub filter_enforced: Option<RuntimeFraction>,
    #[serde(default, alias = "responseHeadersToAdd")]
    pub response_headers_to_add: Vec<HeaderOption>,
    #[serde(default)]
    pub status: Option<HttpStatus>,
    /// `local_rate_limit_per_downstream_connection`: a bucket per client connection (a tunnel
    /// here) instead of one for the waypoint.
    #[serde(default, alias = "localRateLimitPerDownstreamConnection")]
    pub local_rate_limit_per_downstream_connection: bool,
    /// `enable_x_ratelimit_headers`: `OFF` or `DRAFT_VERSION_03`.
    #[serde(default, alias = "enableXRatelimitHeaders")]
    pub enable_x_ratelimit_headers: Option<String>,
    /// `rate_limited_as_resource_exhausted`: gRPC's `RESOURCE_EXHAUSTED` instead of `UNAVAILABLE`.
    #[serde(default, alias = "rateLimitedAsResourceExhausted")]
    pub rate_limited_as_resource_exhausted: bool,
    #[serde(default)]
    pub descriptors: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub stage: u32,
}

/// Envoy's `TokenBucket`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    #[serde(alias = "maxTokens")]
    pub max_tokens: u32,
    #[serde(default, alias = "tokensPerFill")]
    pub tokens_per_fill: Option<u32>,
    /// A protobuf `Duration` in JSON form (`60s`, `0.5s`), or Istio's forms (`500ms`).
    #[serde(alias = "fillInterval")]
    pub fill_interval: String,
}

/// Envoy's `RuntimeFractionalPercent` (its runtime key is read and not used).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFraction {
    #[serde(alias = "defaultValue")]
    pub default_value: FractionalPercent,
    #[serde(default, alias = "runtimeKey")]
    pub runtime_key: Option<String>,
}

/// Envoy's `FractionalPercent`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionalPercent {
    #[serde(default)]
    pub numerator: u32,
    /// `HUNDRED` (when absent), `TEN_THOUSAND` or `MILLION`.
    #[serde(default)]
    pub denominator: Option<String>,
}

/// Envoy's `HeaderValueOption`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOption {
    pub header: HeaderPair,
    #[serde(default)]
    pub append: Option<bool>,
    #[serde(default, alias = "appendAction")]
    pub append_action: Option<String>,
}

/// Envoy's `HeaderValue`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderPair {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

/// Envoy's `HttpStatus`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStatus {
    pub code: u16,
}

/// A `networking.istio.io/v1alpha3` `EnvoyFilter`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct EnvoyFilter {
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// `spec`; absent or `null` reads as no patch.
    #[serde(default, deserialize_with = "nullable")]
    pub spec: EnvoyFilterSpec,
}

/// `spec` of an `EnvoyFilter`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnvoyFilterSpec {
    /// `workloadSelector` (its `labels`): for sidecars and gateways.
    pub workload_selector: Option<WorkloadSelector>,
    /// `targetRefs` (and `targetRef`): the waypoints'.
    pub target_refs: Vec<PolicyTargetRef>,
    /// `priority`.
    pub priority: i32,
    /// `configPatches`.
    pub config_patches: Vec<ConfigPatch>,
}

/// `workloadSelector` of an `EnvoyFilter` (Istio's `WorkloadSelector`: `labels`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LabelsSelector {
    #[serde(default, deserialize_with = "nullable")]
    labels: Labels,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SpecFields {
    workload_selector: Option<LabelsSelector>,
    target_ref: Option<PolicyTargetRef>,
    target_refs: List<PolicyTargetRef>,
    priority: i32,
    config_patches: List<serde_yaml::Value>,
}

impl Checked for EnvoyFilterSpec {
    type Error = EnvoyFilterSchemaError;
    type Fields = SpecFields;
    const WHAT: &'static str = "an EnvoyFilter spec";

    fn check(fields: SpecFields) -> Result<Self, EnvoyFilterSchemaError> {
        let target_refs = target_refs(
            fields.target_ref,
            fields.target_refs.0,
            fields.workload_selector.is_some(),
        )
        .map_err(EnvoyFilterSchemaError::SelectorAndTargetRef)?;
        Ok(Self {
            workload_selector: fields.workload_selector.map(|s| WorkloadSelector {
                match_labels: s.labels,
            }),
            target_refs,
            priority: fields.priority,
            config_patches: fields
                .config_patches
                .0
                .iter()
                .enumerate()
                .map(|(index, patch)| {
                    config_patch(patch)
                        .map_err(|problem| EnvoyFilterSchemaError::Patch { index, problem })
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl<'de> Deserialize<'de> for EnvoyFilterSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

/// The patch `value` as this mesh reads it.
fn config_patch(patch: &serde_yaml::Value) -> Result<ConfigPatch, String> {
    fn text(value: Option<&serde_yaml::Value>) -> Option<&str> {
        value.and_then(serde_yaml::Value::as_str)
    }
    let apply_to = text(patch.get("applyTo")).unwrap_or_default().to_owned();
    let value = patch.get("patch").and_then(|p| p.get("value"));
    let filter = text(value.and_then(|v| v.get("name"))).map(str::to_owned);
    if apply_to != "HTTP_FILTER" || filter.as_deref() != Some(LOCAL_RATE_LIMIT_FILTER) {
        return Ok(ConfigPatch::Other { apply_to, filter });
    }
    let operation = text(patch.get("patch").and_then(|p| p.get("operation"))).unwrap_or_default();
    if !["INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "ADD"].contains(&operation) {
        return Err(format!(
            "patch.operation {operation:?}: a local rate limit is added with INSERT_BEFORE, \
             INSERT_AFTER, INSERT_FIRST or ADD"
        ));
    }
    let matched = patch.get("match");
    let context = text(matched.and_then(|m| m.get("context")))
        .unwrap_or("ANY")
        .to_owned();
    // Istio's validation (the CRD's rule): a `waypoint` match exactly with context WAYPOINT.
    let waypoint_match = matched.and_then(|m| m.get("waypoint")).is_some();
    if waypoint_match != (context == "WAYPOINT") {
        return Err(
            "match: `waypoint` goes with context WAYPOINT, and only with it (Istio: only \
                    support waypointMatch when context is WAYPOINT)"
                .to_owned(),
        );
    }
    let port_of = |at: &str| {
        matched
            .and_then(|m| m.get(at))
            .and_then(|w| w.get("portNumber"))
            .and_then(serde_yaml::Value::as_u64)
    };
    let port = match port_of("waypoint").or_else(|| port_of("listener")) {
        None => None,
        Some(port) => Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("match: portNumber {port} is not a port"))?,
        ),
    };
    let route_match = matched
        .and_then(|m| m.get("waypoint"))
        .and_then(|w| w.get("route"))
        .is_some()
        || matched.and_then(|m| m.get("routeConfiguration")).is_some();
    let typed = value
        .and_then(|v| v.get("typed_config").or_else(|| v.get("typedConfig")))
        .ok_or("patch.value.typed_config: a local rate limit needs its configuration")?;
    let config = local_rate_limit(typed).map_err(|e| format!("patch.value.typed_config: {e}"))?;
    Ok(ConfigPatch::LocalRateLimit(Box::new(RateLimitPatch {
        context,
        port,
        route_match,
        config,
    })))
}

/// A `LocalRateLimit`, given directly or in a `TypedStruct`, checked.
fn local_rate_limit(typed: &serde_yaml::Value) -> Result<LocalRateLimit, String> {
    let mut fields = typed.clone();
    let Some(map) = fields.as_mapping_mut() else {
        return Err("not a mapping".to_owned());
    };
    let of_type = map
        .remove("@type")
        .and_then(|t| t.as_str().map(str::to_owned))
        .unwrap_or_default();
    let fields = if TYPED_STRUCT_TYPES.contains(&of_type.as_str()) {
        let url = map
            .get("type_url")
            .or_else(|| map.get("typeUrl"))
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default();
        if url != LOCAL_RATE_LIMIT_TYPE {
            return Err(format!(
                "type_url {url:?}: expected {LOCAL_RATE_LIMIT_TYPE}"
            ));
        }
        map.get("value").cloned().unwrap_or_default()
    } else if of_type == LOCAL_RATE_LIMIT_TYPE {
        fields
    } else {
        return Err(format!(
            "@type {of_type:?}: expected {LOCAL_RATE_LIMIT_TYPE}, or a TypedStruct of it"
        ));
    };
    let config: LocalRateLimit = serde_yaml::from_value(fields).map_err(|e| e.to_string())?;
    check_local_rate_limit(&config)?;
    Ok(config)
}

fn check_local_rate_limit(config: &LocalRateLimit) -> Result<(), String> {
    if config.stat_prefix.is_empty() {
        return Err("stat_prefix must be set".to_owned());
    }
    let bucket = &config.token_bucket;
    if bucket.max_tokens == 0 {
        return Err("token_bucket.max_tokens must be greater than 0".to_owned());
    }
    if bucket.tokens_per_fill == Some(0) {
        return Err("token_bucket.tokens_per_fill must be greater than 0".to_owned());
    }
    let interval = fill_interval(&bucket.fill_interval)?;
    if interval < std::time::Duration::from_millis(50) {
        return Err(format!(
            "token_bucket.fill_interval {:?} is below Envoy's 50 ms",
            bucket.fill_interval
        ));
    }
    for (field, fraction) in [
        ("filter_enabled", &config.filter_enabled),
        ("filter_enforced", &config.filter_enforced),
    ] {
        if let Some(f) = fraction {
            fraction_of(&f.default_value).map_err(|e| format!("{field}.default_value: {e}"))?;
        }
    }
    for (i, option) in config.response_headers_to_add.iter().enumerate() {
        let bad = http::HeaderName::from_bytes(option.header.key.as_bytes()).is_err()
            || http::HeaderValue::from_str(&option.header.value).is_err();
        if bad {
            return Err(format!(
                "response_headers_to_add[{i}]: {:?}: {:?} is not a valid header",
                option.header.key, option.header.value
            ));
        }
    }
    if let Some(status) = &config.status {
        if !(400..=599).contains(&status.code) {
            return Err(format!("status.code {} is not 400-599", status.code));
        }
    }
    match config.enable_x_ratelimit_headers.as_deref() {
        None | Some("OFF" | "DRAFT_VERSION_03") => {}
        Some(other) => {
            return Err(format!(
                "enable_x_ratelimit_headers {other:?}: expected OFF or DRAFT_VERSION_03"
            ))
        }
    }
    if !config.descriptors.is_empty() {
        return Err(
            "descriptors are not supported: they need Envoy's route rate-limit actions, which a \
             waypoint here does not have"
                .to_owned(),
        );
    }
    if config.stage != 0 {
        return Err("stage must be 0 (the only stage a waypoint here has)".to_owned());
    }
    Ok(())
}

/// A `fill_interval`: protobuf's JSON `Duration` (`60s`, `0.05s`) or Istio's (`500ms`, `1m`).
pub fn fill_interval(text: &str) -> Result<std::time::Duration, String> {
    super::istio_traffic::parse_istio_duration(text)
        .map_err(|_| format!("token_bucket.fill_interval {text:?} is not a duration"))
}

/// A `FractionalPercent` as a fraction of 1.
pub fn fraction_of(percent: &FractionalPercent) -> Result<f64, String> {
    let denominator = match percent.denominator.as_deref() {
        None | Some("HUNDRED") => 100.0,
        Some("TEN_THOUSAND") => 10_000.0,
        Some("MILLION") => 1_000_000.0,
        Some(other) => {
            return Err(format!(
                "denominator {other:?}: expected HUNDRED, TEN_THOUSAND or MILLION"
            ))
        }
    };
    let fraction = f64::from(percent.numerator) / denominator;
    if fraction > 1.0 {
        return Err(format!("{} is more than 100 %", percent.numerator));
    }
    Ok(fraction)
}
