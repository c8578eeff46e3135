//! The entitlement actor: decides calls on its in-memory state, group-commits
//! their effects, and answers each call once its effects are durable.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Dormant, EngineError, Shared, Slot, UsageReply, UsageRequest};
use crate::domain::{
    BucketSize, DenyReason, Effects, Entitlement, EntitlementConfig, EntitlementId,
    EntitlementView, EventData, HistoryDelta, IdempotencyKey, Outcome, ReleaseResult, SeatDecision,
    SeatId, SeatView, SeatsWritten, UsageDecision,
};
use crate::store::{
    Commit, CommitOutcome, HistoryWrite, KeyRecord, Loaded, OverdraftDelta, Records, StoreError,
    Write,
};

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Activate(SeatId),
    Release(SeatId),
    Usage(UsageRequest),
    Batch(Arc<Vec<UsageRequest>>),
    Put(Box<EntitlementConfig>),
    Delete,
    Get,
    Seats,
    /// The sweep timer's housekeeping: nobody waits for it.
    Sweep,
}

impl Op {
    fn label(&self) -> &'static str {
        match self {
            Op::Activate(_) => "activate",
            Op::Release(_) => "release",
            Op::Usage(_) | Op::Batch(_) => "usage",
            Op::Put(_) => "put",
            Op::Delete => "delete",
            Op::Get | Op::Seats => "read",
            Op::Sweep => "sweep",
        }
    }
}

#[derive(Debug)]
pub(crate) enum Reply {
    Seat(SeatDecision),
    Release(ReleaseResult),
    Usage(UsageReply),
    Batch(Vec<Result<UsageReply, EngineError>>),
    Put {
        created: bool,
        view: Box<EntitlementView>,
    },
    Deleted,
    View(Box<EntitlementView>),
    Seats(Vec<SeatView>),
    Swept,
}

impl Reply {
    pub(crate) fn unexpected(self) -> EngineError {
        EngineError::Unavailable(format!("internal: unexpected reply {self:?}"))
    }

    fn record_metrics(&self, op: &'static str) {
        match self {
            Reply::Seat(d) => record_decision(op, d.outcome, d.reason),
            Reply::Usage(r) if !r.replayed => {
                record_decision(op, r.decision.outcome, r.decision.reason)
            }
            Reply::Batch(rs) => {
                for r in rs.iter().flatten().filter(|r| !r.replayed) {
                    record_decision(op, r.decision.outcome, r.decision.reason);
                }
            }
            _ => {}
        }
    }
}

thread_local! {
    /// Counter handles by (metric, operation, label value): looking a
    /// labelled metric up in the registry on every decision costs more than
    /// the decision.
    static COUNTERS: std::cell::RefCell<HashMap<(&'static str, &'static str, &'static str), metrics::Counter>> =
        std::cell::RefCell::new(HashMap::new());
}

thread_local! {
    static MAILBOX_WAIT: metrics::Histogram = metrics::histogram!("headroom_actor_mailbox_wait_seconds");
}

fn count(name: &'static str, op: &'static str, label: &'static str, value: &'static str) {
    COUNTERS.with(|c| {
        c.borrow_mut()
            .entry((name, op, value))
            .or_insert_with(|| metrics::counter!(name, "operation" => op, label => value))
            .increment(1)
    });
}

fn record_decision(op: &'static str, outcome: Outcome, reason: Option<DenyReason>) {
    count("headroom_decisions_total", op, "outcome", outcome.as_str());
    if let Some(reason) = reason {
        count("headroom_denials_total", op, "reason", reason.as_str());
    }
}

/// The series of a watched entitlement: seats and each feature's usage
/// against what was purchased and the cap.
fn publish_watched(e: &Entitlement) {
    let id = e.id.to_string();
    let view = e.view();
    metrics::gauge!("headroom_watched_seats_in_use", "entitlement" => id.clone())
        .set(view.seats.in_use as f64);
    metrics::gauge!("headroom_watched_seats_purchased", "entitlement" => id.clone())
        .set(view.seats.purchased as f64);
    if let Some(cap) = view.seats.hard_cap.finite() {
        metrics::gauge!("headroom_watched_seats_hard_cap", "entitlement" => id.clone())
            .set(cap as f64);
    }
    for (feature, f) in &view.features {
        let labels = [
            ("entitlement", id.clone()),
            ("feature", feature.to_string()),
        ];
        metrics::gauge!("headroom_watched_usage", &labels).set(f.used as f64);
        metrics::gauge!("headroom_watched_usage_included", &labels).set(f.included as f64);
    }
}

type ReplyTx = oneshot::Sender<Result<Reply, EngineError>>;

pub(crate) struct Call {
    pub op: Op,
    pub reply: ReplyTx,
    /// When the call was sent, for the mailbox wait.
    pub sent: Instant,
}

impl Message for Call {
    type Result = ();
}

/// Asks the actor to write what it holds and stop (graceful shutdown).
pub(crate) struct Drain(pub oneshot::Sender<()>);

impl Message for Drain {
    type Result = ();
}

/// Whether an entitlement is in overdraft (seats or any feature), and by
/// how many seats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Standing {
    in_overdraft: bool,
    seats_over: u64,
}

