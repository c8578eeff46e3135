//! The fault-injection suite: real load against the tracker binary on a
//! private Redis while a driver kills and restarts the tracker, kills, stops
//! and restarts Redis, blocks it (`CLIENT PAUSE`, `DEBUG SLEEP`) past the
//! store timeout and fills it to `maxmemory`. In cluster mode the same
//! faults hit one primary of a private Redis Cluster (with replicas, a
//! killed primary's replica takes over before it comes back, as a replica),
//! and slots are moved between primaries under the load (`reshard`).
//!
//! Every call carries an idempotency key and the client keeps a ledger of
//! what it was answered. An invariant checker reads the stored state and the
//! event stream throughout and flags any value above a hard cap. Afterwards
//! every call is sent again with its key:
//! - an acknowledged call must come back as a replay of the same decision
//!   (nothing acknowledged was lost);
//! - a call answered `503` must not come back as a replay (a `503` left no
//!   trace); calls that got no answer at all may have landed or not;
//! - each entitlement's counter must equal the units of the calls whose
//!   decision, first or on retry, was a grant.
//!
//! Shared by the `faults` command (longer, prints the fault matrix) and the
//! test suite (short, in CI).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::Conn;
use headroom_test_support::{RedisCluster, RedisServer, Tracker};

const ADMIN: &str = "Bearer faults-admin";
const CLIENT: &str = "Bearer faults-client";
const PREFIX: &str = "faults";
/// Capped entitlements (every other one) reach their cap during the run.
const CAP_INCLUDED: u64 = 150;
const CAP_HARD: u64 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the tracker, start it again.
    KillTracker,
    /// SIGKILL Redis, start it again (its AOF replays).
    KillRedis,
    /// Stop Redis cleanly (SIGTERM), start it again.
    StopRedis,
    /// `CLIENT PAUSE … ALL` past the store timeout.
    PauseRedis,
    /// `DEBUG SLEEP` past the store timeout.
    SleepRedis,
    /// Fill Redis to `maxmemory` (noeviction), then free it.
    MaxMemory,
    /// Move half of a primary's slots, with their keys, to another primary
    /// (`redis-cli --cluster reshard`). Cluster mode only.
    Reshard,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillTracker,
        Fault::KillRedis,
        Fault::StopRedis,
        Fault::PauseRedis,
        Fault::SleepRedis,
        Fault::MaxMemory,
    ];

    /// Every fault, on a cluster.
    pub const CLUSTER: [Fault; 7] = [
        Fault::KillTracker,
        Fault::Reshard,
        Fault::KillRedis,
        Fault::StopRedis,
        Fault::PauseRedis,
        Fault::SleepRedis,
        Fault::MaxMemory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillTracker => "tracker SIGKILL + restart",
            Fault::KillRedis => "Redis SIGKILL + restart",
            Fault::StopRedis => "Redis stop (SIGTERM) + restart",
            Fault::PauseRedis => "Redis CLIENT PAUSE",
            Fault::SleepRedis => "Redis DEBUG SLEEP",
            Fault::MaxMemory => "Redis at maxmemory",
            Fault::Reshard => "slots moved between primaries",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    /// The tracker binary.
    pub bin: PathBuf,
    pub entitlements: usize,
    pub connections: usize,
    /// `--redis-timeout` of the tracker.
    pub redis_timeout: Duration,
    /// Load before each fault, and after the last.
    pub steady: Duration,
    /// How long each fault lasts.
    pub outage: Duration,
    pub faults: Vec<Fault>,
    pub topology: Topology,
    pub progress: bool,
}

/// What the tracker runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Standalone,
    /// A Redis Cluster of `primaries` with `replicas` each; the tracker
    /// waits for that many replicas to acknowledge each write
    /// (`HEADROOM_REDIS_WAIT_REPLICAS`).
    Cluster {
        primaries: usize,
        replicas: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Answer {
    /// A decision (200 or 429), with its body.
    Decided {
        status: u16,
        body: Bytes,
    },
    Unavailable,
    /// 504: the write was sent and not confirmed; it may have landed.
    Unknown,
    Other(u16),
    /// No answer at all (the tracker was killed, the connection broke).
    Silent,
}

struct Call {
    entitlement: usize,
    amount: u64,
    key: String,
    answer: Answer,
    started: Instant,
    latency: Duration,
}

/// How a set of calls was answered.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Answers {
    pub calls: u64,
    pub acknowledged: u64,
    pub unavailable: u64,
    pub unknown: u64,
    pub no_answer: u64,
    pub other_errors: u64,
    /// Slowest `503` and `504`.
    pub max_503_ms: f64,
    pub max_504_ms: f64,
}

