//! The overdraft report, usage history and closed periods, against a real
//! redis-server (and the embedded store where it tells something apart).

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, DurationRound, Utc};
use futures_util::future::join_all;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;
use headroom::domain::BucketSize;

/// The app on `store`, with the clock injected.
async fn app_with_clock(
    store: std::sync::Arc<dyn headroom::store::Store>,
    clock: &std::sync::Arc<headroom::engine::ManualClock>,
) -> TestApp {
    TestApp::spawn_with(
        store,
        AppOptions {
            clock: clock.clone(),
            ..AppOptions::default()
        },
    )
    .await
}

/// Pages through the report with `limit`, returning the ids in order and
/// the items by id.
async fn report_pages(app: &TestApp, query: &str, limit: usize) -> (Vec<String>, Vec<Value>) {
    let mut ids = Vec::new();
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!("/v1/reports/overdraft?limit={limit}{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = app.send(Method::GET, &path, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{body}");
        let page = body["items"].as_array().expect("items").clone();
        assert!(page.len() <= limit);
        for item in page {
            ids.push(item["entitlement"].as_str().expect("id").to_string());
            items.push(item);
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (ids, items),
        }
    }
    panic!("the report never ended");
}

/// A scripted scenario over 1,000 entitlements: some over on seats, some
/// over on a feature, some both, the rest within what they bought. The
/// report pages through exactly those in overdraft, and drops one once it
/// leaves overdraft.
#[actix_rt::test]
async fn the_report_lists_exactly_the_entitlements_in_overdraft() {
    the_report_lists_exactly_the_entitlements_in_overdraft_on(&RedisServer::start()).await;
}

