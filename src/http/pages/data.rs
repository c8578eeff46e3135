//! What an entitlement's page shows, read once per request: the figures of
//! now, the history of the chosen range, the closed periods, and the same
//! numbers as the charts' JSON island.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::PageError;
use crate::domain::{BucketSize, EntitlementId, EntitlementView, Limit};
use crate::engine::Engine;

/// The range picker's choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    Day,
    Week,
    Month,
    Year,
}

impl Range {
    pub const ALL: [Range; 4] = [Range::Day, Range::Week, Range::Month, Range::Year];

    /// The `range` query parameter; the last 7 days when there is none.
    pub fn parse(raw: Option<&str>) -> Result<Range, PageError> {
        match raw {
            None | Some("") => Ok(Range::Week),
            Some(s) => Range::ALL
                .into_iter()
                .find(|r| r.key() == s)
                .ok_or_else(|| {
                    PageError::bad_request(format!(
                        "unknown range {s:?}; choose 24h, 7d, 30d or 12m"
                    ))
                }),
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Range::Day => "24h",
            Range::Week => "7d",
            Range::Month => "30d",
            Range::Year => "12m",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Range::Day => "Last 24 hours",
            Range::Week => "Last 7 days",
            Range::Month => "Last 30 days",
            Range::Year => "Last 12 months",
        }
    }

    pub fn bucket(self) -> BucketSize {
        match self {
            Range::Day | Range::Week => BucketSize::Hour,
            Range::Month | Range::Year => BucketSize::Day,
        }
    }

    fn span(self) -> chrono::Duration {
        match self {
            Range::Day => chrono::Duration::hours(24),
            Range::Week => chrono::Duration::days(7),
            Range::Month => chrono::Duration::days(30),
            Range::Year => chrono::Duration::days(365),
        }
    }
}

pub struct RangeOption {
    pub key: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

/// A time as the pages show it: always UTC, and saying so.
pub fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A bucket's start in a table: the hour, or only the day for daily ones.
fn bucket_label(size: BucketSize, t: DateTime<Utc>) -> String {
    match size {
        BucketSize::Hour => t.format("%Y-%m-%d %H:%M").to_string(),
        BucketSize::Day => t.format("%Y-%m-%d").to_string(),
    }
}

fn limit_label(l: Limit) -> String {
    l.to_string()
}

pub struct SeatsNow {
    pub in_use: u64,
    pub purchased: u64,
    pub hard_cap: String,
    pub customer_cap: Option<u64>,
    pub effective_cap: String,
    pub overdraft_since: Option<String>,
    pub at_cap: bool,
    pub denied_total: u64,
}

pub struct SeatRow {
    pub start: String,
    pub peak: u64,
    pub denied: u64,
}

pub struct FeatureRow {
    pub start: String,
    pub added: u64,
    pub denied: u64,
}

pub struct FeatureNow {
    pub key: String,
    pub used: u64,
    pub included: u64,
    pub hard_cap: String,
    pub customer_cap: Option<u64>,
    /// The meter's scale: the effective cap, or what is used when unlimited.
    pub meter_max: u64,
    pub period: Option<String>,
    pub overdraft_since: Option<String>,
    pub at_cap: bool,
    pub denied_period: u64,
    pub denied_total: u64,
    /// The thresholds crossed this period, e.g. `50 %, 80 %`.
    pub thresholds: String,
    pub rows: Vec<FeatureRow>,
}

/// A closed period as a billing record.
#[derive(serde::Deserialize)]
struct PeriodRecord {
    feature: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: u64,
    included: u64,
    overage: u64,
    peak: u64,
    denied: u64,
}

pub struct PeriodRow {
    pub feature: String,
    pub start: String,
    pub end: String,
    pub used: u64,
    pub included: u64,
    pub overage: u64,
    pub peak: u64,
    pub denied: u64,
}

/// The charts' data: bucket starts in seconds, one array per series.
#[derive(Serialize)]
struct Island<'a> {
    bucket: &'static str,
    t: Vec<i64>,
    seats: IslandSeats,
    features: Vec<IslandFeature<'a>>,
}

#[derive(Serialize)]
struct IslandSeats {
    peak: Vec<u64>,
    denied: Vec<u64>,
    purchased: u64,
    /// `null` when unlimited.
    cap: Option<u64>,
}

#[derive(Serialize)]
struct IslandFeature<'a> {
    key: &'a str,
    added: Vec<u64>,
    denied: Vec<u64>,
}

pub struct EntitlementData {
    pub id: String,
    pub ranges: Vec<RangeOption>,
    pub now: String,
    pub bucket: &'static str,
    pub seats: SeatsNow,
    pub seat_rows: Vec<SeatRow>,
    pub seats_denied_in_range: u64,
    pub features: Vec<FeatureNow>,
    pub periods: Vec<PeriodRow>,
    /// Closed-period records that could not be read (named, not hidden).
    pub unreadable_periods: usize,
    /// The charts' JSON, safe inside `<script type="application/json">`.
    pub island: String,
    pub view: EntitlementView,
}

/// Closed periods shown on a page (newest first).
const PERIODS_SHOWN: usize = 24;

