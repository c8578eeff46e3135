//! The customer's page, `/portal/e/{id}`: opened with a signed link that is
//! exchanged for a session cookie bound to that one entitlement.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::data::{EntitlementData, Range};
use super::sign::{Claims, LinkScope, Purpose};
use super::{PageError, assets, entitlement_id, html, same_origin, see_other, session_cookie};
use crate::domain::{CustomerCaps, EntitlementId, EntitlementView, FeatureKey};
use crate::engine::EngineError;
use crate::http::AppState;

pub const COOKIE: &str = "headroom_portal";

fn unauthorized(detail: &str) -> PageError {
    PageError::new(StatusCode::UNAUTHORIZED, "Link needed", detail)
}

/// Query parameters of a page; unknown ones (a mail client's tracking
/// tags) are ignored.
#[derive(Deserialize, Default)]
pub(super) struct PageQuery {
    pub token: Option<String>,
    pub range: Option<String>,
    pub saved: Option<String>,
    /// After a console link: the console page to go to.
    pub next: Option<String>,
}

impl PageQuery {
    pub fn of(req: &HttpRequest) -> Result<PageQuery, PageError> {
        super::query(req)
    }
}

/// Checks a portal token for entitlement `id`: signed by a key, of the
/// expected purpose, bound to `id` (another entitlement's token: 404),
/// not expired, not revoked, and of this life of the entitlement.
pub(super) async fn check(
    state: &AppState,
    id: &EntitlementId,
    token: &str,
    purpose: Purpose,
) -> Result<(Claims, EntitlementView), PageError> {
    let invalid = || unauthorized("This link is not valid. Ask your vendor for a new one.");
    let claims = state.pages.signer.verify(token).map_err(|_| invalid())?;
    if claims.purpose != purpose || claims.scope.is_none() {
        return Err(invalid());
    }
    if claims.entitlement.as_deref() != Some(id.as_str()) {
        return Err(PageError::not_found());
    }
    let now = state.engine.now().timestamp_millis();
    if claims.expires_at <= now {
        return Err(unauthorized(
            "This link has expired. Ask your vendor for a new one.",
        ));
    }
    if let Some(revoked) = state.engine.store().links_revoked_at(id).await?
        && claims.issued_at <= revoked
    {
        return Err(unauthorized(
            "This link was withdrawn. Ask your vendor for a new one.",
        ));
    }
    let view = state.engine.get(id).await?;
    if claims.incarnation != Some(view.created_at.timestamp_millis()) {
        return Err(PageError::not_found());
    }
    Ok((claims, view))
}

#[derive(Template)]
#[template(path = "portal.html")]
struct PortalPage<'a> {
    assets: &'static assets::Urls,
    e: &'a EntitlementData,
    base: String,
    manage: bool,
    csrf: String,
    saved: bool,
    error: Option<String>,
    expires: String,
}

fn render(
    state: &AppState,
    e: &EntitlementData,
    claims: &Claims,
    session: &str,
    status: StatusCode,
    saved: bool,
    error: Option<String>,
) -> HttpResponse {
    let expires = chrono::DateTime::from_timestamp_millis(claims.expires_at)
        .map(super::data::utc)
        .unwrap_or_default();
    let page = PortalPage {
        assets: assets::urls(),
        e,
        base: format!("/portal/e/{}", e.id),
        manage: claims.scope == Some(LinkScope::Manage),
        csrf: state.pages.signer.csrf(session),
        saved,
        error,
        expires,
    };
    html(status, &page)
}

