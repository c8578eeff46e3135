use reqwest::Method;

use crate::helpers::*;

async fn app_with_acme() -> TestApp {
    let app = TestApp::spawn(memory_store()).await;
    let (s, _) = app
        .put(
            "acme",
            r#"{"seats": {"purchased": 2, "hard_cap": 3}, "features": {"api": {"included": 10}}}"#,
        )
        .await;
    assert_eq!(s, 201);
    app
}

async fn unchanged(app: &TestApp) {
    let (_, view) = app.get("acme").await;
    assert_eq!(view["seats"]["in_use"], 0);
    assert_eq!(view["seats"]["purchased"], 2);
    assert_eq!(view["features"]["api"]["used"], 0);
    assert_eq!(view["features"]["api"]["denied_total"], 0);
}

fn is_problem(body: &serde_json::Value, status: u16, code: &str) -> bool {
    body["status"] == status
        && body["code"] == code
        && body["detail"].as_str().is_some_and(|d| !d.is_empty())
}

#[actix_rt::test]
async fn bad_configurations_are_400_and_change_nothing() {
    let app = app_with_acme().await;
    let cases = [
        ("{", "invalid_json"),
        ("[1, 2]", "invalid_request"),
        (r#"{"seats": {"purchased": "ten"}}"#, "invalid_request"),
        (
            r#"{"seats": {"purchased": 10, "hard_cap": 9}}"#,
            "invalid_request",
        ),
        (r#"{"seats": {"purchased": -1}}"#, "invalid_request"),
        (
            r#"{"seats": {"purchased": 18446744073709551616}}"#,
            "invalid_request",
        ),
        (
            r#"{"seats": {"purchased": 1}, "colour": "red"}"#,
            "invalid_request",
        ),
        (
            r#"{"features": {"api": {"included": 10, "thresholds": [0]}}}"#,
            "invalid_request",
        ),
        (
            r#"{"features": {"api": {"included": 10, "thresholds": [1001]}}}"#,
            "invalid_request",
        ),
        (
            r#"{"features": {"api": {"included": 10, "period": "fortnight"}}}"#,
            "invalid_request",
        ),
        (
            r#"{"features": {"bad key!": {"included": 10}}}"#,
            "invalid_request",
        ),
    ];
    for (body, code) in cases {
        let (s, p) = app.put("acme", body).await;
        assert!(s == 400 && is_problem(&p, 400, code), "{body} -> {s} {p}");
    }
    unchanged(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn bad_metering_calls_are_4xx_and_change_nothing() {
    let app = app_with_acme().await;
    let cases = [
        (r#"{"feature": "api", "amount": 0}"#, 400, "invalid_request"),
        (
            r#"{"feature": "api", "amount": -3}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"feature": "api", "amount": 18446744073709551616}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"feature": "api", "amount": 1.5}"#,
            400,
            "invalid_request",
        ),
        (r#"{"feature": "api"}"#, 400, "invalid_request"),
        (
            r#"{"feature": "api", "amount": 1, "idempotency_kee": "x"}"#,
            400,
            "invalid_request",
        ),
        (r#"{"feature": "a b", "amount": 1}"#, 400, "invalid_request"),
        (
            r#"{"feature": "api", "amount": 1, "idempotency_key": ""}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"feature": "nope", "amount": 1}"#,
            404,
            "feature_not_found",
        ),
        ("not json", 400, "invalid_json"),
    ];
    for (body, status, code) in cases {
        let (s, p) = app.usage("acme", body).await;
        assert!(
            s == status && is_problem(&p, status, code),
            "{body} -> {s} {p}"
        );
    }
    let (s, p) = app
        .usage("ghost", r#"{"feature": "api", "amount": 1}"#)
        .await;
    assert!(
        s == 404 && is_problem(&p, 404, "entitlement_not_found"),
        "{p}"
    );
    let (s, p) = app
        .send(
            Method::POST,
            "/v1/entitlements/bad%20id/seats/a",
            Some(CLIENT),
            None,
        )
        .await;
    assert!(s == 400 && is_problem(&p, 400, "invalid_request"), "{p}");
    let (s, p) = app
        .send(
            Method::POST,
            &format!("/v1/entitlements/acme/seats/{}", "x".repeat(129)),
            Some(CLIENT),
            None,
        )
        .await;
    assert!(s == 400 && is_problem(&p, 400, "invalid_request"), "{p}");
    let (s, p) = app
        .send(
            Method::POST,
            "/v1/entitlements/acme/seats/a",
            Some(CLIENT),
            Some("[]"),
        )
        .await;
    assert!(s == 400 && is_problem(&p, 400, "invalid_request"), "{p}");
    unchanged(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn bad_batches_and_bodies_over_the_limit() {
    let app = app_with_acme().await;
    let one = r#"{"entitlement": "acme", "feature": "api", "amount": 1}"#;
    let too_many = format!(r#"{{"events": [{}]}}"#, vec![one; 10_001].join(","));
    let (s, p) = app
        .send(
            Method::POST,
            "/v1/usage/batch",
            Some(CLIENT),
            Some(&too_many),
        )
        .await;
    assert!(s == 413 && is_problem(&p, 413, "batch_too_large"), "{p}");
    for body in ["{", r#"{"events": 3}"#, r#"{"evnts": []}"#] {
        let (s, p) = app
            .send(Method::POST, "/v1/usage/batch", Some(CLIENT), Some(body))
            .await;
        assert_eq!(s, 400, "{body} -> {p}");
    }
    let huge = format!(
        r#"{{"seats": {{"purchased": 1}}, "pad": "{}"}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    let (s, p) = app.put("acme", &huge).await;
    assert!(s == 413 && is_problem(&p, 413, "payload_too_large"), "{s}");
    unchanged(&app).await;

    // Each event of a good batch succeeds, is denied or fails on its own.
    let body = r#"{"events": [
        {"entitlement": "acme", "feature": "api", "amount": 4},
        {"entitlement": "acme", "feature": "api", "amount": 0},
        {"entitlement": "ghost", "feature": "api", "amount": 1},
        {"entitlement": "acme", "feature": "api", "amount": 7},
        {"entitlement": "acme", "feature": "nope", "amount": 1},
        {"entitlement": "acme", "feature": "api", "amount": 6}
    ]}"#;
    let (s, r) = app
        .send(Method::POST, "/v1/usage/batch", Some(CLIENT), Some(body))
        .await;
    assert_eq!(s, 200, "{r}");
    let results = r["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 6);
    assert_eq!(results[0]["outcome"], "granted");
    assert_eq!(results[1]["error"]["status"], 400);
    assert_eq!(results[2]["error"]["code"], "entitlement_not_found");
    assert_eq!(results[3]["outcome"], "denied");
    assert_eq!(results[4]["error"]["code"], "feature_not_found");
    assert_eq!(
        (results[5]["outcome"].as_str(), results[5]["used"].as_u64()),
        (Some("granted"), Some(10))
    );
    app.stop().await;
}

#[actix_rt::test]
async fn auth_matrix() {
    let app = app_with_acme().await;
    let admin_calls: [(Method, &str, Option<&str>); 4] = [
        (
            Method::PUT,
            "/v1/entitlements/acme",
            Some(
                r#"{"seats": {"purchased": 2, "hard_cap": 3}, "features": {"api": {"included": 10}}}"#,
            ),
        ),
        (Method::GET, "/v1/entitlements/acme", None),
        (Method::GET, "/v1/entitlements/acme/seats", None),
        (Method::DELETE, "/v1/entitlements/other", None),
    ];
    let client_calls: [(Method, &str, Option<&str>); 4] = [
        (Method::POST, "/v1/entitlements/acme/seats/a", None),
        (Method::DELETE, "/v1/entitlements/acme/seats/a", None),
        (
            Method::POST,
            "/v1/entitlements/acme/usage",
            Some(r#"{"feature": "api", "amount": 1}"#),
        ),
        (Method::POST, "/v1/usage/batch", Some(r#"{"events": []}"#)),
    ];
    for (m, path, body) in admin_calls.iter().chain(client_calls.iter()) {
        let (s, p) = app.send(m.clone(), path, None, *body).await;
        assert!(
            s == 401 && is_problem(&p, 401, "unauthorized"),
            "{m} {path}: {s}"
        );
        let (s, _) = app.send(m.clone(), path, Some("wrong-token"), *body).await;
        assert_eq!(s, 401, "{m} {path}");
    }
    for (m, path, body) in &admin_calls {
        let (s, p) = app.send(m.clone(), path, Some(CLIENT), *body).await;
        assert!(
            s == 403 && is_problem(&p, 403, "forbidden"),
            "{m} {path}: {s}"
        );
    }
    for (m, path, body) in &client_calls {
        let (s, _) = app.send(m.clone(), path, Some(CLIENT), *body).await;
        assert_eq!(s, 200, "client token on {m} {path}");
    }
    for (m, path, body) in admin_calls.iter().chain(client_calls.iter()) {
        let (s, _) = app.send(m.clone(), path, Some(ADMIN), *body).await;
        assert!(
            s < 400 || (*m == Method::DELETE && s == 404),
            "admin token on {m} {path}: {s}"
        );
    }
    // Operations endpoints need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            app.send(Method::GET, path, None, None).await.0,
            200,
            "{path}"
        );
    }
    app.stop().await;
}

/// A client that sends its head and then trickles (or withholds) its body
/// gets 408 after the request timeout; the worker keeps serving others.
#[actix_rt::test]
async fn a_body_that_never_arrives_gets_408_and_holds_no_worker() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(
        memory_store(),
        AppOptions {
            limits: headroom::http::Limits {
                request_timeout: std::time::Duration::from_millis(300),
                ..headroom::http::Limits::default()
            },
            ..AppOptions::default()
        },
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let head = format!(
            "PUT /v1/entitlements/acme HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
        );
        s.write_all(head.as_bytes()).await.expect("head");
        slow.push(s);
    }
    // Meanwhile the app answers everyone else.
    let (status, _) = app.put("globex", r#"{"seats": {"purchased": 1}}"#).await;
    assert_eq!(status, 201);
    for mut s in slow {
        let mut answer = vec![0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut answer))
            .await
            .expect("answered before the test gave up")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
    }
    let (status, _) = app.get("acme").await;
    assert_eq!(status, 404, "nothing was created from the partial body");
    app.stop().await;
}

/// A head beyond actix-http's limits (128 KiB, 96 headers) is refused, not
/// processed.
#[actix_rt::test]
async fn oversized_headers_are_refused() {
    let app = TestApp::spawn(memory_store()).await;
    let res = app
        .http
        .get(app.url("/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .header("x-padding", "a".repeat(256 * 1024))
        .send()
        .await;
    match res {
        Ok(r) => assert_eq!(r.status().as_u16(), 431),
        // The server may also close the connection without an answer.
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    let (status, _) = app.send(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// `--max-connections`: a connection opened while the limit is reached is
/// answered `503 too_many_connections` with `Connection: close` and
/// `Retry-After`, and the open ones are still served; once one closes, a new
/// connection is served again.
#[actix_rt::test]
async fn connections_beyond_the_limit_get_a_clear_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(
        memory_store(),
        AppOptions {
            limits: headroom::http::Limits {
                max_connections: 2,
                ..headroom::http::Limits::default()
            },
            ..AppOptions::default()
        },
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    // Sends one request on `conn` and returns the whole answer head+body.
    async fn ask(conn: &mut tokio::net::TcpStream, request: &str) -> String {
        conn.write_all(request.as_bytes()).await.expect("request");
        let mut answer = vec![0u8; 2048];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        String::from_utf8_lossy(&answer[..n]).to_lowercase()
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        assert!(ask(&mut conn, &request).await.starts_with("http/1.1 200"));
        held.push(conn);
    }
    let mut extra = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let answer = ask(&mut extra, &request).await;
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(
        answer.contains("\"code\":\"too_many_connections\""),
        "{answer}"
    );
    // The server closes the excess connection after its answer.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        extra.read_to_end(&mut rest),
    )
    .await;
    assert!(matches!(closed, Ok(Ok(_))), "excess connection left open");
    // The connections within the limit are still served.
    for conn in &mut held {
        assert!(ask(conn, &request).await.starts_with("http/1.1 200"));
    }
    drop(held);
    // Each closed connection gives its slot back (the close is seen by the
    // worker a moment later).
    let mut served = false;
    for _ in 0..50 {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        if ask(&mut conn, &request).await.starts_with("http/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served, "a slot freed by a closed connection was not reused");
    app.stop().await;
}

/// A body error names the field at fault, in the product's words: its path
/// in the body, and no Rust type names.
#[actix_rt::test]
async fn body_errors_name_the_field_without_rust_type_names() {
    let app = app_with_acme().await;
    for (body, field) in [
        (r#"{"seats": 5}"#, "seats"),
        (r#"{"seats": {"purchased": "ten"}}"#, "seats.purchased"),
        (
            r#"{"seats": {"purchased": 1, "colour": 2}}"#,
            "seats.colour",
        ),
        (
            r#"{"features": {"api": {"included": "x"}}}"#,
            "features.api.included",
        ),
        (
            r#"{"seats": {"purchased": 10, "hard_cap": 9}}"#,
            "seats.hard_cap",
        ),
    ] {
        let (status, problem) = app.put("acme", body).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert_eq!(problem["field"], field, "{body}: {problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        for rust in ["struct", "SeatConfig", "FeatureConfig", "u64", "enum "] {
            assert!(!detail.contains(rust), "{body}: `{rust}` in {detail}");
        }
    }
    for (body, field) in [
        (r#"{"feature": "api", "amount": "x"}"#, "amount"),
        (r#"{"amount": 1}"#, "feature"),
        (r#"{"feature": "api", "amount": 1, "colour": 2}"#, "colour"),
    ] {
        let (status, problem) = app.usage("acme", body).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert_eq!(problem["field"], field, "{body}: {problem}");
    }
    unchanged(&app).await;
}
