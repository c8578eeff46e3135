//! Usage history: what each hour and each day saw of an entitlement — the
//! peak of seats in use, seats denied, and per feature the usage added and
//! the denials. The engine gathers a batch's changes in a [`HistoryDelta`];
//! the store applies it to one record per entitlement, bucket size and
//! bucket, in the same atomic write as the state change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::ids::FeatureKey;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The two bucket sizes history is kept in (UTC hours and UTC days).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BucketSize {
    Hour,
    Day,
}

impl BucketSize {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(BucketSize::Hour),
            "day" => Some(BucketSize::Day),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BucketSize::Hour => "hour",
            BucketSize::Day => "day",
        }
    }

    pub fn step_ms(self) -> i64 {
        match self {
            BucketSize::Hour => HOUR_MS,
            BucketSize::Day => DAY_MS,
        }
    }

    /// Start (ms) of the bucket holding `ms`.
    pub fn start(self, ms: i64) -> i64 {
        ms.div_euclid(self.step_ms()) * self.step_ms()
    }
}

/// One record field and how a write changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldOp {
    /// Keep the larger of the stored value and this one.
    Max(&'static str, u64),
    /// Replace the stored value.
    Set(&'static str, u64),
    /// Add to the stored value.
    Add(String, u64),
}

/// Field names of a bucket record.
pub const SEATS_PEAK: &str = "sp";
pub const SEATS_END: &str = "se";
pub const SEATS_DENIED: &str = "sd";
const ADDED: &str = "u:";
const DENIED: &str = "d:";

/// What a batch of calls changed within one hour.
#[derive(Clone, Debug, Default, PartialEq)]
struct HourDelta {
    seats_peak: Option<u64>,
    seats_end: Option<u64>,
    seats_denied: u64,
    /// Feature → (usage added, denials).
    features: BTreeMap<FeatureKey, (u64, u64)>,
}

/// The history changes of one batch, by hour (a batch rarely spans two).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistoryDelta {
    hours: BTreeMap<i64, HourDelta>,
}

impl HistoryDelta {
    fn hour(&mut self, now: DateTime<Utc>) -> &mut HourDelta {
        let start = BucketSize::Hour.start(now.timestamp_millis());
        self.hours.entry(start).or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    /// Seats in use after a change at `now`.
    pub fn seats(&mut self, now: DateTime<Utc>, in_use: u64) {
        let h = self.hour(now);
        h.seats_peak = Some(h.seats_peak.map_or(in_use, |p| p.max(in_use)));
        h.seats_end = Some(in_use);
    }

    pub fn seat_denied(&mut self, now: DateTime<Utc>) {
        self.hour(now).seats_denied += 1;
    }

    pub fn usage_added(&mut self, now: DateTime<Utc>, feature: &FeatureKey, amount: u64) {
        let h = self.hour(now);
        h.features.entry(feature.clone()).or_default().0 += amount;
    }

    pub fn usage_denied(&mut self, now: DateTime<Utc>, feature: &FeatureKey) {
        let h = self.hour(now);
        h.features.entry(feature.clone()).or_default().1 += 1;
    }

    /// The writes to make: per hour touched, its start and the field
    /// changes, which apply alike to the hour's and the day's record.
    pub fn writes(&self) -> impl Iterator<Item = (i64, Vec<FieldOp>)> + '_ {
        self.hours.iter().map(|(start, h)| {
            let mut ops = Vec::new();
            if let Some(p) = h.seats_peak {
                ops.push(FieldOp::Max(SEATS_PEAK, p));
            }
            if let Some(e) = h.seats_end {
                ops.push(FieldOp::Set(SEATS_END, e));
            }
            if h.seats_denied > 0 {
                ops.push(FieldOp::Add(SEATS_DENIED.to_string(), h.seats_denied));
            }
            for (f, (added, denied)) in &h.features {
                if *added > 0 {
                    ops.push(FieldOp::Add(format!("{ADDED}{f}"), *added));
                }
                if *denied > 0 {
                    ops.push(FieldOp::Add(format!("{DENIED}{f}"), *denied));
                }
            }
            (*start, ops)
        })
    }
}

