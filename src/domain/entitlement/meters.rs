//! Metered features: usage against what is included and the hard cap,
//! whole or not at all, and the threshold and overdraft transitions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::super::config::{FeatureConfig, Limit, Percent};
use super::super::event::EventData;
use super::super::ids::FeatureKey;
use super::super::period::Bounds;
use super::super::{DenyReason, Effects, Outcome, ValidationError};
use super::{Entitlement, band, is_false, is_zero, remaining};

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

/// A usage call's decision and the meter's counters after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entitlement has no feature {0}")]
pub struct UnknownFeature(pub FeatureKey);

impl Entitlement {
    pub(super) fn meter_transitions(
        &mut self,
        key: &FeatureKey,
        now: DateTime<Utc>,
        fx: &mut Effects,
    ) {
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
}
