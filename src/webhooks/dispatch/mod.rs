//! The dispatcher: reads the event stream through the consumer group and
//! delivers each entry to the endpoints that want it (see the module docs
//! of [`super`] for the guarantees).
//!
//! - [`reader`]: reads the stream (and takes over what others left),
//!   acknowledges entries once settled.
//! - [`deliver`]: each endpoint's queue and worker, the signed request and
//!   its log entry.
//! - [`retry`]: the retry schedule in Redis, backoff and the dead letters.

mod deliver;
mod reader;
mod retry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use redis::Value;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::{Stored, WebhookSettings, Webhooks};
use crate::store::{StoreError, reply_text as text};

/// An entry of one bucket's event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StreamEntry {
    bucket: usize,
    /// The stream's `ms-seq` id.
    id: String,
}

impl std::fmt::Display for StreamEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.bucket, self.id)
    }
}

/// One event for one endpoint, as parked in the retry schedule.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Delivery {
    /// `{webhook}:{bucket}-{stream entry}`: what a receiver can
    /// de-duplicate on.
    id: String,
    hook: String,
    /// `{bucket}-{stream entry}`.
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
    entry: StreamEntry,
    remaining: AtomicUsize,
    tx: mpsc::UnboundedSender<StreamEntry>,
}

impl Ack {
    fn settled(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.tx.send(self.entry.clone());
        }
    }
}

/// A delivery on its way to an endpoint's worker.
struct DeliveryJob {
    d: Delivery,
    ack: Option<Arc<Ack>>,
    /// Claimed from the retry schedule (so it is there until settled).
    parked: bool,
}

impl DeliveryJob {
    fn settled(&self) {
        if let Some(a) = &self.ack {
            a.settled();
        }
    }
}

struct Endpoint {
    stored: Arc<Stored>,
    queue: mpsc::Sender<DeliveryJob>,
}

/// What the dispatcher's tasks share.
struct DispatchState {
    api: Webhooks,
    settings: WebhookSettings,
    client: reqwest::Client,
    global: Arc<Semaphore>,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    acks: mpsc::UnboundedSender<StreamEntry>,
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The HTTP client (with its timeouts and redirect policy) could not be built.
    #[error("the webhook HTTP client could not be built")]
    Client(#[source] reqwest::Error),
}

/// The running dispatcher; stops when [`Dispatcher::stop`] is called.
pub struct Dispatcher {
    state: Arc<DispatchState>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// `ms-seq` stream ids, ordered.
pub(super) fn entry_id(s: &str) -> (u64, u64) {
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
    pub fn start(api: Webhooks, settings: WebhookSettings) -> Result<Dispatcher, DispatchError> {
        let (stop, _) = watch::channel(false);
        let (acks, acks_rx) = mpsc::unbounded_channel();
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("headroom-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(DispatchError::Client)?;
        let state = Arc::new(DispatchState {
            api,
            global: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            client,
            endpoints: Mutex::new(HashMap::new()),
            acks,
        });
        let tasks = vec![
            tokio::spawn(state.clone().reader(stop.subscribe())),
            tokio::spawn(state.clone().acker(acks_rx, stop.subscribe())),
            tokio::spawn(state.clone().retrier(stop.subscribe())),
        ];
        Ok(Dispatcher { state, stop, tasks })
    }

    /// Stops reading and retrying; deliveries in flight are abandoned and
    /// their entries, not acknowledged, are resumed by the next start.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Dropping the queues ends the endpoints' workers.
        self.state.lock().clear();
    }
}

/// `value` as JSON for Redis; a value that cannot be encoded is never
/// written (as an empty string or otherwise).
fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::not_sent(what, "could not be encoded", Some(e.into())))
}

/// Sleeps `d`, or returns true at once when asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

impl DispatchState {
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

    /// Hands an entry to each endpoint that wants it.
    fn dispatch(self: &Arc<Self>, entry: StreamEntry, fields: HashMap<String, String>) {
        let (Some(kind), Some(event)) = (fields.get("type"), fields.get("event")) else {
            // Trimmed from the stream before it was delivered: nothing to send.
            let _ = self.acks.send(entry);
            return;
        };
        let position = entry_id(&entry.id);
        let targets: Vec<(String, mpsc::Sender<DeliveryJob>)> = self
            .lock()
            .values()
            .filter(|e| e.stored.hook.wants(kind) && position > e.stored.after(entry.bucket))
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
            let job = DeliveryJob {
                d: Delivery {
                    id: format!("{hook}:{entry}"),
                    hook,
                    entry: entry.to_string(),
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
                let state = self.clone();
                tokio::spawn(async move {
                    let due = now_ms() + state.settings.backoff.as_millis() as i64;
                    match state.park(&job.d, due, None).await {
                        Ok(()) => job.settled(),
                        Err(e) => {
                            tracing::warn!(error = %crate::store::chain(&e), "parking a webhook delivery failed")
                        }
                    }
                });
            }
        }
    }
}
