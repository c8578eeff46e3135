use futures_util::future::join_all;

use crate::helpers::*;

const SEED: &str = r#"{"seats": {"purchased": 100, "hard_cap": 120}}"#;

#[actix_rt::test]
async fn seed_scenario_130_concurrent_activations_on_redis() {
    let redis = RedisServer::start();
    seed_scenario(redis.store("seed"), || redis.stream("seed")).await;
}

/// 130 concurrent activations of 100 purchased seats with a hard cap of
/// 120, then 21 releases, on `store`; `events` reads its event streams.
pub async fn seed_scenario(
    store: std::sync::Arc<dyn headroom::store::Store>,
    events: impl Fn() -> Vec<(String, String, serde_json::Value)>,
) {
    let app = TestApp::spawn(store).await;
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

    let events_now = events();
    assert_eq!(count_kind(&events_now, "acme", "seat.overdraft_entered"), 1);
    assert_eq!(count_kind(&events_now, "acme", "seat.hard_cap_reached"), 1);
    assert_eq!(count_kind(&events_now, "acme", "seat.denied"), 10);

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
    let events = events();
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
    state_survives_a_restart_of_the_app_on_the_same_redis_on(&RedisServer::start()).await;
}

pub(crate) async fn state_survives_a_restart_of_the_app_on_the_same_redis_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("restart")).await;
    app.put("acme", r#"{"seats": {"purchased": 2, "hard_cap": 3}}"#)
        .await;
    for s in ["a", "b", "c"] {
        assert_eq!(app.activate("acme", s).await.0, 200);
    }
    app.stop().await;

    let app = TestApp::spawn(redis.store("restart")).await;
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

/// With a churn limit, a token that activates and releases faster than
/// allowed gets 429 `rate_limited` with Retry-After; other tokens and usage
/// calls are not affected, and the refused calls changed nothing.
#[actix_rt::test]
async fn seat_churn_is_limited_per_token() {
    let other = "second-client-token";
    let app = TestApp::spawn_with(
        memory_store(),
        AppOptions {
            auth: headroom::http::AuthSettings {
                churn_limit: 5,
                ..tokens(&[ADMIN], &[CLIENT, other])
            },
            ..AppOptions::default()
        },
    )
    .await;
    app.put(
        "acme",
        r#"{"seats": {"purchased": 100}, "features": {"api": {"included": 100}}}"#,
    )
    .await;
    let activate = |token: &'static str, seat: String| {
        let app = &app;
        async move {
            let res = app
                .http
                .post(app.url(&format!("/v1/entitlements/acme/seats/{seat}")))
                .bearer_auth(token)
                .send()
                .await
                .expect("activate");
            let retry = res.headers().get("retry-after").is_some();
            let status = res.status().as_u16();
            let body: serde_json::Value = res.json().await.unwrap_or_default();
            (status, retry, body["code"].as_str().map(String::from))
        }
    };
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(activate(CLIENT, format!("s{i}")).await);
    }
    let granted = statuses.iter().filter(|s| s.0 == 200).count();
    let limited: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert!((5..20).contains(&granted), "{statuses:?}");
    assert!(!limited.is_empty(), "{statuses:?}");
    assert!(
        limited
            .iter()
            .all(|s| s.1 && s.2.as_deref() == Some("rate_limited")),
        "{statuses:?}"
    );
    // Another token has its own allowance; metering is not limited.
    assert_eq!(activate(other, "x".into()).await.0, 200);
    assert_eq!(
        app.usage("acme", r#"{"feature": "api", "amount": 1}"#)
            .await
            .0,
        200
    );
    let (_, view) = app.get("acme").await;
    assert_eq!(
        view["seats"]["in_use"].as_u64(),
        Some(granted as u64 + 1),
        "refused activations changed nothing"
    );
    app.stop().await;
}
