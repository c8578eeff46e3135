use super::*;
use crate::domain::Period;
use crate::domain::{DenyReason, SeatId};
use chrono::Duration;
use proptest::prelude::*;
use std::collections::HashSet;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn cfg(json: &str) -> EntitlementConfig {
    EntitlementConfig::from_json(json.as_bytes()).unwrap()
}

fn seat(i: usize) -> SeatId {
    SeatId::parse(&format!("seat-{i}")).unwrap()
}

fn feat(s: &str) -> FeatureKey {
    FeatureKey::parse(s).unwrap()
}

fn kinds(fx: &Effects) -> Vec<&'static str> {
    fx.events.iter().map(|e| e.data.kind()).collect()
}

fn count(fx: &Effects, kind: &str) -> usize {
    fx.events.iter().filter(|e| e.data.kind() == kind).count()
}

fn new(json: &str, now: DateTime<Utc>) -> (Entitlement, Effects) {
    let mut fx = Effects::default();
    let e = Entitlement::create(
        EntitlementId::parse("acme").unwrap(),
        cfg(json),
        now,
        &mut fx,
    );
    (e, fx)
}

#[test]
fn seed_scenario_100_purchased_120_cap() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(r#"{"seats": {"purchased": 100, "hard_cap": 120}}"#, now);
    let mut fx = Effects::default();
    let outcomes: Vec<Outcome> = (0..130)
        .map(|i| e.activate(&seat(i), now, &mut fx).outcome)
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == Outcome::Granted).count(),
        100
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Outcome::Overdraft)
            .count(),
        20
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == Outcome::Denied).count(),
        10
    );
    assert_eq!(count(&fx, "seat.overdraft_entered"), 1);
    assert_eq!(count(&fx, "seat.hard_cap_reached"), 1);
    assert_eq!(count(&fx, "seat.denied"), 10);
    assert_eq!(e.seats.denied_total, 10);
    let mut fx = Effects::default();
    for i in 0..21 {
        assert!(e.release(&seat(i), now, &mut fx).released);
    }
    assert_eq!(kinds(&fx), ["seat.overdraft_exited"]);
    assert_eq!(e.seats.in_use(), 99);
    assert_eq!(e.seats.peak, 120);
}

