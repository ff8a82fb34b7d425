//! Tests of `RequestAuthentication` parsing: every field, and Istio's checks with the field
//! path and line in each error.

use super::RequestAuthentication;
use crate::k8s::{parse_documents, Object};

const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": "WmuLj1s4rSYpKgUUoqmKT1jLWS8U0qHsc7cmXs4nJQ4", "y": "RNh5kTV1HSLbS1gmv3DpGDjmgHr58xoKwJDAe9059nw"}]}"#;

/// `shop/x` with `body` as its spec (the spec's fields start at line 7).
fn doc(body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: x\n  namespace: shop\nspec:\n{body}"
    )
}

#[test]
fn parses_every_field() {
    let jwks = serde_json::to_string(JWKS).unwrap();
    let text = doc(&format!(
        "  targetRefs:\n  - {{kind: Service, name: web}}\n  jwtRules:\n  - issuer: https://a.example\n    audiences: [web]\n    jwks: {jwks}\n    fromHeaders: [{{name: x-jwt, prefix: \"Bearer \"}}]\n    fromParams: [t]\n    fromCookies: [c]\n    outputPayloadToHeader: x-payload\n    forwardOriginalToken: true\n    outputClaimToHeaders: [{{header: x-sub, claim: sub}}]\n  - issuer: https://b.example\n    jwksUri: https://b.example/keys\n    timeout: 1500ms\n"
    ));
    let objects = parse_documents("ra.yaml", &text).expect("parses");
    let [Object::RequestAuthentication(RequestAuthentication { spec, .. })] = objects.as_slice()
    else {
        panic!("one RequestAuthentication: {objects:?}");
    };
    assert_eq!(spec.target_refs[0].to_string(), "Service/web");
    let [a, b] = spec.jwt_rules.as_slice() else {
        panic!("two rules")
    };
    assert_eq!(a.audiences, ["web"]);
    assert_eq!(a.from_headers[0].prefix, "Bearer ");
    assert_eq!(
        (a.from_params[0].as_str(), a.from_cookies[0].as_str()),
        ("t", "c")
    );
    assert!(a.forward_original_token);
    assert_eq!(a.output_claim_to_headers[0].claim, "sub");
    assert_eq!(b.jwks_uri.as_deref(), Some("https://b.example/keys"));
    assert_eq!(b.timeout, Some(std::time::Duration::from_millis(1500)));
    // v1beta1 reads the same; an empty spec is no rule.
    let beta = "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {name: y, namespace: shop}\n";
    assert_eq!(parse_documents("ra.yaml", beta).unwrap().len(), 1);
}

#[test]
fn refuses_what_istio_refuses_naming_field_and_line() {
    let bad_key = r#"{"keys": [{"kty": "EC", "crv": "P-256", "alg": "RS256", "x": "WmuLj1s4rSYpKgUUoqmKT1jLWS8U0qHsc7cmXs4nJQ4", "y": "RNh5kTV1HSLbS1gmv3DpGDjmgHr58xoKwJDAe9059nw"}]}"#;
    let bad_key = serde_json::to_string(bad_key).unwrap();
    let enc_key =
        serde_json::to_string(r#"{"keys": [{"kty": "oct", "use": "enc", "k": "c2VjcmV0"}]}"#)
            .unwrap();
    for (body, expected) in [
        (
            "  jwtRules: [{audiences: [a]}]\n",
            "spec.jwtRules[0]: `issuer` must be set at line 7",
        ),
        (
            "  jwtRules: [{issuer: a, audiences: [\"\"]}]\n",
            "audiences[0]: empty value not allowed",
        ),
        (
            "  jwtRules: [{issuer: a, jwks: \"{\"}]\n",
            "jwks: not a JSON Web Key Set",
        ),
        (
            &format!("  jwtRules: [{{issuer: a, jwks: {bad_key}}}]\n"),
            "jwks.keys[0]: alg RS256 does not sign with this key's type",
        ),
        (
            &format!("  jwtRules: [{{issuer: a, jwks: {enc_key}}}]\n"),
            "jwks.keys[0]: `use: enc`: an encryption key does not verify signatures",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: \"ftp://x/k\"}]\n",
            "jwksUri \"ftp://x/k\" is not an absolute http or https URL",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: /keys}]\n",
            "jwksUri \"/keys\" is not an absolute",
        ),
        (
            "  jwtRules: [{issuer: a, fromHeaders: [{name: \"bad header\"}]}]\n",
            "fromHeaders[].name: \"bad header\" is not an HTTP header name",
        ),
        (
            "  jwtRules: [{issuer: a, outputClaimToHeaders: [{header: x-a}]}]\n",
            "`claim` must not be empty",
        ),
        (
            "  jwtRules: [{issuer: a, timeout: soon}]\n",
            "timeout: \"soon\" is not a duration",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUrl: http://x/k}]\n",
            "unknown field `jwksUrl`",
        ),
        (
            "  selector: {matchLabels: {a: b}}\n  targetRef: {kind: Service, name: web}\n",
            "`selector` and `targetRef` cannot both be set",
        ),
    ] {
        let err = parse_documents("ra.yaml", &doc(body))
            .expect_err(body)
            .to_string();
        assert!(
            err.starts_with("ra.yaml: document 1: RequestAuthentication shop/x: "),
            "{err}"
        );
        assert!(err.contains(expected), "{expected:?} in {err:?}");
    }
}
