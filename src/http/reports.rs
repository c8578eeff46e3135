//! The evidence for sales and billing: the overdraft report, usage history
//! and closed usage periods.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::extract::{Admin, Client, EntitlementPath, Query, page_limit};
use super::problem::ApiError;
use crate::domain::{BucketSize, EntitlementId, EntitlementView, Limit, ValidationError};
use crate::engine::reports::{HistoryBucket, Unreadable};
use crate::store::PERIODS_KEPT;

type Result<T> = std::result::Result<T, ApiError>;

/// Most items of one report page.
pub const MAX_PAGE: usize = 1000;
/// The longest look-back of `state=denied_recently`.
pub const MAX_DENIED_HOURS: i64 = 30 * 24;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ValidationError::new(field, message).into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    state: Option<String>,
    hours: Option<i64>,
}

/// Where a page continues: after this id (overdraft report, list of
/// entitlements), or after this denial time and id (denied recently).
#[derive(Debug, PartialEq)]
enum Cursor {
    Overdraft(String),
    Denied(i64, String),
    Listed(String),
}

impl Cursor {
    fn encode(&self) -> String {
        let raw = match self {
            Cursor::Overdraft(id) => format!("o:{id}"),
            Cursor::Denied(at, id) => format!("d:{at}:{id}"),
            Cursor::Listed(id) => format!("e:{id}"),
        };
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn decode(s: &str) -> Option<Cursor> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let (kind, rest) = raw.split_once(':')?;
        let id = |s: &str| EntitlementId::parse(s).ok().map(|_| s.to_string());
        match kind {
            "o" => Some(Cursor::Overdraft(id(rest)?)),
            "e" => Some(Cursor::Listed(id(rest)?)),
            "d" => {
                let (at, rest) = rest.split_once(':')?;
                Some(Cursor::Denied(at.parse().ok()?, id(rest)?))
            }
            _ => None,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReportSeats {
    pub(crate) in_use: u64,
    pub(crate) purchased: u64,
    pub(crate) hard_cap: Limit,
    pub(crate) overdraft: bool,
    pub(crate) overdraft_since: Option<DateTime<Utc>>,
    /// Highest seats in use since the pool entered overdraft.
    pub(crate) peak: u64,
    /// Activations denied since the pool entered overdraft.
    pub(crate) denied_period: u64,
    pub(crate) denied_total: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReportFeature {
    pub(crate) used: u64,
    pub(crate) included: u64,
    pub(crate) hard_cap: Limit,
    pub(crate) overdraft: bool,
    pub(crate) overdraft_since: Option<DateTime<Utc>>,
    /// Usage only grows within a period: its peak is what is used now.
    pub(crate) peak: u64,
    pub(crate) denied_period: u64,
    pub(crate) denied_total: u64,
    pub(crate) period_start: Option<DateTime<Utc>>,
    pub(crate) period_end: Option<DateTime<Utc>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReportItem {
    pub(crate) entitlement: EntitlementId,
    /// The earliest of the seats' and the features' overdraft starts.
    pub(crate) overdraft_since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_denied_at: Option<DateTime<Utc>>,
    pub(crate) seats: ReportSeats,
    /// Features in overdraft or with denials this period.
    pub(crate) features: BTreeMap<String, ReportFeature>,
}

impl ReportItem {
    pub(crate) fn of(v: EntitlementView, last_denied_at: Option<DateTime<Utc>>) -> Self {
        let s = &v.seats;
        let features: BTreeMap<String, ReportFeature> = v
            .features
            .iter()
            .filter(|(_, f)| f.overdraft || f.denied_period > 0)
            .map(|(k, f)| {
                let item = ReportFeature {
                    used: f.used,
                    included: f.included,
                    hard_cap: f.hard_cap,
                    overdraft: f.overdraft,
                    overdraft_since: f.overdraft_since,
                    peak: f.used,
                    denied_period: f.denied_period,
                    denied_total: f.denied_total,
                    period_start: f.period_start,
                    period_end: f.period_end,
                };
                (k.to_string(), item)
            })
            .collect();
        let overdraft_since = features
            .values()
            .filter_map(|f| f.overdraft_since)
            .chain(s.overdraft_since)
            .min();
        ReportItem {
            entitlement: v.id.clone(),
            overdraft_since,
            last_denied_at,
            seats: ReportSeats {
                in_use: s.in_use,
                purchased: s.purchased,
                hard_cap: s.hard_cap,
                overdraft: s.overdraft,
                overdraft_since: s.overdraft_since,
                peak: s.overdraft_peak,
                denied_period: s.overdraft_denied,
                denied_total: s.denied_total,
            },
            features,
        }
    }

    pub(crate) fn in_overdraft(&self) -> bool {
        self.overdraft_since.is_some()
    }
}

/// `GET /v1/reports/overdraft`: every entitlement in overdraft now, in id
/// order; or, with `state=denied_recently`, every entitlement with a
/// denial in the last `hours`, most recent first.
#[utoipa::path(
    get,
    path = "/v1/reports/overdraft",
    tag = "evidence",
    params(
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Items per page (default 100)."),
        ("cursor" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]+$", description = "`next_cursor` of the page before (of the same `state`)."),
        ("state" = Option<super::openapi::ReportState>, Query, description = "`overdraft` (default) or `denied_recently`."),
        ("hours" = Option<i64>, Query, minimum = 1, maximum = 720, description = "Only with `state=denied_recently`: the look-back (default 24)."),
    ),
    responses(
        (status = 200, description = "A page of the report.", body = Report),
        (status = 400, description = "`invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn overdraft_report(
    _: Admin,
    Query(q): Query<ReportQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let limit = page_limit(q.limit, MAX_PAGE)?;
    let denied = match q.state.as_deref() {
        None | Some("overdraft") => false,
        Some("denied_recently") => true,
        Some(other) => {
            return Err(invalid(
                "state",
                format!("unknown state {other:?}; use overdraft or denied_recently"),
            ));
        }
    };
    if q.hours.is_some() && !denied {
        return Err(invalid("hours", "only with state=denied_recently"));
    }
    let hours = q.hours.unwrap_or(24);
    if !(1..=MAX_DENIED_HOURS).contains(&hours) {
        return Err(invalid("hours", format!("must be 1 to {MAX_DENIED_HOURS}")));
    }
    let cursor = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| invalid("cursor", "malformed cursor"))?),
    };
    let (items, next, unreadable) = if denied {
        let after = match cursor {
            None => None,
            Some(Cursor::Denied(at, id)) => Some((at, id)),
            Some(_) => return Err(invalid("cursor", "the cursor is of another report")),
        };
        let page = state.engine.denied_page(hours, after, limit).await?;
        let items = page
            .entries
            .into_iter()
            .map(|(v, at)| ReportItem::of(v, Some(at)))
            .collect::<Vec<_>>();
        let next = page.next_after.map(|(at, id)| Cursor::Denied(at, id));
        (items, next, page.unreadable)
    } else {
        let after = match cursor {
            None => None,
            Some(Cursor::Overdraft(id)) => Some(id),
            Some(_) => return Err(invalid("cursor", "the cursor is of another report")),
        };
        let page = state.engine.overdraft_page(after.as_deref(), limit).await?;
        let items = page
            .views
            .into_iter()
            .map(|v| ReportItem::of(v, None))
            // Reading it ran its housekeeping: it may have just left.
            .filter(ReportItem::in_overdraft)
            .collect::<Vec<_>>();
        (
            items,
            page.next_after.map(Cursor::Overdraft),
            page.unreadable,
        )
    };
    Ok(HttpResponse::build(StatusCode::OK).json(Report {
        state: if denied {
            "denied_recently"
        } else {
            "overdraft"
        },
        items,
        next_cursor: next.map(|c| c.encode()),
        unreadable,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/entitlements`: every entitlement, in id order, as last
/// acknowledged.
#[utoipa::path(
    get,
    path = "/v1/entitlements",
    tag = "entitlements",
    params(
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Entitlements per page (default 100)."),
        ("cursor" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]+$", description = "`next_cursor` of the page before."),
    ),
    responses(
        (status = 200, description = "A page of entitlements.", body = EntitlementList),
        (status = 400, description = "`invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("admin" = [])),
)]
pub async fn list_entitlements(
    _: Admin,
    Query(q): Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let limit = page_limit(q.limit, MAX_PAGE)?;
    let after = match q.cursor.as_deref().map(Cursor::decode) {
        None => None,
        Some(Some(Cursor::Listed(id))) => Some(id),
        Some(Some(_)) => return Err(invalid("cursor", "the cursor is of a report")),
        Some(None) => return Err(invalid("cursor", "malformed cursor")),
    };
    let page = state
        .engine
        .entitlement_page(after.as_deref(), limit)
        .await?;
    Ok(HttpResponse::build(StatusCode::OK).json(EntitlementList {
        items: page.views,
        next_cursor: page.next_after.map(|id| Cursor::Listed(id).encode()),
        unreadable: page.unreadable,
    }))
}

/// A page of entitlements (each as `GET /v1/entitlements/{id}` shows it);
/// those whose stored state could not be read are listed in `unreadable`
/// (left out when there are none).
#[derive(Serialize, utoipa::ToSchema)]
pub struct EntitlementList {
    items: Vec<EntitlementView>,
    /// Pass as `cursor` for the next page; `null` on the last.
    next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unreadable: Vec<Unreadable>,
}

/// A report page; entitlements whose stored state could not be read are
/// listed in `unreadable` (left out when there are none).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Report {
    state: &'static str,
    items: Vec<ReportItem>,
    next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unreadable: Vec<Unreadable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    bucket: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

pub(crate) fn instant(field: &str, raw: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| invalid(field, format!("not an RFC 3339 time ({e})")))
}

#[derive(Serialize, Default, utoipa::ToSchema)]
pub struct FeatureBucket {
    added: u64,
    denied: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SeatBucket {
    peak: u64,
    denied: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Bucket {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    seats: SeatBucket,
    features: BTreeMap<String, FeatureBucket>,
}

/// `GET /v1/entitlements/{id}/history`: per bucket, the peak of seats in
/// use, seats denied, and per feature the usage added and the denials;
/// every bucket of the range, empty ones included.
#[utoipa::path(
    get,
    path = "/v1/entitlements/{id}/history",
    operation_id = "entitlement_history",
    tag = "evidence",
    params(
        ("id" = crate::domain::EntitlementId, Path, description = "The entitlement."),
        ("bucket" = Option<crate::domain::BucketSize>, Query, description = "`hour` (default) or `day`."),
        ("from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339; default 24 buckets before `to`."),
        ("to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339; default now."),
    ),
    responses(
        (status = 200, description = "Every bucket of the range, empty ones included.", body = History),
        (status = 400, description = "`invalid_request` (with `field`): a bad bucket or time, more than 10,000 buckets, a range before the retention.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("client" = []), ("admin" = [])),
)]
pub async fn history(
    _: Client,
    EntitlementPath(id): EntitlementPath,
    Query(q): Query<HistoryQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let size = match q.bucket.as_deref() {
        None => BucketSize::Hour,
        Some(b) => BucketSize::parse(b)
            .ok_or_else(|| invalid("bucket", format!("unknown bucket {b:?}; use hour or day")))?,
    };
    let now = state.engine.now();
    let to = match q.to.as_deref() {
        Some(t) => instant("to", t)?,
        None => now,
    };
    let from = match q.from.as_deref() {
        Some(f) => instant("from", f)?,
        None => to - chrono::Duration::milliseconds(size.step_ms() * 24),
    };
    let (_, buckets) = state.engine.history(&id, size, from, to).await?;
    let buckets: Vec<Bucket> = buckets.into_iter().map(Bucket::from).collect();
    Ok(HttpResponse::Ok().json(History {
        entitlement: id,
        bucket: size,
        from,
        to,
        buckets,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct History {
    entitlement: EntitlementId,
    bucket: BucketSize,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    buckets: Vec<Bucket>,
}

impl From<HistoryBucket> for Bucket {
    fn from(b: HistoryBucket) -> Self {
        Bucket {
            start: b.start,
            end: b.end,
            seats: SeatBucket {
                peak: b.seats_peak,
                denied: b.seats_denied,
            },
            features: b
                .features
                .into_iter()
                .map(|(name, (added, denied))| (name, FeatureBucket { added, denied }))
                .collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodsQuery {
    feature: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/entitlements/{id}/periods`: closed usage periods, newest first,
/// as billing records (kept after the entitlement is deleted, until the
/// daily retention runs out).
#[utoipa::path(
    get,
    path = "/v1/entitlements/{id}/periods",
    operation_id = "entitlement_periods",
    tag = "evidence",
    params(
        ("id" = crate::domain::EntitlementId, Path, description = "The entitlement."),
        ("feature" = Option<crate::domain::FeatureKey>, Query, description = "Only this feature's periods."),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 10000, description = "Records (default 100)."),
    ),
    responses(
        (status = 200, description = "Closed periods, newest first.", body = PeriodsBody),
        (status = 400, description = "`invalid_request` (with `field`).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`entitlement_not_found`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("client" = []), ("admin" = [])),
)]
pub async fn periods(
    _: Client,
    EntitlementPath(id): EntitlementPath,
    Query(q): Query<PeriodsQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let limit = page_limit(q.limit, PERIODS_KEPT)?;
    let feature = q
        .feature
        .as_deref()
        .map(crate::domain::FeatureKey::parse)
        .transpose()
        .map_err(|e| invalid("feature", e.message))?;
    let periods = state.engine.periods(&id, feature.as_ref(), limit).await?;
    Ok(HttpResponse::Ok().json(PeriodsBody {
        entitlement: id,
        periods: periods.records,
        unreadable: periods.unreadable,
    }))
}

/// Closed periods; records that could not be read are listed in
/// `unreadable` (left out when there are none).
#[derive(Serialize, utoipa::ToSchema)]
pub struct PeriodsBody {
    entitlement: EntitlementId,
    #[schema(value_type = Vec<super::openapi::PeriodRecord>)]
    periods: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unreadable: Vec<Unreadable>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        for c in [
            Cursor::Overdraft("acme-1".into()),
            Cursor::Denied(1_700_000_000_123, "acme:x".into()),
        ] {
            assert_eq!(Cursor::decode(&c.encode()), Some(c));
        }
        for bad in [
            "",
            "!!",
            "b2s",
            &URL_SAFE_NO_PAD.encode("x:1"),
            &URL_SAFE_NO_PAD.encode("d:abc:id"),
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