impl Standing {
    fn of(state: Option<&Entitlement>) -> Self {
        state.map_or_else(Standing::default, |e| Standing {
            in_overdraft: e.in_overdraft(),
            seats_over: e.seats.in_use().saturating_sub(e.config.seats.purchased),
        })
    }

    /// The change from `before` to this, for the store's totals.
    fn since(self, before: Standing) -> OverdraftDelta {
        OverdraftDelta {
            entitlements: i64::from(self.in_overdraft) - i64::from(before.in_overdraft),
            seats: self.seats_over as i64 - before.seats_over as i64,
        }
    }
}

/// A decided call waiting for its batch to be written.
struct Waiting {
    op: Op,
    reply: Option<ReplyTx>,
    answer: Result<Reply, EngineError>,
}

impl Waiting {
    fn answer(self) {
        if let Ok(r) = &self.answer {
            r.record_metrics(self.op.label());
        }
        if let Some(tx) = self.reply {
            let _ = tx.send(self.answer);
        }
    }

    fn fail(self, e: &EngineError) {
        if let Some(tx) = self.reply {
            let _ = tx.send(Err(e.clone()));
        }
    }
}

/// Calls decided since the last write, and what they changed.
#[derive(Default)]
struct Batch {
    calls: Vec<Waiting>,
    fx: Effects,
    events: Vec<(&'static str, String)>,
    keys: Vec<KeyRecord>,
    /// The entitlement was deleted in this batch: the write starts afresh.
    reset: bool,
    /// The configuration was replaced: the write carries it.
    config_changed: bool,
    /// What this batch adds to the hourly and daily history.
    history: HistoryDelta,
    /// The last denial of this batch (ms), for the recent-denials index.
    denied_at: Option<i64>,
    /// Usage periods closed in this batch, as billing records.
    periods: Vec<String>,
    /// What will be known of the stored seat history once this batch's
    /// write lands.
    seats_written: Option<SeatsWritten>,
}

impl Batch {
    fn needs_write(&self) -> bool {
        self.fx.changed
            || !self.events.is_empty()
            || !self.keys.is_empty()
            || self.reset
            || self.config_changed
    }
}

/// What an idempotency key was first used for.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct KeyEntry {
    fingerprint: String,
    decision: UsageDecision,
    at: DateTime<Utc>,
}

/// The idempotency keys this actor used recently; the store holds them all.
#[derive(Default)]
struct KeyCache {
    /// Allocated on the first key: most entitlements never see one.
    inner: Option<Box<KeysByAge>>,
}

/// The entries, and their keys oldest first for eviction.
type KeysByAge = (HashMap<IdempotencyKey, KeyEntry>, VecDeque<IdempotencyKey>);

impl KeyCache {
    fn get(&self, key: &IdempotencyKey) -> Option<&KeyEntry> {
        self.inner.as_ref().and_then(|i| i.0.get(key))
    }

