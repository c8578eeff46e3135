//! Flags with `HEADROOM_*` environment fallbacks, and what `main` runs.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use rand::RngCore;

use std::collections::HashSet;

use crate::domain::EntitlementId;
use crate::engine::{Engine, EngineSettings, SystemClock};
use crate::http::{self, AppState, Auth, Limits};
use crate::store::{MemoryStore, RedisSettings, RedisStore, Store};
use crate::telemetry::MAX_WATCHED;
use crate::webhooks::{Dispatcher, WebhookSettings, Webhooks};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 24h, 35days)"))
}

fn tokens(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "headroom",
    version,
    about = "Seat and metered-usage tracker with overdraft and hard caps"
)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "HEADROOM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Redis URL (redis:// or rediss://). Without one, state lives in memory only.
    #[arg(long, env = "HEADROOM_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "HEADROOM_REDIS_PREFIX", default_value = "headroom")]
    pub redis_prefix: String,
    /// Comma-separated admin tokens; generated and printed once when none are given.
    #[arg(long, env = "HEADROOM_ADMIN_TOKENS", hide_env_values = true)]
    pub admin_tokens: Option<String>,
    /// Comma-separated client (metering) tokens; generated when none are given.
    #[arg(long, env = "HEADROOM_CLIENT_TOKENS", hide_env_values = true)]
    pub client_tokens: Option<String>,
    /// Accept every call without a token (logged loudly).
    #[arg(long, env = "HEADROOM_NO_AUTH", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub no_auth: bool,
    /// Approximate maximum length of the event stream (XADD MAXLEN ~).
    #[arg(long, env = "HEADROOM_STREAM_MAXLEN", default_value_t = 1_000_000)]
    pub stream_maxlen: u64,
    /// How long hourly history buckets are kept (Redis expires them).
    #[arg(long, env = "HEADROOM_HOURLY_RETENTION", default_value = "35days", value_parser = duration)]
    pub hourly_retention: Duration,
    /// How long daily history buckets and closed-period records are kept.
    #[arg(long, env = "HEADROOM_DAILY_RETENTION", default_value = "400days", value_parser = duration)]
    pub daily_retention: Duration,
    /// Longest wait for a webhook endpoint's answer.
    #[arg(long, env = "HEADROOM_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub webhook_timeout: Duration,
    /// How long a failing webhook delivery is retried before it goes to the
    /// dead-letter stream.
    #[arg(long, env = "HEADROOM_WEBHOOK_RETRY_FOR", default_value = "24h", value_parser = duration)]
    pub webhook_retry_for: Duration,
    /// First webhook retry delay (doubled per attempt, ±20 % jitter).
    #[arg(long, env = "HEADROOM_WEBHOOK_BACKOFF", default_value = "1s", value_parser = duration)]
    pub webhook_backoff: Duration,
    /// Longest webhook retry delay.
    #[arg(long, env = "HEADROOM_WEBHOOK_BACKOFF_MAX", default_value = "1h", value_parser = duration)]
    pub webhook_backoff_max: Duration,
    /// Webhook deliveries in flight at once (all endpoints together).
    #[arg(long, env = "HEADROOM_WEBHOOK_CONCURRENCY", default_value_t = 64)]
    pub webhook_concurrency: usize,
    /// Webhook deliveries in flight at once to one endpoint.
    #[arg(long, env = "HEADROOM_WEBHOOK_PER_ENDPOINT", default_value_t = 4)]
    pub webhook_per_endpoint: usize,
    /// This process's name in the webhook consumer group (default: from
    /// the listen address); keep it stable across restarts.
    #[arg(long, env = "HEADROOM_WEBHOOK_CONSUMER")]
    pub webhook_consumer: Option<String>,
    /// How long idempotency keys are remembered (at least up to 35 days).
    #[arg(long, env = "HEADROOM_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = duration)]
    pub idempotency_window: Duration,
    /// Longest wait for Redis on behalf of one call (a write gets 3/4 of it,
    /// the read-back of a write whose outcome is unknown the rest); the call
    /// answers 503 after it.
    #[arg(long, env = "HEADROOM_REDIS_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub redis_timeout: Duration,
    /// Redis connections in the pool.
    #[arg(long, env = "HEADROOM_REDIS_POOL_SIZE", default_value_t = 8)]
    pub redis_pool_size: usize,
    /// An entitlement untouched this long gives up its actor and stays in
    /// memory in a compact form (woken without reading Redis).
    #[arg(long, env = "HEADROOM_HIBERNATE_AFTER", default_value = "10s", value_parser = duration)]
    pub hibernate_after: Duration,
    /// An entitlement untouched this long leaves memory.
    #[arg(long, env = "HEADROOM_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Longest wait of a resident entitlement between checks for expired
    /// leases and ended periods (each is also scheduled for when it falls due).
    #[arg(long, env = "HEADROOM_SWEEP_INTERVAL", default_value = "60s", value_parser = duration)]
    pub sweep_interval: Duration,
    /// Largest request body (configuration and batch requests).
    #[arg(long, env = "HEADROOM_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest time a client may take to send a request's head, and then its
    /// body (slow clients cannot hold a worker; 408 after it).
    #[arg(long, env = "HEADROOM_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub request_timeout: Duration,
    /// Most open connections served at once, all workers together; a connection
    /// beyond it is answered `503 too_many_connections` and closed.
    #[arg(long, env = "HEADROOM_MAX_CONNECTIONS", default_value_t = 25_000)]
    pub max_connections: usize,
    /// Seat activations and releases allowed per second per token, in bursts
    /// of as many (429 `rate_limited` beyond); 0 = unlimited.
    #[arg(long, env = "HEADROOM_CHURN_LIMIT", default_value_t = 0)]
    pub churn_limit: u32,
    /// Comma-separated scrape tokens: when given, `/metrics` answers only to
    /// one of these or an admin token.
    #[arg(long, env = "HEADROOM_METRICS_TOKENS", hide_env_values = true)]
    pub metrics_tokens: Option<String>,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "HEADROOM_WORKERS")]
    pub workers: Option<usize>,
    /// How long a graceful shutdown waits for calls in flight.
    #[arg(long, env = "HEADROOM_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub shutdown_timeout: Duration,
    /// Comma-separated entitlement ids that get series of their own in
    /// `/metrics` (at most 50: labels stay bounded).
    #[arg(long, env = "HEADROOM_WATCH_ENTITLEMENTS")]
    pub watch_entitlements: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "HEADROOM_LOG_JSON", value_parser = BoolishValueParser::new(), action = ArgAction::SetTrue)]
    pub log_json: bool,
}

