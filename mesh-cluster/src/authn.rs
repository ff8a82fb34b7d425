//! `RequestAuthentication` at the waypoints: which JWT rules apply to a request, and whether
//! the tokens it carries are valid ([`super::ClusterState::authenticate_at_waypoint`]), as
//! Istio's waypoints (Envoy's `jwt_authn` filter, configured by istiod) decide.
//!
//! **Which rules.** The policies with `targetRef`/`targetRefs` (the same targets as a waypoint's
//! `AuthorizationPolicy`, [`crate::policy_target`]): those of the waypoint's class, of the
//! waypoint, and of the Service a request is addressed to (for a pod's own address, of the
//! Services of its namespace that serve it, as for `AuthorizationPolicy`). Their rules add up.
//! A policy with a selector (or none) is for sidecars, which this mesh has none of: it applies
//! to nothing, with a warning.
//!
//! **Where a token is.** A rule's `fromHeaders` (the value after `prefix`), `fromParams` (the
//! query) and `fromCookies`; without any, Istio's defaults: `Authorization: Bearer <token>`
//! (the scheme in any case) and the `access_token` query parameter.
//!
//! **Verdict.** A request without a token anywhere a rule looks passes, without a principal
//! (an `AuthorizationPolicy` decides whether that is enough: Istio's "DENY
//! `notRequestPrincipals: ["*"]`"). A token found must be valid, or the request is refused
//! with 401 and Envoy's reason:
//! - its `iss` must be the `issuer` of a rule that looks where it was found ("Jwt issuer is not
//!   configured");
//! - its signature must verify with a key of that rule's key set: the key its `kid` names, or,
//!   without `kid`, any key of the algorithm's type (an `alg` on the key must be the token's);
//!   `none` and algorithms the key's type does not sign with are refused;
//! - `exp` and `nbf`, when present, must hold with 60 s of clock skew (Envoy's default);
//! - with `audiences`, one must be in `aud`.
//!
//! Every token found is checked; the first one (in the rules' order: by policy namespace and
//! name, then rule) gives the request's principal (`iss/sub`), audiences, presenter (`azp`)
//! and claims, which `AuthorizationPolicy` reads.
//!
//! **Headers.** A verified token's header is removed from the request sent on unless its rule
//! has `forwardOriginalToken`. `outputPayloadToHeader` gets the token's payload (base64url),
//! `outputClaimToHeaders` the claims' values. Stricter than Istio: the headers these name are
//! removed from every request the rule applies to, so a client cannot send its own.
//!
//! **Keys.** `jwks` inline is read when the policy is (an invalid set is refused, naming the
//! key). A rule with only `jwksUri` needs the waypoint to fetch the set; until it has, its
//! tokens are refused ("Jwks remote fetch is failed"): it fails closed.

use std::{collections::HashMap, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{errors::ErrorKind, Validation};
use serde_json::Value;

use crate::{
    error::StateError,
    jwks::{parse_jwks, JwtKey},
    k8s::{self, Kind},
    meta::MetaExt,
    names::policy_key,
    policy_target::{self, ByTarget, PolicyTarget},
};

/// Envoy's default clock skew for `exp` and `nbf`.
const CLOCK_SKEW_SECONDS: u64 = 60;

/// The query parameter Istio reads a token from by default.
const DEFAULT_PARAM: &str = "access_token";

/// Where a token is looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenLocation {
    /// A header, after a prefix (its case ignored).
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl TokenLocation {
    /// The token at this location of a request, if any.
    fn find<'r>(&self, request: &TokenSource<'r>) -> Option<std::borrow::Cow<'r, str>> {
        use std::borrow::Cow;
        match self {
            TokenLocation::Header { name, prefix } => {
                let value = request.headers.get(name)?.to_str().ok()?;
                let head = value.get(..prefix.len())?;
                head.eq_ignore_ascii_case(prefix)
                    .then(|| Cow::Borrowed(value[prefix.len()..].trim()))
                    .filter(|t| !t.is_empty())
            }
            TokenLocation::Param(param) => request
                .query?
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(name, _)| name == param)
                .map(|(_, value)| Cow::Borrowed(value))
                .filter(|t| !t.is_empty()),
            TokenLocation::Cookie(cookie) => request
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| name == cookie)
                .map(|(_, value)| Cow::<str>::Owned(value.trim_matches('"').to_owned()))
                .filter(|t| !t.is_empty()),
        }
    }
}