    fn insert(&mut self, key: IdempotencyKey, entry: KeyEntry, limit: usize) {
        let (map, order) = &mut **self.inner.get_or_insert_default();
        if map.insert(key.clone(), entry).is_none() {
            order.push_back(key);
        }
        while order.len() > limit {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    fn clear(&mut self) {
        self.inner = None;
    }

    /// Forgets decisions that were never written (their write failed).
    fn forget<'a>(&mut self, keys: impl IntoIterator<Item = &'a IdempotencyKey>) {
        if let Some(inner) = self.inner.as_mut() {
            for key in keys {
                inner.0.remove(key);
            }
        }
    }
}

fn fingerprint(req: &UsageRequest) -> String {
    format!("{}:{}", req.feature, req.amount.get())
}

/// How an entitlement's state is read back.
#[derive(Clone, Copy)]
enum Read {
    /// First use, or another owner or stored idempotency keys got in the way.
    Load,
    /// After a write that failed or whose outcome is unknown: fences that
    /// write, within the short budget.
    Settle,
}

/// How long a broken entitlement answers 503 at once before it tries to
/// read the store again: calls during an outage answer promptly, and Redis
/// is not stormed with reads when it comes back.
const RELOAD_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(PartialEq)]
enum Phase {
    Ready,
    /// The last write failed and Redis could not be read back: the state is
    /// unknown until the next call reloads it.
    Broken,
}

/// The write in flight: the calls it answers, and what tells whether it
/// reached the store if its outcome is unknown.
struct Inflight {
    batch: Batch,
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

impl Inflight {
    /// Counts the events of this write, once it is known to be written.
    fn count_published(&self) {
        for kind in &self.event_kinds {
            metrics::counter!("headroom_events_published_total", "type" => *kind).increment(1);
        }
    }
}

pub(crate) struct EntitlementActor {
    id: EntitlementId,
    generation: u64,
    shared: Arc<Shared>,
    phase: Phase,
    /// While broken, calls before this instant answer 503 at once instead of
    /// each waiting for a read of its own.
    retry_at: Instant,
    epoch: u64,
    claimed: bool,
    state: Option<Entitlement>,
    pending: Batch,
    inflight: Option<Box<Inflight>>,
    /// Where the stored state stands on overdraft: the baseline of the
    /// change each commit makes to the store's overdraft totals.
    committed_standing: Standing,
    /// Whether a write since the last load told the report index where this
    /// entitlement stands.
    indexed: bool,
    /// The stored seat history fields this actor wrote (so that writes
    /// that change nothing are left out); forgotten on any doubt.
    seats_written: Option<SeatsWritten>,
    keys: KeyCache,
    last_used: Instant,
    /// The one timer this actor may have pending, and when it fires: the
    /// next lease expiry or period end, or the idle deadline. No periodic
    /// timer, so a million idle entitlements cost no wake-ups.
    timer: Option<(SpawnHandle, Instant)>,
    drains: Vec<oneshot::Sender<()>>,
    /// Stopped into a dormant slot rather than out of memory.
    hibernated: bool,
    /// The incarnation this actor deleted last.
    retired: Option<i64>,
    /// State and epoch handed over by a dormant slot, taken in `started`.
    preloaded: Option<(Box<Entitlement>, u64)>,
}

impl Actor for EntitlementActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(0);
        metrics::gauge!("headroom_entitlement_actors").increment(1.0);
        match self.preloaded.take() {
            Some((state, epoch)) => {
                self.state = Some(*state);
                self.epoch = epoch;
                self.claimed = true;
                self.committed_standing = Standing::of(self.state.as_ref());
                self.publish_watched();
                self.schedule(ctx);
            }
            None => self.reload(ctx, Read::Load, None, Vec::new()),
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if !self.hibernated && self.state.is_some() {
            metrics::counter!("headroom_entitlements_passivated_total").increment(1);
        }
        metrics::gauge!("headroom_entitlement_actors").decrement(1.0);
        self.shared
            .registry
            .remove_if(&self.id, |_, slot| slot.is_generation(self.generation));
        for tx in self.drains.drain(..) {
            let _ = tx.send(());
        }
    }
}

