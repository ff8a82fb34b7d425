//! Tests of `RequestAuthentication` at the waypoints: which rules apply, where tokens are found,
//! every reason a token is refused, and what a verified token gives the request.

use std::net::IpAddr;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::{
    authenticate, Authenticated, FetchedKeys, JwtRefusal, KeySource, TokenSource, VerifiedTokens,
};
use crate::{k8s::parse_documents, ClusterState, EnrollmentOptions};

/// Test-only keys (generated for these tests; never used elsewhere).
const EC_PEM: &str = include_str!("../testdata/jwt-test-ec.pem");
const RSA_PEM: &str = include_str!("../testdata/jwt-test-rsa.pem");
/// Their public halves, as JSON Web Key Sets (`kid` `ec-1`, `rsa-1`).
const JWKS: &str = include_str!("../testdata/jwt-test-ec.jwks.json");
const RSA_JWKS: &str = include_str!("../testdata/jwt-test-rsa.jwks.json");

const ISSUER: &str = "https://issuer.example";

/// Waypoint `shop/waypoint` with a ready pod; Services `web` and `db`, bound to it.
const SERVICES: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec: {nodeName: n1, serviceAccountName: waypoint}\nstatus: {phase: Running, podIPs: [{ip: 10.0.5.5}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{name: http, port: 80}]\n";

pub(crate) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(EC_PEM.as_bytes()).unwrap(),
        Algorithm::RS256 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap()
        }
        _ => EncodingKey::from_secret(b"secret-of-32-bytes..............").unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn token(claims: &Value) -> String {
    sign(Algorithm::ES256, Some("ec-1"), claims)
}

fn good_claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": ["web", "api"], "azp": "cli",
           "exp": now() + 600, "groups": ["dev", "ops"], "org": {"team": "blue"}, "admin": true})
}

fn request_authn(name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}")
}

fn state(docs: &[String]) -> ClusterState {
    let text = [SERVICES.to_owned()]
        .into_iter()
        .chain(docs.iter().cloned())
        .collect::<Vec<_>>()
        .join("---\n");
    let objects = parse_documents("test.yaml", &text).expect("parses");
    ClusterState::build(&objects, &EnrollmentOptions::new("n0")).expect("builds")
}

/// The rule of `web` with the inline set and `extra` fields.
fn web_rule(extra: &str) -> String {
    let jwks = serde_json::to_string(JWKS).unwrap();
    request_authn(
        "web-jwt",
        &format!("  targetRefs: [{{kind: Service, name: web}}]\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: {jwks}\n{extra}"),
    )
}

fn check(
    state: &ClusterState,
    service: &str,
    headers: &[(&str, &str)],
    query: Option<&str>,
) -> Result<Authenticated, JwtRefusal> {
    check_in(state, (service, headers, query), &FetchedKeys::new())
}

/// As [`check`], with the key sets `fetched`.
fn check_in(
    state: &ClusterState,
    (service, headers, query): (&str, &[(&str, &str)], Option<&str>),
    fetched: &FetchedKeys,
) -> Result<Authenticated, JwtRefusal> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let service = state.service_by_hostname(&format!("{service}.shop.svc.cluster.local"));
    let dst: IpAddr = "10.96.0.10".parse().unwrap();
    let rules = state.jwt_rules_at_waypoint(("shop", "waypoint"), service.map(|s| &**s), dst);
    let source = TokenSource {
        headers: &map,
        query,
    };
    authenticate(&rules, &source, (fetched, &VerifiedTokens::default()))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn a_valid_token_gives_the_request_its_principal_and_claims() {
    let state = state(&[web_rule("    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{header: x-team, claim: org.team}, {header: x-groups, claim: groups}]\n")]);
    let token = token(&good_claims());
    let header = bearer(&token);
    let ok = check(
        &state,
        "web",
        &[("authorization", &header), ("x-team", "forged")],
        None,
    )
    .expect("valid");
    let jwt = ok.jwt.expect("verified");
    assert_eq!(jwt.principal, format!("{ISSUER}/alice"));
    assert_eq!(jwt.audiences, ["web", "api"]);
    assert_eq!(jwt.presenter.as_deref(), Some("cli"));
    assert_eq!(jwt.claim(&["groups"]), ["dev", "ops"]);
    assert_eq!(jwt.claim(&["org", "team"]), ["blue"]);
    assert_eq!(jwt.claim(&["admin"]), ["true"]);
    assert!(jwt.claim(&["org"]).is_empty(), "an object has no value");
    assert!(jwt.claim(&["missing"]).is_empty());
    // The token's header goes (no forwardOriginalToken); the outputs replace what the client
    // sent.
    let removed: Vec<&str> = ok.remove.iter().map(http::HeaderName::as_str).collect();
    for name in ["authorization", "x-jwt-payload", "x-team", "x-groups"] {
        assert!(removed.contains(&name), "{name} removed: {removed:?}");
    }
    let added: Vec<(&str, &str)> = ok
        .add
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
        .collect();
    let payload = token.split('.').nth(1).unwrap();
    assert_eq!(
        added,
        [
            ("x-jwt-payload", payload),
            ("x-team", "blue"),
            ("x-groups", "dev,ops")
        ]
    );
}

