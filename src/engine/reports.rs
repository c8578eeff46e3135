//! The evidence for sales and billing, read for the HTTP layer: report
//! pages over the overdraft and recent-denials indexes, usage history
//! bucket by bucket, and closed usage periods. Reads go to the store
//! without claiming entitlements, so the processes that own them keep
//! writing undisturbed; what cannot be read is reported, not dropped.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{Engine, EngineError};
use crate::domain::{
    BucketRecord, BucketSize, Effects, EntitlementId, EntitlementView, FeatureKey, ValidationError,
};
use crate::store::{PERIODS_KEPT, chain};

/// Most buckets one history call answers.
pub const MAX_BUCKETS: i64 = 10_000;

/// An id in an index, or a record, that could not be read.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Unreadable {
    /// The entitlement (or, for a malformed index entry, the entry itself).
    pub entitlement: String,
    pub detail: String,
}

/// One page of the overdraft report, or of the list of entitlements.
#[derive(Debug, Default)]
pub struct OverdraftPage {
    /// The acknowledged state of each entitlement of the index page, in id
    /// order (reading it ran its housekeeping: one may have just left the
    /// overdraft).
    pub views: Vec<EntitlementView>,
    /// The last id of this page when another may follow.
    pub next_after: Option<String>,
    pub unreadable: Vec<Unreadable>,
}

/// One page of the recent-denials report.
#[derive(Debug, Default)]
pub struct DeniedPage {
    /// Each entitlement's acknowledged state and its last denial, most
    /// recent first.
    pub entries: Vec<(EntitlementView, DateTime<Utc>)>,
    /// Where the next page starts (its last denial ms and id).
    pub next_after: Option<(i64, String)>,
    pub unreadable: Vec<Unreadable>,
}

/// What happened in one history bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryBucket {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// The most seats in use at any moment of the bucket (carried over from
    /// earlier buckets when nothing changed in it).
    pub seats_peak: u64,
    pub seats_denied: u64,
    /// Per feature: usage added and denials.
    pub features: BTreeMap<String, (u64, u64)>,
}

/// Closed usage periods, newest first.
#[derive(Debug, Default)]
pub struct Periods {
    pub records: Vec<serde_json::Value>,
    pub unreadable: Vec<Unreadable>,
}

fn invalid(field: &str, message: impl Into<String>) -> EngineError {
    EngineError::Invalid(ValidationError::new(field, message))
}