impl EntitlementActor {
    /// Starts an actor; with `preloaded` (state and epoch of a dormant
    /// entitlement) it does not read the store.
    pub(crate) fn spawn(
        id: EntitlementId,
        generation: u64,
        shared: Arc<Shared>,
        preloaded: Option<(Box<Entitlement>, u64)>,
    ) -> Addr<Self> {
        EntitlementActor::create(|ctx| {
            ctx.set_mailbox_capacity(0);
            EntitlementActor {
                id,
                generation,
                shared,
                phase: Phase::Ready,
                retry_at: Instant::now(),
                epoch: 0,
                claimed: false,
                state: None,
                pending: Batch::default(),
                inflight: None,
                committed_standing: Standing::default(),
                indexed: false,
                seats_written: None,
                keys: KeyCache::default(),
                last_used: Instant::now(),
                timer: None,
                drains: Vec::new(),
                retired: None,
                preloaded,
                hibernated: false,
            }
        })
    }

    fn idle(&self) -> bool {
        self.inflight.is_none() && self.pending.calls.is_empty() && !self.pending.needs_write()
    }

    /// Reads the state back from the store, blocking the mailbox meanwhile.
    /// `unknown` is a write whose outcome must be settled by what is read;
    /// `replay` are calls decided on state that was never written: they are
    /// decided again on what was read.
    fn reload(
        &mut self,
        ctx: &mut Context<Self>,
        read: Read,
        unknown: Option<Box<Inflight>>,
        replay: Vec<Waiting>,
    ) {
        let store = self.shared.store.clone();
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
        ctx
            .wait(read.into_actor(self).map(
            move |res: Result<Loaded, StoreError>, act, ctx| match res {
                Ok(loaded) => {
                    if let Some(u) = unknown {
                        let written = match (&loaded.state, u.incarnation) {
                            (Some(s), Some(inc)) => {
                                s.incarnation() == inc && s.commits >= u.commits
                            }
                            (None, None) => true,
                            _ => false,
                        };
                        if written {
                            u.count_published();
                        }
                        let e = EngineError::Unavailable("store write failed".into());
                        for w in u.batch.calls {
                            if written { w.answer() } else { w.fail(&e) }
                        }
                    }
                    act.epoch = loaded.epoch;
                    act.claimed = loaded.claimed;
                    act.state = loaded.state;
                    if act.state.as_ref().map(Entitlement::incarnation) != incarnation {
                        act.keys.clear();
                    }
                    act.committed_standing = Standing::of(act.state.as_ref());
                    act.indexed = false;
                    act.seats_written = None;
                    act.publish_watched();
                    act.phase = Phase::Ready;
                    for w in replay {
                        act.decide(w.op, w.reply);
                    }
                    act.flush(ctx);
                    act.schedule(ctx);
                }
                Err(e) => {
                    tracing::warn!(entitlement = %act.id, error = %e, "loading entitlement failed");
                    act.phase = Phase::Broken;
                    act.retry_at = Instant::now() + RELOAD_BACKOFF;
                    act.schedule(ctx);
                    // Calls never sent: 503. A write that was sent and could
                    // not be settled may have landed: 504, retry with the key.
                    if let Some(u) = unknown {
                        let unknown = EngineError::OutcomeUnknown(e.to_string());
                        for w in u.batch.calls {
                            w.fail(&unknown);
                        }
                    }
                    let e = EngineError::from(e);
                    for w in replay {
                        w.fail(&e);
                    }
                    act.notify_drains(ctx);
                }
            },
        ));
    }

    fn decide(&mut self, op: Op, reply: Option<ReplyTx>) {
        let now = self.shared.clock.now();
        let before = self.state.as_ref().map(Entitlement::incarnation);
        let answer = self.apply(&op, now);
        let incarnation = self
            .state
            .as_ref()
            .map(Entitlement::incarnation)
            .or(before)
            .unwrap_or(0);
        self.record(&answer, now);
        let source = &self.shared.settings.source;
        for ev in self.pending.fx.events.drain(..) {
            self.pending.events.push((
                ev.data.kind(),
                ev.to_cloud_event(self.id.as_str(), incarnation, source),
            ));
        }
        self.pending.calls.push(Waiting { op, reply, answer });
    }