#[test]
fn a_request_without_a_token_passes_without_a_principal() {
    let state = state(&[web_rule("    outputPayloadToHeader: x-jwt-payload\n")]);
    let ok = check(&state, "web", &[("x-jwt-payload", "forged")], None).expect("passes");
    assert!(ok.jwt.is_none());
    assert_eq!(
        ok.remove,
        ["x-jwt-payload"],
        "a client cannot forge the output"
    );
    assert!(ok.add.is_empty());
    // Another scheme in `Authorization` is no token of this rule.
    let ok = check(
        &state,
        "web",
        &[("authorization", "Basic dXNlcjpwYXNz")],
        None,
    )
    .unwrap();
    assert!(ok.jwt.is_none());
    // No rule for `db`: nothing is read, nothing removed.
    let forged = bearer("not-even-a-jwt");
    let ok = check(&state, "db", &[("authorization", &forged)], None).unwrap();
    assert!(ok.jwt.is_none() && ok.remove.is_empty());
}

#[test]
fn every_bad_token_is_refused_with_envoys_reason() {
    let state = state(&[web_rule("    audiences: [web]\n")]);
    let with = |claims: Value| bearer(&token(&claims));
    let mut expired = good_claims();
    expired["exp"] = json!(now() - 120);
    let mut skewed = good_claims();
    skewed["exp"] = json!(now() - 30);
    let mut early = good_claims();
    early["nbf"] = json!(now() + 300);
    let mut stranger = good_claims();
    stranger["iss"] = json!("https://evil.example");
    let mut other_audience = good_claims();
    other_audience["aud"] = json!("db");
    let mut no_audience = good_claims();
    no_audience.as_object_mut().unwrap().remove("aud");
    let good = token(&good_claims());
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let admin_payload = {
        let mut c = good_claims();
        c["sub"] = json!("admin");
        token(&c).split('.').nth(1).unwrap().to_owned()
    };
    let tampered = format!("{head}.{admin_payload}.{signature}");
    let hs256 = sign(Algorithm::HS256, Some("ec-1"), &good_claims());
    let rs256 = sign(Algorithm::RS256, Some("ec-1"), &good_claims());
    let unknown_kid = sign(Algorithm::ES256, Some("ec-2"), &good_claims());
    let unsigned = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        good.split('.').nth(1).unwrap()
    );
    let cases: Vec<(String, JwtRefusal)> = vec![
        (with(expired), JwtRefusal::Expired),
        (with(early), JwtRefusal::NotYetValid),
        (with(stranger), JwtRefusal::UnknownIssuer),
        (with(other_audience), JwtRefusal::Audience),
        (with(no_audience), JwtRefusal::Audience),
        (bearer(&tampered), JwtRefusal::BadSignature),
        (bearer(&hs256), JwtRefusal::NoKey),
        (bearer(&rs256), JwtRefusal::NoKey),
        (bearer(&unknown_kid), JwtRefusal::NoKey),
        (bearer(&unsigned), JwtRefusal::Malformed),
        (bearer("a.b"), JwtRefusal::Malformed),
        (bearer("%%%.%%%.%%%"), JwtRefusal::Malformed),
    ];
    for (header, refusal) in cases {
        let got = check(&state, "web", &[("authorization", &header)], None);
        assert_eq!(got.err(), Some(refusal), "{header}");
    }
    // Within the 60 s of clock skew, and without `kid`, a key of the algorithm verifies it.
    assert!(check(&state, "web", &[("authorization", &with(skewed))], None).is_ok());
    let no_kid = bearer(&sign(Algorithm::ES256, None, &good_claims()));
    assert!(check(&state, "web", &[("authorization", &no_kid)], None).is_ok());
    // A bad token in the default query parameter is refused too.
    let query = format!("a=1&access_token={tampered}");
    assert_eq!(
        check(&state, "web", &[], Some(&query)).err(),
        Some(JwtRefusal::BadSignature)
    );
}

fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[test]
fn tokens_are_read_where_the_rule_says() {
    let custom = web_rule(
        "    fromHeaders: [{name: x-token, prefix: \"Token \"}]\n    fromParams: [jwt]\n    fromCookies: [session]\n    forwardOriginalToken: true\n",
    );
    let state = state(&[custom]);
    let good = token(&good_claims());
    let in_header = format!("Token {good}");
    let in_cookie = format!("theme=dark; session={good}");
    let in_param = format!("jwt={good}");
    for (headers, query) in [
        (vec![("x-token", in_header.as_str())], None),
        (vec![("cookie", in_cookie.as_str())], None),
        (vec![], Some(in_param.as_str())),
    ] {
        let ok = check(&state, "web", &headers, query).expect("valid");
        assert!(ok.jwt.is_some(), "{headers:?} {query:?}");
        assert!(
            ok.remove.is_empty(),
            "forwardOriginalToken keeps the header"
        );
    }
    // The default places are not read when the rule names its own.
    let default = bearer(&good);
    let ok = check(
        &state,
        "web",
        &[("authorization", &default)],
        Some(&format!("access_token={good}")),
    )
    .unwrap();
    assert!(ok.jwt.is_none());
}

#[test]
fn rules_apply_by_target_and_add_up() {
    let rsa = serde_json::to_string(RSA_JWKS).unwrap();
    let other_issuer = request_authn(
        "gw-jwt",
        &format!("  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  jwtRules:\n  - issuer: https://other.example\n    jwks: {rsa}\n"),
    );
    let state = state(&[web_rule(""), other_issuer]);
    let claims = json!({"iss": "https://other.example", "sub": "bob", "exp": now() + 60});
    let rsa_token = bearer(&sign(Algorithm::RS256, Some("rsa-1"), &claims));
    let ps_token = bearer(&sign(Algorithm::PS256, None, &claims));
    let ec_token = bearer(&token(&good_claims()));
    // At `web`, both policies apply: each issuer's tokens verify with its own keys.
    for header in [&rsa_token, &ec_token] {
        assert!(check(&state, "web", &[("authorization", header)], None)
            .unwrap()
            .jwt
            .is_some());
    }
    // The RSA key's `alg` is RS256: a PS256 token is not one it verifies.
    assert_eq!(
        check(&state, "web", &[("authorization", &ps_token)], None).err(),
        Some(JwtRefusal::NoKey)
    );
    // At `db`, only the Gateway's: the other issuer is not configured there.
    assert!(check(&state, "db", &[("authorization", &rsa_token)], None)
        .unwrap()
        .jwt
        .is_some());
    assert_eq!(
        check(&state, "db", &[("authorization", &ec_token)], None).err(),
        Some(JwtRefusal::UnknownIssuer)
    );
}

#[test]
fn keys_from_a_uri_fail_closed_until_fetched() {
    let remote = request_authn(
        "remote",
        &format!("  targetRefs: [{{kind: Service, name: web}}]\n  jwtRules:\n  - issuer: {ISSUER}\n    jwksUri: http://keys.example/jwks.json\n    timeout: 2s\n"),
    );
    let state = state(&[remote]);
    assert_eq!(
        state.key_sources_at_waypoint(("shop", "waypoint")),
        [(
            KeySource::Uri("http://keys.example/jwks.json".to_owned()),
            Some(std::time::Duration::from_secs(2))
        )]
    );
    assert!(state.key_sources_at_waypoint(("shop", "other")).is_empty());
    let header = bearer(&token(&good_claims()));
    assert_eq!(
        check(&state, "web", &[("authorization", &header)], None).err(),
        Some(JwtRefusal::KeysUnavailable)
    );
    // Once fetched, they verify.
    let mut fetched = FetchedKeys::new();
    fetched.insert(
        "http://keys.example/jwks.json".to_owned(),
        crate::jwks::parse_jwks(JWKS).unwrap().into(),
    );
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, header.parse().unwrap());
    let service = state
        .service_by_hostname("web.shop.svc.cluster.local")
        .cloned();
    let rules = state.jwt_rules_at_waypoint(
        ("shop", "waypoint"),
        service.as_deref(),
        "10.96.0.10".parse().unwrap(),
    );
    let source = TokenSource {
        headers: &headers,
        query: None,
    };
    let cache = VerifiedTokens::default();
    assert!(authenticate(&rules, &source, (&fetched, &cache))
        .unwrap()
        .jwt
        .is_some());
    // Fetched again (a new set, here without the key), the cached verification does not hold.
    let mut refetched = FetchedKeys::new();
    refetched.insert(
        "http://keys.example/jwks.json".to_owned(),
        crate::jwks::parse_jwks(RSA_JWKS).unwrap().into(),
    );
    assert_eq!(
        authenticate(&rules, &source, (&refetched, &cache)).err(),
        Some(JwtRefusal::NoKey)
    );
}

