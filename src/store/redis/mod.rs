//! The durable store: Redis through a deadpool-redis pool.
//!
//! Writes, loads and pings go through a committer per worker thread
//! ([`committer`]), which pipelines whatever its thread queued: one call of
//! the commit script carries every queued commit (each applied atomically
//! on its own), so a Redis round trip and a script call carry many
//! decisions of many entitlements. Reports and history are read on pooled
//! connections ([`reads`]). Every key is built in [`keys`]; the scripts'
//! arguments and replies are in [`scripts`], beside `lua/`.

mod committer;
mod keys;
mod layout;
mod reachability;
mod reads;
mod scripts;

pub use keys::{DEFAULT_BUCKETS, Keys, MAX_BUCKETS};

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{mpsc, oneshot, watch};

use self::committer::{CommitterCore, GRACE, Queued, Work, committer};
use super::{
    Cause, Commit, CommitOutcome, Loaded, OverdraftCounts, Peeked, Store, StoreError, StoreSettings,
};
use crate::domain::{BucketRecord, BucketSize, EntitlementId};

/// A pool of Redis connections whose connect, response, wait and recycle
/// steps are each bounded by `timeout`.
pub(crate) fn pool(url: &str, timeout: Duration, size: usize) -> Result<Pool, StoreError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let manager = Manager::new_with_config(url, config)
        .map_err(|e| StoreError::not_sent("connect", "the Redis URL is invalid", Some(e.into())))?;
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| {
            StoreError::not_sent(
                "connect",
                "the Redis pool could not be built",
                Some(Cause::Build(Arc::new(e))),
            )
        })
}

/// Runs `pipe` on a connection from `pool`, all within `timeout` (reads
/// and bookkeeping that do not go through the committers).
pub(crate) async fn query<T: redis::FromRedisValue>(
    op: &'static str,
    pool: &Pool,
    timeout: Duration,
    pipe: &redis::Pipeline,
) -> Result<T, StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut conn = tokio::time::timeout_at(deadline, pool.get())
        .await
        .map_err(|_| StoreError::timeout(op, timeout))?
        .map_err(|e| {
            StoreError::not_sent(op, "no connection to Redis", Some(Cause::Pool(Arc::new(e))))
        })?;
    tokio::time::timeout_at(deadline, pipe.query_async(&mut *conn))
        .await
        .map_err(|_| StoreError::timeout(op, timeout))?
        .map_err(|e| StoreError::redis(op, e))
}

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
    /// Builds the pool for Redis at `url`; committers start on first use.
    /// Does not need Redis to be up: calls answer 503 until it is.
    /// Idempotency records expire after `idempotency_window`.
    pub fn start(
        url: &str,
        settings: &StoreSettings,
        idempotency_window: Duration,
    ) -> Result<Self, StoreError> {
        let pool = pool(url, settings.redis_timeout, settings.redis_pool_size)?;
        let (stop, _) = watch::channel(false);
        Ok(RedisStore {
            core: Arc::new(CommitterCore::new(
                pool,
                settings.clone(),
                idempotency_window,
                reachability::Reachability::new(url),
            )),
            store_id: STORE_IDS.fetch_add(1, Ordering::Relaxed),
            stop,
            committers: Mutex::new(Vec::new()),
        })
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
        let mut conn = tokio::time::timeout(timeout, self.core.pool.get())
            .await
            .map_err(|_| StoreError::timeout("layout check", timeout))?
            .map_err(|e| {
                StoreError::not_sent(
                    "layout check",
                    "no connection to Redis",
                    Some(Cause::Pool(Arc::new(e))),
                )
            })?;
        tokio::time::timeout(timeout, layout::check(&mut *conn, &self.core.keys))
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
