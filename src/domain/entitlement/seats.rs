//! Seats: the pool of active leases, activation against the hard cap,
//! release, and the overdraft transitions of the pool.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::super::config::Limit;
use super::super::event::EventData;
use super::super::ids::SeatId;
use super::super::{DenyReason, Effects, Outcome};
use super::{Entitlement, band, is_false, is_zero, remaining};

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
    pub(super) active: HashMap<SeatId, Lease>,
    /// Leases by expiry, so that expiring is O(expired).
    #[serde(skip)]
    pub(super) expiry: BTreeSet<(DateTime<Utc>, SeatId)>,
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

    pub(super) fn insert(&mut self, seat: SeatId, lease: Lease) {
        if let Some(old) = self.active.insert(seat.clone(), lease)
            && let Some(e) = old.expires_at
        {
            self.expiry.remove(&(e, seat.clone()));
        }
        if let Some(e) = lease.expires_at {
            self.expiry.insert((e, seat));
        }
    }

    pub(super) fn remove(&mut self, seat: &SeatId) -> Option<Lease> {
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

/// A seat activation's decision and the pool's counters after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// The pool's counters, as every seat answer carries them.
struct SeatCounters {
    in_use: u64,
    purchased: u64,
    hard_cap: Limit,
    remaining_purchased: u64,
    remaining_overdraft: Option<u64>,
}

impl Entitlement {
    pub(super) fn seat_transitions(&mut self, now: DateTime<Utc>, fx: &mut Effects) {
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

    fn seat_counters(&self) -> SeatCounters {
        let in_use = self.seats.in_use();
        let purchased = self.config.seats.purchased;
        let hard_cap = self.config.seats.effective_cap();
        let (remaining_purchased, remaining_overdraft) = remaining(in_use, purchased, hard_cap);
        SeatCounters {
            in_use,
            purchased,
            hard_cap,
            remaining_purchased,
            remaining_overdraft,
        }
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
            let c = self.seat_counters();
            self.emit(
                fx,
                now,
                EventData::SeatDenied {
                    seat_id: seat.clone(),
                    reason,
                    in_use: c.in_use,
                    hard_cap: c.hard_cap,
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
        let c = self.seat_counters();
        SeatDecision {
            outcome,
            reason,
            seat_id: seat.clone(),
            refreshed,
            in_use: c.in_use,
            purchased: c.purchased,
            hard_cap: c.hard_cap,
            remaining_purchased: c.remaining_purchased,
            remaining_overdraft: c.remaining_overdraft,
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
        let c = self.seat_counters();
        ReleaseResult {
            seat_id: seat.clone(),
            released,
            in_use: c.in_use,
            purchased: c.purchased,
            hard_cap: c.hard_cap,
            remaining_purchased: c.remaining_purchased,
            remaining_overdraft: c.remaining_overdraft,
        }
    }
}
