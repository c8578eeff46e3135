//! Delivering: each endpoint's worker, bounded per endpoint and overall,
//! the signed request, and its entry in the delivery log.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use tokio::sync::{Semaphore, mpsc};

use super::{Delivery, DeliveryJob, DispatchState, encode, now_ms};
use crate::store::{StoreError, chain};
use crate::webhooks::{
    ID_HEADER, LOG_KEPT, LogEntry, SIGNATURE_HEADER, Stored, TIMESTAMP_HEADER, sign,
};

impl DispatchState {
    pub(super) fn add_log(
        &self,
        pipe: &mut redis::Pipeline,
        hook: &str,
        entry: &LogEntry,
    ) -> Result<(), StoreError> {
        let key = self.api.keys.webhook_log(hook);
        let entry = encode("webhook log", entry)?;
        pipe.cmd("LPUSH")
            .arg(&key)
            .arg(entry)
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(LOG_KEPT - 1)
            .ignore();
        Ok(())
    }

    /// Delivers one endpoint's queue, at most `per_endpoint` at a time and
    /// within the shared cap.
    pub(super) async fn worker(self: Arc<Self>, hook: String, mut rx: mpsc::Receiver<DeliveryJob>) {
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
            let state = self.clone();
            tokio::spawn(async move {
                state.attempt(&stored, job).await;
                drop((mine, shared));
            });
        }
    }

    async fn attempt(&self, stored: &Stored, job: DeliveryJob) {
        let d = &job.d;
        let started = Instant::now();
        let now = Utc::now();
        let timestamp = now.timestamp();
        let result = self
            .client
            .post(&stored.hook.url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents+json",
            )
            // Standard Webhooks: the delivery's id (the same on a retry),
            // when it was sent, and one signature per signing secret.
            .header(ID_HEADER, &d.id)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                sign(
                    stored.signing_secrets(now),
                    &d.id,
                    timestamp,
                    d.event.as_bytes(),
                ),
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
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(String::from));
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
            // Delivered either way: a lost log line does not make it undelivered.
            let mut pipe = redis::pipe();
            if let Err(e) = self.add_log(&mut pipe, &d.hook, &log) {
                tracing::warn!(error = %chain(&e), "logging a webhook delivery failed");
            }
            if job.parked {
                self.add_unpark(&mut pipe, &d.id);
            }
            if let Err(e) = self.api.run::<()>("webhook log", &pipe).await {
                tracing::warn!(error = %chain(&e), "recording a webhook delivery failed");
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
            Err(e) => {
                tracing::warn!(error = %crate::store::chain(&e), "recording a failed webhook delivery failed")
            }
        }
    }
}
