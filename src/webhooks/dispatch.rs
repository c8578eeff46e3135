//! The dispatcher: reads the event stream through the consumer group and
//! delivers each entry to the endpoints that want it (see the module docs
//! of [`super`] for the guarantees).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use redis::Value;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::{GROUP, LOG_KEPT, LogEntry, SIGNATURE_HEADER, Stored, WebhookSettings, Webhooks, sign};
use crate::store::{StoreError, reply_text as text};

/// Claims the deliveries whose next attempt is due, for `lease` ms: should
/// this process die before it settles them, they fall due again.
const CLAIM_LUA: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local d = redis.call('HGET', KEYS[2], id)
  if d then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    out[#out + 1] = d
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
";

/// With no endpoint registered, moves the group to the stream's end instead
/// of reading every entry; atomic with registration (also a script), so an
/// endpoint registered meanwhile stops it.
const SKIP_LUA: &str = r"
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('XGROUP', 'SETID', KEYS[2], ARGV[1], '$')
  return 1
end
return 0
";

/// Entries of the dead-letter stream kept (approximately).
const DEAD_KEPT: u64 = 100_000;
/// Stream entries read at once.
const READ_COUNT: usize = 100;

/// One event for one endpoint, as parked in the retry schedule.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Delivery {
    /// `{webhook}:{stream entry}`: what a receiver can de-duplicate on.
    id: String,
    hook: String,
    entry: String,
    kind: String,
    event: String,
    /// The attempt this is (1 for the first).
    attempt: u32,
    /// When it was first tried or parked (ms): retries stop `retry_for`
    /// after it.
    first_at: i64,
}

/// Acknowledges a stream entry once each of its deliveries is settled
/// (delivered, parked in the retry schedule, or dead-lettered).
struct Ack {
    entry: String,
    remaining: AtomicUsize,
    tx: mpsc::UnboundedSender<String>,
}

impl Ack {
    fn settled(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.tx.send(self.entry.clone());
        }
    }
}

struct Job {
    d: Delivery,
    ack: Option<Arc<Ack>>,
    /// Claimed from the retry schedule (so it is there until settled).
    parked: bool,
}

impl Job {
    fn settled(&self) {
        if let Some(a) = &self.ack {
            a.settled();
        }
    }
}

struct Endpoint {
    stored: Arc<Stored>,
    queue: mpsc::Sender<Job>,
}

struct Inner {
    api: Webhooks,
    settings: WebhookSettings,
    client: reqwest::Client,
    global: Arc<Semaphore>,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    acks: mpsc::UnboundedSender<String>,
}

/// The running dispatcher; stops when [`Dispatcher::stop`] is called.
pub struct Dispatcher {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// `ms-seq` stream ids, ordered.
fn entry_id(s: &str) -> (u64, u64) {
    let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// `[[id, [field, value, ...]], ...]` → `(id, fields)`; a trimmed entry
/// (its fields gone) has none.
fn entries(v: &Value) -> Vec<(String, HashMap<String, String>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            let mut fields = HashMap::new();
            if let Some(Value::Array(kv)) = pair.get(1) {
                for c in kv.chunks(2) {
                    if let (Some(k), Some(v)) = (c.first().and_then(text), c.get(1).and_then(text))
                    {
                        fields.insert(k, v);
                    }
                }
            }
            Some((id, fields))
        })
        .collect()
}

impl Dispatcher {
    /// Starts the dispatcher's tasks on the current tokio runtime.
    pub fn start(api: Webhooks, settings: WebhookSettings) -> Dispatcher {
        let (stop, _) = watch::channel(false);
        let (acks, acks_rx) = mpsc::unbounded_channel();
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("headroom-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            api,
            global: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            client,
            endpoints: Mutex::new(HashMap::new()),
            acks,
        });
        let tasks = vec![
            tokio::spawn(inner.clone().reader(stop.subscribe())),
            tokio::spawn(inner.clone().acker(acks_rx, stop.subscribe())),
            tokio::spawn(inner.clone().retrier(stop.subscribe())),
        ];
        Dispatcher { inner, stop, tasks }
    }

    /// Stops reading and retrying; deliveries in flight are abandoned and
    /// their entries, not acknowledged, are resumed by the next start.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Dropping the queues ends the endpoints' workers.
        self.inner.lock().clear();
    }
}