/// Where a rule's keys come from.
#[derive(Clone, Debug)]
pub enum JwtKeys {
    /// `jwks`, inline.
    Inline(Arc<[JwtKey]>),
    /// Fetched by the waypoint: from `jwksUri`, or (with neither `jwks` nor `jwksUri`) from the
    /// `jwks_uri` of the issuer's OpenID discovery document, as istiod does.
    Remote(KeySource),
    /// Neither, and an issuer that is not an http or https URL (no discovery document to
    /// read): every token of the issuer is refused.
    Missing,
}

/// Where a key set is fetched from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// A rule's `jwksUri`.
    Uri(String),
    /// An issuer's OpenID discovery document (`<issuer>/.well-known/openid-configuration`),
    /// whose `jwks_uri` names the set.
    Discovery(String),
}

impl KeySource {
    /// The URL fetched first, by which the fetched set is known.
    pub fn url(&self) -> &str {
        match self {
            KeySource::Uri(url) | KeySource::Discovery(url) => url,
        }
    }

    /// The discovery document of `issuer`, when it is an http or https URL (OpenID Connect
    /// Discovery 1.0, section 4: the issuer with `/.well-known/openid-configuration`).
    fn discovery(issuer: &str) -> Option<Self> {
        let parsed: http::Uri = issuer.parse().ok()?;
        let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
        (scheme_ok && parsed.host().is_some_and(|h| !h.is_empty()) && parsed.query().is_none())
            .then(|| {
                let base = issuer.trim_end_matches('/');
                KeySource::Discovery(format!("{base}/.well-known/openid-configuration"))
            })
    }
}

/// One `jwtRules` entry, as enforced.
#[derive(Clone, Debug)]
pub struct JwtProvider {
    /// `namespace/name` of its policy, and the rule's index.
    pub policy: Arc<str>,
    pub rule: usize,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub locations: Vec<TokenLocation>,
    pub keys: JwtKeys,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<HeaderName>,
    pub output_claim_to_headers: Vec<(HeaderName, String)>,
    /// `timeout` of a fetch of `jwksUri`.
    pub timeout: Option<std::time::Duration>,
}

/// A `RequestAuthentication` for waypoints.
#[derive(Debug)]
pub struct RequestAuthn {
    pub key: Arc<str>,
    pub namespace: String,
    pub name: String,
    /// How many `targetRefs` it has (each valid one is in `targets`): none, and it is for
    /// sidecars.
    pub target_refs: usize,
    pub targets: Vec<PolicyTarget>,
    pub providers: Vec<JwtProvider>,
}

/// What the waypoint gives of a request to find its tokens.
#[derive(Clone, Copy, Debug)]
pub struct TokenSource<'a> {
    pub headers: &'a HeaderMap,
    /// The query, without `?`.
    pub query: Option<&'a str>,
}

/// A token that verified: what `AuthorizationPolicy` reads of it.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedJwt {
    /// `iss/sub`: `requestPrincipals`, `request.auth.principal`.
    pub principal: String,
    /// `aud`: `request.auth.audiences`.
    pub audiences: Vec<String>,
    /// `azp`: `request.auth.presenter`.
    pub presenter: Option<String>,
    /// The payload: `request.auth.claims[...]`.
    pub claims: Value,
}

impl VerifiedJwt {
    /// The values of the claim at `path` (nested names): a string's, each string of a list, a
    /// number's or a boolean's text; none for an object, `null` or no such claim.
    pub fn claim<S: AsRef<str>>(&self, path: &[S]) -> Vec<String> {
        claim_values(&self.claims, path)
    }
}