/// JSON that cannot end its `<script>` element or open a comment: `<`,
/// `>` and `&` written as JSON escapes, which parse back the same.
fn island_json(value: &impl Serialize) -> Result<String, PageError> {
    let json = serde_json::to_string(value).map_err(PageError::internal)?;
    Ok(json
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026"))
}

impl EntitlementData {
    pub async fn load(
        engine: &Engine,
        id: &EntitlementId,
        range: Range,
    ) -> Result<EntitlementData, PageError> {
        let now = engine.now();
        let size = range.bucket();
        let retention = match size {
            BucketSize::Hour => engine.settings().hourly_retention,
            BucketSize::Day => engine.settings().daily_retention,
        };
        let kept = chrono::Duration::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
        // Not before what is kept: a shorter retention shortens the range.
        let from =
            (now - range.span()).max(now - kept + chrono::Duration::milliseconds(size.step_ms()));
        let (view, buckets) = engine.history(id, size, from, now).await?;
        let periods = engine.periods(id, None, PERIODS_SHOWN).await?;

        let s = &view.seats;
        let seats = SeatsNow {
            in_use: s.in_use,
            purchased: s.purchased,
            hard_cap: limit_label(s.hard_cap),
            customer_cap: view.config.seats.customer_cap,
            effective_cap: limit_label(view.config.seats.effective_cap()),
            overdraft_since: s.overdraft_since.map(utc),
            at_cap: s.at_hard_cap,
            denied_total: s.denied_total,
        };
        let seat_rows: Vec<SeatRow> = buckets
            .iter()
            .map(|b| SeatRow {
                start: bucket_label(size, b.start),
                peak: b.seats_peak,
                denied: b.seats_denied,
            })
            .collect();
        let features: Vec<FeatureNow> = view
            .features
            .iter()
            .map(|(key, f)| {
                let config = view.config.features.get(key);
                let effective = config.map_or(f.hard_cap, |c| c.effective_cap());
                let rows = buckets
                    .iter()
                    .map(|b| {
                        let (added, denied) =
                            b.features.get(key.as_str()).copied().unwrap_or_default();
                        FeatureRow {
                            start: bucket_label(size, b.start),
                            added,
                            denied,
                        }
                    })
                    .collect();
                FeatureNow {
                    key: key.to_string(),
                    used: f.used,
                    included: f.included,
                    hard_cap: limit_label(f.hard_cap),
                    customer_cap: config.and_then(|c| c.customer_cap),
                    meter_max: effective.finite().unwrap_or(f.used.max(f.included)).max(1),
                    period: f
                        .period_start
                        .zip(f.period_end)
                        .map(|(a, b)| format!("{} – {}", utc(a), utc(b))),
                    overdraft_since: f.overdraft_since.map(utc),
                    at_cap: f.at_hard_cap,
                    denied_period: f.denied_period,
                    denied_total: f.denied_total,
                    thresholds: f
                        .thresholds_crossed
                        .iter()
                        .map(|p| format!("{} %", p.get()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    rows,
                }
            })
            .collect();
        let island = Island {
            bucket: size.as_str(),
            t: buckets.iter().map(|b| b.start.timestamp()).collect(),
            seats: IslandSeats {
                peak: buckets.iter().map(|b| b.seats_peak).collect(),
                denied: buckets.iter().map(|b| b.seats_denied).collect(),
                purchased: s.purchased,
                cap: view.config.seats.effective_cap().finite(),
            },
            features: features
                .iter()
                .map(|f| IslandFeature {
                    key: &f.key,
                    added: f.rows.iter().map(|r| r.added).collect(),
                    denied: f.rows.iter().map(|r| r.denied).collect(),
                })
                .collect(),
        };
        let island = island_json(&island)?;
        let mut unreadable_periods = periods.unreadable.len();
        let periods = periods
            .records
            .into_iter()
            .filter_map(|r| match serde_json::from_value::<PeriodRecord>(r) {
                Ok(p) => Some(PeriodRow {
                    feature: p.feature,
                    start: utc(p.period_start),
                    end: utc(p.period_end),
                    used: p.used,
                    included: p.included,
                    overage: p.overage,
                    peak: p.peak,
                    denied: p.denied,
                }),
                Err(e) => {
                    tracing::error!(entitlement = %id, error = %e, "a closed-period record lacks a field");
                    unreadable_periods += 1;
                    None
                }
            })
            .collect();
        Ok(EntitlementData {
            id: id.to_string(),
            ranges: Range::ALL
                .into_iter()
                .map(|r| RangeOption {
                    key: r.key(),
                    label: r.label(),
                    selected: r == range,
                })
                .collect(),
            now: utc(now),
            bucket: size.as_str(),
            seats_denied_in_range: seat_rows.iter().map(|r| r.denied).sum(),
            seats,
            seat_rows,
            features,
            periods,
            unreadable_periods,
            island,
            view,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_island_cannot_close_its_script_element() {
        let json = island_json(&serde_json::json!({"k": "</script><!-- & >"})).expect("json");
        assert!(!json.contains('<') && !json.contains('>') && !json.contains('&'));
        let back: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(back["k"], "</script><!-- & >");
    }

    #[test]
    fn ranges_parse_from_their_keys() {
        for r in Range::ALL {
            assert_eq!(Range::parse(Some(r.key())).ok(), Some(r));
        }
        assert_eq!(Range::parse(None).ok(), Some(Range::Week));
        assert!(Range::parse(Some("5y")).is_err());
    }
}
