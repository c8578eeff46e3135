//! Route handlers: parse at the edge, call the engine, shape the answer.

use actix_web::http::StatusCode;
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::batch;
use super::extract::{
    Admin, Body, Client, Empty, EntitlementPath, IDEMPOTENCY_KEY, IdempotencyHeader, Large,
    MetricsReader, SeatCaller, SeatPath, Usage,
};
use super::problem::{ApiError, Kind};
use crate::domain::{
    Amount, DenyReason, EntitlementConfig, FeatureKey, IdempotencyKey, Outcome, SeatDecision,
    UsageDecision,
};
use crate::domain::{ValidationError, json};
use crate::engine::{Precondition, UsageReply, UsageRequest};

type Result<T> = std::result::Result<T, ApiError>;

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
pub(super) fn usage_answer(
    r: UsageReply,
    now: impl FnOnce() -> DateTime<Utc>,
) -> Result<HttpResponse> {
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

/// The condition of a `PUT` of a configuration: `If-Match` (`*`, or the
/// tags of configurations it may replace) or `If-None-Match: *` (create
/// only). A weak tag never matches (`If-Match` compares strongly).
fn precondition(req: &HttpRequest) -> Result<Precondition> {
    use actix_web::http::header::{IF_MATCH, IF_NONE_MATCH};
    let value = |name: actix_web::http::header::HeaderName| -> Result<Option<String>> {
        let mut all = req.headers().get_all(&name).peekable();
        if all.peek().is_none() {
            return Ok(None);
        }
        let joined = all
            .map(|v| v.to_str().map(str::to_string))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| ValidationError::new(name.as_str(), "must be visible ASCII"))?;
        let joined = joined.join(",");
        // An empty list is no condition (RFC 9110 §13.1.1).
        Ok((!joined.trim().is_empty()).then_some(joined))
    };
    match (value(IF_MATCH)?, value(IF_NONE_MATCH)?) {
        // If-Match needs the entitlement, If-None-Match: * its absence: both
        // never hold (RFC 9110 §13.2.2 evaluates them in turn: 412).
        (Some(_), Some(n)) if n.trim() == "*" => Err(ApiError::new(
            Kind::PreconditionFailed,
            "If-Match and If-None-Match: * cannot both hold",
        )),
        (Some(_), Some(_)) => Err(ValidationError::new(
            "If-None-Match",
            "only `If-None-Match: *` (create, never replace) is understood on PUT",
        )
        .into()),
        (None, None) => Ok(Precondition::None),
        (None, Some(v)) if v.trim() == "*" => Ok(Precondition::Absent),
        (None, Some(_)) => Err(ValidationError::new(
            "If-None-Match",
            "only `If-None-Match: *` (create, never replace) is understood on PUT",
        )
        .into()),
        (Some(v), None) if v.trim() == "*" => Ok(Precondition::Matches(Vec::new())),
        (Some(v), None) => {
            let tags: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect();
            let strong = |t: &str| t.len() >= 2 && t.starts_with('"') && t.ends_with('"');
            let weak = |t: &str| t.strip_prefix("W/").is_some_and(strong);
            if tags.is_empty() || tags.iter().any(|t| !strong(t) && !weak(t)) {
                return Err(ValidationError::new(
                    "If-Match",
                    "write * or entity tags in quotes, as the ETag header gave them",
                )
                .into());
            }
            // A weak tag (W/"…") never matches: keep only strong ones, and
            // one that cannot match if there were only weak ones.
            let strong: Vec<String> = tags.into_iter().filter(|t| strong(t)).collect();
            Ok(Precondition::Matches(if strong.is_empty() {
                vec!["W/never".into()]
            } else {
                strong
            }))
        }
    }
}

/// A configuration's answer, with its `ETag`.
fn with_etag(status: StatusCode, view: &crate::domain::EntitlementView) -> HttpResponse {
    let mut res = HttpResponse::build(status);
    res.insert_header((actix_web::http::header::ETAG, view.config.etag()));
    if status == StatusCode::CREATED {
        res.insert_header((
            actix_web::http::header::LOCATION,
            format!("/v1/entitlements/{}", view.id),
        ));
    }
    res.json(view)
}

