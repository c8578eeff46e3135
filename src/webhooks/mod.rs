//! Webhooks: endpoints registered by the vendor, and the dispatcher that
//! pushes matching events from the buckets' event streams to them.
//!
//! The dispatcher reads every bucket's stream through the consumer group
//! `headroom-webhooks` (one group per stream), so several tracker processes
//! share the work and a restarted one resumes with the entries it had read
//! but not finished. An
//! entry is acknowledged once each matching endpoint either got it or has
//! it parked in the retry schedule in Redis (`{prefix}:{webhooks}:retry`, a
//! sorted set by next attempt, with the deliveries in
//! `{prefix}:{webhooks}:pending`), so no acknowledged entry is lost by a crash.
//! Each endpoint has its own queue and a cap on its requests in flight, all
//! endpoints share a cap on concurrent deliveries, and every request has a
//! timeout: one slow or failing endpoint only fills its own queue (the
//! overflow goes to the retry schedule) and never delays the others.
//! Failed deliveries are retried with exponential backoff and jitter for
//! `retry_for` (24 h by default); then they are parked in the dead-letter
//! stream `{prefix}:{webhooks}:dead`.
//!
//! Keys: see `store::redis::keys` (`{prefix}:{webhooks}…`, all in one
//! hash slot).

mod dispatch;
mod sign;

pub use dispatch::{DispatchError, Dispatcher};
pub use sign::{ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, new_secret, sign, verify};

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{EVENT_KINDS, ValidationError};
use crate::flags::duration;
use crate::store::{Keys, RedisLink, StoreError};

/// Delivery log entries kept per endpoint.
pub const LOG_KEPT: usize = 1000;
/// Endpoints that may be registered.
pub const MAX_WEBHOOKS: usize = 100;

/// The dispatcher's flags; each default is written here once.
#[derive(clap::Args, Clone, Debug)]
pub struct WebhookSettings {
    /// Longest wait for a webhook endpoint's answer.
    #[arg(long = "webhook-timeout", env = "HEADROOM_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub timeout: Duration,
    /// How long a failing webhook delivery is retried before it goes to the
    /// dead-letter stream.
    #[arg(long = "webhook-retry-for", env = "HEADROOM_WEBHOOK_RETRY_FOR", default_value = "24h", value_parser = duration)]
    pub retry_for: Duration,
    /// First webhook retry delay (doubled per attempt, ±20 % jitter).
    #[arg(long = "webhook-backoff", env = "HEADROOM_WEBHOOK_BACKOFF", default_value = "1s", value_parser = duration)]
    pub backoff: Duration,
    /// Longest webhook retry delay.
    #[arg(long = "webhook-backoff-max", env = "HEADROOM_WEBHOOK_BACKOFF_MAX", default_value = "1h", value_parser = duration)]
    pub backoff_max: Duration,
    /// Webhook deliveries in flight at once (all endpoints together).
    #[arg(
        long = "webhook-concurrency",
        env = "HEADROOM_WEBHOOK_CONCURRENCY",
        default_value_t = 64,
        value_parser = crate::flags::count
    )]
    pub concurrency: usize,
    /// Webhook deliveries in flight at once to one endpoint.
    #[arg(
        long = "webhook-per-endpoint",
        env = "HEADROOM_WEBHOOK_PER_ENDPOINT",
        default_value_t = 4,
        value_parser = crate::flags::count
    )]
    pub per_endpoint: usize,
    /// This process's name in the webhook consumer group (default: from
    /// the listen address); keep it stable across restarts so that a
    /// restarted process resumes its own entries.
    #[arg(long = "webhook-consumer", env = "HEADROOM_WEBHOOK_CONSUMER")]
    pub consumer: Option<String>,
    /// A delivery claimed from the retry schedule, or a stream entry read
    /// and not acknowledged, is taken over by any process after this long.
    #[arg(skip = Duration::from_secs(120))]
    pub claim_after: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

impl WebhookSettings {
    /// The consumer name the dispatcher reads the stream as.
    pub fn consumer_name(&self) -> &str {
        self.consumer.as_deref().unwrap_or("headroom")
    }
}

/// An endpoint as the API shows it (never with its secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// Event types delivered: exact types, `prefix.*`, or `*` for all.
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An endpoint as stored: with its secret and, per bucket, the last stream
/// entry before it was registered (it gets only later ones).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    hook: Webhook,
    secret: String,
    after_entries: Vec<String>,
    /// Secrets replaced by a rotation, still signing until they expire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous: Vec<PreviousSecret>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PreviousSecret {
    secret: String,
    until: DateTime<Utc>,
}

/// Most secrets that sign at once (the current one and those of rotations
/// still in their overlap).
const MAX_SECRETS: usize = 4;

/// A rotation's answer: the new secret (shown once) and until when the
/// one it replaced still signs.
#[derive(Debug)]
pub struct Rotated {
    pub secret: String,
    pub previous_until: DateTime<Utc>,
}

