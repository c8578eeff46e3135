//! HTTP as generic clients expect it: `Allow` on 405, `OPTIONS`, `HEAD` on
//! every GET route, the bearer scheme in any case, `Location` on 201, and
//! `ETag` / `If-Match` on an entitlement's configuration.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

const CONFIG: &str = r#"{"seats": {"purchased": 2, "hard_cap": 4}}"#;

/// A route's pattern with its placeholders filled in.
fn concrete(pattern: &str) -> String {
    pattern
        .replace("{id}", "acme")
        .replace("{seat_id}", "s1")
        .replace("{hash}", "0")
        .replace("{name}", "x")
        .replace("{tail:.*}", "x")
}

async fn raw(app: &TestApp, method: Method, path: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .request(method, app.url(path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.expect("request")
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[actix_rt::test]
async fn every_route_says_which_methods_it_takes() {
    let app = TestApp::spawn(memory_store()).await;
    let admin = format!("Bearer {ADMIN}");
    let routes = headroom::http::ROUTES
        .iter()
        .map(|(p, m)| (*p, m.to_vec()))
        .chain([
            ("/portal/e/{id}", vec!["GET"]),
            ("/console/login", vec!["GET", "POST"]),
            ("/console/e/{id}/portal-links", vec!["POST"]),
        ]);
    for (pattern, methods) in routes {
        let path = concrete(pattern);
        let options = raw(&app, Method::OPTIONS, &path, None).await;
        assert_eq!(options.status().as_u16(), 204, "OPTIONS {path}");
        let allow = header(&options, "allow");
        for m in methods.iter().chain(&["OPTIONS"]) {
            assert!(allow.contains(m), "OPTIONS {path}: {m} not in {allow:?}");
        }
        assert_eq!(
            allow.contains("HEAD"),
            methods.contains(&"GET"),
            "{path}: {allow}"
        );
        let not_taken = raw(&app, Method::PATCH, &path, Some(&admin)).await;
        assert_eq!(not_taken.status().as_u16(), 405, "PATCH {path}");
        assert_eq!(header(&not_taken, "allow"), allow, "PATCH {path}");
        assert_eq!(
            header(&not_taken, "content-type"),
            "application/problem+json"
        );
    }
    app.stop().await;
}

#[actix_rt::test]
async fn head_answers_like_get_without_a_body() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", CONFIG).await;
    let admin = format!("Bearer {ADMIN}");
    for (pattern, methods) in headroom::http::ROUTES {
        if !methods.contains(&"GET") {
            continue;
        }
        let path = concrete(pattern);
        let get = raw(&app, Method::GET, &path, Some(&admin)).await;
        let head = raw(&app, Method::HEAD, &path, Some(&admin)).await;
        assert_eq!(head.status(), get.status(), "HEAD {path}");
        assert_eq!(
            header(&head, "content-type"),
            header(&get, "content-type"),
            "HEAD {path}"
        );
        assert_eq!(header(&head, "etag"), header(&get, "etag"), "HEAD {path}");
        assert!(
            head.bytes().await.expect("body").is_empty(),
            "HEAD {path} has a body"
        );
    }
    let page = raw(&app, Method::HEAD, "/portal/e/acme", None).await;
    assert_eq!(page.status().as_u16(), 401, "a page without its link");
    app.stop().await;
}

#[actix_rt::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", CONFIG).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let res = raw(
            &app,
            Method::GET,
            "/v1/entitlements/acme",
            Some(&format!("{scheme} {ADMIN}")),
        )
        .await;
        assert_eq!(res.status().as_u16(), 200, "{scheme}");
    }
    for bad in [format!("Basic {ADMIN}"), ADMIN.to_string(), "Bearer".into()] {
        let res = raw(&app, Method::GET, "/v1/entitlements/acme", Some(&bad)).await;
        assert_eq!(res.status().as_u16(), 401, "{bad}");
    }
    app.stop().await;
}

