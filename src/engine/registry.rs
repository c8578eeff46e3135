//! The registry of resident entitlements: which have an actor, which sleep
//! in a compact dormant form, and the sweeper that drops dormant ones after
//! the idle timeout and wakes those whose housekeeping falls due.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::Addr;
use chrono::{DateTime, Utc};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::oneshot;

use super::actor::{Call, EntitlementActor, Sweep};
use super::{Clock, EngineSettings};
use crate::domain::{Entitlement, EntitlementId};
use crate::store::Store;

/// What the registry holds for a resident entitlement.
pub(crate) enum Resident {
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
    pub(crate) since: Instant,
    /// When housekeeping (a lease expiry, a period end) falls due.
    pub(crate) due: Option<DateTime<Utc>>,
}

impl Resident {
    pub(crate) fn is_generation(&self, g: u64) -> bool {
        matches!(self, Resident::Live { generation, .. } if *generation == g)
    }
}

/// An actor's address, and the generation that tells it apart from the
/// actors that served the entitlement before and after it.
pub(crate) struct LiveActor {
    pub generation: u64,
    pub addr: Addr<EntitlementActor>,
}

/// How a stopped sweeper is told to stop, and how it says it has.
type SweeperHandle = (Arc<tokio::sync::Notify>, oneshot::Receiver<()>);

/// What the engine handle and every actor share.
pub(crate) struct EngineCore {
    pub(crate) registry: DashMap<EntitlementId, Resident>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) settings: EngineSettings,
    generation: AtomicU64,
    pub(crate) stopping: AtomicBool,
    /// Told of every fenced write (see `Engine::on_fenced`).
    pub(crate) on_fenced: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The dormant-entitlement sweeper: started with the first call, told to
    /// stop and awaited by `shutdown`.
    sweeper: std::sync::Mutex<Option<SweeperHandle>>,
}

impl EngineCore {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
    ) -> Self {
        EngineCore {
            registry: DashMap::new(),
            store,
            clock,
            settings,
            generation: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            on_fenced: std::sync::OnceLock::new(),
            sweeper: std::sync::Mutex::new(None),
        }
    }

    /// The actor serving `id`, started (from its dormant state, or reading
    /// the store) when none is.
    pub(crate) fn actor(self: &Arc<Self>, id: &EntitlementId) -> LiveActor {
        if let Some(resident) = self.registry.get(id)
            && let Resident::Live { generation, addr } = &*resident
        {
            return LiveActor {
                generation: *generation,
                addr: addr.clone(),
            };
        }
        self.start_sweeper();
        let spawn = |preloaded| {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let addr = EntitlementActor::spawn(id.clone(), generation, self.clone(), preloaded);
            LiveActor { generation, addr }
        };
        match self.registry.entry(id.clone()) {
            Entry::Occupied(mut o) => match o.get_mut() {
                Resident::Live { generation, addr } => LiveActor {
                    generation: *generation,
                    addr: addr.clone(),
                },
                Resident::Dormant(d) => {
                    let live = spawn(d.state.take().map(|s| (s, d.epoch)));
                    *o.get_mut() = live.resident();
                    live
                }
            },
            Entry::Vacant(v) => {
                let live = spawn(None);
                v.insert(live.resident());
                live
            }
        }
    }

    /// Forgets the actor of `generation` (it stopped), unless another took over.
    pub(crate) fn forget(&self, id: &EntitlementId, generation: u64) {
        self.registry
            .remove_if(id, |_, r| r.is_generation(generation));
    }

    /// Entitlements in memory: with an actor, and dormant.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let live = self
            .registry
            .iter()
            .filter(|r| matches!(**r, Resident::Live { .. }))
            .count();
        (live, self.registry.len() - live)
    }

    /// Starts, once, the task that drops dormant entitlements after the idle
    /// timeout and wakes those whose housekeeping falls due.
    fn start_sweeper(self: &Arc<Self>) {
        let mut sweeper = self.sweeper.lock().unwrap_or_else(|p| p.into_inner());
        if sweeper.is_some() || self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let stop = Arc::new(tokio::sync::Notify::new());
        let (done, done_rx) = oneshot::channel();
        let engine = Arc::downgrade(self);
        let every = self.settings.sweep_interval.min(Duration::from_secs(1));
        let stop_rx = stop.clone();
        actix_rt::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop_rx.notified() => break,
                }
                let Some(core) = engine.upgrade() else {
                    break;
                };
                core.sweep_dormant();
            }
            let _ = done.send(());
        });
        *sweeper = Some((stop, done_rx));
    }

    /// Stops the sweeper and waits until it has.
    pub(crate) async fn stop_sweeper(&self) {
        let sweeper = self
            .sweeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((stop, done)) = sweeper {
            stop.notify_one();
            let _ = done.await;
        }
    }

    fn sweep_dormant(self: &Arc<Self>) {
        let idle = self.settings.idle_timeout;
        let now = self.clock.now();
        let mut due = Vec::new();
        self.registry.retain(|id, resident| match resident {
            Resident::Dormant(d) if d.since.elapsed() >= idle => {
                metrics::counter!("headroom_entitlements_passivated_total").increment(1);
                false
            }
            Resident::Dormant(d) => {
                if d.due.is_some_and(|t| t <= now) {
                    due.push(id.clone());
                }
                true
            }
            Resident::Live { .. } => true,
        });
        // The table does not shrink by itself: after traffic moves on, give
        // the memory of a mostly empty registry back.
        if self.registry.capacity() > 4 * self.registry.len().max(1024) {
            self.registry.shrink_to_fit();
        }
        for id in due {
            // Nobody waits for housekeeping: its answer goes nowhere.
            self.actor(&id).addr.do_send(Call::new(Sweep));
        }
    }
}

impl LiveActor {
    fn resident(&self) -> Resident {
        Resident::Live {
            generation: self.generation,
            addr: self.addr.clone(),
        }
    }
}
