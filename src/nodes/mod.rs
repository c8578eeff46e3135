//! Several headroom nodes on one Redis: who the live members are.
//!
//! Each node registers itself in Redis (`{prefix}:{nodes}`, its id → its
//! advertised address and start time) with a lease (`{prefix}:{nodes}:leases`,
//! id → expiry in Redis's clock), renewed every third of the lease. Each
//! renewal also drops the members whose lease ran out and answers who is
//! live; every node computes the owners of the entitlements from that list
//! ([`ring`]). No gossip: Redis, which every node already needs, is the one
//! place the list is kept. Membership decides where calls go, never
//! whether a write is safe: the owner epoch fences a node that believes it
//! owns an entitlement it no longer does.

pub mod coalesce;
pub mod forward;
pub mod ring;

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{RedisLink, StoreError, chain};

/// Settings of a node among several.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeSettings {
    /// Shared secret that authenticates node-to-node traffic; set it (the
    /// same on every node) to run several nodes on one Redis. At least 16
    /// characters.
    #[arg(long, env = "HEADROOM_CLUSTER_SECRET", value_parser = secret, hide_env_values = true)]
    pub cluster_secret: Option<Secret>,
    /// Address other nodes use to reach this one (host:port); default: the
    /// listen address.
    #[arg(long, env = "HEADROOM_ADVERTISE", value_parser = advertise)]
    pub advertise: Option<String>,
    /// How long a node stays a member without renewing its registration;
    /// a node that died is dropped after it.
    #[arg(long, env = "HEADROOM_CLUSTER_LEASE", default_value = "6s", value_parser = lease)]
    pub cluster_lease: Duration,
    /// Longest wait for the owner's answer to a call sent on to it; then
    /// the call answers `504` (retry it with its idempotency key).
    #[arg(long, env = "HEADROOM_FORWARD_TIMEOUT", default_value = "5s", value_parser = crate::flags::duration)]
    pub forward_timeout: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

/// A new node id: `n-` and 12 random hex digits, fresh at each start (a
/// restarted node is a new member; its old registration runs out).
pub fn new_node_id() -> String {
    format!("n-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// This node as `GET /v1/cluster` shows it.
#[derive(Clone, Debug)]
pub struct SelfNode {
    pub id: String,
    /// Where the other nodes reach it.
    pub address: String,
    pub started: chrono::DateTime<chrono::Utc>,
}

/// The cluster secret; never printed.
#[derive(Clone)]
pub struct Secret(pub Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn secret(s: &str) -> Result<Secret, String> {
    if s.chars().count() < 16 {
        return Err(
            "must be at least 16 characters; generate one with `openssl rand -hex 32`".into(),
        );
    }
    Ok(Secret(s.into()))
}

fn advertise(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("write host:port, e.g. 10.0.0.5:8080 or node-1.internal:8080")?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("write host:port with a port from 1 to 65535, e.g. 10.0.0.5:8080".into());
    }
    Ok(s.to_string())
}

fn lease(s: &str) -> Result<Duration, String> {
    let d = crate::flags::duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s; write e.g. 6s".into());
    }
    Ok(d)
}

/// One live member, as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: String,
    /// Where the other nodes reach it (host:port).
    pub address: String,
    /// When it registered first (ms since the epoch, Redis's clock).
    pub since_ms: i64,
    /// When its lease runs out unless renewed (ms, Redis's clock).
    pub expires_ms: i64,
}

/// What the registry holds of a node (written by the script).
#[derive(Clone, Debug, Deserialize)]
struct Registration {
    address: String,
    since_ms: i64,
}

/// The members as last read, ordered by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub members: Vec<Member>,
}

impl View {
    /// The owner of entitlement `id` among these members.
    pub fn owner(&self, id: &str) -> Option<&Member> {
        self.owner_among(id, |_| true)
    }