    /// Notes what a decision adds to the history, the recent-denials index
    /// and the billing records (from its events and its answer).
    fn record(&mut self, answer: &Result<Reply, EngineError>, now: DateTime<Utc>) {
        let batch = &mut self.pending;
        let mut denied = false;
        for ev in &batch.fx.events {
            match &ev.data {
                EventData::SeatDenied { .. } => {
                    batch.history.seat_denied(now);
                    denied = true;
                }
                EventData::UsageDenied { feature, .. } => {
                    batch.history.usage_denied(now, feature);
                    denied = true;
                }
                EventData::UsagePeriodClosed { .. } => {
                    let mut record = serde_json::to_value(&ev.data).unwrap_or_default();
                    if let Some(map) = record.as_object_mut() {
                        map.insert("closed_at".into(), serde_json::json!(ev.time));
                    }
                    batch.periods.push(record.to_string());
                }
                _ => {}
            }
        }
        if denied {
            batch.denied_at = Some(now.timestamp_millis());
        }
        let mut added = |r: &UsageReply| {
            if !r.replayed && r.decision.outcome != Outcome::Denied {
                batch
                    .history
                    .usage_added(now, &r.decision.feature, r.decision.amount);
            }
        };
        match answer {
            Ok(Reply::Usage(r)) => added(r),
            Ok(Reply::Batch(rs)) => rs.iter().flatten().for_each(added),
            _ => {}
        }
        if let Some(e) = &self.state
            && (!batch.fx.seats.is_empty() || e.seats.in_use() > 0)
            && batch.fx.changed
        {
            batch.history.seats(now, e.seats.in_use());
        }
    }

    /// The records a batch's write carries.
    fn records(&self, batch: &mut Batch, standing: Standing) -> Records {
        let settings = &self.shared.settings;
        let ms = |d: std::time::Duration| d.as_millis().min(i64::MAX as u128) as i64;
        let (writes, seats_written) = std::mem::take(&mut batch.history).plan(self.seats_written);
        batch.seats_written = seats_written;
        let history = writes
            .into_iter()
            .map(|w| HistoryWrite {
                hour_expire_at: w.hour + BucketSize::Hour.step_ms() + ms(settings.hourly_retention),
                day_expire_at: BucketSize::Day.start(w.hour)
                    + BucketSize::Day.step_ms()
                    + ms(settings.daily_retention),
                hour: w.hour,
                hour_ops: w.hour_ops,
                day_ops: w.day_ops,
            })
            .collect();
        Records {
            // Added when it enters overdraft, and once after each load (which
            // heals an index written before it existed); removed when it leaves.
            in_overdraft: if standing.in_overdraft {
                (!self.committed_standing.in_overdraft || !self.indexed).then_some(true)
            } else if self.committed_standing.in_overdraft || self.state.is_none() {
                Some(false)
            } else {
                None
            },
            denied_at: batch.denied_at.take(),
            history,
            // The clock is read only for a write that closes a period.
            periods_expire_at: if batch.periods.is_empty() {
                0
            } else {
                let now = self.shared.clock.now().timestamp_millis();
                now.saturating_add(ms(settings.daily_retention))
            },
            periods: std::mem::take(&mut batch.periods),
        }
    }

    fn put(
        &mut self,
        config: &EntitlementConfig,
        now: DateTime<Utc>,
    ) -> Result<Reply, EngineError> {
        let fx = &mut self.pending.fx;
        match &mut self.state {
            Some(e) => {
                e.replace_config(config.clone(), now, fx);
                Ok(Reply::Put {
                    created: false,
                    view: Box::new(e.view()),
                })
            }
            None => {
                // A new incarnation must differ from the one this actor just
                // deleted, even within the same millisecond: idempotency keys
                // and event ids are scoped by it.
                let at = match self.retired {
                    Some(old) if now.timestamp_millis() <= old => {
                        DateTime::from_timestamp_millis(old + 1).unwrap_or(now)
                    }
                    _ => now,
                };
                let e = Entitlement::create(self.id.clone(), config.clone(), at, fx);
                let view = Box::new(e.view());
                self.state = Some(e);
                Ok(Reply::Put {
                    created: true,
                    view,
                })
            }
        }
    }

