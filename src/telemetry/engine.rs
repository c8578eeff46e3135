//! The series the entitlement actors update: decisions and denials, the
//! mailbox wait, events published, and the watched entitlements' gauges.

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::{DenyReason, Entitlement, Outcome};

thread_local! {
    /// Counter handles by (metric, operation, label value): looking a
    /// labelled metric up in the registry on every decision costs more than
    /// the decision.
    static COUNTERS: std::cell::RefCell<HashMap<(&'static str, &'static str, &'static str), metrics::Counter>> =
        std::cell::RefCell::new(HashMap::new());
    static MAILBOX_WAIT: metrics::Histogram = metrics::histogram!("headroom_actor_mailbox_wait_seconds");
}

fn count(name: &'static str, op: &'static str, label: &'static str, value: &'static str) {
    COUNTERS.with(|c| {
        c.borrow_mut()
            .entry((name, op, value))
            .or_insert_with(|| metrics::counter!(name, "operation" => op, label => value))
            .increment(1)
    });
}

/// One decision of operation `op` (`activate`, `usage`) made durable.
pub(crate) fn decision(op: &'static str, outcome: Outcome, reason: Option<DenyReason>) {
    count("headroom_decisions_total", op, "outcome", outcome.as_str());
    if let Some(reason) = reason {
        count("headroom_denials_total", op, "reason", reason.as_str());
    }
}

/// How long a call waited in an actor's mailbox.
pub(crate) fn mailbox_wait(waited: Duration) {
    MAILBOX_WAIT.with(|h| h.record(waited.as_secs_f64()));
}

/// Events of `kinds` known to be in the stream.
pub(crate) fn events_published<'a>(kinds: impl IntoIterator<Item = &'a &'static str>) {
    for kind in kinds {
        metrics::counter!("headroom_events_published_total", "type" => *kind).increment(1);
    }
}

/// The series of a watched entitlement: seats and each feature's usage
/// against what was purchased and the cap.
pub(crate) fn watched(e: &Entitlement) {
    let id = e.id.to_string();
    let view = e.view();
    metrics::gauge!("headroom_watched_seats_in_use", "entitlement" => id.clone())
        .set(view.seats.in_use as f64);
    metrics::gauge!("headroom_watched_seats_purchased", "entitlement" => id.clone())
        .set(view.seats.purchased as f64);
    if let Some(cap) = view.seats.hard_cap.finite() {
        metrics::gauge!("headroom_watched_seats_hard_cap", "entitlement" => id.clone())
            .set(cap as f64);
    }
    for (feature, f) in &view.features {
        let labels = [
            ("entitlement", id.clone()),
            ("feature", feature.to_string()),
        ];
        metrics::gauge!("headroom_watched_usage", &labels).set(f.used as f64);
        metrics::gauge!("headroom_watched_usage_included", &labels).set(f.included as f64);
    }
}