fn generate_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

impl Settings {
    /// The tokens to accept; generated ones are printed once, to stdout.
    pub fn auth(&self) -> Auth {
        if self.no_auth {
            tracing::warn!("--no-auth: every call is accepted without a token");
            return Auth::disabled().with_churn_limit(self.churn_limit);
        }
        let mut admin = self.admin_tokens.as_deref().map(tokens).unwrap_or_default();
        let mut client = self
            .client_tokens
            .as_deref()
            .map(tokens)
            .unwrap_or_default();
        if admin.is_empty() {
            admin.push(generate_token("adm"));
            println!("generated admin token (shown once): {}", admin[0]);
        }
        if client.is_empty() {
            client.push(generate_token("cli"));
            println!("generated client token (shown once): {}", client[0]);
        }
        let scrape = self
            .metrics_tokens
            .as_deref()
            .map(tokens)
            .unwrap_or_default();
        Auth::new(admin, client)
            .with_metrics_tokens(scrape)
            .with_churn_limit(self.churn_limit)
    }

    pub fn store(&self) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match &self.redis_url {
            Some(url) => {
                let mut rs = RedisSettings::new(url.clone());
                rs.prefix = self.redis_prefix.clone();
                rs.stream_maxlen = self.stream_maxlen;
                rs.idempotency_window = self.idempotency_window;
                rs.timeout = self.redis_timeout;
                rs.pool_size = self.redis_pool_size.max(1);
                tracing::info!(prefix = %rs.prefix, "persisting to Redis");
                Arc::new(RedisStore::start(rs)?)
            }
            None => {
                tracing::warn!(
                    "no --redis-url: running on the embedded in-memory store; NOTHING SURVIVES A RESTART"
                );
                Arc::new(MemoryStore::new(
                    self.stream_maxlen as usize,
                    self.idempotency_window,
                ))
            }
        })
    }

    /// The watched entitlements, checked.
    pub fn watched(&self) -> anyhow::Result<HashSet<EntitlementId>> {
        let ids = self
            .watch_entitlements
            .as_deref()
            .map(tokens)
            .unwrap_or_default();
        anyhow::ensure!(
            ids.len() <= MAX_WATCHED,
            "--watch-entitlements names {} entitlements; at most {MAX_WATCHED}",
            ids.len()
        );
        ids.iter()
            .map(|id| {
                EntitlementId::parse(id).map_err(|e| anyhow::anyhow!("--watch-entitlements: {e}"))
            })
            .collect()
    }

    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            idle_timeout: self.idle_timeout,
            hibernate_after: self.hibernate_after,
            sweep_interval: self.sweep_interval,
            idempotency_window: self.idempotency_window,
            hourly_retention: self.hourly_retention,
            daily_retention: self.daily_retention,
            ..EngineSettings::default()
        }
    }

    pub fn webhook_settings(&self) -> WebhookSettings {
        WebhookSettings {
            timeout: self.webhook_timeout,
            retry_for: self.webhook_retry_for,
            backoff: self.webhook_backoff,
            backoff_max: self.webhook_backoff_max.max(self.webhook_backoff),
            concurrency: self.webhook_concurrency.max(1),
            per_endpoint: self.webhook_per_endpoint.max(1),
            consumer: self
                .webhook_consumer
                .clone()
                .unwrap_or_else(|| format!("headroom@{}", self.listen)),
            ..WebhookSettings::default()
        }
    }

    /// Runs the tracker until SIGINT/SIGTERM, then drains and exits.
    pub async fn run(self) -> anyhow::Result<()> {
        let store = self.store()?;
        let webhooks = match &self.redis_url {
            Some(url) => Some(Webhooks::new(url, &self.redis_prefix, self.redis_timeout)?),
            None => None,
        };
        let dispatcher = webhooks
            .clone()
            .map(|w| Dispatcher::start(w, self.webhook_settings()));
        let settings = EngineSettings {
            watched: Arc::new(self.watched()?),
            ..self.engine_settings()
        };
        let engine = Engine::new(store, Arc::new(SystemClock), settings);
        let state = web::Data::new(AppState {
            engine: engine.clone(),
            auth: self.auth(),
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                request_timeout: self.request_timeout,
                max_connections: self.max_connections.max(1),
            },
            metrics: crate::telemetry::metrics(),
            webhooks,
        });
        let listener = TcpListener::bind(self.listen)?;
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        tracing::info!(listen = %listener.local_addr()?, workers, "headroom is listening");
        http::serve(listener, state, workers, self.shutdown_timeout, true)?.await?;
        tracing::info!("HTTP stopped; writing what is left");
        if let Some(d) = dispatcher {
            d.stop().await;
        }
        engine.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_watch(list: &str) -> anyhow::Result<HashSet<EntitlementId>> {
        Settings::parse_from(["headroom", "--watch-entitlements", list]).watched()
    }

    #[test]
    fn watched_entitlements_are_checked_and_bounded() {
        assert_eq!(with_watch("acme, globex").map(|w| w.len()).ok(), Some(2));
        let fifty: Vec<String> = (0..50).map(|i| format!("e{i}")).collect();
        assert!(with_watch(&fifty.join(",")).is_ok());
        let fifty_one: Vec<String> = (0..51).map(|i| format!("e{i}")).collect();
        assert!(with_watch(&fifty_one.join(",")).is_err(), "at most 50");
        assert!(with_watch("not an id").is_err());
    }
}