/// What the one writer of an entitlement knows of its stored seat fields
/// for one hour and that hour's day: lower bounds of the peaks (its own
/// writes keep the larger value) and the exact last level (it wrote it
/// last). Writes that would not change them are left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeatsWritten {
    /// The hour (start, ms); its day is the day of the day peak.
    pub hour: i64,
    pub hour_peak: u64,
    pub day_peak: u64,
    pub end: u64,
}

/// One hour's changes: to its hour record and to its day record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketWrites {
    pub hour: i64,
    pub hour_ops: Vec<FieldOp>,
    pub day_ops: Vec<FieldOp>,
}

impl HistoryDelta {
    /// The writes to make given what is known to be stored, and what will
    /// be known once they land.
    pub fn plan(&self, known: Option<SeatsWritten>) -> (Vec<BucketWrites>, Option<SeatsWritten>) {
        let mut known = known;
        let mut out = Vec::new();
        for (hour, ops) in self.writes() {
            let day = BucketSize::Day.start(hour);
            let k = known.unwrap_or_default();
            let same_hour = known.is_some() && k.hour == hour;
            let same_day = known.is_some() && BucketSize::Day.start(k.hour) == day;
            let (mut hour_ops, mut day_ops) = (Vec::new(), Vec::new());
            let (mut peak, mut end) = (None, None);
            for op in ops {
                let (in_hour, in_day) = match &op {
                    FieldOp::Max(SEATS_PEAK, v) => {
                        peak = Some(*v);
                        (
                            !(same_hour && *v <= k.hour_peak),
                            !(same_day && *v <= k.day_peak),
                        )
                    }
                    FieldOp::Set(SEATS_END, v) => {
                        end = Some(*v);
                        (!(same_hour && *v == k.end), !(same_day && *v == k.end))
                    }
                    _ => (true, true),
                };
                if in_hour {
                    hour_ops.push(op.clone());
                }
                if in_day {
                    day_ops.push(op);
                }
            }
            if let (Some(p), Some(e)) = (peak, end) {
                known = Some(SeatsWritten {
                    hour,
                    hour_peak: if same_hour { k.hour_peak.max(p) } else { p },
                    day_peak: if same_day { k.day_peak.max(p) } else { p },
                    end: e,
                });
            }
            if !hour_ops.is_empty() || !day_ops.is_empty() {
                out.push(BucketWrites {
                    hour,
                    hour_ops,
                    day_ops,
                });
            }
        }
        (out, known)
    }
}

/// A stored bucket record, read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketRecord {
    pub seats_peak: Option<u64>,
    pub seats_end: Option<u64>,
    pub seats_denied: u64,
    /// Feature → (usage added, denials).
    pub features: BTreeMap<String, (u64, u64)>,
}

