//! The durable store: Redis through a deadpool-redis pool, with group commit.
//!
//! Each thread that calls the store (each HTTP worker, where the entitlement
//! actors live) gets a committer task of its own on first use, so a commit
//! never wakes another thread. A committer takes whatever is queued (up to
//! `max_batch`) and sends it as one pipeline of `EVALSHA` calls, one atomic
//! script per entitlement, so a Redis round trip carries many decisions; up
//! to `max_flushes` pipelines are in flight at once on the connection it
//! holds. Each entitlement has at most one commit in flight (the actor
//! waits), so per-entitlement order is kept across concurrent pipelines.
//!
//! Keys, with one hash tag per entitlement:
//! `{prefix}:{<id>}:epoch`, `{prefix}:{<id>}:state`, `{prefix}:{<id>}:seats`,
//! `{prefix}:{<id>}:key:<incarnation>:<idempotency key>` and `{prefix}:events`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::{
    Commit, CommitOutcome, DENIALS_KEPT_MS, Loaded, OverdraftTotals, PERIODS_KEPT, Store,
    StoreError, Write, decode_state,
};
use crate::domain::{BucketRecord, BucketSize, EntitlementId, FieldOp, IdempotencyKey};

const COMMIT_LUA: &str = include_str!("lua/commit.lua");
const LOAD_LUA: &str = include_str!("lua/load.lua");

#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    pub stream_maxlen: u64,
    pub idempotency_window: Duration,
    /// Longest wait for Redis on behalf of one call: a write gets three
    /// quarters of it and, when its outcome is unknown, the read-back that
    /// settles it the rest; loads and pings get all of it.
    pub timeout: Duration,
    pub pool_size: usize,
    /// Most entitlement commits in one pipeline.
    pub max_batch: usize,
    /// Most pipelines in flight at once.
    pub max_flushes: usize,
}

impl RedisSettings {
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            url: url.into(),
            prefix: "headroom".into(),
            stream_maxlen: 1_000_000,
            idempotency_window: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(2),
            pool_size: 8,
            max_batch: 512,
            max_flushes: 4,
        }
    }
}

