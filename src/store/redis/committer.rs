//! The per-worker committer: the second level of batching.
//!
//! Each thread that calls the store (each HTTP worker, where the
//! entitlement actors live) gets a committer task of its own on first use,
//! so a commit never wakes another thread. A committer takes whatever is
//! queued (up to `max_batch`) and sends it as one pipeline: one call of the
//! commit script carrying all the queued commits, followed by the queued
//! loads and reads. Up to `max_flushes` pipelines are in flight at once on
//! the connection it holds. Each entitlement has at most one commit in
//! flight (its actor waits), so per-entitlement order holds across
//! concurrent pipelines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::keys::Keys;
use super::layout;
use super::reachability::Reachability;
use super::scripts::{
    COMMIT_LUA, CommitArgs, CommitLimits, LOAD_LUA, commit_call, load_call, parse_commit_reply,
    parse_load_reply,
};
use crate::domain::EntitlementId;
use crate::store::{Cause, Commit, CommitOutcome, Loaded, StoreError, StoreSettings};

/// How long a caller waits past its deadline for a reply Redis sent in time.
pub(super) const GRACE: Duration = Duration::from_millis(25);

type Answer<T> = oneshot::Sender<Result<T, StoreError>>;

/// Work for the committer. Loads and pings go the same way as commits, so
/// that all Redis I/O of the hot path runs on the committer's runtime and
/// cold loads are pipelined together with writes.
pub(super) enum Work {
    Commit {
        commit: Box<Commit>,
        reply: Answer<CommitOutcome>,
    },
    Load {
        id: EntitlementId,
        /// Bump the epoch even when nothing is stored (see `Store::settle`).
        fence: bool,
        reply: Answer<Loaded>,
    },
    Ping {
        reply: Answer<()>,
    },
}

impl Work {
    fn fail(self, e: StoreError) {
        match self {
            Work::Commit { reply, .. } => drop(reply.send(Err(e))),
            Work::Load { reply, .. } => drop(reply.send(Err(e))),
            Work::Ping { reply } => drop(reply.send(Err(e))),
        }
    }

    /// Fails work that was never sent: it certainly was not applied.
    fn refuse(self, reason: &'static str, source: Option<Cause>) {
        let op = match &self {
            Work::Commit { .. } => "commit",
            Work::Load { .. } => "load",
            Work::Ping { .. } => "ping",
        };
        self.fail(StoreError::not_sent(op, reason, source));
    }

    fn answer(self, value: Result<Value, redis::RedisError>) {
        match self {
            Work::Commit { commit, reply } => {
                let outcome = value
                    .map_err(|e| StoreError::redis("commit", e))
                    .and_then(|v| parse_commit_reply(&commit, v));
                if outcome.is_err() {
                    metrics::counter!("headroom_store_errors_total", "op" => "commit").increment(1);
                }
                let _ = reply.send(outcome);
            }
            Work::Load { id, reply, .. } => {
                let loaded = value
                    .map_err(|e| StoreError::redis("load", e))
                    .and_then(|v| parse_load_reply(&id, v));
                if loaded.is_err() {
                    metrics::counter!("headroom_store_errors_total", "op" => "load").increment(1);
                }
                let _ = reply.send(loaded);
            }
            Work::Ping { reply } => {
                let _ = reply.send(value.map(|_| ()).map_err(|e| StoreError::redis("ping", e)));
            }
        }
    }
}

/// Work and the instant its caller stops waiting for it: work still queued
/// then is dropped unsent, and a commit carries it to Redis as its deadline.
pub(super) struct Queued {
    pub work: Work,
    pub deadline: Instant,
}

