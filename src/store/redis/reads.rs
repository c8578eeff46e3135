//! Reads that do not go through the committers: the report indexes,
//! history buckets, closed periods and stored states read without claiming
//! them. Each runs one pipeline on a pooled connection within the timeout.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;

use super::scripts::seat_pairs;
use super::{RedisStore, text};
use crate::domain::{BucketRecord, BucketSize, EntitlementId};
use crate::store::{OverdraftCounts, Peeked, StoreError, decode_state};

/// One entry of a recent-denials index, ordered as the report lists them:
/// most recent first, ties by id, descending.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Denial {
    at: i64,
    id: String,
}

impl Ord for Denial {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at).then_with(|| other.id.cmp(&self.id))
    }
}

impl PartialOrd for Denial {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Each bucket's index read this many at a time: `max(8, 2·limit/B)`, so
/// that one round usually fills the page.
fn chunk(buckets: usize, limit: usize) -> usize {
    (2 * limit).div_ceil(buckets).clamp(8, limit.max(8))
}

/// The first `limit` items after `after` of the union of `buckets` sorted
/// indexes. `fetch(wanted, count)` reads, for each `(bucket, after)` of
/// `wanted`, that bucket's next items in order (at least the next `count`,
/// or all there are) and whether more may follow.
///
/// The first round reads every bucket; a later one only the buckets whose
/// every item read so far is in the page (only they can hold more of it).
/// So a page of `limit` reads at most `B·c + 2·limit` items in at most
/// `1 + limit/c` rounds (usually one), `c` = [`chunk`]: O(limit + 8·B),
/// whatever the number of entitlements.
async fn merge_buckets<T, F, Fut>(
    buckets: usize,
    limit: usize,
    after: Option<T>,
    fetch: F,
) -> Result<Vec<T>, StoreError>
where
    T: Ord + Clone,
    F: Fn(Vec<(usize, Option<T>)>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(Vec<T>, bool)>, StoreError>>,
{
    if limit == 0 {
        return Ok(Vec::new());
    }
    let count = chunk(buckets, limit);
    let mut last: Vec<Option<T>> = vec![after; buckets];
    let mut more = vec![true; buckets];
    let mut page: Vec<T> = Vec::new();
    let mut wanted: Vec<usize> = (0..buckets).collect();
    while !wanted.is_empty() {
        let asked = wanted.iter().map(|&b| (b, last[b].clone())).collect();
        let read = fetch(asked, count).await?;
        for (&b, (items, full)) in wanted.iter().zip(read) {
            more[b] = full;
            if let Some(l) = items.last() {
                last[b] = Some(l.clone());
            }
            page.extend(items);
        }
        page.sort();
        page.dedup();
        page.truncate(limit);
        let cutoff = (page.len() >= limit).then(|| page[limit - 1].clone());
        wanted = (0..buckets)
            .filter(|&b| {
                more[b]
                    && match (&cutoff, &last[b]) {
                        (Some(c), Some(l)) => l < c,
                        _ => true,
                    }
            })
            .collect();
    }
    Ok(page)
}

/// The `HMGET` reply of a totals hash; a field never written is 0.
fn parse_totals(key: &str, v: Value) -> Result<OverdraftCounts, StoreError> {
    let Value::Array(items) = v else {
        return Err(StoreError::reply("overdraft totals", format!("{v:?}")));
    };
    let field = |i: usize| -> Result<i64, StoreError> {
        match items.get(i) {
            None | Some(Value::Nil) => Ok(0),
            Some(v) => text(v)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::corrupt(key, format!("field {i}: {v:?}"), None)),
        }
    };
    Ok(OverdraftCounts {
        entitlements: field(0)?,
        seats: field(1)?,
    })
}

impl RedisStore {
    async fn read<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.core
            .link
            .query(op, self.core.settings.redis_timeout, pipe)
            .await
    }

    pub(super) async fn read_states(
        &self,
        ids: &[EntitlementId],
    ) -> Result<Vec<Peeked>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = &self.core.keys;
        let mut cmds = Vec::with_capacity(2 * ids.len());
        for id in ids {
            let k = keys.of(id);
            cmds.push(
                redis::cmd("HMGET")
                    .arg(k.state())
                    .arg("core")
                    .arg("config")
                    .clone(),
            );
            cmds.push(redis::cmd("HGETALL").arg(k.seats()).clone());
        }
        let replies = self.read_each("peek", cmds).await?;
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

    /// Runs `cmds` (each naming one key, or none), one reply each.
    pub(super) async fn read_each(
        &self,
        op: &'static str,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<Value>, StoreError> {
        self.core
            .link
            .each(op, self.core.settings.redis_timeout, cmds)
            .await
    }