impl Answers {
    fn add(&mut self, c: &Call) {
        let ms = c.latency.as_secs_f64() * 1000.0;
        self.calls += 1;
        match c.answer {
            Answer::Decided { .. } => self.acknowledged += 1,
            Answer::Unavailable => {
                self.unavailable += 1;
                self.max_503_ms = self.max_503_ms.max(ms);
            }
            Answer::Unknown => {
                self.unknown += 1;
                self.max_504_ms = self.max_504_ms.max(ms);
            }
            Answer::Silent => self.no_answer += 1,
            Answer::Other(_) => self.other_errors += 1,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct FaultResult {
    pub fault: String,
    /// From the fault's start until it was healed.
    pub window_ms: u64,
    /// The calls in flight from the fault's start until the first
    /// acknowledged call after it was healed.
    #[serde(flatten)]
    pub answers: Answers,
    /// From healing until the first call started afterwards was acknowledged.
    pub recovery_ms: Option<f64>,
    /// Entitlements whose keys a resharding moved to another primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_entitlements: Option<u64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SuiteReport {
    /// `standalone`, or `cluster P+R` (P primaries, R replicas each).
    pub topology: String,
    pub elapsed_s: f64,
    #[serde(flatten)]
    pub answers: Answers,
    pub redis_timeout_ms: u64,
    pub faults: Vec<FaultResult>,
    /// Acknowledged calls whose retry was not a replay of the same decision.
    pub lost: Vec<String>,
    /// Calls answered `503` whose retry was a replay: applied after all.
    pub applied_after_503: Vec<String>,
    /// Calls answered `504` (outcome unknown) or not at all (the tracker
    /// was killed) that had landed: allowed, their retry replays.
    pub unknown_but_applied: u64,
    /// Calls that could not be settled by retrying.
    pub unsettled: Vec<String>,
    /// Entitlements whose counter is not the sum of granted units.
    pub mismatches: Vec<String>,
    /// Values above a hard cap, seen by the client, the checker or at the end.
    pub cap_violations: Vec<String>,
    /// State reads and stream events the invariant checker looked at.
    pub states_checked: u64,
    pub events_checked: u64,
    pub ok: bool,
}

fn entitlement(i: usize) -> String {
    format!("f-{i}")
}

fn capped(i: usize) -> bool {
    i.is_multiple_of(2)
}

fn config(i: usize) -> String {
    if capped(i) {
        format!(
            r#"{{"seats": {{"purchased": 5, "hard_cap": 8}},
                "features": {{"api": {{"included": {CAP_INCLUDED}, "hard_cap": {CAP_HARD}, "thresholds": [50, 100]}}}}}}"#
        )
    } else {
        r#"{"features": {"api": {"included": 1000000000}}}"#.to_string()
    }
}

fn usage_path(i: usize) -> String {
    format!("/v1/entitlements/{}/usage", entitlement(i))
}

fn usage_body(amount: u64, key: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"feature": "api", "amount": {amount}, "idempotency_key": "{key}"}}"#
    ))
}

fn used_in(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("used")?
        .as_u64()
}

