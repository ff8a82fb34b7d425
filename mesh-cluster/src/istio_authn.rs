//! Istio's `RequestAuthentication` (`security.istio.io` `v1` and `v1beta1`, which have the same
//! schema) and its deserialization; re-exported by [`super::k8s`]. How the waypoints validate
//! the tokens is in [`super::authn`].
//!
//! Checked when parsed, so that an error names the field path and the line (a file with an
//! invalid object keeps its last good objects):
//!
//! - every struct refuses fields it does not know; `selector` has `matchLabels` only;
//! - `selector` and `targetRef`/`targetRefs` are not both set;
//! - each `jwtRules` entry has an `issuer`; no `audiences`, `fromParams` or `fromCookies`
//!   value is empty;
//! - `jwks`, when given, is a JSON Web Key Set whose every key is one a token can be checked
//!   with (RSA, EC P-256/P-384, Ed25519, or a symmetric `oct` key; an `alg` the key's type
//!   signs with);
//! - `jwksUri`, when given, is an absolute `http` or `https` URL;
//! - `fromHeaders[].name`, `outputPayloadToHeader` and `outputClaimToHeaders[].header` are
//!   HTTP header names; `outputClaimToHeaders[].claim` is not empty;
//! - `timeout` is a duration.

use serde::{Deserialize, Deserializer};

use super::{
    istio::WorkloadSelector,
    istio_authz::{target_refs, PolicyTargetRef, SelectorFields},
    istio_traffic::parse_istio_duration,
    jwks::JwksError,
    meta::{nullable, ObjectMeta},
    schema::{deserialize_checked, Checked, List},
};

/// `apiVersion`s of `RequestAuthentication` the agent reads.
pub const REQUEST_AUTHENTICATION_VERSIONS: [&str; 2] =
    ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Why a `RequestAuthentication` spec is refused. The parser prefixes each with the field path
/// and appends the line.
#[derive(Debug, thiserror::Error)]
pub enum AuthnSchemaError {
    #[error(
        "`selector` and `{0}` cannot both be set (Istio: only one of targetRefs or \
         workloadSelector)"
    )]
    SelectorAndTargetRef(&'static str),
    #[error("`issuer` must be set")]
    NoIssuer,
    #[error("{field}[{index}]: empty value not allowed")]
    EmptyValue { field: &'static str, index: usize },
    #[error("jwks: not a JSON Web Key Set: {0}")]
    Jwks(String),
    #[error("jwks.keys[{index}]: {problem}")]
    JwksKey { index: usize, problem: String },
    #[error("jwksUri {0:?} is not an absolute http or https URL")]
    JwksUri(String),
    #[error("{field}: {value:?} is not an HTTP header name")]
    HeaderName { field: &'static str, value: String },
    #[error("`claim` must not be empty")]
    EmptyClaim,
    #[error("timeout: {0:?} is not a duration")]
    Timeout(String),
}

/// A `security.istio.io` `RequestAuthentication`: the JSON Web Tokens a waypoint (or, with a
/// selector, a sidecar, which this mesh does not have) accepts.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RequestAuthentication {
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// `spec`; absent or `null` reads as the default (no rules).
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RequestAuthenticationSpec,
}

/// `spec` of a `RequestAuthentication`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestAuthenticationSpec {
    /// `selector`: for sidecars (none here).
    pub selector: Option<WorkloadSelector>,
    /// `targetRef` and `targetRefs`: the waypoints' targets.
    pub target_refs: Vec<PolicyTargetRef>,
    /// `jwtRules`.
    pub jwt_rules: Vec<JwtRule>,
}

/// An entry of `jwtRules`: one issuer's tokens, where to find them and how to check them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtRule {
    /// `issuer`: the `iss` its tokens carry.
    pub issuer: String,
    /// `audiences`: one must be in a token's `aud` (none: `aud` is not checked).
    pub audiences: Vec<String>,
    /// `jwksUri`.
    pub jwks_uri: Option<String>,
    /// `jwks`: the key set inline, checked to be one.
    pub jwks: Option<String>,
    /// `fromHeaders`.
    pub from_headers: Vec<JwtHeader>,
    /// `fromParams`.
    pub from_params: Vec<String>,
    /// `fromCookies`.
    pub from_cookies: Vec<String>,
    /// `outputPayloadToHeader`: a header for the verified payload (base64url).
    pub output_payload_to_header: Option<String>,
    /// `forwardOriginalToken`: keep the token's header on the request sent on.
    pub forward_original_token: bool,
    /// `outputClaimToHeaders`.
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// `timeout`: of a fetch of `jwksUri`.
    pub timeout: Option<std::time::Duration>,
}