fn claim_values<S: AsRef<str>>(claims: &Value, path: &[S]) -> Vec<String> {
    let mut value = claims;
    for name in path {
        match value.get(name.as_ref()) {
            Some(v) => value = v,
            None => return Vec::new(),
        }
    }
    match value {
        Value::Array(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other).into_iter().collect(),
    }
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// The outcome of a request's tokens, when none was refused.
#[derive(Clone, Debug, Default)]
pub struct Authenticated {
    /// The first verified token.
    pub jwt: Option<Arc<VerifiedJwt>>,
    /// Headers to remove from the request sent on (verified tokens' headers; output headers).
    pub remove: Vec<HeaderName>,
    /// Headers to set on it (output headers of verified tokens).
    pub add: Vec<(HeaderName, HeaderValue)>,
}

/// Why a token was refused: Envoy's reasons, answered with 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum JwtRefusal {
    /// Not three base64url parts of JSON.
    Malformed,
    /// No rule that looks where it was has its `iss`.
    UnknownIssuer,
    /// No key of the set has its `kid` and algorithm.
    NoKey,
    /// No key verifies its signature.
    BadSignature,
    /// Past its `exp`.
    Expired,
    /// Before its `nbf`.
    NotYetValid,
    /// None of the rule's `audiences` is in its `aud`.
    Audience,
    /// The rule's keys are not there (`jwksUri` not fetched, or no key source).
    KeysUnavailable,
}

impl JwtRefusal {
    /// Envoy's text for it, the 401's body.
    pub fn reason(self) -> &'static str {
        match self {
            JwtRefusal::Malformed => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            JwtRefusal::UnknownIssuer => "Jwt issuer is not configured",
            JwtRefusal::NoKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwtRefusal::BadSignature => "Jwt verification fails",
            JwtRefusal::Expired => "Jwt is expired",
            JwtRefusal::NotYetValid => "Jwt not yet valid",
            JwtRefusal::Audience => "Audiences in Jwt are not allowed",
            JwtRefusal::KeysUnavailable => "Jwks remote fetch is failed",
        }
    }
}

/// The keys of rules with `jwksUri`, as the waypoint fetched them, by URI.
pub type FetchedKeys = HashMap<String, Arc<[JwtKey]>>;

/// The `RequestAuthentications` of a state, indexed by target.
#[derive(Debug, Default)]
pub(crate) struct AuthnIndex {
    all: Vec<Arc<RequestAuthn>>,
    by_target: ByTarget<Vec<Arc<RequestAuthn>>>,
    warnings: Vec<String>,
}

impl AuthnIndex {
    /// Translates and indexes `objects`, sorted by namespace and name.
    pub(crate) fn build<'a>(
        objects: impl IntoIterator<Item = &'a k8s::RequestAuthentication>,
        root_namespace: &str,
    ) -> Result<Self, StateError> {
        let mut index = Self::default();
        for object in objects {
            let ra = Arc::new(translate(object, root_namespace, &mut index.warnings)?);
            for target in &ra.targets {
                index
                    .by_target
                    .entry(&ra.namespace, target)
                    .push(Arc::clone(&ra));
            }
            index.all.push(ra);
        }
        Ok(index)
    }

    pub(crate) fn all(&self) -> &[Arc<RequestAuthn>] {
        &self.all
    }

    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The rules that apply at `waypoint` to a request for `services`, in order.
    pub(crate) fn providers(
        &self,
        waypoint: (&str, &str),
        services: &[policy_target::Addressed<'_>],
    ) -> Vec<&JwtProvider> {
        let mut policies: Vec<&Arc<RequestAuthn>> = self
            .by_target
            .applying(waypoint, services)
            .flatten()
            .collect();
        policies.sort_by(|a, b| a.key.cmp(&b.key));
        policies.dedup_by(|a, b| Arc::ptr_eq(a, b));
        policies.iter().flat_map(|p| &p.providers).collect()
    }
}

