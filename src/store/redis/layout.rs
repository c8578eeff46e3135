//! The key layout recorded in Redis (`{prefix}:meta`): the bucket count the
//! data under a prefix was written with, and the names of the buckets'
//! event streams (a JSON array, for consumers of the events). The first process to reach an
//! empty prefix records its own; every later connection checks it, and a
//! process with another bucket count, or data in the layout before buckets,
//! is refused rather than mixed in.

use redis::aio::ConnectionLike;

use super::keys::{Keys, LAYOUT_VERSION};
use crate::store::{Cause, StoreError};

/// Records or checks the layout of `keys` through `conn`. Each command
/// names one key, so that it also runs on a Redis Cluster.
pub(super) async fn check(conn: &mut impl ConnectionLike, keys: &Keys) -> Result<(), StoreError> {
    let op = "layout check";
    let ours = keys.buckets() as u64;
    let mut found = recorded(conn, keys).await?;
    if found.is_none() {
        for old in keys.unbucketed() {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&old)
                .query_async(&mut *conn)
                .await
                .map_err(|e| StoreError::redis(op, e))?;
            if exists {
                return Err(StoreError::Layout(format!(
                    "Redis holds data under the prefix `{}` in the layout before buckets (`{old}` exists); \
                     start with another HEADROOM_REDIS_PREFIX or remove that data",
                    keys.prefix()
                )));
            }
        }
        // Whoever records first wins; everyone then compares with it.
        // One key, so one pipeline also on a cluster.
        let mut pipe = redis::pipe();
        pipe.cmd("HSETNX")
            .arg(keys.meta())
            .arg("buckets")
            .arg(ours)
            .ignore();
        pipe.cmd("HSETNX")
            .arg(keys.meta())
            .arg("layout")
            .arg(LAYOUT_VERSION)
            .ignore();
        // For consumers of the events: the buckets' streams, by name.
        let streams = serde_json::to_string(&keys.all_events()).map_err(|e| {
            StoreError::not_sent(
                op,
                "encoding the stream names failed",
                Some(Cause::Json(e.into())),
            )
        })?;
        pipe.cmd("HSETNX")
            .arg(keys.meta())
            .arg("streams")
            .arg(streams)
            .ignore();
        let _: () = pipe
            .query_async(&mut *conn)
            .await
            .map_err(|e| StoreError::redis(op, e))?;
        found = recorded(conn, keys).await?;
    }
    match found.as_deref().map(str::parse::<u64>) {
        Some(Ok(b)) if b == ours => Ok(()),
        Some(Ok(b)) => Err(StoreError::Layout(format!(
            "the data under the Redis prefix `{}` was written with {b} buckets, and this process \
             uses {ours} (HEADROOM_REDIS_BUCKETS / --redis-buckets); start it with {b}",
            keys.prefix()
        ))),
        _ => Err(StoreError::corrupt(
            keys.meta(),
            format!("field `buckets` is {found:?}"),
            None,
        )),
    }
}

async fn recorded(
    conn: &mut impl ConnectionLike,
    keys: &Keys,
) -> Result<Option<String>, StoreError> {
    redis::cmd("HGET")
        .arg(keys.meta())
        .arg("buckets")
        .query_async(conn)
        .await
        .map_err(|e| StoreError::redis("layout check", e))
}