/// Work for the committer. Loads and pings go the same way as commits, so
/// that all Redis I/O runs on the committer's runtime and cold loads are
/// pipelined together with writes.
enum Job {
    Commit {
        commit: Box<Commit>,
        reply: oneshot::Sender<Result<CommitOutcome, StoreError>>,
    },
    Load {
        id: EntitlementId,
        /// Bump the epoch even when nothing is stored (see [`Store::settle`]).
        fence: bool,
        reply: oneshot::Sender<Result<Loaded, StoreError>>,
    },
    Ping {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    StreamLength {
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Totals {
        reply: oneshot::Sender<Result<OverdraftTotals, StoreError>>,
    },
}

impl Job {
    fn fail(self, e: StoreError) {
        match self {
            Job::Commit { reply, .. } => drop(reply.send(Err(e))),
            Job::Load { reply, .. } => drop(reply.send(Err(e))),
            Job::Ping { reply } => drop(reply.send(Err(e))),
            Job::StreamLength { reply } => drop(reply.send(Err(e))),
            Job::Totals { reply } => drop(reply.send(Err(e))),
        }
    }

    fn answer(self, value: Result<Value, StoreError>) {
        match self {
            Job::Commit { commit, reply } => {
                let outcome = value.and_then(|v| parse_commit_reply(&commit, v));
                if outcome.is_err() {
                    metrics::counter!("headroom_store_errors_total", "op" => "commit").increment(1);
                }
                let _ = reply.send(outcome);
            }
            Job::Load { id, reply, .. } => {
                let loaded = value.and_then(|v| parse_load_reply(&id, v));
                if loaded.is_err() {
                    metrics::counter!("headroom_store_errors_total", "op" => "load").increment(1);
                }
                let _ = reply.send(loaded);
            }
            Job::Ping { reply } => {
                let _ = reply.send(value.map(|_| ()));
            }
            Job::StreamLength { reply } => {
                let length = value.and_then(|v| match v {
                    Value::Int(n) => Ok(n.max(0) as u64),
                    other => Err(unavailable(format!("XLEN answered {other:?}"))),
                });
                let _ = reply.send(length);
            }
            Job::Totals { reply } => {
                let totals = value.and_then(|v| match v {
                    Value::Array(items) => {
                        let n = |i: usize| {
                            items
                                .get(i)
                                .and_then(text)
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0)
                        };
                        Ok(OverdraftTotals {
                            entitlements: n(0),
                            seats: n(1),
                        })
                    }
                    other => Err(unavailable(format!("HMGET answered {other:?}"))),
                });
                let _ = reply.send(totals);
            }
        }
    }
}

/// A job and the instant its caller stops waiting for it: a job still queued
/// then is dropped unsent, and a commit carries it to Redis as its deadline.
struct Queued {
    job: Job,
    deadline: Instant,
}

/// How long a caller waits past its deadline for a reply Redis sent in time.
const GRACE: Duration = Duration::from_millis(25);

struct Shared {
    /// Tells this store's committers apart in the thread-local registry.
    id: u64,
    pool: Pool,
    settings: RedisSettings,
    commit_sha: String,
    load_sha: String,
    /// Pipelines sent: Redis round trips.
    round_trips: AtomicU64,
    /// Redis's clock minus ours, in ms, measured on each new connection, so
    /// that commit deadlines are checked in Redis's clock.
    clock_offset_ms: AtomicI64,
}

pub struct RedisStore {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// One receiver per committer started; each answers when it has stopped.
    committers: Mutex<Vec<oneshot::Receiver<()>>>,
}

static STORE_IDS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's committer queue of each Redis store.
    static QUEUES: RefCell<HashMap<u64, mpsc::UnboundedSender<Queued>>> = RefCell::new(HashMap::new());
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A pool of Redis connections whose connect, response, wait and recycle
/// steps are each bounded by `timeout`.
pub(crate) fn pool(url: &str, timeout: Duration, size: usize) -> Result<Pool, StoreError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let manager = Manager::new_with_config(url, config).map_err(unavailable)?;
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(unavailable)
}

/// Runs `pipe` on a connection from `pool`, all within `timeout` (reads
/// and bookkeeping that do not go through the committers).
pub(crate) async fn query<T: redis::FromRedisValue>(
    pool: &Pool,
    timeout: Duration,
    pipe: &redis::Pipeline,
) -> Result<T, StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut conn = tokio::time::timeout_at(deadline, pool.get())
        .await
        .map_err(|_| StoreError::Timeout(timeout))?
        .map_err(unavailable)?;
    tokio::time::timeout_at(deadline, pipe.query_async(&mut *conn))
        .await
        .map_err(|_| StoreError::Timeout(timeout))?
        .map_err(unavailable)
}

impl RedisStore {
    /// Builds the pool and starts the committer. Does not need Redis to be up:
    /// calls answer 503 until it is.
    pub fn start(settings: RedisSettings) -> Result<Self, StoreError> {
        let pool = pool(&settings.url, settings.timeout, settings.pool_size)?;
        let shared = Arc::new(Shared {
            id: STORE_IDS.fetch_add(1, Ordering::Relaxed),
            pool,
            commit_sha: redis::Script::new(COMMIT_LUA).get_hash().to_string(),
            load_sha: redis::Script::new(LOAD_LUA).get_hash().to_string(),
            round_trips: AtomicU64::new(0),
            clock_offset_ms: AtomicI64::new(0),
            settings,
        });
        let (stop, _) = watch::channel(false);
        Ok(RedisStore {
            shared,
            stop,
            committers: Mutex::new(Vec::new()),
        })
    }

    /// This thread's committer queue, started on first use.
    fn queue(&self) -> mpsc::UnboundedSender<Queued> {
        QUEUES.with(|queues| {
            let mut queues = queues.borrow_mut();
            if let Some(q) = queues.get(&self.shared.id).filter(|q| !q.is_closed()) {
                return q.clone();
            }
            let (queue, rx) = mpsc::unbounded_channel();
            let (done, done_rx) = oneshot::channel();
            self.committers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(done_rx);
            tokio::spawn(committer(
                self.shared.clone(),
                rx,
                self.stop.subscribe(),
                done,
            ));
            queues.insert(self.shared.id, queue.clone());
            queue
        })
    }