    fn apply(&mut self, op: &Op, now: DateTime<Utc>) -> Result<Reply, EngineError> {
        let fx = &mut self.pending.fx;
        let not_found = || EngineError::NotFound(self.id.clone());
        match op {
            Op::Put(config) => {
                self.pending.config_changed = true;
                self.put(config, now)
            }
            Op::Delete => {
                let e = self.state.as_mut().ok_or_else(not_found)?;
                e.delete(now, fx);
                self.retired = Some(e.incarnation());
                self.state = None;
                fx.seats.clear();
                self.pending.reset = true;
                self.keys.clear();
                Ok(Reply::Deleted)
            }
            Op::Get => {
                let e = self.state.as_mut().ok_or_else(not_found)?;
                e.housekeeping(now, fx);
                Ok(Reply::View(Box::new(e.view())))
            }
            Op::Seats => {
                let e = self.state.as_mut().ok_or_else(not_found)?;
                e.housekeeping(now, fx);
                Ok(Reply::Seats(e.seat_list()))
            }
            Op::Activate(seat) => {
                let e = self.state.as_mut().ok_or_else(not_found)?;
                Ok(Reply::Seat(e.activate(seat, now, fx)))
            }
            Op::Release(seat) => {
                let e = self.state.as_mut().ok_or_else(not_found)?;
                Ok(Reply::Release(e.release(seat, now, fx)))
            }
            Op::Usage(req) => self.usage(req, now).map(Reply::Usage),
            Op::Batch(reqs) => {
                if self.state.is_none() {
                    return Err(not_found());
                }
                Ok(Reply::Batch(
                    reqs.iter().map(|r| self.usage(r, now)).collect(),
                ))
            }
            Op::Sweep => {
                if let Some(e) = self.state.as_mut() {
                    e.housekeeping(now, fx);
                }
                Ok(Reply::Swept)
            }
        }
    }

    fn usage(&mut self, req: &UsageRequest, now: DateTime<Utc>) -> Result<UsageReply, EngineError> {
        let Some(e) = self.state.as_mut() else {
            return Err(EngineError::NotFound(self.id.clone()));
        };
        let window = chrono::Duration::from_std(self.shared.settings.idempotency_window)
            .unwrap_or(chrono::Duration::MAX);
        let fp = req.idempotency_key.as_ref().map(|_| fingerprint(req));
        if let (Some(key), Some(fp)) = (&req.idempotency_key, &fp)
            && let Some(entry) = self.keys.get(key).filter(|k| now - k.at < window)
        {
            if &entry.fingerprint != fp {
                return Err(EngineError::Conflict(key.clone()));
            }
            return Ok(UsageReply {
                decision: entry.decision.clone(),
                replayed: true,
            });
        }
        let decision = e
            .consume(&req.feature, req.amount, now, &mut self.pending.fx)
            .map_err(|u| EngineError::UnknownFeature(u.0))?;
        if let (Some(key), Some(fingerprint)) = (&req.idempotency_key, fp) {
            let entry = KeyEntry {
                fingerprint,
                decision: decision.clone(),
                at: now,
            };
            let record = serde_json::to_string(&entry).unwrap_or_default();
            self.pending.keys.push(KeyRecord {
                incarnation: e.incarnation(),
                key: key.clone(),
                record,
            });
            self.keys
                .insert(key.clone(), entry, self.shared.settings.cached_keys);
        }
        Ok(UsageReply {
            decision,
            replayed: false,
        })
    }