/// What the committers of one store share.
pub(super) struct CommitterCore {
    pub pool: deadpool_redis::Pool,
    pub settings: StoreSettings,
    idempotency_window: Duration,
    reach: Reachability,
    pub keys: Keys,
    pub commit_sha: String,
    pub load_sha: String,
    /// Pipelines sent: Redis round trips.
    pub round_trips: AtomicU64,
    /// Redis's clock minus ours, in ms, measured on each new connection, so
    /// that commit deadlines are checked in Redis's clock.
    clock_offset_ms: AtomicI64,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl CommitterCore {
    pub fn new(
        pool: deadpool_redis::Pool,
        settings: StoreSettings,
        idempotency_window: Duration,
        reach: Reachability,
    ) -> Self {
        CommitterCore {
            keys: Keys::new(settings.redis_prefix.clone(), settings.redis_buckets),
            pool,
            reach,
            idempotency_window,
            settings,
            commit_sha: redis::Script::new(COMMIT_LUA).get_hash().to_string(),
            load_sha: redis::Script::new(LOAD_LUA).get_hash().to_string(),
            round_trips: AtomicU64::new(0),
            clock_offset_ms: AtomicI64::new(0),
        }
    }

    fn timeout(&self, op: &'static str) -> StoreError {
        StoreError::timeout(op, self.settings.redis_timeout)
    }

    /// A connection from the pool, and Redis's clock read through it.
    async fn conn(&self, deadline: Instant) -> Result<deadpool_redis::Connection, StoreError> {
        let mut conn = tokio::time::timeout_at(deadline.into(), self.pool.get())
            .await
            .map_err(|_| self.timeout("connect"))?
            .map_err(|e| match e {
                deadpool_redis::PoolError::Timeout(_) => self.timeout("connect"),
                other => StoreError::not_sent(
                    "connect",
                    "no connection to Redis",
                    Some(Cause::Pool(Arc::new(other))),
                ),
            })?;
        let before = unix_ms();
        let time: (i64, i64) =
            tokio::time::timeout_at(deadline.into(), redis::cmd("TIME").query_async(&mut *conn))
                .await
                .map_err(|_| self.timeout("connect"))?
                .map_err(|e| StoreError::redis("connect", e))?;
        let after = unix_ms();
        let redis_ms = time.0 * 1000 + time.1 / 1000;
        self.clock_offset_ms
            .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
        tokio::time::timeout_at(deadline.into(), layout::check(&mut *conn, &self.keys))
            .await
            .map_err(|_| self.timeout("connect"))??;
        Ok(conn)
    }

    /// Turns instants of ours into ms in Redis's clock; reads both clocks
    /// once, however many instants it converts.
    fn redis_clock(&self) -> impl Fn(Instant) -> i64 + use<> {
        let now = Instant::now();
        let redis_now = unix_ms() + self.clock_offset_ms.load(Ordering::Relaxed);
        move |at| {
            redis_now + at.saturating_duration_since(now).as_millis() as i64
                - now.saturating_duration_since(at).as_millis() as i64
        }
    }

    /// Runs a pipeline of script calls, loading the scripts once when Redis
    /// does not know them (after a Redis restart, say) and trying again.
    async fn run_scripts(
        &self,
        mut conn: MultiplexedConnection,
        pipe: &redis::Pipeline,
        until: Instant,
    ) -> Result<Vec<Result<Value, redis::RedisError>>, StoreError> {
        for attempt in 0..2 {
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let results: Vec<redis::RedisResult<Value>> =
                tokio::time::timeout_at(until.into(), pipe.query_async(&mut conn))
                    .await
                    .map_err(|_| self.timeout("pipeline"))?
                    .map_err(|e| StoreError::redis("pipeline", e))?;
            let missing = results
                .iter()
                .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")));
            if !missing || attempt == 1 {
                return Ok(results);
            }
            // The script cache is global: every call of this pipeline failed
            // the same way, none ran.
            self.load_scripts(&mut conn, until).await?;
        }
        unreachable!("the second attempt returns")
    }

    async fn load_scripts(
        &self,
        conn: &mut MultiplexedConnection,
        until: Instant,
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(COMMIT_LUA);
        pipe.cmd("SCRIPT").arg("LOAD").arg(LOAD_LUA);
        let _: Vec<String> = tokio::time::timeout_at(until.into(), pipe.query_async(conn))
            .await
            .map_err(|_| self.timeout("script load"))?
            .map_err(|e| StoreError::redis("script load", e))?;
        Ok(())
    }

    /// The pipeline for `queued`, which it puts in order: the commits first,
    /// by bucket, in one commit-script call, then the other work as queued.
    fn pipeline(&self, queued: &mut [Queued]) -> (redis::Pipeline, usize) {
        let bucket = |q: &Queued| match &q.work {
            Work::Commit { commit, .. } => (0, self.keys.bucket_of(&commit.id)),
            _ => (1, 0),
        };
        queued.sort_by_cached_key(bucket);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let redis_ms = self.redis_clock();
        let commits: Vec<CommitArgs<'_>> = queued
            .iter()
            .filter_map(|q| match &q.work {
                Work::Commit { commit, .. } => Some(CommitArgs::of(
                    commit,
                    self.keys.bucket_of(&commit.id),
                    redis_ms(q.deadline),
                )),
                _ => None,
            })
            .collect();
        if !commits.is_empty() {
            let limits = CommitLimits {
                stream_maxlen: self
                    .settings
                    .stream_maxlen
                    .div_ceil(self.keys.buckets() as u64),
                idempotency_ttl_ms: self.idempotency_window.as_millis() as u64,
            };
            pipe.add_command(commit_call(&self.commit_sha, &self.keys, &limits, &commits));
        }
        for q in queued.iter() {
            match &q.work {
                Work::Commit { .. } => {}
                Work::Load { id, fence, .. } => {
                    pipe.add_command(load_call(&self.load_sha, &self.keys, id, *fence));
                }
                Work::Ping { .. } => {
                    pipe.cmd("PING");
                }
            }
        }
        let ncommits = commits.len();
        (pipe, ncommits)
    }

    /// Sends one pipeline; answers whether the connection still works.
    async fn flush(&self, conn: MultiplexedConnection, queued: Vec<Queued>) -> bool {
        let started = Instant::now();
        let until = queued.iter().map(|q| q.deadline).max().unwrap_or(started) + GRACE;
        let mut queued = queued;
        let (pipe, ncommits) = self.pipeline(&mut queued);
        let work: Vec<Work> = queued.into_iter().map(|q| q.work).collect();
        let results = self.run_scripts(conn, &pipe, until).await;
        let healthy = results.is_ok();
        match &results {
            Ok(_) => self.reach.answered(),
            Err(e) => self.reach.failed(e),
        }
        metrics::histogram!("headroom_store_write_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("headroom_store_batch_size").record(work.len() as f64);
        match results.and_then(|r| spread_replies(r, &work, ncommits)) {
            Ok(replies) => {
                for (w, reply) in work.into_iter().zip(replies) {
                    w.answer(reply);
                }
            }
            Err(e) => {
                metrics::counter!("headroom_store_errors_total", "op" => "pipeline").increment(1);
                tracing::debug!(error = %crate::store::chain(&e), calls = work.len(), "store pipeline failed");
                for w in work {
                    w.fail(e.clone());
                }
            }
        }
        healthy
    }
}

/// One reply per piece of work: the commit script's one reply is spread
/// over the commits it carried.
fn spread_replies(
    mut results: Vec<Result<Value, redis::RedisError>>,
    work: &[Work],
    ncommits: usize,
) -> Result<Vec<Result<Value, redis::RedisError>>, StoreError> {
    let expected = work.len() - ncommits + usize::from(ncommits > 0);
    if results.len() != expected {
        return Err(StoreError::reply(
            "pipeline",
            format!("{} results for {expected} calls", results.len()),
        ));
    }
    if ncommits == 0 {
        return Ok(results);
    }
    let per_commit: Vec<Result<Value, redis::RedisError>> = match results.remove(0) {
        Ok(Value::Array(items)) if items.len() == ncommits => items.into_iter().map(Ok).collect(),
        Ok(other) => {
            return Err(StoreError::reply(
                "commit",
                format!("{ncommits} commits answered {other:?}"),
            ));
        }
        Err(e) => (0..ncommits).map(|_| Err(e.clone())).collect(),
    };
    let mut per_commit = per_commit.into_iter();
    let mut rest = results.into_iter();
    Ok(work
        .iter()
        .filter_map(|w| match w {
            Work::Commit { .. } => per_commit.next(),
            _ => rest.next(),
        })
        .collect())
}

/// One worker thread's committer: runs until told to stop, then sends
/// what is queued and waits for the pipelines in flight.
pub(super) async fn committer(
    core: Arc<CommitterCore>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) {
    let flushes = Arc::new(Semaphore::new(core.settings.max_flushes));
    let max_batch = core.settings.max_batch;
    // The connection this committer holds; checking one out of the pool per
    // pipeline would cost a PING round trip each time.
    let mut held: Option<deadpool_redis::Connection> = None;
    let broken = Arc::new(AtomicBool::new(false));
    let mut stopping = *stop.borrow();
    loop {
        let first = if stopping {
            rx.try_recv().ok()
        } else {
            tokio::select! {
                queued = rx.recv() => queued,
                _ = stop.changed() => {
                    stopping = true;
                    rx.try_recv().ok()
                }
            }
        };
        let Some(first) = first else { break };
        // Wait for a free pipeline slot first: while all are busy, commits
        // keep queueing, and the next pipeline takes them all at once.
        let Ok(permit) = flushes.clone().acquire_owned().await else {
            break;
        };
        let mut queued = vec![first];
        // Whatever else is queued (an empty queue ends the batch).
        while queued.len() < max_batch
            && let Ok(q) = rx.try_recv()
        {
            queued.push(q);
        }
        // Work whose callers stopped waiting is never sent: a write that
        // was answered 503 must not land.
        let now = Instant::now();
        let (late, queued): (Vec<Queued>, Vec<Queued>) =
            queued.into_iter().partition(|q| q.deadline <= now);
        for q in late {
            q.work.refuse("waited past its deadline", None);
        }
        let Some(until) = queued.iter().map(|q| q.deadline).max() else {
            continue;
        };
        if broken.swap(false, Ordering::Relaxed) {
            held = None;
        }
        if held.is_none() {
            match core.conn(until).await {
                Ok(c) => held = Some(c),
                Err(e) => {
                    core.reach.failed(&e);
                    metrics::counter!("headroom_store_errors_total", "op" => "connect")
                        .increment(1);
                    // Nothing was sent.
                    let cause = match e {
                        StoreError::Redis { source, .. } => Some(source),
                        StoreError::Refused { source, .. } => source,
                        _ => None,
                    };
                    for q in queued {
                        q.work.refuse("no connection to Redis", cause.clone());
                    }
                    continue;
                }
            }
        }
        let Some(conn) = held.as_ref().map(|c| MultiplexedConnection::clone(c)) else {
            continue;
        };
        let core = core.clone();
        let broken = broken.clone();
        tokio::spawn(async move {
            if !core.flush(conn, queued).await {
                broken.store(true, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    // Wait for the pipelines still in flight.
    let _ = flushes.acquire_many(core.settings.max_flushes as u32).await;
    let _ = done.send(());
}