    /// Every bucket's event stream length, summed.
    pub(super) async fn read_stream_length(&self) -> Result<u64, StoreError> {
        let keys = &self.core.keys;
        let cmds = (0..keys.buckets())
            .map(|b| redis::cmd("XLEN").arg(keys.events(b)).clone())
            .collect();
        let lengths = self.read_each("stream length", cmds).await?;
        lengths.iter().try_fold(0u64, |sum, v| match v {
            Value::Int(n) => Ok(sum + (*n).max(0) as u64),
            other => Err(StoreError::reply("stream length", format!("{other:?}"))),
        })
    }

    /// Every bucket's overdraft totals, summed.
    pub(super) async fn read_totals(&self) -> Result<OverdraftCounts, StoreError> {
        let keys = &self.core.keys;
        let cmds = (0..keys.buckets())
            .map(|b| {
                redis::cmd("HMGET")
                    .arg(keys.overdraft_totals(b))
                    .arg("entitlements")
                    .arg("seats")
                    .clone()
            })
            .collect();
        let replies = self.read_each("overdraft totals", cmds).await?;
        let mut sum = OverdraftCounts::default();
        for (b, reply) in replies.into_iter().enumerate() {
            let t = parse_totals(&keys.overdraft_totals(b), reply)?;
            sum.entitlements += t.entitlements;
            sum.seats += t.seats;
        }
        Ok(sum)
    }

