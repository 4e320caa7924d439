//! Claims (`ap:idem:*`, `ap:name:*`) and the lease of the spawn call that
//! holds them (`ap:claim:*`): a request id or a name is taken once, and a
//! claim whose owner died before creating its agent is taken over.

use std::time::Duration;

use redis::AsyncCommands;

use super::lease::ttl_ms;
use super::scripts::{DELETE_IF_EQUAL, TAKE_OVER_CLAIM};
use super::{Registry, Result};

impl Registry {
    /// Sets `key` to `value` unless it exists (`SET NX`, with an optional
    /// TTL). `None`: claimed (or already ours); `Some(owner)`: someone
    /// else's. A claim whose owner has neither a record nor a live claim
    /// lease (its spawn call died before creating it) is taken over.
    async fn claim(
        &self,
        step: &'static str,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<Option<String>> {
        loop {
            let mut set = redis::cmd("SET");
            set.arg(key).arg(value).arg("NX");
            if let Some(ttl) = ttl {
                set.arg("PX").arg(ttl_ms(ttl));
            }
            let ok: Option<String> = set
                .query_async(&mut self.conn())
                .await
                .map_err(self.err(step))?;
            if ok.is_some() {
                return Ok(None);
            }
            let owner: Option<String> = self.conn().get(key).await.map_err(self.err(step))?;
            match owner {
                Some(o) if o != value => {
                    if self.take_over(step, key, &o, value, ttl).await? {
                        tracing::info!(%key, abandoned_by = %o, "took over an abandoned claim");
                        return Ok(None);
                    }
                    return Ok(Some(o));
                }
                Some(_) => return Ok(None),
                // Released or expired between SET and GET: try again.
                None => {}
            }
        }
    }

    /// Sets claim `key` from `owner` to `value` if `owner` has neither a
    /// record nor a claim lease: one script on one Redis; on a Cluster
    /// (the claim and the owner's keys are in different slots) the owner's
    /// keys are read first and the same script then checks only the claim,
    /// a round trip later.
    async fn take_over(
        &self,
        step: &'static str,
        key: &str,
        owner: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        let (record, lease) = (self.keys().agent(owner), self.keys().claim_lease(owner));
        let mut inv = TAKE_OVER_CLAIM.prepare_invoke();
        inv.key(key);
        if self.keys().is_sharded() {
            let (record, lease): (bool, bool) = redis::pipe()
                .exists(&record)
                .exists(&lease)
                .query_async(&mut self.conn())
                .await
                .map_err(self.err(step))?;
            if record || lease {
                return Ok(false);
            }
        } else {
            inv.key(&record).key(&lease);
        }
        let taken: i64 = inv
            .arg(owner)
            .arg(value)
            .arg(ttl.map_or(0, ttl_ms))
            .invoke_async(&mut self.conn())
            .await
            .map_err(self.err(step))?;
        Ok(taken == 1)
    }

    /// Holds (or renews) the claim lease of the spawn call creating
    /// `agent_id`, for `ttl`.
    pub async fn hold_claims(&self, agent_id: &str, ttl: Duration) -> Result<()> {
        self.conn()
            .pset_ex::<_, _, ()>(self.keys().claim_lease(agent_id), 1, ttl_ms(ttl))
            .await
            .map_err(self.err("renew claim lease"))
    }

    /// Deletes `key` only if it still holds `value` (compare-and-delete).
    pub(super) async fn release(&self, step: &'static str, key: &str, value: &str) -> Result<()> {
        DELETE_IF_EQUAL
            .key(key)
            .arg(value)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map(drop)
            .map_err(self.err(step))
    }

    /// Claims `request_id` for `agent_id`. `None`: claimed, go ahead and create;
    /// `Some(id)`: an earlier request already created (or is creating) `id`.
    pub async fn claim_request(&self, request_id: &str, agent_id: &str) -> Result<Option<String>> {
        let key = self.keys().idem(request_id);
        self.claim(
            "claim request id",
            &key,
            agent_id,
            Some(super::IDEMPOTENCY_TTL),
        )
        .await
    }

    /// Releases `request_id` if it still names `agent_id` (its creation failed).
    pub async fn release_request(&self, request_id: &str, agent_id: &str) -> Result<()> {
        self.release(
            "release request id",
            &self.keys().idem(request_id),
            agent_id,
        )
        .await
    }

    /// Claims `name` for `agent_id`; `Some(owner)` when another agent holds it.
    pub async fn claim_name(&self, name: &str, agent_id: &str) -> Result<Option<String>> {
        self.claim("claim agent name", &self.keys().name(name), agent_id, None)
            .await
    }

    /// The agent that holds `name`, if one does.
    pub async fn agent_named(&self, name: &str) -> Result<Option<String>> {
        self.conn()
            .get(self.keys().name(name))
            .await
            .map_err(self.err("read agent name"))
    }

    /// Releases `name` if `agent_id` holds it.
    pub async fn release_name(&self, name: &str, agent_id: &str) -> Result<()> {
        self.release("release agent name", &self.keys().name(name), agent_id)
            .await
    }
}
