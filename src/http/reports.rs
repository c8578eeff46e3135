//! The evidence for sales and billing: the overdraft report, usage history
//! and closed usage periods.

use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Scope;
use super::problem::ApiError;
use crate::domain::{
    BucketRecord, BucketSize, EntitlementId, EntitlementView, Limit, ValidationError,
};
use crate::engine::EngineError;
use crate::store::PERIODS_KEPT;

type Result<T> = std::result::Result<T, ApiError>;

/// Most items of one report page.
pub const MAX_PAGE: usize = 1000;
/// Most buckets one history call answers.
pub const MAX_BUCKETS: i64 = 10_000;
/// The longest look-back of `state=denied_recently`.
pub const MAX_DENIED_HOURS: i64 = 30 * 24;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ValidationError::new(field, message).into()
}

/// The query string as `T` (unknown parameters refused, field `query`).
pub(super) fn query<T: for<'de> Deserialize<'de>>(req: &HttpRequest) -> Result<T> {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| invalid("query", e.to_string()))
}

/// A page size: 100 by default, 1 to `max`.
pub(super) fn page_limit(limit: Option<usize>, max: usize) -> Result<usize> {
    let limit = limit.unwrap_or(100);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(invalid("limit", format!("must be 1 to {max}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    state: Option<String>,
    hours: Option<i64>,
}

/// Where a report page continues: after this id (overdraft), or after this
/// denial time and id (denied recently).
#[derive(Debug, PartialEq)]
enum Cursor {
    Overdraft(String),
    Denied(i64, String),
}

impl Cursor {
    fn encode(&self) -> String {
        let raw = match self {
            Cursor::Overdraft(id) => format!("o:{id}"),
            Cursor::Denied(at, id) => format!("d:{at}:{id}"),
        };
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn decode(s: &str) -> Option<Cursor> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let (kind, rest) = raw.split_once(':')?;
        let id = |s: &str| EntitlementId::parse(s).ok().map(|_| s.to_string());
        match kind {
            "o" => Some(Cursor::Overdraft(id(rest)?)),
            "d" => {
                let (at, rest) = rest.split_once(':')?;
                Some(Cursor::Denied(at.parse().ok()?, id(rest)?))
            }
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct ReportSeats {
    in_use: u64,
    purchased: u64,
    hard_cap: Limit,
    overdraft: bool,
    overdraft_since: Option<DateTime<Utc>>,
    /// Highest seats in use since the pool entered overdraft.
    peak: u64,
    /// Activations denied since the pool entered overdraft.
    denied_period: u64,
    denied_total: u64,
}

#[derive(Serialize)]
struct ReportFeature {
    used: u64,
    included: u64,
    hard_cap: Limit,
    overdraft: bool,
    overdraft_since: Option<DateTime<Utc>>,
    /// Usage only grows within a period: its peak is what is used now.
    peak: u64,
    denied_period: u64,
    denied_total: u64,
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct ReportItem {
    entitlement: EntitlementId,
    /// The earliest of the seats' and the features' overdraft starts.
    overdraft_since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_denied_at: Option<DateTime<Utc>>,
    seats: ReportSeats,
    /// Features in overdraft or with denials this period.
    features: BTreeMap<String, ReportFeature>,
}

impl ReportItem {
    fn of(v: EntitlementView, last_denied_at: Option<DateTime<Utc>>) -> Self {
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

    fn in_overdraft(&self) -> bool {
        self.overdraft_since.is_some()
    }
}

/// The acknowledged state of each listed id (see [`crate::engine::Engine::stored_views`]).
async fn views(state: &AppState, ids: Vec<String>) -> Result<Vec<EntitlementView>> {
    let ids: Vec<EntitlementId> = ids
        .iter()
        .filter_map(|id| EntitlementId::parse(id).ok())
        .collect();
    Ok(state.engine.stored_views(&ids).await?)
}

/// `GET /v1/reports/overdraft`: every entitlement in overdraft now, in id
/// order; or, with `state=denied_recently`, every entitlement with a
/// denial in the last `hours`, most recent first.
pub async fn overdraft_report(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Admin)?;
    let q: ReportQuery = query(&req)?;
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
    let store = state.engine.store();
    let (items, next) = if denied {
        let after = match cursor {
            None => None,
            Some(Cursor::Denied(at, id)) => Some((at, id)),
            Some(_) => return Err(invalid("cursor", "the cursor is of another report")),
        };
        let since = state.engine.now().timestamp_millis() - hours * 3_600_000;
        let page = store
            .denied_page(since, after, limit)
            .await
            .map_err(EngineError::from)?;
        let next = (page.len() == limit)
            .then(|| page.last().map(|(id, at)| Cursor::Denied(*at, id.clone())))
            .flatten();
        let last: BTreeMap<String, i64> = page.iter().cloned().collect();
        let order: Vec<String> = page.into_iter().map(|(id, _)| id).collect();
        let items = views(&state, order)
            .await?
            .into_iter()
            .map(|v| {
                let at = last
                    .get(v.id.as_str())
                    .and_then(|ms| DateTime::from_timestamp_millis(*ms));
                ReportItem::of(v, at)
            })
            .collect::<Vec<_>>();
        (items, next)
    } else {
        let after = match cursor {
            None => None,
            Some(Cursor::Overdraft(id)) => Some(id),
            Some(_) => return Err(invalid("cursor", "the cursor is of another report")),
        };
        let ids = store
            .overdraft_page(after.as_deref(), limit)
            .await
            .map_err(EngineError::from)?;
        let next = (ids.len() == limit)
            .then(|| ids.last().map(|id| Cursor::Overdraft(id.clone())))
            .flatten();
        let items = views(&state, ids)
            .await?
            .into_iter()
            .map(|v| ReportItem::of(v, None))
            // Reading it ran its housekeeping: it may have just left.
            .filter(ReportItem::in_overdraft)
            .collect::<Vec<_>>();
        (items, next)
    };
    Ok(HttpResponse::build(StatusCode::OK).json(serde_json::json!({
        "state": if denied { "denied_recently" } else { "overdraft" },
        "items": items,
        "next_cursor": next.map(|c| c.encode()),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    bucket: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn instant(field: &str, raw: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| invalid(field, format!("not an RFC 3339 time ({e})")))
}

#[derive(Serialize, Default)]
struct FeatureBucket {
    added: u64,
    denied: u64,
}

#[derive(Serialize)]
struct SeatBucket {
    peak: u64,
    denied: u64,
}

#[derive(Serialize)]
struct Bucket {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    seats: SeatBucket,
    features: BTreeMap<String, FeatureBucket>,
}

/// The seats in use when the bucket before `first` ended: from the latest
/// record before it, looking back no further than `floor` (the retention,
/// or the entitlement's creation).
async fn level_before(
    state: &AppState,
    id: &EntitlementId,
    size: BucketSize,
    first: i64,
    floor: i64,
) -> Result<u64> {
    const CHUNK: i64 = 168;
    let step = size.step_ms();
    let mut end = first;
    while end > floor {
        let start = (end - CHUNK * step).max(floor);
        let starts: Vec<i64> = (0..(end - start) / step)
            .map(|i| start + i * step)
            .collect();
        let records = state
            .engine
            .store()
            .history(id, size, &starts)
            .await
            .map_err(EngineError::from)?;
        if let Some(level) = records.iter().rev().flatten().find_map(|r| r.seats_end) {
            return Ok(level);
        }
        end = start;
    }
    Ok(0)
}

/// `GET /v1/entitlements/{id}/history`: per bucket, the peak of seats in
/// use, seats denied, and per feature the usage added and the denials;
/// every bucket of the range, empty ones included.
pub async fn history(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Client)?;
    let id = EntitlementId::parse(&path)?;
    let q: HistoryQuery = query(&req)?;
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
    if from > to {
        return Err(invalid("from", "must not be after to"));
    }
    let step = size.step_ms();
    let first = size.start(from.timestamp_millis());
    let end = to.timestamp_millis();
    let count = if end > first {
        (end - first + step - 1) / step
    } else {
        0
    };
    if count > MAX_BUCKETS {
        return Err(invalid(
            "to",
            format!("the range holds {count} buckets; at most {MAX_BUCKETS}"),
        ));
    }
    let settings = state.engine.settings();
    let retention = match size {
        BucketSize::Hour => settings.hourly_retention,
        BucketSize::Day => settings.daily_retention,
    };
    let retention_ms = retention.as_millis().min(i64::MAX as u128) as i64;
    let oldest = size
        .start(now.timestamp_millis())
        .saturating_sub(retention_ms);
    if first < oldest {
        return Err(invalid(
            "from",
            format!(
                "before the {} retention of {} buckets ({})",
                size.as_str(),
                humantime::format_duration(retention),
                DateTime::from_timestamp_millis(oldest)
                    .unwrap_or(now)
                    .to_rfc3339()
            ),
        ));
    }
    let view = state.engine.get(&id).await?;
    let starts: Vec<i64> = (0..count).map(|i| first + i * step).collect();
    let records = state
        .engine
        .store()
        .history(&id, size, &starts)
        .await
        .map_err(EngineError::from)?;
    let created = size.start(view.created_at.timestamp_millis());
    let mut level = if records.first().is_some_and(|r| r.is_some()) || first <= created {
        0
    } else {
        level_before(&state, &id, size, first, oldest.max(created)).await?
    };
    let mut names: BTreeSet<String> = view.features.keys().map(|k| k.to_string()).collect();
    names.extend(
        records
            .iter()
            .flatten()
            .flat_map(|r| r.features.keys().cloned()),
    );
    let buckets: Vec<Bucket> = starts
        .iter()
        .zip(&records)
        .map(|(start, record)| {
            let empty = BucketRecord::default();
            let r = record.as_ref().unwrap_or(&empty);
            let peak = r.seats_peak.map_or(level, |p| p.max(level));
            level = r.seats_end.unwrap_or(level);
            let features = names
                .iter()
                .map(|n| {
                    let (added, denied) = r.features.get(n).copied().unwrap_or_default();
                    (n.clone(), FeatureBucket { added, denied })
                })
                .collect();
            Bucket {
                start: DateTime::from_timestamp_millis(*start).unwrap_or(now),
                end: DateTime::from_timestamp_millis(start + step).unwrap_or(now),
                seats: SeatBucket {
                    peak,
                    denied: r.seats_denied,
                },
                features,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "entitlement": id,
        "bucket": size,
        "from": from,
        "to": to,
        "buckets": buckets,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodsQuery {
    feature: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/entitlements/{id}/periods`: closed usage periods, newest first,
/// as billing records (kept after the entitlement is deleted, until the
/// daily retention runs out).
pub async fn periods(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.auth.require(&req, Scope::Client)?;
    let id = EntitlementId::parse(&path)?;
    let q: PeriodsQuery = query(&req)?;
    let limit = page_limit(q.limit, PERIODS_KEPT)?;
    let feature = q
        .feature
        .as_deref()
        .map(crate::domain::FeatureKey::parse)
        .transpose()
        .map_err(|e| invalid("feature", e.message))?;
    let fetch = if feature.is_some() {
        PERIODS_KEPT
    } else {
        limit
    };
    let records = state
        .engine
        .store()
        .periods(&id, fetch)
        .await
        .map_err(EngineError::from)?;
    if records.is_empty() {
        // 404 for an entitlement that does not exist (and left no records).
        state.engine.get(&id).await?;
    }
    let periods: Vec<serde_json::Value> = records
        .iter()
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .filter(|r| {
            feature
                .as_ref()
                .is_none_or(|f| r.get("feature").and_then(|v| v.as_str()) == Some(f.as_str()))
        })
        .take(limit)
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "entitlement": id,
        "periods": periods,
    })))
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
