//! Operations: generated tokens, `--no-auth`, metrics.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

#[actix_rt::test]
async fn tokens_are_generated_and_printed_once_when_none_are_configured() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .env_clear()
        .env("HEADROOM_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start headroom");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut token = |prefix: &str| {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(line.starts_with(prefix), "{line}");
        line.rsplit(' ').next().unwrap_or_default().to_string()
    };
    let admin = token("generated admin token");
    let client = token("generated client token");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(r) = http
            .put(format!("{base}/v1/entitlements/acme"))
            .bearer_auth(&admin)
            .body(r#"{"seats": {"purchased": 1}}"#)
            .send()
            .await
        {
            status = r.status().as_u16();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 201);
    let r = http
        .post(format!("{base}/v1/entitlements/acme/seats/a"))
        .bearer_auth(&client)
        .send()
        .await
        .expect("activate");
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .get(format!("{base}/v1/entitlements/acme"))
        .bearer_auth(&client)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 403);
    let _ = child.kill();
    let _ = child.wait();
}

#[actix_rt::test]
async fn no_auth_accepts_calls_without_a_token() {
    let opts = AppOptions {
        auth: headroom::http::Auth::disabled(),
        ..AppOptions::default()
    };
    let app = TestApp::spawn_with(memory_store(), opts).await;
    let (s, _) = app
        .send(
            reqwest::Method::PUT,
            "/v1/entitlements/acme",
            None,
            Some(r#"{"seats": {"purchased": 1}}"#),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = app
        .send(
            reqwest::Method::POST,
            "/v1/entitlements/acme/seats/a",
            None,
            None,
        )
        .await;
    assert_eq!(s, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn metrics_export_the_core_series_with_bounded_labels() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(redis_store(&redis, "metrics")).await;
    app.put("acme", r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
        .await;
    for s in ["a", "b", "c"] {
        app.activate("acme", s).await;
    }
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default();
    for series in [
        r#"headroom_decisions_total{operation="activate",outcome="granted"}"#,
        r#"headroom_decisions_total{operation="activate",outcome="overdraft"}"#,
        r#"headroom_decisions_total{operation="activate",outcome="denied"}"#,
        r#"headroom_events_published_total{type="seat.overdraft_entered"}"#,
        "headroom_http_request_duration_seconds_bucket",
        r#"route="/v1/entitlements/{id}/seats/{seat_id}""#,
        "headroom_store_write_duration_seconds_bucket",
        "headroom_store_batch_size_bucket",
        "headroom_resident_entitlements",
        "headroom_entitlements_in_overdraft",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    for forbidden in ["acme", "seat_id=\"", "entitlement=\""] {
        assert!(
            !text.contains(forbidden),
            "unbounded label value {forbidden} in /metrics"
        );
    }
    app.stop().await;
}
