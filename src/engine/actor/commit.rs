//! The commit cycle of an entitlement actor: calls decided since the last
//! write wait in [`PendingWrite`]; when no write is in flight they go to the
//! store as one commit ([`InFlightWrite`]); on success their answers are
//! sent, on failure or an unknown outcome the state is read back and
//! settled, and calls decided on state that was never written are decided
//! again.

use std::time::Instant;

use actix::prelude::*;
use serde::Serialize;

use super::evidence::Standing;
use super::idempotency::KeyEntry;
use super::requests::Waiting;
use super::{EntitlementActor, Phase, RELOAD_BACKOFF};
use crate::domain::{Effects, Entitlement, Event, HistoryDelta, IdempotencyKey, SeatsWritten};
use crate::engine::EngineError;
use crate::store::{
    Commit, CommitOutcome, ErrorClass, KeyRecord, Loaded, Records, StoreError, Write,
};
use crate::telemetry;

/// A key first used in the pending write, with the decision to keep.
pub(super) struct NewKey {
    pub incarnation: i64,
    pub key: IdempotencyKey,
    pub entry: KeyEntry,
}

/// Calls decided since the last write, and what they changed.
#[derive(Default)]
pub(super) struct PendingWrite {
    pub calls: Vec<Waiting>,
    pub fx: Effects,
    /// Events to publish, with the incarnation they belong to.
    pub events: Vec<(Event, i64)>,
    pub keys: Vec<NewKey>,
    /// The entitlement was deleted in this write: it starts afresh.
    pub reset: bool,
    /// The configuration was replaced: the write carries it.
    pub config_changed: bool,
    /// What this write adds to the hourly and daily history.
    pub history: HistoryDelta,
    /// The last denial of this write (ms), for the recent-denials index.
    pub denied_at: Option<i64>,
    /// Usage periods closed in this write (their events), as billing records.
    pub periods: Vec<Event>,
    /// What will be known of the stored seat history once this write lands.
    pub seats_written: Option<SeatsWritten>,
}

impl PendingWrite {
    pub fn needs_write(&self) -> bool {
        self.fx.changed
            || !self.events.is_empty()
            || !self.keys.is_empty()
            || self.reset
            || self.config_changed
    }
}

/// A pending write as the store takes it.
struct Encoded {
    write: Write,
    /// `(type, CloudEvents JSON)` in order.
    events: Vec<(&'static str, String)>,
    keys: Vec<KeyRecord>,
}

/// A closed period as kept for billing: its event's data and when it closed.
#[derive(Serialize)]
struct PeriodRecord<'a> {
    #[serde(flatten)]
    data: &'a crate::domain::EventData,
    closed_at: chrono::DateTime<chrono::Utc>,
}

/// The write in flight: the calls it answers, and what tells whether it
/// reached the store if its outcome is unknown.
pub(super) struct InFlightWrite {
    pub pending: PendingWrite,
    /// The write told the report index where the entitlement stands.
    indexed: bool,
    /// Where the state of this write stands on overdraft.
    standing: Standing,
    incarnation: Option<i64>,
    commits: u64,
    event_kinds: Vec<&'static str>,
    /// The idempotency keys first used by this write: cached decisions
    /// that are not written until it is.
    keys: Vec<IdempotencyKey>,
}

