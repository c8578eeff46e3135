//! The embedded default: everything in this process, nothing survives a
//! restart. It keeps the same contract as Redis (epochs, atomic commits,
//! idempotency records, a capped event stream) so the engine has one path.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Commit, CommitOutcome, DENIALS_KEPT_MS, EventEntry, EventsFrom, EventsPage, Loaded,
    OverdraftCounts, PERIODS_KEPT, Peeked, Records, Store, StoreError, StreamPos, Write,
    decode_state,
};
use crate::domain::{BucketRecord, BucketSize, EntitlementId, IdempotencyKey, Lease, SeatId};

#[derive(Default)]
struct Entry {
    epoch: u64,
    core: Option<String>,
    config: String,
    seats: HashMap<SeatId, Lease>,
}

impl Entry {
    /// The entitlement stored here, with state `core`.
    fn decode(
        &self,
        id: &EntitlementId,
        core: &str,
    ) -> Result<crate::domain::Entitlement, StoreError> {
        let seats = self.seats.iter().map(|(s, l)| (s.to_string(), l.encode()));
        decode_state(id, core.as_bytes(), self.config.as_bytes(), seats)
    }
}

struct Tables {
    entries: HashMap<EntitlementId, Entry>,
    keys: HashMap<(EntitlementId, i64, IdempotencyKey), (String, Instant)>,
    events: VecDeque<StoredEvent>,
    next_purge: Instant,
    totals: OverdraftCounts,
    overdraft: BTreeSet<String>,
    /// Every configured entitlement, by id.
    configured: BTreeSet<String>,
    /// The position of the latest event (as Redis numbers stream entries).
    last_event: StreamPos,
    denied: HashMap<String, i64>,
    /// (id, bucket size, start) → record and when it expires (ms).
    history: HashMap<(EntitlementId, BucketSize, i64), (BucketRecord, i64)>,
    /// Closed periods, newest first.
    periods: HashMap<EntitlementId, VecDeque<String>>,
    /// The latest time (ms) a write's history was for: expires old buckets.
    history_now: i64,
    /// When each entitlement's portal links were revoked (ms), and until
    /// when that is remembered.
    links_revoked: HashMap<EntitlementId, (i64, Instant)>,
}

impl Tables {
    fn apply_records(&mut self, id: &EntitlementId, deleted: bool, records: Records) {
        let key = id.to_string();
        match records.in_overdraft {
            Some(true) => {
                self.overdraft.insert(key.clone());
            }
            Some(false) => {
                self.overdraft.remove(&key);
            }
            None => {}
        }
        if let Some(at) = records.denied_at {
            self.denied.insert(key, at);
            self.denied.retain(|_, t| *t >= at - DENIALS_KEPT_MS);
        } else if deleted {
            self.denied.remove(&key);
        }
        for w in records.history {
            let day = BucketSize::Day.start(w.hour);
            for (size, start, expires, ops) in [
                (BucketSize::Hour, w.hour, w.hour_expire_at, &w.hour_ops),
                (BucketSize::Day, day, w.day_expire_at, &w.day_ops),
            ] {
                if ops.is_empty() {
                    continue;
                }
                let (record, at) = self
                    .history
                    .entry((id.clone(), size, start))
                    .or_insert_with(|| (BucketRecord::default(), expires));
                record.apply(ops);
                *at = expires;
            }
            self.history_now = self.history_now.max(w.hour);
        }
        if !records.periods.is_empty() {
            let list = self.periods.entry(id.clone()).or_default();
            for p in records.periods {
                list.push_front(p);
            }
            list.truncate(PERIODS_KEPT);
        }
    }
}

/// One entry of the in-memory event stream.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub pos: StreamPos,
    pub kind: String,
    pub entitlement: String,
    pub event: String,
}

/// Up to `limit` ids of `set` after `after`, in order.
fn page_of(set: &BTreeSet<String>, after: Option<&str>, limit: usize) -> Vec<String> {
    use std::ops::Bound::{Excluded, Unbounded};
    match after {
        Some(a) => set
            .range::<str, _>((Excluded(a), Unbounded))
            .take(limit)
            .cloned()
            .collect(),
        None => set.iter().take(limit).cloned().collect(),
    }
}