    /// The owner of `id` among the members `keep` says yes to: with a
    /// member left out, who owns its entitlements once it is gone.
    pub fn owner_among(&self, id: &str, keep: impl Fn(&Member) -> bool) -> Option<&Member> {
        let kept = self.members.iter().filter(|m| keep(m));
        let owner = ring::owner(kept.map(|m| m.id.as_str()), id)?;
        self.members.iter().find(|m| m.id == owner)
    }
}

/// Registers or renews this node (`ARGV[4]` = `1`; `0` after it left:
/// only reads), drops the members whose lease ran out, answers the live ones.
const REGISTER_LUA: &str = r#"#!lua
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
  local known = redis.call('HGET', KEYS[1], ARGV[1])
  local since = now
  if known then
    since = cjson.decode(known)['since_ms'] or now
  end
  local mine = cjson.encode({address = ARGV[2], since_ms = since})
  if mine ~= known then
    redis.call('HSET', KEYS[1], ARGV[1], mine)
  end
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do
  redis.call('HDEL', KEYS[1], id)
end
if #dead > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
local live = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], live[i]) or ''
end
return out
"#;

/// Why the membership could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the node registry holds something unreadable: {0}")]
    Unreadable(String),
}

/// This node's membership: its registration renewed in the background,
/// and the members as last read.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    me: String,
    address: String,
    link: RedisLink,
    registry: String,
    leases: String,
    lease: Duration,
    timeout: Duration,
    view: watch::Sender<Arc<View>>,
    /// Set by [`Membership::leave`]: the renewals only read from then on.
    left: std::sync::atomic::AtomicBool,
    /// Wakes the renewals before their time (see [`Membership::renew_soon`]).
    soon: Arc<tokio::sync::Notify>,
    /// Held by a renewal and by leaving, so that a renewal under way cannot
    /// register the node again after it left.
    renewing: tokio::sync::Mutex<()>,
}

/// Least time between two renewals asked for by [`Membership::renew_soon`].
const SOONEST: Duration = Duration::from_millis(100);

impl Membership {
    /// Registers this node (id `me`, reachable at `address`) in the
    /// registry of `keys`, and renews it every third of `lease` while a handle lives.
    /// If Redis cannot be reached now, the renewals keep trying; the node
    /// is a member once one gets through.
    pub async fn join(
        link: RedisLink,
        keys: &crate::store::Keys,
        me: String,
        address: String,
        lease: Duration,
        timeout: Duration,
    ) -> Membership {
        let (view, _) = watch::channel(Arc::new(View {
            members: Vec::new(),
        }));
        let inner = Arc::new(Inner {
            me,
            address,
            link,
            registry: keys.node_registry(),
            leases: keys.node_leases(),
            lease,
            timeout,
            view,
            left: Default::default(),
            soon: Arc::new(tokio::sync::Notify::new()),
            renewing: tokio::sync::Mutex::new(()),
        });
        let mut failing = match inner.renew().await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot register this node; trying again");
                true
            }
        };
        let weak = Arc::downgrade(&inner);
        let soon = inner.soon.clone();
        actix_rt::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(i) => i.lease / 3,
                    None => return,
                };
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = soon.notified() => tokio::time::sleep(SOONEST).await,
                }
                let Some(inner) = weak.upgrade() else { return };
                match inner.renew().await {
                    Ok(()) if failing => {
                        tracing::info!("node registry reachable again");
                        failing = false;
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        tracing::warn!(error = %chain(&e), "cannot renew this node's registration");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        Membership { inner }
    }

    /// This node's id.
    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// The members as last read (this node among them once it registered).
    pub fn view(&self) -> Arc<View> {
        self.inner.view.borrow().clone()
    }

    /// Told each time the members change.
    pub fn changes(&self) -> watch::Receiver<Arc<View>> {
        self.inner.view.subscribe()
    }

    /// Renews (and reads the members) now rather than at the next
    /// third of the lease, at most every 100 ms: something suggests this
    /// node's view is behind (a write of it was fenced).
    pub fn renew_soon(&self) {
        self.inner.soon.notify_one();
    }

    /// A handle that asks for [`Membership::renew_soon`] without keeping
    /// the membership alive.
    pub fn renew_soon_handle(&self) -> impl Fn() + Send + Sync + 'static {
        let soon = self.inner.soon.clone();
        move || soon.notify_one()
    }

    /// Whether this node left (it is stopping).
    pub fn has_left(&self) -> bool {
        self.inner.left.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Removes this node's registration (a graceful stop) and takes it out
    /// of its own view at once, so that it sends every call on to the
    /// remaining members; the renewals only read from then on, and end
    /// when the last handle is dropped.
    pub async fn leave(&self) -> Result<(), MembershipError> {
        let i = &self.inner;
        let _renewing = i.renewing.lock().await;
        i.left.store(true, std::sync::atomic::Ordering::Relaxed);
        i.view.send_if_modified(|view| {
            let before = view.members.len();
            let rest: Vec<Member> = view
                .members
                .iter()
                .filter(|m| m.id != i.me)
                .cloned()
                .collect();
            *view = Arc::new(View { members: rest });
            view.members.len() != before
        });
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(&i.leases).arg(&i.me).ignore();
        pipe.cmd("HDEL").arg(&i.registry).arg(&i.me).ignore();
        let () = i.link.query("node leave", i.timeout, &pipe).await?;
        Ok(())
    }
}

