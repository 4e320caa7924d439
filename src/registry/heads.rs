//! Record heads for the sweep: the few fields it judges a record by and
//! whether its lease lives, without the spec and exit statuses a full read
//! decodes (at 100k agents the full reads were most of a control plane's
//! CPU at rest); and the lease holders alone, which vouch for most records
//! without their heads.

use std::collections::HashMap;

use super::codec::{self, HEAD_FIELDS};
use super::conn::Spread;
use super::{Registry, RegistryError, Result};
use crate::proto::v1::Agent;

impl Registry {
    /// The heads of `ids` (see [`codec::decode_head`]: no spec) and whether
    /// each one's lease exists, in one round trip; ids without a record are
    /// skipped.
    pub async fn get_heads_with_leases(&self, ids: &[String]) -> Result<Vec<(Agent, bool)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        for id in ids {
            let (key, loc) = (self.keys().agent(id), self.keys().loc(id));
            batch.add(
                key.clone(),
                redis::cmd("HMGET").arg(key).arg(&HEAD_FIELDS).clone(),
            );
            batch.add(loc.clone(), redis::cmd("EXISTS").arg(loc).clone());
        }
        let values = self.spread("read agent heads and leases", batch).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut it = values.into_iter();
        for id in ids {
            let key = self.keys().agent(id);
            let bad = |detail: String| RegistryError::Corrupt {
                key: key.clone(),
                detail,
            };
            let (Some(head), Some(leased)) = (it.next(), it.next()) else {
                return Err(bad("short reply to the head and lease read".into()));
            };
            let head: Vec<Option<Vec<u8>>> =
                redis::from_redis_value(head).map_err(|e| bad(e.to_string()))?;
            let leased: bool = redis::from_redis_value(leased).map_err(|e| bad(e.to_string()))?;
            let h: HashMap<String, Vec<u8>> = HEAD_FIELDS
                .iter()
                .zip(head)
                .filter_map(|(f, v)| Some(((*f).to_owned(), v?)))
                .collect();
            if let Some(a) = codec::decode_head(&key, &h)? {
                out.push((a, leased));
            }
        }
        Ok(out)
    }

    /// The host each of `ids`' lease names (`None`: no lease), in order, in
    /// one round trip: one `GET` per record where a head read costs an
    /// `HMGET` and an `EXISTS`, and a short string to decode instead of a
    /// head.
    pub async fn lease_holders(&self, ids: &[String]) -> Result<Vec<Option<String>>> {
        const STEP: &str = "read agent leases";
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        for id in ids {
            let loc = self.keys().loc(id);
            batch.add(loc.clone(), redis::cmd("GET").arg(loc).clone());
        }
        let values = self.spread(STEP, batch).await?;
        if values.len() != ids.len() {
            return Err(RegistryError::Corrupt {
                key: STEP.to_owned(),
                detail: format!("{} replies to {} reads", values.len(), ids.len()),
            });
        }
        values.into_iter().map(|v| Self::reply(STEP, v)).collect()
    }
}
