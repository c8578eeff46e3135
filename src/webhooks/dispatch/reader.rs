//! Reading the buckets' streams through the consumer group, taking over
//! entries other consumers left unfinished, and acknowledging settled
//! entries.
//!
//! Each bucket's stream has its own consumer group (of one name), so every
//! tracker process reads every stream and Redis shares each stream's
//! entries among them. The streams are read without blocking (a blocking
//! read names one stream, and one connection, at a time): a round reads
//! every stream, and a round that found nothing waits before the next,
//! longer each time up to [`IDLE_MAX`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, watch};

use super::{DispatchState, StreamEntry, entries, stopped, text};
use crate::store::StoreError;
use crate::webhooks::GROUP;

/// Stream entries read at once from one stream.
pub(super) const READ_COUNT: usize = 100;
/// The first wait after a round that found nothing.
const IDLE_MIN: Duration = Duration::from_millis(10);
/// The longest wait between rounds that find nothing: how late an entry
/// may be picked up on an idle tracker.
const IDLE_MAX: Duration = Duration::from_millis(250);
/// With no endpoint registered, how often the groups are moved to their
/// streams' ends (a registration is picked up within it).
const SKIP_EVERY: Duration = Duration::from_secs(1);

/// What the reader knows of one bucket's stream.
struct Bucket {
    /// Entries this consumer read before a restart and never finished:
    /// read from here first.
    backlog: Option<String>,
    /// Where the next take-over scan starts.
    claim_from: String,
}

