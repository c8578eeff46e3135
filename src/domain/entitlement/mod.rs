//! The entitlement aggregate: one customer's seat pool and meters, and the
//! overdraft and hard-cap rules applied to them. The seat rules are in
//! [`seats`], the metered-usage rules in [`meters`]; this holds the
//! aggregate, its configuration changes and its housekeeping (lease expiry,
//! period ends).

mod meters;
mod seats;

pub use meters::{Amount, Meter, UnknownFeature, UsageDecision};
pub use seats::{Lease, ReleaseResult, SeatDecision, SeatPool};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::config::{EntitlementConfig, Limit};
use super::event::{Event, EventData};
use super::ids::{EntitlementId, FeatureKey};
use super::keymap::KeyMap;
use super::{Effects, Outcome};

// The state is written with every commit: fields at their default are left
// out of it (and read back as the default).
fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// Remaining headroom below purchased and in the overdraft band.
pub(super) fn remaining(value: u64, purchased: u64, cap: Limit) -> (u64, Option<u64>) {
    let soft = cap.finite().map_or(purchased, |c| purchased.min(c));
    let over = cap.finite().map(|c| c.saturating_sub(value.max(purchased)));
    (soft.saturating_sub(value), over)
}

fn band(value: u64, purchased: u64) -> Outcome {
    if value <= purchased {
        Outcome::Granted
    } else {
        Outcome::Overdraft
    }
}

/// Everything the tracker knows about one entitlement. Serialized, it is the
/// live state written with every change; the configuration is kept apart
/// (it changes rarely) and times are milliseconds, which are cheap to write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entitlement {
    pub id: EntitlementId,
    #[serde(skip)]
    pub config: EntitlementConfig,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub updated_at: DateTime<Utc>,
    /// Sequence number of the next event.
    pub next_seq: u64,
    /// Writes of this state so far; tells whether a write of unknown outcome
    /// (a timeout) reached the store.
    #[serde(default)]
    pub commits: u64,
    pub seats: SeatPool,
    pub meters: KeyMap<Meter>,
}

impl Entitlement {
    /// A new entitlement; emits `entitlement.updated` with `created: true`.
    pub fn create(
        id: EntitlementId,
        config: EntitlementConfig,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) -> Self {
        let mut e = Entitlement {
            id,
            config: EntitlementConfig::default(),
            created_at: now,
            updated_at: now,
            next_seq: 1,
            commits: 0,
            seats: SeatPool::default(),
            meters: KeyMap::default(),
        };
        e.apply_config(config, true, now, fx);
        e
    }

    /// Identifies this life of the entitlement in event ids: a deleted and
    /// re-created entitlement does not repeat ids.
    pub fn incarnation(&self) -> i64 {
        self.created_at.timestamp_millis()
    }

    /// Replaces the configuration and keeps live state. Never evicts seats;
    /// emits the transitions the new limits cause at once.
    pub fn replace_config(
        &mut self,
        config: EntitlementConfig,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) {
        self.housekeeping(now, fx);
        self.apply_config(config, false, now, fx);
    }

    fn apply_config(
        &mut self,
        config: EntitlementConfig,
        created: bool,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) {
        self.meters.retain(|k, _| config.features.contains_key(k));
        for (key, fc) in &config.features {
            let meter = self.meters.get_or_default(key);
            meter.period = fc.period.bounds(fc.period_anchor, now);
        }
        self.config = config;
        self.updated_at = now;
        self.emit(fx, now, EventData::EntitlementUpdated { created });
        self.seat_transitions(now, fx);
        let keys: Vec<FeatureKey> = self.meters.keys().cloned().collect();
        for key in keys {
            self.meter_transitions(&key, now, fx);
        }
    }

    fn emit(&mut self, fx: &mut Effects, now: DateTime<Utc>, data: EventData) {
        fx.events.push(Event {
            seq: self.next_seq,
            time: now,
            data,
        });
        self.next_seq += 1;
        fx.changed = true;
    }

    /// Expires leases that ran out and closes periods that ended. Every call
    /// runs this first; the engine's sweep timer runs it for idle entitlements.
    pub fn housekeeping(&mut self, now: DateTime<Utc>, fx: &mut Effects) {
        let mut expired_any = false;
        while let Some((at, seat)) = self.seats.expiry.first().cloned() {
            if at > now {
                break;
            }
            self.seats.remove(&seat);
            fx.seats.insert(seat.clone(), None);
            let in_use = self.seats.in_use();
            self.emit(
                fx,
                now,
                EventData::SeatExpired {
                    seat_id: seat,
                    in_use,
                    lease_expired_at: at,
                },
            );
            expired_any = true;
        }
        if expired_any {
            self.seat_transitions(now, fx);
        }
        let due: Vec<FeatureKey> = self
            .meters
            .iter()
            .filter(|(_, m)| m.period.is_some_and(|b| now >= b.end))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.roll_period(&key, now, fx);
        }
    }

    /// The earliest instant at which housekeeping has work to do.
    pub fn next_housekeeping(&self) -> Option<DateTime<Utc>> {
        let lease = self.seats.expiry.first().map(|(at, _)| *at);
        let period = self
            .meters
            .values()
            .filter_map(|m| m.period.map(|b| b.end))
            .min();
        match (lease, period) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn roll_period(&mut self, key: &FeatureKey, now: DateTime<Utc>, fx: &mut Effects) {
        let Some(fc) = self.config.features.get(key) else {
            return;
        };
        let (included, period, anchor) = (fc.included, fc.period, fc.period_anchor);
        let Some(meter) = self.meters.get_mut(key) else {
            return;
        };
        let Some(closed) = meter.period else { return };
        let next = period.bounds(anchor, now);
        let close = EventData::UsagePeriodClosed {
            feature: key.clone(),
            period_start: closed.start,
            period_end: closed.end,
            used: meter.used,
            included,
            overage: meter.used.saturating_sub(included),
            peak: meter.used,
            denied: meter.denied_period,
        };
        meter.used = 0;
        meter.thresholds_crossed.clear();
        meter.overdraft_since = None;
        meter.at_hard_cap = false;
        meter.denied_period = 0;
        meter.period = next;
        self.emit(fx, now, close);
        if let Some(b) = next {
            self.emit(
                fx,
                now,
                EventData::UsageReset {
                    feature: key.clone(),
                    period_start: b.start,
                    period_end: b.end,
                },
            );
        }
    }

    /// Whether seats or any feature are above what was purchased.
    pub fn in_overdraft(&self) -> bool {
        self.seats.overdraft_since.is_some()
            || self.meters.values().any(|m| m.overdraft_since.is_some())
    }

    /// Records the deletion event; the caller drops the state.
    pub fn delete(&mut self, now: DateTime<Utc>, fx: &mut Effects) {
        self.emit(fx, now, EventData::EntitlementDeleted {});
    }
}

#[cfg(test)]
mod tests;
