//! The `POST /v1/usage/batch` wire format: decoding a batch into per-event
//! requests (each event valid or not on its own) and encoding the results in
//! input order. Public so that benches and fuzzing reach it directly.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::problem::{ApiError, Kind};
use crate::domain::{Amount, EntitlementId, FeatureKey, IdempotencyKey, UsageDecision};
use crate::engine::{EngineError, UsageReply, UsageRequest};

/// Most events in one `POST /v1/usage/batch`.
pub const MAX_BATCH_EVENTS: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchEvent {
    entitlement: EntitlementId,
    feature: FeatureKey,
    amount: Amount,
    #[serde(default)]
    idempotency_key: Option<IdempotencyKey>,
}

/// One decoded event: a request for the engine, or why it is invalid.
pub type DecodedEvent = Result<(EntitlementId, UsageRequest), ApiError>;

/// Decodes a batch body. Fails as a whole only when the body itself is
/// malformed or carries too many events; a bad event fails in its slot.
pub fn decode(body: &[u8]) -> Result<Vec<DecodedEvent>, ApiError> {
    let batch: BatchBody<'_> = crate::domain::json::decode_borrowed(body)?;
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::new(
            Kind::BatchTooLarge,
            format!(
                "{} events; at most {MAX_BATCH_EVENTS} per batch",
                batch.events.len()
            ),
        ));
    }
    Ok(batch
        .events
        .iter()
        .map(|raw| {
            let ev: BatchEvent = crate::domain::json::decode_str(raw.get())?;
            Ok((
                ev.entitlement,
                UsageRequest {
                    feature: ev.feature,
                    amount: ev.amount,
                    idempotency_key: ev.idempotency_key,
                },
            ))
        })
        .collect())
}

/// One event's answer: decided here, or relayed as the node that owns
/// its entitlement answered it.
pub enum Slot {
    Decided(Result<UsageReply, ApiError>),
    Relayed(Box<RawValue>),
}

impl From<Result<UsageReply, EngineError>> for Slot {
    fn from(r: Result<UsageReply, EngineError>) -> Self {
        Slot::Decided(r.map_err(ApiError::from))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchResult<'a> {
    Decision(&'a UsageDecision),
    Error { error: super::problem::Problem<'a> },
    Relayed(&'a RawValue),
}

#[derive(Serialize)]
struct Results<'a> {
    results: Vec<BatchResult<'a>>,
}

/// Encodes the results, one per event, in input order.
pub fn encode(results: &[Slot]) -> Result<Vec<u8>, serde_json::Error> {
    let slots = results
        .iter()
        .map(|r| match r {
            Slot::Decided(Ok(reply)) => BatchResult::Decision(&reply.decision),
            Slot::Decided(Err(e)) => BatchResult::Error { error: e.problem() },
            Slot::Relayed(raw) => BatchResult::Relayed(raw),
        })
        .collect();
    serde_json::to_vec(&Results { results: slots })
}

#[derive(Serialize)]
struct OutEvent<'a> {
    entitlement: &'a EntitlementId,
    feature: &'a FeatureKey,
    amount: Amount,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a IdempotencyKey>,
}

#[derive(Serialize)]
struct OutBatch<'a> {
    events: Vec<OutEvent<'a>>,
}

/// A batch body of `events` (one owner's part of a batch, sent on to it).
pub fn encode_events<'a>(
    events: impl IntoIterator<Item = &'a (EntitlementId, UsageRequest)>,
) -> Result<Vec<u8>, serde_json::Error> {
    let events = events
        .into_iter()
        .map(|(id, r)| OutEvent {
            entitlement: id,
            feature: &r.feature,
            amount: r.amount,
            idempotency_key: r.idempotency_key.as_ref(),
        })
        .collect();
    serde_json::to_vec(&OutBatch { events })
}

#[derive(Deserialize)]
struct RelayedResults {
    results: Vec<Box<RawValue>>,
}

/// The results of a batch answered by another node: `expected` slots, or
/// `None` when its answer is not that.
pub fn decode_results(body: &[u8], expected: usize) -> Option<Vec<Box<RawValue>>> {
    let r: RelayedResults = serde_json::from_slice(body).ok()?;
    (r.results.len() == expected).then_some(r.results)
}

/// The slots of a decoded batch while its valid events are with the engine.
pub struct Pending {
    slots: Vec<Option<Slot>>,
    valid_idx: Vec<usize>,
}

/// Takes the valid events out for the engine, keeping the others' errors.
pub fn split(decoded: Vec<DecodedEvent>) -> (Pending, Vec<(EntitlementId, UsageRequest)>) {
    let mut slots = Vec::with_capacity(decoded.len());
    let mut valid = Vec::with_capacity(decoded.len());
    let mut valid_idx = Vec::with_capacity(decoded.len());
    for (i, d) in decoded.into_iter().enumerate() {
        match d {
            Ok(ev) => {
                valid_idx.push(i);
                valid.push(ev);
                slots.push(None);
            }
            Err(e) => slots.push(Some(Slot::Decided(Err(e)))),
        }
    }
    (Pending { slots, valid_idx }, valid)
}

impl Pending {
    /// Puts the answers for the valid events back into their slots.
    pub fn fill(mut self, answers: impl IntoIterator<Item = Slot>) -> Vec<Slot> {
        for (i, r) in self.valid_idx.into_iter().zip(answers) {
            self.slots[i] = Some(r);
        }
        self.slots
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Slot::Decided(Err(EngineError::ActorUnavailable.into()))))
            .collect()
    }
}
