//! The keeper's word that its machine is alive while no host agent is
//! attached: it renews `ap:keeper:{host}` (see
//! `agentplane::registry::Restarting`) every third of the heartbeat TTL, so
//! the control plane sees the host as restarting, not lost, and neither
//! marks its agents LOST nor starts them elsewhere. Only this machine can
//! keep the key fresh: a machine that dies is lost within the TTL.
//!
//! The keeper must end its agents before the control plane could see the
//! host lost, or an agent would run twice: it ends them at the orphan grace,
//! or once a third of the TTL is all that is left of the last renewal that
//! worked (a keeper cut off from Redis), whichever comes first. The first
//! renewal has until two thirds of the TTL after the host agent left (its
//! heartbeat key lasts that long at least).

use std::time::Duration;

use agentplane::registry::{RedisOptions, Registry, Restarting};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::proto;

/// Where to renew, and how often.
struct Config {
    registry: Registry,
    host: String,
    ttl: Duration,
}

/// A stretch with no host agent.
struct Away {
    since: Instant,
    /// Before this the control plane cannot see the host lost.
    safe_until: watch::Receiver<Instant>,
    renewer: Option<JoinHandle<()>>,
}

/// The keeper's liveness and orphan deadline.
pub struct Liveness {
    config: Option<Config>,
    grace: Duration,
    away: Option<Away>,
}

impl Liveness {
    /// Before any host agent said how: only the grace (from the command line).
    pub fn new(grace: Duration) -> Self {
        Self {
            config: None,
            grace,
            away: None,
        }
    }

    /// A host agent's settings; they replace the earlier ones.
    pub fn configure(&mut self, l: proto::Liveness) {
        self.grace = Duration::from_millis(l.orphan_grace_ms);
        let options = RedisOptions {
            ca: l.ca,
            identity: l.cert.zip(l.key),
            password: l.password,
            sentinel: (!l.sentinels.is_empty()).then_some(agentplane::registry::SentinelTarget {
                sentinels: l.sentinels,
                master_name: l.master_name,
            }),
            // The keeper's key is renewed, not fenced on: no wait.
            replica_ack: Duration::ZERO,
            cluster: l.cluster,
        };
        match Registry::connect(&l.redis_url, &l.prefix, &options) {
            Ok(registry) => {
                self.config = Some(Config {
                    registry,
                    host: l.host,
                    ttl: Duration::from_millis(l.ttl_ms.max(30)),
                });
            }
            Err(e) => eprintln!("keeper: cannot use the host agent's Redis settings: {e}"),
        }
    }

    /// The host agent let go: hold the agents and say so.
    pub fn left(&mut self) {
        self.stop_renewing();
        let now = Instant::now();
        let (tx, rx) = watch::channel(match &self.config {
            Some(c) => now + c.ttl * 2 / 3,
            None => now + self.grace,
        });
        let renewer = self.config.as_ref().map(|c| {
            let now_ms = agentplane::time::now_ms();
            let grace_ms = i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX);
            let r = Restarting {
                since_ms: now_ms,
                until_ms: now_ms.saturating_add(grace_ms),
            };
            let (registry, host, ttl) = (c.registry.clone(), c.host.clone(), c.ttl);
            tokio::spawn(async move {
                let mut failing = false;
                loop {
                    let started = Instant::now();
                    let held =
                        tokio::time::timeout(ttl / 3, registry.hold_restarting(&host, r, ttl))
                            .await;
                    match held {
                        Ok(Ok(())) => {
                            failing = false;
                            let _ = tx.send(started + ttl);
                            tokio::time::sleep(ttl / 3).await;
                        }
                        failed => {
                            if !failing {
                                let why = failed
                                    .map_or_else(|_| "timed out".to_owned(), |r| format!("{r:?}"));
                                eprintln!("keeper: cannot renew the keeper key: {why}");
                                failing = true;
                            }
                            tokio::time::sleep(ttl / 10).await;
                        }
                    }
                }
            })
        });
        self.away = Some(Away {
            since: now,
            safe_until: rx,
            renewer,
        });
    }

    /// A host agent is attached. The key is left to expire: its heartbeat
    /// key may not be back yet, and until it is the host must not look lost.
    pub fn back(&mut self) {
        self.stop_renewing();
        self.away = None;
    }

    fn stop_renewing(&mut self) {
        if let Some(r) = self.away.as_mut().and_then(|a| a.renewer.take()) {
            r.abort();
        }
    }

    /// When the agents must end, while no host agent is attached.
    pub fn deadline(&self) -> Option<Instant> {
        let a = self.away.as_ref()?;
        let by_grace = a.since + self.grace;
        Some(match &self.config {
            Some(c) => {
                let safe = *a.safe_until.borrow();
                by_grace.min(safe.checked_sub(c.ttl / 3).unwrap_or(a.since))
            }
            None => by_grace,
        })
    }

    /// Why the deadline came: the grace, or renewals that stopped working.
    pub fn reason(&self) -> String {
        match &self.away {
            Some(a) if a.since + self.grace > Instant::now() => {
                "it cannot tell Redis that this machine is alive, and the host would be seen lost"
                    .to_owned()
            }
            _ => format!("no host agent for {:?}", self.grace),
        }
    }

    /// Resolves when a renewal worked (the deadline moved).
    pub async fn renewed(&mut self) {
        match self.away.as_mut() {
            Some(a) if a.renewer.is_some() => {
                if a.safe_until.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    }

    /// The agents are gone: the host is lost from now on (at most 2 s spent).
    pub async fn end(&mut self) {
        self.stop_renewing();
        if let (Some(c), Some(_)) = (&self.config, &self.away) {
            let cleared =
                tokio::time::timeout(Duration::from_secs(2), c.registry.clear_restarting(&c.host))
                    .await;
            if !matches!(cleared, Ok(Ok(()))) {
                eprintln!("keeper: cannot delete the keeper key; the host is lost when it expires");
            }
        }
    }
}
