//! Persistence of entitlement state and events.
//!
//! The engine hands each entitlement's changes to [`Store::commit`] as one
//! [`Commit`]; a store applies it atomically (state, seats, events and
//! idempotency records together, or nothing) and only then answers. Every
//! commit carries the owner epoch read by [`Store::load`]: a write from a
//! process that is no longer the owner is refused ([`CommitOutcome::Fenced`]).

mod error;
mod memory;
mod redis;

pub use self::error::{Cause, ErrorClass, StoreError, chain};
pub use self::memory::MemoryStore;
pub use self::redis::Link as RedisLink;
pub(crate) use self::redis::text as reply_text;
pub use self::redis::{DEFAULT_BUCKETS, Keys, MAX_BUCKETS, RedisStore};

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{
    BucketRecord, BucketSize, Entitlement, EntitlementId, FieldOp, IdempotencyKey, Lease, SeatId,
};

/// Where state lives, and how Redis is reached; each default is written
/// here once.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreSettings {
    /// Redis URL (redis:// or rediss://). Without one, state lives in memory only.
    #[arg(long, env = "HEADROOM_REDIS_URL", hide_env_values = true, value_parser = crate::flags::redis_url)]
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster, comma-separated (redis:// or
    /// rediss://); set instead of --redis-url.
    #[arg(long, env = "HEADROOM_REDIS_CLUSTER", hide_env_values = true, value_parser = crate::flags::redis_seeds, conflicts_with = "redis_url")]
    pub redis_cluster: Option<crate::flags::Seeds>,
    /// Acknowledge a call only once its write reached this many replicas
    /// (WAIT, once per round trip); a shortfall answers 504.
    #[arg(long, env = "HEADROOM_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,
    /// Prefix of every Redis key.
    #[arg(long, env = "HEADROOM_REDIS_PREFIX", default_value = "headroom")]
    pub redis_prefix: String,
    /// Buckets the entitlements are spread over in Redis (each a hash slot
    /// with its own event stream and report indexes); recorded at first
    /// start, and every later process must use the same.
    #[arg(long, env = "HEADROOM_REDIS_BUCKETS", default_value_t = DEFAULT_BUCKETS, value_parser = crate::flags::buckets)]
    pub redis_buckets: u32,
    /// Approximate maximum length of the event streams together (each
    /// bucket's stream is kept to its share, XADD MAXLEN ~).
    #[arg(long, env = "HEADROOM_STREAM_MAXLEN", default_value_t = 1_000_000, value_parser = crate::flags::count_u64)]
    pub stream_maxlen: u64,
    /// Longest wait for Redis on behalf of one call (a write gets 3/4 of it,
    /// the read-back of a write whose outcome is unknown the rest); the call
    /// answers 503 after it.
    #[arg(long, env = "HEADROOM_REDIS_TIMEOUT", default_value = "2s", value_parser = crate::flags::duration)]
    pub redis_timeout: Duration,
    /// Redis connections in the pool.
    #[arg(long, env = "HEADROOM_REDIS_POOL_SIZE", default_value_t = 8, value_parser = crate::flags::count)]
    pub redis_pool_size: usize,
    /// Most entitlement commits in one pipeline.
    #[arg(skip = 512_usize)]
    pub max_batch: usize,
    /// Most pipelines in flight at once per worker.
    #[arg(skip = 4_usize)]
    pub max_flushes: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

/// One stored state read by [`Store::peek_many`].
pub type Peeked = Result<Option<Entitlement>, StoreError>;

/// What [`Store::load`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The owner epoch this process now holds; passed back with each commit.
    pub epoch: u64,
    /// Whether the epoch was claimed (state existed); an unclaimed epoch is
    /// claimed by the first commit, so two creators cannot both win.
    pub claimed: bool,
    pub state: Option<Entitlement>,
}

