//! Per-token limits, so that one caller (a runaway script, a leaked token)
//! cannot take a replica's streams or its spawn path from everyone else:
//! open watch streams, open follow streams (`logs -f`, attach) and the
//! spawn rate, each counted per token name. A refusal is RESOURCE_EXHAUSTED
//! naming the flag. Calls without a token (under `--insecure` with no token
//! file) have no per-token limits; the per-replica ones still hold.
//!
//! Counts are per replica: a client spread over N replicas may hold N times
//! each limit (as the kube-apiserver's per-instance limits do).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agentplane::tasks::{Gauge, GaugeGuard};

use crate::auth::Caller;
use crate::error::ApiError;

/// The flags of the per-token limits (0 turns one off).
#[derive(Debug, Clone, clap::Args)]
pub struct QuotaArgs {
    /// Watch streams one token may hold open on this replica.
    #[arg(long, env = "AGENTPLANE_MAX_WATCHES_PER_TOKEN", default_value_t = 128)]
    pub max_watches_per_token: u64,
    /// Follow streams (`logs -f`, attach) one token may hold open on this
    /// replica.
    #[arg(long, env = "AGENTPLANE_MAX_FOLLOWS_PER_TOKEN", default_value_t = 256)]
    pub max_follows_per_token: u64,
    /// Spawns per second one token may make on this replica, sustained.
    #[arg(long, env = "AGENTPLANE_SPAWN_RATE_PER_TOKEN", default_value_t = 500.0)]
    pub spawn_rate_per_token: f64,
    /// Spawns one token may make at once before the rate applies.
    #[arg(long, env = "AGENTPLANE_SPAWN_BURST_PER_TOKEN", default_value_t = 1000)]
    pub spawn_burst_per_token: u32,
}

