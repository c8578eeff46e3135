//! The idempotency keys an actor used recently: the first decision of each,
//! answered again for a retry without asking the store (which holds them
//! all, for the whole idempotency window).

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{IdempotencyKey, UsageDecision};
use crate::engine::UsageRequest;

/// What an idempotency key was first used for; stored as JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct KeyEntry {
    pub fingerprint: String,
    pub decision: UsageDecision,
    pub at: DateTime<Utc>,
}

impl KeyEntry {
    /// The record the store keeps. Serializing these plain fields cannot
    /// fail; should it ever, the call fails rather than store nothing.
    pub fn record(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// What must match for a retry to be the same call.
pub(super) fn fingerprint(req: &UsageRequest) -> String {
    format!("{}:{}", req.feature, req.amount.get())
}

/// The entries, and their keys oldest first for eviction.
type KeysByAge = (HashMap<IdempotencyKey, KeyEntry>, VecDeque<IdempotencyKey>);

#[derive(Default)]
pub(super) struct KeyCache {
    /// Allocated on the first key: most entitlements never see one.
    keys: Option<Box<KeysByAge>>,
}

impl KeyCache {
    pub fn get(&self, key: &IdempotencyKey) -> Option<&KeyEntry> {
        self.keys.as_ref().and_then(|k| k.0.get(key))
    }

    pub fn insert(&mut self, key: IdempotencyKey, entry: KeyEntry, limit: usize) {
        let (map, order) = &mut **self.keys.get_or_insert_default();
        if map.insert(key.clone(), entry).is_none() {
            order.push_back(key);
        }
        while order.len() > limit {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    pub fn clear(&mut self) {
        self.keys = None;
    }

    /// Forgets decisions that were never written (their write failed).
    pub fn forget<'a>(&mut self, keys: impl IntoIterator<Item = &'a IdempotencyKey>) {
        if let Some(k) = self.keys.as_mut() {
            for key in keys {
                k.0.remove(key);
            }
        }
    }
}
