//! Reading the stream through the consumer group, taking over entries
//! other consumers left unfinished, and acknowledging settled entries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::{mpsc, watch};

use super::{DispatchState, entries, stopped, text};
use crate::store::StoreError;
use crate::webhooks::GROUP;

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

/// Stream entries read at once.
pub(super) const READ_COUNT: usize = 100;

impl DispatchState {
    pub(super) async fn reader(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let block = (self.api.timeout / 2).min(Duration::from_secs(1));
        let mut ready = false;
        let mut failing = false;
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
                        .arg(self.api.keys.webhooks())
                        .arg(self.api.keys.events())
                        .arg(GROUP);
                    let (skipped,): (i64,) = self.api.run("webhook skip", &pipe).await?;
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
                    .arg(self.settings.consumer_name())
                    .arg("COUNT")
                    .arg(READ_COUNT);
                if backlog.is_none() {
                    cmd.arg("BLOCK").arg(block.as_millis() as u64);
                }
                cmd.arg("STREAMS")
                    .arg(self.api.keys.events())
                    .arg(backlog.as_deref().unwrap_or(">"));
                let (reply,): (Value,) = self.api.run("webhook read", &pipe).await?;
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
            match step {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("webhook dispatcher reads the stream again");
                }
                Ok(()) => {}
                // Once per outage: the store logs Redis's reachability.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %crate::store::chain(&e), "webhook dispatcher cannot read the stream");
                }
                Err(e) => {
                    tracing::debug!(error = %crate::store::chain(&e), "webhook dispatcher still cannot read the stream");
                }
            }
            if failing {
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
            .arg(self.api.keys.events())
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
            tracing::info!(entry = %id, "webhook dispatcher took over an unfinished entry");
            self.dispatch(id, fields);
        }
        Ok(next)
    }

    /// Acknowledges settled entries, a batch at a time.
    pub(super) async fn acker(
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
                    .arg(self.api.keys.events())
                    .arg(GROUP)
                    .arg(&batch)
                    .ignore();
                match self.api.run::<()>("webhook ack", &pipe).await {
                    Ok(()) => batch.clear(),
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