pub(crate) async fn the_report_lists_exactly_the_entitlements_in_overdraft_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("rep")).await;
    let config = r#"{"seats": {"purchased": 2, "hard_cap": 3},
        "features": {"api": {"included": 10, "hard_cap": 20, "period": "month"}}}"#;
    let mut expected = BTreeSet::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        join_all(chunk.iter().map(|&i| {
            let app = &app;
            async move {
                let id = format!("ent-{i:04}");
                assert_eq!(app.put(&id, config).await.0, 201);
                let seats = if i % 3 == 0 { 3 } else { 2 };
                for s in 0..seats {
                    assert_eq!(app.activate(&id, &format!("u{s}")).await.0, 200);
                }
                let amount = if i % 5 == 0 { 15 } else { 9 };
                let body = format!(r#"{{"feature": "api", "amount": {amount}}}"#);
                assert_eq!(app.usage(&id, &body).await.0, 200);
                // Every seventh tries a seat past the cap: denied.
                if i % 7 == 0 {
                    for s in seats..4 {
                        app.activate(&id, &format!("u{s}")).await;
                    }
                }
            }
        }))
        .await;
        for &i in chunk {
            // The seventh's extra seats put those with two into overdraft too.
            if i % 3 == 0 || i % 5 == 0 || i % 7 == 0 {
                expected.insert(format!("ent-{i:04}"));
            }
        }
    }
    let (ids, items) = report_pages(&app, "", 64).await;
    assert_eq!(ids.len(), expected.len(), "no duplicates, nothing missing");
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");

    // An item carries the evidence: since when, how far, peak and denials.
    let both = items
        .iter()
        .find(|i| i["entitlement"] == "ent-0105")
        .expect("ent-0105 is over on seats and on api");
    assert_eq!(both["seats"]["in_use"], 3);
    assert_eq!(both["seats"]["purchased"], 2);
    assert_eq!(both["seats"]["hard_cap"], 3);
    assert_eq!(both["seats"]["overdraft"], true);
    assert_eq!(both["seats"]["peak"], 3);
    assert_eq!(both["seats"]["denied_period"], 1, "the fourth seat");
    assert_eq!(both["seats"]["denied_total"], 1);
    assert_eq!(both["features"]["api"]["used"], 15);
    assert_eq!(both["features"]["api"]["included"], 10);
    assert_eq!(both["features"]["api"]["hard_cap"], 20);
    assert_eq!(both["features"]["api"]["peak"], 15);
    assert!(both["overdraft_since"].is_string());
    let seats_only = items
        .iter()
        .find(|i| i["entitlement"] == "ent-0003")
        .expect("ent-0003");
    assert!(
        seats_only["features"]
            .as_object()
            .expect("features")
            .is_empty()
    );

    // Leaving overdraft drops it from the report.
    assert_eq!(app.release("ent-0003", "u2").await.0, 200);
    let (ids, _) = report_pages(&app, "", 1000).await;
    assert!(!ids.contains(&"ent-0003".to_string()));
    assert_eq!(ids.len(), expected.len() - 1);
    // So does deleting it.
    let (status, _) = app
        .send(
            Method::DELETE,
            "/v1/entitlements/ent-0006",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (ids, _) = report_pages(&app, "", 1000).await;
    assert_eq!(ids.len(), expected.len() - 2);

    // The customers most likely to buy: those denied recently, most recent
    // first, paged the same way.
    let (denied, items) = report_pages(&app, "&state=denied_recently&hours=1", 10).await;
    let expected_denied: BTreeSet<String> = (0..1000)
        .filter(|i| i % 7 == 0)
        .map(|i| format!("ent-{i:04}"))
        .filter(|id| id != "ent-0006")
        .collect();
    assert_eq!(denied.len(), expected_denied.len());
    assert_eq!(
        denied.iter().cloned().collect::<BTreeSet<_>>(),
        expected_denied
    );
    let times: Vec<DateTime<Utc>> = items
        .iter()
        .map(|i| {
            i["last_denied_at"]
                .as_str()
                .expect("last_denied_at")
                .parse()
                .expect("time")
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "most recent first");
    app.stop().await;
}

/// With an injected clock, the denials report honours `hours`.
#[actix_rt::test]
async fn denied_recently_looks_back_the_given_hours() {
    let clock = manual_clock("2026-11-27T10:00:00Z");
    let app = app_with_clock(memory_store(), &clock).await;
    for id in ["a", "b"] {
        app.put(id, r#"{"seats": {"purchased": 1, "hard_cap": 1}}"#)
            .await;
        app.activate(id, "u1").await;
    }
    assert_eq!(app.activate("a", "u2").await.0, 429);
    clock.advance(Duration::hours(5));
    assert_eq!(app.activate("b", "u2").await.0, 429);
    let ids = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| i["entitlement"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let path = |h: u32| format!("/v1/reports/overdraft?state=denied_recently&hours={h}");
    let (_, body) = app.send(Method::GET, &path(6), Some(ADMIN), None).await;
    assert_eq!(ids(&body), ["b", "a"]);
    let (_, body) = app.send(Method::GET, &path(4), Some(ADMIN), None).await;
    assert_eq!(ids(&body), ["b"]);
    // Neither is in overdraft (purchased = hard cap): the overdraft report is empty.
    let (_, body) = app
        .send(Method::GET, "/v1/reports/overdraft", Some(ADMIN), None)
        .await;
    assert_eq!(body["items"], serde_json::json!([]));
    assert_eq!(body["next_cursor"], Value::Null);
    app.stop().await;
}

/// The start of yesterday (UTC): the scripted day stays inside the hourly
/// retention whatever day the tests run.
fn yesterday() -> DateTime<Utc> {
    (Utc::now() - Duration::days(1))
        .duration_trunc(Duration::days(1))
        .expect("truncate")
}

/// A scripted day, with the clock injected: hourly and daily buckets show
/// the right peaks and denials, empty buckets included and seat levels
/// carried through quiet hours.
#[actix_rt::test]
async fn history_of_a_scripted_day() {
    history_of_a_scripted_day_on(&RedisServer::start()).await;
}

pub(crate) async fn history_of_a_scripted_day_on(redis: &impl TestRedis) {
    let day = yesterday();
    let clock = manual_clock(&day.to_rfc3339());
    let app = app_with_clock(redis.store("hist"), &clock).await;
    let at = |h: i64, m: i64| clock.set(day + Duration::hours(h) + Duration::minutes(m));
    at(0, 30);
    app.put(
        "acme",
        r#"{"seats": {"purchased": 2, "hard_cap": 4},
            "features": {"api": {"included": 10, "hard_cap": 15, "period": "month"}}}"#,
    )
    .await;
    at(1, 10);
    for s in ["a", "b", "c"] {
        assert_eq!(app.activate("acme", s).await.0, 200);
    }
    at(1, 20);
    assert_eq!(app.release("acme", "c").await.0, 200);
    // 02:00–02:59 nothing happens: two seats are still in use.
    at(3, 30);
    for s in ["c", "d"] {
        assert_eq!(app.activate("acme", s).await.0, 200);
    }
    assert_eq!(app.activate("acme", "e").await.0, 429);
    assert_eq!(app.activate("acme", "f").await.0, 429);
    at(5, 0);
    assert_eq!(
        app.usage("acme", r#"{"feature": "api", "amount": 7}"#)
            .await
            .0,
        200
    );
    at(5, 30);
    assert_eq!(
        app.usage("acme", r#"{"feature": "api", "amount": 5}"#)
            .await
            .0,
        200
    );
    assert_eq!(
        app.usage("acme", r#"{"feature": "api", "amount": 9}"#)
            .await
            .0,
        429
    );
    at(22, 0);
    for s in ["a", "b", "c"] {
        assert_eq!(app.release("acme", s).await.0, 200);
    }
    clock.set(day + Duration::days(1) + Duration::hours(2));

    let from = day.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to = (day + Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, body) = app
        .send(
            Method::GET,
            &format!("/v1/entitlements/acme/history?bucket=hour&from={from}&to={to}"),
            Some(CLIENT),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 24, "every hour, empty ones included");
    let peaks: Vec<u64> = buckets
        .iter()
        .map(|b| b["seats"]["peak"].as_u64().expect("peak"))
        .collect();
    let mut want = vec![0, 3, 2, 4, 4];
    want.extend(std::iter::repeat_n(4, 17));
    want.extend([4, 1]);
    assert_eq!(peaks, want);
    let denied: Vec<u64> = buckets
        .iter()
        .map(|b| b["seats"]["denied"].as_u64().expect("denied"))
        .collect();
    assert_eq!(denied.iter().sum::<u64>(), 2);
    assert_eq!(denied[3], 2);
    assert_eq!(buckets[5]["features"]["api"]["added"], 12);
    assert_eq!(buckets[5]["features"]["api"]["denied"], 1);
    assert_eq!(
        buckets[4]["features"]["api"]["added"], 0,
        "empty buckets carry every feature"
    );
    assert_eq!(
        buckets[0]["start"]
            .as_str()
            .expect("start")
            .parse::<DateTime<Utc>>()
            .expect("time"),
        day
    );
    assert_eq!(
        buckets[23]["end"]
            .as_str()
            .expect("end")
            .parse::<DateTime<Utc>>()
            .expect("time"),
        day + Duration::days(1)
    );

    // The day, and the day after (nothing happened yet: levels carried).
    let to2 = (day + Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, body) = app
        .send(
            Method::GET,
            &format!("/v1/entitlements/acme/history?bucket=day&from={from}&to={to2}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let days = body["buckets"].as_array().expect("buckets");
    assert_eq!(days.len(), 2);
    assert_eq!(days[0]["seats"]["peak"], 4);
    assert_eq!(days[0]["seats"]["denied"], 2);
    assert_eq!(days[0]["features"]["api"]["added"], 12);
    assert_eq!(days[0]["features"]["api"]["denied"], 1);
    assert_eq!(days[1]["seats"]["peak"], 1, "the one seat left is carried");
    assert_eq!(days[1]["features"]["api"]["added"], 0);

    // A range starting in a quiet stretch carries the level from before it.
    let from3 = (day + Duration::hours(8)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to3 = (day + Duration::hours(10)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (_, body) = app
        .send(
            Method::GET,
            &format!("/v1/entitlements/acme/history?bucket=hour&from={from3}&to={to3}"),
            Some(CLIENT),
            None,
        )
        .await;
    let peaks: Vec<&Value> = body["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| &b["seats"]["peak"])
        .collect();
    assert_eq!(peaks, [4, 4]);

    // The buckets are Redis hashes that expire by themselves.
    let mut c = redis.connection();
    let key = redis.keys("hist").history(
        &headroom::domain::EntitlementId::parse("acme").expect("id"),
        headroom::domain::BucketSize::Hour,
        (day + Duration::hours(3)).timestamp_millis(),
    );
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut *c).expect("PTTL");
    let expected = Duration::days(35) + Duration::hours(4) - (Utc::now() - day);
    assert!(
        (ttl - expected.num_milliseconds()).abs() < 120_000,
        "hour bucket expires 35 days after its hour: {ttl} ms"
    );
    app.stop().await;
}

/// Bad history and report queries: clear 400s, nothing changed.
#[actix_rt::test]
async fn bad_report_and_history_queries_are_refused() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", r#"{"seats": {"purchased": 1}}"#).await;
    let now = Utc::now();
    let ts = |d: Duration| (now + d).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cases = [
        (
            "/v1/entitlements/acme/history?bucket=week".to_string(),
            "bucket",
        ),
        (
            format!(
                "/v1/entitlements/acme/history?from={}&to={}",
                ts(Duration::hours(1)),
                ts(Duration::zero())
            ),
            "from",
        ),
        (
            format!(
                "/v1/entitlements/acme/history?bucket=hour&from={}",
                ts(-Duration::days(36))
            ),
            "from",
        ),
        (
            format!(
                "/v1/entitlements/acme/history?bucket=hour&from={}&to={}",
                ts(-Duration::days(30)),
                ts(Duration::days(400))
            ),
            "to",
        ),
        (
            "/v1/entitlements/acme/history?from=yesterday".to_string(),
            "from",
        ),
        // An unknown parameter is named (issue 12: the field in the
        // product's words; it was answered as `query`).
        (
            "/v1/entitlements/acme/history?colour=red".to_string(),
            "colour",
        ),
        ("/v1/reports/overdraft?cursor=%%%".to_string(), "cursor"),
        (
            "/v1/reports/overdraft?cursor=bm90LWEtY3Vyc29y".to_string(),
            "cursor",
        ),
        ("/v1/reports/overdraft?limit=0".to_string(), "limit"),
        ("/v1/reports/overdraft?limit=1001".to_string(), "limit"),
        ("/v1/reports/overdraft?state=happy".to_string(), "state"),
        ("/v1/reports/overdraft?hours=5".to_string(), "hours"),
        (
            "/v1/reports/overdraft?state=denied_recently&hours=0".to_string(),
            "hours",
        ),
        ("/v1/entitlements/acme/periods?limit=0".to_string(), "limit"),
        (
            "/v1/entitlements/acme/periods?feature=no%20spaces".to_string(),
            "feature",
        ),
    ];
    for (path, field) in cases {
        let (status, body) = app.send(Method::GET, &path, Some(ADMIN), None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_request", "{path}");
        assert_eq!(body["field"], field, "{path}: {body}");
    }
    // A cursor of the other report is refused too.
    let (_, page) = app
        .send(
            Method::GET,
            "/v1/reports/overdraft?limit=1",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(page["next_cursor"], Value::Null);
    let (status, _) = app
        .send(
            Method::GET,
            "/v1/entitlements/nobody/history",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = app
        .send(
            Method::GET,
            "/v1/entitlements/nobody/periods",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 404);
    // The report is for admins; history and periods also for clients.
    let (status, _) = app
        .send(Method::GET, "/v1/reports/overdraft", Some(CLIENT), None)
        .await;
    assert_eq!(status, 403);
    let (status, body) = app.get("acme").await;
    assert_eq!(status, 200);
    assert_eq!(body["seats"]["in_use"], 0, "nothing changed");
    app.stop().await;
}

/// A closed period is kept as a billing record and published as
/// `usage.period_closed`, with the overage.
#[actix_rt::test]
async fn a_closed_period_is_a_billing_record() {
    a_closed_period_is_a_billing_record_on(&RedisServer::start()).await;
}

pub(crate) async fn a_closed_period_is_a_billing_record_on(redis: &impl TestRedis) {
    let day = yesterday();
    let clock = manual_clock(&(day + Duration::hours(9)).to_rfc3339());
    let app = app_with_clock(redis.store("bill"), &clock).await;
    app.put(
        "acme",
        r#"{"features": {"gpu": {"included": 10, "hard_cap": 20, "period": "day"},
                         "api": {"included": 100, "period": "day"}}}"#,
    )
    .await;
    assert_eq!(
        app.usage("acme", r#"{"feature": "gpu", "amount": 12}"#)
            .await
            .0,
        200
    );
    assert_eq!(
        app.usage("acme", r#"{"feature": "gpu", "amount": 4}"#)
            .await
            .0,
        200
    );
    assert_eq!(
        app.usage("acme", r#"{"feature": "gpu", "amount": 5}"#)
            .await
            .0,
        429
    );
    assert_eq!(
        app.usage("acme", r#"{"feature": "api", "amount": 30}"#)
            .await
            .0,
        200
    );
    // The day ends; the next call (here a read) closes it.
    clock.set(day + Duration::days(1) + Duration::minutes(1));
    assert_eq!(app.get("acme").await.0, 200);

    let (status, body) = app
        .send(
            Method::GET,
            "/v1/entitlements/acme/periods?feature=gpu",
            Some(CLIENT),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let periods = body["periods"].as_array().expect("periods");
    assert_eq!(periods.len(), 1);
    let p = &periods[0];
    assert_eq!(p["feature"], "gpu");
    assert_eq!(p["used"], 16);
    assert_eq!(p["included"], 10);
    assert_eq!(p["overage"], 6);
    assert_eq!(p["peak"], 16);
    assert_eq!(p["denied"], 1);
    assert_eq!(
        p["period_start"]
            .as_str()
            .expect("start")
            .parse::<DateTime<Utc>>()
            .expect("time"),
        day
    );
    let (_, all) = app
        .send(
            Method::GET,
            "/v1/entitlements/acme/periods",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(all["periods"].as_array().expect("periods").len(), 2);
    let api = all["periods"]
        .as_array()
        .expect("periods")
        .iter()
        .find(|p| p["feature"] == "api")
        .expect("api period");
    assert_eq!(api["overage"], 0);

    let events = redis.stream("bill");
    let closed: Vec<&Value> = events
        .iter()
        .filter(|(kind, _, _)| kind == "usage.period_closed")
        .map(|(_, _, e)| &e["data"])
        .filter(|d| d["feature"] == "gpu")
        .collect();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0]["overage"], 6);
    assert_eq!(closed[0]["used"], 16);
    app.stop().await;
}

/// What the history model steps through.
#[derive(Clone, Debug)]
enum SeatOp {
    Activate(u8),
    Release(u8),
    /// Minutes.
    Advance(i64),
    Restart,
}

fn seat_op() -> impl proptest::strategy::Strategy<Value = SeatOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u8..6).prop_map(SeatOp::Activate),
        3 => (0u8..6).prop_map(SeatOp::Release),
        3 => (1i64..150).prop_map(SeatOp::Advance),
        1 => Just(SeatOp::Restart),
    ]
}

/// Seat activations and releases across hours and days, with engine
/// restarts (which forget what the actor knew it had written): each hour's
/// and day's stored peak and last level match a model that sees every
/// change.
async fn history_matches_the_model(
    ops: Vec<SeatOp>,
    store: std::sync::Arc<dyn headroom::store::Store>,
) -> Result<(), proptest::test_runner::TestCaseError> {
    use headroom::domain::{EntitlementConfig, EntitlementId, SeatId};
    use headroom::engine::{Clock, Engine, EngineSettings};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    let day = yesterday();
    let clock = manual_clock(&day.to_rfc3339());
    let start = || Engine::new(store.clone(), clock.clone(), EngineSettings::default());
    let mut engine = start();
    let id = EntitlementId::parse("acme").unwrap();
    let config =
        EntitlementConfig::from_json(br#"{"seats": {"purchased": 2, "hard_cap": 4}}"#).unwrap();
    engine.put(&id, config).await.unwrap();
    let mut active: HashSet<u8> = HashSet::new();
    // Bucket start → (peak, last level) of the changes seen in it.
    let mut hours: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    let mut days: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    let observe = |now: i64,
                   level: u64,
                   hours: &mut BTreeMap<i64, (u64, u64)>,
                   days: &mut BTreeMap<i64, (u64, u64)>| {
        for (map, size) in [(hours, BucketSize::Hour), (days, BucketSize::Day)] {
            let e = map.entry(size.start(now)).or_insert((level, level));
            e.0 = e.0.max(level);
            e.1 = level;
        }
    };
    for op in ops {
        let now = clock.now().timestamp_millis();
        match op {
            SeatOp::Activate(s) => {
                engine
                    .activate(&id, SeatId::parse(&format!("s{s}")).unwrap())
                    .await
                    .unwrap();
                if active.contains(&s) || active.len() < 4 {
                    active.insert(s);
                }
                observe(now, active.len() as u64, &mut hours, &mut days);
            }
            SeatOp::Release(s) => {
                engine
                    .release(&id, SeatId::parse(&format!("s{s}")).unwrap())
                    .await
                    .unwrap();
                if active.remove(&s) {
                    observe(now, active.len() as u64, &mut hours, &mut days);
                }
            }
            SeatOp::Advance(minutes) => clock.advance(Duration::minutes(minutes)),
            SeatOp::Restart => {
                engine.shutdown().await;
                engine = start();
            }
        }
    }
    engine.shutdown().await;
    for (size, model) in [(BucketSize::Hour, &hours), (BucketSize::Day, &days)] {
        let first = size.start(day.timestamp_millis());
        let last = size.start(clock.now().timestamp_millis());
        let starts: Vec<i64> = (0..=(last - first) / size.step_ms())
            .map(|i| first + i * size.step_ms())
            .collect();
        let stored = store.history(&id, size, &starts).await.unwrap();
        for (start, record) in starts.iter().zip(stored) {
            let got = record.and_then(|r| r.seats_peak.zip(r.seats_end));
            prop_assert_eq!(
                got,
                model.get(start).copied(),
                "{:?} bucket at {}",
                size,
                start
            );
        }
    }
    Ok(())
}

#[test]
fn history_matches_the_model_on_redis() {
    let redis = RedisServer::start();
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(16));
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&proptest::collection::vec(seat_op(), 1..50), |ops| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        actix_rt::System::new().block_on(history_matches_the_model(
            ops,
            redis.store(&format!("hist{n}")),
        ))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn history_matches_the_model_in_memory() {
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(64));
    let result = runner.run(&proptest::collection::vec(seat_op(), 1..50), |ops| {
        actix_rt::System::new().block_on(history_matches_the_model(ops, memory_store()))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The report shows what holds now: leases that ran out are expired in
/// the entitlement it reads, even before its actor sweeps them.
#[actix_rt::test]
async fn the_report_expires_leases_that_ran_out() {
    let clock = manual_clock("2026-11-27T10:00:00Z");
    let app = app_with_clock(memory_store(), &clock).await;
    app.put(
        "acme",
        r#"{"seats": {"purchased": 1, "hard_cap": 3, "lease_seconds": 60}}"#,
    )
    .await;
    app.activate("acme", "a").await;
    app.activate("acme", "b").await;
    let (_, body) = app
        .send(Method::GET, "/v1/reports/overdraft", Some(ADMIN), None)
        .await;
    assert_eq!(body["items"][0]["entitlement"], "acme");
    assert_eq!(body["items"][0]["seats"]["in_use"], 2);
    clock.advance(Duration::seconds(90));
    let (_, body) = app
        .send(Method::GET, "/v1/reports/overdraft", Some(ADMIN), None)
        .await;
    assert_eq!(body["items"], serde_json::json!([]), "{body}");
    app.stop().await;
}

/// A range in the future (found by schemathesis: the look-back for the seats
/// in use walked from year 3638 to now, hour by hour) answers at once, with
/// the seats in use now carried through it.
#[actix_rt::test]
async fn history_of_a_range_far_in_the_future_carries_the_seats_in_use() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", r#"{"seats": {"purchased": 5}}"#).await;
    for s in ["a", "b"] {
        assert_eq!(app.activate("acme", s).await.0, 200);
    }
    let (status, body) = app
        .send(
            Method::GET,
            "/v1/entitlements/acme/history?to=3638-04-25T00:00:00Z",
            Some(CLIENT),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 24);
    assert!(buckets.iter().all(|b| b["seats"]["peak"] == 2), "{body}");
    app.stop().await;
}
