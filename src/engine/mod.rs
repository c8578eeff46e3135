//! The engine: one actix actor per entitlement, found through a `dashmap`
//! registry, loaded from the store on first use and passivated when idle.
//!
//! Every mutation goes through the entitlement's actor, which applies the
//! domain rules to its in-memory state without locks, then group-commits: the
//! first call is written at once, calls that arrive while that write is in
//! flight share the next write. A call is answered only after its write
//! succeeded. The HTTP layer sees only [`Engine`]; actix stays in here.

mod actor;
mod clock;

pub use clock::{Clock, ManualClock, SystemClock};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use actix::Addr;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::future::join_all;
use tokio::sync::oneshot;

use crate::domain::{
    Amount, Entitlement, EntitlementConfig, EntitlementId, EntitlementView, FeatureKey,
    IdempotencyKey, ReleaseResult, SeatDecision, SeatId, SeatView, UsageDecision,
};
use crate::store::{Store, StoreError};
use actor::{Call, EntitlementActor, Op, Reply};

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("entitlement {0} not found")]
    NotFound(EntitlementId),
    #[error("entitlement has no feature {0}")]
    UnknownFeature(FeatureKey),
    #[error("idempotency key {0} was already used with another payload")]
    Conflict(IdempotencyKey),
    /// Nothing was applied; the call may be sent again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The write was sent but neither confirmed nor, with Redis unreachable,
    /// read back: it may have been applied. A retry with the same
    /// idempotency key answers the first decision if it was.
    #[error("store did not confirm the write and could not be read back: {0}")]
    OutcomeUnknown(String),
    #[error("the tracker is shutting down")]
    ShuttingDown,
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Unavailable(e.to_string())
    }
}

#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// An entitlement untouched this long leaves memory (its state is in the store).
    pub idle_timeout: Duration,
    /// An entitlement untouched this long gives up its actor and stays in
    /// memory in a compact form until `idle_timeout`.
    pub hibernate_after: Duration,
    /// Longest wait between a resident entitlement's checks for expired
    /// leases and ended periods; each is also scheduled for when it falls due
    /// by the engine's clock.
    pub sweep_interval: Duration,
    /// Idempotency keys each resident entitlement remembers without asking the store.
    pub cached_keys: usize,
    pub idempotency_window: Duration,
    /// CloudEvents `source`.
    pub source: String,
    /// Entitlements that get series of their own in `/metrics` (a short,
    /// configured list: labels stay bounded).
    pub watched: Arc<std::collections::HashSet<EntitlementId>>,
    /// How long hourly history buckets are kept after their hour.
    pub hourly_retention: Duration,
    /// How long daily history buckets (and closed-period records) are kept.
    pub daily_retention: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            idle_timeout: Duration::from_secs(300),
            hibernate_after: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(60),
            cached_keys: 1024,
            idempotency_window: Duration::from_secs(24 * 3600),
            source: "headroom".into(),
            watched: Arc::default(),
            hourly_retention: Duration::from_secs(35 * 24 * 3600),
            daily_retention: Duration::from_secs(400 * 24 * 3600),
        }
    }
}

/// One usage call.
#[derive(Clone, Debug)]
pub struct UsageRequest {
    pub feature: FeatureKey,
    pub amount: Amount,
    pub idempotency_key: Option<IdempotencyKey>,
}

/// A usage call's decision, and whether it repeats an earlier call's answer.
#[derive(Clone, Debug)]
pub struct UsageReply {
    pub decision: UsageDecision,
    pub replayed: bool,
}

/// What the registry holds for a resident entitlement.
pub(crate) enum Slot {
    /// An actor serves it.
    Live {
        generation: u64,
        addr: Addr<EntitlementActor>,
    },
    /// Idle: its committed state without an actor, a fraction of the memory;
    /// the next call starts an actor from it without reading the store.
    Dormant(Dormant),
}

pub(crate) struct Dormant {
    /// Taken when the entitlement wakes up.
    pub(crate) state: Option<Box<Entitlement>>,
    pub(crate) epoch: u64,
    /// Last call, for the idle timeout.
    pub(crate) since: std::time::Instant,
    /// When housekeeping (a lease expiry, a period end) falls due.
    pub(crate) due: Option<chrono::DateTime<chrono::Utc>>,
}

impl Slot {
    fn is_generation(&self, g: u64) -> bool {
        matches!(self, Slot::Live { generation, .. } if *generation == g)
    }
}

pub(crate) struct Shared {
    registry: DashMap<EntitlementId, Slot>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
    generation: AtomicU64,
    stopping: AtomicBool,
    /// The dormant-entitlement sweeper: started with the first call, told to
    /// stop and awaited by `shutdown`.
    sweeper: std::sync::Mutex<Option<(Arc<tokio::sync::Notify>, oneshot::Receiver<()>)>>,
}