/// The state change of one entitlement, written atomically.
#[derive(Debug)]
pub struct Commit {
    pub id: EntitlementId,
    pub epoch: u64,
    /// Claim the epoch with this write (see [`Loaded::claimed`]).
    pub claim: bool,
    pub write: Write,
    /// `(type, CloudEvents JSON)` in order.
    pub events: Vec<(&'static str, String)>,
    /// Idempotency keys first used by this commit, with the record to keep.
    pub idempotency: Vec<KeyRecord>,
    /// How this commit changes the overdraft totals, written with it.
    pub overdraft: OverdraftCounts,
    /// What the overdraft report, the history and the billing records get
    /// from this write, written with it.
    pub records: Records,
}

/// Closed usage periods kept per entitlement (newest first); hourly
/// periods over the default 400 days of daily history fit.
pub const PERIODS_KEPT: usize = 10_000;

/// How long a denial keeps an entitlement in the recent-denials index: the
/// longest `hours` the report accepts.
pub const DENIALS_KEPT_MS: i64 = 30 * 24 * 3_600_000;

/// The report indexes, history buckets and billing records of one commit.
#[derive(Debug, Default)]
pub struct Records {
    /// Whether the entitlement is now in overdraft (`None`: unchanged), for
    /// the overdraft report's index.
    pub in_overdraft: Option<bool>,
    /// When its last denial in this write happened (ms), for the
    /// recent-denials index.
    pub denied_at: Option<i64>,
    pub history: Vec<HistoryWrite>,
    /// Closed usage periods as JSON records, oldest first.
    pub periods: Vec<String>,
    /// When the closed-period records expire (ms), pushed on with each one
    /// (unused without `periods`).
    pub periods_expire_at: i64,
}

/// Changes to one hour's history record and to its day's, with when each
/// record expires (ms).
#[derive(Debug, Clone)]
pub struct HistoryWrite {
    pub hour: i64,
    pub hour_ops: Vec<FieldOp>,
    pub day_ops: Vec<FieldOp>,
    pub hour_expire_at: i64,
    pub day_expire_at: i64,
}

/// How many entitlements are in overdraft (seats or any feature) and how
/// many seats are above what was purchased: the store's totals over all
/// entitlements, and the change a commit makes to them. The store updates
/// the totals atomically with each commit, so they stay exact whichever
/// process holds which entitlement.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OverdraftCounts {
    pub entitlements: i64,
    pub seats: i64,
}

/// An idempotency key and the first decision made with it.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    /// Scopes the key to one life of the entitlement.
    pub incarnation: i64,
    pub key: IdempotencyKey,
    pub record: String,
}

#[derive(Debug)]
pub enum Write {
    /// The live state as JSON, the configuration when it changed, and the
    /// seats that changed; with `replace`, whatever was stored before goes
    /// first (deleted and created again).
    Put {
        replace: bool,
        core: String,
        config: Option<String>,
        seats: Vec<(SeatId, Option<Lease>)>,
    },
    Delete,
}

#[derive(Debug, PartialEq)]
pub enum CommitOutcome {
    /// Written; the epoch now held (changes when the commit claimed it).
    Applied { epoch: u64 },
    /// Another owner took over: nothing was written.
    Fenced,
    /// Some idempotency keys were already used (before this process loaded
    /// the entitlement): nothing was written; here are their records.
    KeysExist(Vec<(IdempotencyKey, String)>),
}

/// A position in the event streams, ordered as Redis orders stream entry
/// ids (`ms-seq`); a page of events reads from one position up to the
/// next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPos {
    pub ms: u64,
    pub seq: u64,
}

