//! Read models of an entitlement, as `GET` answers them (and as the
//! command line reads them back: one definition for both).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::config::{EntitlementConfig, Limit, Percent};
use super::entitlement::{Entitlement, remaining};
use super::ids::{EntitlementId, FeatureKey, SeatId};

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntitlementView {
    pub id: EntitlementId,
    pub config: EntitlementConfig,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub seats: SeatsView,
    pub features: BTreeMap<FeatureKey, FeatureView>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SeatsView {
    pub in_use: u64,
    pub purchased: u64,
    pub hard_cap: Limit,
    pub remaining_purchased: u64,
    pub remaining_overdraft: Option<u64>,
    pub peak: u64,
    pub overdraft: bool,
    pub overdraft_since: Option<DateTime<Utc>>,
    pub at_hard_cap: bool,
    pub denied_total: u64,
    /// Highest seats in use since the pool entered overdraft (0 outside it).
    pub overdraft_peak: u64,
    /// Activations denied since the pool entered overdraft.
    pub overdraft_denied: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureView {
    pub used: u64,
    pub included: u64,
    pub hard_cap: Limit,
    pub remaining_purchased: u64,
    pub remaining_overdraft: Option<u64>,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    pub overdraft: bool,
    pub overdraft_since: Option<DateTime<Utc>>,
    pub at_hard_cap: bool,
    pub thresholds_crossed: Vec<Percent>,
    pub denied_period: u64,
    pub denied_total: u64,
    pub used_total: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SeatView {
    pub seat_id: SeatId,
    pub activated_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

impl Entitlement {
    pub fn view(&self) -> EntitlementView {
        let sc = &self.config.seats;
        let in_use = self.seats.in_use();
        let cap = sc.effective_cap();
        let (remaining_purchased, remaining_overdraft) = remaining(in_use, sc.purchased, cap);
        let features = self
            .config
            .features
            .iter()
            .map(|(key, fc)| {
                let m = self.meters.get(key).cloned().unwrap_or_default();
                let cap = fc.effective_cap();
                let (rp, ro) = remaining(m.used, fc.included, cap);
                let view = FeatureView {
                    used: m.used,
                    included: fc.included,
                    hard_cap: cap,
                    remaining_purchased: rp,
                    remaining_overdraft: ro,
                    period_start: m.period.map(|b| b.start),
                    period_end: m.period.map(|b| b.end),
                    overdraft: m.overdraft_since.is_some(),
                    overdraft_since: m.overdraft_since,
                    at_hard_cap: m.at_hard_cap,
                    thresholds_crossed: m.thresholds_crossed,
                    denied_period: m.denied_period,
                    denied_total: m.denied_total,
                    used_total: m.used_total,
                };
                (key.clone(), view)
            })
            .collect();
        EntitlementView {
            id: self.id.clone(),
            config: self.config.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            seats: SeatsView {
                in_use,
                purchased: sc.purchased,
                hard_cap: cap,
                remaining_purchased,
                remaining_overdraft,
                peak: self.seats.peak,
                overdraft: self.seats.overdraft_since.is_some(),
                overdraft_since: self.seats.overdraft_since,
                at_hard_cap: self.seats.at_hard_cap,
                denied_total: self.seats.denied_total,
                overdraft_peak: self.seats.overdraft_peak,
                overdraft_denied: self.seats.overdraft_denied,
            },
            features,
        }
    }

    /// Active seats, ordered by seat id.
    pub fn seat_list(&self) -> Vec<SeatView> {
        let mut seats: Vec<SeatView> = self
            .seats
            .leases()
            .map(|(id, l)| SeatView {
                seat_id: id.clone(),
                activated_at: l.activated_at,
                lease_expires_at: l.expires_at,
            })
            .collect();
        seats.sort_by(|a, b| a.seat_id.cmp(&b.seat_id));
        seats
    }
}