impl QuotaArgs {
    /// What clap's types cannot check; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !self.spawn_rate_per_token.is_finite() || self.spawn_rate_per_token < 0.0 {
            return Err(format!(
                "--spawn-rate-per-token: {} must be a number of spawns per second, 0 for no limit",
                self.spawn_rate_per_token
            ));
        }
        if self.spawn_rate_per_token > 0.0 && self.spawn_burst_per_token == 0 {
            return Err(
                "--spawn-burst-per-token: must be at least 1 while --spawn-rate-per-token is set"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A token bucket: `burst` spawns at once, refilled at `rate` per second.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One token's counters.
#[derive(Debug, Default)]
struct PerToken {
    watches: Gauge,
    follows: Gauge,
    spawns: Option<Bucket>,
}

/// The counters of every token that called this replica. Entries are keyed
/// by the token file's names, so there are at most as many as it has
/// entries (plus names removed by a reload, kept until restart: a few
/// bytes each).
#[derive(Debug)]
pub struct Quotas {
    limits: QuotaArgs,
    tokens: Mutex<HashMap<String, PerToken>>,
}

/// Holds one stream's place under its token's limit until dropped.
#[derive(Debug)]
pub struct Held {
    _place: Option<GaugeGuard>,
}

/// Which stream limit.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Watch,
    Follow,
}

impl Quotas {
    /// The limits in `limits`.
    pub fn new(limits: QuotaArgs) -> Arc<Self> {
        Arc::new(Self {
            limits,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more watch stream of `caller`'s token.
    pub fn watch(&self, caller: &Caller) -> Result<Held, ApiError> {
        self.stream(caller, Stream::Watch)
    }

    /// A place for one more follow stream of `caller`'s token.
    pub fn follow(&self, caller: &Caller) -> Result<Held, ApiError> {
        self.stream(caller, Stream::Follow)
    }

    fn stream(&self, caller: &Caller, which: Stream) -> Result<Held, ApiError> {
        let (max, flag, what) = match which {
            Stream::Watch => (
                self.limits.max_watches_per_token,
                "--max-watches-per-token",
                "watch streams",
            ),
            Stream::Follow => (
                self.limits.max_follows_per_token,
                "--max-follows-per-token",
                "follow streams (logs -f, attach)",
            ),
        };
        let Some(name) = caller.0.as_ref().map(|p| &p.name) else {
            return Ok(Held { _place: None });
        };
        if max == 0 {
            return Ok(Held { _place: None });
        }
        let gauge = {
            let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
            let t = tokens.entry(name.clone()).or_default();
            match which {
                Stream::Watch => t.watches.clone(),
                Stream::Follow => t.follows.clone(),
            }
        };
        gauge
            .try_hold(max)
            .map(|g| Held { _place: Some(g) })
            .ok_or_else(|| ApiError::QuotaExceeded {
                detail: format!(
                    "token {name} has {max} {what} open on this replica, the most {flag} allows; \
                     close one first"
                ),
            })
    }

    /// Takes one spawn from `caller`'s token's bucket.
    pub fn spawn(&self, caller: &Caller) -> Result<(), ApiError> {
        self.spawn_at(caller, Instant::now())
    }

    fn spawn_at(&self, caller: &Caller, now: Instant) -> Result<(), ApiError> {
        let rate = self.limits.spawn_rate_per_token;
        let Some(name) = caller.0.as_ref().map(|p| &p.name) else {
            return Ok(());
        };
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(self.limits.spawn_burst_per_token);
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        let b = tokens
            .entry(name.clone())
            .or_default()
            .spawns
            .get_or_insert(Bucket {
                tokens: burst,
                at: now,
            });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * rate;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate);
        Err(ApiError::QuotaExceeded {
            detail: format!(
                "token {name} spawns faster than --spawn-rate-per-token allows ({rate}/s, burst \
                 {}); retry in {} ms",
                self.limits.spawn_burst_per_token,
                wait.as_millis().max(1)
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentplane::auth::{Principal, Role};

    fn limits(watches: u64, rate: f64, burst: u32) -> QuotaArgs {
        QuotaArgs {
            max_watches_per_token: watches,
            max_follows_per_token: 1,
            spawn_rate_per_token: rate,
            spawn_burst_per_token: burst,
        }
    }

    fn caller(name: &str) -> Caller {
        Caller(Some(Principal {
            name: name.into(),
            role: Role::Operator,
            selector: None,
        }))
    }

    #[test]
    fn streams_are_counted_per_token_and_freed_when_dropped() {
        let q = Quotas::new(limits(2, 0.0, 0));
        let (a, b) = (caller("a"), caller("b"));
        let one = q.watch(&a).expect("first");
        let _two = q.watch(&a).expect("second");
        let err = q.watch(&a).expect_err("third").to_string();
        assert!(err.contains("--max-watches-per-token"), "{err}");
        assert!(err.contains("token a has 2"), "{err}");
        // Another token is not held back, and follows are counted apart.
        let _b = q.watch(&b).expect("b's first");
        let _f = q.follow(&a).expect("a's follow");
        assert!(q.follow(&a).is_err());
        drop(one);
        let _again = q.watch(&a).expect("a place was freed");
        // No token (plaintext without a token file): no per-token limit.
        for _ in 0..10 {
            std::mem::forget(q.watch(&Caller(None)).expect("anonymous"));
        }
    }

    #[test]
    fn spawns_take_from_a_bucket_that_refills_at_the_rate() {
        let q = Quotas::new(limits(0, 2.0, 3));
        let a = caller("a");
        let t0 = Instant::now();
        for _ in 0..3 {
            q.spawn_at(&a, t0).expect("within the burst");
        }
        let err = q.spawn_at(&a, t0).expect_err("burst spent").to_string();
        assert!(err.contains("--spawn-rate-per-token"), "{err}");
        assert!(err.contains("retry in 500 ms"), "{err}");
        q.spawn_at(&caller("b"), t0).expect("b has its own bucket");
        // Half a second at 2/s is one more spawn, and only one.
        let t1 = t0 + Duration::from_millis(500);
        q.spawn_at(&a, t1).expect("refilled one");
        assert!(q.spawn_at(&a, t1).is_err());
        // A long pause refills to the burst, not past it.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            q.spawn_at(&a, t2).expect("refilled to the burst");
        }
        assert!(q.spawn_at(&a, t2).is_err());
    }

    #[test]
    fn bad_limits_name_the_flag() {
        let e = limits(1, -1.0, 1).validate().expect_err("negative");
        assert!(e.contains("--spawn-rate-per-token"), "{e}");
        let e = limits(1, f64::NAN, 1).validate().expect_err("nan");
        assert!(e.contains("--spawn-rate-per-token"), "{e}");
        let e = limits(1, 5.0, 0).validate().expect_err("no burst");
        assert!(e.contains("--spawn-burst-per-token"), "{e}");
        limits(1, 0.0, 0).validate().expect("off is fine");
    }
}
