use futures_util::future::join_all;

use crate::helpers::*;

const SEED: &str = r#"{"seats": {"purchased": 100, "hard_cap": 120}}"#;

#[actix_rt::test]
async fn seed_scenario_130_concurrent_activations_on_redis() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(redis_store(&redis, "seed")).await;
    assert_eq!(app.put("acme", SEED).await.0, 201);

    let calls = (0..130).map(|i| {
        let app = &app;
        async move { app.activate("acme", &format!("user-{i}")).await }
    });
    let results = join_all(calls).await;
    let count = |status: u16, outcome: &str| {
        results
            .iter()
            .filter(|(s, b)| {
                *s == status && (b["outcome"] == outcome || b["decision"]["outcome"] == outcome)
            })
            .count()
    };
    assert_eq!(count(200, "granted"), 100);
    assert_eq!(count(200, "overdraft"), 20);
    assert_eq!(count(429, "denied"), 10);

    let events = redis.events("seed");
    assert_eq!(count_kind(&events, "acme", "seat.overdraft_entered"), 1);
    assert_eq!(count_kind(&events, "acme", "seat.hard_cap_reached"), 1);
    assert_eq!(count_kind(&events, "acme", "seat.denied"), 10);

    let granted: Vec<String> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b["seat_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let releases = granted.iter().take(21).map(|s| app.release("acme", s));
    for (status, body) in join_all(releases).await {
        assert_eq!(status, 200);
        assert_eq!(body["released"], true);
    }
    let events = redis.events("seed");
    assert_eq!(count_kind(&events, "acme", "seat.overdraft_exited"), 1);

    let (_, view) = app.get("acme").await;
    assert_eq!(view["seats"]["in_use"], 99);
    assert_eq!(view["seats"]["peak"], 120);
    assert_eq!(view["seats"]["denied_total"], 10);

    // The events are CloudEvents with deterministic, distinct ids.
    let ids: std::collections::HashSet<String> = events
        .iter()
        .map(|(_, _, e)| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids.len(), events.len());
    assert!(
        events
            .iter()
            .all(|(_, _, e)| e["specversion"] == "1.0" && e["subject"] == "acme")
    );
    app.stop().await;
}

#[actix_rt::test]
async fn state_survives_a_restart_of_the_app_on_the_same_redis() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(redis_store(&redis, "restart")).await;
    app.put("acme", r#"{"seats": {"purchased": 2, "hard_cap": 3}}"#)
        .await;
    for s in ["a", "b", "c"] {
        assert_eq!(app.activate("acme", s).await.0, 200);
    }
    app.stop().await;

    let app = TestApp::spawn(redis_store(&redis, "restart")).await;
    let (status, d) = app.activate("acme", "d").await;
    assert_eq!(status, 429, "{d}");
    let (status, d) = app.activate("acme", "a").await;
    assert_eq!((status, d["refreshed"].as_bool()), (200, Some(true)));
    let (_, seats) = app
        .send(
            reqwest::Method::GET,
            "/v1/entitlements/acme/seats",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(seats["seats"].as_array().map(Vec::len), Some(3));
    app.stop().await;
}