/// `GET /portal/e/{id}`: with `?token=` exchanges a link for a session and
/// redirects to the page without it; else shows the page of the session.
pub async fn show(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let id = entitlement_id(&path)?;
    let query = PageQuery::of(&req)?;
    let range = Range::parse(query.range.as_deref())?;
    if let Some(token) = &query.token {
        state.pages.login_allowed(&req)?;
        let outcome = check(&state, &id, token, Purpose::PortalLink).await;
        let outcome_label = if outcome.is_ok() { "opened" } else { "refused" };
        metrics::counter!("headroom_page_logins_total", "outcome" => outcome_label).increment(1);
        let (claims, _) = outcome?;
        let session = Claims {
            purpose: Purpose::PortalSession,
            ..claims
        };
        let left = chrono::Duration::milliseconds(
            session.expires_at - state.engine.now().timestamp_millis(),
        );
        let base = format!("/portal/e/{id}");
        let cookie = session_cookie(
            &state.pages,
            COOKIE,
            state.pages.signer.sign(&session),
            base.clone(),
            left,
        );
        let location = match query.range.as_deref() {
            Some(r) if !r.is_empty() => format!("{base}?range={}", range.key()),
            _ => base,
        };
        let mut res = see_other(&location);
        res.add_cookie(&cookie)
            .map_err(|e| PageError::bad_request(format!("the session cookie: {e}")))?;
        return Ok(res);
    }
    let cookie = req
        .cookie(COOKIE)
        .ok_or_else(|| unauthorized("This page opens with the link your vendor sent you."))?;
    let (claims, _) = check(&state, &id, cookie.value(), Purpose::PortalSession).await?;
    let data = EntitlementData::load(&state.engine, &id, range).await?;
    Ok(render(
        &state,
        &data,
        &claims,
        cookie.value(),
        StatusCode::OK,
        query.saved.is_some(),
        None,
    ))
}

/// A posted customer cap: empty means none; else a whole number (the
/// engine checks it against the vendor's hard cap as it applies it).
fn customer_cap(field: &str, raw: &str) -> Result<Option<u64>, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse()
        .map(Some)
        .map_err(|_| format!("{field}: write a whole number of 0 or more, or leave it empty"))
}

/// The form's fields as the customer's ceilings: `seats`, and
/// `feature.<key>` for each feature the entitlement has.
fn caps_of(form: &HashMap<String, String>, view: &EntitlementView) -> Result<CustomerCaps, String> {
    let mut caps = CustomerCaps::default();
    for (name, value) in form {
        match name.as_str() {
            "csrf" => {}
            "seats" => caps.seats = Some(customer_cap("seats", value)?),
            other => {
                let key = other
                    .strip_prefix("feature.")
                    .and_then(|k| FeatureKey::parse(k).ok())
                    .filter(|k| view.features.contains_key(k))
                    .ok_or_else(|| format!("{other:?} is not a field of this form"))?;
                let cap = customer_cap(key.as_str(), value)?;
                caps.features.push((key, cap));
            }
        }
    }
    Ok(caps)
}

/// `POST /portal/e/{id}/customer-cap` (scope `manage`): the customer's own
/// ceilings, below the vendor's hard caps. Fields: `csrf`, `seats`, and
/// `feature.<key>` per feature; an empty field removes that ceiling.
pub async fn set_customer_cap(
    req: HttpRequest,
    path: web::Path<String>,
    form: web::Form<HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let id = entitlement_id(&path)?;
    let cookie = req
        .cookie(COOKIE)
        .ok_or_else(|| unauthorized("This page opens with the link your vendor sent you."))?;
    let (claims, view) = check(&state, &id, cookie.value(), Purpose::PortalSession).await?;
    if claims.scope != Some(LinkScope::Manage) {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "This link lets you view the page; ask your vendor for a link that lets you manage it.",
        ));
    }
    let refused = || {
        PageError::new(
            StatusCode::FORBIDDEN,
            "Not accepted",
            "This form has expired or did not come from this page; reload the page and try again.",
        )
    };
    let csrf_ok = form
        .get("csrf")
        .is_some_and(|t| state.pages.signer.check_csrf(cookie.value(), t));
    if !csrf_ok || !same_origin(&req) {
        return Err(refused());
    }
    let applied = match caps_of(&form, &view) {
        Err(e) => Err(e),
        Ok(caps) => match state.engine.set_customer_caps(&id, caps).await {
            Ok(_) => Ok(()),
            Err(EngineError::Invalid(v)) => Err(v.to_string()),
            Err(e) => return Err(e.into()),
        },
    };
    if let Err(error) = applied {
        let data = EntitlementData::load(&state.engine, &id, Range::Week).await?;
        return Ok(render(
            &state,
            &data,
            &claims,
            cookie.value(),
            StatusCode::BAD_REQUEST,
            false,
            Some(error),
        ));
    }
    tracing::info!(entitlement = %id, "the customer set their own caps");
    Ok(see_other(&format!("/portal/e/{id}?saved=1")))
}