#[actix_rt::test]
async fn what_a_201_created_is_named_in_location() {
    let app = TestApp::spawn(memory_store()).await;
    let http = http_client();
    let created = http
        .put(app.url("/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .body(CONFIG)
        .send()
        .await
        .expect("put");
    assert_eq!(created.status().as_u16(), 201);
    assert_eq!(header(&created, "location"), "/v1/entitlements/acme");
    let replaced = http
        .put(app.url("/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .body(CONFIG)
        .send()
        .await
        .expect("put");
    assert_eq!(replaced.status().as_u16(), 200);
    assert_eq!(header(&replaced, "location"), "", "only on 201");
    for path in ["/v1/entitlements/acme/portal-links", "/v1/console-links"] {
        let res = http
            .post(app.url(path))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("post");
        assert_eq!(res.status().as_u16(), 201, "{path}");
        let location = header(&res, "location");
        let body: Value = res.json().await.expect("json");
        assert_eq!(body["url"], location.as_str(), "{path}");
    }
    app.stop().await;
}

async fn put_with(
    app: &TestApp,
    condition: Option<(&str, &str)>,
    config: &str,
) -> (u16, String, Value) {
    let mut req = http_client()
        .put(app.url("/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .body(config.to_string());
    if let Some((name, value)) = condition {
        req = req.header(name, value);
    }
    let res = req.send().await.expect("put");
    let status = res.status().as_u16();
    let etag = header(&res, "etag");
    (status, etag, res.json().await.unwrap_or(Value::Null))
}

#[actix_rt::test]
async fn if_match_keeps_two_admins_from_overwriting_each_other() {
    let app = TestApp::spawn(memory_store()).await;
    // Create only: If-None-Match: * refuses to replace.
    let (status, first, _) = put_with(&app, Some(("if-none-match", "*")), CONFIG).await;
    assert_eq!(status, 201);
    assert!(first.starts_with('"') && first.ends_with('"'), "{first}");
    let (status, _, problem) = put_with(&app, Some(("if-none-match", "*")), CONFIG).await;
    assert_eq!(status, 412, "{problem}");
    assert_eq!(problem["code"], "precondition_failed");

    // Both admins read the same configuration.
    let read = raw(
        &app,
        Method::GET,
        "/v1/entitlements/acme",
        Some(&format!("Bearer {ADMIN}")),
    )
    .await;
    assert_eq!(header(&read, "etag"), first);
    // The first writes with it; the second's tag is stale now.
    let alice = r#"{"seats": {"purchased": 5, "hard_cap": 6}}"#;
    let (status, second, _) = put_with(&app, Some(("if-match", &first)), alice).await;
    assert_eq!(status, 200);
    assert_ne!(second, first, "a new configuration, a new tag");
    let bob = r#"{"seats": {"purchased": 9, "hard_cap": 9}}"#;
    let (status, _, problem) = put_with(&app, Some(("if-match", &first)), bob).await;
    assert_eq!(status, 412, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&second)),
        "{problem}"
    );
    let (_, e) = app.get("acme").await;
    assert_eq!(
        e["config"]["seats"]["purchased"], 5,
        "bob's change was not applied"
    );

    // Any of several tags, `*`, and weak tags (which never match).
    let (status, _, _) =
        put_with(&app, Some(("if-match", &format!("\"x\", {second}"))), alice).await;
    assert_eq!(status, 200, "one of the tags matches");
    let (status, _, _) = put_with(&app, Some(("if-match", "*")), alice).await;
    assert_eq!(status, 200);
    let (status, _, _) = put_with(&app, Some(("if-match", &format!("W/{second}"))), alice).await;
    assert_eq!(status, 412, "a weak tag does not match");
    for bad in ["nonsense", "\"unterminated"] {
        let (status, _, problem) = put_with(&app, Some(("if-match", bad)), alice).await;
        assert_eq!(status, 400, "If-Match: {bad:?}: {problem}");
    }
    let (status, _, _) = put_with(&app, Some(("if-none-match", &second)), alice).await;
    assert_eq!(status, 400, "only If-None-Match: * on PUT");
    let (status, _, _) = put_with(&app, Some(("if-match", "")), alice).await;
    assert_eq!(status, 200, "an empty If-Match is no condition");

    // If-Match on an entitlement that does not exist creates nothing.
    let (status, _) = app
        .send(Method::DELETE, "/v1/entitlements/acme", Some(ADMIN), None)
        .await;
    assert_eq!(status, 204);
    let (status, _, _) = put_with(&app, Some(("if-match", "*")), CONFIG).await;
    assert_eq!(status, 412);
    assert_eq!(app.get("acme").await.0, 404);
    app.stop().await;
}
