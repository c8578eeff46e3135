//! CSV exports for renewal meetings: the overdraft report and an
//! entitlement's history. Both are streamed a page at a time, so a million
//! rows never sit in memory; a read that fails midway ends the download
//! unfinished (the chunked body is cut), never with rows made up.

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};

use super::PageError;
use crate::domain::{BucketSize, EntitlementId};
use crate::engine::EngineError;
use crate::engine::reports::HistoryBucket;
use crate::http::AppState;
use crate::http::reports::ReportItem;

/// Entitlements read per page of the overdraft export.
const REPORT_PAGE: usize = 1000;
/// History buckets read per step of the history export.
const HISTORY_STEP: i64 = 1000;

pub const REPORT_HEADER: [&str; 13] = [
    "entitlement",
    "kind",
    "feature",
    "in_overdraft",
    "overdraft_since",
    "current",
    "purchased_or_included",
    "hard_cap",
    "peak",
    "denied_since_overdraft_or_this_period",
    "denied_total",
    "period_start",
    "period_end",
];

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn rows_of(item: &ReportItem, out: &mut csv::Writer<Vec<u8>>) -> csv::Result<()> {
    let s = &item.seats;
    out.write_record([
        item.entitlement.as_str(),
        "seats",
        "",
        if s.overdraft { "true" } else { "false" },
        &time(s.overdraft_since),
        &s.in_use.to_string(),
        &s.purchased.to_string(),
        &s.hard_cap.to_string(),
        &s.peak.to_string(),
        &s.denied_period.to_string(),
        &s.denied_total.to_string(),
        "",
        "",
    ])?;
    for (key, f) in &item.features {
        out.write_record([
            item.entitlement.as_str(),
            "feature",
            key,
            if f.overdraft { "true" } else { "false" },
            &time(f.overdraft_since),
            &f.used.to_string(),
            &f.included.to_string(),
            &f.hard_cap.to_string(),
            &f.peak.to_string(),
            &f.denied_period.to_string(),
            &f.denied_total.to_string(),
            &time(f.period_start),
            &time(f.period_end),
        ])?;
    }
    Ok(())
}

fn chunk(
    write: impl FnOnce(&mut csv::Writer<Vec<u8>>) -> csv::Result<()>,
) -> std::io::Result<Bytes> {
    let mut out = csv::Writer::from_writer(Vec::new());
    write(&mut out).map_err(std::io::Error::other)?;
    let bytes = out
        .into_inner()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Bytes::from(bytes))
}

fn download(
    name: &str,
    body: impl Stream<Item = std::io::Result<Bytes>> + 'static,
) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/csv; charset=utf-8"))
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        ))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .streaming(body)
}

fn failed(what: &str, e: EngineError) -> std::io::Error {
    tracing::error!(error = %crate::store::chain(&e), "the {what} export stopped: a read failed");
    std::io::Error::other(e)
}

/// The overdraft report: a row for each entitlement's seats and one for
/// each of its features in overdraft or with denials this period, in id
/// order. The first page is read before answering, so a store that is
/// down answers `503`, not an empty file.
pub async fn overdraft(state: web::Data<AppState>) -> Result<HttpResponse, PageError> {
    let first = state.engine.overdraft_page(None, REPORT_PAGE).await?;
    let header = chunk(|w| w.write_record(REPORT_HEADER)).map_err(PageError::internal)?;
    let pages = stream::unfold(
        (state, Some(first), None::<String>, false),
        |(state, ready, after, done)| async move {
            if done {
                return None;
            }
            let page = match ready {
                Some(p) => Ok(p),
                None => {
                    state
                        .engine
                        .overdraft_page(after.as_deref(), REPORT_PAGE)
                        .await
                }
            };
            match page {
                Err(e) => Some((Err(failed("overdraft", e)), (state, None, None, true))),
                Ok(page) => {
                    for u in &page.unreadable {
                        tracing::error!(entitlement = %u.entitlement, detail = %u.detail, "left out of the overdraft export: unreadable");
                    }
                    let bytes = chunk(|w| {
                        for v in page.views {
                            let item = ReportItem::of(v, None);
                            if item.in_overdraft() {
                                rows_of(&item, w)?;
                            }
                        }
                        Ok(())
                    });
                    let done = page.next_after.is_none();
                    Some((bytes, (state, None, page.next_after, done)))
                }
            }
        },
    );
    let body = stream::iter([Ok(header)]).chain(pages);
    Ok(download("overdraft.csv", body))
}

/// An entitlement's history from `from` to `to`: a row per bucket with the
/// seats' peak and denials and each feature's usage and denials (the
/// features of its configuration now).
pub async fn history(
    state: web::Data<AppState>,
    id: EntitlementId,
    size: BucketSize,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<HttpResponse, PageError> {
    // Steps end on bucket boundaries, so no bucket is read twice.
    let from = DateTime::from_timestamp_millis(size.start(from.timestamp_millis())).unwrap_or(from);
    let step = chrono::Duration::milliseconds(size.step_ms() * HISTORY_STEP);
    let first_to = (from + step).min(to);
    let (view, first) = state.engine.history(&id, size, from, first_to).await?;
    let features: Vec<String> = view.features.keys().map(|k| k.to_string()).collect();
    let mut head = vec![
        "bucket_start".to_string(),
        "bucket_end".into(),
        "seats_peak".into(),
        "seats_denied".into(),
    ];
    for f in &features {
        head.push(format!("{f}_used"));
        head.push(format!("{f}_denied"));
    }
    let header = chunk(|w| w.write_record(&head)).map_err(PageError::internal)?;
    let write = move |buckets: Vec<HistoryBucket>, features: &[String]| {
        chunk(|w| {
            for b in buckets {
                let mut row = vec![
                    time(Some(b.start)),
                    time(Some(b.end)),
                    b.seats_peak.to_string(),
                    b.seats_denied.to_string(),
                ];
                for f in features {
                    let (added, denied) = b.features.get(f).copied().unwrap_or_default();
                    row.push(added.to_string());
                    row.push(denied.to_string());
                }
                w.write_record(&row)?;
            }
            Ok(())
        })
    };
    let first_chunk = write(first, &features);
    let steps = stream::unfold(
        (state, id, first_to, features),
        move |(state, id, start, features)| async move {
            if start >= to {
                return None;
            }
            let end = (start + step).min(to);
            match state.engine.history(&id, size, start, end).await {
                Ok((_, buckets)) => {
                    let bytes = write(buckets, &features);
                    Some((bytes, (state, id, end, features)))
                }
                Err(e) => Some((Err(failed("history", e)), (state, id, to, features))),
            }
        },
    );
    let body = stream::iter([Ok(header), first_chunk]).chain(steps);
    Ok(download("history.csv", body))
}