fn translate(
    ra: &k8s::RequestAuthentication,
    root_namespace: &str,
    warnings: &mut Vec<String>,
) -> Result<RequestAuthn, StateError> {
    let key = policy_key(Kind::RequestAuthentication, &ra.metadata)?;
    let namespace = ra.metadata.namespace();
    let what = format!("RequestAuthentication {key}");
    let spec = &ra.spec;
    if spec.target_refs.is_empty() {
        warnings.push(format!(
            "{what} has no targetRefs: it is for sidecars, which this mesh does not have; only \
             waypoints validate tokens, for the policies that target them, their Services or \
             their class"
        ));
    }
    let targets = policy_target::targets(
        &what,
        (namespace, root_namespace),
        &spec.target_refs,
        warnings,
    );
    let providers = spec
        .jwt_rules
        .iter()
        .enumerate()
        .map(|(rule, r)| provider_of(&key, rule, r, (&what, warnings)))
        .collect();
    Ok(RequestAuthn {
        key,
        namespace: namespace.to_owned(),
        name: ra.metadata.name().to_owned(),
        target_refs: spec.target_refs.len(),
        targets,
        providers,
    })
}

fn provider_of(
    policy: &Arc<str>,
    rule: usize,
    r: &k8s::JwtRule,
    (what, warnings): (&str, &mut Vec<String>),
) -> JwtProvider {
    let header = |name: &str| HeaderName::from_bytes(name.as_bytes()).ok();
    let mut locations: Vec<TokenLocation> = r
        .from_headers
        .iter()
        .filter_map(|h| {
            Some(TokenLocation::Header {
                name: header(&h.name)?,
                prefix: h.prefix.clone(),
            })
        })
        .chain(r.from_params.iter().cloned().map(TokenLocation::Param))
        .chain(r.from_cookies.iter().cloned().map(TokenLocation::Cookie))
        .collect();
    if locations.is_empty() {
        locations = vec![
            TokenLocation::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".to_owned(),
            },
            TokenLocation::Param(DEFAULT_PARAM.to_owned()),
        ];
    }
    let keys = match (&r.jwks, &r.jwks_uri) {
        // Checked when read.
        (Some(jwks), _) => JwtKeys::Inline(parse_jwks(jwks).unwrap_or_default().into()),
        (None, Some(uri)) => JwtKeys::Remote(KeySource::Uri(uri.clone())),
        (None, None) => {
            if let Some(discovery) = KeySource::discovery(&r.issuer) {
                JwtKeys::Remote(discovery)
            } else {
                warnings.push(format!(
                    "{what}: jwtRules[{rule}] (issuer {:?}) has neither jwks nor jwksUri, and \
                     its issuer is not an http or https URL to discover them from: its tokens \
                     are refused",
                    r.issuer
                ));
                JwtKeys::Missing
            }
        }
    };
    JwtProvider {
        policy: Arc::clone(policy),
        rule,
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        locations,
        keys,
        forward_original_token: r.forward_original_token,
        output_payload_to_header: r.output_payload_to_header.as_deref().and_then(header),
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .filter_map(|o| Some((header(&o.header)?, o.claim.clone())))
            .collect(),
        timeout: r.timeout,
    }
}

/// Checks the tokens of `request` against `providers` (see the module documentation);
/// `fetched` has the keys of the rules with `jwksUri`.
pub fn authenticate(
    providers: &[&JwtProvider],
    request: &TokenSource<'_>,
    (fetched, cache): (&FetchedKeys, &VerifiedTokens),
) -> Result<Authenticated, JwtRefusal> {
    let mut outcome = Authenticated::default();
    if providers.is_empty() {
        return Ok(outcome);
    }
    for provider in providers {
        outcome
            .remove
            .extend(provider.output_payload_to_header.iter().cloned());
        outcome.remove.extend(
            provider
                .output_claim_to_headers
                .iter()
                .map(|(h, _)| h.clone()),
        );
    }
    let mut locations: Vec<&TokenLocation> = Vec::new();
    for location in providers.iter().flat_map(|p| &p.locations) {
        if !locations.contains(&location) {
            locations.push(location);
        }
    }
    for location in locations {
        let Some(token) = location.find(request) else {
            continue;
        };
        let cached = cache.get(&token, |policy, rule| {
            let provider = providers.iter().find(|p| {
                Arc::ptr_eq(&p.policy, policy) && p.rule == rule && p.locations.contains(location)
            })?;
            Some((*provider, keys_of(provider, fetched).ok()?))
        });
        let (provider, jwt) = if let Some(hit) = cached {
            hit
        } else {
            let issuer = issuer_of(&token)?;
            let provider = *providers
                .iter()
                .find(|p| p.issuer == issuer && p.locations.contains(location))
                .ok_or(JwtRefusal::UnknownIssuer)?;
            let keys = keys_of(provider, fetched)?;
            let jwt = Arc::new(verified(verify(&token, provider, keys)?));
            cache.put(
                &token,
                cache::Verified::new(provider, keys, Arc::clone(&jwt)),
            );
            (provider, jwt)
        };
        if let TokenLocation::Header { name, .. } = location {
            if !provider.forward_original_token {
                outcome.remove.push(name.clone());
            }
        }
        add_outputs(&mut outcome.add, provider, &token, &jwt.claims);
        if outcome.jwt.is_none() {
            outcome.jwt = Some(jwt);
        }
    }
    Ok(outcome)
}

