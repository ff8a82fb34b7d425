//! The token buckets of the local rate limits that apply to requests
//! ([`mesh_cluster::ratelimit`]): one per limit for the waypoint, or per limit and client
//! tunnel (`local_rate_limit_per_downstream_connection`). A bucket is its limit's (its
//! `EnvoyFilter` and patch): a new cluster view keeps it, and a changed bucket (size, fill)
//! starts full, as Envoy's does when its configuration changes. Buckets that are full again
//! are forgotten once there are many, as a new one would be the same.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, StatusCode};
use mesh_cluster::ratelimit::RateLimit;

/// A token bucket, as Envoy's: full at first, `tokens_per_fill` more every `fill_interval`.
#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When it was last filled (a whole number of intervals after its start).
    filled: Instant,
}

impl Bucket {
    fn new(limit: &RateLimit, now: Instant) -> Self {
        Self {
            tokens: limit.max_tokens,
            filled: now,
        }
    }

    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let interval = limit.fill_interval.as_nanos().max(1);
        let fills = now.saturating_duration_since(self.filled).as_nanos() / interval;
        if fills == 0 {
            return;
        }
        let added = u64::try_from(fills)
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(limit.tokens_per_fill));
        let tokens = u64::from(self.tokens).saturating_add(added);
        self.tokens = u32::try_from(tokens.min(u64::from(limit.max_tokens))).unwrap_or(u32::MAX);
        let elapsed = u64::try_from(fills * interval).unwrap_or(u64::MAX);
        self.filled += Duration::from_nanos(elapsed);
    }

    /// Takes a token if there is one; the tokens left and the time to the next fill.
    fn take(&mut self, limit: &RateLimit, now: Instant) -> (bool, u32, Duration) {
        self.refill(limit, now);
        let taken = self.tokens > 0;
        if taken {
            self.tokens -= 1;
        }
        let next = (self.filled + limit.fill_interval).saturating_duration_since(now);
        (taken, self.tokens, next)
    }
}

/// Most buckets kept before the full ones are forgotten.
const KEPT: usize = 1024;

/// A limit: its `EnvoyFilter` (`namespace/name`) and patch.
type LimitKey = (Arc<str>, usize);

/// Buckets by limit, each with the limit's reading it was last used with.
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    buckets: Mutex<HashMap<LimitKey, (Arc<RateLimit>, Bucket)>>,
}

/// Whether two readings of a limit have the same bucket.
fn same_bucket(a: &RateLimit, b: &RateLimit) -> bool {
    (
        a.max_tokens,
        a.tokens_per_fill,
        a.fill_interval,
        a.per_connection,
    ) == (
        b.max_tokens,
        b.tokens_per_fill,
        b.fill_interval,
        b.per_connection,
    )
}

impl Buckets {
    fn take(&self, limit: &Arc<RateLimit>, now: Instant) -> (bool, u32, Duration) {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (Arc::clone(&limit.policy), limit.patch);
        if !buckets.contains_key(&key) && buckets.len() >= KEPT {
            buckets.retain(|_, (l, bucket)| {
                bucket.refill(l, now);
                bucket.tokens < l.max_tokens
            });
        }
        let (kept, bucket) = buckets
            .entry(key)
            .or_insert_with(|| (Arc::clone(limit), Bucket::new(limit, now)));
        if !Arc::ptr_eq(kept, limit) {
            if !same_bucket(kept, limit) {
                *bucket = Bucket::new(limit, now);
            }
            *kept = Arc::clone(limit);
        }
        bucket.take(limit, now)
    }
}

/// What the limits make of a request.
#[derive(Debug)]
pub(crate) enum Limited {
    /// On, with these headers for its response (`x-ratelimit-*`).
    Pass(HeaderMap),
    /// Refused by `limit`: its status and headers.
    Refused {
        limit: Arc<RateLimit>,
        headers: HeaderMap,
    },
}

/// Checks `limits` in order (`tunnel`: the client tunnel's own buckets), taking a token from
/// each enabled one; the first without a token refuses, if enforced.
pub(crate) fn check(
    limits: &[&Arc<RateLimit>],
    (waypoint, tunnel): (&Buckets, &Buckets),
    now: Instant,
) -> Limited {
    let mut headers = HeaderMap::new();
    for limit in limits {
        if !sampled(limit.enabled) {
            continue;
        }
        let buckets = if limit.per_connection {
            tunnel
        } else {
            waypoint
        };
        let (taken, left, next) = buckets.take(limit, now);
        if limit.x_ratelimit_headers {
            x_ratelimit(&mut headers, limit, left, next);
        }
        if !taken && sampled(limit.enforced) {
            for (name, value, append) in &limit.response_headers {
                if *append {
                    headers.append(name, value.clone());
                } else {
                    headers.insert(name, value.clone());
                }
            }
            return Limited::Refused {
                limit: Arc::clone(limit),
                headers,
            };
        }
    }
    Limited::Pass(headers)
}

/// Whether a request falls in a `share` of requests (0 never, 1 always).
fn sampled(share: f64) -> bool {
    share >= 1.0 || (share > 0.0 && fastrand::f64() < share)
}

