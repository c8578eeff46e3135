//! Whether Redis answers, logged as it changes rather than per failure:
//! "unreachable" once (with where and why), "still unreachable" at most
//! every [`REMIND_EVERY`], "reachable again" with how long it was down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a Redis that stays down is mentioned again.
pub(super) const REMIND_EVERY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Down {
    since: Option<Instant>,
    last_said: Option<Instant>,
}

pub(super) struct Reachability {
    /// `host:port` (never the URL: it may carry a password).
    at: String,
    down: Mutex<Down>,
}

impl Reachability {
    /// For Redis at `urls` (one, or a cluster's seeds).
    pub fn new(urls: &[String]) -> Self {
        use redis::IntoConnectionInfo;
        let at = urls
            .iter()
            .map(|url| {
                url.as_str()
                    .into_connection_info()
                    .map(|i| i.addr().to_string())
                    .unwrap_or_else(|_| "the configured address".into())
            })
            .collect::<Vec<_>>()
            .join(",");
        Reachability {
            at,
            down: Mutex::new(Down::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Down> {
        self.down.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Redis did not answer (or could not be connected to).
    pub fn failed(&self, cause: &(dyn std::error::Error + 'static)) {
        let now = Instant::now();
        let mut d = self.lock();
        match (d.since, d.last_said) {
            (None, _) => {
                tracing::warn!(redis = %self.at, cause = %crate::store::chain(cause), "Redis is unreachable; calls answer 503 until it is back");
                d.since = Some(now);
                d.last_said = Some(now);
            }
            (Some(since), Some(said)) if now.duration_since(said) >= REMIND_EVERY => {
                tracing::warn!(redis = %self.at, down_for = ?now.duration_since(since), cause = %crate::store::chain(cause), "Redis is still unreachable");
                d.last_said = Some(now);
            }
            _ => {}
        }
    }

    /// Redis answered.
    pub fn answered(&self) {
        // Cheap when nothing was down: one uncontended lock.
        let mut d = self.lock();
        if let Some(since) = d.since.take() {
            d.last_said = None;
            tracing::info!(redis = %self.at, down_for = ?since.elapsed(), "Redis is reachable again");
        }
    }
}
