//! What the engine answers when a call cannot be decided or made durable.

use std::sync::Arc;

use crate::domain::{EntitlementId, FeatureKey, IdempotencyKey, ValidationError};
use crate::store::{ErrorClass, StoreError};

/// Cheap to clone: one failed write answers every call it carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("entitlement {0} not found")]
    NotFound(EntitlementId),
    #[error("entitlement has no feature {0}")]
    UnknownFeature(FeatureKey),
    #[error("idempotency key {0} was already used with another payload")]
    Conflict(IdempotencyKey),
    /// A query that breaks a rule (a history range past the retention, say).
    #[error(transparent)]
    Invalid(ValidationError),
    /// Nothing was applied; the call may be sent again.
    #[error("store unavailable")]
    Unavailable(#[source] Arc<StoreError>),
    /// The entitlement's actor stopped before taking the call, again and
    /// again: nothing was applied.
    #[error("entitlement actor did not answer")]
    ActorUnavailable,
    /// The write was sent but neither confirmed nor, with Redis unreachable,
    /// read back: it may have been applied. A retry with the same
    /// idempotency key answers the first decision if it was.
    #[error("store did not confirm the write and could not be read back")]
    OutcomeUnknown(#[source] Arc<StoreError>),
    /// The write ran on the Redis primary but was not acknowledged by the
    /// replicas asked for (`--redis-wait-replicas`) in time: a failover may
    /// lose it. A retry with the same idempotency key answers the first
    /// decision if it survived.
    #[error("the write did not reach enough Redis replicas in time")]
    NotReplicated(#[source] Arc<StoreError>),
    /// What is stored for the entitlement cannot be read; trying again does
    /// not help until it is repaired.
    #[error("stored state is unreadable")]
    Corrupt(#[source] Arc<StoreError>),
    /// A write could not be encoded (a defect): it was not sent.
    #[error("the write could not be encoded")]
    Encoding(#[source] Arc<serde_json::Error>),
    #[error("the tracker is shutting down")]
    ShuttingDown,
    /// A conditional change whose condition did not hold (`If-Match` with
    /// another configuration's tag, say): nothing was applied.
    #[error("{0}")]
    PreconditionFailed(String),
}

impl From<StoreError> for EngineError {
    /// A store failure on a read, or on a write known not to have been
    /// applied.
    fn from(e: StoreError) -> Self {
        match e.class() {
            ErrorClass::Corrupt => EngineError::Corrupt(Arc::new(e)),
            _ => EngineError::Unavailable(Arc::new(e)),
        }
    }
}
