//! Every Redis key headroom writes, built here and nowhere else.
//!
//! Per entitlement, all under one hash tag `{<id>}` so that they share a
//! slot:
//! - `{prefix}:{<id>}:epoch`: the owner epoch (a counter; see `Store::load`).
//! - `{prefix}:{<id>}:state`: hash, `core` (counters, JSON) and `config` (JSON).
//! - `{prefix}:{<id>}:seats`: hash, seat id → encoded lease.
//! - `{prefix}:{<id>}:key:<incarnation>:<idempotency key>`: the first
//!   decision made with the key (JSON), expiring after the idempotency window.
//! - `{prefix}:{<id>}:history:<hour|day>:<start ms>`: hash of one history
//!   bucket, expiring after its retention.
//! - `{prefix}:{<id>}:periods`: list of closed-period records, newest first.
//!
//! Shared by all entitlements:
//! - `{prefix}:events`: the event stream (CloudEvents JSON per entry).
//! - `{prefix}:overdraft`: hash, `entitlements` and `seats` in overdraft.
//! - `{prefix}:report:overdraft`: sorted set of ids in overdraft (by id).
//! - `{prefix}:report:denied`: sorted set of ids by their last denial (ms).
//!
//! Webhooks:
//! - `{prefix}:webhooks`: hash, endpoint id → registration (with its secret).
//! - `{prefix}:webhooks:{id}:deliveries`: list, the delivery log, newest first.
//! - `{prefix}:webhooks:retry`: sorted set of deliveries by next attempt (ms).
//! - `{prefix}:webhooks:pending`: hash, delivery id → delivery (JSON).
//! - `{prefix}:webhooks:dead`: the dead-letter stream.

use crate::domain::{BucketSize, EntitlementId, IdempotencyKey};

/// The key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Keys {
            prefix: prefix.into(),
        }
    }

    fn entitlement(&self, id: &EntitlementId, suffix: &str) -> String {
        format!("{}:{{{}}}:{}", self.prefix, id, suffix)
    }

    pub fn epoch(&self, id: &EntitlementId) -> String {
        self.entitlement(id, "epoch")
    }

    pub fn state(&self, id: &EntitlementId) -> String {
        self.entitlement(id, "state")
    }

    pub fn seats(&self, id: &EntitlementId) -> String {
        self.entitlement(id, "seats")
    }

    pub fn periods(&self, id: &EntitlementId) -> String {
        self.entitlement(id, "periods")
    }

    pub fn idempotency(
        &self,
        id: &EntitlementId,
        incarnation: i64,
        key: &IdempotencyKey,
    ) -> String {
        self.entitlement(id, &format!("key:{incarnation}:{key}"))
    }

    pub fn history(&self, id: &EntitlementId, size: BucketSize, start: i64) -> String {
        self.entitlement(id, &format!("history:{}:{start}", size.as_str()))
    }

    fn shared(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    pub fn events(&self) -> String {
        self.shared("events")
    }

    pub fn overdraft_totals(&self) -> String {
        self.shared("overdraft")
    }

    pub fn overdraft_index(&self) -> String {
        self.shared("report:overdraft")
    }

    pub fn denied_index(&self) -> String {
        self.shared("report:denied")
    }

    pub fn webhooks(&self) -> String {
        self.shared("webhooks")
    }

    pub fn webhook_log(&self, webhook: &str) -> String {
        self.shared(&format!("webhooks:{webhook}:deliveries"))
    }

    pub fn webhook_retry(&self) -> String {
        self.shared("webhooks:retry")
    }

    pub fn webhook_pending(&self) -> String {
        self.shared("webhooks:pending")
    }

    pub fn webhook_dead(&self) -> String {
        self.shared("webhooks:dead")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entitlements_keys_share_its_hash_tag() {
        let keys = Keys::new("hr");
        let id = EntitlementId::parse("acme").expect("id");
        let key = IdempotencyKey::parse("k1").expect("key");
        for k in [
            keys.epoch(&id),
            keys.state(&id),
            keys.seats(&id),
            keys.periods(&id),
            keys.idempotency(&id, 7, &key),
            keys.history(&id, BucketSize::Day, 0),
        ] {
            assert!(k.starts_with("hr:{acme}:"), "{k}");
        }
        assert_eq!(keys.idempotency(&id, 7, &key), "hr:{acme}:key:7:k1");
        assert_eq!(
            keys.history(&id, BucketSize::Hour, 36),
            "hr:{acme}:history:hour:36"
        );
        assert_eq!(keys.webhook_log("wh_1"), "hr:webhooks:wh_1:deliveries");
    }
}
