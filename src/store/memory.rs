//! The embedded default: everything in this process, nothing survives a
//! restart. It keeps the same contract as Redis (epochs, atomic commits,
//! idempotency records, a capped event stream) so the engine has one path.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Commit, CommitOutcome, Loaded, OverdraftTotals, Store, StoreError, Write, decode_state,
};
use crate::domain::{EntitlementId, IdempotencyKey, Lease, SeatId};

#[derive(Default)]
struct Entry {
    epoch: u64,
    core: Option<String>,
    config: String,
    seats: HashMap<SeatId, Lease>,
}

struct Inner {
    entries: HashMap<EntitlementId, Entry>,
    keys: HashMap<(EntitlementId, i64, IdempotencyKey), (String, Instant)>,
    events: VecDeque<StoredEvent>,
    next_purge: Instant,
    totals: OverdraftTotals,
}

/// One entry of the in-memory event stream.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub kind: String,
    pub entitlement: String,
    pub event: String,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    stream_maxlen: usize,
    idempotency_window: Duration,
}

impl MemoryStore {
    pub fn new(stream_maxlen: usize, idempotency_window: Duration) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                keys: HashMap::new(),
                events: VecDeque::new(),
                next_purge: Instant::now(),
                totals: OverdraftTotals::default(),
            }),
            stream_maxlen,
            idempotency_window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
        let seats = entry
            .seats
            .iter()
            .map(|(s, l)| (s.to_string(), l.encode()))
            .collect::<Vec<_>>();
        let state = decode_state(id, core.as_bytes(), entry.config.as_bytes(), seats)?;
        Ok(Loaded {
            epoch,
            claimed: true,
            state: Some(state),
        })
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
            }
        }
        for (kind, event) in commit.events {
            inner.events.push_back(StoredEvent {
                kind: kind.to_string(),
                entitlement: commit.id.to_string(),
                event,
            });
        }
        while inner.events.len() > self.stream_maxlen {
            inner.events.pop_front();
        }
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

    async fn overdraft_totals(&self) -> Result<OverdraftTotals, StoreError> {
        Ok(self.lock().totals)
    }

    fn durable(&self) -> bool {
        false
    }

    async fn shutdown(&self) {}
}
