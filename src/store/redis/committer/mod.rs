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

mod send;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use self::send::{Call, CallError, CallResult};
use super::keys::Keys;
use super::layout;
use super::link::{Conn, Link};
use super::reachability::Reachability;
use super::scripts::{
    COMMIT_LUA, CommitArgs, CommitLimits, LOAD_LUA, commit_call, is_plain, load_call,
    parse_commit_reply, parse_load_reply,
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

    fn answer(self, value: CallResult) {
        match self {
            Work::Commit { commit, reply } => {
                let outcome = value
                    .map_err(|e| e.into_store("commit"))
                    .and_then(|v| parse_commit_reply(&commit, v));
                if outcome.is_err() {
                    metrics::counter!("headroom_store_errors_total", "op" => "commit").increment(1);
                }
                let _ = reply.send(outcome);
            }
            Work::Load { id, reply, .. } => {
                let loaded = value
                    .map_err(|e| e.into_store("load"))
                    .and_then(|v| parse_load_reply(&id, v));
                if loaded.is_err() {
                    metrics::counter!("headroom_store_errors_total", "op" => "load").increment(1);
                }
                let _ = reply.send(loaded);
            }
            Work::Ping { reply } => {
                let _ = reply.send(value.map(|_| ()).map_err(|e| e.into_store("ping")));
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
    pub link: Link,
    pub settings: StoreSettings,
    idempotency_window: Duration,
    reach: Reachability,
    pub keys: Keys,
    pub commit_sha: String,
    pub load_sha: String,
    /// Requests sent: Redis round trips (on a cluster, one per node
    /// request).
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
        link: Link,
        settings: StoreSettings,
        idempotency_window: Duration,
        reach: Reachability,
    ) -> Self {
        CommitterCore {
            keys: Keys::new(settings.redis_prefix.clone(), settings.redis_buckets),
            link,
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

    /// A connection, with Redis's clock read and the key layout checked
    /// through it.
    async fn conn(&self, deadline: Instant) -> Result<Conn, StoreError> {
        let budget = deadline.saturating_duration_since(Instant::now());
        let mut conn = self.link.conn(budget).await?;
        let check = async {
            let before = unix_ms();
            let time: (i64, i64) = redis::cmd("TIME")
                .query_async(&mut conn)
                .await
                .map_err(|e| StoreError::redis("connect", e))?;
            let after = unix_ms();
            let redis_ms = time.0 * 1000 + time.1 / 1000;
            self.clock_offset_ms
                .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
            layout::check(&mut conn, &self.keys).await
        };
        tokio::time::timeout_at(deadline.into(), check)
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

    /// The calls for `queued`, which it puts in order: the commits first,
    /// then the other work as queued. The commits go in one commit-script
    /// call on a standalone Redis, plain ones ([`is_plain`]) first, then the
    /// others by bucket; on a cluster in one call per bucket (per hash
    /// slot), plain ones first in each. Answers
    /// the commits each call carries.
    fn calls(&self, queued: &mut Vec<Queued>) -> (Vec<Call>, Vec<usize>) {
        // Each commit's bucket, found once; commits first, in the order of
        // their calls (a stable sort: the rest stay as queued).
        let cluster = self.link.is_cluster();
        let mut tagged: Vec<(Option<usize>, Queued)> = queued
            .drain(..)
            .map(|q| match &q.work {
                Work::Commit { commit, .. } => (Some(self.keys.bucket_of(&commit.id)), q),
                _ => (None, q),
            })
            .collect();
        tagged.sort_by_key(|(b, q)| match (b, &q.work) {
            (Some(b), Work::Commit { commit, .. }) => {
                (false, if cluster { *b } else { 0 }, !is_plain(commit), *b)
            }
            _ => (true, 0, false, 0),
        });
        let buckets: Vec<Option<usize>> = tagged.iter().map(|(b, _)| *b).collect();
        queued.extend(tagged.into_iter().map(|(_, q)| q));
        let redis_ms = self.redis_clock();
        let commits: Vec<CommitArgs<'_>> = queued
            .iter()
            .zip(&buckets)
            .filter_map(|(q, b)| match (&q.work, b) {
                (Work::Commit { commit, .. }, Some(b)) => {
                    Some(CommitArgs::of(commit, *b, redis_ms(q.deadline)))
                }
                _ => None,
            })
            .collect();
        let limits = CommitLimits {
            stream_maxlen: self
                .settings
                .stream_maxlen
                .div_ceil(self.keys.buckets() as u64),
            idempotency_ttl_ms: self.idempotency_window.as_millis() as u64,
        };
        let groups: Vec<&[CommitArgs<'_>]> = if commits.is_empty() {
            Vec::new()
        } else if cluster {
            commits.chunk_by(|a, b| a.bucket == b.bucket).collect()
        } else {
            vec![&commits[..]]
        };
        let mut calls: Vec<Call> = groups
            .iter()
            .map(|g| Call {
                cmd: commit_call(&self.commit_sha, &self.keys, &limits, g),
                write: true,
            })
            .collect();
        for q in queued.iter() {
            match &q.work {
                Work::Commit { .. } => {}
                Work::Load { id, fence, .. } => calls.push(Call {
                    cmd: load_call(&self.load_sha, &self.keys, id, *fence),
                    write: true,
                }),
                Work::Ping { .. } => calls.push(Call {
                    cmd: redis::cmd("PING"),
                    write: false,
                }),
            }
        }
        (calls, groups.iter().map(|g| g.len()).collect())
    }

    /// Sends one round of work; answers whether the connection still works.
    async fn flush(&self, conn: Conn, queued: Vec<Queued>) -> bool {
        let started = Instant::now();
        let until = queued.iter().map(|q| q.deadline).max().unwrap_or(started) + GRACE;
        let wait_by = queued.iter().map(|q| q.deadline).min().unwrap_or(started);
        let mut queued = queued;
        let (calls, groups) = self.calls(&mut queued);
        let work: Vec<Work> = queued.into_iter().map(|q| q.work).collect();
        let results = self.send(conn, &calls, (wait_by, until)).await;
        match &results {
            Err(e) => self.link.failed(e),
            Ok(r) => {
                if let Some(e) = r.iter().find_map(|r| match r {
                    Err(CallError::Redis(e)) if e.is_io_error() || e.is_timeout() => Some(e),
                    _ => None,
                }) {
                    self.link.failed(&StoreError::redis("pipeline", e.clone()));
                }
            }
        }
        let healthy = results.is_ok();
        match &results {
            Ok(_) => self.reach.answered(),
            Err(e) => self.reach.failed(e),
        }
        metrics::histogram!("headroom_store_write_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("headroom_store_batch_size").record(work.len() as f64);
        match results.and_then(|r| spread_replies(r, &work, &groups)) {
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

/// One reply per piece of work: each commit-script call's reply is spread
/// over the commits it carried (`groups`: how many each call carried).
fn spread_replies(
    results: Vec<CallResult>,
    work: &[Work],
    groups: &[usize],
) -> Result<Vec<CallResult>, StoreError> {
    let ncommits: usize = groups.iter().sum();
    let expected = work.len() - ncommits + groups.len();
    if results.len() != expected {
        return Err(StoreError::reply(
            "pipeline",
            format!("{} results for {expected} calls", results.len()),
        ));
    }
    let mut results = results.into_iter();
    let mut per_commit: Vec<CallResult> = Vec::with_capacity(ncommits);
    for (&n, result) in groups.iter().zip(results.by_ref()) {
        match result {
            Ok(Value::Array(items)) if items.len() == n => {
                per_commit.extend(items.into_iter().map(Ok))
            }
            Ok(other) => {
                return Err(StoreError::reply(
                    "commit",
                    format!("{n} commits answered {other:?}"),
                ));
            }
            Err(e) => per_commit.extend((0..n).map(|_| Err(e.clone()))),
        }
    }
    let mut per_commit = per_commit.into_iter();
    Ok(work
        .iter()
        .filter_map(|w| match w {
            Work::Commit { .. } => per_commit.next(),
            _ => results.next(),
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
    let mut held: Option<Conn> = None;
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
        let Some(conn) = held.clone() else {
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