/// Sets a registration to a new value only if it is still the one read
/// (a concurrent rotation or deletion is not overwritten): 1 set, 0 not.
const COMPARE_AND_SET: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"#;

impl Stored {
    /// The secrets a delivery at `now` is signed with: the current one
    /// first, then those of rotations still in their overlap.
    fn signing_secrets(&self, now: DateTime<Utc>) -> impl Iterator<Item = &str> {
        std::iter::once(self.secret.as_str()).chain(
            self.previous
                .iter()
                .filter(move |p| p.until > now)
                .map(|p| p.secret.as_str()),
        )
    }

    /// Where this endpoint's entries of `bucket`'s stream start.
    fn after(&self, bucket: usize) -> (u64, u64) {
        self.after_entries
            .get(bucket)
            .map_or((0, 0), |e| dispatch::entry_id(e))
    }
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    /// Where deliveries are POSTed: http or https, with a host.
    #[schema(
        format = "uri",
        max_length = 2048,
        pattern = "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]+"
    )]
    pub url: String,
    /// Event types, `seat.*`, `usage.*`, `entitlement.*` or `*` (default `["*"]`).
    #[serde(default)]
    #[schema(min_items = 1, max_items = 13, value_type = Option<Vec<crate::http::openapi::WebhookType>>)]
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
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogEntry {
    pub delivery_id: String,
    /// The CloudEvents id of the event (`null` if the stream entry
    /// carried none).
    pub event_id: Option<String>,
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
    link: RedisLink,
    keys: Keys,
    timeout: Duration,
}

pub(crate) const GROUP: &str = "headroom-webhooks";

/// A stored record of `what` as `T`, or why it cannot be read.
fn decode<T: for<'de> Deserialize<'de>>(what: &str, raw: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw)
        .map_err(|e| StoreError::corrupt(what, "unreadable JSON", Some(e.into())))
}