/// One connection's calls until `stop`.
async fn client(
    worker: usize,
    plan: Arc<Plan>,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    cap_violations: Arc<Mutex<Vec<String>>>,
) -> Vec<Call> {
    let mut rng = SmallRng::seed_from_u64(worker as u64 + 1);
    let mut conn: Option<Conn> = None;
    let mut calls = Vec::new();
    let patience = plan.redis_timeout * 4 + Duration::from_secs(2);
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = conn.as_mut() else {
            match Conn::open(addr).await {
                Ok(c) => conn = Some(c),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            continue;
        };
        let i = rng.random_range(0..plan.entitlements);
        let amount = rng.random_range(1..=3u64);
        let key = format!("w{worker}-{}", calls.len());
        let started = Instant::now();
        let path = usage_path(i);
        let sent = c.call("POST", &path, Some(CLIENT), usage_body(amount, &key));
        let answer = match tokio::time::timeout(patience, sent).await {
            Ok(Ok((status @ (200 | 429), body))) => Answer::Decided { status, body },
            Ok(Ok((503, _))) => Answer::Unavailable,
            Ok(Ok((504, _))) => Answer::Unknown,
            Ok(Ok((status, _))) => Answer::Other(status),
            _ => {
                conn = None;
                Answer::Silent
            }
        };
        if let Answer::Decided { status: 200, body } = &answer
            && capped(i)
            && used_in(body).is_some_and(|u| u > CAP_HARD)
        {
            lock(&cap_violations).push(format!("{key}: granted with {:?}", used_in(body)));
        }
        let failed = !matches!(answer, Answer::Decided { .. });
        calls.push(Call {
            entitlement: i,
            amount,
            key,
            answer,
            started,
            latency: started.elapsed(),
        });
        if failed {
            // As a client would on 503 / no answer: back off a little.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    calls
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens a connection for the checker: to the Redis, or one that follows
/// the cluster's slots.
type Opener = Box<dyn Fn() -> redis::RedisResult<Box<dyn redis::ConnectionLike + Send>> + Send>;

/// Reads the stored state and the streams every 50 ms until `stop`; flags
/// any counter or event above a hard cap.
fn checker(
    open: Opener,
    entitlements: usize,
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
    states: Arc<AtomicU64>,
    events: Arc<AtomicU64>,
) {
    let keys = headroom::store::Keys::new(PREFIX, headroom::store::DEFAULT_BUCKETS);
    let mut last_ids = vec!["0-0".to_string(); keys.buckets()];
    let mut conn: Option<Box<dyn redis::ConnectionLike + Send>> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if conn.is_none() {
            conn = open().ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        let seen = (&mut last_ids[..], &*states, &*events);
        if check_once(&mut **c, &keys, entitlements, seen, &violations).is_err() {
            // Redis is down or blocked; a timed-out connection is not reused.
            conn = None;
        }
    }
}

/// Where the checker has read each bucket's stream to, and what it has
/// checked so far (states, events).
type Seen<'a> = (&'a mut [String], &'a AtomicU64, &'a AtomicU64);

fn check_once(
    c: &mut dyn redis::ConnectionLike,
    keys: &headroom::store::Keys,
    entitlements: usize,
    (last_ids, states, events): Seen<'_>,
    violations: &Mutex<Vec<String>>,
) -> redis::RedisResult<()> {
    for i in (0..entitlements).filter(|i| capped(*i)) {
        let id = entitlement(i);
        let eid = headroom::domain::EntitlementId::parse(&id).expect("a valid id");
        let core: Option<String> = redis::cmd("HGET")
            .arg(keys.state(&eid))
            .arg("core")
            .query(c)?;
        let seats: u64 = redis::cmd("HLEN").arg(keys.seats(&eid)).query(c)?;
        states.fetch_add(1, Ordering::Relaxed);
        let used = core
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["meters"]["api"]["used"].as_u64())
            .unwrap_or(0);
        if used > CAP_HARD || seats > 8 {
            lock(violations).push(format!("{id}: stored used {used}, seats {seats}"));
        }
    }
    type Entries = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;
    // Each bucket's stream on its own: on a cluster they live on
    // different nodes.
    for (stream, last_id) in keys.all_events().iter().zip(last_ids.iter_mut()) {
        loop {
            let read: Option<Entries> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("STREAMS")
                .arg(stream)
                .arg(&*last_id)
                .query(c)?;
            let entries: Vec<_> = read
                .unwrap_or_default()
                .into_iter()
                .flat_map(|(_, e)| e)
                .collect();
            let Some((last, _)) = entries.last() else {
                break;
            };
            *last_id = last.clone();
            for (id, fields) in &entries {
                check_event(id, fields, events, violations);
            }
        }
    }
    Ok(())
}

fn check_event(
    id: &str,
    fields: &[(String, String)],
    events: &AtomicU64,
    violations: &Mutex<Vec<String>>,
) {
    events.fetch_add(1, Ordering::Relaxed);
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let ent = get("entitlement").unwrap_or("");
    let Some(i) = ent.strip_prefix("f-").and_then(|n| n.parse::<usize>().ok()) else {
        return;
    };
    let data = get("event")
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .map(|v| v["data"].clone())
        .unwrap_or_default();
    let used = data["used"].as_u64().unwrap_or(0);
    let in_use = data["in_use"].as_u64().unwrap_or(0);
    if capped(i) && (used > CAP_HARD || in_use > 8) {
        lock(violations).push(format!("{ent}: event {id} {data}"));
    }
}

/// What Redis says it uses (`used_memory`).
fn used_memory(c: &mut redis::Connection) -> redis::RedisResult<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query(c)?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

/// Fills Redis to a `maxmemory` just above what it uses now, with keys
/// `filler:{tag}:n` (on a cluster node, `tag` hashes to one of its slots),
/// until it refuses a write; then lowers `maxmemory` below what it uses,
/// so that it stays full (a primary's replication buffers come and go,
/// and they do not count).
fn fill(redis: &RedisServer, tag: &str) -> redis::RedisResult<usize> {
    let mut c = redis.conn();
    redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "noeviction"])
        .query::<()>(&mut c)?;
    let used = used_memory(&mut c)?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 4 * 1024 * 1024)
        .query::<()>(&mut c)?;
    let filler = vec![b'x'; 64 * 1024];
    let mut n = 0;
    while n < 10_000 {
        let set: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler:{{{tag}}}:{n}"))
            .arg(&filler)
            .query(&mut c);
        match set {
            Err(e) if e.code() == Some("OOM") => break,
            Err(e) => return Err(e),
            Ok(()) => n += 1,
        }
    }
    let used = used_memory(&mut c)?;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used.saturating_sub(1024 * 1024).max(1))
        .query::<()>(&mut c)?;
    Ok(n)
}

