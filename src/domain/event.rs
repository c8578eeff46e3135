//! Threshold crossings and other transitions, as the stream publishes them.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::DenyReason;
use super::config::{Limit, Percent};
use super::ids::{FeatureKey, SeatId};

/// One transition of an entitlement, numbered by its per-entitlement sequence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub data: EventData,
}

/// An event's `data`: which fields go with which `type` is in the variant
/// names (`SeatOverdraftEntered` is `seat.overdraft_entered`, …).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EventData {
    SeatOverdraftEntered {
        in_use: u64,
        purchased: u64,
        hard_cap: Limit,
    },
    SeatOverdraftExited {
        in_use: u64,
        purchased: u64,
        overdraft_since: Option<DateTime<Utc>>,
    },
    SeatHardCapReached {
        in_use: u64,
        hard_cap: Limit,
    },
    SeatDenied {
        seat_id: SeatId,
        reason: DenyReason,
        in_use: u64,
        hard_cap: Limit,
    },
    SeatExpired {
        seat_id: SeatId,
        in_use: u64,
        lease_expired_at: DateTime<Utc>,
    },
    UsageThresholdCrossed {
        feature: FeatureKey,
        threshold: Percent,
        used: u64,
        included: u64,
    },
    UsageOverdraftEntered {
        feature: FeatureKey,
        used: u64,
        included: u64,
        hard_cap: Limit,
    },
    UsageHardCapReached {
        feature: FeatureKey,
        used: u64,
        hard_cap: Limit,
    },
    UsageDenied {
        feature: FeatureKey,
        amount: u64,
        reason: DenyReason,
        used: u64,
        hard_cap: Limit,
    },
    UsageReset {
        feature: FeatureKey,
        period_start: DateTime<Utc>,
        period_end: DateTime<Utc>,
    },
    UsagePeriodClosed {
        feature: FeatureKey,
        period_start: DateTime<Utc>,
        period_end: DateTime<Utc>,
        used: u64,
        included: u64,
        overage: u64,
        peak: u64,
        denied: u64,
    },
    EntitlementUpdated {
        created: bool,
    },
    EntitlementDeleted {},
}

impl EventData {
    /// The event type of the product contract.
    pub fn kind(&self) -> &'static str {
        match self {
            EventData::SeatOverdraftEntered { .. } => "seat.overdraft_entered",
            EventData::SeatOverdraftExited { .. } => "seat.overdraft_exited",
            EventData::SeatHardCapReached { .. } => "seat.hard_cap_reached",
            EventData::SeatDenied { .. } => "seat.denied",
            EventData::SeatExpired { .. } => "seat.expired",
            EventData::UsageThresholdCrossed { .. } => "usage.threshold_crossed",
            EventData::UsageOverdraftEntered { .. } => "usage.overdraft_entered",
            EventData::UsageHardCapReached { .. } => "usage.hard_cap_reached",
            EventData::UsageDenied { .. } => "usage.denied",
            EventData::UsageReset { .. } => "usage.reset",
            EventData::UsagePeriodClosed { .. } => "usage.period_closed",
            EventData::EntitlementUpdated { .. } => "entitlement.updated",
            EventData::EntitlementDeleted {} => "entitlement.deleted",
        }
    }
}

/// Every event type, for metrics and documentation.
pub const EVENT_KINDS: [&str; 13] = [
    "seat.overdraft_entered",
    "seat.overdraft_exited",
    "seat.hard_cap_reached",
    "seat.denied",
    "seat.expired",
    "usage.threshold_crossed",
    "usage.overdraft_entered",
    "usage.hard_cap_reached",
    "usage.denied",
    "usage.reset",
    "usage.period_closed",
    "entitlement.updated",
    "entitlement.deleted",
];

/// The CloudEvents 1.0 document written to the stream.
#[derive(Serialize)]
pub struct CloudEvent<'a> {
    pub specversion: &'static str,
    pub id: String,
    pub source: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub subject: &'a str,
    pub time: DateTime<Utc>,
    pub datacontenttype: &'static str,
    pub data: &'a EventData,
}

impl Event {
    /// The id is `{entitlement}:{incarnation}:{seq}`: deterministic, so that a
    /// consumer can de-duplicate, and distinct for a re-created entitlement.
    pub fn to_cloud_event(
        &self,
        entitlement: &str,
        incarnation: i64,
        source: &str,
    ) -> Result<String, serde_json::Error> {
        let ce = CloudEvent {
            specversion: "1.0",
            id: format!("{entitlement}:{incarnation}:{}", self.seq),
            source,
            kind: self.data.kind(),
            subject: entitlement,
            time: self.time,
            datacontenttype: "application/json",
            data: &self.data,
        };
        serde_json::to_string(&ce)
    }
}
