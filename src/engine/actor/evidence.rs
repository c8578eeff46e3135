//! The evidence a write carries besides the state: what each decision adds
//! to the hourly and daily history, the recent-denials index and the
//! billing records, and where the entitlement stands for the overdraft
//! report and totals.

use chrono::{DateTime, Utc};

use super::EntitlementActor;
use super::commit::PendingWrite;
use crate::domain::{BucketSize, Entitlement, EventData, Outcome};
use crate::engine::UsageReply;
use crate::store::{HistoryWrite, OverdraftCounts, Records};

/// Whether an entitlement is in overdraft (seats or any feature), and by
/// how many seats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Standing {
    pub in_overdraft: bool,
    pub seats_over: u64,
}

impl Standing {
    pub fn of(state: Option<&Entitlement>) -> Self {
        state.map_or_else(Standing::default, |e| Standing {
            in_overdraft: e.in_overdraft(),
            seats_over: e.seats.in_use().saturating_sub(e.config.seats.purchased),
        })
    }

    /// The change from `before` to this, for the store's totals.
    pub fn since(self, before: Standing) -> OverdraftCounts {
        OverdraftCounts {
            entitlements: i64::from(self.in_overdraft) - i64::from(before.in_overdraft),
            seats: self.seats_over as i64 - before.seats_over as i64,
        }
    }
}

fn ms(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl EntitlementActor {
    /// Notes what a decision adds to the history, the recent-denials index
    /// and the billing records (from its events and the usage it granted).
    pub(super) fn note_evidence<'a>(
        &mut self,
        granted: impl Iterator<Item = &'a UsageReply>,
        now: DateTime<Utc>,
    ) {
        let pending = &mut self.pending;
        let mut denied = false;
        for ev in &pending.fx.events {
            match &ev.data {
                EventData::SeatDenied { .. } => {
                    pending.history.seat_denied(now);
                    denied = true;
                }
                EventData::UsageDenied { feature, .. } => {
                    pending.history.usage_denied(now, feature);
                    denied = true;
                }
                EventData::UsagePeriodClosed { .. } => pending.periods.push(ev.clone()),
                _ => {}
            }
        }
        if denied {
            pending.denied_at = Some(now.timestamp_millis());
        }
        for r in granted {
            if !r.replayed && r.decision.outcome != Outcome::Denied {
                pending
                    .history
                    .usage_added(now, &r.decision.feature, r.decision.amount);
            }
        }
        if let Some(e) = &self.state
            && (!pending.fx.seats.is_empty() || e.seats.in_use() > 0)
            && pending.fx.changed
        {
            pending.history.seats(now, e.seats.in_use());
        }
    }

    /// The records `pending`'s write carries (its billing records encoded
    /// in [`PendingWrite::encode`]).
    pub(super) fn evidence(&self, pending: &mut PendingWrite, standing: Standing) -> Records {
        let settings = &self.core.settings;
        let (writes, seats_written) = std::mem::take(&mut pending.history).plan(self.seats_written);
        pending.seats_written = seats_written;
        let history = writes
            .into_iter()
            .map(|w| HistoryWrite {
                hour_expire_at: w.hour + BucketSize::Hour.step_ms() + ms(settings.hourly_retention),
                day_expire_at: BucketSize::Day.start(w.hour)
                    + BucketSize::Day.step_ms()
                    + ms(settings.daily_retention),
                hour: w.hour,
                hour_ops: w.hour_ops,
                day_ops: w.day_ops,
            })
            .collect();
        Records {
            // Added when it enters overdraft, and once after each load (which
            // heals an index written before it existed); removed when it leaves.
            in_overdraft: if standing.in_overdraft {
                (!self.committed_standing.in_overdraft || !self.indexed).then_some(true)
            } else if self.committed_standing.in_overdraft || self.state.is_none() {
                Some(false)
            } else {
                None
            },
            denied_at: pending.denied_at.take(),
            history,
            // The clock is read only for a write that closes a period.
            periods_expire_at: if pending.periods.is_empty() {
                0
            } else {
                let now = self.core.clock.now().timestamp_millis();
                now.saturating_add(ms(settings.daily_retention))
            },
            periods: Vec::new(),
        }
    }
}