fn unfill(redis: &RedisServer, tag: &str, keys: usize) -> redis::RedisResult<()> {
    let mut c = redis.conn();
    for n in 0..keys {
        redis::cmd("DEL")
            .arg(format!("filler:{{{tag}}}:{n}"))
            .query::<()>(&mut c)?;
    }
    redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"])
        .query::<()>(&mut c)
}

/// When each fault started and was healed.
struct Window {
    fault: Fault,
    start: Instant,
    healed: Instant,
    moved: Option<u64>,
}

/// The Redis the tracker runs on.
enum Backend {
    Standalone(RedisServer),
    Cluster {
        cluster: RedisCluster,
        replicas: usize,
    },
}

impl Backend {
    fn start(topology: Topology) -> Backend {
        match topology {
            Topology::Standalone => Backend::Standalone(RedisServer::start()),
            Topology::Cluster {
                primaries,
                replicas,
            } => Backend::Cluster {
                cluster: RedisCluster::start(primaries, replicas),
                replicas,
            },
        }
    }

    /// The tracker's Redis settings.
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Backend::Standalone(r) => vec![("HEADROOM_REDIS_URL", r.url())],
            Backend::Cluster { cluster, replicas } => vec![
                ("HEADROOM_REDIS_CLUSTER", cluster.seeds()),
                ("HEADROOM_REDIS_WAIT_REPLICAS", replicas.to_string()),
            ],
        }
    }

    fn opener(&self) -> Opener {
        let timeouts = (Duration::from_millis(200), Duration::from_millis(300));
        match self {
            Backend::Standalone(r) => {
                let url = r.url();
                Box::new(move || {
                    let c = redis::Client::open(url.as_str())?
                        .get_connection_with_timeout(timeouts.0)?;
                    c.set_read_timeout(Some(timeouts.1))?;
                    Ok(Box::new(c) as Box<dyn redis::ConnectionLike + Send>)
                })
            }
            Backend::Cluster { cluster, .. } => {
                let urls = cluster.urls();
                Box::new(move || {
                    let c = redis::cluster::ClusterClient::builder(urls.clone())
                        .connection_timeout(timeouts.0)
                        .response_timeout(timeouts.1)
                        .build()?
                        .get_connection()?;
                    Ok(Box::new(c) as Box<dyn redis::ConnectionLike + Send>)
                })
            }
        }
    }

    /// The node a fault hits: the Redis, or the primary serving most slots.
    fn target(&mut self) -> anyhow::Result<&mut RedisServer> {
        match self {
            Backend::Standalone(r) => Ok(r),
            Backend::Cluster { cluster, .. } => {
                let i = cluster
                    .serving_primary()
                    .ok_or_else(|| anyhow::anyhow!("no primary serves slots"))?;
                Ok(&mut cluster.nodes[i])
            }
        }
    }

    /// Back to what it was before a fault: every node up, the cluster ok,
    /// every primary with its replicas.
    fn settled(&self) {
        if let Backend::Cluster { cluster, replicas } = self {
            cluster.wait_until_ok(cluster.nodes.len());
            cluster.wait_for_replicas(*replicas);
        }
    }
}

