use chrono::Duration;
use futures_util::future::join_all;
use headroom::engine::EngineSettings;

use serde_json::Value;

use crate::helpers::*;

#[actix_rt::test]
async fn a_thousand_concurrent_usage_calls_never_pass_the_cap() {
    a_thousand_concurrent_usage_calls_never_pass_the_cap_on(&RedisServer::start()).await;
}

pub(crate) async fn a_thousand_concurrent_usage_calls_never_pass_the_cap_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("cap")).await;
    app.put(
        "acme",
        r#"{"features": {"gpu": {"included": 1500, "hard_cap": 2000}}}"#,
    )
    .await;
    let calls = (0..1000u64).map(|i| {
        let app = &app;
        let amount = 1 + i % 4;
        async move {
            let (s, b) = app
                .usage(
                    "acme",
                    &format!(r#"{{"feature": "gpu", "amount": {amount}}}"#),
                )
                .await;
            (s, amount, b)
        }
    });
    let results = join_all(calls).await;
    let granted: u64 = results
        .iter()
        .filter(|(s, _, _)| *s == 200)
        .map(|(_, a, _)| a)
        .sum();
    assert!(results.iter().all(|(s, _, _)| *s == 200 || *s == 429));
    assert!(
        results.iter().any(|(s, _, _)| *s == 429),
        "the cap was reached"
    );
    assert!(granted <= 2000);
    assert!(
        results
            .iter()
            .filter(|(s, _, _)| *s == 200)
            .all(|(_, _, b)| b["used"].as_u64() <= Some(2000))
    );
    let (_, view) = app.get("acme").await;
    assert_eq!(view["features"]["gpu"]["used"].as_u64(), Some(granted));
    let events = redis.stream("cap");
    assert_eq!(count_kind(&events, "acme", "usage.overdraft_entered"), 1);
    assert_eq!(
        count_kind(&events, "acme", "usage.denied"),
        results.iter().filter(|(s, _, _)| *s == 429).count()
    );
    app.stop().await;
}

#[actix_rt::test]
async fn idempotent_retry_returns_the_first_decision_and_conflicts_are_409() {
    idempotent_retry_returns_the_first_decision_and_conflicts_are_409_on(&RedisServer::start())
        .await;
}