    /// Pipelines sent to Redis so far: each is one round trip.
    pub fn round_trips(&self) -> u64 {
        self.shared.round_trips.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn key(&self, id: &EntitlementId, suffix: &str) -> String {
        format!("{}:{{{}}}:{}", self.settings.prefix, id, suffix)
    }

    fn stream(&self) -> String {
        format!("{}:events", self.settings.prefix)
    }

    fn totals_key(&self) -> String {
        format!("{}:overdraft", self.settings.prefix)
    }

    fn overdraft_index(&self) -> String {
        format!("{}:report:overdraft", self.settings.prefix)
    }

    fn denied_index(&self) -> String {
        format!("{}:report:denied", self.settings.prefix)
    }

    fn history_key(&self, id: &EntitlementId, size: BucketSize, start: i64) -> String {
        self.key(id, &format!("history:{}:{start}", size.as_str()))
    }

    /// A connection from the pool, and Redis's clock read through it.
    async fn conn(&self, deadline: Instant) -> Result<deadpool_redis::Connection, StoreError> {
        let timeout = StoreError::Timeout(self.settings.timeout);
        let mut conn = tokio::time::timeout_at(deadline.into(), self.pool.get())
            .await
            .map_err(|_| StoreError::Timeout(self.settings.timeout))?
            .map_err(|e| match e {
                deadpool_redis::PoolError::Timeout(_) => timeout,
                other => unavailable(other),
            })?;
        let before = unix_ms();
        let time: (i64, i64) =
            tokio::time::timeout_at(deadline.into(), redis::cmd("TIME").query_async(&mut *conn))
                .await
                .map_err(|_| StoreError::Timeout(self.settings.timeout))?
                .map_err(unavailable)?;
        let after = unix_ms();
        let redis_ms = time.0 * 1000 + time.1 / 1000;
        self.clock_offset_ms
            .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
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
                    .map_err(|_| StoreError::Timeout(self.settings.timeout))?
                    .map_err(unavailable)?;
            let missing = results
                .iter()
                .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")));
            if !missing || attempt == 1 {
                return Ok(results);
            }
            self.load_scripts(&mut conn, until).await?;
            // Only calls that failed with NOSCRIPT did not run; but all in this
            // pipeline failed the same way since the script cache is global.
        }
        Err(unavailable("scripts could not be loaded"))
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
            .map_err(|_| StoreError::Timeout(self.settings.timeout))?
            .map_err(unavailable)?;
        Ok(())
    }

