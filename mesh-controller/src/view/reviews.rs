//! The view's memory of tokens it has reviewed, as the API server's token webhook keeps one
//! (`--authentication-token-webhook-cache-ttl`): a waypoint opens a watch per kind at start
//! and at every relist, all with the same token, and one `TokenReview` answers for all of them
//! for [`TTL`]. Only authenticated service accounts are kept (a refused token is reviewed again
//! at its next request, so it cannot fill the memory), at most [`MAX`] of them.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// How long a review answers for its token: short beside a projected token's life (an hour or
/// more), so a token the API server stops taking (its pod deleted) is refused soon after.
pub const TTL: Duration = Duration::from_secs(60);
/// Most tokens kept (a waypoint pod sends one at a time).
pub const MAX: usize = 4096;

/// A service account, as a token is reviewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl Account {
    /// `system:serviceaccount:<namespace>:<name>`, the user name of an account's token.
    pub fn of_username(username: &str) -> Option<Self> {
        let (namespace, name) = username
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The service account each recent token was reviewed as, and when.
#[derive(Debug, Default)]
pub struct Reviews {
    accounts: Mutex<HashMap<String, (Instant, Account)>>,
}

impl Reviews {
    /// The account `token` was reviewed as less than [`TTL`] before `now`.
    pub fn get(&self, token: &str, now: Instant) -> Option<Account> {
        let accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        accounts
            .get(token)
            .filter(|(at, _)| now.saturating_duration_since(*at) < TTL)
            .map(|(_, account)| account.clone())
    }

    /// Keeps that `token` was reviewed as `account` at `now`; the expired are dropped first,
    /// and when [`MAX`] are still kept, the oldest.
    pub fn put(&self, token: &str, account: Account, now: Instant) {
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        if accounts.len() >= MAX {
            accounts.retain(|_, (at, _)| now.saturating_duration_since(*at) < TTL);
        }
        if accounts.len() >= MAX {
            let oldest = accounts
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(token, _)| token.clone());
            if let Some(oldest) = oldest {
                accounts.remove(&oldest);
            }
        }
        accounts.insert(token.to_owned(), (now, account));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> Account {
        Account {
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        }
    }

    #[test]
    fn a_token_names_a_service_account_or_nothing() {
        assert_eq!(
            Account::of_username("system:serviceaccount:shop:wp"),
            Some(account("wp"))
        );
        for other in [
            "system:admin",
            "system:serviceaccount:shop",
            "system:serviceaccount::wp",
            "system:serviceaccount:shop:",
            "system:serviceaccount:a:b:c",
            "alice",
        ] {
            assert_eq!(Account::of_username(other), None, "{other}");
        }
    }

    #[test]
    fn a_review_answers_for_its_token_until_it_expires() {
        let reviews = Reviews::default();
        let start = Instant::now();
        assert_eq!(reviews.get("t1", start), None);
        reviews.put("t1", account("wp"), start);
        assert_eq!(reviews.get("t1", start + TTL / 2), Some(account("wp")));
        assert_eq!(reviews.get("t2", start + TTL / 2), None);
        assert_eq!(reviews.get("t1", start + TTL), None, "expired");
        reviews.put("t1", account("wp"), start + TTL);
        assert_eq!(reviews.get("t1", start + TTL), Some(account("wp")));
    }

    #[test]
    fn the_memory_is_bounded_dropping_the_expired_then_the_oldest() {
        let reviews = Reviews::default();
        let start = Instant::now();
        for i in 0..MAX {
            reviews.put(&format!("t{i}"), account("wp"), start);
        }
        // All still fresh: the oldest (here any of the first batch) makes room.
        reviews.put("late", account("late"), start + Duration::from_secs(1));
        assert_eq!(reviews.accounts.lock().unwrap().len(), MAX);
        assert_eq!(
            reviews.get("late", start + Duration::from_secs(1)),
            Some(account("late"))
        );
        // Once the first batch has expired, one put drops every expired token.
        reviews.put("later", account("later"), start + TTL);
        assert_eq!(reviews.accounts.lock().unwrap().len(), 2);
        assert_eq!(reviews.get("late", start + TTL), Some(account("late")));
        assert_eq!(reviews.get("t1", start + TTL), None);
    }
}
