//! Every Redis key headroom writes, built here and nowhere else.
//!
//! The entitlements are spread over a fixed number of *buckets* (B,
//! `--redis-buckets`, recorded at first start in `{prefix}:meta`). A bucket
//! is a hash tag: every key of an entitlement and the shared structures of
//! its bucket live in one hash slot, so that one commit script call, which
//! touches both, runs on one Redis Cluster node. An entitlement's bucket is
//! the CRC16 of its id modulo B; bucket `i`'s tag is chosen so that its slot
//! lies in the `i`-th of B equal slot ranges, so any even split of the
//! slots over the primaries splits the buckets evenly too.
//!
//! Per entitlement, `<tag>` its bucket's tag:
//! - `{prefix}:{<tag>}:{<id>}:epoch`: the owner epoch (a counter; see
//!   `Store::load`).
//! - `{prefix}:{<tag>}:{<id>}:state`: hash, `core` (counters, JSON) and
//!   `config` (JSON).
//! - `{prefix}:{<tag>}:{<id>}:seats`: hash, seat id → encoded lease.
//! - `{prefix}:{<tag>}:{<id>}:key:<incarnation>:<idempotency key>`: the
//!   first decision made with the key (JSON), expiring after the
//!   idempotency window.
//! - `{prefix}:{<tag>}:{<id>}:history:<hour|day>:<start ms>`: hash of one
//!   history bucket, expiring after its retention.
//! - `{prefix}:{<tag>}:{<id>}:periods`: list of closed-period records,
//!   newest first.
//!
//! (Only the first `{…}` of a key is its hash tag; the braces around the id
//! keep ids, which may contain `:`, from running into the suffix.)
//!
//! Per bucket:
//! - `{prefix}:{<tag>}:events`: the bucket's event stream (CloudEvents JSON
//!   per entry).
//! - `{prefix}:{<tag>}:overdraft`: hash, `entitlements` and `seats` in
//!   overdraft.
//! - `{prefix}:{<tag>}:report:overdraft`: sorted set of ids in overdraft
//!   (by id).
//! - `{prefix}:{<tag>}:report:denied`: sorted set of ids by their last
//!   denial (ms).
//!
//! The layout: `{prefix}:meta`, hash, `buckets` (B), `layout` and `streams`
//! (the buckets' stream names, JSON).
//!
//! Webhooks, all in one slot (tag `webhooks`):
//! - `{prefix}:{webhooks}`: hash, endpoint id → registration (with its
//!   secret).
//! - `{prefix}:{webhooks}:{<id>}:deliveries`: list, the delivery log,
//!   newest first.
//! - `{prefix}:{webhooks}:retry`: sorted set of deliveries by next attempt
//!   (ms).
//! - `{prefix}:{webhooks}:pending`: hash, delivery id → delivery (JSON).
//! - `{prefix}:{webhooks}:dead`: the dead-letter stream.
//!
//! Nodes, in one slot (tag `nodes`):
//! - `{prefix}:{nodes}`: hash, node id → its address and join time (JSON).
//! - `{prefix}:{nodes}:leases`: sorted set of node ids by lease expiry (ms).

use std::sync::Arc;

use crate::domain::{BucketSize, EntitlementId, IdempotencyKey};

/// Redis Cluster's hash slots.
const SLOTS: u32 = 16_384;
/// The most buckets: past it a bucket's slot range gets too narrow to find
/// its tag quickly, and no cluster has that many primaries.
pub const MAX_BUCKETS: u32 = 1_024;
/// The bucket count a first start records unless told otherwise: 4 per
/// primary on a 16-primary cluster, 21 or 22 per primary on 3.
pub const DEFAULT_BUCKETS: u32 = 64;
/// The version of this layout, recorded with the bucket count.
pub const LAYOUT_VERSION: &str = "2";

/// The hash slot of `key` as Redis Cluster computes it (CRC16/XMODEM of the
/// key, or of its hash tag).
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    (crc16::State::<crc16::XMODEM>::calculate(tagged) as u32 % SLOTS) as u16
}

/// The key names under one prefix and bucket count.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: Arc<str>,
    /// Bucket `i`'s hash tag.
    tags: Arc<[String]>,
}