/// A hash tag whose keys the node stores: on a cluster, one that hashes
/// to one of the node's `slots`.
fn tag_on(node: &RedisServer, slots: Option<Vec<(u16, u16)>>) -> redis::RedisResult<String> {
    let Some(slots) = slots else {
        return Ok("x".into());
    };
    let mut c = node.conn();
    for n in 0..100_000 {
        let tag = format!("t{n}");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&tag)
            .query(&mut c)?;
        if slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)) {
            return Ok(tag);
        }
    }
    Err((redis::ErrorKind::Client, "no slot found on the node").into())
}

/// Kills (or stops) the target Redis node and starts it again after the
/// outage; on a cluster with replicas, after a replica took over.
fn down_and_up(
    plan: &Plan,
    backend: &mut Backend,
    stop: impl FnOnce(&mut RedisServer),
) -> anyhow::Result<()> {
    let failover = matches!(backend, Backend::Cluster { replicas, .. } if *replicas > 0);
    let node = backend.target()?;
    let port = node.port;
    stop(node);
    std::thread::sleep(plan.outage);
    if failover && let Backend::Cluster { cluster, .. } = &*backend {
        cluster.wait_for_failover_of(port);
    }
    backend
        .target_port(port)
        .ok_or_else(|| anyhow::anyhow!("node {port} gone"))?
        .restart();
    backend.settled();
    Ok(())
}

impl Backend {
    fn target_port(&mut self, port: u16) -> Option<&mut RedisServer> {
        match self {
            Backend::Standalone(r) => Some(r),
            Backend::Cluster { cluster, .. } => cluster.nodes.iter_mut().find(|n| n.port == port),
        }
    }
}

/// Moves half of the target primary's slots to another primary; answers
/// how many of the entitlements moved.
fn reshard(plan: &Plan, backend: &mut Backend) -> anyhow::Result<u64> {
    let Backend::Cluster { cluster, .. } = &*backend else {
        anyhow::bail!("a resharding needs a cluster (--cluster-primaries)");
    };
    let top = cluster.topology();
    let from = top
        .iter()
        .filter(|n| n.primary && !n.failed)
        .max_by_key(|n| n.slot_count())
        .ok_or_else(|| anyhow::anyhow!("no primary"))?;
    let to = top
        .iter()
        .filter(|n| n.primary && !n.failed && n.port != from.port)
        .min_by_key(|n| n.slot_count())
        .ok_or_else(|| anyhow::anyhow!("one primary only"))?;
    let keys = headroom::store::Keys::new(PREFIX, headroom::store::DEFAULT_BUCKETS);
    let mut c = cluster.nodes[0].conn();
    let mut slots = Vec::new();
    for i in 0..plan.entitlements {
        let eid = headroom::domain::EntitlementId::parse(&entitlement(i)).expect("a valid id");
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(keys.state(&eid))
            .query(&mut c)?;
        slots.push(slot);
    }
    cluster.reshard(from.port, to.port, from.slot_count() / 2)?;
    let after = cluster.topology();
    let moved = slots
        .iter()
        .filter(|s| RedisCluster::owner_of(&top, **s) != RedisCluster::owner_of(&after, **s))
        .count();
    backend.settled();
    Ok(moved as u64)
}