impl Inner {
    /// Renews this node's lease and reads the live members.
    async fn renew(&self) -> Result<(), MembershipError> {
        let _renewing = self.renewing.lock().await;
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(REGISTER_LUA)
            .arg(2)
            .arg(&self.registry)
            .arg(&self.leases)
            .arg(&self.me)
            .arg(&self.address)
            .arg(self.lease.as_millis() as u64)
            .arg(if self.left.load(std::sync::atomic::Ordering::Relaxed) {
                "0"
            } else {
                "1"
            });
        let (reply,): (Vec<Value>,) = self
            .link
            .query("node registry", self.timeout, &pipe)
            .await?;
        let mut members = parse_members(&reply)?;
        if self.left.load(std::sync::atomic::Ordering::Relaxed) {
            // Its registration may outlive a failed leave: never its own owner again.
            members.retain(|m| m.id != self.me);
        }
        let view = Arc::new(View { members });
        self.view.send_if_modified(|old| {
            let changed = old
                .members
                .iter()
                .map(|m| (&m.id, &m.address))
                .ne(view.members.iter().map(|m| (&m.id, &m.address)));
            *old = view.clone();
            changed
        });
        metrics::gauge!("headroom_cluster_members").set(self.view.borrow().members.len() as f64);
        Ok(())
    }
}

/// The script's answer: (id, expiry, registration) triples, ordered by id.
fn parse_members(reply: &[Value]) -> Result<Vec<Member>, MembershipError> {
    let text = |v: &Value| -> Result<String, MembershipError> {
        redis::from_redis_value(v.clone()).map_err(|e| MembershipError::Unreadable(e.to_string()))
    };
    let mut members = Vec::with_capacity(reply.len() / 3);
    for t in reply.chunks(3) {
        let [id, expires, registration] = t else {
            return Err(MembershipError::Unreadable(format!("{t:?}")));
        };
        let id = text(id)?;
        let expires_ms = text(expires)?
            .parse::<f64>()
            .map_err(|e| MembershipError::Unreadable(format!("{id}: expiry: {e}")))?
            as i64;
        let registration = text(registration)?;
        // A lease whose registration was removed (a node leaving): not a
        // member.
        if registration.is_empty() {
            continue;
        }
        let r: Registration = serde_json::from_str(&registration)
            .map_err(|e| MembershipError::Unreadable(format!("{id}: {e}")))?;
        members.push(Member {
            id,
            address: r.address,
            // A first registration records 0; Redis's clock is not known
            // to the node then, so its first lease stands in.
            since_ms: r.since_ms,
            expires_ms,
        });
    }
    members.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(members)
}