pub(crate) async fn idempotent_retry_returns_the_first_decision_and_conflicts_are_409_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("idem")).await;
    app.put("acme", r#"{"features": {"api": {"included": 10}}}"#)
        .await;
    let body = r#"{"feature": "api", "amount": 4, "idempotency_key": "evt-9"}"#;
    let (s1, d1) = app.usage("acme", body).await;
    let (s2, d2) = app.usage("acme", body).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(d1, d2);
    let (s3, p) = app
        .usage(
            "acme",
            r#"{"feature": "api", "amount": 5, "idempotency_key": "evt-9"}"#,
        )
        .await;
    assert_eq!(
        (s3, p["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
    let (_, view) = app.get("acme").await;
    assert_eq!(
        view["features"]["api"]["used"], 4,
        "the retry changed nothing"
    );
    app.stop().await;

    // A fresh process (nothing cached) still knows the key: the store does.
    let app = TestApp::spawn(redis.store("idem")).await;
    let (s4, d4) = app.usage("acme", body).await;
    assert_eq!((s4, &d4), (200, &d1));
    let (_, view) = app.get("acme").await;
    assert_eq!(view["features"]["api"]["used"], 4);
    let (s5, _) = app
        .usage(
            "acme",
            r#"{"feature": "api", "amount": 5, "idempotency_key": "evt-9"}"#,
        )
        .await;
    assert_eq!(s5, 409);
    app.stop().await;
}

#[actix_rt::test]
async fn a_denied_call_is_remembered_under_its_key_too() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", r#"{"features": {"api": {"included": 2}}}"#)
        .await;
    let body = r#"{"feature": "api", "amount": 3, "idempotency_key": "big"}"#;
    let (s1, p1) = app.usage("acme", body).await;
    let (s2, p2) = app.usage("acme", body).await;
    assert_eq!((s1, s2), (429, 429));
    assert_eq!(p1["decision"], p2["decision"]);
    let (_, view) = app.get("acme").await;
    assert_eq!(view["features"]["api"]["denied_total"], 1);
    app.stop().await;
}

#[actix_rt::test]
async fn thresholds_jumped_over_in_one_call_each_emit_once_in_order() {
    thresholds_jumped_over_in_one_call_each_emit_once_in_order_on(&RedisServer::start()).await;
}

pub(crate) async fn thresholds_jumped_over_in_one_call_each_emit_once_in_order_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("thr")).await;
    app.put(
        "acme",
        r#"{"features": {"api": {"included": 1000, "hard_cap": 1200, "thresholds": [50, 80, 100, 110]}}}"#,
    )
    .await;
    let (s, d) = app
        .usage("acme", r#"{"feature": "api", "amount": 1150}"#)
        .await;
    assert_eq!((s, d["outcome"].as_str()), (200, Some("overdraft")));
    app.usage("acme", r#"{"feature": "api", "amount": 1}"#)
        .await;
    let events = redis.stream("thr");
    let crossed: Vec<u64> = events
        .iter()
        .filter(|(k, _, _)| k == "usage.threshold_crossed")
        .map(|(_, _, e)| e["data"]["threshold"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(crossed, [50, 80, 100, 110]);
    assert_eq!(count_kind(&events, "acme", "usage.overdraft_entered"), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn period_rollover_with_an_injected_clock() {
    period_rollover_with_an_injected_clock_on(&RedisServer::start()).await;
}

pub(crate) async fn period_rollover_with_an_injected_clock_on(redis: &impl TestRedis) {
    let clock = manual_clock("2026-01-31T10:00:00Z");
    let opts = AppOptions {
        clock: clock.clone(),
        ..AppOptions::default()
    };
    let app = TestApp::spawn_with(redis.store("roll"), opts).await;
    app.put(
        "acme",
        r#"{"features": {"api": {"included": 10, "hard_cap": 20, "period": "month", "period_anchor": "2025-10-31T00:00:00Z"}}}"#,
    )
    .await;
    let (_, d) = app
        .usage("acme", r#"{"feature": "api", "amount": 15}"#)
        .await;
    assert_eq!(d["period_end"], "2026-02-28T00:00:00Z");
    let (s, p) = app
        .usage("acme", r#"{"feature": "api", "amount": 6}"#)
        .await;
    assert_eq!(s, 429);
    assert_eq!(p["decision"]["reason"], "hard_cap");

    clock.set("2026-02-28T00:00:00Z".parse().unwrap_or_default());
    let (s, d) = app
        .usage("acme", r#"{"feature": "api", "amount": 6}"#)
        .await;
    assert_eq!((s, d["used"].as_u64()), (200, Some(6)));
    assert_eq!(d["period_start"], "2026-02-28T00:00:00Z");
    assert_eq!(d["period_end"], "2026-03-31T00:00:00Z");

    let events = redis.stream("roll");
    let closed: Vec<_> = events
        .iter()
        .filter(|(k, _, _)| k == "usage.period_closed")
        .collect();
    assert_eq!(closed.len(), 1);
    let data = &closed[0].2["data"];
    assert_eq!(
        (
            data["used"].as_u64(),
            data["overage"].as_u64(),
            data["denied"].as_u64()
        ),
        (Some(15), Some(5), Some(1))
    );
    assert_eq!(count_kind(&events, "acme", "usage.reset"), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn leases_expire_on_the_next_call_and_by_the_sweep() {
    leases_expire_on_the_next_call_and_by_the_sweep_on(&RedisServer::start()).await;
}

pub(crate) async fn leases_expire_on_the_next_call_and_by_the_sweep_on(redis: &impl TestRedis) {
    let clock = manual_clock("2026-11-28T00:00:00Z");
    let opts = AppOptions {
        clock: clock.clone(),
        engine: EngineSettings {
            sweep_interval: std::time::Duration::from_millis(20),
            ..EngineSettings::default()
        },
        ..AppOptions::default()
    };
    let app = TestApp::spawn_with(redis.store("lease"), opts).await;
    app.put(
        "acme",
        r#"{"seats": {"purchased": 1, "hard_cap": 1, "lease_seconds": 60}}"#,
    )
    .await;
    assert_eq!(app.activate("acme", "a").await.0, 200);
    assert_eq!(app.activate("acme", "b").await.0, 429);
    clock.advance(Duration::seconds(30));
    assert_eq!(
        app.activate("acme", "a").await.0,
        200,
        "refresh renews the lease"
    );
    clock.advance(Duration::seconds(45));
    assert_eq!(
        app.activate("acme", "b").await.0,
        429,
        "a was refreshed 45 s ago"
    );
    clock.advance(Duration::seconds(16));
    // The sweep timer expires the lease without any call.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while count_kind(&redis.stream("lease"), "acme", "seat.expired") == 0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        count_kind(&redis.stream("lease"), "acme", "seat.expired"),
        1
    );
    assert_eq!(app.activate("acme", "b").await.0, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn disabled_and_expired_entitlements_deny_with_their_reason() {
    let clock = manual_clock("2026-11-28T00:00:00Z");
    let opts = AppOptions {
        clock: clock.clone(),
        ..AppOptions::default()
    };
    let app = TestApp::spawn_with(memory_store(), opts).await;
    app.put(
        "off",
        r#"{"seats": {"purchased": 5}, "features": {"f": {"included": 5}}, "disabled": true}"#,
    )
    .await;
    let (s, p) = app.activate("off", "a").await;
    assert_eq!((s, p["reason"].as_str()), (429, Some("disabled")));
    let (s, p) = app.usage("off", r#"{"feature": "f", "amount": 1}"#).await;
    assert_eq!((s, p["reason"].as_str()), (429, Some("disabled")));

    app.put(
        "trial",
        r#"{"seats": {"purchased": 5}, "expires_at": "2026-12-01T00:00:00Z"}"#,
    )
    .await;
    assert_eq!(app.activate("trial", "a").await.0, 200);
    clock.set("2026-12-01T00:00:00Z".parse().unwrap_or_default());
    let (s, p) = app.activate("trial", "b").await;
    assert_eq!((s, p["reason"].as_str()), (429, Some("expired")));
    app.put(
        "trial",
        r#"{"seats": {"purchased": 5}, "expires_at": "2027-12-01T00:00:00Z"}"#,
    )
    .await;
    assert_eq!(app.activate("trial", "b").await.0, 200, "renewed");
    app.stop().await;
}

#[actix_rt::test]
async fn a_limit_lowered_below_current_use_keeps_seats_and_emits_at_once() {
    a_limit_lowered_below_current_use_keeps_seats_and_emits_at_once_on(&RedisServer::start()).await;
}

pub(crate) async fn a_limit_lowered_below_current_use_keeps_seats_and_emits_at_once_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("lower")).await;
    app.put("acme", r#"{"seats": {"purchased": 5}}"#).await;
    for s in ["a", "b", "c", "d"] {
        app.activate("acme", s).await;
    }
    let (s, view) = app
        .put("acme", r#"{"seats": {"purchased": 2, "hard_cap": 3}}"#)
        .await;
    assert_eq!(s, 200);
    assert_eq!(view["seats"]["in_use"], 4, "no seat was evicted");
    let events = redis.stream("lower");
    assert_eq!(count_kind(&events, "acme", "seat.overdraft_entered"), 1);
    assert_eq!(count_kind(&events, "acme", "seat.hard_cap_reached"), 1);
    assert_eq!(
        app.activate("acme", "a").await.0,
        200,
        "an active seat refreshes"
    );
    assert_eq!(app.activate("acme", "e").await.0, 429);
    app.stop().await;
}

#[actix_rt::test]
async fn delete_removes_the_entitlement_and_its_state() {
    delete_removes_the_entitlement_and_its_state_on(&RedisServer::start()).await;
}

pub(crate) async fn delete_removes_the_entitlement_and_its_state_on(redis: &impl TestRedis) {
    let app = TestApp::spawn(redis.store("del")).await;
    app.put(
        "acme",
        r#"{"seats": {"purchased": 5}, "features": {"f": {"included": 5}}}"#,
    )
    .await;
    app.activate("acme", "a").await;
    app.usage(
        "acme",
        r#"{"feature": "f", "amount": 1, "idempotency_key": "k"}"#,
    )
    .await;
    let (s, _) = app
        .send(
            reqwest::Method::DELETE,
            "/v1/entitlements/acme",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 204);
    assert_eq!(app.get("acme").await.0, 404);
    assert_eq!(app.activate("acme", "a").await.0, 404);
    let (s, _) = app
        .send(
            reqwest::Method::DELETE,
            "/v1/entitlements/acme",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(
        count_kind(&redis.stream("del"), "acme", "entitlement.deleted"),
        1
    );
    let mut c = redis.connection();
    let acme = headroom::domain::EntitlementId::parse("acme").expect("id");
    let exists: u64 = redis::cmd("EXISTS")
        .arg(redis.keys("del").state(&acme))
        .arg(redis.keys("del").seats(&acme))
        .query(&mut *c)
        .unwrap_or(99);
    assert_eq!(exists, 0);
    // Re-created, it starts afresh: the old idempotency key is not in force.
    app.put("acme", r#"{"features": {"f": {"included": 5}}}"#)
        .await;
    let (_, d) = app
        .usage(
            "acme",
            r#"{"feature": "f", "amount": 2, "idempotency_key": "k"}"#,
        )
        .await;
    assert_eq!(d["used"], 2);
    app.stop().await;
}

/// Keys this process never saw, retried many at once (after a restart, a
/// client re-sends what it was not sure of): each is found in the store and
/// replayed, none is applied twice.
#[actix_rt::test]
async fn concurrent_retries_of_keys_used_before_a_restart_all_replay() {
    concurrent_retries_of_keys_used_before_a_restart_all_replay_on(&RedisServer::start()).await;
}

pub(crate) async fn concurrent_retries_of_keys_used_before_a_restart_all_replay_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("storm")).await;
    app.put("acme", r#"{"features": {"api": {"included": 1000000}}}"#)
        .await;
    let body =
        |i: usize| format!(r#"{{"feature": "api", "amount": 1, "idempotency_key": "k{i}"}}"#);
    for i in 0..200 {
        assert_eq!(app.usage("acme", &body(i)).await.0, 200);
    }
    app.stop().await;

    let app = TestApp::spawn(redis.store("storm")).await;
    let retries = (0..200).map(|i| {
        let (app, body) = (&app, body(i));
        async move { app.usage("acme", &body).await.0 }
    });
    let statuses = tokio::time::timeout(std::time::Duration::from_secs(20), join_all(retries))
        .await
        .expect("the retries settle");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (_, view) = app.get("acme").await;
    assert_eq!(
        view["features"]["api"]["used"], 200,
        "nothing applied twice"
    );
    app.stop().await;
}

/// A replayed denial is marked like a replayed grant.
#[actix_rt::test]
async fn a_replayed_denial_carries_the_replay_header() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", r#"{"features": {"api": {"included": 1}}}"#)
        .await;
    let body = r#"{"feature": "api", "amount": 2, "idempotency_key": "too-much"}"#;
    let send = || {
        app.http
            .post(app.url("/v1/entitlements/acme/usage"))
            .bearer_auth(CLIENT)
            .body(body)
            .send()
    };
    let first = send().await.expect("first");
    assert_eq!(first.status().as_u16(), 429);
    assert!(!first.headers().contains_key("idempotency-replayed"));
    let again = send().await.expect("again");
    assert_eq!(again.status().as_u16(), 429);
    assert_eq!(
        again
            .headers()
            .get("idempotency-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    app.stop().await;
}

/// The standard `Idempotency-Key` header means what the body's
/// `idempotency_key` means; the two disagreeing, a malformed header, or
/// the header on a batch (whose events carry keys of their own) are 400
/// and change nothing.
#[actix_rt::test]
async fn the_idempotency_key_header_is_honoured() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", r#"{"features": {"api": {"included": 100}}}"#)
        .await;
    let call = |key: &'static str, body: &'static str| {
        let req = app
            .http
            .post(app.url("/v1/entitlements/acme/usage"))
            .bearer_auth(CLIENT)
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(body);
        async move {
            let res = req.send().await.expect("request");
            let replayed = res.headers().contains_key("idempotency-replayed");
            let status = res.status().as_u16();
            let body: Value = res.json().await.expect("json");
            (status, replayed, body)
        }
    };
    let first = call("order-1", r#"{"feature": "api", "amount": 3}"#).await;
    assert_eq!((first.0, first.1), (200, false), "{}", first.2);
    let again = call("order-1", r#"{"feature": "api", "amount": 3}"#).await;
    assert_eq!((again.0, again.1), (200, true), "{}", again.2);
    assert_eq!(again.2, first.2);
    // The same key in the header and in the body is one key.
    let both = call(
        "order-1",
        r#"{"feature": "api", "amount": 3, "idempotency_key": "order-1"}"#,
    )
    .await;
    assert_eq!((both.0, both.1), (200, true));
    let (_, view) = app.get("acme").await;
    assert_eq!(view["features"]["api"]["used"], 3);

    for (key, body) in [
        (
            "order-2",
            r#"{"feature": "api", "amount": 1, "idempotency_key": "other"}"#,
        ),
        ("", r#"{"feature": "api", "amount": 1}"#),
    ] {
        let (status, _, problem) = call(key, body).await;
        assert_eq!(status, 400, "{problem}");
        assert_eq!(problem["field"], "Idempotency-Key", "{problem}");
    }
    let res = app
        .http
        .post(app.url("/v1/usage/batch"))
        .bearer_auth(CLIENT)
        .header("Idempotency-Key", "batch-1")
        .body(r#"{"events": [{"entitlement": "acme", "feature": "api", "amount": 1}]}"#)
        .send()
        .await
        .expect("batch");
    assert_eq!(res.status().as_u16(), 400);
    let (_, view) = app.get("acme").await;
    assert_eq!(view["features"]["api"]["used"], 3, "nothing changed");
    app.stop().await;
}