fn ms(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

impl Engine {
    /// The acknowledged (stored) state of each listed id, with leases that
    /// ran out and periods that ended while nobody called applied to the
    /// copy returned; ids not stored are left out, unreadable ones reported.
    async fn stored_views(
        &self,
        ids: &[String],
    ) -> Result<(Vec<EntitlementView>, Vec<Unreadable>), EngineError> {
        let mut unreadable = Vec::new();
        let mut parsed = Vec::with_capacity(ids.len());
        for raw in ids {
            match EntitlementId::parse(raw) {
                Ok(id) => parsed.push(id),
                Err(e) => unreadable.push(Unreadable {
                    entitlement: raw.clone(),
                    detail: format!("not an entitlement id in the index: {e}"),
                }),
            }
        }
        let now = self.now();
        let stored = self.core.store.peek_many(&parsed).await?;
        let mut views = Vec::with_capacity(parsed.len());
        for (id, state) in parsed.iter().zip(stored) {
            match state {
                Ok(Some(mut e)) => {
                    e.housekeeping(now, &mut Effects::default());
                    views.push(e.view());
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(entitlement = %id, error = %chain(&e), "stored state is unreadable");
                    unreadable.push(Unreadable {
                        entitlement: id.to_string(),
                        detail: chain(&e),
                    });
                }
            }
        }
        Ok((views, unreadable))
    }

    /// Entitlements in overdraft now, in id order, after `after`.
    pub async fn overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<OverdraftPage, EngineError> {
        let ids = self.core.store.overdraft_page(after, limit).await?;
        let next_after = (ids.len() == limit).then(|| ids.last().cloned()).flatten();
        let (views, unreadable) = self.stored_views(&ids).await?;
        Ok(OverdraftPage {
            views,
            next_after,
            unreadable,
        })
    }

    /// Every configured entitlement, in id order, after `after`.
    pub async fn entitlement_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<OverdraftPage, EngineError> {
        let ids = self.core.store.entitlement_page(after, limit).await?;
        let next_after = (ids.len() == limit).then(|| ids.last().cloned()).flatten();
        let (views, unreadable) = self.stored_views(&ids).await?;
        Ok(OverdraftPage {
            views,
            next_after,
            unreadable,
        })
    }

    /// Entitlements denied in the last `hours`, most recent first, after
    /// `after` (a position's last denial ms and id).
    pub async fn denied_page(
        &self,
        hours: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<DeniedPage, EngineError> {
        let since = self.now().timestamp_millis() - hours * 3_600_000;
        let page = self.core.store.denied_page(since, after, limit).await?;
        let next_after = (page.len() == limit)
            .then(|| page.last().map(|(id, at)| (*at, id.clone())))
            .flatten();
        let last: BTreeMap<String, i64> = page.iter().cloned().collect();
        let order: Vec<String> = page.into_iter().map(|(id, _)| id).collect();
        let (views, unreadable) = self.stored_views(&order).await?;
        let entries = views
            .into_iter()
            .filter_map(|v| {
                let denied = last.get(v.id.as_str()).copied().map(at)?;
                Some((v, denied))
            })
            .collect();
        Ok(DeniedPage {
            entries,
            next_after,
            unreadable,
        })
    }

    /// Every bucket of `[from, to)` in order, empty ones included, with the
    /// seats in use carried through quiet buckets. Refuses a range of more
    /// than [`MAX_BUCKETS`] buckets or one before the retention.
    pub async fn history(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(EntitlementView, Vec<HistoryBucket>), EngineError> {
        if from > to {
            return Err(invalid("from", "must not be after to"));
        }
        let now = self.now();
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
        let retention = match size {
            BucketSize::Hour => self.settings().hourly_retention,
            BucketSize::Day => self.settings().daily_retention,
        };
        let oldest = size
            .start(now.timestamp_millis())
            .saturating_sub(ms(retention));
        if first < oldest {
            return Err(invalid(
                "from",
                format!(
                    "before the {} retention of {} buckets ({})",
                    size.as_str(),
                    humantime::format_duration(retention),
                    at(oldest).to_rfc3339()
                ),
            ));
        }
        let view = self.get(id).await?;
        let starts: Vec<i64> = (0..count).map(|i| first + i * step).collect();
        let records = self.core.store.history(id, size, &starts).await?;
        let created = size.start(view.created_at.timestamp_millis());
        // Nothing is recorded after the current bucket: the level at a
        // start in the future is the one at the end of the current bucket
        // (looking back from there, not from the future hour by hour).
        let latest = size.start(now.timestamp_millis()) + step;
        let mut level = if records.first().is_some_and(|r| r.is_some()) || first <= created {
            0
        } else {
            self.level_before(id, size, first.min(latest), oldest.max(created))
                .await?
        };
        let mut names: Vec<String> = view.features.keys().map(|k| k.to_string()).collect();
        names.extend(
            records
                .iter()
                .flatten()
                .flat_map(|r| r.features.keys().cloned()),
        );
        names.sort();
        names.dedup();
        let buckets = starts
            .iter()
            .zip(&records)
            .map(|(start, record)| {
                let empty = BucketRecord::default();
                let r = record.as_ref().unwrap_or(&empty);
                let peak = r.seats_peak.map_or(level, |p| p.max(level));
                level = r.seats_end.unwrap_or(level);
                HistoryBucket {
                    start: at(*start),
                    end: at(start + step),
                    seats_peak: peak,
                    seats_denied: r.seats_denied,
                    features: names
                        .iter()
                        .map(|n| (n.clone(), r.features.get(n).copied().unwrap_or((0, 0))))
                        .collect(),
                }
            })
            .collect();
        Ok((view, buckets))
    }

    /// The seats in use when the bucket before `first` ended: from the latest
    /// record before it, looking back no further than `floor` (the retention,
    /// or the entitlement's creation).
    async fn level_before(
        &self,
        id: &EntitlementId,
        size: BucketSize,
        first: i64,
        floor: i64,
    ) -> Result<u64, EngineError> {
        const CHUNK: i64 = 168;
        let step = size.step_ms();
        let mut end = first;
        while end > floor {
            let start = (end - CHUNK * step).max(floor);
            let starts: Vec<i64> = (0..(end - start) / step)
                .map(|i| start + i * step)
                .collect();
            let records = self.core.store.history(id, size, &starts).await?;
            if let Some(level) = records.iter().rev().flatten().find_map(|r| r.seats_end) {
                return Ok(level);
            }
            end = start;
        }
        Ok(0)
    }

    /// Closed usage periods, newest first, of one feature or all; 404 for
    /// an entitlement that does not exist and left no records.
    pub async fn periods(
        &self,
        id: &EntitlementId,
        feature: Option<&FeatureKey>,
        limit: usize,
    ) -> Result<Periods, EngineError> {
        let fetch = if feature.is_some() {
            PERIODS_KEPT
        } else {
            limit
        };
        let records = self.core.store.periods(id, fetch).await?;
        if records.is_empty() {
            self.get(id).await?;
        }
        let mut out = Periods::default();
        for raw in records {
            match serde_json::from_str::<serde_json::Value>(&raw) {
                Ok(r) => {
                    let wanted = feature.is_none_or(|f| {
                        r.get("feature").and_then(|v| v.as_str()) == Some(f.as_str())
                    });
                    if wanted && out.records.len() < limit {
                        out.records.push(r);
                    }
                }
                Err(e) => {
                    tracing::error!(entitlement = %id, error = %e, "a closed-period record is unreadable");
                    out.unreadable.push(Unreadable {
                        entitlement: id.to_string(),
                        detail: format!("closed-period record: {e}"),
                    });
                }
            }
        }
        Ok(out)
    }
}
