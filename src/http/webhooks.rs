//! `/v1/webhooks`: the admin API of webhook endpoints.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{Admin, Body, Query, Small, page_limit};
use super::problem::{ApiError, Kind};
use crate::engine::EngineError;
use crate::webhooks::{LOG_KEPT, NewWebhook, RegisterError, Webhook, Webhooks};

type Result<T> = std::result::Result<T, ApiError>;

/// The registrations (which need Redis).
fn webhooks(state: &AppState) -> Result<&Webhooks> {
    state.webhooks.as_ref().ok_or_else(|| {
        ApiError::new(
            Kind::WebhooksUnavailable,
            "this tracker runs on the in-memory store; start it with --redis-url to use webhooks",
        )
    })
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    EngineError::from(e).into()
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(Kind::WebhookNotFound, format!("no webhook {id}"))
}

/// A new registration as answered once: with its secret.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Created<'a> {
    #[serde(flatten)]
    hook: &'a Webhook,
    /// `whsec_…`: the signing secret, shown only now.
    secret: &'a str,
}

/// Registers an endpoint; the answer shows its signing secret, once.
#[utoipa::path(
    post,
    path = "/v1/webhooks",
    operation_id = "create_webhook",
    tag = "webhooks",
    request_body(content = crate::webhooks::NewWebhook, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered.", body = Created,
         headers(("Location" = String, description = "`/v1/webhooks/{id}`."))),
        (status = 400, description = "`invalid_json` or `invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`webhooks_unavailable`: the tracker runs on the in-memory store.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn create(
    _: Admin,
    Body(body, ..): Body<Small>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&state)?;
    let new: NewWebhook = crate::domain::json::decode(&body)?;
    let (hook, secret) = hooks.register(new).await.map_err(|e| match e {
        RegisterError::Invalid(v) => v.into(),
        RegisterError::Store(s) => store_error(s),
    })?;
    // The secret is shown once: it is never answered again.
    Ok(HttpResponse::build(StatusCode::CREATED)
        .insert_header(("Location", format!("/v1/webhooks/{}", hook.id)))
        .json(Created {
            hook: &hook,
            secret: &secret,
        }))
}

#[utoipa::path(
    get,
    path = "/v1/webhooks",
    operation_id = "list_webhooks",
    tag = "webhooks",
    responses(
        (status = 200, description = "Every endpoint, oldest first (no secrets).", body = super::openapi::WebhookList),
        (status = 409, description = "`webhooks_unavailable`: the tracker runs on the in-memory store.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn list(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse> {
    let hooks = webhooks(&state)?;
    let all = hooks.list().await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "webhooks": all })))
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    operation_id = "get_webhook",
    tag = "webhooks",
    params(("id" = String, Path, description = "The webhook (`wh_…`).")),
    responses(
        (status = 200, description = "The endpoint (no secret).", body = crate::webhooks::Webhook),
        (status = 404, description = "`webhook_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`webhooks_unavailable`: the tracker runs on the in-memory store.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn get(
    _: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&state)?;
    match hooks.get(&path).await.map_err(store_error)? {
        Some(h) => Ok(HttpResponse::Ok().json(h)),
        None => Err(not_found(&path)),
    }
}

#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    operation_id = "delete_webhook",
    tag = "webhooks",
    params(("id" = String, Path, description = "The webhook (`wh_…`).")),
    responses(
        (status = 204, description = "Deleted, with its log."),
        (status = 404, description = "`webhook_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`webhooks_unavailable`: the tracker runs on the in-memory store.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn delete(
    _: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&state)?;
    if hooks.delete(&path).await.map_err(store_error)? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(not_found(&path))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    operation_id = "webhook_deliveries",
    tag = "webhooks",
    params(("id" = String, Path, description = "The webhook (`wh_…`)."), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Entries (default 100).")),
    responses(
        (status = 200, description = "The newest attempts first.", body = super::openapi::DeliveryLog),
        (status = 400, description = "`invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`webhook_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`webhooks_unavailable`: the tracker runs on the in-memory store.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn deliveries(
    _: Admin,
    path: web::Path<String>,
    Query(q): Query<DeliveriesQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&state)?;
    let limit = page_limit(q.limit, LOG_KEPT)?;
    if hooks.get(&path).await.map_err(store_error)?.is_none() {
        return Err(not_found(&path));
    }
    let log = hooks.deliveries(&path, limit).await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "webhook": path.as_str(), "deliveries": log })))
}

/// The longest overlap of a rotation: a week.
pub const MAX_OVERLAP_SECONDS: u64 = 7 * 24 * 3600;
/// The overlap when the request names none: a day.
pub const DEFAULT_OVERLAP_SECONDS: u64 = 24 * 3600;

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Seconds the old secret keeps signing, 0 to 604,800 (default 86,400).
    #[schema(minimum = 0, maximum = 604800)]
    overlap_seconds: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RotateAnswer<'a> {
    id: &'a str,
    secret: &'a str,
    previous_secret_expires_at: chrono::DateTime<chrono::Utc>,
}

/// `POST /v1/webhooks/{id}/rotate-secret` (`{"overlap_seconds": N}`,
/// optional): a new secret, shown once; the old one keeps signing too for
/// the overlap (default a day, at most a week; 0 ends it at once).
#[utoipa::path(
    post,
    path = "/v1/webhooks/{id}/rotate-secret",
    operation_id = "rotate_webhook_secret",
    tag = "webhooks",
    params(("id" = String, Path, description = "The webhook (`wh_…`).")),
    request_body(content = Option<RotateRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The new secret, shown once; the old one signs too until `previous_secret_expires_at`.", body = RotateAnswer),
        (status = 400, description = "`invalid_json` or `invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`webhook_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`webhooks_unavailable`: the tracker runs on the in-memory store.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn rotate_secret(
    _: Admin,
    path: web::Path<String>,
    Body(body, ..): Body<Small>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&state)?;
    let request: RotateRequest = crate::domain::json::decode_optional(&body)?;
    let overlap = request.overlap_seconds.unwrap_or(DEFAULT_OVERLAP_SECONDS);
    if overlap > MAX_OVERLAP_SECONDS {
        return Err(crate::domain::ValidationError::new(
            "overlap_seconds",
            format!("must be from 0 to {MAX_OVERLAP_SECONDS}, got {overlap}"),
        )
        .into());
    }
    let rotated = hooks
        .rotate(&path, std::time::Duration::from_secs(overlap))
        .await
        .map_err(store_error)?
        .ok_or_else(|| not_found(&path))?;
    Ok(HttpResponse::Ok()
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .json(RotateAnswer {
            id: &path,
            secret: &rotated.secret,
            previous_secret_expires_at: rotated.previous_until,
        }))
}