impl StreamPos {
    /// The position right after this one.
    pub fn next(self) -> StreamPos {
        match self.seq.checked_add(1) {
            Some(seq) => StreamPos { ms: self.ms, seq },
            None => StreamPos {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }

    /// `ms-seq`, as Redis writes a stream entry id.
    pub fn parse(s: &str) -> Option<StreamPos> {
        let (ms, seq) = s.split_once('-')?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(StreamPos {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Where a page of events starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsFrom {
    /// The oldest entry still kept.
    Oldest,
    /// Only entries added after the read.
    Now,
    /// This position (a page's `next`), included.
    At(StreamPos),
}

/// One entry of the event streams.
#[derive(Debug, Clone)]
pub struct EventEntry {
    pub pos: StreamPos,
    pub kind: String,
    pub entitlement: String,
    /// The CloudEvents JSON, as written.
    pub event: String,
}

/// Entries of the event streams in position order, and where the next
/// page starts: every entry before `next` in every stream read is in this
/// page or an earlier one, and every entry added later lands at `next` or
/// after it.
#[derive(Debug, Clone)]
pub struct EventsPage {
    pub entries: Vec<EventEntry>,
    pub next: StreamPos,
    /// Whether entries were left for the next page (`false`: every stream
    /// was read to its end).
    pub more: bool,
}

/// A place to keep entitlements: in memory, or durably in Redis.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads an entitlement and claims ownership of it.
    async fn load(&self, id: &EntitlementId) -> Result<Loaded, StoreError>;
    /// Reads an entitlement back after a write whose outcome is unknown (it
    /// timed out, or the connection broke), and fences that write: should it
    /// still arrive, it is refused, so what this returns is final. A store
    /// whose writes always answer needs nothing more than [`Store::load`].
    async fn settle(&self, id: &EntitlementId) -> Result<Loaded, StoreError> {
        self.load(id).await
    }
    /// The owner epoch stored now, read without claiming: a node checks
    /// that nobody took an entitlement since it last wrote or read it
    /// before it answers a read from memory (`0` when none was ever set).
    async fn epoch(&self, id: &EntitlementId) -> Result<u64, StoreError>;
    /// Applies one entitlement's change atomically.
    async fn commit(&self, commit: Commit) -> Result<CommitOutcome, StoreError>;
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Entries in the event stream now.
    async fn stream_length(&self) -> Result<u64, StoreError>;
    /// Entitlements and seats in overdraft now, over all entitlements.
    async fn overdraft_totals(&self) -> Result<OverdraftCounts, StoreError>;
    /// The stored states of `ids`, read without claiming them (reports:
    /// the owner keeps writing undisturbed); `None` for those not stored,
    /// an error for each one that cannot be read.
    async fn peek_many(&self, ids: &[EntitlementId]) -> Result<Vec<Peeked>, StoreError>;
    /// Ids in the overdraft report's index, in id order, after `after`.
    async fn overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// Ids of the configured entitlements, in id order, after `after`.
    async fn entitlement_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// About `limit` entries of the event streams from `from` on (all of
    /// one position's entries, so a page may hold a few more); only the
    /// stream of `of`'s bucket when set.
    async fn events_page(
        &self,
        from: EventsFrom,
        of: Option<&EntitlementId>,
        limit: usize,
    ) -> Result<EventsPage, StoreError>;
    /// Ids with a denial at or after `since` (ms) and when their last one
    /// was, most recent first, after `after` (that position's ms and id).
    async fn denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError>;
    /// History records of the buckets starting at `starts` (ms), in order;
    /// `None` where nothing was written (or it expired).
    async fn history(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        starts: &[i64],
    ) -> Result<Vec<Option<BucketRecord>>, StoreError>;
    /// Closed-period records of an entitlement, newest first.
    async fn periods(&self, id: &EntitlementId, limit: usize) -> Result<Vec<String>, StoreError>;
    /// When every portal link and session of `id` was last revoked (ms),
    /// `None` if never (or longer ago than links live).
    async fn links_revoked_at(&self, id: &EntitlementId) -> Result<Option<i64>, StoreError>;
    /// Revokes the portal links and sessions of `id` issued before `at`
    /// (ms); remembered for `keep` (links older than that have expired).
    async fn revoke_links(
        &self,
        id: &EntitlementId,
        at: i64,
        keep: Duration,
    ) -> Result<(), StoreError>;
    /// Writes what is queued and stops background work.
    async fn shutdown(&self);
}

/// Rebuilds an entitlement from its stored state, configuration and seats.
pub fn decode_state(
    id: &EntitlementId,
    core: &[u8],
    config: &[u8],
    seats: impl IntoIterator<Item = (String, String)>,
) -> Result<Entitlement, StoreError> {
    let mut e: Entitlement = serde_json::from_slice(core)
        .map_err(|e| StoreError::corrupt(id, "state", Some(e.into())))?;
    e.config = serde_json::from_slice(config)
        .map_err(|e| StoreError::corrupt(id, "configuration", Some(e.into())))?;
    for (seat, lease) in seats {
        let seat = SeatId::parse(&seat)
            .map_err(|e| StoreError::corrupt(id, format!("seat id {seat:?}: {e}"), None))?;
        let lease = Lease::decode(&lease)
            .ok_or_else(|| StoreError::corrupt(id, format!("lease {lease:?}"), None))?;
        e.seats.restore(seat, lease);
    }
    Ok(e)
}