    /// One script call for all the commits of a pipeline.
    fn add_commits(&self, pipe: &mut redis::Pipeline, commits: &[(&Commit, Instant)]) {
        let nkeys: usize = 4 + commits
            .iter()
            .map(|(c, _)| 4 + 2 * c.records.history.len() + c.idempotency.len())
            .sum::<usize>();
        let cmd = pipe.cmd("EVALSHA").arg(&self.commit_sha).arg(nkeys);
        cmd.arg(self.stream())
            .arg(self.totals_key())
            .arg(self.overdraft_index())
            .arg(self.denied_index());
        for (c, _) in commits {
            cmd.arg(self.key(&c.id, "epoch"))
                .arg(self.key(&c.id, "state"))
                .arg(self.key(&c.id, "seats"))
                .arg(self.key(&c.id, "periods"));
            for w in &c.records.history {
                cmd.arg(self.history_key(&c.id, BucketSize::Hour, w.hour))
                    .arg(self.history_key(&c.id, BucketSize::Day, BucketSize::Day.start(w.hour)));
            }
            for r in &c.idempotency {
                cmd.arg(self.key(&c.id, &format!("key:{}:{}", r.incarnation, r.key)));
            }
        }
        cmd.arg(commits.len())
            .arg(self.settings.stream_maxlen)
            .arg(self.settings.idempotency_window.as_millis() as u64)
            .arg(PERIODS_KEPT)
            .arg(DENIALS_KEPT_MS);
        let redis_ms = self.redis_clock();
        for (c, deadline) in commits {
            let (mode, core, config, seats): (&str, &str, &str, &[_]) = match &c.write {
                Write::Put {
                    replace,
                    core,
                    config,
                    seats,
                } => (
                    if *replace { "replace" } else { "put" },
                    core,
                    config.as_deref().unwrap_or(""),
                    seats,
                ),
                Write::Delete => ("delete", "", "", &[]),
            };
            let r = &c.records;
            cmd.arg(redis_ms(*deadline))
                .arg(c.epoch)
                .arg(if c.claim { "1" } else { "0" })
                .arg(mode)
                .arg(core)
                .arg(config)
                .arg(c.overdraft.entitlements)
                .arg(c.overdraft.seats)
                .arg(match r.in_overdraft {
                    Some(true) => "+",
                    Some(false) => "-",
                    None => "",
                })
                .arg(r.denied_at.map(|t| t.to_string()).unwrap_or_default())
                .arg(r.periods_expire_at)
                .arg(seats.len())
                .arg(c.events.len())
                .arg(r.history.len())
                .arg(r.periods.len())
                .arg(c.idempotency.len())
                .arg(c.id.as_str());
            for (seat, lease) in seats {
                cmd.arg(seat.as_str())
                    .arg(lease.map(|l| l.encode()).unwrap_or_default());
            }
            for (kind, json) in &c.events {
                cmd.arg(*kind).arg(json);
            }
            for w in &r.history {
                cmd.arg(w.hour_expire_at).arg(w.day_expire_at);
                for ops in [&w.hour_ops, &w.day_ops] {
                    cmd.arg(ops.len());
                    for op in ops {
                        match op {
                            FieldOp::Max(f, v) => cmd.arg("M").arg(*f).arg(*v),
                            FieldOp::Set(f, v) => cmd.arg("S").arg(*f).arg(*v),
                            FieldOp::Add(f, v) => cmd.arg("A").arg(f.as_str()).arg(*v),
                        };
                    }
                }
            }
            for p in &r.periods {
                cmd.arg(p);
            }
            for r in &c.idempotency {
                cmd.arg(&r.record);
            }
        }
    }

    fn add_load(&self, pipe: &mut redis::Pipeline, id: &EntitlementId, fence: bool) {
        pipe.cmd("EVALSHA")
            .arg(&self.load_sha)
            .arg(3)
            .arg(self.key(id, "epoch"))
            .arg(self.key(id, "state"))
            .arg(self.key(id, "seats"))
            .arg(if fence { "1" } else { "0" });
    }

