//! Minting and withdrawing links: `POST /v1/entitlements/{id}/portal-links`,
//! `DELETE` on the same path, and `POST /v1/console-links` (admin).

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::sign::{Claims, LinkScope, Purpose};
use crate::domain::{EntitlementId, ValidationError};
use crate::http::AppState;
use crate::http::extract::{Admin, Body, EntitlementPath, Small};
use crate::http::problem::{ApiError, Kind};

/// The shortest link: a minute.
pub const MIN_TTL_SECONDS: u64 = 60;

pub struct Link {
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

fn ttl(state: &AppState, asked: Option<u64>) -> Result<chrono::Duration, ApiError> {
    let s = &state.pages.settings;
    let max = s.portal_link_max_ttl.as_secs();
    let seconds = match asked {
        None => s.portal_link_ttl.as_secs().min(max),
        Some(t) if (MIN_TTL_SECONDS..=max).contains(&t) => t,
        Some(t) => {
            return Err(ValidationError::new(
                "ttl_seconds",
                format!("must be from {MIN_TTL_SECONDS} to {max} (--portal-link-max-ttl), got {t}"),
            )
            .into());
        }
    };
    Ok(chrono::Duration::seconds(seconds as i64))
}

/// A portal link for `id` (which must exist: the link is bound to this
/// life of it).
pub async fn mint_portal(
    state: &AppState,
    id: &EntitlementId,
    scope: LinkScope,
    ttl_seconds: Option<u64>,
) -> Result<Link, ApiError> {
    let ttl = ttl(state, ttl_seconds)?;
    let view = state.engine.get(id).await?;
    let now = state.engine.now();
    let expires_at = now + ttl;
    let claims = Claims {
        purpose: Purpose::PortalLink,
        entitlement: Some(id.to_string()),
        incarnation: Some(view.created_at.timestamp_millis()),
        scope: Some(scope),
        admin: None,
        issued_at: now.timestamp_millis(),
        expires_at: expires_at.timestamp_millis(),
        nonce: super::sign::nonce(),
    };
    let token = state.pages.signer.sign(&claims);
    metrics::counter!("headroom_portal_links_minted_total", "scope" => scope.as_str()).increment(1);
    Ok(Link {
        url: state.pages.url(&format!("/portal/e/{id}?token={token}")),
        expires_at,
    })
}

/// Withdraws every link and session of `id` issued until now.
pub async fn revoke(state: &AppState, id: &EntitlementId) -> Result<(), ApiError> {
    state.engine.get(id).await?;
    let now = state.engine.now().timestamp_millis();
    state
        .engine
        .store()
        .revoke_links(id, now, state.pages.settings.portal_link_max_ttl)
        .await
        .map_err(crate::engine::EngineError::from)?;
    tracing::info!(entitlement = %id, "portal links withdrawn");
    Ok(())
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalLinkRequest {
    /// `view` (default) or `manage`.
    scope: Option<LinkScope>,
    /// 60 to `--portal-link-max-ttl` (30 days by default); default `--portal-link-ttl`.
    #[schema(minimum = 60, maximum = 2592000)]
    ttl_seconds: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PortalLinkAnswer {
    url: String,
    expires_at: DateTime<Utc>,
    scope: LinkScope,
}

/// `POST /v1/entitlements/{id}/portal-links`: mints a link to the
/// customer's usage page (`{"scope", "ttl_seconds"}`, both optional →
/// `201 {"url", "expires_at", "scope"}`).
#[utoipa::path(
    post,
    path = "/v1/entitlements/{id}/portal-links",
    tag = "pages",
    params(("id" = crate::domain::EntitlementId, Path, description = "The entitlement.")),
    request_body(content = Option<PortalLinkRequest>, content_type = "application/json"),
    responses(
        (status = 201, description = "The link (also in `Location`).", body = PortalLinkAnswer,
         headers(("Location" = String, description = "The link."))),
        (status = 400, description = "`invalid_json` or `invalid_request` (with `field`).", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        crate::http::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn create_portal_link(
    _: Admin,
    EntitlementPath(id): EntitlementPath,
    Body(body, ..): Body<Small>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let request: PortalLinkRequest = crate::domain::json::decode_optional(&body)?;
    let scope = request.scope.unwrap_or(LinkScope::View);
    let link = mint_portal(&state, &id, scope, request.ttl_seconds).await?;
    Ok(HttpResponse::build(StatusCode::CREATED)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        // What was created is the link itself.
        .insert_header((actix_web::http::header::LOCATION, link.url.clone()))
        .json(PortalLinkAnswer {
            url: link.url,
            expires_at: link.expires_at,
            scope,
        }))
}

/// `DELETE /v1/entitlements/{id}/portal-links`: withdraws every portal
/// link and customer session of the entitlement issued until now → `204`.
#[utoipa::path(
    delete,
    path = "/v1/entitlements/{id}/portal-links",
    tag = "pages",
    params(("id" = crate::domain::EntitlementId, Path, description = "The entitlement.")),
    responses(
        (status = 204, description = "Every link and customer session issued until now is withdrawn."),
        (status = 400, description = "`invalid_request`: not an entitlement id.", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        crate::http::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn revoke_portal_links(
    _: Admin,
    EntitlementPath(id): EntitlementPath,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    revoke(&state, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleLinkRequest {
    /// 60 to `--portal-link-max-ttl` (30 days by default); default `--portal-link-ttl`.
    #[schema(minimum = 60, maximum = 2592000)]
    ttl_seconds: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConsoleLinkAnswer {
    url: String,
    expires_at: DateTime<Utc>,
}

/// `POST /v1/console-links`: mints a link that signs its holder in to the
/// console as the admin token that asked, until that token is taken out
/// of the configuration (`{"ttl_seconds"}`, optional → `201 {"url",
/// "expires_at"}`).
#[utoipa::path(
    post,
    path = "/v1/console-links",
    tag = "pages",
    request_body(content = Option<ConsoleLinkRequest>, content_type = "application/json"),
    responses(
        (status = 201, description = "A link that signs in to the console as the admin token that asked.", body = ConsoleLinkAnswer,
         headers(("Location" = String, description = "The link."))),
        (status = 400, description = "`invalid_json` or `invalid_request` (with `field`).", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = crate::http::openapi::Problem, content_type = "application/problem+json"),
        crate::http::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn create_console_link(
    _: Admin,
    req: HttpRequest,
    Body(body, ..): Body<Small>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let request: ConsoleLinkRequest = crate::domain::json::decode_optional(&body)?;
    let ttl = ttl(&state, request.ttl_seconds)?;
    let admin = state
        .auth
        .admin_fingerprint_of(&req)
        .ok_or_else(|| ApiError::new(Kind::Forbidden, "this call needs an admin token"))?;
    let now = state.engine.now();
    let expires_at = now + ttl;
    let claims = Claims {
        purpose: Purpose::ConsoleLink,
        entitlement: None,
        incarnation: None,
        scope: None,
        admin: Some(admin),
        issued_at: now.timestamp_millis(),
        expires_at: expires_at.timestamp_millis(),
        nonce: super::sign::nonce(),
    };
    let token = state.pages.signer.sign(&claims);
    let url = state.pages.url(&format!("/console/login?token={token}"));
    Ok(HttpResponse::build(StatusCode::CREATED)
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
        .insert_header((actix_web::http::header::LOCATION, url.clone()))
        .json(ConsoleLinkAnswer { url, expires_at }))
}