impl Keys {
    /// The keys for `buckets` buckets (1 to [`MAX_BUCKETS`]; the settings
    /// check the range).
    pub fn new(prefix: impl Into<String>, buckets: u32) -> Self {
        let buckets = buckets.clamp(1, MAX_BUCKETS);
        let tags = (0..buckets).map(|i| bucket_tag(i, buckets)).collect();
        Keys {
            prefix: prefix.into().into(),
            tags,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many buckets there are.
    pub fn buckets(&self) -> usize {
        self.tags.len()
    }

    /// The bucket of an entitlement.
    pub fn bucket_of(&self, id: &EntitlementId) -> usize {
        crc16::State::<crc16::XMODEM>::calculate(id.as_str().as_bytes()) as usize % self.tags.len()
    }

    /// The keys of one entitlement, its bucket found once (a commit names
    /// several of them).
    pub fn of<'a>(&'a self, id: &'a EntitlementId) -> EntitlementKeys<'a> {
        EntitlementKeys {
            prefix: &self.prefix,
            tag: &self.tags[self.bucket_of(id)],
            id,
        }
    }

    pub fn epoch(&self, id: &EntitlementId) -> String {
        self.of(id).epoch()
    }

    pub fn state(&self, id: &EntitlementId) -> String {
        self.of(id).state()
    }

    pub fn seats(&self, id: &EntitlementId) -> String {
        self.of(id).seats()
    }

    pub fn periods(&self, id: &EntitlementId) -> String {
        self.of(id).periods()
    }

    pub fn idempotency(
        &self,
        id: &EntitlementId,
        incarnation: i64,
        key: &IdempotencyKey,
    ) -> String {
        self.of(id).idempotency(incarnation, key)
    }

    pub fn history(&self, id: &EntitlementId, size: BucketSize, start: i64) -> String {
        self.of(id).history(size, start)
    }

    fn bucket(&self, bucket: usize, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, self.tags[bucket])
    }

    /// Bucket `bucket`'s event stream.
    pub fn events(&self, bucket: usize) -> String {
        self.bucket(bucket, "events")
    }

    /// Every bucket's event stream, in bucket order.
    pub fn all_events(&self) -> Vec<String> {
        (0..self.buckets()).map(|b| self.events(b)).collect()
    }

    pub fn overdraft_totals(&self, bucket: usize) -> String {
        self.bucket(bucket, "overdraft")
    }

    pub fn overdraft_index(&self, bucket: usize) -> String {
        self.bucket(bucket, "report:overdraft")
    }

    pub fn denied_index(&self, bucket: usize) -> String {
        self.bucket(bucket, "report:denied")
    }

    /// Every configured entitlement of the bucket, by id (`GET
    /// /v1/entitlements`).
    pub fn entitlement_index(&self, bucket: usize) -> String {
        self.bucket(bucket, "entitlements")
    }

    /// The layout record: the bucket count the data was written with.
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    /// The shared keys of the layout before buckets (one stream, one set of
    /// totals and indexes): data in it is refused, not mixed.
    pub fn unbucketed(&self) -> [String; 3] {
        ["events", "overdraft", "report:overdraft"].map(|s| format!("{}:{s}", self.prefix))
    }

    fn webhook(&self, suffix: &str) -> String {
        format!("{}:{{webhooks}}{suffix}", self.prefix)
    }

    pub fn webhooks(&self) -> String {
        self.webhook("")
    }

    /// The headroom nodes sharing this prefix: id → address and join time.
    pub fn node_registry(&self) -> String {
        format!("{}:{{nodes}}", self.prefix)
    }

    /// The nodes' leases: id → expiry (ms), same slot as the registry.
    pub fn node_leases(&self) -> String {
        format!("{}:{{nodes}}:leases", self.prefix)
    }

    pub fn webhook_log(&self, webhook: &str) -> String {
        self.webhook(&format!(":{{{webhook}}}:deliveries"))
    }

    pub fn webhook_retry(&self) -> String {
        self.webhook(":retry")
    }

    pub fn webhook_pending(&self) -> String {
        self.webhook(":pending")
    }

    pub fn webhook_dead(&self) -> String {
        self.webhook(":dead")
    }
}

/// The keys of one entitlement (see [`Keys::of`]).
pub struct EntitlementKeys<'a> {
    prefix: &'a str,
    tag: &'a str,
    id: &'a EntitlementId,
}

impl EntitlementKeys<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}:{{{}}}:{{{}}}:{suffix}", self.prefix, self.tag, self.id)
    }

    pub fn epoch(&self) -> String {
        self.key("epoch")
    }

    pub fn state(&self) -> String {
        self.key("state")
    }

    pub fn seats(&self) -> String {
        self.key("seats")
    }

    pub fn periods(&self) -> String {
        self.key("periods")
    }

    /// When the entitlement's portal links were last revoked (ms).
    pub fn links_revoked(&self) -> String {
        self.key("links_revoked")
    }

    pub fn idempotency(&self, incarnation: i64, key: &IdempotencyKey) -> String {
        self.key(&format!("key:{incarnation}:{key}"))
    }

    pub fn history(&self, size: BucketSize, start: i64) -> String {
        self.key(&format!("history:{}:{start}", size.as_str()))
    }
}

