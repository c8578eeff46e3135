//! The entitlement actor: decides calls on its in-memory state, group-commits
//! their effects ([`commit`]), and answers each call once its effects are
//! durable. Its requests and their answer types are in [`requests`], the
//! idempotency cache in [`idempotency`], and what a write carries besides
//! the state in [`evidence`].
//!
//! Lifecycle: started on first use (reading the store, or woken from a
//! dormant slot), it hibernates into a dormant slot after `hibernate_after`
//! without calls and leaves memory after the idle timeout. It keeps one
//! timer: the next lease expiry or period end, or the idle deadline.

mod commit;
mod evidence;
mod idempotency;
mod requests;

pub(crate) use requests::{
    Activate, Call, Configure, Consume, ConsumeBatch, Delete, Drain, Get, Held, ListSeats, Release,
    Request, SetCustomerCaps, Sweep,
};

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};

use self::commit::{InFlightWrite, NewKey, PendingWrite, Read};
use self::evidence::Standing;
use self::idempotency::{KeyCache, KeyEntry, fingerprint};
use self::requests::{Decided, Deferred, Reply, reply, undecided};
use super::registry::{Dormant, EngineCore, Resident};
use super::{Configured, EngineError, UsageReply, UsageRequest};
use crate::domain::{Effects, Entitlement, EntitlementConfig, EntitlementId, SeatsWritten};
use crate::telemetry;

/// How long a broken entitlement answers 503 at once before it tries to
/// read the store again: calls during an outage answer promptly, and Redis
/// is not stormed with reads when it comes back.
const RELOAD_BACKOFF: Duration = Duration::from_millis(100);

enum Phase {
    Ready,
    /// The last write failed and Redis could not be read back: the state is
    /// unknown. Until `retry_at` calls answer `cause` at once; the first
    /// call after it reads the store again.
    Broken {
        retry_at: Instant,
        cause: EngineError,
    },
    /// What is stored cannot be read: every call answers this error until
    /// the actor leaves memory.
    Corrupt(EngineError),
}

pub(crate) struct EntitlementActor {
    id: EntitlementId,
    generation: u64,
    core: Arc<EngineCore>,
    phase: Phase,
    epoch: u64,
    claimed: bool,
    state: Option<Entitlement>,
    pending: PendingWrite,
    inflight: Option<Box<InFlightWrite>>,
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
    drains: Vec<Reply<()>>,
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
        self.core.forget(&self.id, self.generation);
        for drained in self.drains.drain(..) {
            drained.send(Ok(()));
        }
    }
}