fn inject(
    fault: Fault,
    plan: &Plan,
    backend: &mut Backend,
    tracker: &mut Tracker,
) -> anyhow::Result<Option<u64>> {
    match fault {
        Fault::KillTracker => {
            tracker.kill();
            std::thread::sleep(plan.outage);
            tracker.restart()?;
        }
        Fault::KillRedis => down_and_up(plan, backend, RedisServer::kill)?,
        Fault::StopRedis => down_and_up(plan, backend, RedisServer::stop)?,
        Fault::PauseRedis => {
            redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(plan.outage.as_millis() as u64)
                .arg("ALL")
                .query::<()>(&mut backend.target()?.conn())?;
            std::thread::sleep(plan.outage);
        }
        Fault::SleepRedis => {
            // Blocks this connection as well as every other.
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(plan.outage.as_secs_f64())
                .query(&mut backend.target()?.conn());
            backend.settled();
        }
        Fault::MaxMemory => {
            let port = backend.target()?.port;
            let slots = match &*backend {
                Backend::Standalone(_) => None,
                Backend::Cluster { cluster, .. } => cluster
                    .topology()
                    .into_iter()
                    .find(|n| n.port == port)
                    .map(|n| n.slots),
            };
            let node = backend.target()?;
            let tag = tag_on(node, slots)?;
            let keys = fill(node, &tag)?;
            std::thread::sleep(plan.outage);
            unfill(node, &tag, keys)?;
        }
        Fault::Reshard => return Ok(Some(reshard(plan, backend)?)),
    }
    Ok(None)
}

async fn setup(addr: std::net::SocketAddr, entitlements: usize) -> anyhow::Result<()> {
    let mut conn = Conn::open(addr).await?;
    for i in 0..entitlements {
        let path = format!("/v1/entitlements/{}", entitlement(i));
        let (status, body) = conn
            .call("PUT", &path, Some(ADMIN), Bytes::from(config(i)))
            .await?;
        anyhow::ensure!(status < 300, "PUT {path}: {status} {body:?}");
    }
    Ok(())
}