impl Webhooks {
    /// Registrations under `keys` (their prefix and bucket count) in the
    /// standalone Redis at `url`.
    pub fn new(url: &str, keys: Keys, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self::on(
            RedisLink::standalone(url, timeout, 8)?,
            keys,
            timeout,
        ))
    }

    /// Registrations under `keys` on `link` (a standalone Redis or a
    /// cluster).
    pub fn on(link: RedisLink, keys: Keys, timeout: Duration) -> Self {
        Webhooks {
            link,
            keys,
            timeout,
        }
    }

    /// Runs `pipe` on a pooled connection within the timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.link.query(op, self.timeout, pipe).await
    }

    /// Runs `cmds` of several buckets' streams (each names one key): one
    /// reply each.
    async fn each(
        &self,
        op: &'static str,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<redis::Value>, StoreError> {
        self.link.each(op, self.timeout, cmds).await
    }

    /// Creates the consumer group at the end of each bucket's stream, where
    /// it does not exist yet.
    async fn ensure_group(&self) -> Result<(), StoreError> {
        for stream in self.keys.all_events() {
            let mut pipe = redis::pipe();
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(GROUP)
                .arg("$")
                .arg("MKSTREAM");
            match self.run::<redis::Value>("webhook group", &pipe).await {
                Err(e) if e.redis_code().as_deref() == Some("BUSYGROUP") => {}
                other => other.map(|_| ())?,
            }
        }
        Ok(())
    }

    /// The last entry of each bucket's stream (`0-0` for an empty one).
    async fn last_entries(&self) -> Result<Vec<String>, StoreError> {
        let cmds = self
            .keys
            .all_events()
            .into_iter()
            .map(|stream| {
                redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .clone()
            })
            .collect();
        self.each("webhook start", cmds)
            .await?
            .into_iter()
            .map(|v| {
                let last: Vec<(String, redis::Value)> = redis::from_redis_value(v)
                    .map_err(|e| StoreError::reply("webhook start", e.to_string()))?;
                Ok(last
                    .into_iter()
                    .next()
                    .map_or_else(|| "0-0".into(), |(id, _)| id))
            })
            .collect()
    }

    /// Registers an endpoint; returns it and its secret (shown only now).
    pub async fn register(&self, new: NewWebhook) -> Result<(Webhook, String), RegisterError> {
        new.validate().map_err(RegisterError::Invalid)?;
        if self.registrations().await?.len() >= MAX_WEBHOOKS {
            return Err(RegisterError::Invalid(ValidationError::new(
                "url",
                format!("at most {MAX_WEBHOOKS} webhooks; delete one first"),
            )));
        }
        // The group must exist before the registration's starting point is
        // read, so that no event after it is missed.
        self.ensure_group().await?;
        let mut raw = [0u8; 8];
        rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
        let id = format!("wh_{}", hex::encode(raw));
        let secret = new_secret();
        let hook = Webhook {
            id: id.clone(),
            url: new.url,
            types: new.types.unwrap_or_else(|| vec!["*".into()]),
            description: new.description,
            created_at: Utc::now(),
        };
        // Each stream's last entry is read before the registration is
        // stored: every entry added after the registration (after this
        // call answers) comes after it, and the dispatcher, which reads the
        // registrations after the entries, never misses one.
        let stored = Stored {
            hook: hook.clone(),
            secret: secret.clone(),
            after_entries: self.last_entries().await?,
            previous: Vec::new(),
        };
        let registration = serde_json::to_string(&stored).map_err(|e| {
            StoreError::not_sent(
                "webhook registration",
                "could not be encoded",
                Some(e.into()),
            )
        })?;
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(self.keys.webhooks())
            .arg(&id)
            .arg(registration)
            .ignore();
        self.run::<()>("webhook register", &pipe).await?;
        Ok((hook, secret))
    }

    /// Every registration, oldest first, with an error for each one that
    /// cannot be read.
    async fn registrations(&self) -> Result<Vec<Result<Stored, StoreError>>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HVALS").arg(self.keys.webhooks());
        let (values,): (Vec<String>,) = self.run("webhook list", &pipe).await?;
        let mut hooks: Vec<Result<Stored, StoreError>> = values
            .iter()
            .map(|v| decode("a webhook registration", v))
            .collect();
        hooks.sort_by_key(|s| s.as_ref().map(|s| s.hook.created_at).ok());
        Ok(hooks)
    }

    /// The registrations the dispatcher delivers to; one that cannot be
    /// read is logged and left out (the others keep their deliveries).
    async fn stored(&self) -> Result<Vec<Stored>, StoreError> {
        Ok(self
            .registrations()
            .await?
            .into_iter()
            .filter_map(|r| {
                r.map_err(|e| tracing::error!(error = %crate::store::chain(&e), "skipping an unreadable webhook registration"))
                    .ok()
            })
            .collect())
    }

    /// Every endpoint, oldest first; fails when one cannot be read.
    pub async fn list(&self) -> Result<Vec<Webhook>, StoreError> {
        self.registrations()
            .await?
            .into_iter()
            .map(|r| r.map(|s| s.hook))
            .collect()
    }

    pub async fn get(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(self.keys.webhooks()).arg(id);
        let (value,): (Option<String>,) = self.run("webhook get", &pipe).await?;
        value
            .map(|v| decode::<Stored>("a webhook registration", &v).map(|s| s.hook))
            .transpose()
    }

    /// Gives an endpoint a new secret; the one it had keeps signing too
    /// (both signatures on each delivery) for `overlap`, so its receiver
    /// can switch without missing a delivery. `None` when there is none.
    pub async fn rotate(&self, id: &str, overlap: Duration) -> Result<Option<Rotated>, StoreError> {
        // A concurrent rotation or deletion changes the registration under
        // this one: read it again and retry (a deleted one is gone).
        for _ in 0..5 {
            let mut pipe = redis::pipe();
            pipe.cmd("HGET").arg(self.keys.webhooks()).arg(id);
            let (raw,): (Option<String>,) = self.run("webhook get", &pipe).await?;
            let Some(raw) = raw else { return Ok(None) };
            let mut stored: Stored = decode("a webhook registration", &raw)?;
            let now = Utc::now();
            let until =
                now + chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::days(7));
            let old = std::mem::replace(&mut stored.secret, new_secret());
            stored.previous.retain(|p| p.until > now);
            stored
                .previous
                .insert(0, PreviousSecret { secret: old, until });
            stored.previous.truncate(MAX_SECRETS - 1);
            let value = serde_json::to_string(&stored).map_err(|e| {
                StoreError::not_sent(
                    "webhook registration",
                    "could not be encoded",
                    Some(e.into()),
                )
            })?;
            let mut pipe = redis::pipe();
            pipe.cmd("EVAL")
                .arg(COMPARE_AND_SET)
                .arg(1)
                .arg(self.keys.webhooks())
                .arg(id)
                .arg(&raw)
                .arg(&value);
            let (set,): (i64,) = self.run("webhook rotate", &pipe).await?;
            if set == 1 {
                return Ok(Some(Rotated {
                    secret: stored.secret,
                    previous_until: until,
                }));
            }
        }
        Err(StoreError::not_sent(
            "webhook rotate",
            "the registration kept changing meanwhile; try again",
            None,
        ))
    }

    /// Removes an endpoint and its log; its parked deliveries are dropped
    /// when they fall due. False when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.keys.webhooks()).arg(id);
        pipe.cmd("DEL").arg(self.keys.webhook_log(id)).ignore();
        let (removed,): (u64,) = self.run("webhook delete", &pipe).await?;
        Ok(removed > 0)
    }

    /// The newest `limit` entries of an endpoint's delivery log; fails
    /// when one cannot be read.
    pub async fn deliveries(&self, id: &str, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("LRANGE")
            .arg(self.keys.webhook_log(id))
            .arg(0)
            .arg(limit.saturating_sub(1));
        let (values,): (Vec<String>,) = self.run("webhook deliveries", &pipe).await?;
        values
            .iter()
            .map(|v| decode("a webhook delivery log entry", v))
            .collect()
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