    /// Starts the next write when none is in flight.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.inflight.is_some() || (self.pending.calls.is_empty() && !self.pending.needs_write())
        {
            return;
        }
        let mut batch = std::mem::take(&mut self.pending);
        if !batch.needs_write() {
            for w in batch.calls.drain(..) {
                w.answer();
            }
            self.notify_drains(ctx);
            return;
        }
        let write = match self.state.as_mut() {
            None => Write::Delete,
            Some(e) => {
                e.commits += 1;
                Write::Put {
                    replace: batch.reset,
                    core: serde_json::to_string(&*e).unwrap_or_default(),
                    config: (batch.config_changed || batch.reset)
                        .then(|| serde_json::to_string(&e.config).unwrap_or_default()),
                    seats: batch.fx.seats.drain().collect(),
                }
            }
        };
        let standing = Standing::of(self.state.as_ref());
        let records = self.records(&mut batch, standing);
        let commit = Commit {
            id: self.id.clone(),
            epoch: self.epoch,
            claim: !self.claimed,
            write,
            events: std::mem::take(&mut batch.events),
            idempotency: std::mem::take(&mut batch.keys),
            overdraft: standing.since(self.committed_standing),
            records,
        };
        let inflight = Inflight {
            indexed: commit.records.in_overdraft.is_some(),
            standing,
            event_kinds: commit.events.iter().map(|(k, _)| *k).collect(),
            incarnation: self.state.as_ref().map(Entitlement::incarnation),
            commits: self.state.as_ref().map_or(0, |e| e.commits),
            keys: commit.idempotency.iter().map(|r| r.key.clone()).collect(),
            batch,
        };
        let store = self.shared.store.clone();
        self.inflight = Some(Box::new(inflight));
        ctx.spawn(
            async move { store.commit(commit).await }
                .into_actor(self)
                .map(|res, act, ctx| act.committed(res, ctx)),
        );
    }

    fn committed(&mut self, res: Result<CommitOutcome, StoreError>, ctx: &mut Context<Self>) {
        let Some(inflight) = self.inflight.take() else {
            return;
        };
        let epoch = match res {
            Ok(CommitOutcome::Applied { epoch }) => epoch,
            Ok(CommitOutcome::Fenced) => return self.not_written(inflight, None, ctx),
            Ok(CommitOutcome::KeysExist(found)) => {
                return self.not_written(inflight, Some(found), ctx);
            }
            Err(e) => return self.write_failed(e, inflight, ctx),
        };
        self.epoch = epoch;
        self.claimed = true;
        inflight.count_published();
        self.committed_standing = inflight.standing;
        self.indexed |= inflight.indexed;
        self.seats_written = inflight.batch.seats_written;
        self.publish_watched();
        for w in inflight.batch.calls {
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
    fn take_unwritten(&mut self, inflight: &Inflight) -> Vec<Waiting> {
        // The write may or may not have landed: what this actor knew of
        // the stored history and index no longer holds.
        self.seats_written = None;
        self.indexed = false;
        let pending = std::mem::take(&mut self.pending);
        self.keys.forget(
            inflight
                .keys
                .iter()
                .chain(pending.keys.iter().map(|r| &r.key)),
        );
        pending.calls
    }

    /// The store refused the write as a whole, because another owner took
    /// the entitlement (`found` is `None`) or some idempotency keys were
    /// already used: read again, and decide every call again on what was
    /// read.
    fn not_written(
        &mut self,
        inflight: Box<Inflight>,
        found: Option<Vec<(IdempotencyKey, String)>>,
        ctx: &mut Context<Self>,
    ) {
        let pending = self.take_unwritten(&inflight);
        let replay = inflight.batch.calls.into_iter().chain(pending).collect();
        let Some(found) = found else {
            tracing::warn!(entitlement = %self.id, "another owner took this entitlement; reloading");
            return self.reload(ctx, Read::Load, None, replay);
        };
        self.reload(ctx, Read::Load, None, replay);
        // These records are what the replayed calls must find. The store
        // still holds them, so they are still remembered whatever this
        // clock says of their age (else the replay would decide afresh and
        // meet the same keys again).
        let limit = self.shared.settings.cached_keys;
        let now = self.shared.clock.now();
        for (key, record) in found {
            if let Ok(mut entry) = serde_json::from_str::<KeyEntry>(&record) {
                entry.at = entry.at.max(now);
                self.keys.insert(key, entry, limit);
            }
        }
    }

    /// The write failed: refused before it ran (its calls answer 503), or
    /// with an unknown outcome (the read-back tells). Either way the state
    /// is read back on the short budget.
    fn write_failed(&mut self, e: StoreError, inflight: Box<Inflight>, ctx: &mut Context<Self>) {
        tracing::warn!(entitlement = %self.id, error = %e, "write failed; reloading");
        let pending = self.take_unwritten(&inflight);
        if let StoreError::Refused(_) = e {
            let e = EngineError::from(e);
            for w in inflight.batch.calls {
                w.fail(&e);
            }
            self.reload(ctx, Read::Settle, None, pending);
        } else {
            self.reload(ctx, Read::Settle, Some(inflight), pending);
        }
    }

    fn publish_watched(&self) {
        if let Some(e) = self.state.as_ref()
            && self.shared.settings.watched.contains(&self.id)
        {
            publish_watched(e);
        }
    }

    fn notify_drains(&mut self, ctx: &mut Context<Self>) {
        if !self.drains.is_empty() && self.idle() {
            ctx.stop();
        }
    }

    fn idle_limit(&self) -> std::time::Duration {
        if self.state.is_some() {
            self.shared.settings.idle_timeout
        } else {
            // Unknown ids leave memory soon: probing costs nothing to keep.
            self.shared
                .settings
                .idle_timeout
                .min(std::time::Duration::from_secs(5))
        }
    }

    /// Sets the timer for whichever comes first: housekeeping falling due
    /// (checked again at least every `sweep_interval`) or the idle deadline.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut at = self.last_used + self.idle_limit();
        if self.state.is_some() {
            at = at.min(self.last_used + self.shared.settings.hibernate_after);
        }
        if let Some(next) = self.state.as_ref().and_then(Entitlement::next_housekeeping) {
            let due = (next - self.shared.clock.now())
                .to_std()
                .unwrap_or_default();
            at = at.min(now + due.min(self.shared.settings.sweep_interval));
        }
        match self.timer {
            Some((_, pending)) if pending <= at => {}
            _ => {
                if let Some((handle, _)) = self.timer.take() {
                    ctx.cancel_future(handle);
                }
                let handle = ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                    act.timer = None;
                    act.tick(ctx);
                });
                self.timer = Some((handle, at));
            }
        }
    }

    /// Hands the committed state to the registry as a dormant slot and
    /// stops. A call already in the mailbox is dropped with the actor and
    /// retried by the engine, which wakes the dormant slot.
    fn hibernate(&mut self, ctx: &mut Context<Self>) {
        let Some(state) = self.state.take() else {
            return;
        };
        let due = state.next_housekeeping();
        if let Some(mut slot) = self.shared.registry.get_mut(&self.id)
            && slot.is_generation(self.generation)
        {
            *slot = Slot::Dormant(Dormant {
                state: Some(Box::new(state)),
                epoch: self.epoch,
                since: self.last_used,
                due,
            });
            self.hibernated = true;
            metrics::counter!("headroom_entitlements_hibernated_total").increment(1);
        }
        ctx.stop();
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = self.shared.clock.now();
        if self.phase == Phase::Ready
            && self
                .state
                .as_ref()
                .and_then(Entitlement::next_housekeeping)
                .is_some_and(|t| t <= now)
        {
            self.decide(Op::Sweep, None);
            self.flush(ctx);
        }
        let idle_for = self.last_used.elapsed();
        if self.idle() && idle_for >= self.idle_limit() {
            ctx.stop();
        } else if self.idle()
            && self.phase == Phase::Ready
            && self.drains.is_empty()
            && idle_for >= self.shared.settings.hibernate_after
            && self.state.is_some()
        {
            self.hibernate(ctx);
        } else {
            self.schedule(ctx);
        }
    }
}

impl Handler<Call> for EntitlementActor {
    type Result = ();

    fn handle(&mut self, call: Call, ctx: &mut Context<Self>) {
        self.last_used = Instant::now();
        MAILBOX_WAIT.with(|h| h.record(self.last_used.duration_since(call.sent).as_secs_f64()));
        if self.phase == Phase::Broken && Instant::now() < self.retry_at {
            let _ = call.reply.send(Err(EngineError::Unavailable(
                "the store could not be read just now".into(),
            )));
            return;
        }
        if self.phase == Phase::Broken {
            let w = Waiting {
                op: call.op,
                reply: Some(call.reply),
                answer: Err(EngineError::ShuttingDown),
            };
            // The last write or read failed: read back on the short
            // budget, fencing whatever write may still be on its way.
            self.reload(ctx, Read::Settle, None, vec![w]);
            return;
        }
        self.decide(call.op, Some(call.reply));
        self.flush(ctx);
    }
}

impl Handler<Drain> for EntitlementActor {
    type Result = ();

    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) {
        self.drains.push(msg.0);
        self.notify_drains(ctx);
    }
}
