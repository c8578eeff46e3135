//! Route handlers: parse at the edge, call the engine, shape the answer.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::web::{self, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Scope;
use super::batch;
use super::problem::{ApiError, Kind};
use crate::domain::{
    Amount, DenyReason, EntitlementConfig, EntitlementId, FeatureKey, IdempotencyKey, Outcome,
    SeatDecision, SeatId, UsageDecision,
};
use crate::engine::{UsageReply, UsageRequest};

type Result<T> = std::result::Result<T, ApiError>;

/// Reads the body up to `limit` bytes; a longer one is refused with 413
/// before it is buffered whole.
/// Reads a body of at most `limit` bytes within `timeout` (a client that
/// trickles its body does not hold a worker's call open).
pub(super) async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    timeout: Duration,
) -> Result<BytesMut> {
    tokio::time::timeout(timeout, read_body_within(req, payload, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                Kind::RequestTimeout,
                format!("the body did not arrive within {timeout:?}"),
            )
        })?
}

async fn read_body_within(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<BytesMut> {
    let too_large = || {
        ApiError::new(
            Kind::PayloadTooLarge,
            format!("the body limit is {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(Kind::InvalidRequest, format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn entitlement_id(raw: &str) -> Result<EntitlementId> {
    Ok(EntitlementId::parse(raw)?)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    HttpResponse::build(status).json(value)
}

/// The 429 of a denial: problem+json that also carries the decision.
fn denied<T: Serialize>(
    reason: Option<DenyReason>,
    detail: String,
    decision: &T,
    retry_after: Option<u64>,
) -> ApiError {
    let mut e = ApiError::new(Kind::Denied, detail).with_extra(serde_json::json!({
        "reason": reason.map(DenyReason::as_str),
        "decision": decision,
    }));
    e.retry_after = retry_after;
    e
}

fn seat_answer(d: SeatDecision) -> Result<HttpResponse> {
    if d.outcome != Outcome::Denied {
        return Ok(json(StatusCode::OK, &d));
    }
    let detail = match d.reason {
        Some(DenyReason::Disabled) => "the entitlement is disabled".to_string(),
        Some(DenyReason::Expired) => "the entitlement has expired".to_string(),
        _ => format!(
            "activating seat {} would pass the hard cap of {}",
            d.seat_id, d.hard_cap
        ),
    };
    Err(denied(d.reason, detail, &d, None))
}

fn usage_retry_after(d: &UsageDecision, now: DateTime<Utc>) -> Option<u64> {
    if d.reason != Some(DenyReason::HardCap) {
        return None;
    }
    d.period_end
        .map(|end| (end - now).num_seconds().max(1) as u64)
}

/// `now` is read only for a denial's `Retry-After`, off the granted path.
fn usage_answer(r: UsageReply, now: impl FnOnce() -> DateTime<Utc>) -> Result<HttpResponse> {
    let d = r.decision;
    if d.outcome == Outcome::Denied {
        let detail = match d.reason {
            Some(DenyReason::Disabled) => "the entitlement is disabled".to_string(),
            Some(DenyReason::Expired) => "the entitlement has expired".to_string(),
            _ => format!(
                "consuming {} of {} would pass the hard cap of {} (used {})",
                d.amount, d.feature, d.hard_cap, d.used
            ),
        };
        let retry = usage_retry_after(&d, now());
        let mut e = denied(d.reason, detail, &d, retry);
        e.replayed = r.replayed;
        return Err(e);
    }
    let mut res = HttpResponse::Ok();
    if r.replayed {
        res.insert_header(("Idempotency-Replayed", "true"));
    }
    Ok(res.json(&d))
}

pub async fn put_entitlement(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Admin)?;
    let id = entitlement_id(&path)?;
    let body = read_body(
        &req,
        payload,
        state.limits.max_body_bytes,
        state.limits.request_timeout,
    )
    .await?;
    let config = EntitlementConfig::from_json(&body).map_err(|e| {
        if e.field == "body" {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Err(j) => ApiError::json_error(j),
                Ok(_) => ApiError::from(e),
            }
        } else {
            ApiError::from(e)
        }
    })?;
    let (created, view) = state.engine.put(&id, config).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &view))
}

