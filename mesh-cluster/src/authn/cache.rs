//! Tokens verified recently, so that a client sending the same token with each request pays
//! for its signature once (Envoy's `jwt_authn` keeps such a cache too). An entry is the token,
//! the rule that verified it, the keys it was verified with and what it gave; it is used only
//! for that same rule (the same object of the same cluster view: a changed policy is a new
//! one) with the same keys (a key set fetched again is a new one), and only while its `exp`
//! and `nbf` still hold. The cache holds [`CAPACITY`] tokens and starts over when full.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use serde_json::Value;

use super::{JwtKey, JwtProvider, VerifiedJwt, CLOCK_SKEW_SECONDS};

/// Most tokens kept (Envoy's default cache size is 100).
pub const CAPACITY: usize = 256;

/// What a token gave when its rule verified it.
#[derive(Clone, Debug)]
pub(super) struct Verified {
    /// The rule: its policy (the object, compared by address) and index.
    policy: Arc<str>,
    rule: usize,
    /// The keys it was verified with, compared by address.
    keys: Arc<[JwtKey]>,
    pub(super) jwt: Arc<VerifiedJwt>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

impl Verified {
    pub(super) fn new(provider: &JwtProvider, keys: &Arc<[JwtKey]>, jwt: Arc<VerifiedJwt>) -> Self {
        let time = |name: &str| jwt.claims.get(name).and_then(Value::as_u64);
        Self {
            policy: Arc::clone(&provider.policy),
            rule: provider.rule,
            keys: Arc::clone(keys),
            exp: time("exp"),
            nbf: time("nbf"),
            jwt,
        }
    }

    /// Whether it stands for its rule's `keys` now (seconds since the epoch).
    fn holds(&self, keys: &Arc<[JwtKey]>, now: u64) -> bool {
        Arc::ptr_eq(&self.keys, keys)
            && self.exp.is_none_or(|exp| exp + CLOCK_SKEW_SECONDS >= now)
            && self.nbf.is_none_or(|nbf| nbf <= now + CLOCK_SKEW_SECONDS)
    }
}

/// The cache; one per waypoint.
#[derive(Debug, Default)]
pub struct VerifiedTokens {
    tokens: Mutex<HashMap<String, Verified>>,
}

impl VerifiedTokens {
    /// The rule that verified `token` and what it gave, if `rule_now` (given the policy and
    /// index of the rule that verified it) finds that rule among those that apply now, with
    /// the same keys, and the token's `exp` and `nbf` still hold.
    pub(super) fn get<'p>(
        &self,
        token: &str,
        rule_now: impl FnOnce(&Arc<str>, usize) -> Option<(&'p JwtProvider, &'p Arc<[JwtKey]>)>,
    ) -> Option<(&'p JwtProvider, Arc<VerifiedJwt>)> {
        let verified = {
            let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            tokens.get(token)?.clone()
        };
        let (provider, keys) = rule_now(&verified.policy, verified.rule)?;
        let now = jsonwebtoken::get_current_timestamp();
        let holds = verified.holds(keys, now);
        holds.then_some((provider, verified.jwt))
    }

    pub(super) fn put(&self, token: &str, verified: Verified) {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        if tokens.len() >= CAPACITY {
            tokens.clear();
        }
        tokens.insert(token.to_owned(), verified);
    }

    /// How many tokens it holds.
    pub fn len(&self) -> usize {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