    /// Sends one pipeline; answers whether the connection still works.
    async fn flush(&self, conn: MultiplexedConnection, queued: Vec<Queued>) -> bool {
        let started = Instant::now();
        let until = queued.iter().map(|q| q.deadline).max().unwrap_or(started) + GRACE;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let commits: Vec<(&Commit, Instant)> = queued
            .iter()
            .filter_map(|q| match &q.job {
                Job::Commit { commit, .. } => Some((&**commit, q.deadline)),
                _ => None,
            })
            .collect();
        if !commits.is_empty() {
            self.add_commits(&mut pipe, &commits);
        }
        for q in &queued {
            match &q.job {
                Job::Commit { .. } => {}
                Job::Load { id, fence, .. } => self.add_load(&mut pipe, id, *fence),
                Job::Ping { .. } => {
                    pipe.cmd("PING");
                }
                Job::StreamLength { .. } => {
                    pipe.cmd("XLEN").arg(self.stream());
                }
                Job::Totals { .. } => {
                    pipe.cmd("HMGET")
                        .arg(self.totals_key())
                        .arg("entitlements")
                        .arg("seats");
                }
            }
        }
        let ncommits = commits.len();
        drop(commits);
        let jobs: Vec<Job> = queued.into_iter().map(|q| q.job).collect();
        let expected = jobs.len() - ncommits + usize::from(ncommits > 0);
        let results = self
            .run_scripts(conn, &pipe, until)
            .await
            .map(|mut results| {
                // Spread the one reply of the commit script over its commits.
                if ncommits == 0 || results.len() != expected {
                    return results;
                }
                let per_commit: Vec<Result<Value, redis::RedisError>> = match results.remove(0) {
                    Ok(Value::Array(items)) if items.len() == ncommits => {
                        items.into_iter().map(Ok).collect()
                    }
                    Ok(other) => {
                        let e = redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "unexpected commit reply",
                            format!("{other:?}"),
                        ));
                        (0..ncommits).map(|_| Err(e.clone())).collect()
                    }
                    Err(e) => (0..ncommits).map(|_| Err(e.clone())).collect(),
                };
                let mut per_commit = per_commit.into_iter();
                let mut rest = results.into_iter();
                jobs.iter()
                    .map(|j| match j {
                        Job::Commit { .. } => per_commit.next(),
                        _ => rest.next(),
                    })
                    .map(|r| {
                        r.unwrap_or_else(|| {
                            Err(redis::RedisError::from((
                                redis::ErrorKind::Client,
                                "missing reply",
                            )))
                        })
                    })
                    .collect()
            });
        let healthy = results.is_ok();
        metrics::histogram!("headroom_store_write_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("headroom_store_batch_size").record(jobs.len() as f64);
        match results {
            Ok(results) if results.len() == jobs.len() => {
                for (job, result) in jobs.into_iter().zip(results) {
                    job.answer(result.map_err(|e| {
                        // Redis refuses a script declared with `#!lua` whole,
                        // before it runs, when it is out of memory.
                        if e.code() == Some("OOM") {
                            StoreError::Refused(e.to_string())
                        } else {
                            unavailable(e)
                        }
                    }));
                }
            }
            Ok(results) => {
                metrics::counter!("headroom_store_errors_total", "op" => "pipeline").increment(1);
                let msg = format!(
                    "pipeline answered {} results for {} calls",
                    results.len(),
                    jobs.len()
                );
                for job in jobs {
                    job.fail(unavailable(&msg));
                }
            }
            Err(e) => {
                metrics::counter!("headroom_store_errors_total", "op" => "pipeline").increment(1);
                tracing::warn!(error = %e, calls = jobs.len(), "store pipeline failed");
                for job in jobs {
                    job.fail(match &e {
                        StoreError::Timeout(d) => StoreError::Timeout(*d),
                        other => unavailable(other),
                    });
                }
            }
        }
        healthy
    }
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

fn parse_commit_reply(c: &Commit, v: Value) -> Result<CommitOutcome, StoreError> {
    let bad = || unavailable(format!("unexpected commit reply for {}", c.id));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let tag = items.first().and_then(text).ok_or_else(bad)?;
    match tag.as_str() {
        "ok" => {
            let epoch = items
                .get(1)
                .and_then(text)
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            Ok(CommitOutcome::Applied { epoch })
        }
        "fenced" => Ok(CommitOutcome::Fenced),
        // Refused for running past its deadline: nothing was written.
        "expired" => Err(StoreError::Refused(
            "the write arrived after its deadline".into(),
        )),
        "keys" => {
            let mut found = Vec::new();
            for pair in items[1..].chunks(2) {
                let idx: usize = text(&pair[0])
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(bad)?;
                let record = pair.get(1).and_then(text).ok_or_else(bad)?;
                let key: &IdempotencyKey =
                    &c.idempotency.get(idx.wrapping_sub(1)).ok_or_else(bad)?.key;
                found.push((key.clone(), record));
            }
            Ok(CommitOutcome::KeysExist(found))
        }
        _ => Err(bad()),
    }
}

