//! The retry schedule in Redis: parking failed deliveries with backoff,
//! claiming them as they fall due, and the dead-letter stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use super::reader::READ_COUNT;
use super::{Delivery, DeliveryJob, DispatchState, encode, now_ms, stopped};
use crate::store::StoreError;
use crate::webhooks::{LogEntry, WebhookSettings};

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

/// Entries of the dead-letter stream kept (approximately).
const DEAD_KEPT: u64 = 100_000;

/// The delay (ms) before attempt `attempt + 1`: doubling from `backoff`, at
/// most `backoff_max`, times `jitter` (0.8 to 1.2, so that the retries of
/// many deliveries spread).
fn backoff(settings: &WebhookSettings, attempt: u32, jitter: f64) -> i64 {
    let base = settings.backoff.as_millis() as f64;
    let max = settings.backoff_max.as_millis() as f64;
    let d = (base * 2f64.powi(attempt.saturating_sub(1).min(40) as i32)).min(max);
    (d * jitter) as i64
}

impl DispatchState {
    /// Claims parked deliveries as they fall due, and keeps the backlog
    /// gauges current.
    /// Claims parked deliveries as they fall due, and keeps the backlog
    /// gauges current.
    pub(super) async fn retrier(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = (self.settings.backoff / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        let mut last_gauges = Instant::now() - Duration::from_secs(60);
        loop {
            if stopped(&mut stop, every).await {
                return;
            }
            if let Err(e) = self.claim_due().await {
                tracing::warn!(error = %crate::store::chain(&e), "claiming webhook retries failed");
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                last_gauges = Instant::now();
                let mut pipe = redis::pipe();
                pipe.cmd("ZCARD").arg(self.api.keys.webhook_retry());
                pipe.cmd("XLEN").arg(self.api.keys.webhook_dead());
                if let Ok((backlog, dead)) =
                    self.api.run::<(u64, u64)>("webhook gauges", &pipe).await
                {
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
            .arg(self.api.keys.webhook_retry())
            .arg(self.api.keys.webhook_pending())
            .arg(now)
            .arg(lease)
            .arg(READ_COUNT);
        let (claimed,): (Vec<String>,) = self.api.run("webhook claim", &pipe).await?;
        for raw in claimed {
            let d = match serde_json::from_str::<Delivery>(&raw) {
                Ok(d) => d,
                Err(e) => {
                    // Left in the schedule: it is claimed (and logged) again
                    // when its lease runs out.
                    tracing::error!(error = %e, "a parked webhook delivery is unreadable");
                    continue;
                }
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
                    if let Err(e) = q.try_send(DeliveryJob {
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
    pub(super) fn add_unpark(&self, pipe: &mut redis::Pipeline, id: &str) {
        pipe.cmd("ZREM")
            .arg(self.api.keys.webhook_retry())
            .arg(id)
            .ignore()
            .cmd("HDEL")
            .arg(self.api.keys.webhook_pending())
            .arg(id)
            .ignore();
    }

    /// Takes a delivery out of the retry schedule.
    pub(super) async fn unpark(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        self.add_unpark(pipe.atomic(), id);
        self.api.run("webhook unpark", &pipe).await
    }

    /// Puts a delivery in the retry schedule, due at `due` (ms), with the
    /// log entry of the attempt that failed, if any.
    pub(super) async fn park(
        &self,
        d: &Delivery,
        due: i64,
        log: Option<&LogEntry>,
    ) -> Result<(), StoreError> {
        let parked = encode("webhook delivery", d)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(self.api.keys.webhook_pending())
            .arg(&d.id)
            .arg(parked)
            .ignore()
            .cmd("ZADD")
            .arg(self.api.keys.webhook_retry())
            .arg(due)
            .arg(&d.id)
            .ignore();
        if let Some(l) = log {
            self.add_log(&mut pipe, &d.hook, l)?;
        }
        self.api.run("webhook park", &pipe).await
    }

    pub(super) fn backoff(&self, attempt: u32) -> i64 {
        backoff(&self.settings, attempt, rand::rng().random_range(0.8..1.2))
    }

    pub(super) async fn dead_letter(&self, d: &Delivery, log: &LogEntry) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XADD")
            .arg(self.api.keys.webhook_dead())
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
        self.add_log(&mut pipe, &d.hook, log)?;
        self.api.run("webhook dead letter", &pipe).await
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