/// The handle the HTTP layer holds: cheap to clone, safe to share.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

const SEND_ATTEMPTS: usize = 4;

impl Engine {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, settings: EngineSettings) -> Self {
        Engine {
            shared: Arc::new(Shared {
                registry: DashMap::new(),
                store,
                clock,
                settings,
                generation: AtomicU64::new(1),
                stopping: AtomicBool::new(false),
                sweeper: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.shared.settings
    }

    /// The engine's clock (injected in tests).
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.shared.clock.now()
    }

    /// Entitlements now in memory.
    pub fn resident(&self) -> usize {
        self.shared.registry.len()
    }

    fn addr(&self, id: &EntitlementId) -> (u64, Addr<EntitlementActor>) {
        if let Some(slot) = self.shared.registry.get(id)
            && let Slot::Live { generation, addr } = &*slot
        {
            return (*generation, addr.clone());
        }
        self.start_sweeper();
        let spawn = |preloaded| {
            let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed);
            let addr =
                EntitlementActor::spawn(id.clone(), generation, self.shared.clone(), preloaded);
            (generation, addr)
        };
        match self.shared.registry.entry(id.clone()) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Slot::Live { generation, addr } => (*generation, addr.clone()),
                Slot::Dormant(d) => {
                    let preloaded = d.state.take().map(|s| (s, d.epoch));
                    let (generation, addr) = spawn(preloaded);
                    *o.get_mut() = Slot::Live {
                        generation,
                        addr: addr.clone(),
                    };
                    (generation, addr)
                }
            },
            Entry::Vacant(v) => {
                let (generation, addr) = spawn(None);
                v.insert(Slot::Live {
                    generation,
                    addr: addr.clone(),
                });
                (generation, addr)
            }
        }
    }

    /// Entitlements in memory: with an actor, and dormant.
    pub fn counts(&self) -> (usize, usize) {
        let live = self
            .shared
            .registry
            .iter()
            .filter(|s| matches!(**s, Slot::Live { .. }))
            .count();
        (live, self.shared.registry.len() - live)
    }

    /// Starts, once, the task that drops dormant entitlements after the idle
    /// timeout and wakes those whose housekeeping falls due.
    fn start_sweeper(&self) {
        let mut sweeper = self
            .shared
            .sweeper
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if sweeper.is_some() || self.shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let (done, done_rx) = oneshot::channel();
        let engine = Arc::downgrade(&self.shared);
        let every = self
            .shared
            .settings
            .sweep_interval
            .min(Duration::from_secs(1));
        let stop_rx = stop.clone();
        actix_rt::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop_rx.notified() => break,
                }
                let Some(shared) = engine.upgrade() else {
                    break;
                };
                Engine { shared }.sweep_dormant();
            }
            let _ = done.send(());
        });
        *sweeper = Some((stop, done_rx));
    }

    fn sweep_dormant(&self) {
        let idle = self.shared.settings.idle_timeout;
        let now = self.shared.clock.now();
        let mut due = Vec::new();
        self.shared.registry.retain(|id, slot| match slot {
            Slot::Dormant(d) if d.since.elapsed() >= idle => {
                metrics::counter!("headroom_entitlements_passivated_total").increment(1);
                false
            }
            Slot::Dormant(d) => {
                if d.due.is_some_and(|t| t <= now) {
                    due.push(id.clone());
                }
                true
            }
            Slot::Live { .. } => true,
        });
        // The table does not shrink by itself: after traffic moves on, give
        // the memory of a mostly empty registry back.
        if self.shared.registry.capacity() > 4 * self.shared.registry.len().max(1024) {
            self.shared.registry.shrink_to_fit();
        }
        for id in due {
            let (_, addr) = self.addr(&id);
            let (reply, _) = oneshot::channel();
            let _ = addr.try_send(Call {
                op: Op::Sweep,
                reply,
                sent: std::time::Instant::now(),
            });
        }
    }

    /// Sends `op` to the entitlement's actor and waits for its answer. An
    /// actor that stopped (passivated) before it took the call never applied
    /// it, so the call goes to a fresh actor.
    async fn call(&self, id: &EntitlementId, op: Op) -> Result<Reply, EngineError> {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        for _ in 0..SEND_ATTEMPTS {
            let (generation, addr) = self.addr(id);
            let (tx, rx) = oneshot::channel();
            let sent = addr.try_send(Call {
                op: op.clone(),
                reply: tx,
                sent: std::time::Instant::now(),
            });
            if sent.is_ok()
                && let Ok(reply) = rx.await
            {
                return reply;
            }
            self.shared
                .registry
                .remove_if(id, |_, slot| slot.is_generation(generation));
        }
        Err(EngineError::Unavailable(
            "entitlement actor did not answer".into(),
        ))
    }

    pub async fn activate(
        &self,
        id: &EntitlementId,
        seat: SeatId,
    ) -> Result<SeatDecision, EngineError> {
        match self.call(id, Op::Activate(seat)).await? {
            Reply::Seat(d) => Ok(d),
            other => Err(other.unexpected()),
        }
    }

    pub async fn release(
        &self,
        id: &EntitlementId,
        seat: SeatId,
    ) -> Result<ReleaseResult, EngineError> {
        match self.call(id, Op::Release(seat)).await? {
            Reply::Release(r) => Ok(r),
            other => Err(other.unexpected()),
        }
    }

    pub async fn consume(
        &self,
        id: &EntitlementId,
        req: UsageRequest,
    ) -> Result<UsageReply, EngineError> {
        match self.call(id, Op::Usage(req)).await? {
            Reply::Usage(r) => Ok(r),
            other => Err(other.unexpected()),
        }
    }

    /// Many usage events, one message per entitlement; results in input order.
    pub async fn consume_batch(
        &self,
        events: Vec<(EntitlementId, UsageRequest)>,
    ) -> Vec<Result<UsageReply, EngineError>> {
        let n = events.len();
        let mut groups: HashMap<EntitlementId, (Vec<usize>, Vec<UsageRequest>)> = HashMap::new();
        for (i, (id, req)) in events.into_iter().enumerate() {
            let g = groups.entry(id).or_default();
            g.0.push(i);
            g.1.push(req);
        }
        let calls = groups.into_iter().map(|(id, (idx, reqs))| async move {
            let res = match self.call(&id, Op::Batch(Arc::new(reqs))).await {
                Ok(Reply::Batch(r)) => Ok(r),
                Ok(other) => Err(other.unexpected()),
                Err(e) => Err(e),
            };
            (idx, res)
        });
        let mut out: Vec<Option<Result<UsageReply, EngineError>>> = vec![None; n];
        for (idx, res) in join_all(calls).await {
            match res {
                Ok(results) => {
                    for (i, r) in idx.into_iter().zip(results) {
                        out[i] = Some(r);
                    }
                }
                Err(e) => {
                    for i in idx {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Unavailable("no result".into()))))
            .collect()
    }

    /// Creates or replaces a configuration; answers whether it was created.
    pub async fn put(
        &self,
        id: &EntitlementId,
        config: EntitlementConfig,
    ) -> Result<(bool, EntitlementView), EngineError> {
        match self.call(id, Op::Put(Box::new(config))).await? {
            Reply::Put { created, view } => Ok((created, *view)),
            other => Err(other.unexpected()),
        }
    }

    pub async fn delete(&self, id: &EntitlementId) -> Result<(), EngineError> {
        match self.call(id, Op::Delete).await? {
            Reply::Deleted => Ok(()),
            other => Err(other.unexpected()),
        }
    }

    pub async fn get(&self, id: &EntitlementId) -> Result<EntitlementView, EngineError> {
        match self.call(id, Op::Get).await? {
            Reply::View(v) => Ok(*v),
            other => Err(other.unexpected()),
        }
    }

    /// The acknowledged (stored) state of each id, read without claiming
    /// it, so the process that owns it keeps writing undisturbed; leases
    /// that ran out and periods that ended while nobody called are applied
    /// to the copy returned. Ids not stored are left out.
    pub async fn stored_views(
        &self,
        ids: &[EntitlementId],
    ) -> Result<Vec<EntitlementView>, EngineError> {
        let now = self.now();
        let stored = self.shared.store.peek_many(ids).await?;
        Ok(stored
            .into_iter()
            .flatten()
            .map(|mut e| {
                e.housekeeping(now, &mut crate::domain::Effects::default());
                e.view()
            })
            .collect())
    }

    pub async fn seats(&self, id: &EntitlementId) -> Result<Vec<SeatView>, EngineError> {
        match self.call(id, Op::Seats).await? {
            Reply::Seats(s) => Ok(s),
            other => Err(other.unexpected()),
        }
    }

    /// Refuses new calls, waits until every resident entitlement has written
    /// what it holds, stops the actors and then the store.
    pub async fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let addrs: Vec<Addr<EntitlementActor>> = self
            .shared
            .registry
            .iter()
            .filter_map(|s| match &*s {
                Slot::Live { addr, .. } => Some(addr.clone()),
                Slot::Dormant(_) => None,
            })
            .collect();
        let stops = addrs.into_iter().map(|a| async move {
            let (tx, rx) = oneshot::channel();
            if a.try_send(actor::Drain(tx)).is_ok() {
                let _ = rx.await;
            }
        });
        join_all(stops).await;
        self.shared.registry.clear();
        let sweeper = self
            .shared
            .sweeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((stop, done)) = sweeper {
            stop.notify_one();
            let _ = done.await;
        }
        self.shared.store.shutdown().await;
    }
}

#[cfg(test)]
mod tests;