pub async fn get_entitlement(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Admin)?;
    let id = entitlement_id(&path)?;
    Ok(json(StatusCode::OK, &state.engine.get(&id).await?))
}

pub async fn delete_entitlement(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Admin)?;
    let id = entitlement_id(&path)?;
    state.engine.delete(&id).await?;
    Ok(HttpResponse::NoContent().finish())
}

pub async fn list_seats(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Admin)?;
    let id = entitlement_id(&path)?;
    let seats = state.engine.seats(&id).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "seats": seats })))
}

/// The seat calls take no body, or an empty JSON object.
fn check_empty(body: &[u8]) -> Result<()> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(ApiError::json_error)?;
    match map.keys().next() {
        None => Ok(()),
        Some(k) => Err(ApiError::new(
            Kind::InvalidRequest,
            format!("this call takes no body or {{}}; unknown field `{k}`"),
        )),
    }
}

/// What both seat calls check first: the token, the ids, and an empty body.
async fn seat_call(
    req: &HttpRequest,
    path: &(String, String),
    payload: web::Payload,
    state: &AppState,
) -> Result<(EntitlementId, SeatId)> {
    state.auth.require(req, Scope::Client)?;
    state.auth.churn(req)?;
    let id = entitlement_id(&path.0)?;
    let seat = SeatId::parse(&path.1)?;
    check_empty(&read_body(req, payload, 1024, state.limits.request_timeout).await?)?;
    Ok((id, seat))
}

pub async fn activate_seat(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let (id, seat) = seat_call(&req, &path, payload, &state).await?;
    seat_answer(state.engine.activate(&id, seat).await?)
}

pub async fn release_seat(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let (id, seat) = seat_call(&req, &path, payload, &state).await?;
    Ok(json(
        StatusCode::OK,
        &state.engine.release(&id, seat).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageBody {
    feature: FeatureKey,
    amount: Amount,
    #[serde(default)]
    idempotency_key: Option<IdempotencyKey>,
}

impl From<UsageBody> for UsageRequest {
    fn from(b: UsageBody) -> Self {
        UsageRequest {
            feature: b.feature,
            amount: b.amount,
            idempotency_key: b.idempotency_key,
        }
    }
}

pub async fn record_usage(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Client)?;
    let id = entitlement_id(&path)?;
    let body = read_body(&req, payload, 64 * 1024, state.limits.request_timeout).await?;
    let usage: UsageBody = serde_json::from_slice(&body).map_err(ApiError::json_error)?;
    usage_answer(state.engine.consume(&id, usage.into()).await?, || {
        state.engine.now()
    })
}

pub async fn record_batch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Client)?;
    let body = read_body(
        &req,
        payload,
        state.limits.max_body_bytes,
        state.limits.request_timeout,
    )
    .await?;
    let (pending, valid) = batch::split(batch::decode(&body)?);
    let results = pending.fill(state.engine.consume_batch(valid).await);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(batch::encode(&results)))
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse> {
    match state.engine.store().ping().await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))),
        Err(e) => {
            let mut err = ApiError::new(Kind::StoreUnavailable, e.to_string());
            err.retry_after = Some(1);
            Err(err)
        }
    }
}

pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Metrics)?;
    metrics::gauge!("headroom_entitlements_in_memory").set(state.engine.resident() as f64);
    crate::telemetry::collect_process_metrics();
    let store = state.engine.store();
    match store.stream_length().await {
        Ok(n) => metrics::gauge!("headroom_stream_length").set(n as f64),
        Err(e) => tracing::debug!(error = %e, "stream length unknown"),
    }
    match store.overdraft_totals().await {
        Ok(t) => {
            metrics::gauge!("headroom_entitlements_in_overdraft").set(t.entitlements as f64);
            metrics::gauge!("headroom_seats_in_overdraft").set(t.seats as f64);
        }
        Err(e) => tracing::debug!(error = %e, "overdraft totals unknown"),
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render()))
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(ApiError::new(
        Kind::NotFound,
        format!("no route for {} {}", req.method(), req.path()),
    ))
}
