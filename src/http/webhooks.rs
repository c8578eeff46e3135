//! `/v1/webhooks`: the admin API of webhook endpoints.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use super::AppState;
use super::auth::Scope;
use super::handlers::read_body;
use super::problem::{ApiError, Kind};
use crate::engine::EngineError;
use crate::webhooks::{LOG_KEPT, NewWebhook, RegisterError, Webhooks};

type Result<T> = std::result::Result<T, ApiError>;

/// The admin check, then the registrations (which need Redis).
fn webhooks<'a>(req: &HttpRequest, state: &'a AppState) -> Result<&'a Webhooks> {
    state.auth.require(req, Scope::Admin)?;
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

pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&req, &state)?;
    let body = read_body(&req, payload, 16 * 1024, state.limits.request_timeout).await?;
    let new: NewWebhook = serde_json::from_slice(&body).map_err(ApiError::json_error)?;
    let (hook, secret) = hooks.register(new).await.map_err(|e| match e {
        RegisterError::Invalid(v) => v.into(),
        RegisterError::Store(s) => store_error(s),
    })?;
    let mut body = serde_json::to_value(&hook).unwrap_or_default();
    if let Some(map) = body.as_object_mut() {
        // Shown once: it is never answered again.
        map.insert("secret".into(), secret.into());
    }
    Ok(HttpResponse::build(StatusCode::CREATED)
        .insert_header(("Location", format!("/v1/webhooks/{}", hook.id)))
        .json(body))
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    let hooks = webhooks(&req, &state)?;
    let all = hooks.list().await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "webhooks": all })))
}

pub async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&req, &state)?;
    match hooks.get(&path).await.map_err(store_error)? {
        Some(h) => Ok(HttpResponse::Ok().json(h)),
        None => Err(not_found(&path)),
    }
}

pub async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&req, &state)?;
    if hooks.delete(&path).await.map_err(store_error)? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(not_found(&path))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    limit: Option<usize>,
}

pub async fn deliveries(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let hooks = webhooks(&req, &state)?;
    let q: DeliveriesQuery = super::reports::query(&req)?;
    let limit = super::reports::page_limit(q.limit, LOG_KEPT)?;
    if hooks.get(&path).await.map_err(store_error)?.is_none() {
        return Err(not_found(&path));
    }
    let log = hooks.deliveries(&path, limit).await.map_err(store_error)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "webhook": path.as_str(), "deliveries": log })))
}
