//! Webhooks: endpoints registered by the vendor, and the dispatcher that
//! pushes matching events from `{prefix}:events` to them.
//!
//! The dispatcher reads the stream through the consumer group
//! `headroom-webhooks`, so several tracker processes share the work and a
//! restarted one resumes with the entries it had read but not finished. An
//! entry is acknowledged once each matching endpoint either got it or has
//! it parked in the retry schedule in Redis (`{prefix}:webhooks:retry`, a
//! sorted set by next attempt, with the deliveries in
//! `{prefix}:webhooks:pending`), so no acknowledged entry is lost by a crash.
//! Each endpoint has its own queue and a cap on its requests in flight, all
//! endpoints share a cap on concurrent deliveries, and every request has a
//! timeout: one slow or failing endpoint only fills its own queue (the
//! overflow goes to the retry schedule) and never delays the others.
//! Failed deliveries are retried with exponential backoff and jitter for
//! `retry_for` (24 h by default); then they are parked in the dead-letter
//! stream `{prefix}:webhooks:dead`.
//!
//! Keys: `{prefix}:webhooks` (hash id → registration, with its secret),
//! `{prefix}:webhooks:{id}:deliveries` (delivery log, newest first),
//! `{prefix}:webhooks:retry`, `{prefix}:webhooks:pending`,
//! `{prefix}:webhooks:dead`.

mod dispatch;
mod sign;

pub use dispatch::Dispatcher;
pub use sign::{SIGNATURE_HEADER, sign, verify};

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use deadpool_redis::Pool;
use serde::{Deserialize, Serialize};

use crate::domain::{EVENT_KINDS, ValidationError};
use crate::store::StoreError;

/// Delivery log entries kept per endpoint.
pub const LOG_KEPT: usize = 1000;
/// Endpoints that may be registered.
pub const MAX_WEBHOOKS: usize = 100;

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Longest wait for an endpoint's answer.
    pub timeout: Duration,
    /// How long a failing delivery is retried before it is dead-lettered.
    pub retry_for: Duration,
    /// First retry delay; doubled per attempt, with ±20 % jitter.
    pub backoff: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Deliveries in flight at once, all endpoints together.
    pub concurrency: usize,
    /// Deliveries in flight at once to one endpoint.
    pub per_endpoint: usize,
    /// Deliveries queued in memory per endpoint; more wait in the retry
    /// schedule.
    pub queue: usize,
    /// This process's name in the consumer group: keep it stable across
    /// restarts so that a restarted process resumes its own entries.
    pub consumer: String,
    /// A delivery claimed from the retry schedule, or a stream entry read
    /// and not acknowledged, is taken over by any process after this long.
    pub claim_after: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(24 * 3600),
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3600),
            concurrency: 64,
            per_endpoint: 4,
            queue: 1000,
            consumer: "headroom".into(),
            claim_after: Duration::from_secs(120),
        }
    }
}

/// An endpoint as the API shows it (never with its secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// Event types delivered: exact types, `prefix.*`, or `*` for all.
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An endpoint as stored: with its secret and the last stream entry before
/// it was registered (it gets only later ones).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    hook: Webhook,
    secret: String,
    after_entry: String,
}

impl Webhook {
    /// Whether events of `kind` go to this endpoint.
    pub fn wants(&self, kind: &str) -> bool {
        self.types.iter().any(|t| {
            t == "*"
                || t == kind
                || t.strip_suffix(".*")
                    .is_some_and(|p| kind.split_once('.').is_some_and(|(k, _)| k == p))
        })
    }
}

/// What `POST /v1/webhooks` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    pub url: String,
    #[serde(default)]
    pub types: Option<Vec<String>>,
    #[serde(default)]
    pub description: Option<String>,
}