/// Envoy's `x-ratelimit-*` headers (draft 03): the bucket's size, what is left, and the seconds
/// to the next fill (rounded up).
fn x_ratelimit(headers: &mut HeaderMap, limit: &RateLimit, left: u32, next: Duration) {
    let reset = next.as_secs() + u64::from(next.subsec_nanos() > 0);
    headers.insert("x-ratelimit-limit", HeaderValue::from(limit.max_tokens));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(left));
    headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
}

/// The status of a refusal by `limit`.
pub(crate) fn status(limit: &RateLimit) -> StatusCode {
    limit.status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: u32, per_fill: u32, interval_ms: u64) -> Arc<RateLimit> {
        limit_of("shop/rl", max, per_fill, interval_ms)
    }

    fn limit_of(policy: &str, max: u32, per_fill: u32, interval_ms: u64) -> Arc<RateLimit> {
        Arc::new(RateLimit {
            policy: policy.into(),
            patch: 0,
            stat_prefix: "rl".to_owned(),
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(interval_ms),
            enabled: 1.0,
            enforced: 1.0,
            status: StatusCode::TOO_MANY_REQUESTS,
            response_headers: vec![(
                http::HeaderName::from_static("x-local-rate-limit"),
                HeaderValue::from_static("true"),
                true,
            )],
            per_connection: false,
            x_ratelimit_headers: true,
            resource_exhausted: false,
            port: None,
        })
    }

    #[test]
    fn a_bucket_starts_full_and_fills_by_whole_intervals() {
        let limit = limit(3, 2, 1000);
        let start = Instant::now();
        let mut bucket = Bucket::new(&limit, start);
        let taken: Vec<bool> = (0..4).map(|_| bucket.take(&limit, start).0).collect();
        assert_eq!(taken, [true, true, true, false]);
        // 999 ms later: no fill yet, and the next is 1 ms away.
        let (taken, left, next) = bucket.take(&limit, start + Duration::from_millis(999));
        assert_eq!((taken, left, next), (false, 0, Duration::from_millis(1)));
        // Two intervals later: 2 per fill, up to the size (3).
        let later = start + Duration::from_millis(2500);
        let taken: Vec<bool> = (0..4).map(|_| bucket.take(&limit, later).0).collect();
        assert_eq!(taken, [true, true, true, false]);
        // The fills keep their phase: the next is at 3 s, 500 ms after `later`.
        assert_eq!(bucket.take(&limit, later).2, Duration::from_millis(500));
    }

    #[test]
    fn the_first_limit_without_a_token_refuses_with_its_headers() {
        let (small, large) = (limit(1, 1, 60_000), limit_of("shop/large", 100, 1, 60_000));
        let buckets = (Buckets::default(), Buckets::default());
        let now = Instant::now();
        let limits = [&large, &small];
        match check(&limits, (&buckets.0, &buckets.1), now) {
            Limited::Pass(headers) => {
                assert_eq!(
                    headers["x-ratelimit-remaining"], "0",
                    "the last limit's reading"
                );
            }
            Limited::Refused { .. } => panic!("the first request passes"),
        }
        match check(&limits, (&buckets.0, &buckets.1), now) {
            Limited::Refused { limit, headers } => {
                assert!(Arc::ptr_eq(&limit, &small));
                assert_eq!(headers["x-local-rate-limit"], "true");
                assert_eq!(headers["x-ratelimit-limit"], "1");
                assert_eq!(headers["x-ratelimit-reset"], "60");
            }
            Limited::Pass(_) => panic!("the second request is refused"),
        }
        // A new cluster view's reading of the same limit keeps its bucket; a changed bucket
        // starts full.
        let same = limit(1, 1, 60_000);
        assert!(matches!(
            check(&[&same], (&buckets.0, &buckets.1), now),
            Limited::Refused { .. }
        ));
        let bigger = limit(2, 1, 60_000);
        assert!(matches!(
            check(&[&bigger], (&buckets.0, &buckets.1), now),
            Limited::Pass(_)
        ));
        assert_eq!(
            buckets.0.buckets.lock().unwrap().len(),
            2,
            "a bucket per limit"
        );
    }

    #[test]
    fn a_limit_per_connection_has_a_bucket_per_tunnel() {
        let mut per_tunnel = limit(1, 1, 60_000);
        Arc::get_mut(&mut per_tunnel).unwrap().per_connection = true;
        let waypoint = Buckets::default();
        let (one, two) = (Buckets::default(), Buckets::default());
        let now = Instant::now();
        let passes = |tunnel: &Buckets| {
            matches!(
                check(&[&per_tunnel], (&waypoint, tunnel), now),
                Limited::Pass(_)
            )
        };
        assert!(passes(&one) && !passes(&one), "one token per tunnel");
        assert!(passes(&two), "another tunnel has its own");
        assert!(waypoint.buckets.lock().unwrap().is_empty());
    }

    #[test]
    fn disabled_or_unenforced_limits_refuse_nothing() {
        let mut off = limit(1, 1, 60_000);
        Arc::get_mut(&mut off).unwrap().enabled = 0.0;
        let mut dry = limit_of("shop/dry", 1, 1, 60_000);
        Arc::get_mut(&mut dry).unwrap().enforced = 0.0;
        let buckets = (Buckets::default(), Buckets::default());
        for _ in 0..5 {
            assert!(matches!(
                check(&[&off, &dry], (&buckets.0, &buckets.1), Instant::now()),
                Limited::Pass(_)
            ));
        }
    }
}
