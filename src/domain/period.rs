//! Calendar-correct usage periods in UTC.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// Never resets.
    #[default]
    None,
    Hour,
    Day,
    Week,
    Month,
}

/// The half-open interval `[start, end)` of one period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub start: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub end: DateTime<Utc>,
}

impl Bounds {
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// Monday 1970-01-05T00:00:00Z: weeks without an anchor start on Mondays (ISO).
fn default_week_anchor() -> DateTime<Utc> {
    DateTime::from_timestamp(4 * 86_400, 0).unwrap_or_default()
}

impl Period {
    /// The period holding `now`, or `None` for a counter that never resets.
    ///
    /// With an anchor, hourly periods start at the anchor's minute and second,
    /// daily ones at its time of day, weekly ones on its weekday and monthly
    /// ones on its day of month, clamped to the month's length (an anchor on
    /// the 31st starts February's period on the 28th or 29th).
    pub fn bounds(self, anchor: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Bounds> {
        let fixed = |len: i64, anchor: DateTime<Utc>| {
            let offset = (now - anchor).num_seconds().div_euclid(len);
            let start = anchor + Duration::seconds(offset * len);
            Bounds {
                start,
                end: start + Duration::seconds(len),
            }
        };
        match self {
            Period::None => None,
            Period::Hour => Some(fixed(3_600, anchor.unwrap_or_default())),
            Period::Day => Some(fixed(86_400, anchor.unwrap_or_default())),
            Period::Week => Some(fixed(
                7 * 86_400,
                anchor.unwrap_or_else(default_week_anchor),
            )),
            Period::Month => Some(month_bounds(anchor.unwrap_or_default(), now)),
        }
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map_or(28, |d| d.day())
}

/// Where the monthly period of `(year, month)` starts for this anchor.
fn month_start(anchor: DateTime<Utc>, year: i32, month: u32) -> DateTime<Utc> {
    let day = anchor.day().min(days_in_month(year, month));
    Utc.with_ymd_and_hms(
        year,
        month,
        day,
        anchor.hour(),
        anchor.minute(),
        anchor.second(),
    )
    .single()
    .unwrap_or(anchor)
}

fn shift_month(year: i32, month: u32, by: i32) -> (i32, u32) {
    let idx = year * 12 + month as i32 - 1 + by;
    (idx.div_euclid(12), idx.rem_euclid(12) as u32 + 1)
}

fn month_bounds(anchor: DateTime<Utc>, now: DateTime<Utc>) -> Bounds {
    let (y, m) = (now.year(), now.month());
    let this = month_start(anchor, y, m);
    let (start_ym, end_ym) = if now >= this {
        ((y, m), shift_month(y, m, 1))
    } else {
        (shift_month(y, m, -1), (y, m))
    };
    Bounds {
        start: month_start(anchor, start_ym.0, start_ym.1),
        end: month_start(anchor, end_ym.0, end_ym.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn monthly_anchor_on_the_31st_clamps_to_short_months() {
        let a = Some(t("2026-01-31T00:00:00Z"));
        let b = Period::Month.bounds(a, t("2026-02-15T12:00:00Z")).unwrap();
        assert_eq!(b.start, t("2026-01-31T00:00:00Z"));
        assert_eq!(b.end, t("2026-02-28T00:00:00Z"));
        let b = Period::Month.bounds(a, t("2028-02-29T01:00:00Z")).unwrap();
        assert_eq!(b.start, t("2028-02-29T00:00:00Z"), "leap year");
        assert_eq!(b.end, t("2028-03-31T00:00:00Z"));
        let b = Period::Month.bounds(a, t("2026-04-30T00:00:00Z")).unwrap();
        assert_eq!(
            (b.start, b.end),
            (t("2026-04-30T00:00:00Z"), t("2026-05-31T00:00:00Z"))
        );
    }

    #[test]
    fn monthly_period_keeps_the_anchor_time_of_day_across_year_end() {
        let a = Some(t("2026-01-15T09:30:00Z"));
        let b = Period::Month.bounds(a, t("2027-01-15T09:29:59Z")).unwrap();
        assert_eq!(b.start, t("2026-12-15T09:30:00Z"));
        assert_eq!(b.end, t("2027-01-15T09:30:00Z"));
    }

    #[test]
    fn default_anchors_are_calendar_boundaries() {
        let now = t("2026-11-28T13:45:10Z"); // a Saturday
        let hour = Period::Hour.bounds(None, now).unwrap();
        assert_eq!(hour.start, t("2026-11-28T13:00:00Z"));
        let day = Period::Day.bounds(None, now).unwrap();
        assert_eq!(day.start, t("2026-11-28T00:00:00Z"));
        let week = Period::Week.bounds(None, now).unwrap();
        assert_eq!(week.start, t("2026-11-23T00:00:00Z"), "Monday");
        let month = Period::Month.bounds(None, now).unwrap();
        assert_eq!(
            (month.start, month.end),
            (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(Period::None.bounds(None, now), None);
    }

    #[test]
    fn weekly_anchor_sets_the_weekday() {
        let a = Some(t("2026-01-07T06:00:00Z")); // a Wednesday
        let b = Period::Week.bounds(a, t("2026-11-28T00:00:00Z")).unwrap();
        assert_eq!(b.start, t("2026-11-25T06:00:00Z"));
        assert_eq!(b.end, t("2026-12-02T06:00:00Z"));
    }

    proptest! {
        #[test]
        fn extreme_anchors_and_instants_never_panic(
            anchor in -62_135_596_800i64..253_402_300_799, now in -62_135_596_800i64..253_402_300_799,
            p in prop_oneof![Just(Period::Hour), Just(Period::Day), Just(Period::Week), Just(Period::Month)],
        ) {
            let anchor = DateTime::from_timestamp(anchor, 0).unwrap();
            let now = DateTime::from_timestamp(now, 0).unwrap();
            let b = p.bounds(Some(anchor), now).unwrap();
            prop_assert!(b.start < b.end);
        }

        #[test]
        fn every_instant_lies_in_its_period_and_periods_tile(
            anchor in 0i64..4_000_000_000, now in 0i64..4_000_000_000,
            p in prop_oneof![Just(Period::Hour), Just(Period::Day), Just(Period::Week), Just(Period::Month)],
        ) {
            let anchor = DateTime::from_timestamp(anchor, 0).unwrap();
            let now = DateTime::from_timestamp(now, 0).unwrap();
            let b = p.bounds(Some(anchor), now).unwrap();
            prop_assert!(b.contains(now));
            let next = p.bounds(Some(anchor), b.end).unwrap();
            prop_assert_eq!(next.start, b.end);
            let prev = p.bounds(Some(anchor), b.start - Duration::seconds(1)).unwrap();
            prop_assert_eq!(prev.end, b.start);
        }
    }
}
