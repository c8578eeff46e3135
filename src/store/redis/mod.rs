//! The durable store: a standalone Redis through a deadpool-redis pool, or
//! a Redis Cluster through redis-rs's cluster connection ([`link`]).
//!
//! Writes, loads and pings go through a committer per worker thread
//! ([`committer`]), which pipelines whatever its thread queued: one call of
//! the commit script carries every queued commit (each applied atomically
//! on its own; on a cluster, one call per bucket), so a Redis round trip
//! and a script call carry many decisions of many entitlements. Reports
//! and history are read apart from the committers ([`reads`]). Every key
//! is built in [`keys`]; the layout it follows is recorded and checked in
//! [`layout`]; the scripts' arguments and replies are in [`scripts`],
//! beside `lua/`.

mod committer;
mod keys;
mod layout;
mod link;
mod reachability;
mod reads;
mod scripts;
mod stream;

pub use keys::{DEFAULT_BUCKETS, Keys, MAX_BUCKETS};
pub use link::Link;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};

use self::committer::{CommitterCore, GRACE, Queued, Work, committer};
use super::{
    Commit, CommitOutcome, EventsFrom, EventsPage, Loaded, OverdraftCounts, Peeked, Store,
    StoreError, StoreSettings,
};
use crate::domain::{BucketRecord, BucketSize, EntitlementId};

/// A reply's text (bulk or simple string, or an integer).
pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub struct RedisStore {
    core: Arc<CommitterCore>,
    /// Tells this store's committers apart in the thread-local registry.
    store_id: u64,
    stop: watch::Sender<bool>,
    /// One receiver per committer started; each answers when it has stopped.
    committers: Mutex<Vec<oneshot::Receiver<()>>>,
}

static STORE_IDS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's committer queue of each Redis store.
    static QUEUES: RefCell<HashMap<u64, mpsc::UnboundedSender<Queued>>> = RefCell::new(HashMap::new());
}

impl RedisStore {
    /// The store on Redis at `url`; committers start on first use. Does
    /// not need Redis to be up: calls answer 503 until it is. Idempotency
    /// records expire after `idempotency_window`.
    pub fn start(
        url: &str,
        settings: &StoreSettings,
        idempotency_window: Duration,
    ) -> Result<Self, StoreError> {
        let link = Link::standalone(url, settings.redis_timeout, settings.redis_pool_size)?;
        Ok(Self::on(
            link,
            &[url.to_string()],
            settings,
            idempotency_window,
        ))
    }

    /// The Redis (standalone or cluster) the settings name.
    pub fn link(settings: &StoreSettings) -> Result<Option<(Link, Vec<String>)>, StoreError> {
        match (&settings.redis_cluster, &settings.redis_url) {
            (Some(seeds), _) => Ok(Some((
                Link::cluster(&seeds.0, settings.redis_timeout)?,
                seeds.0.clone(),
            ))),
            (None, Some(url)) => Ok(Some((
                Link::standalone(url, settings.redis_timeout, settings.redis_pool_size)?,
                vec![url.clone()],
            ))),
            (None, None) => Ok(None),
        }
    }

    /// The store on `link` (to Redis at `urls`, for the log).
    pub fn on(
        link: Link,
        urls: &[String],
        settings: &StoreSettings,
        idempotency_window: Duration,
    ) -> Self {
        let (stop, _) = watch::channel(false);
        RedisStore {
            core: Arc::new(CommitterCore::new(
                link,
                settings.clone(),
                idempotency_window,
                reachability::Reachability::new(urls),
            )),
            store_id: STORE_IDS.fetch_add(1, Ordering::Relaxed),
            stop,
            committers: Mutex::new(Vec::new()),
        }
    }

    /// This thread's committer queue, started on first use.
    fn queue(&self) -> mpsc::UnboundedSender<Queued> {
        QUEUES.with(|queues| {
            let mut queues = queues.borrow_mut();
            if let Some(q) = queues.get(&self.store_id).filter(|q| !q.is_closed()) {
                return q.clone();
            }
            let (queue, rx) = mpsc::unbounded_channel();
            let (done, done_rx) = oneshot::channel();
            self.committers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(done_rx);
            tokio::spawn(committer(
                self.core.clone(),
                rx,
                self.stop.subscribe(),
                done,
            ));
            queues.insert(self.store_id, queue.clone());
            queue
        })
    }

    /// The key names of this store (prefix and bucket count).
    pub fn keys(&self) -> &Keys {
        &self.core.keys
    }