/// Bucket `i`'s tag: `b<i>` and the first suffix `.<n>` whose slot lies in
/// the `i`-th of `buckets` equal slot ranges (expected `buckets` tries).
fn bucket_tag(i: u32, buckets: u32) -> String {
    let (low, high) = (i * SLOTS / buckets, (i + 1) * SLOTS / buckets);
    (0u32..)
        .map(|n| format!("b{i}.{n}"))
        .find(|tag| (low..high).contains(&u32::from(slot(tag.as_bytes()))))
        .expect("every slot range is hit by some suffix")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entitlements_keys_share_its_buckets_slot() {
        let keys = Keys::new("hr", 64);
        let id = EntitlementId::parse("acme").expect("id");
        let key = IdempotencyKey::parse("k1").expect("key");
        let b = keys.bucket_of(&id);
        let bucket_slot = slot(keys.events(b).as_bytes());
        for k in [
            keys.epoch(&id),
            keys.state(&id),
            keys.seats(&id),
            keys.periods(&id),
            keys.idempotency(&id, 7, &key),
            keys.history(&id, BucketSize::Day, 0),
            keys.overdraft_totals(b),
            keys.overdraft_index(b),
            keys.denied_index(b),
            keys.entitlement_index(b),
        ] {
            assert_eq!(slot(k.as_bytes()), bucket_slot, "{k}");
        }
        let tag = &keys.tags[b];
        assert_eq!(
            keys.idempotency(&id, 7, &key),
            format!("hr:{{{tag}}}:{{acme}}:key:7:k1")
        );
        assert_eq!(
            keys.history(&id, BucketSize::Hour, 36),
            format!("hr:{{{tag}}}:{{acme}}:history:hour:36")
        );
    }

    #[test]
    fn ids_with_colons_do_not_run_into_the_suffix() {
        let keys = Keys::new("hr", 1);
        let a = EntitlementId::parse("x:key:1").expect("id");
        let b = EntitlementId::parse("x").expect("id");
        let key = IdempotencyKey::parse("state").expect("key");
        assert_ne!(keys.state(&a), keys.idempotency(&b, 1, &key));
    }

    #[test]
    fn webhook_keys_share_one_slot() {
        let keys = Keys::new("hr", 64);
        let s = slot(keys.webhooks().as_bytes());
        for k in [
            keys.webhook_log("wh_1"),
            keys.webhook_retry(),
            keys.webhook_pending(),
            keys.webhook_dead(),
        ] {
            assert_eq!(slot(k.as_bytes()), s, "{k}");
        }
        assert_eq!(keys.webhook_log("wh_1"), "hr:{webhooks}:{wh_1}:deliveries");
    }

    #[test]
    fn buckets_spread_evenly_over_the_slot_ranges_of_any_even_split() {
        for buckets in [1, 3, 64, 256, MAX_BUCKETS] {
            let keys = Keys::new("hr", buckets);
            let slots: Vec<u32> = (0..keys.buckets())
                .map(|b| u32::from(slot(keys.events(b).as_bytes())))
                .collect();
            for (i, s) in slots.iter().enumerate() {
                let i = i as u32;
                assert!(
                    (i * SLOTS / buckets..(i + 1) * SLOTS / buckets).contains(s),
                    "bucket {i} of {buckets} at slot {s}"
                );
            }
            // Three primaries owning equal slot ranges (as
            // `redis-cli --cluster create` assigns them).
            let mut per_node = [0; 3];
            for s in &slots {
                per_node[(*s * 3 / SLOTS) as usize] += 1;
            }
            let (min, max) = (per_node.iter().min(), per_node.iter().max());
            assert!(
                max.zip(min).is_some_and(|(a, b)| a - b <= 1),
                "{per_node:?}"
            );
        }
    }

    #[test]
    fn the_slot_follows_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"123456789"), 12_739);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        let whole = |k: &[u8]| crc16::State::<crc16::XMODEM>::calculate(k) % 16_384;
        assert_eq!(slot(b"foo{}{bar}"), whole(b"foo{}{bar}"));
        assert_eq!(slot(b"foo{{bar}}zap"), whole(b"{bar"));
    }

    #[test]
    fn ids_spread_over_the_buckets() {
        let keys = Keys::new("hr", 64);
        let mut counts = vec![0; 64];
        for n in 0..64_000 {
            let id = EntitlementId::parse(&format!("customer-{n}")).expect("id");
            counts[keys.bucket_of(&id)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