#[test]
fn keys_of_an_issuer_without_jwks_are_discovered_from_its_openid_configuration() {
    // As istiod: neither `jwks` nor `jwksUri`, so the issuer's discovery document names them.
    let discovered = request_authn(
        "discovered",
        "  targetRefs: [{kind: Service, name: web}]\n  jwtRules:\n  - issuer: https://idp.example/realms/shop/\n",
    );
    let state = state(&[discovered]);
    let source = KeySource::Discovery(
        "https://idp.example/realms/shop/.well-known/openid-configuration".to_owned(),
    );
    assert_eq!(
        state.key_sources_at_waypoint(("shop", "waypoint")),
        [(source.clone(), None)]
    );
    // Its tokens are refused until the set is fetched, then verify with it.
    let claims =
        json!({"iss": "https://idp.example/realms/shop/", "sub": "a", "exp": 4_000_000_000_u64});
    let header = bearer(&token(&claims));
    assert_eq!(
        check(&state, "web", &[("authorization", &header)], None).err(),
        Some(JwtRefusal::KeysUnavailable)
    );
    let mut fetched = FetchedKeys::new();
    fetched.insert(
        source.url().to_owned(),
        crate::jwks::parse_jwks(JWKS).unwrap().into(),
    );
    let verified = check_in(
        &state,
        ("web", &[("authorization", &header)], None),
        &fetched,
    );
    assert!(verified.unwrap().jwt.is_some());
}

#[test]
fn policies_nothing_applies_are_warned_about() {
    let selector = request_authn(
        "sidecar",
        &format!("  selector: {{matchLabels: {{app: web}}}}\n  jwtRules: [{{issuer: {ISSUER}, jwksUri: \"https://keys.example/j\"}}]\n"),
    );
    let unbound = request_authn(
        "nowhere",
        "  targetRefs: [{kind: Service, name: missing-waypoint}, {kind: WorkloadEntry, group: networking.istio.io, name: x}]\n  jwtRules: [{issuer: accounts.example}]\n",
    );
    let state = state(&[selector, unbound]);
    let warnings = state.warnings().join("\n");
    for expected in [
        "RequestAuthentication shop/sidecar has no targetRefs: it is for sidecars",
        "RequestAuthentication shop/nowhere: targetRefs[1] (WorkloadEntry/x, group \"networking.istio.io\") applies to nothing",
        "RequestAuthentication shop/nowhere: jwtRules[0] (issuer \"accounts.example\") has neither jwks nor jwksUri, and its issuer is not an http or https URL",
    ] {
        assert!(warnings.contains(expected), "{expected:?} in {warnings}");
    }
}

#[test]
fn a_verified_token_is_checked_once_per_rule_and_key_set() {
    let cache = VerifiedTokens::default();
    let header = bearer(&token(&good_claims()));
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, header.parse().unwrap());
    let source = TokenSource {
        headers: &headers,
        query: None,
    };
    let at = |state: &ClusterState| {
        let service = state
            .service_by_hostname("web.shop.svc.cluster.local")
            .cloned();
        let rules: Vec<super::JwtProvider> = state
            .jwt_rules_at_waypoint(
                ("shop", "waypoint"),
                service.as_deref(),
                "10.96.0.10".parse().unwrap(),
            )
            .into_iter()
            .cloned()
            .collect();
        rules
    };
    let first = state(&[web_rule("")]);
    let rules = at(&first);
    let refs: Vec<&super::JwtProvider> = rules.iter().collect();
    let fetched = FetchedKeys::new();
    let one = authenticate(&refs, &source, (&fetched, &cache))
        .unwrap()
        .jwt
        .unwrap();
    let two = authenticate(&refs, &source, (&fetched, &cache))
        .unwrap()
        .jwt
        .unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&one, &two),
        "the second use is the cached verification"
    );
    assert_eq!(cache.len(), 1);
    // A new cluster view whose rule has other keys: the token is checked again, and refused.
    let rsa = serde_json::to_string(RSA_JWKS).unwrap();
    let changed = state(&[request_authn(
        "web-jwt",
        &format!("  targetRefs: [{{kind: Service, name: web}}]\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: {rsa}\n"),
    )]);
    let rules = at(&changed);
    let refs: Vec<&super::JwtProvider> = rules.iter().collect();
    assert_eq!(
        authenticate(&refs, &source, (&fetched, &cache)).err(),
        Some(JwtRefusal::NoKey)
    );
    // Bounded: past its capacity it starts over.
    let rules = at(&first);
    let refs: Vec<&super::JwtProvider> = rules.iter().collect();
    for n in 0..super::cache::CAPACITY + 10 {
        let mut claims = good_claims();
        claims["n"] = json!(n);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            bearer(&token(&claims)).parse().unwrap(),
        );
        let source = TokenSource {
            headers: &headers,
            query: None,
        };
        assert!(authenticate(&refs, &source, (&fetched, &cache)).is_ok());
    }
    assert!(cache.len() <= super::cache::CAPACITY, "{}", cache.len());
}