/// Sends `call` again with its key until it is decided: `(status, replayed, body)`.
async fn retry(
    conn: &mut Option<Conn>,
    addr: std::net::SocketAddr,
    call: &Call,
) -> Option<(u16, bool, Bytes)> {
    for _ in 0..100 {
        if conn.is_none() {
            *conn = Conn::open(addr).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            let body = usage_body(call.amount, &call.key);
            match c
                .call_replayed("POST", &usage_path(call.entitlement), Some(CLIENT), body)
                .await
            {
                Ok((status @ (200 | 429), replayed, body)) => {
                    return Some((status, replayed, body));
                }
                Ok(_) => {}
                Err(_) => *conn = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// What settling the ledger found, per call.
enum Settled {
    Granted(u64),
    Denied,
    Unsettled,
}

async fn settle(
    addr: std::net::SocketAddr,
    calls: Vec<Call>,
    report: Arc<Mutex<SuiteReport>>,
) -> Vec<(usize, Settled)> {
    let mut conn = None;
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        let again = retry(&mut conn, addr, &call).await;
        let mut r = lock(&report);
        let settled = match (&call.answer, again) {
            (_, None) => {
                r.unsettled.push(call.key.clone());
                Settled::Unsettled
            }
            (Answer::Decided { status, body }, Some((s2, replayed, b2))) => {
                if !replayed || s2 != *status || b2 != *body {
                    r.lost.push(format!(
                        "{}: answered {status} {}; retry {s2} (replayed: {replayed}) {}",
                        call.key,
                        String::from_utf8_lossy(body),
                        String::from_utf8_lossy(&b2)
                    ));
                }
                if *status == 200 {
                    Settled::Granted(call.amount)
                } else {
                    Settled::Denied
                }
            }
            (answer, Some((s2, replayed, _))) => {
                if replayed && *answer == Answer::Unavailable {
                    r.applied_after_503.push(call.key.clone());
                }
                if replayed && matches!(answer, Answer::Silent | Answer::Unknown) {
                    r.unknown_but_applied += 1;
                }
                if s2 == 200 {
                    Settled::Granted(call.amount)
                } else {
                    Settled::Denied
                }
            }
        };
        out.push((call.entitlement, settled));
    }
    out
}

/// Runs the plan: load, every fault in turn, then the ledger.
pub async fn run(plan: Plan) -> anyhow::Result<SuiteReport> {
    if let Some(f) = plan.faults.iter().find(|f| **f == Fault::Reshard)
        && plan.topology == Topology::Standalone
    {
        anyhow::bail!("{} needs a cluster", f.name());
    }
    let mut backend = Backend::start(plan.topology);
    let timeout = format!("{}ms", plan.redis_timeout.as_millis());
    let mut env = backend.env();
    env.extend([
        ("HEADROOM_REDIS_PREFIX", PREFIX.to_string()),
        ("HEADROOM_REDIS_TIMEOUT", timeout),
        (
            "HEADROOM_ADMIN_TOKENS",
            ADMIN.trim_start_matches("Bearer ").to_string(),
        ),
        (
            "HEADROOM_CLIENT_TOKENS",
            CLIENT.trim_start_matches("Bearer ").to_string(),
        ),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut tracker = Tracker::start(&plan.bin, &env)?;
    let addr = tracker.addr();
    setup(addr, plan.entitlements).await?;

    let plan = Arc::new(plan);
    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let (states, events) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let checker = {
        let (open, n, stop, v) = (
            backend.opener(),
            plan.entitlements,
            stop.clone(),
            violations.clone(),
        );
        let (s, e) = (states.clone(), events.clone());
        std::thread::spawn(move || checker(open, n, stop, v, s, e))
    };
    let started = Instant::now();
    let clients: Vec<_> = (0..plan.connections)
        .map(|w| {
            tokio::spawn(client(
                w,
                plan.clone(),
                addr,
                stop.clone(),
                violations.clone(),
            ))
        })
        .collect();

    // The driver blocks (kills, waits, sleeps): a thread of its own.
    let driver = {
        let plan = plan.clone();
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<(Vec<Window>, Backend, Tracker)> {
            let mut windows = Vec::new();
            for &fault in &plan.faults {
                std::thread::sleep(plan.steady);
                if plan.progress {
                    eprintln!("fault: {}", fault.name());
                }
                let start = Instant::now();
                let injected = inject(fault, &plan, &mut backend, &mut tracker);
                windows.push(Window {
                    fault,
                    start,
                    healed: Instant::now(),
                    moved: injected.as_ref().ok().copied().flatten(),
                });
                injected?;
            }
            std::thread::sleep(plan.steady);
            stop.store(true, Ordering::Relaxed);
            Ok((windows, backend, tracker))
        })
    };
    let driven = tokio::task::spawn_blocking(move || driver.join()).await?;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for c in clients {
        calls.extend(c.await?);
    }
    let _ = checker.join();
    let (windows, backend, tracker) =
        driven.map_err(|_| anyhow::anyhow!("the fault driver panicked"))??;
    let elapsed = started.elapsed();
    if plan.progress {
        eprintln!(
            "load stopped after {} calls; settling the ledger",
            calls.len()
        );
    }

    let mut report = SuiteReport {
        topology: match plan.topology {
            Topology::Standalone => "standalone".into(),
            Topology::Cluster {
                primaries,
                replicas,
            } => format!("cluster {primaries}+{replicas}"),
        },
        elapsed_s: elapsed.as_secs_f64(),
        redis_timeout_ms: plan.redis_timeout.as_millis() as u64,
        states_checked: states.load(Ordering::Relaxed),
        events_checked: events.load(Ordering::Relaxed),
        ..SuiteReport::default()
    };
    count(&calls, &mut report, &windows);

    // The ledger: every call again with its key, over a few connections.
    let report = Arc::new(Mutex::new(report));
    let mut shards: Vec<Vec<Call>> = (0..8).map(|_| Vec::new()).collect();
    for (n, call) in calls.into_iter().enumerate() {
        shards[n % 8].push(call);
    }
    let tasks: Vec<_> = shards
        .into_iter()
        .map(|s| tokio::spawn(settle(addr, s, report.clone())))
        .collect();
    let mut granted: HashMap<usize, u64> = HashMap::new();
    for t in tasks {
        for (i, s) in t.await? {
            if let Settled::Granted(units) = s {
                *granted.entry(i).or_default() += units;
            }
        }
    }
    let mut report = Arc::try_unwrap(report)
        .map_err(|_| anyhow::anyhow!("settling still running"))?
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let mut conn = Conn::open(addr).await?;
    for i in 0..plan.entitlements {
        let id = entitlement(i);
        let (status, body) = conn
            .call(
                "GET",
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                Bytes::new(),
            )
            .await?;
        anyhow::ensure!(status == 200, "GET {id}: {status}");
        let view: serde_json::Value = serde_json::from_slice(&body)?;
        let used = view["features"]["api"]["used"].as_u64().unwrap_or(0);
        let expected = granted.get(&i).copied().unwrap_or(0);
        if used != expected {
            report.mismatches.push(format!(
                "{id}: used {used}, granted calls add up to {expected}"
            ));
        }
        if capped(i) && used > CAP_HARD {
            report
                .cap_violations
                .push(format!("{id}: used {used} at the end"));
        }
    }
    report.cap_violations.extend(lock(&violations).drain(..));
    report.ok = report.lost.is_empty()
        && report.applied_after_503.is_empty()
        && report.unsettled.is_empty()
        && report.mismatches.is_empty()
        && report.cap_violations.is_empty();
    drop((backend, tracker));
    Ok(report)
}

fn count(calls: &[Call], report: &mut SuiteReport, windows: &[Window]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for c in calls {
        report.answers.add(c);
    }
    for w in windows {
        let recovered = calls
            .iter()
            .filter(|c| c.started >= w.healed && matches!(c.answer, Answer::Decided { .. }))
            .map(|c| c.started + c.latency)
            .min();
        let end = recovered.unwrap_or(w.healed);
        let mut r = FaultResult {
            fault: w.fault.name().to_string(),
            window_ms: ms(w.healed - w.start) as u64,
            recovery_ms: recovered.map(|t| ms(t - w.healed)),
            moved_entitlements: w.moved,
            ..FaultResult::default()
        };
        for c in calls
            .iter()
            .filter(|c| c.started + c.latency >= w.start && c.started <= end)
        {
            r.answers.add(c);
        }
        report.faults.push(r);
    }
}

/// The fault matrix and the ledger verdict, as Markdown.
pub fn markdown(r: &SuiteReport) -> String {
    let mut s = String::from(
        "| fault | window ms | calls | acknowledged | 503 | 504 | no answer | other | slowest 503 ms | slowest 504 ms | recovery ms |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for f in &r.faults {
        let name = match f.moved_entitlements {
            Some(n) => format!("{} ({n} of the entitlements moved)", f.fault),
            None => f.fault.clone(),
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} |\n",
            name,
            f.window_ms,
            f.answers.calls,
            f.answers.acknowledged,
            f.answers.unavailable,
            f.answers.unknown,
            f.answers.no_answer,
            f.answers.other_errors,
            f.answers.max_503_ms,
            f.answers.max_504_ms,
            f.recovery_ms.map_or("–".into(), |m| format!("{m:.0}"))
        );
    }
    s += &format!(
        "\nWhole run on {}: {:.1} s, {} calls, {} acknowledged, {} answered 503 and {} 504 (slowest \
         {:.0} and {:.0} ms, store timeout {} ms), {} without answer, {} other errors.\n",
        r.topology,
        r.elapsed_s,
        r.answers.calls,
        r.answers.acknowledged,
        r.answers.unavailable,
        r.answers.unknown,
        r.answers.max_503_ms,
        r.answers.max_504_ms,
        r.redis_timeout_ms,
        r.answers.no_answer,
        r.answers.other_errors
    );
    s += &format!(
        "Ledger: {} acknowledged calls lost, {} calls answered 503 but applied, {} calls \
         answered 504 or not at all had landed (allowed: their retry replayed), {} unsettled, {} counter mismatches, {} cap violations \
         ({} stored states and {} stream events checked during the run): {}.\n",
        r.lost.len(),
        r.applied_after_503.len(),
        r.unknown_but_applied,
        r.unsettled.len(),
        r.mismatches.len(),
        r.cap_violations.len(),
        r.states_checked,
        r.events_checked,
        if r.ok { "OK" } else { "FAILED" }
    );
    for line in r
        .lost
        .iter()
        .chain(&r.applied_after_503)
        .chain(&r.unsettled)
        .chain(&r.mismatches)
        .chain(&r.cap_violations)
        .take(20)
    {
        s += &format!("- {line}\n");
    }
    s
}