    /// Records the key layout on an empty prefix, or checks that the data
    /// there was written in this process's layout (every new connection
    /// checks it again).
    pub async fn verify_layout(&self) -> Result<(), StoreError> {
        let timeout = self.core.settings.redis_timeout;
        let mut conn = self.core.link.conn(timeout).await?;
        tokio::time::timeout(timeout, layout::check(&mut conn, &self.core.keys))
            .await
            .map_err(|_| StoreError::timeout("layout check", timeout))?
    }

    /// Pipelines sent to Redis so far: each is one round trip.
    pub fn round_trips(&self) -> u64 {
        self.core.round_trips.load(Ordering::Relaxed)
    }

    /// Queues work and waits for its answer, at most `budget` (and the
    /// grace for a reply Redis sent in time).
    async fn submit<T>(
        &self,
        op: &'static str,
        work: Work,
        rx: oneshot::Receiver<Result<T, StoreError>>,
        budget: Duration,
    ) -> Result<T, StoreError> {
        let deadline = Instant::now() + budget;
        self.queue()
            .send(Queued { work, deadline })
            .map_err(|_| StoreError::ShuttingDown)?;
        let answer = tokio::time::timeout_at((deadline + GRACE).into(), rx)
            .await
            .map_err(|_| StoreError::timeout(op, self.core.settings.redis_timeout))?;
        answer.map_err(|_| StoreError::ShuttingDown)?
    }

    async fn load_with(
        &self,
        id: &EntitlementId,
        fence: bool,
        budget: Duration,
    ) -> Result<Loaded, StoreError> {
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        let work = Work::Load {
            id: id.clone(),
            fence,
            reply,
        };
        let loaded = self.submit("load", work, rx, budget).await;
        metrics::histogram!("headroom_store_load_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        loaded
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self, id: &EntitlementId) -> Result<Loaded, StoreError> {
        self.load_with(id, false, self.core.settings.redis_timeout)
            .await
    }

    async fn settle(&self, id: &EntitlementId) -> Result<Loaded, StoreError> {
        self.load_with(id, true, self.core.settings.redis_timeout / 4)
            .await
    }

    async fn epoch(&self, id: &EntitlementId) -> Result<u64, StoreError> {
        self.read_epoch(id).await
    }

    async fn links_revoked_at(&self, id: &EntitlementId) -> Result<Option<i64>, StoreError> {
        self.read_links_revoked(id).await
    }

    async fn revoke_links(
        &self,
        id: &EntitlementId,
        at: i64,
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.write_links_revoked(id, at, keep).await
    }

    async fn commit(&self, commit: Commit) -> Result<CommitOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let budget = self.core.settings.redis_timeout * 3 / 4;
        let work = Work::Commit {
            commit: Box::new(commit),
            reply,
        };
        // The one place a commit's failure is classed as a write: whatever
        // did not refuse it up front (no answer in time, a broken
        // connection, an error reply) leaves its outcome unknown.
        self.submit("commit", work, rx, budget)
            .await
            .map_err(StoreError::sent_write)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let budget = self.core.settings.redis_timeout;
        self.submit("ping", Work::Ping { reply }, rx, budget).await
    }

    async fn stream_length(&self) -> Result<u64, StoreError> {
        self.read_stream_length().await
    }

    async fn overdraft_totals(&self) -> Result<OverdraftCounts, StoreError> {
        self.read_totals().await
    }

    async fn peek_many(&self, ids: &[EntitlementId]) -> Result<Vec<Peeked>, StoreError> {
        self.read_states(ids).await
    }

    async fn overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read_overdraft_page(after, limit).await
    }

    async fn entitlement_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read_entitlement_page(after, limit).await
    }

    async fn events_page(
        &self,
        from: EventsFrom,
        of: Option<&EntitlementId>,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        self.read_events_page(from, of, limit).await
    }

    async fn denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        self.read_denied_page(since, after, limit).await
    }

    async fn history(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        starts: &[i64],
    ) -> Result<Vec<Option<BucketRecord>>, StoreError> {
        self.read_history(id, size, starts).await
    }

    async fn periods(&self, id: &EntitlementId, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read_periods(id, limit).await
    }

    async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let committers =
            std::mem::take(&mut *self.committers.lock().unwrap_or_else(|p| p.into_inner()));
        for done in committers {
            // An error means the committer's thread already ended.
            let _ = done.await;
        }
    }
}