/// The keys `provider` verifies with.
fn keys_of<'k>(
    provider: &'k JwtProvider,
    fetched: &'k FetchedKeys,
) -> Result<&'k Arc<[JwtKey]>, JwtRefusal> {
    match &provider.keys {
        JwtKeys::Inline(keys) => Ok(keys),
        JwtKeys::Remote(source) => fetched.get(source.url()).ok_or(JwtRefusal::KeysUnavailable),
        JwtKeys::Missing => Err(JwtRefusal::KeysUnavailable),
    }
}

/// The `iss` of a token, read before it is verified (to choose the rule).
fn issuer_of(token: &str) -> Result<String, JwtRefusal> {
    let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
        .map_err(|_| JwtRefusal::Malformed)?
        .claims;
    claims
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(JwtRefusal::UnknownIssuer)
}

fn verify(token: &str, provider: &JwtProvider, keys: &[JwtKey]) -> Result<Value, JwtRefusal> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtRefusal::Malformed)?;
    let candidates: Vec<&JwtKey> = keys
        .iter()
        .filter(|k| k.algorithms.contains(&header.alg))
        .filter(|k| header.kid.is_none() || k.kid == header.kid)
        .collect();
    if candidates.is_empty() {
        return Err(JwtRefusal::NoKey);
    }
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.leeway = CLOCK_SKEW_SECONDS;
    validation.validate_nbf = true;
    validation.set_issuer(&[&provider.issuer]);
    if provider.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&provider.audiences);
        validation.required_spec_claims.insert("aud".to_owned());
    }
    for key in candidates {
        debug_assert_eq!(key.key.family(), header.alg.family());
        match jsonwebtoken::decode::<Value>(token, &key.key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => match e.kind() {
                // Another key may verify it.
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => {}
                ErrorKind::ExpiredSignature => return Err(JwtRefusal::Expired),
                ErrorKind::ImmatureSignature => return Err(JwtRefusal::NotYetValid),
                ErrorKind::InvalidAudience | ErrorKind::MissingRequiredClaim(_) => {
                    return Err(JwtRefusal::Audience)
                }
                _ => return Err(JwtRefusal::Malformed),
            },
        }
    }
    Err(JwtRefusal::BadSignature)
}

fn verified(claims: Value) -> VerifiedJwt {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    let principal = format!(
        "{}/{}",
        text("iss").unwrap_or_default(),
        text("sub").unwrap_or_default()
    );
    let audiences = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    VerifiedJwt {
        principal,
        audiences,
        presenter: text("azp"),
        claims,
    }
}

fn add_outputs(
    add: &mut Vec<(HeaderName, HeaderValue)>,
    provider: &JwtProvider,
    token: &str,
    claims: &Value,
) {
    if let Some(name) = &provider.output_payload_to_header {
        let payload = token.split('.').nth(1).unwrap_or_default();
        if let Ok(value) = HeaderValue::from_str(payload) {
            add.push((name.clone(), value));
        }
    }
    for (name, claim) in &provider.output_claim_to_headers {
        let path: Vec<&str> = claim.split('.').collect();
        let values = claim_values(claims, &path);
        if values.is_empty() {
            continue;
        }
        if let Ok(value) = HeaderValue::from_str(&values.join(",")) {
            add.push((name.clone(), value));
        }
    }
}

mod cache;
pub use cache::VerifiedTokens;

#[cfg(test)]
mod tests;
