//! JSON Web Key Sets: the keys a `RequestAuthentication` rule verifies tokens with, read from
//! `jwks` when the object is read ([`super::istio_authn`]) and from what a waypoint fetches
//! from `jwksUri`. A key is one a token can be checked with (RSA, EC P-256/P-384, Ed25519, or a
//! symmetric `oct` key), with the algorithms it verifies: its `alg` when given (which its type
//! must sign with), else every one of its type and curve. Encryption keys (`use: enc`) are
//! refused.

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse},
    Algorithm, DecodingKey,
};

/// Why a key set is refused.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("not a JSON Web Key Set: {0}")]
    Set(String),
    #[error("keys[{index}]: {problem}")]
    Key { index: usize, problem: String },
}

/// A key of a rule's key set.
#[derive(Clone)]
pub struct JwtKey {
    pub(crate) kid: Option<String>,
    /// The algorithms this key verifies (its `alg`, or every one of its type and curve).
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The keys of a JSON Web Key Set.
pub fn parse_jwks(text: &str) -> Result<Vec<JwtKey>, JwksError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| JwksError::Set(e.to_string()))?;
    set.keys
        .iter()
        .enumerate()
        .map(|(index, jwk)| key_of(jwk).map_err(|problem| JwksError::Key { index, problem }))
        .collect()
}

fn key_of(jwk: &Jwk) -> Result<JwtKey, String> {
    if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
        return Err("`use: enc`: an encryption key does not verify signatures".to_owned());
    }
    let of_type: &[Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            ref other => return Err(format!("curve {other:?} is not supported (P-256, P-384)")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            ref other => return Err(format!("curve {other:?} is not supported (Ed25519)")),
        },
        AlgorithmParameters::OctetKey(_) => &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        _ => return Err("key type not supported".to_owned()),
    };
    let algorithms = match jwk.common.key_algorithm {
        None => of_type.to_vec(),
        Some(alg) => {
            let alg = Algorithm::try_from(alg)
                .ok()
                .filter(|a| of_type.contains(a))
                .ok_or_else(|| format!("alg {alg} does not sign with this key's type"))?;
            vec![alg]
        }
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok(JwtKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}