impl DispatchState {
    pub(super) async fn reader(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let buckets = self.api.keys.buckets();
        let mut streams: Vec<Bucket> = (0..buckets)
            .map(|_| Bucket {
                backlog: Some("0-0".into()),
                claim_from: "0-0".into(),
            })
            .collect();
        let mut ready = false;
        let mut failing = false;
        let mut idle = IDLE_MIN;
        let mut last_refresh = Instant::now() - Duration::from_secs(60);
        let mut last_claim = Instant::now();
        loop {
            if *stop.borrow() {
                return;
            }
            let step: Result<usize, StoreError> = async {
                if !ready {
                    self.api.ensure_group().await?;
                    ready = true;
                }
                if last_refresh.elapsed() >= Duration::from_secs(1) {
                    self.refresh().await?;
                    last_refresh = Instant::now();
                }
                let backlog = streams.iter().any(|s| s.backlog.is_some());
                if !backlog && self.lock().is_empty() {
                    // Nobody to deliver to: skip the entries rather than
                    // read and acknowledge each.
                    if self.skip().await? {
                        return Ok(0);
                    }
                    self.refresh().await?;
                    last_refresh = Instant::now();
                }
                if last_claim.elapsed() >= self.settings.claim_after / 4 {
                    last_claim = Instant::now();
                    for (b, s) in streams.iter_mut().enumerate() {
                        s.claim_from = self.take_over(b, &s.claim_from).await?;
                    }
                }
                let reads = streams
                    .iter()
                    .enumerate()
                    .map(|(b, s)| {
                        redis::cmd("XREADGROUP")
                            .arg("GROUP")
                            .arg(GROUP)
                            .arg(self.settings.consumer_name())
                            .arg("COUNT")
                            .arg(READ_COUNT)
                            .arg("STREAMS")
                            .arg(self.api.keys.events(b))
                            .arg(s.backlog.as_deref().unwrap_or(">"))
                            .clone()
                    })
                    .collect();
                let replies = self.api.each("webhook read", reads).await?;
                let mut read = Vec::new();
                for (b, (s, reply)) in streams.iter_mut().zip(replies).enumerate() {
                    let got = stream_entries(&reply);
                    if s.backlog.is_some() {
                        s.backlog = got.last().map(|(id, _)| id.clone());
                    }
                    read.extend(
                        got.into_iter()
                            .map(|(id, fields)| (StreamEntry { bucket: b, id }, fields)),
                    );
                }
                let n = read.len();
                if n > 0 {
                    // Registrations read after the entries: an endpoint
                    // registered before an entry was added is known here.
                    self.refresh().await?;
                    last_refresh = Instant::now();
                }
                for (entry, fields) in read {
                    self.dispatch(entry, fields);
                }
                Ok(n)
            }
            .await;
            let wait = match step {
                Ok(n) => {
                    if failing {
                        failing = false;
                        tracing::info!("webhook dispatcher reads the stream again");
                    }
                    idle = if n > 0 {
                        IDLE_MIN
                    } else {
                        (idle * 2).min(IDLE_MAX)
                    };
                    (n == 0).then_some(idle)
                }
                // Once per outage: the store logs Redis's reachability.
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %crate::store::chain(&e), "webhook dispatcher cannot read the stream");
                    } else {
                        tracing::debug!(error = %crate::store::chain(&e), "webhook dispatcher still cannot read the stream");
                    }
                    failing = true;
                    ready = false;
                    Some(Duration::from_secs(1))
                }
            };
            if let Some(wait) = wait
                && stopped(&mut stop, wait).await
            {
                return;
            }
        }
    }

    /// With no endpoint registered, moves each group to its stream's last
    /// entry as read *before* the registrations were found empty: an entry
    /// added after a registration is never skipped, and one skipped before
    /// it lies before that endpoint's start anyway. Answers whether it
    /// skipped (then it has waited [`SKIP_EVERY`]).
    async fn skip(self: &Arc<Self>) -> Result<bool, StoreError> {
        let lasts = self.api.last_entries().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("HLEN").arg(self.api.keys.webhooks());
        let (registered,): (u64,) = self.api.run("webhook skip", &pipe).await?;
        if registered > 0 {
            return Ok(false);
        }
        let moves = lasts
            .iter()
            .enumerate()
            .map(|(b, last)| {
                redis::cmd("XGROUP")
                    .arg("SETID")
                    .arg(self.api.keys.events(b))
                    .arg(GROUP)
                    .arg(last)
                    .clone()
            })
            .collect();
        self.api.each("webhook skip", moves).await?;
        tokio::time::sleep(SKIP_EVERY).await;
        Ok(true)
    }

    /// Takes over entries of `bucket`'s stream another consumer (or this
    /// one, before a failure) read and left unfinished for `claim_after`;
    /// returns where to go on.
    async fn take_over(self: &Arc<Self>, bucket: usize, from: &str) -> Result<String, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XAUTOCLAIM")
            .arg(self.api.keys.events(bucket))
            .arg(GROUP)
            .arg(self.settings.consumer_name())
            .arg(self.settings.claim_after.as_millis() as u64)
            .arg(from)
            .arg("COUNT")
            .arg(READ_COUNT);
        let (reply,): (Value,) = self.api.run("webhook take over", &pipe).await?;
        let Value::Array(parts) = reply else {
            return Ok("0-0".into());
        };
        let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let claimed = parts.get(1).map(entries).unwrap_or_default();
        if !claimed.is_empty() {
            self.refresh().await?;
        }
        for (id, fields) in claimed {
            let entry = StreamEntry { bucket, id };
            tracing::info!(entry = %entry, "webhook dispatcher took over an unfinished entry");
            self.dispatch(entry, fields);
        }
        Ok(next)
    }

    /// Acknowledges settled entries, a batch at a time.
    pub(super) async fn acker(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<StreamEntry>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut batch: Vec<StreamEntry> = Vec::new();
        loop {
            let stopping = tokio::select! {
                entry = rx.recv() => match entry {
                    Some(entry) => {
                        batch.push(entry);
                        false
                    }
                    None => return,
                },
                _ = stop.changed() => true,
            };
            while let Ok(entry) = rx.try_recv() {
                batch.push(entry);
            }
            if !batch.is_empty() {
                batch.sort_by_key(|e| e.bucket);
                let acks = batch
                    .chunk_by(|a, b| a.bucket == b.bucket)
                    .map(|group| {
                        redis::cmd("XACK")
                            .arg(self.api.keys.events(group[0].bucket))
                            .arg(GROUP)
                            .arg(group.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
                            .clone()
                    })
                    .collect();
                match self.api.each("webhook ack", acks).await {
                    Ok(_) => batch.clear(),
                    Err(e) => {
                        tracing::warn!(error = %crate::store::chain(&e), "acknowledging webhook entries failed");
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
}

/// The entries of an `XREADGROUP` reply naming one stream (RESP2 or RESP3).
fn stream_entries(reply: &Value) -> Vec<(String, std::collections::HashMap<String, String>)> {
    match reply {
        Value::Array(streams) => streams
            .first()
            .and_then(|s| match s {
                Value::Array(kv) => kv.get(1).map(entries),
                _ => None,
            })
            .unwrap_or_default(),
        Value::Map(streams) => streams.first().map(|(_, v)| entries(v)).unwrap_or_default(),
        _ => Vec::new(),
    }
}