/// An entry of `fromHeaders`: the header a token is in, after `prefix`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtHeader {
    /// `name`.
    pub name: String,
    /// `prefix` (e.g. `Bearer `).
    pub prefix: String,
}

/// An entry of `outputClaimToHeaders`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimToHeader {
    /// `header`: set to the claim's value.
    pub header: String,
    /// `claim`: a top-level claim, or a nested one as `a.b`.
    pub claim: String,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SpecFields {
    selector: Option<SelectorFields>,
    target_ref: Option<PolicyTargetRef>,
    target_refs: List<PolicyTargetRef>,
    jwt_rules: List<JwtRule>,
}

impl Checked for RequestAuthenticationSpec {
    type Error = AuthnSchemaError;
    type Fields = SpecFields;
    const WHAT: &'static str = "a RequestAuthentication spec";

    fn check(fields: SpecFields) -> Result<Self, AuthnSchemaError> {
        let target_refs = target_refs(
            fields.target_ref,
            fields.target_refs.0,
            fields.selector.is_some(),
        )
        .map_err(AuthnSchemaError::SelectorAndTargetRef)?;
        Ok(Self {
            selector: fields.selector.map(SelectorFields::into_selector),
            target_refs,
            jwt_rules: fields.jwt_rules.0,
        })
    }
}

impl<'de> Deserialize<'de> for RequestAuthenticationSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct JwtRuleFields {
    issuer: String,
    audiences: List<String>,
    jwks_uri: Option<String>,
    jwks: Option<String>,
    from_headers: List<JwtHeader>,
    from_params: List<String>,
    from_cookies: List<String>,
    output_payload_to_header: Option<String>,
    forward_original_token: bool,
    output_claim_to_headers: List<ClaimToHeader>,
    timeout: Option<String>,
}

impl Checked for JwtRule {
    type Error = AuthnSchemaError;
    type Fields = JwtRuleFields;
    const WHAT: &'static str = "a JWT rule";

    fn check(f: JwtRuleFields) -> Result<Self, AuthnSchemaError> {
        if f.issuer.is_empty() {
            return Err(AuthnSchemaError::NoIssuer);
        }
        for (field, list) in [
            ("audiences", &f.audiences.0),
            ("fromParams", &f.from_params.0),
            ("fromCookies", &f.from_cookies.0),
        ] {
            if let Some(index) = list.iter().position(String::is_empty) {
                return Err(AuthnSchemaError::EmptyValue { field, index });
            }
        }
        if let Some(jwks) = &f.jwks {
            crate::jwks::parse_jwks(jwks).map_err(|e| match e {
                JwksError::Set(problem) => AuthnSchemaError::Jwks(problem),
                JwksError::Key { index, problem } => AuthnSchemaError::JwksKey { index, problem },
            })?;
        }
        if let Some(uri) = &f.jwks_uri {
            check_uri(uri)?;
        }
        for header in &f.from_headers.0 {
            header_name("fromHeaders[].name", &header.name)?;
        }
        if let Some(header) = &f.output_payload_to_header {
            header_name("outputPayloadToHeader", header)?;
        }
        for output in &f.output_claim_to_headers.0 {
            header_name("outputClaimToHeaders[].header", &output.header)?;
            if output.claim.is_empty() {
                return Err(AuthnSchemaError::EmptyClaim);
            }
        }
        let timeout = f
            .timeout
            .map(|t| parse_istio_duration(&t).map_err(|_| AuthnSchemaError::Timeout(t)))
            .transpose()?;
        Ok(Self {
            issuer: f.issuer,
            audiences: f.audiences.0,
            jwks_uri: f.jwks_uri,
            jwks: f.jwks,
            from_headers: f.from_headers.0,
            from_params: f.from_params.0,
            from_cookies: f.from_cookies.0,
            output_payload_to_header: f.output_payload_to_header,
            forward_original_token: f.forward_original_token,
            output_claim_to_headers: f.output_claim_to_headers.0,
            timeout,
        })
    }
}

impl<'de> Deserialize<'de> for JwtRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_checked(deserializer)
    }
}

fn header_name(field: &'static str, value: &str) -> Result<(), AuthnSchemaError> {
    http::HeaderName::from_bytes(value.as_bytes())
        .map(drop)
        .map_err(|_| AuthnSchemaError::HeaderName {
            field,
            value: value.to_owned(),
        })
}

fn check_uri(uri: &str) -> Result<(), AuthnSchemaError> {
    let parsed: http::Uri = uri
        .parse()
        .map_err(|_| AuthnSchemaError::JwksUri(uri.to_owned()))?;
    let scheme_ok = matches!(parsed.scheme_str(), Some("http" | "https"));
    if !scheme_ok || parsed.host().is_none_or(str::is_empty) {
        return Err(AuthnSchemaError::JwksUri(uri.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
