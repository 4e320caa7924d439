//! Record heads for the sweep: the few fields it judges a record by,
//! without the spec and exit statuses a full read decodes (at 100k agents
//! the full reads were most of a control plane's CPU at rest); and the
//! lease holders, read first, which vouch for most records without their
//! heads and say of the others whether their lease lives.

use std::collections::HashMap;

use super::codec::{self, HEAD_FIELDS};
use super::conn::{keyed, Spread};
use super::{Registry, RegistryError, Result};
use crate::proto::v1::Agent;

impl Registry {
    /// The heads of `ids` (see [`codec::decode_head`]: no spec), in order,
    /// in one round trip; `None` for an id without a record. Whether each
    /// lease lives is [`Registry::lease_holders`]'s to say.
    pub async fn get_heads(&self, ids: &[String]) -> Result<Vec<Option<Agent>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        let fields = HEAD_FIELDS.iter().map(|f| f.len()).sum();
        for id in ids {
            let key = self.keys().agent(id);
            let mut read = keyed("HMGET", &key, HEAD_FIELDS.len(), fields);
            read.arg(&HEAD_FIELDS);
            batch.add(key, read);
        }
        let values = self.spread("read agent heads", batch).await?;
        if values.len() != ids.len() {
            return Err(RegistryError::Corrupt {
                key: "read agent heads".to_owned(),
                detail: format!("{} replies to {} reads", values.len(), ids.len()),
            });
        }
        let mut out = Vec::with_capacity(ids.len());
        for (id, head) in ids.iter().zip(values) {
            let key = self.keys().agent(id);
            let head: Vec<Option<Vec<u8>>> =
                redis::from_redis_value(head).map_err(|e| RegistryError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
            let h: HashMap<String, Vec<u8>> = HEAD_FIELDS
                .iter()
                .zip(head)
                .filter_map(|(f, v)| Some(((*f).to_owned(), v?)))
                .collect();
            out.push(codec::decode_head(&key, &h)?);
        }
        Ok(out)
    }

    /// The host each of `ids`' lease names (`None`: no lease), in order, in
    /// one round trip: one `GET` per record, a short string to decode
    /// instead of a head.
    pub async fn lease_holders(&self, ids: &[String]) -> Result<Vec<Option<String>>> {
        const STEP: &str = "read agent leases";
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Spread::default();
        for id in ids {
            let loc = self.keys().loc(id);
            let get = keyed("GET", &loc, 0, 0);
            batch.add(loc, get);
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
