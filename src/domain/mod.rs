//! The pure rules of headroom: configuration, seat pools, usage meters,
//! decisions and transition events. Nothing here does I/O, reads a clock or
//! awaits: every operation takes `now` and records what it changed in
//! [`Effects`], which the engine persists.

mod config;
mod entitlement;
mod event;
mod history;
mod ids;
pub mod json;
mod keymap;
mod period;
mod schema;
mod view;

pub use config::{
    CustomerCaps, EntitlementConfig, FeatureConfig, Limit, MAX_FEATURES, MAX_LEASE_SECONDS,
    Percent, SeatConfig,
};
pub use entitlement::{
    Amount, Entitlement, Lease, Meter, ReleaseResult, SeatDecision, SeatPool, UnknownFeature,
    UsageDecision,
};
pub use event::{CloudEvent, EVENT_KINDS, Event, EventData};
pub use history::{BucketRecord, BucketSize, BucketWrites, FieldOp, HistoryDelta, SeatsWritten};
pub use ids::{EntitlementId, FeatureKey, IdempotencyKey, SeatId};
pub use keymap::KeyMap;
pub use period::{Bounds, Period};
pub use view::{EntitlementView, FeatureView, SeatView, SeatsView};

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Input that breaks a rule of the contract, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The answer to every seat or usage call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Within what was purchased.
    Granted,
    /// Allowed, in the overdraft band between purchased and the hard cap.
    Overdraft,
    /// Past the effective cap, or the entitlement is disabled or expired.
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Granted => "granted",
            Outcome::Overdraft => "overdraft",
            Outcome::Denied => "denied",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The effective cap (vendor's hard cap or customer's ceiling) would be passed.
    HardCap,
    Disabled,
    Expired,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::HardCap => "hard_cap",
            DenyReason::Disabled => "disabled",
            DenyReason::Expired => "expired",
        }
    }
}

/// What a run of operations changed beyond the entitlement's core fields:
/// the events to publish and the seats to write or remove. The engine keeps
/// one of these per pending write, so many calls share it.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<Event>,
    /// Seat id to its new lease, or `None` when it was released or expired.
    pub seats: HashMap<SeatId, Option<Lease>>,
    /// Whether anything at all changed (a denial counts: it bumps counters).
    pub changed: bool,
}
