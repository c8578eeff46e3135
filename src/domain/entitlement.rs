//! The entitlement aggregate: one customer's seat pool and meters, and the
//! overdraft and hard-cap rules applied to them.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::config::{EntitlementConfig, FeatureConfig, Limit, Percent};
use super::event::{Event, EventData};
use super::ids::{EntitlementId, FeatureKey, SeatId};
use super::keymap::KeyMap;
use super::period::Bounds;
use super::{DenyReason, Effects, Outcome, ValidationError};

/// A usage amount: at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Amount(u64);

impl Amount {
    pub fn new(v: u64) -> Result<Self, ValidationError> {
        if v == 0 {
            Err(ValidationError::new("amount", "must be at least 1"))
        } else {
            Ok(Amount(v))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for Amount {
    type Error = ValidationError;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        Amount::new(v)
    }
}

impl From<Amount> for u64 {
    fn from(a: Amount) -> u64 {
        a.0
    }
}

/// One active seat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub activated_at: DateTime<Utc>,
    /// `None`: held until released.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Lease {
    /// Compact form stored per seat: `activated_ms:expires_ms` (`-` for none).
    pub fn encode(&self) -> String {
        match self.expires_at {
            Some(e) => format!(
                "{}:{}",
                self.activated_at.timestamp_millis(),
                e.timestamp_millis()
            ),
            None => format!("{}:-", self.activated_at.timestamp_millis()),
        }
    }

    pub fn decode(s: &str) -> Option<Lease> {
        let (a, e) = s.split_once(':')?;
        let activated_at = DateTime::from_timestamp_millis(a.parse().ok()?)?;
        let expires_at = match e {
            "-" => None,
            e => Some(DateTime::from_timestamp_millis(e.parse().ok()?)?),
        };
        Some(Lease {
            activated_at,
            expires_at,
        })
    }
}

/// The seats in use and the seat-side flags and counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeatPool {
    /// Persisted one field per seat, not with the core state.
    #[serde(skip)]
    active: HashMap<SeatId, Lease>,
    /// Leases by expiry, so that expiring is O(expired).
    #[serde(skip)]
    expiry: BTreeSet<(DateTime<Utc>, SeatId)>,
    #[serde(
        default,
        with = "chrono::serde::ts_milliseconds_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub overdraft_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub at_hard_cap: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub peak: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub denied_total: u64,
    /// Highest seats in use since the pool entered overdraft (the seats'
    /// "current period" in the overdraft report); 0 when not in overdraft.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overdraft_peak: u64,
    /// Activations denied since the pool entered overdraft.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overdraft_denied: u64,
}

// The state is written with every commit: fields at their default are left
// out of it (and read back as the default).
fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl SeatPool {
    pub fn in_use(&self) -> u64 {
        self.active.len() as u64
    }

    pub fn leases(&self) -> impl Iterator<Item = (&SeatId, &Lease)> {
        self.active.iter()
    }

    pub fn lease(&self, seat: &SeatId) -> Option<&Lease> {
        self.active.get(seat)
    }

    fn insert(&mut self, seat: SeatId, lease: Lease) {
        if let Some(old) = self.active.insert(seat.clone(), lease)
            && let Some(e) = old.expires_at
        {
            self.expiry.remove(&(e, seat.clone()));
        }
        if let Some(e) = lease.expires_at {
            self.expiry.insert((e, seat));
        }
    }

    fn remove(&mut self, seat: &SeatId) -> Option<Lease> {
        let old = self.active.remove(seat)?;
        if let Some(e) = old.expires_at {
            self.expiry.remove(&(e, seat.clone()));
        }
        Some(old)
    }

    /// Restores a seat read back from the store.
    pub fn restore(&mut self, seat: SeatId, lease: Lease) {
        self.insert(seat, lease);
    }
}

/// One metered feature's counters in its current period.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meter {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub used: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Bounds>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds_crossed: Vec<Percent>,
    #[serde(
        default,
        with = "chrono::serde::ts_milliseconds_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub overdraft_since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub at_hard_cap: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub denied_period: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub denied_total: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub used_total: u64,
}