pub struct MemoryStore {
    inner: Mutex<Tables>,
    stream_maxlen: usize,
    idempotency_window: Duration,
}

impl MemoryStore {
    pub fn new(stream_maxlen: usize, idempotency_window: Duration) -> Self {
        MemoryStore {
            inner: Mutex::new(Tables {
                entries: HashMap::new(),
                keys: HashMap::new(),
                events: VecDeque::new(),
                next_purge: Instant::now(),
                totals: OverdraftCounts::default(),
                overdraft: BTreeSet::new(),
                configured: BTreeSet::new(),
                last_event: StreamPos { ms: 0, seq: 0 },
                denied: HashMap::new(),
                history: HashMap::new(),
                periods: HashMap::new(),
                history_now: 0,
                links_revoked: HashMap::new(),
            }),
            stream_maxlen,
            idempotency_window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A poisoned lock only means a panic elsewhere; the data is still whole
        // because every commit is applied after all its checks passed.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The event stream, oldest first (for tests and the embedded mode).
    pub fn events(&self) -> Vec<StoredEvent> {
        self.lock().events.iter().cloned().collect()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, id: &EntitlementId) -> Result<Loaded, StoreError> {
        let mut inner = self.lock();
        // An unknown id leaves nothing behind, so that probing ids costs no memory.
        let Some(entry) = inner.entries.get_mut(id) else {
            return Ok(Loaded {
                epoch: 0,
                claimed: false,
                state: None,
            });
        };
        let Some(core) = entry.core.clone() else {
            return Ok(Loaded {
                epoch: entry.epoch,
                claimed: false,
                state: None,
            });
        };
        entry.epoch += 1;
        let epoch = entry.epoch;
        let state = entry.decode(id, &core)?;
        Ok(Loaded {
            epoch,
            claimed: true,
            state: Some(state),
        })
    }

    async fn epoch(&self, id: &EntitlementId) -> Result<u64, StoreError> {
        Ok(self.lock().entries.get(id).map_or(0, |e| e.epoch))
    }

    async fn commit(&self, commit: Commit) -> Result<CommitOutcome, StoreError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let now = Instant::now();
        let entry = inner.entries.entry(commit.id.clone()).or_default();
        if entry.epoch != commit.epoch {
            return Ok(CommitOutcome::Fenced);
        }
        let existing: Vec<(IdempotencyKey, String)> = commit
            .idempotency
            .iter()
            .filter_map(|r| {
                let scoped = (commit.id.clone(), r.incarnation, r.key.clone());
                match inner.keys.get(&scoped) {
                    Some((v, expires)) if *expires > now => Some((r.key.clone(), v.clone())),
                    _ => None,
                }
            })
            .collect();
        if !existing.is_empty() {
            return Ok(CommitOutcome::KeysExist(existing));
        }
        if commit.claim {
            entry.epoch += 1;
        }
        let epoch = entry.epoch;
        let deleted = matches!(commit.write, Write::Delete);
        match commit.write {
            Write::Put {
                replace,
                core,
                config,
                seats,
            } => {
                if replace {
                    entry.seats.clear();
                }
                entry.core = Some(core);
                if let Some(config) = config {
                    entry.config = config;
                    inner.configured.insert(commit.id.to_string());
                }
                for (seat, lease) in seats {
                    match lease {
                        Some(l) => entry.seats.insert(seat, l),
                        None => entry.seats.remove(&seat),
                    };
                }
            }
            Write::Delete => {
                entry.core = None;
                entry.seats.clear();
                inner.configured.remove(commit.id.as_str());
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for (kind, event) in commit.events {
            let last = inner.last_event;
            let pos = if now_ms > last.ms {
                StreamPos { ms: now_ms, seq: 0 }
            } else {
                last.next()
            };
            inner.last_event = pos;
            inner.events.push_back(StoredEvent {
                pos,
                kind: kind.to_string(),
                entitlement: commit.id.to_string(),
                event,
            });
        }
        while inner.events.len() > self.stream_maxlen {
            inner.events.pop_front();
        }
        inner.apply_records(&commit.id, deleted, commit.records);
        inner.totals.entitlements += commit.overdraft.entitlements;
        inner.totals.seats += commit.overdraft.seats;
        let expires = now + self.idempotency_window;
        for r in commit.idempotency {
            inner.keys.insert(
                (commit.id.clone(), r.incarnation, r.key),
                (r.record, expires),
            );
        }
        if now >= inner.next_purge {
            inner.keys.retain(|_, (_, e)| *e > now);
            let history_now = inner.history_now;
            inner.history.retain(|_, (_, at)| *at > history_now);
            inner.next_purge = now + Duration::from_secs(60);
        }
        Ok(CommitOutcome::Applied { epoch })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn stream_length(&self) -> Result<u64, StoreError> {
        Ok(self.lock().events.len() as u64)
    }

    async fn overdraft_totals(&self) -> Result<OverdraftCounts, StoreError> {
        Ok(self.lock().totals)
    }

    async fn peek_many(&self, ids: &[EntitlementId]) -> Result<Vec<Peeked>, StoreError> {
        let inner = self.lock();
        Ok(ids
            .iter()
            .map(|id| match inner.entries.get(id) {
                Some(
                    e @ Entry {
                        core: Some(core), ..
                    },
                ) => e.decode(id, core).map(Some),
                _ => Ok(None),
            })
            .collect())
    }

    async fn overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(page_of(&self.lock().overdraft, after, limit))
    }

    async fn entitlement_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(page_of(&self.lock().configured, after, limit))
    }

    async fn events_page(
        &self,
        from: EventsFrom,
        of: Option<&EntitlementId>,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        let inner = self.lock();
        let end = inner.last_event.next();
        let start = match from {
            EventsFrom::Oldest => StreamPos { ms: 0, seq: 0 },
            EventsFrom::Now => end,
            EventsFrom::At(p) => p,
        };
        let first = inner.events.partition_point(|e| e.pos < start);
        let mut entries = Vec::new();
        let mut next = end.max(start);
        let mut more = false;
        for e in inner.events.range(first..) {
            if entries.len() >= limit {
                next = e.pos;
                more = true;
                break;
            }
            if of.is_none_or(|id| id.as_str() == e.entitlement) {
                entries.push(EventEntry {
                    pos: e.pos,
                    kind: e.kind.clone(),
                    entitlement: e.entitlement.clone(),
                    event: e.event.clone(),
                });
            }
        }
        Ok(EventsPage {
            entries,
            next,
            more,
        })
    }

    async fn denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let inner = self.lock();
        // Most recent first; ties by id, descending (as Redis orders them).
        let mut all: Vec<(i64, &String)> = inner
            .denied
            .iter()
            .filter(|(_, t)| **t >= since)
            .map(|(id, t)| (*t, id))
            .collect();
        all.sort_by(|a, b| b.cmp(a));
        Ok(all
            .into_iter()
            .filter(|(t, id)| match &after {
                Some((at, aid)) => (*t, *id) < (*at, aid),
                None => true,
            })
            .take(limit)
            .map(|(t, id)| (id.clone(), t))
            .collect())
    }

    async fn history(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        starts: &[i64],
    ) -> Result<Vec<Option<BucketRecord>>, StoreError> {
        let inner = self.lock();
        Ok(starts
            .iter()
            .map(|s| {
                inner
                    .history
                    .get(&(id.clone(), size, *s))
                    .map(|(r, _)| r.clone())
            })
            .collect())
    }

    async fn periods(&self, id: &EntitlementId, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .lock()
            .periods
            .get(id)
            .map(|l| l.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn links_revoked_at(&self, id: &EntitlementId) -> Result<Option<i64>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .links_revoked
            .get(id)
            .filter(|(_, until)| *until > now)
            .map(|(at, _)| *at))
    }

    async fn revoke_links(
        &self,
        id: &EntitlementId,
        at: i64,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut tables = self.lock();
        tables.links_revoked.retain(|_, (_, until)| *until > now);
        tables.links_revoked.insert(id.clone(), (at, now + keep));
        Ok(())
    }

    async fn shutdown(&self) {}
}