/// Creates or replaces an entitlement's configuration; its live state
/// (seats, usage, denials) is kept.
#[utoipa::path(
    put,
    path = "/v1/entitlements/{id}",
    tag = "entitlements",
    params(
        ("id" = crate::domain::EntitlementId, Path, description = "The entitlement."),
        ("If-Match" = Option<String>, Header, pattern = r#"^\s*(\*|(W/)?"[^"]*"(\s*,\s*(W/)?"[^"]*")*)?\s*$"#, description = "Replace only this configuration (its `ETag`; several, comma-separated), or `*`: any existing one; empty: no condition."),
        ("If-None-Match" = Option<String>, Header, pattern = r"^\s*\*?\s*$", description = "`*`: create only, never replace; empty: no condition."),
    ),
    request_body(content = EntitlementConfig, content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced.", body = crate::domain::EntitlementView,
         headers(("ETag" = String, description = "The new configuration's tag."))),
        (status = 201, description = "Created.", body = crate::domain::EntitlementView,
         headers(("ETag" = String, description = "The configuration's tag."),
                 ("Location" = String, description = "`/v1/entitlements/{id}`."))),
        (status = 400, description = "`invalid_json` or `invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 412, description = "`precondition_failed`: `If-Match` / `If-None-Match` did not hold; nothing was applied.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn put_entitlement(
    _: Admin,
    req: HttpRequest,
    EntitlementPath(id): EntitlementPath,
    Body(body, ..): Body<Large>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    // The body first: a malformed one is a 400 whatever its conditions.
    let config = EntitlementConfig::from_json(&body)?;
    let condition = precondition(&req)?;
    let put = state.engine.put_if(&id, config, condition).await?;
    let status = if put.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(status, &put.view))
}

/// The configuration and live state of an entitlement.
#[utoipa::path(
    get,
    path = "/v1/entitlements/{id}",
    tag = "entitlements",
    params(("id" = crate::domain::EntitlementId, Path, description = "The entitlement.")),
    responses(
        (status = 200, description = "The entitlement.", body = crate::domain::EntitlementView,
         headers(("ETag" = String, description = "The configuration's tag, for `If-Match`."))),
        (status = 400, description = "`invalid_request`: not an entitlement id.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn get_entitlement(
    _: Admin,
    EntitlementPath(id): EntitlementPath,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    Ok(with_etag(StatusCode::OK, &state.engine.get(&id).await?))
}

/// Deletes an entitlement and its live state (closed-period records stay
/// until their retention ends).
#[utoipa::path(
    delete,
    path = "/v1/entitlements/{id}",
    tag = "entitlements",
    params(("id" = crate::domain::EntitlementId, Path, description = "The entitlement.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "`invalid_request`: not an entitlement id.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn delete_entitlement(
    _: Admin,
    EntitlementPath(id): EntitlementPath,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.engine.delete(&id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The active seats of an entitlement, with their lease expiry.
#[utoipa::path(
    get,
    path = "/v1/entitlements/{id}/seats",
    tag = "entitlements",
    params(("id" = crate::domain::EntitlementId, Path, description = "The entitlement.")),
    responses(
        (status = 200, description = "The active seats.", body = SeatList),
        (status = 400, description = "`invalid_request`: not an entitlement id.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn list_seats(
    _: Admin,
    EntitlementPath(id): EntitlementPath,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let seats = state.engine.seats(&id).await?;
    Ok(json(StatusCode::OK, &SeatList { seats }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SeatList {
    seats: Vec<crate::domain::SeatView>,
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

/// Activates a seat, or refreshes the lease of an active one (never a
/// second seat).
#[utoipa::path(
    post,
    path = "/v1/entitlements/{id}/seats/{seat_id}",
    tag = "metering",
    params(
        ("id" = crate::domain::EntitlementId, Path, description = "The entitlement."),
        ("seat_id" = crate::domain::SeatId, Path, description = "The seat (a user or device)."),
    ),
    request_body(content = super::openapi::NoFields, description = "None, or `{}`.", content_type = "application/json"),
    responses(
        (status = 200, description = "`granted` (within purchased) or `overdraft` (allowed, flagged).", body = crate::domain::SeatDecision),
        (status = 400, description = "`invalid_request` or `invalid_json`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`denied` (with `reason` and the `decision`), or `rate_limited` past `--churn-limit` (with `Retry-After`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("client" = []), ("admin" = [])),
)]
pub async fn activate_seat(
    _: SeatCaller,
    EntitlementPath(id): EntitlementPath,
    SeatPath(seat): SeatPath,
    Body(body, ..): Body<Empty>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    check_empty(&body)?;
    seat_answer(state.engine.activate(&id, seat).await?)
}

/// Releases a seat; releasing one that is not active is not an error.
#[utoipa::path(
    delete,
    path = "/v1/entitlements/{id}/seats/{seat_id}",
    tag = "metering",
    params(
        ("id" = crate::domain::EntitlementId, Path, description = "The entitlement."),
        ("seat_id" = crate::domain::SeatId, Path, description = "The seat."),
    ),
    responses(
        (status = 200, description = "Released (`released: false` when it was not active).", body = crate::domain::ReleaseResult),
        (status = 400, description = "`invalid_request` or `invalid_json`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited` past `--churn-limit`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("client" = []), ("admin" = [])),
)]
pub async fn release_seat(
    _: SeatCaller,
    EntitlementPath(id): EntitlementPath,
    SeatPath(seat): SeatPath,
    Body(body, ..): Body<Empty>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    check_empty(&body)?;
    Ok(json(
        StatusCode::OK,
        &state.engine.release(&id, seat).await?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UsageBody {
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

/// Consumes `amount` of a feature; a call that would pass the effective
/// cap is denied whole.
#[utoipa::path(
    post,
    path = "/v1/entitlements/{id}/usage",
    tag = "metering",
    params(
        ("id" = crate::domain::EntitlementId, Path, description = "The entitlement."),
        ("Idempotency-Key" = Option<crate::domain::IdempotencyKey>, Header, description = "As the body's `idempotency_key` (the two must not differ)."),
    ),
    request_body(content = UsageBody, content_type = "application/json"),
    responses(
        (status = 200, description = "`granted` or `overdraft`; `Idempotency-Replayed: true` on a replay.", body = crate::domain::UsageDecision),
        (status = 400, description = "`invalid_request` or `invalid_json`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found` or `feature_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`idempotency_conflict`: the key was used with another payload.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`denied`, with `reason`, the `decision` and, for periodic features, `Retry-After` until the period ends.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("client" = []), ("admin" = [])),
)]
pub async fn record_usage(
    _: Client,
    EntitlementPath(id): EntitlementPath,
    IdempotencyHeader(header): IdempotencyHeader,
    Body(body, ..): Body<Usage>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let usage = usage_request(&body, header)?;
    usage_answer(state.engine.consume(&id, usage).await?, || {
        state.engine.now()
    })
}

/// A usage call's body, with the key of its `Idempotency-Key` header.
pub(super) fn usage_request(body: &[u8], header: Option<IdempotencyKey>) -> Result<UsageRequest> {
    let mut usage: UsageBody = json::decode(body)?;
    match (&usage.idempotency_key, header) {
        (Some(in_body), Some(in_header)) if *in_body != in_header => {
            return Err(ValidationError::new(
                IDEMPOTENCY_KEY,
                "differs from the body's idempotency_key; send one of them, or the same key in both",
            )
            .into());
        }
        (None, Some(in_header)) => usage.idempotency_key = Some(in_header),
        _ => {}
    }
    Ok(usage.into())
}

/// Many usage events, each decided (or failing) on its own, answered in
/// input order.
#[utoipa::path(
    post,
    path = "/v1/usage/batch",
    tag = "metering",
    request_body(content = super::openapi::BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "One result per event, in order.", body = super::openapi::BatchAnswer),
        (status = 400, description = "`invalid_json` or `invalid_request` (the body itself, or an `Idempotency-Key` header).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large` or `batch_too_large` (more than 10,000 events).", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("client" = []), ("admin" = [])),
)]
pub async fn record_batch(
    req: HttpRequest,
    _: Client,
    IdempotencyHeader(header): IdempotencyHeader,
    Body(body, ..): Body<Large>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    if header.is_some() {
        return Err(ValidationError::new(
            IDEMPOTENCY_KEY,
            "a batch takes a key per event (each event's idempotency_key), not one for the request",
        )
        .into());
    }
    let (pending, valid) = batch::split(batch::decode(&body)?);
    let results = pending.fill(super::forwarding::spread_batch(&state, &req, valid).await);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(batch::encode(&results).map_err(ApiError::encoding)?))
}

/// The nodes and their shares: this node alone unless several share the
/// Redis (a cluster secret set).
#[utoipa::path(
    get,
    path = "/v1/cluster",
    operation_id = "get_cluster",
    tag = "nodes",
    responses(
        (status = 200, description = "This node and the live members, with their shares.", body = super::openapi::ClusterView),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn cluster(_: Admin, state: web::Data<AppState>) -> HttpResponse {
    #[derive(serde::Serialize)]
    struct Node<'a> {
        id: &'a str,
        address: &'a str,
        since: Option<DateTime<Utc>>,
        /// When its registration runs out unless renewed.
        lease_expires: Option<DateTime<Utc>>,
        /// The fraction of entitlement ids it owns, estimated over fixed
        /// sample ids.
        share: f64,
    }
    let at = DateTime::from_timestamp_millis;
    let me = &state.node;
    let Some(m) = &state.nodes else {
        let alone = Node {
            id: &me.id,
            address: &me.address,
            since: Some(me.started),
            lease_expires: None,
            share: 1.0,
        };
        return HttpResponse::Ok().json(serde_json::json!({ "self": me.id, "members": [alone] }));
    };
    let view = m.view();
    let ids: Vec<&str> = view.members.iter().map(|n| n.id.as_str()).collect();
    let shares = crate::nodes::ring::shares(&ids);
    let members: Vec<Node> = view
        .members
        .iter()
        .zip(shares)
        .map(|(n, share)| Node {
            id: &n.id,
            address: &n.address,
            since: at(n.since_ms),
            lease_expires: at(n.expires_ms),
            share,
        })
        .collect();
    HttpResponse::Ok().json(serde_json::json!({ "self": me.id, "members": members }))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process is up.", body = super::openapi::Status)),
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The store answers.", body = super::openapi::Status),
        (status = 503, description = "`store_unavailable`, or `shutting_down` (this node is leaving), with `Retry-After`.", body = super::openapi::Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse> {
    if state.nodes.as_ref().is_some_and(|n| n.has_left()) {
        let mut err = ApiError::new(
            Kind::ShuttingDown,
            "this node is stopping: it left the cluster and sends its calls on to the others",
        );
        err.retry_after = Some(1);
        return Err(err);
    }
    match state.engine.store().ping().await {
        Ok(()) => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))),
        Err(e) => {
            let mut err = ApiError::new(Kind::StoreUnavailable, e.to_string());
            err.retry_after = Some(1);
            Err(err)
        }
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format (METRICS.md lists every series).", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "`unauthorized`: scrape tokens are configured and none was sent.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: a client token.", body = super::openapi::Problem, content_type = "application/problem+json"),
    ),
    security((), ("metrics" = []), ("admin" = [])),
)]
pub async fn metrics(_: MetricsReader, state: web::Data<AppState>) -> Result<HttpResponse> {
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