    /// Ids in overdraft after `after`, in id order: the buckets' indexes
    /// merged (see [`merge_buckets`] for what it reads).
    pub(super) async fn read_overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let keys = &self.core.keys;
        self.read_index_page(
            "overdraft report",
            |b| keys.overdraft_index(b),
            after,
            limit,
        )
        .await
    }

    pub(super) async fn read_entitlement_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let keys = &self.core.keys;
        self.read_index_page(
            "entitlement list",
            |b| keys.entitlement_index(b),
            after,
            limit,
        )
        .await
    }

    /// Ids after `after` in the union of the buckets' id indexes (sorted
    /// sets of score 0, read by id), `index(b)` naming bucket `b`'s.
    async fn read_index_page(
        &self,
        op: &'static str,
        index: impl Fn(usize) -> String,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let after = after.map(str::to_string);
        let index = &index;
        merge_buckets(
            self.core.keys.buckets(),
            limit,
            after,
            |wanted, count| async move {
                let cmds = wanted
                    .iter()
                    .map(|(b, after)| {
                        let min = after
                            .as_ref()
                            .map_or_else(|| "-".to_string(), |a| format!("({a}"));
                        redis::cmd("ZRANGE")
                            .arg(index(*b))
                            .arg(min)
                            .arg("+")
                            .arg("BYLEX")
                            .arg("LIMIT")
                            .arg(0)
                            .arg(count)
                            .clone()
                    })
                    .collect();
                let replies = self.read_each(op, cmds).await?;
                replies
                    .into_iter()
                    .map(|v| {
                        let ids: Vec<String> = redis::from_redis_value(v)
                            .map_err(|e| StoreError::reply(op, e.to_string()))?;
                        let full = ids.len() >= count;
                        Ok((ids, full))
                    })
                    .collect()
            },
        )
        .await
    }

    /// Entitlements denied since `since` (ms), most recent first (ties by
    /// id, descending), after the cursor: the buckets' indexes merged.
    pub(super) async fn read_denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let keys = &self.core.keys;
        let after = after.map(|(at, id)| Denial { at, id });
        let page = merge_buckets(keys.buckets(), limit, after, |wanted, count| async move {
            let mut cmds = Vec::new();
            for (b, after) in &wanted {
                let key = keys.denied_index(*b);
                // Ties at the cursor's ms first (the index orders equal
                // scores by id, descending), then everything older.
                let max = match after {
                    Some(d) => {
                        cmds.push(
                            redis::cmd("ZRANGE")
                                .arg(&key)
                                .arg(d.at)
                                .arg(d.at)
                                .arg("BYSCORE")
                                .arg("REV")
                                .arg("WITHSCORES")
                                .clone(),
                        );
                        format!("({}", d.at)
                    }
                    None => "+inf".to_string(),
                };
                cmds.push(
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(max)
                        .arg(since)
                        .arg("BYSCORE")
                        .arg("REV")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(count)
                        .arg("WITHSCORES")
                        .clone(),
                );
            }
            let mut replies = self.read_each("denials report", cmds).await?.into_iter();
            let parse =
                |replies: &mut std::vec::IntoIter<Value>| -> Result<Vec<Denial>, StoreError> {
                    let pairs: Vec<(String, f64)> = replies
                        .next()
                        .map(redis::from_redis_value)
                        .transpose()
                        .map_err(|e| StoreError::reply("denials report", e.to_string()))?
                        .unwrap_or_default();
                    Ok(pairs
                        .into_iter()
                        .map(|(id, at)| Denial { at: at as i64, id })
                        .collect())
                };
            let mut out = Vec::with_capacity(wanted.len());
            for (_, after) in &wanted {
                let mut items = match after {
                    Some(d) => parse(&mut replies)?.into_iter().filter(|t| t > d).collect(),
                    None => Vec::new(),
                };
                let older = parse(&mut replies)?;
                let full = older.len() >= count;
                items.extend(older);
                out.push((items, full));
            }
            Ok(out)
        })
        .await?;
        Ok(page.into_iter().map(|d| (d.id, d.at)).collect())
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
        let k = self.core.keys.of(id);
        let mut pipe = redis::pipe();
        for s in starts {
            pipe.cmd("HGETALL").arg(k.history(size, *s));
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

    pub(super) async fn read_epoch(&self, id: &EntitlementId) -> Result<u64, StoreError> {
        let key = self.core.keys.epoch(id);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key);
        let (epoch,): (Option<String>,) = self.read("epoch", &pipe).await?;
        match epoch {
            None => Ok(0),
            Some(e) => e
                .parse()
                .map_err(|_| StoreError::corrupt(id, format!("epoch {e:?}"), None)),
        }
    }

    pub(super) async fn read_links_revoked(
        &self,
        id: &EntitlementId,
    ) -> Result<Option<i64>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.core.keys.of(id).links_revoked());
        let (at,): (Option<String>,) = self.read("links_revoked", &pipe).await?;
        at.map(|a| {
            a.parse()
                .map_err(|_| StoreError::corrupt(id, format!("links revoked at {a:?}"), None))
        })
        .transpose()
    }

    /// Stores the revocation time, kept for `keep`.
    pub(super) async fn write_links_revoked(
        &self,
        id: &EntitlementId,
        at: i64,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let key = self.core.keys.of(id).links_revoked();
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(at)
            .arg("PX")
            .arg(keep_ms)
            .ignore();
        let _: () = self.read("revoke_links", &pipe).await?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;

    use super::*;

    /// Pages through `buckets` sorted sets with [`merge_buckets`], as the
    /// report does; answers the pages and the items read.
    fn page_all(sets: &[Vec<u32>], limit: usize) -> (Vec<Vec<u32>>, usize) {
        let read = Cell::new(0);
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let fetch = |wanted: Vec<(usize, Option<u32>)>, count: usize| {
                let out: Vec<(Vec<u32>, bool)> = wanted
                    .iter()
                    .map(|(b, after)| {
                        let next: Vec<u32> = sets[*b]
                            .iter()
                            .copied()
                            .filter(|v| after.is_none_or(|a| *v > a))
                            .take(count)
                            .collect();
                        read.set(read.get() + next.len());
                        let full = next.len() >= count;
                        (next, full)
                    })
                    .collect();
                std::future::ready(Ok(out))
            };
            let page = futures_util::FutureExt::now_or_never(merge_buckets(
                sets.len(),
                limit,
                after,
                fetch,
            ))
            .expect("ready")
            .expect("page");
            if page.is_empty() {
                return (pages, read.get());
            }
            after = page.last().copied();
            pages.push(page);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Paging the merged buckets lists every item once, in order, and
        /// each page reads at most `B·c + 2·limit` items.
        #[test]
        fn merged_pages_list_the_union_in_order_within_the_bound(
            mut sets in proptest::collection::vec(proptest::collection::btree_set(0u32..5_000, 0..200), 1..70),
            limit in 1usize..300,
        ) {
            let sets: Vec<Vec<u32>> = sets.drain(..).map(|s| s.into_iter().collect()).collect();
            let mut all: Vec<u32> = sets.iter().flatten().copied().collect();
            all.sort();
            all.dedup();
            let (pages, read) = page_all(&sets, limit);
            prop_assert_eq!(pages.concat(), all);
            prop_assert!(pages.iter().all(|p| p.len() <= limit));
            let per_page = sets.len() * chunk(sets.len(), limit) + 2 * limit;
            prop_assert!(read <= per_page * (pages.len() + 1), "{} read for {} pages", read, pages.len());
        }
    }

    #[test]
    fn denials_order_most_recent_first_then_by_id_descending() {
        let d = |at, id: &str| Denial { at, id: id.into() };
        let mut v = vec![d(1, "a"), d(3, "a"), d(3, "b"), d(2, "z")];
        v.sort();
        assert_eq!(v, vec![d(3, "b"), d(3, "a"), d(2, "z"), d(1, "a")]);
    }
}
