//! Test tokens: JSON Web Tokens signed with the test-only keys of `mesh-cluster`'s test data
//! (generated for these tests, used nowhere else), and the key sets that verify them, for the
//! waypoint's `RequestAuthentication` tests and benchmark.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

const EC_PEM: &str = include_str!("../../mesh-cluster/src/testdata/jwt-test-ec.pem");
const RSA_PEM: &str = include_str!("../../mesh-cluster/src/testdata/jwt-test-rsa.pem");

/// The EC key's public half (`ES256`, `kid` `ec-1`), as a JSON Web Key Set.
pub const JWKS_EC: &str = include_str!("../../mesh-cluster/src/testdata/jwt-test-ec.jwks.json");

/// The RSA key's public half (`RS256`, `kid` `rsa-1`), as a JSON Web Key Set.
pub const JWKS_RSA: &str = include_str!("../../mesh-cluster/src/testdata/jwt-test-rsa.jwks.json");

/// Which test key signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKey {
    /// `ES256`, `kid` `ec-1` ([`JWKS_EC`]).
    Ec,
    /// `RS256`, `kid` `rsa-1` ([`JWKS_RSA`]).
    Rsa,
}

/// A token of `claims` signed with `key`.
pub fn sign(key: TestKey, claims: &Value) -> String {
    let (alg, kid, encoding) = match key {
        TestKey::Ec => (
            Algorithm::ES256,
            "ec-1",
            EncodingKey::from_ec_pem(EC_PEM.as_bytes()),
        ),
        TestKey::Rsa => (
            Algorithm::RS256,
            "rsa-1",
            EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()),
        ),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &encoding.expect("the test key"))
        .expect("the test key signs")
}

/// Seconds since the Unix epoch, as `exp` and `nbf` count them.
pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}