impl EntitlementActor {
    /// Starts an actor; with `preloaded` (state and epoch of a dormant
    /// entitlement) it does not read the store.
    pub(crate) fn spawn(
        id: EntitlementId,
        generation: u64,
        core: Arc<EngineCore>,
        preloaded: Option<(Box<Entitlement>, u64)>,
    ) -> Addr<Self> {
        EntitlementActor::create(|ctx| {
            ctx.set_mailbox_capacity(0);
            EntitlementActor {
                id,
                generation,
                core,
                phase: Phase::Ready,
                epoch: 0,
                claimed: false,
                state: None,
                pending: PendingWrite::default(),
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

    /// The state (if the entitlement exists) and the effects of the
    /// pending write, for a request to change.
    fn state_and_effects(&mut self) -> Result<(&mut Entitlement, &mut Effects), EngineError> {
        match self.state.as_mut() {
            Some(e) => Ok((e, &mut self.pending.fx)),
            None => Err(EngineError::NotFound(self.id.clone())),
        }
    }

    /// Decides a call on the in-memory state; it waits in the pending
    /// write for its answer.
    fn decide<R: Request>(&mut self, request: R, reply: Reply<R::Answer>) {
        let now = self.core.clock.now();
        let before = self.state.as_ref().map(Entitlement::incarnation);
        let answer = request.apply(self, now);
        let incarnation = self
            .state
            .as_ref()
            .map(Entitlement::incarnation)
            .or(before)
            .unwrap_or(0);
        match &answer {
            Ok(a) => self.note_evidence(R::usage(a), now),
            Err(_) => self.note_evidence(std::iter::empty(), now),
        }
        let events = std::mem::take(&mut self.pending.fx.events);
        self.pending
            .events
            .extend(events.into_iter().map(|ev| (ev, incarnation)));
        self.pending.calls.push(R::wait(Decided {
            request,
            reply,
            answer,
        }));
    }

    fn usage(&mut self, req: &UsageRequest, now: DateTime<Utc>) -> Result<UsageReply, EngineError> {
        let Some(e) = self.state.as_mut() else {
            return Err(EngineError::NotFound(self.id.clone()));
        };
        let window = chrono::Duration::from_std(self.core.settings.idempotency_window)
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
            self.pending.keys.push(NewKey {
                incarnation: e.incarnation(),
                key: key.clone(),
                entry: entry.clone(),
            });
            self.keys
                .insert(key.clone(), entry, self.core.settings.cached_keys);
        }
        Ok(UsageReply {
            decision,
            replayed: false,
        })
    }

    fn configure(&mut self, config: &EntitlementConfig, now: DateTime<Utc>) -> Configured {
        self.pending.config_changed = true;
        let fx = &mut self.pending.fx;
        match &mut self.state {
            Some(e) => {
                e.replace_config(config.clone(), now, fx);
                Configured {
                    created: false,
                    view: e.view(),
                }
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
                let view = e.view();
                self.state = Some(e);
                Configured {
                    created: true,
                    view,
                }
            }
        }
    }

    fn delete(&mut self, now: DateTime<Utc>) -> Result<(), EngineError> {
        let (e, fx) = self.state_and_effects()?;
        e.delete(now, fx);
        let retired = e.incarnation();
        fx.seats.clear();
        self.retired = Some(retired);
        self.state = None;
        self.pending.reset = true;
        self.keys.clear();
        Ok(())
    }

    fn publish_watched(&self) {
        if let Some(e) = self.state.as_ref()
            && self.core.settings.watched.contains(&self.id)
        {
            telemetry::engine::watched(e);
        }
    }

    fn notify_drains(&mut self, ctx: &mut Context<Self>) {
        if !self.drains.is_empty() && self.idle() {
            ctx.stop();
        }
    }

    fn idle_limit(&self) -> Duration {
        if self.state.is_some() {
            self.core.settings.idle_timeout
        } else {
            // Unknown ids leave memory soon: probing costs nothing to keep.
            self.core.settings.idle_timeout.min(Duration::from_secs(5))
        }
    }

    /// Sets the timer for whichever comes first: housekeeping falling due
    /// (checked again at least every `sweep_interval`) or the idle deadline.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut at = self.last_used + self.idle_limit();
        if self.state.is_some() {
            at = at.min(self.last_used + self.core.settings.hibernate_after);
        }
        if let Some(next) = self.state.as_ref().and_then(Entitlement::next_housekeeping) {
            let due = (next - self.core.clock.now()).to_std().unwrap_or_default();
            at = at.min(now + due.min(self.core.settings.sweep_interval));
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
        if let Some(mut resident) = self.core.registry.get_mut(&self.id)
            && resident.is_generation(self.generation)
        {
            *resident = Resident::Dormant(Dormant {
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
        let now = self.core.clock.now();
        let ready = matches!(self.phase, Phase::Ready);
        if ready
            && self
                .state
                .as_ref()
                .and_then(Entitlement::next_housekeeping)
                .is_some_and(|t| t <= now)
        {
            let (nobody, _) = reply();
            self.decide(Sweep, nobody);
            self.flush(ctx);
        }
        let idle_for = self.last_used.elapsed();
        if self.idle() && idle_for >= self.idle_limit() {
            ctx.stop();
        } else if self.idle()
            && ready
            && self.drains.is_empty()
            && idle_for >= self.core.settings.hibernate_after
            && self.state.is_some()
        {
            self.hibernate(ctx);
        } else {
            self.schedule(ctx);
        }
    }
}

impl<R: Request> Handler<Call<R>> for EntitlementActor {
    type Result = Deferred<R::Answer>;

    fn handle(&mut self, call: Call<R>, ctx: &mut Context<Self>) -> Deferred<R::Answer> {
        self.last_used = Instant::now();
        telemetry::engine::mailbox_wait(self.last_used.duration_since(call.sent));
        let (reply, deferred) = reply();
        let refused = match &self.phase {
            Phase::Ready => None,
            Phase::Corrupt(e) => Some(e.clone()),
            Phase::Broken { retry_at, cause } if self.last_used < *retry_at => Some(cause.clone()),
            Phase::Broken { .. } => {
                // The last write or read failed: read back on the short
                // budget, fencing whatever write may still be on its way,
                // then decide this call.
                self.reload(
                    ctx,
                    Read::Settle,
                    None,
                    vec![undecided(call.request, reply)],
                );
                return deferred;
            }
        };
        match refused {
            Some(e) => reply.send(Err(e)),
            None => {
                self.decide(call.request, reply);
                self.flush(ctx);
            }
        }
        deferred
    }
}

impl Handler<Drain> for EntitlementActor {
    type Result = Deferred<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Deferred<()> {
        let (reply, deferred) = reply();
        self.drains.push(reply);
        self.notify_drains(ctx);
        deferred
    }
}
