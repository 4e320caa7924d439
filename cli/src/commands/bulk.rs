//! A bounded concurrent fan-out of one call per agent: `spawn --count`,
//! `stop ID…` and `stop --selector`.

use std::future::Future;

use tokio::task::{JoinError, JoinSet};

/// How many calls a bulk command has in flight by default: enough to keep a
/// control plane busy, few enough not to queue behind one another.
pub const DEFAULT_PARALLEL: u16 = 32;

/// Runs `call` on every item with at most `parallel` calls in flight and
/// returns the results in the items' order. A panicked call panics here.
pub async fn fan_out<T, R, F, Fut>(items: Vec<T>, parallel: usize, call: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let mut set = JoinSet::new();
    let mut done = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        // A place frees up before the next call starts.
        if set.len() >= parallel.max(1) {
            if let Some(r) = set.join_next().await {
                done.push(joined(r));
            }
        }
        let call = call(item);
        set.spawn(async move { (i, call.await) });
    }
    while let Some(r) = set.join_next().await {
        done.push(joined(r));
    }
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// A finished call's result; its panic goes on in the caller. The set is
/// never aborted, so a call that neither returned nor panicked was stopped
/// with the runtime, which only happens while this process exits.
fn joined<R>(r: Result<(usize, R), JoinError>) -> (usize, R) {
    match r {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn keeps_order_and_bounds_calls_in_flight() {
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let out = fan_out((0..50u64).collect(), 4, |i| {
            let (now, most) = (now.clone(), most.clone());
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                // Later items finish first, so order comes from the index.
                tokio::time::sleep(Duration::from_millis(50 - i)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(out, (0..50).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 4);
    }
}