impl NewWebhook {
    /// Checks the URL (http or https, with a host) and the type filter.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.url.len() > 2048 {
            return Err(ValidationError::new("url", "at most 2048 characters"));
        }
        let url = url::Url::parse(&self.url)
            .map_err(|e| ValidationError::new("url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ValidationError::new(
                "url",
                format!("scheme {:?} is not http or https", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ValidationError::new("url", "has no host"));
        }
        if let Some(types) = &self.types {
            if types.is_empty() || types.len() > EVENT_KINDS.len() {
                return Err(ValidationError::new(
                    "types",
                    format!("1 to {} event types", EVENT_KINDS.len()),
                ));
            }
            for t in types {
                let known = t == "*"
                    || EVENT_KINDS.contains(&t.as_str())
                    || t.strip_suffix(".*").is_some_and(|p| {
                        EVENT_KINDS.iter().any(|k| k.split('.').next() == Some(p))
                    });
                if !known {
                    return Err(ValidationError::new(
                        "types",
                        format!(
                            "unknown event type {t:?} (an event type, `seat.*`, `usage.*`, `entitlement.*` or `*`)"
                        ),
                    ));
                }
            }
        }
        if self.description.as_ref().is_some_and(|d| d.len() > 500) {
            return Err(ValidationError::new(
                "description",
                "at most 500 characters",
            ));
        }
        Ok(())
    }
}

/// One attempt's record in an endpoint's delivery log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    pub delivery_id: String,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub attempt: u32,
    /// `delivered`, `failed` (will be retried), `dead_lettered`.
    pub outcome: String,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
    pub duration_ms: u64,
}

/// Registrations and delivery logs in Redis; shared by the admin API and
/// the dispatcher.
#[derive(Clone)]
pub struct Webhooks {
    pool: Pool,
    prefix: String,
    timeout: Duration,
}

pub(crate) const GROUP: &str = "headroom-webhooks";

/// KEYS: 1 registrations, 2 event stream; ARGV: 1 id, 2 registration JSON.
/// Stores the registration with the stream's last entry as its start.
const REGISTER_LUA: &str = r"
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local hook = cjson.decode(ARGV[2])
hook['after_entry'] = last[1] and last[1][1] or '0-0'
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(hook))
return 1
";

impl Webhooks {
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StoreError> {
        let pool = crate::store::redis_pool(url, timeout, 8)?;
        Ok(Webhooks {
            pool,
            prefix: prefix.to_string(),
            timeout,
        })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    fn stream(&self) -> String {
        self.key("events")
    }

    fn hooks_key(&self) -> String {
        self.key("webhooks")
    }

    fn log_key(&self, id: &str) -> String {
        self.key(&format!("webhooks:{id}:deliveries"))
    }

    /// Runs `pipe` on a pooled connection within the timeout.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StoreError> {
        crate::store::redis_query(&self.pool, self.timeout, pipe).await
    }

