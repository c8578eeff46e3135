//! Reads that do not go through the committers: the report indexes,
//! history buckets, closed periods and stored states read without claiming
//! them. Each runs one pipeline on a pooled connection within the timeout.

use std::collections::HashMap;

use redis::Value;

use super::scripts::seat_pairs;
use super::{RedisStore, query, text};
use crate::domain::{BucketRecord, BucketSize, EntitlementId};
use crate::store::{Peeked, StoreError, decode_state};

impl RedisStore {
    async fn read<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        query(op, &self.core.pool, self.core.settings.redis_timeout, pipe).await
    }

    pub(super) async fn read_states(
        &self,
        ids: &[EntitlementId],
    ) -> Result<Vec<Peeked>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.core.keys;
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(keys.state(id))
                .arg("core")
                .arg("config");
            pipe.cmd("HGETALL").arg(keys.seats(id));
        }
        let replies: Vec<Value> = self.read("peek", &pipe).await?;
        Ok(ids
            .iter()
            .zip(replies.chunks(2))
            .map(|(id, pair)| {
                let (core, config) = match pair.first() {
                    Some(Value::Array(f)) => (f.first().and_then(text), f.get(1).and_then(text)),
                    _ => (None, None),
                };
                let Some(core) = core else { return Ok(None) };
                let config =
                    config.ok_or_else(|| StoreError::corrupt(id, "no configuration", None))?;
                decode_state(
                    id,
                    core.as_bytes(),
                    config.as_bytes(),
                    seat_pairs(pair.get(1)),
                )
                .map(Some)
            })
            .collect())
    }

    pub(super) async fn read_overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let min = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(self.core.keys.overdraft_index())
            .arg(min)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let (ids,): (Vec<String>,) = self.read("overdraft report", &pipe).await?;
        Ok(ids)
    }

    pub(super) async fn read_denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let key = self.core.keys.denied_index();
        let mut pipe = redis::pipe();
        // Ties at the cursor's ms come first (by id, descending, as Redis
        // orders equal scores in reverse), then everything older.
        let max = match &after {
            Some((at, _)) => {
                pipe.cmd("ZRANGE")
                    .arg(&key)
                    .arg(at)
                    .arg(at)
                    .arg("BYSCORE")
                    .arg("REV")
                    .arg("WITHSCORES");
                format!("({at}")
            }
            None => "+inf".to_string(),
        };
        pipe.cmd("ZRANGE")
            .arg(&key)
            .arg(max)
            .arg(since)
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES");
        let pages: Vec<Vec<(String, f64)>> = self.read("denials report", &pipe).await?;
        let mut out = Vec::with_capacity(limit);
        for (i, page) in pages.into_iter().enumerate() {
            for (id, score) in page {
                let tie = i == 0 && after.is_some();
                if tie && after.as_ref().is_some_and(|(_, aid)| id >= *aid) {
                    continue;
                }
                if out.len() < limit {
                    out.push((id, score as i64));
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn read_history(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        starts: &[i64],
    ) -> Result<Vec<Option<BucketRecord>>, StoreError> {
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for s in starts {
            pipe.cmd("HGETALL")
                .arg(self.core.keys.history(id, size, *s));
        }
        let records: Vec<HashMap<String, u64>> = self.read("history", &pipe).await?;
        Ok(records
            .into_iter()
            .map(|fields| {
                (!fields.is_empty()).then(|| {
                    BucketRecord::from_fields(fields.iter().map(|(k, v)| (k.as_str(), *v)))
                })
            })
            .collect())
    }

    pub(super) async fn read_periods(
        &self,
        id: &EntitlementId,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("LRANGE")
            .arg(self.core.keys.periods(id))
            .arg(0)
            .arg(limit - 1);
        let (records,): (Vec<String>,) = self.read("periods", &pipe).await?;
        Ok(records)
    }
}
