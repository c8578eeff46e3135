//! The engine: one actix actor per entitlement, found through a `dashmap`
//! registry, loaded from the store on first use and passivated when idle.
//!
//! Every mutation goes through the entitlement's actor, which applies the
//! domain rules to its in-memory state without locks, then group-commits
//! (the first level of batching): the first call is written at once, calls
//! that arrive while that write is in flight share the next write. A call
//! is answered only after its write succeeded. The HTTP layer sees only
//! [`Engine`]; actix stays in here.
//!
//! - `registry`: resident entitlements (live or dormant) and the sweeper.
//! - `actor`: the entitlement actor, its typed requests, its commit
//!   cycle, its idempotency cache and the evidence its writes carry.
//! - [`reports`]: the overdraft report, history and closed periods, read
//!   from the store for the HTTP layer.

mod actor;
mod clock;
mod error;
mod registry;
pub mod reports;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::EngineError;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;

use crate::domain::{
    Amount, EntitlementConfig, EntitlementId, EntitlementView, FeatureKey, IdempotencyKey,
    ReleaseResult, SeatDecision, SeatId, SeatView, UsageDecision,
};
use crate::flags::duration;
use crate::store::Store;
use crate::telemetry::MAX_WATCHED;
use actor::{
    Activate, Call, Configure, Consume, ConsumeBatch, Delete, Drain, Get, ListSeats, Release,
    Request, SetCustomerCaps,
};
use registry::EngineCore;

/// The engine's flags; each default is written here once.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineSettings {
    /// An entitlement untouched this long leaves memory (its state is in the store).
    #[arg(long, env = "HEADROOM_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub idle_timeout: Duration,
    /// An entitlement untouched this long gives up its actor and stays in
    /// memory in a compact form (woken without reading Redis).
    #[arg(long, env = "HEADROOM_HIBERNATE_AFTER", default_value = "10s", value_parser = duration)]
    pub hibernate_after: Duration,
    /// Longest wait of a resident entitlement between checks for expired
    /// leases and ended periods (each is also scheduled for when it falls due).
    #[arg(long, env = "HEADROOM_SWEEP_INTERVAL", default_value = "60s", value_parser = duration)]
    pub sweep_interval: Duration,
    /// How long idempotency keys are remembered (at least up to 35 days).
    #[arg(long, env = "HEADROOM_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = duration)]
    pub idempotency_window: Duration,
    /// How long hourly history buckets are kept (Redis expires them).
    #[arg(long, env = "HEADROOM_HOURLY_RETENTION", default_value = "35days", value_parser = duration)]
    pub hourly_retention: Duration,
    /// How long daily history buckets and closed-period records are kept.
    #[arg(long, env = "HEADROOM_DAILY_RETENTION", default_value = "400days", value_parser = duration)]
    pub daily_retention: Duration,
    /// Comma-separated entitlement ids that get series of their own in
    /// `/metrics` (at most 50: labels stay bounded).
    #[arg(
        long = "watch-entitlements",
        env = "HEADROOM_WATCH_ENTITLEMENTS",
        default_value = "",
        hide_default_value = true,
        value_parser = Watched::parse
    )]
    pub watched: Watched,
    /// Idempotency keys each resident entitlement remembers without asking the store.
    #[arg(skip = 1024_usize)]
    pub cached_keys: usize,
    /// CloudEvents `source`.
    #[arg(skip = String::from("headroom"))]
    pub source: String,
    /// Other nodes may own entitlements of this store (set when the node
    /// joins a cluster): a read answered from memory is checked against
    /// the stored owner epoch first.
    #[arg(skip = false)]
    pub among_nodes: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

/// Entitlements that get series of their own in `/metrics`: a short,
/// configured list, so labels stay bounded.
#[derive(Clone, Debug, Default)]
pub struct Watched(Arc<HashSet<EntitlementId>>);