/// A seat activation's decision and the pool's counters after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeatDecision {
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenyReason>,
    pub seat_id: SeatId,
    /// True when the seat was already active and only its lease was renewed.
    pub refreshed: bool,
    pub in_use: u64,
    pub purchased: u64,
    /// The effective cap: the lower of the vendor's hard cap and the customer's.
    pub hard_cap: Limit,
    pub remaining_purchased: u64,
    /// `None` when the cap is unlimited.
    pub remaining_overdraft: Option<u64>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// A usage call's decision and the meter's counters after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageDecision {
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenyReason>,
    pub feature: FeatureKey,
    pub amount: u64,
    pub used: u64,
    pub included: u64,
    pub hard_cap: Limit,
    pub remaining_purchased: u64,
    pub remaining_overdraft: Option<u64>,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseResult {
    pub seat_id: SeatId,
    /// False when the seat was not active (not an error).
    pub released: bool,
    pub in_use: u64,
    pub purchased: u64,
    pub hard_cap: Limit,
    pub remaining_purchased: u64,
    pub remaining_overdraft: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entitlement has no feature {0}")]
pub struct UnknownFeature(pub FeatureKey);

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

    fn seat_transitions(&mut self, now: DateTime<Utc>, fx: &mut Effects) {
        let in_use = self.seats.in_use();
        let purchased = self.config.seats.purchased;
        let cap = self.config.seats.effective_cap();
        match (in_use > purchased, self.seats.overdraft_since) {
            (true, None) => {
                self.seats.overdraft_since = Some(now);
                self.seats.overdraft_peak = in_use;
                self.seats.overdraft_denied = 0;
                self.emit(
                    fx,
                    now,
                    EventData::SeatOverdraftEntered {
                        in_use,
                        purchased,
                        hard_cap: cap,
                    },
                );
            }
            (false, Some(since)) => {
                self.seats.overdraft_since = None;
                self.seats.overdraft_peak = 0;
                self.seats.overdraft_denied = 0;
                self.emit(
                    fx,
                    now,
                    EventData::SeatOverdraftExited {
                        in_use,
                        purchased,
                        overdraft_since: Some(since),
                    },
                );
            }
            _ => {}
        }
        let at_cap = in_use > 0 && cap.finite().is_some_and(|c| in_use >= c);
        if at_cap && !self.seats.at_hard_cap {
            self.seats.at_hard_cap = true;
            self.emit(
                fx,
                now,
                EventData::SeatHardCapReached {
                    in_use,
                    hard_cap: cap,
                },
            );
        } else if !at_cap && self.seats.at_hard_cap {
            self.seats.at_hard_cap = false;
            fx.changed = true;
        }
        if in_use > self.seats.peak {
            self.seats.peak = in_use;
            fx.changed = true;
        }
        if self.seats.overdraft_since.is_some() && in_use > self.seats.overdraft_peak {
            self.seats.overdraft_peak = in_use;
            fx.changed = true;
        }
    }

    fn meter_transitions(&mut self, key: &FeatureKey, now: DateTime<Utc>, fx: &mut Effects) {
        let Some(fc) = self.config.features.get(key) else {
            return;
        };
        let (included, cap) = (fc.included, fc.effective_cap());
        let Some(meter) = self.meters.get_mut(key) else {
            return;
        };
        let used = meter.used;
        let mut out = Vec::new();
        if used > 0 {
            for &t in &fc.thresholds {
                if !meter.thresholds_crossed.contains(&t) && t.reached(used, included) {
                    meter.thresholds_crossed.push(t);
                    out.push(EventData::UsageThresholdCrossed {
                        feature: key.clone(),
                        threshold: t,
                        used,
                        included,
                    });
                }
            }
        }
        if used > included && meter.overdraft_since.is_none() {
            meter.overdraft_since = Some(now);
            out.push(EventData::UsageOverdraftEntered {
                feature: key.clone(),
                used,
                included,
                hard_cap: cap,
            });
        } else if used <= included && meter.overdraft_since.is_some() {
            meter.overdraft_since = None;
            fx.changed = true;
        }
        let at_cap = used > 0 && cap.finite().is_some_and(|c| used >= c);
        if at_cap && !meter.at_hard_cap {
            meter.at_hard_cap = true;
            out.push(EventData::UsageHardCapReached {
                feature: key.clone(),
                used,
                hard_cap: cap,
            });
        } else if !at_cap && meter.at_hard_cap {
            meter.at_hard_cap = false;
            fx.changed = true;
        }
        for data in out {
            self.emit(fx, now, data);
        }
    }

    fn seat_counters(&self) -> (u64, u64, Limit, u64, Option<u64>) {
        let in_use = self.seats.in_use();
        let purchased = self.config.seats.purchased;
        let cap = self.config.seats.effective_cap();
        let (rp, ro) = remaining(in_use, purchased, cap);
        (in_use, purchased, cap, rp, ro)
    }

    /// Activates a seat, or renews the lease of an active one (a refresh is
    /// never a second seat, and is not evicted when limits were lowered).
    pub fn activate(
        &mut self,
        seat: &SeatId,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) -> SeatDecision {
        self.housekeeping(now, fx);
        let refreshed = self.seats.active.contains_key(seat);
        let denial = self.config.blocked(now).or_else(|| {
            let next = self.seats.in_use() + 1;
            (!refreshed && !self.config.seats.effective_cap().allows(next))
                .then_some(DenyReason::HardCap)
        });
        if let Some(reason) = denial {
            self.seats.denied_total += 1;
            if self.seats.overdraft_since.is_some() {
                self.seats.overdraft_denied += 1;
            }
            let (in_use, _, cap, _, _) = self.seat_counters();
            self.emit(
                fx,
                now,
                EventData::SeatDenied {
                    seat_id: seat.clone(),
                    reason,
                    in_use,
                    hard_cap: cap,
                },
            );
            return self.seat_decision(seat, Outcome::Denied, Some(reason), refreshed);
        }
        let lease = Lease {
            activated_at: self.seats.active.get(seat).map_or(now, |l| l.activated_at),
            expires_at: self
                .config
                .seats
                .lease_seconds
                .map(|s| now + Duration::seconds(s as i64)),
        };
        self.seats.insert(seat.clone(), lease);
        fx.seats.insert(seat.clone(), Some(lease));
        fx.changed = true;
        self.seat_transitions(now, fx);
        let outcome = band(self.seats.in_use(), self.config.seats.purchased);
        self.seat_decision(seat, outcome, None, refreshed)
    }

    fn seat_decision(
        &self,
        seat: &SeatId,
        outcome: Outcome,
        reason: Option<DenyReason>,
        refreshed: bool,
    ) -> SeatDecision {
        let (in_use, purchased, hard_cap, remaining_purchased, remaining_overdraft) =
            self.seat_counters();
        SeatDecision {
            outcome,
            reason,
            seat_id: seat.clone(),
            refreshed,
            in_use,
            purchased,
            hard_cap,
            remaining_purchased,
            remaining_overdraft,
            lease_expires_at: self.seats.active.get(seat).and_then(|l| l.expires_at),
        }
    }

    /// Releases a seat; releasing an inactive seat is not an error.
    pub fn release(
        &mut self,
        seat: &SeatId,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) -> ReleaseResult {
        self.housekeeping(now, fx);
        let released = self.seats.remove(seat).is_some();
        if released {
            fx.seats.insert(seat.clone(), None);
            fx.changed = true;
            self.seat_transitions(now, fx);
        }
        let (in_use, purchased, hard_cap, remaining_purchased, remaining_overdraft) =
            self.seat_counters();
        ReleaseResult {
            seat_id: seat.clone(),
            released,
            in_use,
            purchased,
            hard_cap,
            remaining_purchased,
            remaining_overdraft,
        }
    }

    /// Consumes `amount` whole or not at all.
    pub fn consume(
        &mut self,
        key: &FeatureKey,
        amount: Amount,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) -> Result<UsageDecision, UnknownFeature> {
        self.housekeeping(now, fx);
        let Some(fc) = self.config.features.get(key) else {
            return Err(UnknownFeature(key.clone()));
        };
        let cap = fc.effective_cap();
        let blocked = self.config.blocked(now);
        let meter = self.meters.get_or_default(key);
        let next = meter.used.checked_add(amount.get());
        let denial = blocked.or_else(|| match next {
            Some(n) if cap.allows(n) => None,
            _ => Some(DenyReason::HardCap),
        });
        if let Some(reason) = denial {
            meter.denied_period += 1;
            meter.denied_total += 1;
            let used = meter.used;
            self.emit(
                fx,
                now,
                EventData::UsageDenied {
                    feature: key.clone(),
                    amount: amount.get(),
                    reason,
                    used,
                    hard_cap: cap,
                },
            );
            return Ok(self.usage_decision(key, amount, Outcome::Denied, Some(reason)));
        }
        meter.used = next.unwrap_or(meter.used);
        meter.used_total = meter.used_total.saturating_add(amount.get());
        fx.changed = true;
        let outcome = band(meter.used, fc.included);
        self.meter_transitions(key, now, fx);
        Ok(self.usage_decision(key, amount, outcome, None))
    }

    fn usage_decision(
        &self,
        key: &FeatureKey,
        amount: Amount,
        outcome: Outcome,
        reason: Option<DenyReason>,
    ) -> UsageDecision {
        let fc: Option<&FeatureConfig> = self.config.features.get(key);
        let meter = self.meters.get(key);
        let used = meter.map_or(0, |m| m.used);
        let included = fc.map_or(0, |f| f.included);
        let cap = fc.map_or(Limit::Finite(0), |f| f.effective_cap());
        let (remaining_purchased, remaining_overdraft) = remaining(used, included, cap);
        let period = meter.and_then(|m| m.period);
        UsageDecision {
            outcome,
            reason,
            feature: key.clone(),
            amount: amount.get(),
            used,
            included,
            hard_cap: cap,
            remaining_purchased,
            remaining_overdraft,
            period_start: period.map(|b| b.start),
            period_end: period.map(|b| b.end),
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