impl BucketRecord {
    /// Builds a record from its stored fields; unknown fields are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let mut r = BucketRecord::default();
        for (name, v) in fields {
            match name {
                SEATS_PEAK => r.seats_peak = Some(v),
                SEATS_END => r.seats_end = Some(v),
                SEATS_DENIED => r.seats_denied = v,
                _ => {
                    if let Some(f) = name.strip_prefix(ADDED) {
                        r.features.entry(f.to_string()).or_default().0 = v;
                    } else if let Some(f) = name.strip_prefix(DENIED) {
                        r.features.entry(f.to_string()).or_default().1 = v;
                    }
                }
            }
        }
        r
    }

    /// Applies one write's changes (the in-memory store's way of doing
    /// what the Redis script does).
    pub fn apply(&mut self, ops: &[FieldOp]) {
        for op in ops {
            match op {
                FieldOp::Max(SEATS_PEAK, v) => {
                    self.seats_peak = Some(self.seats_peak.map_or(*v, |p| p.max(*v)));
                }
                FieldOp::Set(SEATS_END, v) => self.seats_end = Some(*v),
                FieldOp::Add(name, v) if name == SEATS_DENIED => self.seats_denied += v,
                FieldOp::Add(name, v) => {
                    if let Some(f) = name.strip_prefix(ADDED) {
                        self.features.entry(f.to_string()).or_default().0 += v;
                    } else if let Some(f) = name.strip_prefix(DENIED) {
                        self.features.entry(f.to_string()).or_default().1 += v;
                    }
                }
                FieldOp::Max(..) | FieldOp::Set(..) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_seat_fields_are_not_written_again() {
        let h10 = at("2026-11-28T10:10:00Z");
        let mut d = HistoryDelta::default();
        d.seats(h10, 3);
        let (w, known) = d.plan(None);
        assert_eq!(
            w[0].hour_ops,
            [FieldOp::Max(SEATS_PEAK, 3), FieldOp::Set(SEATS_END, 3)]
        );
        assert_eq!(w[0].day_ops, w[0].hour_ops);
        // Same hour, lower level: only the level changes.
        let mut d = HistoryDelta::default();
        d.seats(h10, 2);
        let (w, known) = d.plan(known);
        assert_eq!(w[0].hour_ops, [FieldOp::Set(SEATS_END, 2)]);
        assert_eq!(w[0].day_ops, [FieldOp::Set(SEATS_END, 2)]);
        // Same level again with usage: only the usage.
        let mut d = HistoryDelta::default();
        let f = FeatureKey::parse("api").unwrap();
        d.seats(h10, 2);
        d.usage_added(h10, &f, 5);
        let (w, known) = d.plan(known);
        assert_eq!(w[0].hour_ops, [FieldOp::Add("u:api".into(), 5)]);
        // Next hour: the hour record is new, the day's peak is known.
        let mut d = HistoryDelta::default();
        d.seats(at("2026-11-28T11:00:00Z"), 2);
        let (w, known) = d.plan(known);
        assert_eq!(
            w[0].hour_ops,
            [FieldOp::Max(SEATS_PEAK, 2), FieldOp::Set(SEATS_END, 2)]
        );
        assert!(w[0].day_ops.is_empty());
        assert_eq!(
            known.map(|k| (k.hour_peak, k.day_peak, k.end)),
            Some((2, 3, 2))
        );
        // Nothing to write: no bucket write at all.
        let mut d = HistoryDelta::default();
        d.seats(at("2026-11-28T11:30:00Z"), 2);
        assert!(d.plan(known).0.is_empty());
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn buckets_start_on_utc_hours_and_days() {
        let t = at("2026-11-28T13:45:12Z").timestamp_millis();
        assert_eq!(
            BucketSize::Hour.start(t),
            at("2026-11-28T13:00:00Z").timestamp_millis()
        );
        assert_eq!(
            BucketSize::Day.start(t),
            at("2026-11-28T00:00:00Z").timestamp_millis()
        );
        // Before 1970 the floor still rounds down.
        assert_eq!(BucketSize::Hour.start(-1), -HOUR_MS);
    }

    #[test]
    fn a_delta_applied_twice_adds_counts_and_keeps_the_peak() {
        let feature = FeatureKey::parse("api_calls").unwrap();
        let mut d = HistoryDelta::default();
        let t = at("2026-11-28T10:10:00Z");
        d.seats(t, 3);
        d.seats(t, 5);
        d.seats(t, 4);
        d.seat_denied(t);
        d.usage_added(t, &feature, 7);
        d.usage_denied(t, &feature);
        d.usage_added(at("2026-11-28T11:00:00Z"), &feature, 2);
        let writes: Vec<_> = d.writes().collect();
        assert_eq!(writes.len(), 2);
        let mut r = BucketRecord::default();
        r.apply(&writes[0].1);
        r.apply(&writes[0].1);
        assert_eq!(r.seats_peak, Some(5));
        assert_eq!(r.seats_end, Some(4));
        assert_eq!(r.seats_denied, 2);
        assert_eq!(r.features["api_calls"], (14, 2));
        let fields: Vec<(String, u64)> = vec![
            ("sp".into(), 5),
            ("se".into(), 4),
            ("sd".into(), 2),
            ("u:api_calls".into(), 14),
            ("d:api_calls".into(), 2),
            ("other".into(), 1),
        ];
        assert_eq!(
            BucketRecord::from_fields(fields.iter().map(|(k, v)| (k.as_str(), *v))),
            r
        );
    }
}