async fn committer(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) {
    let flushes = Arc::new(Semaphore::new(shared.settings.max_flushes));
    let max_batch = shared.settings.max_batch;
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
                job = rx.recv() => job,
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
        let mut jobs = vec![first];
        // Whatever else is queued (an empty queue ends the batch).
        while jobs.len() < max_batch
            && let Ok(job) = rx.try_recv()
        {
            jobs.push(job);
        }
        // Jobs whose callers stopped waiting are never sent: a write that
        // was answered 503 must not land.
        let now = Instant::now();
        let (late, jobs): (Vec<Queued>, Vec<Queued>) =
            jobs.into_iter().partition(|q| q.deadline <= now);
        for q in late {
            q.job
                .fail(StoreError::Refused("waited past its deadline".into()));
        }
        let Some(until) = jobs.iter().map(|q| q.deadline).max() else {
            continue;
        };
        if broken.swap(false, Ordering::Relaxed) {
            held = None;
        }
        if held.is_none() {
            match shared.conn(until).await {
                Ok(c) => held = Some(c),
                Err(e) => {
                    metrics::counter!("headroom_store_errors_total", "op" => "connect")
                        .increment(1);
                    // Nothing was sent.
                    let msg = e.to_string();
                    for q in jobs {
                        q.job.fail(StoreError::Refused(msg.clone()));
                    }
                    continue;
                }
            }
        }
        let Some(conn) = held.as_ref().map(|c| MultiplexedConnection::clone(c)) else {
            continue;
        };
        let shared = shared.clone();
        let broken = broken.clone();
        tokio::spawn(async move {
            if !shared.flush(conn, jobs).await {
                broken.store(true, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    // Wait for the pipelines still in flight.
    let _ = flushes
        .acquire_many(shared.settings.max_flushes as u32)
        .await;
    let _ = done.send(());
}

/// The `(seat, lease)` pairs of an `HGETALL` reply of a seats hash.
fn seat_pairs(reply: Option<&Value>) -> Vec<(String, String)> {
    let Some(Value::Array(fields)) = reply else {
        return Vec::new();
    };
    fields
        .chunks(2)
        .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
        .collect()
}

fn parse_load_reply(id: &EntitlementId, value: Value) -> Result<Loaded, StoreError> {
    let corrupt = |cause: &str| StoreError::Corrupt {
        id: id.to_string(),
        cause: cause.to_string(),
    };
    let Value::Array(items) = value else {
        return Err(corrupt("load reply"));
    };
    let epoch: u64 = items
        .first()
        .and_then(text)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("epoch"))?;
    let Some(core) = items.get(1) else {
        return Ok(Loaded {
            epoch,
            claimed: false,
            state: None,
        });
    };
    let core = text(core).ok_or_else(|| corrupt("core"))?;
    let config = items
        .get(3)
        .and_then(text)
        .ok_or_else(|| corrupt("config"))?;
    let state = decode_state(
        id,
        core.as_bytes(),
        config.as_bytes(),
        seat_pairs(items.get(2)),
    )?;
    Ok(Loaded {
        epoch,
        claimed: true,
        state: Some(state),
    })
}

impl RedisStore {
    /// Queues a job and waits for its answer, at most `budget` (and the
    /// grace for a reply Redis sent in time).
    async fn submit<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, StoreError>>,
        budget: Duration,
    ) -> Result<T, StoreError> {
        let closed = || unavailable("store is shutting down");
        let deadline = Instant::now() + budget;
        self.queue()
            .send(Queued { job, deadline })
            .map_err(|_| closed())?;
        tokio::time::timeout_at((deadline + GRACE).into(), rx)
            .await
            .map_err(|_| StoreError::Timeout(self.shared.settings.timeout))?
            .map_err(|_| closed())?
    }

    async fn load_with(
        &self,
        id: &EntitlementId,
        fence: bool,
        budget: Duration,
    ) -> Result<Loaded, StoreError> {
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        let job = Job::Load {
            id: id.clone(),
            fence,
            reply,
        };
        let loaded = self.submit(job, rx, budget).await;
        metrics::histogram!("headroom_store_load_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        loaded
    }
}

impl RedisStore {
    /// Runs a read-only pipeline on a pooled connection within the store
    /// timeout (reports and history; not through the committers).
    async fn read<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        query(&self.shared.pool, self.shared.settings.timeout, pipe).await
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self, id: &EntitlementId) -> Result<Loaded, StoreError> {
        self.load_with(id, false, self.shared.settings.timeout)
            .await
    }

    async fn settle(&self, id: &EntitlementId) -> Result<Loaded, StoreError> {
        self.load_with(id, true, self.shared.settings.timeout / 4)
            .await
    }

    async fn commit(&self, commit: Commit) -> Result<CommitOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let budget = self.shared.settings.timeout * 3 / 4;
        self.submit(
            Job::Commit {
                commit: Box::new(commit),
                reply,
            },
            rx,
            budget,
        )
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let budget = self.shared.settings.timeout;
        self.submit(Job::Ping { reply }, rx, budget).await
    }

    async fn stream_length(&self) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        let budget = self.shared.settings.timeout;
        self.submit(Job::StreamLength { reply }, rx, budget).await
    }

    async fn overdraft_totals(&self) -> Result<OverdraftTotals, StoreError> {
        let (reply, rx) = oneshot::channel();
        let budget = self.shared.settings.timeout;
        self.submit(Job::Totals { reply }, rx, budget).await
    }

    async fn peek_many(
        &self,
        ids: &[EntitlementId],
    ) -> Result<Vec<Option<crate::domain::Entitlement>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(self.shared.key(id, "state"))
                .arg("core")
                .arg("config");
            pipe.cmd("HGETALL").arg(self.shared.key(id, "seats"));
        }
        let replies: Vec<Value> = self.read(&pipe).await?;
        ids.iter()
            .zip(replies.chunks(2))
            .map(|(id, pair)| {
                let (core, config) = match pair.first() {
                    Some(Value::Array(f)) => (f.first().and_then(text), f.get(1).and_then(text)),
                    _ => (None, None),
                };
                let Some(core) = core else { return Ok(None) };
                let config = config.unwrap_or_else(|| "{}".into());
                decode_state(
                    id,
                    core.as_bytes(),
                    config.as_bytes(),
                    seat_pairs(pair.get(1)),
                )
                .map(Some)
            })
            .collect()
    }

    async fn overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let min = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(self.shared.overdraft_index())
            .arg(min)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let (ids,): (Vec<String>,) = self.read(&pipe).await?;
        Ok(ids)
    }

    async fn denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let key = self.shared.denied_index();
        let mut pipe = redis::pipe();
        // Ties at the cursor's ms come first (by id, descending, as Redis
        // orders equal scores in reverse), then everything older.
        let max = match &after {
            Some((at, _)) => {
                pipe.cmd("ZRANGE")
                    .arg(&key)
                    .arg(at)
                    .arg(at)
                    .arg("BYSCORE")
                    .arg("REV")
                    .arg("WITHSCORES");
                format!("({at}")
            }
            None => "+inf".to_string(),
        };
        pipe.cmd("ZRANGE")
            .arg(&key)
            .arg(max)
            .arg(since)
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES");
        let pages: Vec<Vec<(String, f64)>> = self.read(&pipe).await?;
        let mut out = Vec::with_capacity(limit);
        for (i, page) in pages.into_iter().enumerate() {
            for (id, score) in page {
                let tie = i == 0 && after.is_some();
                if tie && after.as_ref().is_some_and(|(_, aid)| id >= *aid) {
                    continue;
                }
                if out.len() < limit {
                    out.push((id, score as i64));
                }
            }
        }
        Ok(out)
    }

    async fn history(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        starts: &[i64],
    ) -> Result<Vec<Option<BucketRecord>>, StoreError> {
        if starts.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for s in starts {
            pipe.cmd("HGETALL")
                .arg(self.shared.history_key(id, size, *s));
        }
        let records: Vec<HashMap<String, u64>> = self.read(&pipe).await?;
        Ok(records
            .into_iter()
            .map(|fields| {
                (!fields.is_empty()).then(|| {
                    BucketRecord::from_fields(fields.iter().map(|(k, v)| (k.as_str(), *v)))
                })
            })
            .collect())
    }

    async fn periods(&self, id: &EntitlementId, limit: usize) -> Result<Vec<String>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("LRANGE")
            .arg(self.shared.key(id, "periods"))
            .arg(0)
            .arg(limit - 1);
        let (records,): (Vec<String>,) = self.read(&pipe).await?;
        Ok(records)
    }

    fn durable(&self) -> bool {
        true
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