/// The delay (ms) before attempt `attempt + 1`: doubling from `backoff`, at
/// most `backoff_max`, times `jitter` (0.8 to 1.2, so that the retries of
/// many deliveries spread).
fn backoff(settings: &WebhookSettings, attempt: u32, jitter: f64) -> i64 {
    let base = settings.backoff.as_millis() as f64;
    let max = settings.backoff_max.as_millis() as f64;
    let d = (base * 2f64.powi(attempt.saturating_sub(1).min(40) as i32)).min(max);
    (d * jitter) as i64
}

/// Sleeps `d`, or returns true at once when asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Endpoint>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the registrations; starts a queue and worker for each new
    /// endpoint and drops those of deleted ones.
    async fn refresh(self: &Arc<Self>) -> Result<(), StoreError> {
        let stored = self.api.stored().await?;
        let mut endpoints = self.lock();
        endpoints.retain(|id, _| stored.iter().any(|s| &s.hook.id == id));
        for s in stored {
            let stored = Arc::new(s);
            match endpoints.get_mut(&stored.hook.id) {
                Some(e) => e.stored = stored,
                None => {
                    let per = self.settings.per_endpoint.max(1);
                    // Short: a delivery must not wait in memory for longer
                    // than a claim lasts; the rest waits in the retry schedule.
                    let (queue, rx) = mpsc::channel(per * 4);
                    tokio::spawn(self.clone().worker(stored.hook.id.clone(), rx));
                    endpoints.insert(stored.hook.id.clone(), Endpoint { stored, queue });
                }
            }
        }
        metrics::gauge!("headroom_webhook_endpoints").set(endpoints.len() as f64);
        Ok(())
    }

    async fn reader(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let block = (self.api.timeout / 2).min(Duration::from_secs(1));
        let mut ready = false;
        // Entries this consumer read before a restart and never finished.
        let mut backlog = Some("0-0".to_string());
        let mut last_refresh = Instant::now() - Duration::from_secs(60);
        let mut last_claim = Instant::now();
        let mut claim_from = "0-0".to_string();
        loop {
            if *stop.borrow() {
                return;
            }
            let step: Result<(), StoreError> = async {
                if !ready {
                    self.api.ensure_group().await?;
                    ready = true;
                }
                if last_refresh.elapsed() >= Duration::from_secs(1) {
                    self.refresh().await?;
                    last_refresh = Instant::now();
                }
                if backlog.is_none() && self.lock().is_empty() {
                    // Nobody to deliver to: skip the entries rather than
                    // read and acknowledge each.
                    let mut pipe = redis::pipe();
                    pipe.cmd("EVAL")
                        .arg(SKIP_LUA)
                        .arg(2)
                        .arg(self.api.hooks_key())
                        .arg(self.api.stream())
                        .arg(GROUP);
                    let (skipped,): (i64,) = self.api.run(&pipe).await?;
                    if skipped == 1 {
                        // A registration is seen within this pause.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        last_refresh = Instant::now() - Duration::from_secs(60);
                        return Ok(());
                    }
                    self.refresh().await?;
                    last_refresh = Instant::now();
                }
                if last_claim.elapsed() >= self.settings.claim_after / 4 {
                    last_claim = Instant::now();
                    claim_from = self.take_over(&claim_from).await?;
                }
                let mut pipe = redis::pipe();
                let cmd = pipe
                    .cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&self.settings.consumer)
                    .arg("COUNT")
                    .arg(READ_COUNT);
                if backlog.is_none() {
                    cmd.arg("BLOCK").arg(block.as_millis() as u64);
                }
                cmd.arg("STREAMS")
                    .arg(self.api.stream())
                    .arg(backlog.as_deref().unwrap_or(">"));
                let (reply,): (Value,) = self.api.run(&pipe).await?;
                let read = match &reply {
                    Value::Array(streams) => streams
                        .first()
                        .and_then(|s| match s {
                            Value::Array(kv) => kv.get(1).map(entries),
                            _ => None,
                        })
                        .unwrap_or_default(),
                    Value::Map(streams) => {
                        streams.first().map(|(_, v)| entries(v)).unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                if backlog.is_some() {
                    backlog = read.last().map(|(id, _)| id.clone());
                }
                if !read.is_empty() {
                    // Registrations read after the entries: an endpoint
                    // registered before an entry was added is known here.
                    self.refresh().await?;
                    last_refresh = Instant::now();
                }
                for (id, fields) in read {
                    self.dispatch(id, fields);
                }
                Ok(())
            }
            .await;
            if let Err(e) = step {
                tracing::warn!(error = %e, "webhook dispatcher cannot read the stream");
                ready = false;
                if stopped(&mut stop, Duration::from_secs(1)).await {
                    return;
                }
            }
        }
    }

    /// Takes over entries another consumer (or this one, before a failure)
    /// read and left unfinished for `claim_after`; returns where to go on.
    async fn take_over(self: &Arc<Self>, from: &str) -> Result<String, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XAUTOCLAIM")
            .arg(self.api.stream())
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg(self.settings.claim_after.as_millis() as u64)
            .arg(from)
            .arg("COUNT")
            .arg(READ_COUNT);
        let (reply,): (Value,) = self.api.run(&pipe).await?;
        let Value::Array(parts) = reply else {
            return Ok("0-0".into());
        };
        let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let claimed = parts.get(1).map(entries).unwrap_or_default();
        if !claimed.is_empty() {
            self.refresh().await?;
        }
        for (id, fields) in claimed {
            tracing::info!(entry = %id, "webhook dispatcher took over an unfinished entry");
            self.dispatch(id, fields);
        }
        Ok(next)
    }

    /// Hands an entry to each endpoint that wants it.
    fn dispatch(self: &Arc<Self>, entry: String, fields: HashMap<String, String>) {
        let (Some(kind), Some(event)) = (fields.get("type"), fields.get("event")) else {
            // Trimmed from the stream before it was delivered: nothing to send.
            let _ = self.acks.send(entry);
            return;
        };
        let position = entry_id(&entry);
        let targets: Vec<(String, mpsc::Sender<Job>)> = self
            .lock()
            .values()
            .filter(|e| e.stored.hook.wants(kind) && position > entry_id(&e.stored.after_entry))
            .map(|e| (e.stored.hook.id.clone(), e.queue.clone()))
            .collect();
        if targets.is_empty() {
            let _ = self.acks.send(entry);
            return;
        }
        let ack = Arc::new(Ack {
            entry: entry.clone(),
            remaining: AtomicUsize::new(targets.len()),
            tx: self.acks.clone(),
        });
        for (hook, queue) in targets {
            let job = Job {
                d: Delivery {
                    id: format!("{hook}:{entry}"),
                    hook,
                    entry: entry.clone(),
                    kind: kind.clone(),
                    event: event.clone(),
                    attempt: 1,
                    first_at: now_ms(),
                },
                ack: Some(ack.clone()),
                parked: false,
            };
            if let Err(e) = queue.try_send(job) {
                // The endpoint is behind: its delivery waits in Redis.
                let job = e.into_inner();
                let inner = self.clone();
                tokio::spawn(async move {
                    let due = now_ms() + inner.settings.backoff.as_millis() as i64;
                    match inner.park(&job.d, due, None).await {
                        Ok(()) => job.settled(),
                        Err(e) => tracing::warn!(error = %e, "parking a webhook delivery failed"),
                    }
                });
            }
        }
    }

    /// Acknowledges settled entries, a batch at a time.
    async fn acker(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut batch = Vec::new();
        loop {
            let stopping = tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => {
                        batch.push(id);
                        false
                    }
                    None => return,
                },
                _ = stop.changed() => true,
            };
            while let Ok(id) = rx.try_recv() {
                batch.push(id);
            }
            if !batch.is_empty() {
                let mut pipe = redis::pipe();
                pipe.cmd("XACK")
                    .arg(self.api.stream())
                    .arg(GROUP)
                    .arg(&batch)
                    .ignore();
                match self.api.run::<()>(&pipe).await {
                    Ok(()) => batch.clear(),
                    Err(e) => {
                        tracing::warn!(error = %e, "acknowledging webhook entries failed");
                        if !stopping && stopped(&mut stop, Duration::from_millis(500)).await {
                            return;
                        }
                    }
                }
            }
            // On a graceful stop, what was settled is acknowledged first, so
            // the next start does not send it again.
            if stopping {
                return;
            }
        }
    }

    /// Claims parked deliveries as they fall due, and keeps the backlog
    /// gauges current.
    async fn retrier(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = (self.settings.backoff / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        let mut last_gauges = Instant::now() - Duration::from_secs(60);
        loop {
            if stopped(&mut stop, every).await {
                return;
            }
            if let Err(e) = self.claim_due().await {
                tracing::warn!(error = %e, "claiming webhook retries failed");
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                last_gauges = Instant::now();
                let mut pipe = redis::pipe();
                pipe.cmd("ZCARD").arg(self.api.key("webhooks:retry"));
                pipe.cmd("XLEN").arg(self.api.key("webhooks:dead"));
                if let Ok((backlog, dead)) = self.api.run::<(u64, u64)>(&pipe).await {
                    metrics::gauge!("headroom_webhook_retry_backlog").set(backlog as f64);
                    metrics::gauge!("headroom_webhook_dead_letters").set(dead as f64);
                }
            }
        }
    }

    async fn claim_due(self: &Arc<Self>) -> Result<(), StoreError> {
        let now = now_ms();
        let lease = now + self.settings.claim_after.as_millis() as i64;
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(CLAIM_LUA)
            .arg(2)
            .arg(self.api.key("webhooks:retry"))
            .arg(self.api.key("webhooks:pending"))
            .arg(now)
            .arg(lease)
            .arg(READ_COUNT);
        let (claimed,): (Vec<String>,) = self.api.run(&pipe).await?;
        for raw in claimed {
            let Ok(d) = serde_json::from_str::<Delivery>(&raw) else {
                continue;
            };
            let queue = self.lock().get(&d.hook).map(|e| e.queue.clone());
            match queue {
                None => {
                    // The endpoint was deleted: its deliveries go with it.
                    metrics::counter!("headroom_webhook_deliveries_total", "outcome" => "dropped")
                        .increment(1);
                    self.unpark(&d.id).await?;
                }
                Some(q) => {
                    if let Err(e) = q.try_send(Job {
                        d,
                        ack: None,
                        parked: true,
                    }) {
                        let job = e.into_inner();
                        let due = now_ms() + self.settings.backoff.as_millis() as i64;
                        self.park(&job.d, due, None).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds to `pipe` taking a delivery out of the retry schedule.
    fn add_unpark(&self, pipe: &mut redis::Pipeline, id: &str) {
        pipe.cmd("ZREM")
            .arg(self.api.key("webhooks:retry"))
            .arg(id)
            .ignore()
            .cmd("HDEL")
            .arg(self.api.key("webhooks:pending"))
            .arg(id)
            .ignore();
    }

    /// Takes a delivery out of the retry schedule.
    async fn unpark(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        self.add_unpark(pipe.atomic(), id);
        self.api.run(&pipe).await
    }

    /// Puts a delivery in the retry schedule, due at `due` (ms), with the
    /// log entry of the attempt that failed, if any.
    async fn park(&self, d: &Delivery, due: i64, log: Option<&LogEntry>) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(self.api.key("webhooks:pending"))
            .arg(&d.id)
            .arg(serde_json::to_string(d).unwrap_or_default())
            .ignore()
            .cmd("ZADD")
            .arg(self.api.key("webhooks:retry"))
            .arg(due)
            .arg(&d.id)
            .ignore();
        if let Some(l) = log {
            self.add_log(&mut pipe, &d.hook, l);
        }
        self.api.run(&pipe).await
    }

    fn add_log(&self, pipe: &mut redis::Pipeline, hook: &str, entry: &LogEntry) {
        let key = self.api.log_key(hook);
        pipe.cmd("LPUSH")
            .arg(&key)
            .arg(serde_json::to_string(entry).unwrap_or_default())
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(LOG_KEPT - 1)
            .ignore();
    }

    /// Delivers one endpoint's queue, at most `per_endpoint` at a time and
    /// within the shared cap.
    async fn worker(self: Arc<Self>, hook: String, mut rx: mpsc::Receiver<Job>) {
        let own = Arc::new(Semaphore::new(self.settings.per_endpoint.max(1)));
        while let Some(job) = rx.recv().await {
            let (Ok(mine), Ok(shared)) = (
                own.clone().acquire_owned().await,
                self.global.clone().acquire_owned().await,
            ) else {
                return;
            };
            let stored = self.lock().get(&hook).map(|e| e.stored.clone());
            let Some(stored) = stored else {
                // Deleted meanwhile.
                metrics::counter!("headroom_webhook_deliveries_total", "outcome" => "dropped")
                    .increment(1);
                if job.parked {
                    let _ = self.unpark(&job.d.id).await;
                }
                job.settled();
                continue;
            };
            let inner = self.clone();
            tokio::spawn(async move {
                inner.attempt(&stored, job).await;
                drop((mine, shared));
            });
        }
    }

    fn backoff(&self, attempt: u32) -> i64 {
        backoff(&self.settings, attempt, rand::rng().random_range(0.8..1.2))
    }

    async fn attempt(&self, stored: &Stored, job: Job) {
        let d = &job.d;
        let started = Instant::now();
        let timestamp = Utc::now().timestamp();
        let result = self
            .client
            .post(&stored.hook.url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents+json",
            )
            .header(
                SIGNATURE_HEADER,
                sign(&stored.secret, timestamp, d.event.as_bytes()),
            )
            .header("Headroom-Webhook-Id", &stored.hook.id)
            .header("Headroom-Delivery-Id", &d.id)
            .header("Headroom-Attempt", d.attempt.to_string())
            .body(d.event.clone())
            .send()
            .await;
        let elapsed = started.elapsed();
        metrics::histogram!("headroom_webhook_delivery_duration_seconds")
            .record(elapsed.as_secs_f64());
        let (status, error) = match result {
            Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
            Ok(r) => (
                Some(r.status().as_u16()),
                Some(format!("answered HTTP {}", r.status().as_u16())),
            ),
            // Without the URL: it may carry a token of the receiver's.
            Err(e) => (None, Some(e.without_url().to_string())),
        };
        let event_id = serde_json::from_str::<serde_json::Value>(&d.event)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from))
            .unwrap_or_default();
        let mut log = LogEntry {
            delivery_id: d.id.clone(),
            event_id,
            kind: d.kind.clone(),
            attempt: d.attempt,
            outcome: "delivered".into(),
            status,
            error: error.clone(),
            at: Utc::now(),
            duration_ms: elapsed.as_millis() as u64,
        };
        let now = now_ms();
        let written = if error.is_none() {
            metrics::counter!("headroom_webhook_deliveries_total", "outcome" => "delivered")
                .increment(1);
            let mut pipe = redis::pipe();
            self.add_log(&mut pipe, &d.hook, &log);
            if job.parked {
                self.add_unpark(&mut pipe, &d.id);
            }
            // Delivered either way: a lost log line does not make it undelivered.
            if let Err(e) = self.api.run::<()>(&pipe).await {
                tracing::warn!(error = %e, "recording a webhook delivery failed");
            }
            Ok(())
        } else {
            let delay = self.backoff(d.attempt);
            let retry_for = self.settings.retry_for.as_millis() as i64;
            if now + delay - d.first_at > retry_for {
                metrics::counter!("headroom_webhook_deliveries_total", "outcome" => "dead_lettered")
                    .increment(1);
                log.outcome = "dead_lettered".into();
                self.dead_letter(d, &log).await
            } else {
                metrics::counter!("headroom_webhook_deliveries_total", "outcome" => "failed")
                    .increment(1);
                log.outcome = "failed".into();
                let next = Delivery {
                    attempt: d.attempt + 1,
                    ..d.clone()
                };
                self.park(&next, now + delay, Some(&log)).await
            }
        };
        match written {
            Ok(()) => job.settled(),
            // Not settled: the stream entry (or the claim) is taken over later.
            Err(e) => tracing::warn!(error = %e, "recording a failed webhook delivery failed"),
        }
    }

    async fn dead_letter(&self, d: &Delivery, log: &LogEntry) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(self.api.key("webhooks:dead"))
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_KEPT)
            .arg("*")
            .arg("webhook")
            .arg(&d.hook)
            .arg("delivery")
            .arg(&d.id)
            .arg("type")
            .arg(&d.kind)
            .arg("attempts")
            .arg(d.attempt)
            .arg("error")
            .arg(log.error.as_deref().unwrap_or_default())
            .arg("event")
            .arg(&d.event)
            .ignore();
        self.add_unpark(&mut pipe, &d.id);
        self.add_log(&mut pipe, &d.hook, log);
        self.api.run(&pipe).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_and_last_at_least_the_retry_window() {
        let s = WebhookSettings::default();
        assert_eq!(backoff(&s, 1, 1.0), 1_000);
        assert_eq!(backoff(&s, 2, 1.0), 2_000);
        assert_eq!(backoff(&s, 5, 1.0), 16_000);
        assert_eq!(backoff(&s, 13, 1.0), 3_600_000, "capped at an hour");
        assert_eq!(backoff(&s, 1_000, 1.0), 3_600_000, "no overflow");
        assert_eq!(backoff(&s, 3, 0.8), 3_200);
        // The dispatcher retries while the next attempt falls within
        // `retry_for` of the first: with the shortest jitter every time,
        // the last attempt is still more than 23 h after the first.
        let (mut at, mut attempt) = (0i64, 1u32);
        let window = s.retry_for.as_millis() as i64;
        loop {
            let delay = backoff(&s, attempt, 0.8);
            if at + delay > window {
                break;
            }
            at += delay;
            attempt += 1;
        }
        assert!(
            at > window - 3_600_000,
            "last attempt {at} ms after the first"
        );
        assert!(attempt > 25, "{attempt} attempts");
    }
}