impl EntitlementActor {
    /// Encodes the pending write for the store. Encoding our own types
    /// cannot fail in practice; if it ever did, the write is refused whole
    /// rather than an empty value stored.
    fn encode(
        &self,
        pending: &mut PendingWrite,
        records: &mut Records,
    ) -> Result<Encoded, serde_json::Error> {
        let write = match self.state.as_ref() {
            None => Write::Delete,
            Some(e) => Write::Put {
                replace: pending.reset,
                core: serde_json::to_string(e)?,
                config: (pending.config_changed || pending.reset)
                    .then(|| serde_json::to_string(&e.config))
                    .transpose()?,
                seats: pending.fx.seats.drain().collect(),
            },
        };
        let source = &self.core.settings.source;
        let events = pending
            .events
            .iter()
            .map(|(ev, incarnation)| {
                ev.to_cloud_event(self.id.as_str(), *incarnation, source)
                    .map(|json| (ev.data.kind(), json))
            })
            .collect::<Result<_, _>>()?;
        let keys = pending
            .keys
            .iter()
            .map(|k| {
                Ok(KeyRecord {
                    incarnation: k.incarnation,
                    key: k.key.clone(),
                    record: k.entry.record()?,
                })
            })
            .collect::<Result<_, serde_json::Error>>()?;
        records.periods = pending
            .periods
            .iter()
            .map(|ev| {
                serde_json::to_string(&PeriodRecord {
                    data: &ev.data,
                    closed_at: ev.time,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Encoded {
            write,
            events,
            keys,
        })
    }

    /// Starts the next write when none is in flight.
    pub(super) fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.inflight.is_some() || (self.pending.calls.is_empty() && !self.pending.needs_write())
        {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        if !pending.needs_write() {
            for w in pending.calls.drain(..) {
                w.answer();
            }
            self.notify_drains(ctx);
            return;
        }
        if let Some(e) = self.state.as_mut() {
            e.commits += 1;
        }
        let standing = Standing::of(self.state.as_ref());
        let mut records = self.evidence(&mut pending, standing);
        let Encoded {
            write,
            events,
            keys: idempotency,
        } = match self.encode(&mut pending, &mut records) {
            Ok(encoded) => encoded,
            Err(e) => return self.unencodable(e, pending, ctx),
        };
        let commit = Commit {
            id: self.id.clone(),
            epoch: self.epoch,
            claim: !self.claimed,
            write,
            events,
            idempotency,
            overdraft: standing.since(self.committed_standing),
            records,
        };
        let inflight = InFlightWrite {
            indexed: commit.records.in_overdraft.is_some(),
            standing,
            event_kinds: commit.events.iter().map(|(k, _)| *k).collect(),
            incarnation: self.state.as_ref().map(Entitlement::incarnation),
            commits: self.state.as_ref().map_or(0, |e| e.commits),
            keys: commit.idempotency.iter().map(|r| r.key.clone()).collect(),
            pending,
        };
        let store = self.core.store.clone();
        self.inflight = Some(Box::new(inflight));
        ctx.spawn(
            async move { store.commit(commit).await }
                .into_actor(self)
                .map(|res, act, ctx| act.committed(res, ctx)),
        );
    }

    /// A write that could not be encoded was never sent: its calls fail,
    /// and the state it would have written is read back from the store.
    fn unencodable(
        &mut self,
        e: serde_json::Error,
        pending: PendingWrite,
        ctx: &mut Context<Self>,
    ) {
        tracing::error!(entitlement = %self.id, error = %e, "a write could not be encoded; reloading");
        let e = EngineError::Encoding(std::sync::Arc::new(e));
        self.forget_unwritten(pending.keys.iter().map(|k| &k.key));
        for w in pending.calls {
            w.fail(&e);
        }
        self.reload(ctx, Read::Settle, None, Vec::new());
    }

    fn committed(&mut self, res: Result<CommitOutcome, StoreError>, ctx: &mut Context<Self>) {
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        let epoch = match res {
            Ok(CommitOutcome::Applied { epoch }) => epoch,
            Ok(CommitOutcome::Fenced) => {
                metrics::counter!("headroom_fenced_writes_total").increment(1);
                if let Some(f) = self.core.on_fenced.get() {
                    f();
                }
                return self.not_written(inflight, None, ctx);
            }
            Ok(CommitOutcome::KeysExist(found)) => {
                return self.not_written(inflight, Some(found), ctx);
            }
            Err(e) => return self.write_failed(e, inflight, ctx),
        };
        if epoch != self.epoch {
            metrics::counter!("headroom_claims_total").increment(1);
        }
        self.epoch = epoch;
        self.claimed = true;
        telemetry::engine::events_published(&inflight.event_kinds);
        self.committed_standing = inflight.standing;
        self.indexed |= inflight.indexed;
        self.seats_written = inflight.pending.seats_written;
        self.publish_watched();
        for w in inflight.pending.calls {
            w.answer();
        }
        self.flush(ctx);
        self.schedule(ctx);
        self.notify_drains(ctx);
    }

    /// Takes the calls decided since the write, and forgets the decisions
    /// the cache holds for keys that were never written (or not known to
    /// be): their calls must be decided again or found in the store, not
    /// replayed from the cache.
    fn take_unwritten(&mut self, inflight: &InFlightWrite) -> Vec<Waiting> {
        let pending = std::mem::take(&mut self.pending);
        self.forget_unwritten(
            inflight
                .keys
                .iter()
                .chain(pending.keys.iter().map(|k| &k.key)),
        );
        pending.calls
    }

    /// A write that did not land, or may not have: what this actor knew of
    /// the stored history and index no longer holds, and the decisions of
    /// `keys` are not known to be stored.
    fn forget_unwritten<'a>(&mut self, keys: impl IntoIterator<Item = &'a IdempotencyKey>) {
        self.seats_written = None;
        self.indexed = false;
        self.keys.forget(keys);
    }

    /// The store refused the write as a whole, because another owner took
    /// the entitlement (`found` is `None`) or some idempotency keys were
    /// already used: read again, and decide every call again on what was
    /// read.
    fn not_written(
        &mut self,
        inflight: Box<InFlightWrite>,
        found: Option<Vec<(IdempotencyKey, String)>>,
        ctx: &mut Context<Self>,
    ) {
        let pending = self.take_unwritten(&inflight);
        let replay = inflight.pending.calls.into_iter().chain(pending).collect();
        let Some(found) = found else {
            tracing::warn!(entitlement = %self.id, "another owner took this entitlement; reloading");
            return self.reload(ctx, Read::Load, None, replay);
        };
        self.reload(ctx, Read::Load, None, replay);
        // These records are what the replayed calls must find. The store
        // still holds them, so they are still remembered whatever this
        // clock says of their age (else the replay would decide afresh and
        // meet the same keys again).
        let limit = self.core.settings.cached_keys;
        let now = self.core.clock.now();
        for (key, record) in found {
            match serde_json::from_str::<KeyEntry>(&record) {
                Ok(mut entry) => {
                    entry.at = entry.at.max(now);
                    self.keys.insert(key, entry, limit);
                }
                // Its call is decided again and meets the key again: the
                // store answers what it holds, which the replay cannot use.
                Err(e) => {
                    tracing::error!(entitlement = %self.id, key = %key, error = %e, "a stored idempotency record is unreadable")
                }
            }
        }
    }

    /// The write failed: refused before it ran (its calls answer 503), not
    /// replicated in time (504, final), or with an unknown outcome (the
    /// read-back tells). Either way the state
    /// is read back on the short budget.
    fn write_failed(
        &mut self,
        e: StoreError,
        inflight: Box<InFlightWrite>,
        ctx: &mut Context<Self>,
    ) {
        // Redis being down is logged once, by the store, not per entitlement.
        tracing::debug!(entitlement = %self.id, error = %crate::store::chain(&e), "write failed; reloading");
        let pending = self.take_unwritten(&inflight);
        if matches!(e.class(), ErrorClass::Refused | ErrorClass::NotReplicated) {
            // Not applied; or applied on the primary only, which a read-back
            // there would find and wrongly acknowledge: either way final.
            let e = match e.class() {
                ErrorClass::NotReplicated => EngineError::NotReplicated(std::sync::Arc::new(e)),
                _ => EngineError::from(e),
            };
            for w in inflight.pending.calls {
                w.fail(&e);
            }
            self.reload(ctx, Read::Settle, None, pending);
        } else {
            self.reload(ctx, Read::Settle, Some(inflight), pending);
        }
    }

    /// Reads the state back from the store, blocking the mailbox meanwhile.
    /// `unknown` is a write whose outcome must be settled by what is read;
    /// `replay` are calls decided on state that was never written: they are
    /// decided again on what was read.
    pub(super) fn reload(
        &mut self,
        ctx: &mut Context<Self>,
        read: Read,
        unknown: Option<Box<InFlightWrite>>,
        replay: Vec<Waiting>,
    ) {
        let store = self.core.store.clone();
        let id = self.id.clone();
        // The cache keeps the decisions known to be written (the callers
        // forgot the others): still true after the read, unless the
        // entitlement was deleted and created again meanwhile.
        let incarnation = self.state.take().map(|e| e.incarnation());
        let read = async move {
            match read {
                Read::Settle => store.settle(&id).await,
                Read::Load => store.load(&id).await,
            }
        };
        ctx.wait(read.into_actor(self).map(move |res, act, ctx| match res {
            Ok(loaded) => act.loaded(loaded, incarnation, unknown, replay, ctx),
            Err(e) => act.unreadable(e, unknown, replay, ctx),
        }));
    }

    fn loaded(
        &mut self,
        loaded: Loaded,
        incarnation: Option<i64>,
        unknown: Option<Box<InFlightWrite>>,
        replay: Vec<Waiting>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(u) = unknown {
            let written = match (&loaded.state, u.incarnation) {
                (Some(s), Some(inc)) => s.incarnation() == inc && s.commits >= u.commits,
                (None, None) => true,
                _ => false,
            };
            if written {
                telemetry::engine::events_published(&u.event_kinds);
                for w in u.pending.calls {
                    w.answer();
                }
            } else {
                let e = EngineError::from(StoreError::not_sent(
                    "commit",
                    "the write failed and did not land",
                    None,
                ));
                for w in u.pending.calls {
                    w.fail(&e);
                }
            }
        }
        if loaded.claimed {
            metrics::counter!("headroom_claims_total").increment(1);
        }
        self.epoch = loaded.epoch;
        self.claimed = loaded.claimed;
        self.state = loaded.state;
        if self.state.as_ref().map(Entitlement::incarnation) != incarnation {
            self.keys.clear();
        }
        self.committed_standing = Standing::of(self.state.as_ref());
        self.indexed = false;
        self.seats_written = None;
        self.publish_watched();
        self.phase = Phase::Ready;
        for w in replay {
            w.decide_again(self);
        }
        self.flush(ctx);
        self.schedule(ctx);
    }

    fn unreadable(
        &mut self,
        e: StoreError,
        unknown: Option<Box<InFlightWrite>>,
        replay: Vec<Waiting>,
        ctx: &mut Context<Self>,
    ) {
        let corrupt = e.class() == ErrorClass::Corrupt;
        if corrupt {
            // Logged once: every later call answers 500 at once until the
            // actor leaves memory and a later call reads the store again.
            tracing::error!(entitlement = %self.id, error = %crate::store::chain(&e), "stored state is unreadable");
        } else {
            tracing::debug!(entitlement = %self.id, error = %crate::store::chain(&e), "loading entitlement failed");
        }
        // A write that was sent and could not be settled may have landed:
        // 504, retry with the key. Calls never sent: 503 (or 500, corrupt).
        let failed = EngineError::from(e);
        if let Some(u) = unknown {
            let unknown = match &failed {
                EngineError::Unavailable(cause) => EngineError::OutcomeUnknown(cause.clone()),
                other => other.clone(),
            };
            for w in u.pending.calls {
                w.fail(&unknown);
            }
        }
        for w in replay {
            w.fail(&failed);
        }
        self.phase = if corrupt {
            Phase::Corrupt(failed)
        } else {
            Phase::Broken {
                retry_at: Instant::now() + RELOAD_BACKOFF,
                cause: failed,
            }
        };
        self.schedule(ctx);
        self.notify_drains(ctx);
    }
}

/// How an entitlement's state is read back.
#[derive(Clone, Copy)]
pub(super) enum Read {
    /// First use, or another owner or stored idempotency keys got in the way.
    Load,
    /// After a write that failed or whose outcome is unknown: fences that
    /// write, within the short budget.
    Settle,
}