    /// Creates the consumer group at the stream's end, unless it exists.
    async fn ensure_group(&self) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream())
            .arg(GROUP)
            .arg("$")
            .arg("MKSTREAM");
        match self.run::<redis::Value>(&pipe).await {
            Err(StoreError::Unavailable(e)) if e.contains("BUSYGROUP") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Registers an endpoint; returns it and its secret (shown only now).
    pub async fn register(&self, new: NewWebhook) -> Result<(Webhook, String), RegisterError> {
        new.validate().map_err(RegisterError::Invalid)?;
        if self.stored().await?.len() >= MAX_WEBHOOKS {
            return Err(RegisterError::Invalid(ValidationError::new(
                "url",
                format!("at most {MAX_WEBHOOKS} webhooks; delete one first"),
            )));
        }
        // The group must exist before the registration's starting point is
        // read, so that no event after it is missed.
        self.ensure_group().await?;
        let mut raw = [0u8; 24];
        rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
        let id = format!("wh_{}", hex::encode(&raw[..8]));
        let secret = format!(
            "whsec_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[8..])
        );
        let hook = Webhook {
            id: id.clone(),
            url: new.url,
            types: new.types.unwrap_or_else(|| vec!["*".into()]),
            description: new.description,
            created_at: Utc::now(),
        };
        let stored = Stored {
            hook: hook.clone(),
            secret: secret.clone(),
            after_entry: String::new(),
        };
        // The starting point and the registration in one step: every entry
        // after it is added after the registration is visible, so the
        // dispatcher, which reads the registrations after the entries,
        // never misses one.
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(REGISTER_LUA)
            .arg(2)
            .arg(self.hooks_key())
            .arg(self.stream())
            .arg(&id)
            .arg(serde_json::to_string(&stored).unwrap_or_default())
            .ignore();
        self.run::<()>(&pipe).await?;
        Ok((hook, secret))
    }

    async fn stored(&self) -> Result<Vec<Stored>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HVALS").arg(self.hooks_key());
        let (values,): (Vec<String>,) = self.run(&pipe).await?;
        let mut hooks: Vec<Stored> = values
            .iter()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        hooks.sort_by_key(|s| s.hook.created_at);
        Ok(hooks)
    }

    /// Every endpoint, oldest first.
    pub async fn list(&self) -> Result<Vec<Webhook>, StoreError> {
        Ok(self.stored().await?.into_iter().map(|s| s.hook).collect())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(self.hooks_key()).arg(id);
        let (value,): (Option<String>,) = self.run(&pipe).await?;
        Ok(value
            .and_then(|v| serde_json::from_str::<Stored>(&v).ok())
            .map(|s| s.hook))
    }

    /// Removes an endpoint and its log; its parked deliveries are dropped
    /// when they fall due. False when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.hooks_key()).arg(id);
        pipe.cmd("DEL").arg(self.log_key(id)).ignore();
        let (removed,): (u64,) = self.run(&pipe).await?;
        Ok(removed > 0)
    }

    /// The newest `limit` entries of an endpoint's delivery log.
    pub async fn deliveries(&self, id: &str, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("LRANGE")
            .arg(self.log_key(id))
            .arg(0)
            .arg(limit.saturating_sub(1));
        let (values,): (Vec<String>,) = self.run(&pipe).await?;
        Ok(values
            .iter()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Invalid(ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(url: &str, types: Option<Vec<&str>>) -> NewWebhook {
        NewWebhook {
            url: url.into(),
            types: types.map(|t| t.into_iter().map(String::from).collect()),
            description: None,
        }
    }

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        assert!(new("https://example.com/hook", None).validate().is_ok());
        assert!(new("http://127.0.0.1:9000/", None).validate().is_ok());
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "http://",
            "javascript:alert(1)",
            "",
        ] {
            let e = new(bad, None).validate().expect_err(bad);
            assert_eq!(e.field, "url", "{bad}");
        }
    }

    proptest::proptest! {
        /// Any registration body is either refused with a field or valid;
        /// validation never panics, whatever the URL parser is given.
        #[test]
        fn any_registration_is_validated_without_panicking(
            url in "\\PC{0,80}|(https?|ftp|javascript)://\\PC{0,40}",
            types in proptest::collection::vec("\\PC{0,20}|seat\\.\\*|usage\\.denied", 0..4),
        ) {
            match new(&url, Some(types.iter().map(String::as_str).collect())).validate() {
                Ok(()) => proptest::prop_assert!(
                    url::Url::parse(&url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
                ),
                Err(e) => proptest::prop_assert!(["url", "types"].contains(&e.field.as_str())),
            }
        }
    }

    #[test]
    fn type_filters_are_known_types_prefixes_or_all() {
        assert!(
            new("http://h/", Some(vec!["seat.denied", "usage.*"]))
                .validate()
                .is_ok()
        );
        for bad in [vec![], vec!["seat.nope"], vec!["billing.*"], vec!["seat"]] {
            assert_eq!(
                new("http://h/", Some(bad))
                    .validate()
                    .expect_err("bad")
                    .field,
                "types"
            );
        }
        let hook = Webhook {
            id: "w".into(),
            url: "http://h/".into(),
            types: vec!["seat.*".into(), "usage.period_closed".into()],
            description: None,
            created_at: Utc::now(),
        };
        assert!(hook.wants("seat.denied"));
        assert!(hook.wants("usage.period_closed"));
        assert!(!hook.wants("usage.denied"));
        assert!(!hook.wants("seats.denied"));
    }
}