impl Watched {
    /// A comma-separated list of at most [`MAX_WATCHED`] entitlement ids.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ids = crate::flags::list(s);
        if ids.len() > MAX_WATCHED {
            return Err(format!("{} entitlements; at most {MAX_WATCHED}", ids.len()));
        }
        let set = ids
            .iter()
            .map(|id| EntitlementId::parse(id).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Watched(Arc::new(set)))
    }

    pub fn contains(&self, id: &EntitlementId) -> bool {
        self.0.contains(id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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

/// What `PUT` of a configuration did.
#[derive(Clone, Debug)]
pub struct Configured {
    /// The entitlement did not exist before.
    pub created: bool,
    pub view: EntitlementView,
}

/// What must hold before a configuration is replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Precondition {
    #[default]
    None,
    /// The entitlement exists with one of these configuration tags
    /// (`If-Match`), or with any (`If-Match: *`, an empty list).
    Matches(Vec<String>),
    /// The entitlement does not exist (`If-None-Match: *`).
    Absent,
}

impl Precondition {
    /// Whether it holds for the configuration there is now (if any).
    pub fn check(&self, now: Option<&EntitlementConfig>) -> Result<(), EngineError> {
        match (self, now) {
            (Precondition::None, _) => Ok(()),
            (Precondition::Absent, None) => Ok(()),
            (Precondition::Absent, Some(_)) => Err(EngineError::PreconditionFailed(
                "If-None-Match: * but the entitlement exists".into(),
            )),
            (Precondition::Matches(_), None) => Err(EngineError::PreconditionFailed(
                "If-Match but the entitlement does not exist".into(),
            )),
            (Precondition::Matches(tags), Some(c)) => {
                let tag = c.etag();
                if tags.is_empty() || tags.contains(&tag) {
                    Ok(())
                } else {
                    Err(EngineError::PreconditionFailed(format!(
                        "the configuration changed since it was read: its ETag is now {tag}"
                    )))
                }
            }
        }
    }
}

/// The handle the HTTP layer holds: cheap to clone, safe to share.
#[derive(Clone)]
pub struct Engine {
    core: Arc<EngineCore>,
}

/// How often a call goes to a fresh actor when the one it was sent to
/// stopped (passivated) before taking it.
const SEND_ATTEMPTS: usize = 4;

impl Engine {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, settings: EngineSettings) -> Self {
        Engine {
            core: Arc::new(EngineCore::new(store, clock, settings)),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.core.store
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.core.settings
    }

    /// The engine's clock (injected in tests).
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.core.clock.now()
    }

    /// Entitlements now in memory.
    pub fn resident(&self) -> usize {
        self.core.registry.len()
    }

    /// Entitlements in memory: with an actor, and dormant.
    pub fn counts(&self) -> (usize, usize) {
        self.core.counts()
    }

    /// Sends `request` to the entitlement's actor and waits for its answer.
    /// An actor that stopped (passivated) before it took the call never
    /// applied it, so the call goes to a fresh actor.
    async fn call<R: Request + Clone>(
        &self,
        id: &EntitlementId,
        request: R,
    ) -> Result<R::Answer, EngineError> {
        if self.core.stopping.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        for _ in 0..SEND_ATTEMPTS {
            let actor = self.core.actor(id);
            if let Ok(answer) = actor.addr.send(Call::new(request.clone())).await {
                return answer;
            }
            self.core.forget(id, actor.generation);
        }
        Err(EngineError::ActorUnavailable)
    }

    pub async fn activate(
        &self,
        id: &EntitlementId,
        seat: SeatId,
    ) -> Result<SeatDecision, EngineError> {
        self.call(id, Activate(seat)).await
    }

    pub async fn release(
        &self,
        id: &EntitlementId,
        seat: SeatId,
    ) -> Result<ReleaseResult, EngineError> {
        self.call(id, Release(seat)).await
    }

    pub async fn consume(
        &self,
        id: &EntitlementId,
        req: UsageRequest,
    ) -> Result<UsageReply, EngineError> {
        self.call(id, Consume(req)).await
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
            let res = self.call(&id, ConsumeBatch(Arc::new(reqs))).await;
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
        // Every index belongs to one group, which answers each of its events.
        out.into_iter()
            .map(|r| r.unwrap_or(Err(EngineError::ActorUnavailable)))
            .collect()
    }

    /// Creates or replaces a configuration.
    pub async fn put(
        &self,
        id: &EntitlementId,
        config: EntitlementConfig,
    ) -> Result<Configured, EngineError> {
        self.put_if(id, config, Precondition::None).await
    }

    /// As [`Engine::put`], if `condition` holds for the configuration the
    /// actor holds when it applies it (`If-Match` / `If-None-Match`).
    pub async fn put_if(
        &self,
        id: &EntitlementId,
        config: EntitlementConfig,
        condition: Precondition,
    ) -> Result<Configured, EngineError> {
        self.call(id, Configure(Box::new(config), condition))
            .await
            .map(|c| *c)
    }

    /// Sets or removes the customer's own ceilings (from their page), on
    /// the configuration as it is when the actor applies them.
    pub async fn set_customer_caps(
        &self,
        id: &EntitlementId,
        caps: crate::domain::CustomerCaps,
    ) -> Result<Configured, EngineError> {
        self.call(id, SetCustomerCaps(Box::new(caps)))
            .await
            .map(|c| *c)
    }

    pub async fn delete(&self, id: &EntitlementId) -> Result<(), EngineError> {
        self.call(id, Delete).await
    }

    pub async fn get(&self, id: &EntitlementId) -> Result<EntitlementView, EngineError> {
        self.read(id, Get, |e| Box::new(e.view())).await.map(|v| *v)
    }

    pub async fn seats(&self, id: &EntitlementId) -> Result<Vec<SeatView>, EngineError> {
        self.read(id, ListSeats, |e| e.seat_list()).await
    }

    /// A read, as exact as a write. The actor answers from memory with the
    /// owner epoch it holds. Alone, that is the answer. Among nodes,
    /// another node may have taken the entitlement since (views of the
    /// members disagree for a moment when one joins or leaves): every write
    /// another node had acknowledged before this read began came after its
    /// claim, which raised the stored epoch. So an unchanged stored epoch
    /// means memory holds every acknowledged write; a changed one means the
    /// stored state is read (without claiming it) and answered instead.
    async fn read<R, T>(
        &self,
        id: &EntitlementId,
        request: R,
        answer: impl FnOnce(&crate::domain::Entitlement) -> T,
    ) -> Result<T, EngineError>
    where
        R: Request<Answer = actor::Held<T>> + Clone,
    {
        let held = self.call(id, request).await?;
        if !self.core.settings.among_nodes
            || !matches!(held.result, Ok(_) | Err(EngineError::NotFound(_)))
        {
            return held.result;
        }
        if self.core.store.epoch(id).await? == held.epoch {
            return held.result;
        }
        metrics::counter!("headroom_stale_reads_total").increment(1);
        let peeked = self
            .core
            .store
            .peek_many(std::slice::from_ref(id))
            .await?
            .pop()
            .unwrap_or(Ok(None))?;
        match peeked {
            Some(mut e) => {
                e.housekeeping(self.now(), &mut crate::domain::Effects::default());
                Ok(answer(&e))
            }
            None => Err(EngineError::NotFound(id.clone())),
        }
    }

    /// Lets go of the resident entitlements `keep` says no to (they moved
    /// to another node): a live one writes what it holds and stops, a
    /// dormant one is dropped. A call that meets one of them later starts
    /// it again from the store. Answers how many were let go.
    pub fn hand_over(&self, keep: impl Fn(&EntitlementId) -> bool) -> usize {
        let mut drained = Vec::new();
        let mut count = 0;
        self.core.registry.retain(|id, resident| {
            if keep(id) {
                return true;
            }
            count += 1;
            match resident {
                registry::Resident::Live { addr, .. } => {
                    drained.push(addr.clone());
                    true
                }
                registry::Resident::Dormant(_) => false,
            }
        });
        for addr in drained {
            addr.do_send(Drain);
        }
        metrics::counter!("headroom_entitlements_handed_over_total").increment(count as u64);
        count
    }

    /// Called (from an actor) each time a write is fenced: another node
    /// took an entitlement this one thought it owned, so this node's view
    /// of the members is probably behind.
    pub fn on_fenced(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.core.on_fenced.set(Box::new(f));
    }

    /// Refuses new calls, waits until every resident entitlement has written
    /// what it holds, stops the actors and then the store.
    pub async fn shutdown(&self) {
        self.core.stopping.store(true, Ordering::Relaxed);
        let addrs: Vec<_> = self
            .core
            .registry
            .iter()
            .filter_map(|r| match &*r {
                registry::Resident::Live { addr, .. } => Some(addr.clone()),
                registry::Resident::Dormant(_) => None,
            })
            .collect();
        // An actor that already stopped has nothing left to write.
        join_all(addrs.iter().map(|a| a.send(Drain))).await;
        self.core.registry.clear();
        self.core.stop_sweeper().await;
        self.core.store.shutdown().await;
    }
}
