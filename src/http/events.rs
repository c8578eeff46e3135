//! `GET /v1/events`: the event stream read through the tracker, page by
//! page, optionally waiting for the next events (long polling) — what
//! `headroom events tail` follows. Webhooks remain the way to have events
//! pushed; this is for people and scripts that look.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use super::extract::{Admin, Query, page_limit};
use super::problem::ApiError;
use crate::domain::{EVENT_KINDS, EntitlementId, ValidationError};
use crate::store::{EventsFrom, StreamPos};

type Result<T> = std::result::Result<T, ApiError>;

/// Most events of one page.
pub const MAX_PAGE: usize = 1000;
/// The longest `wait`: below the default graceful-shutdown timeout, so a
/// waiting reader does not hold a stop up.
pub const MAX_WAIT_SECONDS: u64 = 25;
/// How often a waiting read looks again, at first and at most.
const POLL_MIN: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(500);

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ValidationError::new(field, message).into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    cursor: Option<String>,
    from: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    entitlement: Option<String>,
    limit: Option<usize>,
    wait: Option<u64>,
}

/// A page of events and where the next one starts.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EventPage {
    /// Oldest first; each as the stream and the webhooks carry it.
    #[schema(value_type = Vec<super::openapi::CloudEvent>)]
    events: Vec<Box<RawValue>>,
    /// Pass as `cursor` to read on from here (also when `events` is empty).
    next_cursor: String,
}

/// Events of the stream, oldest first, from `cursor` (or the oldest kept,
/// or `from=now`). An empty page means the stream holds nothing more (that
/// matches) for now; with `wait`, it is answered only after that many
/// seconds without a matching event.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,20}-[0-9]{1,20}$", description = "`next_cursor` of the page before."),
        ("from" = Option<EventsStart>, Query, description = "Without `cursor`: `oldest` (default, the oldest event kept) or `now` (only events added from now on)."),
        ("type" = Option<String>, Query, description = "Only events of these types (comma-separated), e.g. `seat.denied,usage.denied`."),
        ("entitlement" = Option<EntitlementId>, Query, description = "Only events of this entitlement."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Events per page (default 100; a page may hold a few more of the same instant)."),
        ("wait" = Option<u64>, Query, minimum = 0, maximum = 25, description = "Seconds to wait for a matching event before answering an empty page (default 0)."),
    ),
    responses(
        (status = 200, description = "A page of events.", body = EventPage),
        (status = 400, description = "`invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn list_events(
    _: Admin,
    Query(q): Query<EventsQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let limit = page_limit(q.limit, MAX_PAGE)?;
    let mut from = match (q.cursor.as_deref(), q.from.as_deref()) {
        (Some(_), Some(_)) => return Err(invalid("from", "give either cursor or from")),
        (Some(c), None) => EventsFrom::At(
            StreamPos::parse(c).ok_or_else(|| invalid("cursor", "malformed cursor"))?,
        ),
        (None, None | Some("oldest")) => EventsFrom::Oldest,
        (None, Some("now")) => EventsFrom::Now,
        (None, Some(other)) => {
            return Err(invalid(
                "from",
                format!("unknown start {other:?}; use oldest or now"),
            ));
        }
    };
    let kinds: Option<Vec<&str>> = match q.kind.as_deref() {
        None => None,
        Some(list) => Some(
            list.split(',')
                .map(|k| match EVENT_KINDS.iter().find(|&&known| known == k) {
                    Some(known) => Ok(*known),
                    None => Err(invalid(
                        "type",
                        format!(
                            "unknown event type {k:?}; the types are {}",
                            EVENT_KINDS.join(", ")
                        ),
                    )),
                })
                .collect::<Result<_>>()?,
        ),
    };
    let of = q
        .entitlement
        .as_deref()
        .map(EntitlementId::parse)
        .transpose()
        .map_err(|e| invalid("entitlement", e.to_string()))?;
    let wait = q.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECONDS {
        return Err(invalid(
            "wait",
            format!("must be 0 to {MAX_WAIT_SECONDS} seconds"),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(wait);
    let mut pause = POLL_MIN;
    loop {
        let page = state
            .engine
            .store()
            .events_page(from, of.as_ref(), limit)
            .await
            .map_err(crate::engine::EngineError::from)?;
        let events = page
            .entries
            .into_iter()
            .filter(|e| kinds.as_ref().is_none_or(|k| k.contains(&e.kind.as_str())))
            .map(|e| {
                RawValue::from_string(e.event).map_err(|err| {
                    crate::engine::EngineError::from(crate::store::StoreError::corrupt(
                        format!("event {}", e.pos),
                        "not JSON",
                        Some(crate::store::Cause::Json(std::sync::Arc::new(err))),
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        from = EventsFrom::At(page.next);
        if events.is_empty() && page.more {
            // Filtered out: read on at once, so that an empty page always
            // means the end of the stream (for now).
            continue;
        }
        let now = Instant::now();
        if !events.is_empty() || now >= deadline {
            return Ok(HttpResponse::build(StatusCode::OK).json(EventPage {
                events,
                next_cursor: page.next.to_string(),
            }));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Where `GET /v1/events` starts without a cursor.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum EventsStart {
    Oldest,
    Now,
}