#[test]
fn refresh_is_never_a_second_seat_and_survives_a_lowered_limit() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(r#"{"seats": {"purchased": 2, "hard_cap": 3}}"#, now);
    let mut fx = Effects::default();
    for i in 0..3 {
        e.activate(&seat(i), now, &mut fx);
    }
    let d = e.activate(&seat(0), now, &mut fx);
    assert!(d.refreshed);
    assert_eq!((d.outcome, d.in_use), (Outcome::Overdraft, 3));
    let mut fx = Effects::default();
    e.replace_config(
        cfg(r#"{"seats": {"purchased": 1, "hard_cap": 1}}"#),
        now,
        &mut fx,
    );
    assert_eq!(e.seats.in_use(), 3, "no seat is evicted");
    let d = e.activate(&seat(1), now, &mut fx);
    assert_eq!(
        d.outcome,
        Outcome::Overdraft,
        "an active seat keeps its slot"
    );
    let d = e.activate(&seat(9), now, &mut fx);
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Denied, Some(DenyReason::HardCap))
    );
    let mut fx = Effects::default();
    e.replace_config(cfg(r#"{"seats": {"purchased": 10}}"#), now, &mut fx);
    assert_eq!(kinds(&fx), ["entitlement.updated", "seat.overdraft_exited"]);
}

#[test]
fn lowering_the_limit_emits_transitions_at_once() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(
        r#"{"seats": {"purchased": 5}, "features": {"x": {"included": 100}}}"#,
        now,
    );
    let mut fx = Effects::default();
    for i in 0..4 {
        e.activate(&seat(i), now, &mut fx);
    }
    e.consume(&feat("x"), Amount::new(60).unwrap(), now, &mut fx)
        .unwrap();
    let mut fx = Effects::default();
    e.replace_config(
        cfg(r#"{"seats": {"purchased": 2, "hard_cap": 4}, "features": {"x": {"included": 50, "hard_cap": 60}}}"#),
        now,
        &mut fx,
    );
    assert_eq!(
        kinds(&fx),
        [
            "entitlement.updated",
            "seat.overdraft_entered",
            "seat.hard_cap_reached",
            "usage.overdraft_entered",
            "usage.hard_cap_reached"
        ]
    );
    let d = e
        .consume(&feat("x"), Amount::new(1).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!(d.outcome, Outcome::Denied);
}

#[test]
fn one_call_jumping_over_several_thresholds_emits_each_once_in_order() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(
        r#"{"features": {"api": {"included": 1000, "hard_cap": 1200, "thresholds": [110, 50, 80, 100]}}}"#,
        now,
    );
    let mut fx = Effects::default();
    e.consume(&feat("api"), Amount::new(499).unwrap(), now, &mut fx)
        .unwrap();
    assert!(fx.events.is_empty());
    let d = e
        .consume(&feat("api"), Amount::new(602).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!((d.outcome, d.used), (Outcome::Overdraft, 1101));
    let crossed: Vec<u16> = fx
        .events
        .iter()
        .filter_map(|e| match &e.data {
            EventData::UsageThresholdCrossed { threshold, .. } => Some(threshold.get()),
            _ => None,
        })
        .collect();
    assert_eq!(crossed, [50, 80, 100, 110]);
    assert_eq!(count(&fx, "usage.overdraft_entered"), 1);
    let mut fx = Effects::default();
    e.consume(&feat("api"), Amount::new(1).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!(count(&fx, "usage.threshold_crossed"), 0, "once per period");
    let seqs: Vec<u64> = fx.events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn usage_is_denied_whole_and_hard_cap_is_exact() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(
        r#"{"features": {"gpu": {"included": 10, "hard_cap": 12}}}"#,
        now,
    );
    let mut fx = Effects::default();
    let d = e
        .consume(&feat("gpu"), Amount::new(13).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!((d.outcome, d.used), (Outcome::Denied, 0));
    let d = e
        .consume(&feat("gpu"), Amount::new(12).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!(
        (d.outcome, d.used, d.remaining_overdraft),
        (Outcome::Overdraft, 12, Some(0))
    );
    let d = e
        .consume(&feat("gpu"), Amount::new(u64::MAX).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!(d.outcome, Outcome::Denied);
    assert_eq!(e.meters[&feat("gpu")].denied_period, 2);
    assert!(
        e.consume(&feat("nope"), Amount::new(1).unwrap(), now, &mut fx)
            .is_err()
    );
}

#[test]
fn unlimited_is_never_denied_but_customer_cap_is() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(
        r#"{"features": {"f": {"included": 1, "hard_cap": "unlimited"}}}"#,
        now,
    );
    let mut fx = Effects::default();
    let d = e
        .consume(&feat("f"), Amount::new(u64::MAX - 1).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!(
        (d.outcome, d.remaining_overdraft),
        (Outcome::Overdraft, None)
    );
    let (mut e, _) = new(
        r#"{"seats": {"purchased": 3, "hard_cap": "unlimited", "customer_cap": 2}}"#,
        now,
    );
    assert_eq!(e.activate(&seat(0), now, &mut fx).outcome, Outcome::Granted);
    assert_eq!(e.activate(&seat(1), now, &mut fx).outcome, Outcome::Granted);
    assert_eq!(e.activate(&seat(2), now, &mut fx).outcome, Outcome::Denied);
}

#[test]
fn period_rollover_closes_the_period_and_resets() {
    let now = t("2026-01-31T10:00:00Z");
    let (mut e, _) = new(
        r#"{"features": {"api": {"included": 10, "hard_cap": 20, "period": "month",
            "period_anchor": "2025-12-31T00:00:00Z", "thresholds": [50]}}}"#,
        now,
    );
    let mut fx = Effects::default();
    e.consume(&feat("api"), Amount::new(15).unwrap(), now, &mut fx)
        .unwrap();
    e.consume(&feat("api"), Amount::new(6).unwrap(), now, &mut fx)
        .unwrap();
    let mut fx = Effects::default();
    let later = t("2026-02-28T00:00:01Z");
    let d = e
        .consume(&feat("api"), Amount::new(5).unwrap(), later, &mut fx)
        .unwrap();
    assert_eq!((d.outcome, d.used), (Outcome::Granted, 5));
    assert_eq!(d.period_end, Some(t("2026-03-31T00:00:00Z")));
    assert_eq!(
        kinds(&fx),
        [
            "usage.period_closed",
            "usage.reset",
            "usage.threshold_crossed"
        ]
    );
    match &fx.events[0].data {
        EventData::UsagePeriodClosed {
            used,
            overage,
            denied,
            period_start,
            period_end,
            ..
        } => {
            assert_eq!((*used, *overage, *denied), (15, 5, 1));
            assert_eq!(
                (*period_start, *period_end),
                (t("2026-01-31T00:00:00Z"), t("2026-02-28T00:00:00Z"))
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn leases_expire_lazily_with_an_event() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(
        r#"{"seats": {"purchased": 1, "hard_cap": 2, "lease_seconds": 60}}"#,
        now,
    );
    let mut fx = Effects::default();
    e.activate(&seat(0), now, &mut fx);
    e.activate(&seat(1), now + Duration::seconds(30), &mut fx);
    assert_eq!(e.next_housekeeping(), Some(now + Duration::seconds(60)));
    let mut fx = Effects::default();
    let d = e.activate(&seat(2), now + Duration::seconds(61), &mut fx);
    assert_eq!((d.outcome, d.in_use), (Outcome::Overdraft, 2));
    assert_eq!(
        kinds(&fx),
        [
            "seat.expired",
            "seat.overdraft_exited",
            "seat.overdraft_entered",
            "seat.hard_cap_reached"
        ]
    );
    assert_eq!(fx.seats.get(&seat(0)), Some(&None));
}

#[test]
fn disabled_and_expired_deny_with_their_reason() {
    let now = t("2026-11-28T00:00:00Z");
    let (mut e, _) = new(
        r#"{"seats": {"purchased": 5}, "features": {"f": {"included": 5}}, "disabled": true}"#,
        now,
    );
    let mut fx = Effects::default();
    assert_eq!(
        e.activate(&seat(0), now, &mut fx).reason,
        Some(DenyReason::Disabled)
    );
    let (mut e, _) = new(
        r#"{"seats": {"purchased": 5}, "features": {"f": {"included": 5}}, "expires_at": "2026-11-28T00:00:00Z"}"#,
        now,
    );
    assert_eq!(
        e.activate(&seat(0), now, &mut fx).reason,
        Some(DenyReason::Expired)
    );
    let d = e
        .consume(&feat("f"), Amount::new(1).unwrap(), now, &mut fx)
        .unwrap();
    assert_eq!(d.reason, Some(DenyReason::Expired));
    e.replace_config(cfg(r#"{"seats": {"purchased": 5}, "features": {"f": {"included": 5}}, "expires_at": "2027-11-28T00:00:00Z"}"#), now, &mut fx);
    assert_eq!(e.activate(&seat(0), now, &mut fx).outcome, Outcome::Granted);
}

#[test]
fn lease_encoding_round_trips() {
    let l = Lease {
        activated_at: t("2026-11-28T00:00:00.123Z"),
        expires_at: Some(t("2026-11-28T01:00:00Z")),
    };
    assert_eq!(Lease::decode(&l.encode()), Some(l));
    let l = Lease {
        activated_at: t("2026-11-28T00:00:00Z"),
        expires_at: None,
    };
    assert_eq!(Lease::decode(&l.encode()), Some(l));
    assert_eq!(Lease::decode("x:y"), None);
}

// ---- property tests against a reference model ----

#[derive(Debug, Clone)]
enum Op {
    Activate(usize),
    Release(usize),
    Consume(u64),
    Advance(i64),
    Reconfigure(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..40).prop_map(Op::Activate),
        2 => (0usize..40).prop_map(Op::Release),
        4 => (1u64..40).prop_map(Op::Consume),
        1 => (1i64..4000).prop_map(Op::Advance),
        1 => (0u64..30, 0u64..15).prop_map(|(p, extra)| Op::Reconfigure(p, p + extra)),
    ]
}

/// The simplest thing that could be right: a set of seats, a counter, flags.
struct Model {
    seats: HashSet<usize>,
    purchased: u64,
    cap: u64,
    used: u64,
    in_overdraft: bool,
    meter_over: bool,
    crossed: Vec<u16>,
    hour: i64,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn engine_rules_match_the_reference_model(ops in proptest::collection::vec(op(), 1..200)) {
        let mut now = t("2026-11-28T00:00:00Z");
        let (mut e, _) = new(r#"{"seats": {"purchased": 10, "hard_cap": 15},
            "features": {"f": {"included": 100, "hard_cap": 150, "period": "hour", "thresholds": [50, 100, 120]}}}"#, now);
        let mut m = Model { seats: HashSet::new(), purchased: 10, cap: 15, used: 0, in_overdraft: false,
            meter_over: false, crossed: vec![], hour: now.timestamp() / 3600 };
        for op in ops {
            let mut fx = Effects::default();
            let hour = now.timestamp() / 3600;
            let rolls = hour != m.hour && !matches!(op, Op::Advance(_));
            if rolls {
                m.hour = hour; m.used = 0; m.crossed.clear(); m.meter_over = false;
            }
            match op {
                Op::Activate(i) => {
                    let d = e.activate(&seat(i), now, &mut fx);
                    let expected = if m.seats.contains(&i) {
                        if m.seats.len() as u64 <= m.purchased { Outcome::Granted } else { Outcome::Overdraft }
                    } else if m.seats.len() as u64 + 1 > m.cap {
                        Outcome::Denied
                    } else {
                        m.seats.insert(i);
                        if m.seats.len() as u64 <= m.purchased { Outcome::Granted } else { Outcome::Overdraft }
                    };
                    prop_assert_eq!(d.outcome, expected);
                    prop_assert_eq!(count(&fx, "seat.denied"), usize::from(expected == Outcome::Denied));
                    if d.outcome != Outcome::Denied && !d.refreshed {
                        prop_assert!(d.in_use <= m.cap, "a granted call passed the cap");
                    }
                }
                Op::Release(i) => {
                    let r = e.release(&seat(i), now, &mut fx);
                    prop_assert_eq!(r.released, m.seats.remove(&i));
                }
                Op::Consume(a) => {
                    let before = m.used;
                    let d = e.consume(&feat("f"), Amount::new(a).unwrap(), now, &mut fx).unwrap();
                    let expected = if before + a > 150 { Outcome::Denied }
                        else { m.used += a; if m.used <= 100 { Outcome::Granted } else { Outcome::Overdraft } };
                    prop_assert_eq!(d.outcome, expected);
                    prop_assert_eq!(d.used, m.used);
                    prop_assert!(d.used <= 150);
                    let mut want = 0;
                    for th in [50u16, 100, 120] {
                        if !m.crossed.contains(&th) && m.used * 100 >= 100 * th as u64 {
                            m.crossed.push(th); want += 1;
                        }
                    }
                    prop_assert_eq!(count(&fx, "usage.threshold_crossed"), want);
                    let entered = m.used > 100 && !m.meter_over;
                    m.meter_over |= entered;
                    prop_assert_eq!(count(&fx, "usage.overdraft_entered"), usize::from(entered));
                }
                Op::Advance(s) => { now += Duration::seconds(s); }
                Op::Reconfigure(p, c) => {
                    let json = format!(r#"{{"seats": {{"purchased": {p}, "hard_cap": {c}}},
                        "features": {{"f": {{"included": 100, "hard_cap": 150, "period": "hour", "thresholds": [50, 100, 120]}}}}}}"#);
                    e.replace_config(cfg(&json), now, &mut fx);
                    m.purchased = p; m.cap = c;
                    prop_assert_eq!(e.seats.in_use(), m.seats.len() as u64, "no eviction");
                }
            }
            prop_assert_eq!(count(&fx, "usage.period_closed"), usize::from(rolls));
            // Edge-triggered seat overdraft: the events alternate and match the flag.
            let over = m.seats.len() as u64 > m.purchased;
            let entered = count(&fx, "seat.overdraft_entered");
            let exited = count(&fx, "seat.overdraft_exited");
            prop_assert!(entered + exited <= 1);
            if entered == 1 { prop_assert!(!m.in_overdraft && over); }
            if exited == 1 { prop_assert!(m.in_overdraft && !over); }
            m.in_overdraft = over;
            prop_assert_eq!(e.seats.overdraft_since.is_some(), over);
            prop_assert_eq!(e.seats.in_use(), m.seats.len() as u64);
        }
    }
}

#[test]
fn hourly_period_matches_model_boundaries() {
    assert_eq!(
        Period::Hour
            .bounds(None, t("2026-11-28T00:59:59Z"))
            .unwrap()
            .end,
        t("2026-11-28T01:00:00Z")
    );
}
