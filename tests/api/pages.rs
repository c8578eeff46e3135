//! The customer's page and the vendor's console over HTTP: the life of a
//! portal link (mint, exchange, expiry, tampering, another entitlement,
//! withdrawal, key rotation), the manage scope's form, the console's
//! sign-in, paging, sorting and CSV exports. What a browser draws is in
//! `browser.rs`.

use std::sync::Arc;

use chrono::Duration;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;
use headroom::engine::ManualClock;
use headroom::http::pages::PageSettings;

pub(crate) const KEY_1: &str = "portal-key-one-0123456789";
const KEY_2: &str = "portal-key-two-0123456789";

pub(crate) fn pages(keys: &str) -> PageSettings {
    PageSettings {
        portal_secrets: Some(
            clap::Parser::try_parse_from(["headroom", "--portal-secrets", keys])
                .map(|s: headroom::settings::Settings| s.http.pages.portal_secrets)
                .expect("keys")
                .expect("some keys"),
        ),
        ..PageSettings::default()
    }
}

pub(crate) async fn app_on(
    store: Arc<dyn headroom::store::Store>,
    clock: &Arc<ManualClock>,
    pages: PageSettings,
) -> TestApp {
    TestApp::spawn_with(
        store,
        AppOptions {
            clock: clock.clone(),
            pages,
            ..AppOptions::default()
        },
    )
    .await
}

/// A client that shows redirects instead of following them, and keeps no
/// cookies: each test says which cookie it sends.
pub(crate) fn browser() -> reqwest::Client {
    headroom::tls::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the cookie `name` this answer sets.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| c.strip_prefix(&format!("{name}=")))
            .map(|c| c.split(';').next().unwrap_or("").to_string())
    }

    pub fn set_cookie(&self) -> &str {
        self.header("set-cookie")
    }
}

pub(crate) async fn fetch(
    http: &reqwest::Client,
    app: &TestApp,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    form: Option<&[(&str, &str)]>,
) -> Answer {
    let mut req = http.request(method, app.url(path));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    if let Some(f) = form {
        req = req.form(f);
    }
    let res = req.send().await.expect("request");
    Answer {
        status: res.status().as_u16(),
        headers: res.headers().clone(),
        body: res.text().await.expect("body"),
    }
}

async fn get(http: &reqwest::Client, app: &TestApp, path: &str, cookie: Option<&str>) -> Answer {
    fetch(http, app, Method::GET, path, cookie, None).await
}

/// Mints a portal link through the API: its path (no public URL here).
pub(crate) async fn mint(app: &TestApp, id: &str, body: &str) -> (u16, Value) {
    app.send(
        Method::POST,
        &format!("/v1/entitlements/{id}/portal-links"),
        Some(ADMIN),
        Some(body),
    )
    .await
}

pub(crate) async fn link(app: &TestApp, id: &str, scope: &str) -> String {
    let (status, body) = mint(app, id, &format!(r#"{{"scope": "{scope}"}}"#)).await;
    assert_eq!(status, 201, "{body}");
    body["url"].as_str().expect("url").to_string()
}

/// Opens a link: the session cookie it sets (`headroom_portal=…`).
pub(crate) async fn open(http: &reqwest::Client, app: &TestApp, link: &str) -> String {
    let a = get(http, app, link, None).await;
    assert_eq!(a.status, 303, "{}", a.body);
    let value = a.cookie("headroom_portal").expect("a session cookie");
    format!("headroom_portal={value}")
}

const CONFIG: &str = r#"{"seats": {"purchased": 2, "hard_cap": 4},
    "features": {"api": {"included": 10, "hard_cap": 15, "period": "month"}}}"#;

#[actix_rt::test]
async fn a_portal_link_opens_one_entitlements_page_until_it_expires_or_is_withdrawn() {
    let redis = RedisServer::start();
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let app = app_on(redis_store(&redis, "links"), &clock, pages(KEY_1)).await;
    let http = browser();
    app.put("acme", CONFIG).await;
    app.put("globex", CONFIG).await;

    // Minted: view by default, 12 h by default.
    let (status, body) = mint(&app, "acme", "").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["scope"], "view");
    assert_eq!(body["expires_at"], "2026-11-02T22:00:00Z");
    let url = body["url"].as_str().expect("url").to_string();
    assert!(url.starts_with("/portal/e/acme?token="), "{url}");

    // Opened: a session cookie for this entitlement's page only, and a
    // redirect to the page without the token.
    let opened = get(&http, &app, &url, None).await;
    assert_eq!(opened.status, 303);
    assert_eq!(opened.header("location"), "/portal/e/acme");
    let set = opened.set_cookie().to_string();
    for attribute in [
        "HttpOnly",
        "SameSite=Lax",
        "Path=/portal/e/acme",
        "Max-Age=43200",
    ] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert!(!set.contains("Secure"), "no https public URL: {set}");
    let session = format!(
        "headroom_portal={}",
        opened.cookie("headroom_portal").expect("cookie")
    );
    let page = get(&http, &app, "/portal/e/acme", Some(&session)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Usage of acme"));
    assert_eq!(page.header("cache-control"), "no-store");
    assert_eq!(page.header("referrer-policy"), "no-referrer");
    assert_eq!(page.header("x-content-type-options"), "nosniff");
    let csp = page.header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!page.body.contains("style=\""), "no inline style");
    assert!(
        !page.body.contains("<script>") && !page.body.contains("onload="),
        "no inline script"
    );

    // Nothing but its page: another entitlement's, the API, the console.
    assert_eq!(
        get(&http, &app, "/portal/e/globex", Some(&session))
            .await
            .status,
        404,
        "acme's session is another entitlement's token for globex"
    );
    let foreign = url.replace("/portal/e/acme", "/portal/e/globex");
    assert_eq!(get(&http, &app, &foreign, None).await.status, 404);
    assert_eq!(
        get(&http, &app, "/v1/entitlements/acme", Some(&session))
            .await
            .status,
        401
    );
    let console = get(&http, &app, "/console", Some(&session)).await;
    assert_eq!(console.status, 303);
    assert_eq!(console.header("location"), "/console/login");

    // Tampered: any change to the token is refused.
    let token = url.split("token=").nth(1).expect("token").to_string();
    let (claims, tag) = token.split_once('.').expect("two parts");
    let mut forged = claims.to_string().into_bytes();
    forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
    let forged = format!(
        "/portal/e/acme?token={}.{tag}",
        String::from_utf8(forged).expect("ascii")
    );
    assert_eq!(get(&http, &app, &forged, None).await.status, 401);
    assert_eq!(
        get(&http, &app, &format!("/portal/e/acme?token={claims}"), None)
            .await
            .status,
        401
    );
    assert_eq!(
        get(&http, &app, "/portal/e/acme", Some("headroom_portal=junk"))
            .await
            .status,
        401
    );

    // Expired: the link and the session it opened.
    clock.set("2026-11-02T22:00:00Z".parse().expect("time"));
    assert_eq!(get(&http, &app, &url, None).await.status, 401);
    let expired = get(&http, &app, "/portal/e/acme", Some(&session)).await;
    assert_eq!(expired.status, 401);
    assert!(expired.body.contains("expired"), "{}", expired.body);

    // Withdrawn: every link and session issued until then; later ones work.
    clock.set("2026-11-02T12:00:00Z".parse().expect("time"));
    let later = link(&app, "acme", "view").await;
    let later_session = open(&http, &app, &later).await;
    let (status, _) = app
        .send(
            Method::DELETE,
            "/v1/entitlements/acme/portal-links",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(get(&http, &app, &later, None).await.status, 401);
    let withdrawn = get(&http, &app, "/portal/e/acme", Some(&later_session)).await;
    assert_eq!(withdrawn.status, 401);
    assert!(withdrawn.body.contains("withdrawn"), "{}", withdrawn.body);
    clock.advance(Duration::milliseconds(1));
    let fresh = link(&app, "acme", "view").await;
    let fresh_session = open(&http, &app, &fresh).await;
    assert_eq!(
        get(&http, &app, "/portal/e/acme", Some(&fresh_session))
            .await
            .status,
        200
    );

    // Deleted and created again: the old life's links are refused.
    let (status, _) = app
        .send(Method::DELETE, "/v1/entitlements/acme", Some(ADMIN), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(get(&http, &app, &fresh, None).await.status, 404);
    clock.advance(Duration::milliseconds(1));
    app.put("acme", CONFIG).await;
    assert_eq!(get(&http, &app, &fresh, None).await.status, 404);
    assert_eq!(
        get(&http, &app, "/portal/e/acme", Some(&fresh_session))
            .await
            .status,
        404
    );
    app.stop().await;

    // Key rotation: a node with a new key first and the old one second
    // accepts the old links and signs with the new key; dropping the old
    // key ends them.
    let old = app_on(redis_store(&redis, "links"), &clock, pages(KEY_1)).await;
    let old_link = link(&old, "globex", "view").await;
    old.stop().await;
    let rotated = app_on(
        redis_store(&redis, "links"),
        &clock,
        pages(&format!("{KEY_2},{KEY_1}")),
    )
    .await;
    assert_eq!(get(&http, &rotated, &old_link, None).await.status, 303);
    let new_link = link(&rotated, "globex", "view").await;
    rotated.stop().await;
    let dropped = app_on(redis_store(&redis, "links"), &clock, pages(KEY_2)).await;
    assert_eq!(get(&http, &dropped, &old_link, None).await.status, 401);
    assert_eq!(get(&http, &dropped, &new_link, None).await.status, 303);
    dropped.stop().await;
}

#[actix_rt::test]
async fn minting_a_link_checks_its_request() {
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let app = app_on(memory_store(), &clock, pages(KEY_1)).await;
    app.put("acme", CONFIG).await;
    for (body, field) in [
        (r#"{"scope": "admin"}"#, "invalid_request"),
        (r#"{"ttl_seconds": 10}"#, "ttl_seconds"),
        (r#"{"ttl_seconds": 2592001}"#, "ttl_seconds"),
        (r#"{"ttl_seconds": -1}"#, "invalid_request"),
        (r#"{"colour": "red"}"#, "invalid_request"),
        ("[", "invalid_json"),
    ] {
        let (status, problem) = mint(&app, "acme", body).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert!(problem.to_string().contains(field), "{body}: {problem}");
    }
    let (status, body) = mint(&app, "acme", r#"{"scope": "manage", "ttl_seconds": 60}"#).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expires_at"], "2026-11-02T10:01:00Z");
    assert_eq!(body["scope"], "manage");
    let (status, _) = mint(&app, "nobody", "{}").await;
    assert_eq!(status, 404);
    let (status, _) = app
        .send(
            Method::POST,
            "/v1/entitlements/acme/portal-links",
            Some(CLIENT),
            Some("{}"),
        )
        .await;
    assert_eq!(status, 403, "a client token may only meter");
    let (status, _) = app
        .send(Method::POST, "/v1/console-links", Some(CLIENT), Some("{}"))
        .await;
    assert_eq!(status, 403);
    app.stop().await;
}

#[actix_rt::test]
async fn public_url_makes_links_absolute_and_cookies_secure() {
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let mut settings = pages(KEY_1);
    settings.public_url = Some("https://licences.example.com/".parse().expect("url"));
    let app = app_on(memory_store(), &clock, settings).await;
    app.put("acme", CONFIG).await;
    let url = link(&app, "acme", "view").await;
    assert!(
        url.starts_with("https://licences.example.com/portal/e/acme?token="),
        "{url}"
    );
    let path = url.trim_start_matches("https://licences.example.com");
    let opened = get(&browser(), &app, path, None).await;
    assert!(
        opened.set_cookie().contains("Secure"),
        "{}",
        opened.set_cookie()
    );
    app.stop().await;
}

fn csrf_of(page: &str) -> String {
    let at = page.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
    page[at..].split('"').next().expect("value").to_string()
}

#[actix_rt::test]
async fn the_manage_scope_sets_the_customer_cap_through_a_checked_form() {
    let redis = RedisServer::start();
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let app = app_on(redis_store(&redis, "manage"), &clock, pages(KEY_1)).await;
    let http = browser();
    app.put("acme", CONFIG).await;
    let post = |cookie: String, form: Vec<(&'static str, String)>| {
        let http = http.clone();
        let url = app.url("/portal/e/acme/customer-cap");
        async move {
            let res = http
                .post(url)
                .header("cookie", cookie)
                .form(&form)
                .send()
                .await
                .expect("post");
            (res.status().as_u16(), res.text().await.expect("body"))
        }
    };

    // A view link shows no form and may not post one.
    let viewer = open(&http, &app, &link(&app, "acme", "view").await).await;
    let page = get(&http, &app, "/portal/e/acme", Some(&viewer)).await;
    assert!(!page.body.contains("customer-cap"), "no form for view");
    let csrf = csrf_of(
        &get(
            &http,
            &app,
            "/portal/e/acme",
            Some(&open(&http, &app, &link(&app, "acme", "manage").await).await),
        )
        .await
        .body,
    );
    let (status, body) = post(
        viewer.clone(),
        vec![("csrf", csrf.clone()), ("seats", "3".into())],
    )
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("lets you view"), "{body}");

    let manager = open(&http, &app, &link(&app, "acme", "manage").await).await;
    let page = get(&http, &app, "/portal/e/acme", Some(&manager)).await;
    assert!(page.body.contains("/portal/e/acme/customer-cap"));
    let mine = csrf_of(&page.body);

    // Refused: no CSRF token, another session's, another site's origin.
    assert_eq!(
        post(manager.clone(), vec![("seats", "3".into())]).await.0,
        403
    );
    assert_eq!(
        post(manager.clone(), vec![("csrf", csrf), ("seats", "3".into())])
            .await
            .0,
        403
    );
    let cross = http
        .post(app.url("/portal/e/acme/customer-cap"))
        .header("cookie", &manager)
        .header("origin", "https://evil.example")
        .form(&[("csrf", mine.as_str()), ("seats", "3")])
        .send()
        .await
        .expect("post");
    assert_eq!(cross.status().as_u16(), 403);

    // Validated like the admin API; nothing changes on a refusal.
    for (field, value, says) in [
        ("seats", "5", "hard cap of 4; write at most 4"),
        ("seats", "-1", "whole number"),
        ("seats", "two", "whole number"),
        ("feature.api", "16", "hard cap of 15"),
        ("feature.nope", "1", "not a field"),
    ] {
        let (status, body) = post(
            manager.clone(),
            vec![("csrf", mine.clone()), (field, value.into())],
        )
        .await;
        assert_eq!(status, 400, "{field}={value}");
        assert!(body.contains(says), "{field}={value}: {says}");
    }
    let (_, e) = app.get("acme").await;
    assert!(e["config"]["seats"]["customer_cap"].is_null(), "{e}");
    assert_eq!(
        count_kind(&redis.events("manage"), "acme", "entitlement.updated"),
        1
    );

    // Accepted: saved, evented, and judged against at once.
    let (status, _) = post(
        manager.clone(),
        vec![
            ("csrf", mine.clone()),
            ("seats", "3".into()),
            ("feature.api", "12".into()),
        ],
    )
    .await;
    assert_eq!(status, 303);
    let (_, e) = app.get("acme").await;
    assert_eq!(e["config"]["seats"]["customer_cap"], 3, "{e}");
    assert_eq!(e["config"]["features"]["api"]["customer_cap"], 12, "{e}");
    assert_eq!(
        count_kind(&redis.events("manage"), "acme", "entitlement.updated"),
        2
    );
    for (seat, want) in [("a", 200), ("b", 200), ("c", 200), ("d", 429)] {
        assert_eq!(app.activate("acme", seat).await.0, want, "seat {seat}");
    }
    let page = get(&http, &app, "/portal/e/acme?saved=1", Some(&manager)).await;
    assert!(page.body.contains("Your change was saved"));
    // Emptied: the customer's ceiling is gone again.
    let (status, _) = post(manager, vec![("csrf", mine), ("seats", "".into())]).await;
    assert_eq!(status, 303);
    let (_, e) = app.get("acme").await;
    assert!(e["config"]["seats"]["customer_cap"].is_null(), "{e}");
    assert_eq!(e["config"]["features"]["api"]["customer_cap"], 12, "{e}");
    app.stop().await;
}

/// Signs in to the console with a token through the form: the session
/// cookie (`headroom_console=…`).
async fn sign_in(http: &reqwest::Client, app: &TestApp, token: &str) -> Answer {
    fetch(
        http,
        app,
        Method::POST,
        "/console/login",
        None,
        Some(&[("token", token)]),
    )
    .await
}

fn console_cookie(a: &Answer) -> String {
    format!(
        "headroom_console={}",
        a.cookie("headroom_console").expect("a console cookie")
    )
}

#[actix_rt::test]
async fn the_console_signs_in_with_an_admin_token_or_a_console_link() {
    let redis = RedisServer::start();
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let mut settings = pages(KEY_1);
    settings.login_rate = 3;
    let app = app_on(redis_store(&redis, "console"), &clock, settings).await;
    let http = browser();

    // Not signed in: every console page leads to the form.
    for path in [
        "/console",
        "/console/denied",
        "/console/overdraft.csv",
        "/console/e/acme",
    ] {
        let a = get(&http, &app, path, None).await;
        assert_eq!(a.status, 303, "{path}");
        assert_eq!(a.header("location"), "/console/login", "{path}");
    }
    let form = get(&http, &app, "/console/login", None).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains(r#"type="password""#));

    assert_eq!(
        sign_in(&http, &app, CLIENT).await.status,
        401,
        "a client token"
    );
    assert_eq!(sign_in(&http, &app, "nonsense").await.status, 401);
    let ok = sign_in(&http, &app, ADMIN).await;
    assert_eq!(ok.status, 303);
    assert_eq!(ok.header("location"), "/console");
    let set = ok.set_cookie();
    assert!(
        set.contains("HttpOnly") && set.contains("Path=/console") && set.contains("Max-Age=43200"),
        "{set}"
    );
    let session = console_cookie(&ok);
    let page = get(&http, &app, "/console", Some(&session)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("In overdraft now"));
    // The console's cookie opens no API route.
    assert_eq!(
        get(&http, &app, "/v1/reports/overdraft", Some(&session))
            .await
            .status,
        401
    );

    // Rate-limited per address: 3 a minute, the 4th is refused.
    let limited = sign_in(&http, &app, ADMIN).await;
    assert_eq!(limited.status, 429, "{}", limited.body);

    // Signing out needs the form's CSRF token.
    let csrf = csrf_of(&page.body);
    let out = fetch(
        &http,
        &app,
        Method::POST,
        "/console/logout",
        Some(&session),
        Some(&[("csrf", "x")]),
    )
    .await;
    assert_eq!(out.status, 403);
    let out = fetch(
        &http,
        &app,
        Method::POST,
        "/console/logout",
        Some(&session),
        Some(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(out.status, 303);
    assert!(
        out.set_cookie().contains("headroom_console=;"),
        "{}",
        out.set_cookie()
    );
    app.stop().await;

    // A console link (fresh app: a fresh allowance), valid until it
    // expires, and only while its admin token is configured.
    let app = app_on(redis_store(&redis, "console"), &clock, pages(KEY_1)).await;
    let (status, body) = app
        .send(
            Method::POST,
            "/v1/console-links",
            Some(ADMIN),
            Some(r#"{"ttl_seconds": 600}"#),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expires_at"], "2026-11-02T10:10:00Z");
    let url = body["url"].as_str().expect("url").to_string();
    assert!(url.starts_with("/console/login?token="), "{url}");
    let opened = get(&http, &app, &url, None).await;
    assert_eq!(opened.status, 303, "{}", opened.body);
    let session = console_cookie(&opened);
    assert_eq!(
        get(&http, &app, "/console", Some(&session)).await.status,
        200
    );
    // A portal link is no console link.
    app.put("acme", CONFIG).await;
    let portal = link(&app, "acme", "manage").await;
    let token = portal.split("token=").nth(1).expect("token");
    assert_eq!(
        get(&http, &app, &format!("/console/login?token={token}"), None)
            .await
            .status,
        401
    );
    app.stop().await;
    let rotated = TestApp::spawn_with(
        redis_store(&redis, "console"),
        AppOptions {
            clock: clock.clone(),
            pages: pages(KEY_1),
            auth: tokens(&["another-admin-token"], &[CLIENT]),
            ..AppOptions::default()
        },
    )
    .await;
    let a = get(&http, &rotated, "/console", Some(&session)).await;
    assert_eq!(a.status, 303, "the admin token that signed in is gone");
    assert_eq!(get(&http, &rotated, &url, None).await.status, 401);
    rotated.stop().await;
    clock.advance(Duration::minutes(10));
    let app = app_on(redis_store(&redis, "console"), &clock, pages(KEY_1)).await;
    assert_eq!(get(&http, &app, &url, None).await.status, 401, "expired");
    assert_eq!(
        get(&http, &app, "/console", Some(&session)).await.status,
        200,
        "the session lasts 12 h"
    );
    app.stop().await;
}

/// The entitlement ids of a console list, in the order shown.
fn listed(page: &str) -> Vec<String> {
    let table = page.split("<tbody>").nth(1).expect("a table");
    let table = table.split("</tbody>").next().expect("its end");
    table
        .split(r#"<a href="/console/e/"#)
        .skip(1)
        .map(|s| s.split('"').next().expect("id").to_string())
        .collect()
}

#[actix_rt::test]
async fn the_console_sorts_the_overdraft_list_finds_entitlements_and_mints_links() {
    let redis = RedisServer::start();
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let app = app_on(redis_store(&redis, "sorted"), &clock, pages(KEY_1)).await;
    let http = browser();
    // a: in overdraft first, seat peak 3, no denials; b: second, peak 2,
    // one denial; c: last, peak 4, two denials (one seat, one usage).
    app.put("a", r#"{"seats": {"purchased": 1, "hard_cap": 3}}"#)
        .await;
    for s in ["1", "2", "3"] {
        assert_eq!(app.activate("a", s).await.0, 200);
    }
    clock.advance(Duration::minutes(5));
    app.put("b", r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
        .await;
    for (s, want) in [("1", 200), ("2", 200), ("3", 429)] {
        assert_eq!(app.activate("b", s).await.0, want);
    }
    clock.advance(Duration::minutes(5));
    app.put(
        "c",
        r#"{"seats": {"purchased": 1, "hard_cap": 4}, "features": {"api": {"included": 1, "hard_cap": 2}}}"#,
    )
    .await;
    for (s, want) in [("1", 200), ("2", 200), ("3", 200), ("4", 200), ("5", 429)] {
        assert_eq!(app.activate("c", s).await.0, want);
    }
    assert_eq!(
        app.usage("c", r#"{"feature": "api", "amount": 3}"#).await.0,
        429
    );
    app.put("quiet", r#"{"seats": {"purchased": 5}}"#).await;
    let session = console_cookie(&sign_in(&http, &app, ADMIN).await);

    for (sort, want) in [
        ("", ["a", "b", "c"]),
        ("since", ["a", "b", "c"]),
        ("peak", ["c", "a", "b"]),
        ("denials", ["c", "b", "a"]),
        ("id", ["a", "b", "c"]),
    ] {
        let page = get(
            &http,
            &app,
            &format!("/console?sort={sort}"),
            Some(&session),
        )
        .await;
        assert_eq!(page.status, 200, "{sort}: {}", page.body);
        assert_eq!(listed(&page.body), want, "sort={sort}");
    }
    for bad in ["/console?sort=colour", "/console?page=0", "/console?page=x"] {
        assert_eq!(
            get(&http, &app, bad, Some(&session)).await.status,
            400,
            "{bad}"
        );
    }
    let denied = get(&http, &app, "/console/denied", Some(&session)).await;
    assert_eq!(listed(&denied.body), ["c", "b"], "most recent denial first");

    // Search: to the entitlement's page; unknown or malformed ids say so.
    let found = get(&http, &app, "/console/search?id=b", Some(&session)).await;
    assert_eq!(found.status, 303);
    assert_eq!(found.header("location"), "/console/e/b");
    let unknown = get(&http, &app, "/console/search?id=nobody", Some(&session)).await;
    assert_eq!(unknown.header("location"), "/console/e/nobody");
    let page = get(&http, &app, "/console/e/nobody", Some(&session)).await;
    assert_eq!(page.status, 404);
    assert_eq!(
        get(&http, &app, "/console/search?id=no%20way", Some(&session))
            .await
            .status,
        400
    );

    // The entitlement's page mints a link (with the form's CSRF token) that
    // opens the customer's page.
    let page = get(&http, &app, "/console/e/c", Some(&session)).await;
    assert_eq!(page.status, 200);
    let config = page
        .body
        .split(r#"<pre class="config">"#)
        .nth(1)
        .expect("the configuration");
    assert!(
        config.contains("hard_cap") && config.contains(": 4,"),
        "{config}"
    );
    let csrf = csrf_of(&page.body);
    let refused = fetch(
        &http,
        &app,
        Method::POST,
        "/console/e/c/portal-links",
        Some(&session),
        Some(&[("scope", "view")]),
    )
    .await;
    assert_eq!(refused.status, 403);
    let minted = fetch(
        &http,
        &app,
        Method::POST,
        "/console/e/c/portal-links",
        Some(&session),
        Some(&[("csrf", &csrf), ("scope", "manage"), ("hours", "2")]),
    )
    .await;
    assert_eq!(minted.status, 200, "{}", minted.body);
    assert!(
        minted.body.contains("valid until 2026-11-02 12:10 UTC"),
        "{}",
        minted.body
    );
    let at = minted.body.find(r#"data-minted=""#).expect("the link") + 13;
    let url = minted.body[at..]
        .split('"')
        .next()
        .expect("url")
        .replace("&amp;", "&");
    let customer = open(&http, &app, &url).await;
    let portal = get(&http, &app, "/portal/e/c", Some(&customer)).await;
    assert!(portal.body.contains("Your own caps"), "a manage link");
    let revoked = fetch(
        &http,
        &app,
        Method::POST,
        "/console/e/c/revoke-links",
        Some(&session),
        Some(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(revoked.status, 200);
    assert_eq!(
        get(&http, &app, "/portal/e/c", Some(&customer))
            .await
            .status,
        401
    );
    app.stop().await;
}

#[actix_rt::test]
async fn the_console_pages_and_exports_ten_thousand_entitlements_in_overdraft() {
    const N: usize = 10_000;
    let redis = RedisServer::start();
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let app = app_on(redis_store(&redis, "many"), &clock, pages(KEY_1)).await;
    let http = browser();
    let id = |i: usize| format!("e{i:05}");
    let config = r#"{"seats": {"purchased": 1, "hard_cap": 2}, "features": {"api": {"included": 10, "hard_cap": 20}}}"#;
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let puts = chunk.iter().map(|i| {
            let id = id(*i);
            let app = &app;
            async move { app.put(&id, config).await.0 }
        });
        for status in futures_util::future::join_all(puts).await {
            assert_eq!(status, 201);
        }
    }
    let events: Vec<Value> = (0..N)
        .map(|i| serde_json::json!({"entitlement": id(i), "feature": "api", "amount": 11 + i % 5}))
        .collect();
    let (status, body) = app
        .send(
            Method::POST,
            "/v1/usage/batch",
            Some(CLIENT),
            Some(&serde_json::json!({ "events": events }).to_string()),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        body["results"]
            .as_array()
            .expect("results")
            .iter()
            .all(|r| r["outcome"] == "overdraft")
    );
    let session = console_cookie(&sign_in(&http, &app, ADMIN).await);

    // Paged, 50 a page, in id order.
    let page = get(&http, &app, "/console?sort=id&page=2", Some(&session)).await;
    assert!(
        page.body
            .contains(r#"<span data-figure="total">10000</span>"#)
    );
    let ids = listed(&page.body);
    assert_eq!(ids.len(), 50);
    assert_eq!(ids.first().map(String::as_str), Some("e00050"));
    assert_eq!(ids.last().map(String::as_str), Some("e00099"));
    let last = get(&http, &app, "/console?sort=id&page=200", Some(&session)).await;
    assert_eq!(
        listed(&last.body).last().map(String::as_str),
        Some("e09999")
    );
    assert!(!last.body.contains(r#"rel="next""#));
    assert!(
        listed(
            &get(&http, &app, "/console?page=201", Some(&session))
                .await
                .body
        )
        .is_empty()
    );

    // The CSV: a header, then each entitlement's seats and its feature.
    let csv = get(&http, &app, "/console/overdraft.csv", Some(&session)).await;
    assert_eq!(csv.status, 200);
    assert_eq!(csv.header("content-type"), "text/csv; charset=utf-8");
    assert_eq!(
        csv.header("transfer-encoding"),
        "chunked",
        "streamed, not built whole"
    );
    assert!(csv.header("content-disposition").contains("overdraft.csv"));
    let lines: Vec<&str> = csv.body.lines().collect();
    assert_eq!(lines.len(), 1 + 2 * N);
    assert_eq!(
        lines[0],
        "entitlement,kind,feature,in_overdraft,overdraft_since,current,purchased_or_included,\
         hard_cap,peak,denied_since_overdraft_or_this_period,denied_total,period_start,period_end"
    );
    for i in 0..N {
        let used = 11 + i % 5;
        assert_eq!(
            lines[1 + 2 * i],
            format!("{},seats,,false,,0,1,2,0,0,0,,", id(i))
        );
        assert_eq!(
            lines[2 + 2 * i],
            format!(
                "{},feature,api,true,2026-11-02T10:00:00.000Z,{used},10,20,{used},0,0,,",
                id(i)
            )
        );
    }
    app.stop().await;
}

#[actix_rt::test]
async fn the_history_export_has_a_row_per_bucket() {
    let redis = RedisServer::start();
    // Yesterday: Redis expires hourly buckets 35 days after their hour by
    // its own clock, so a fixed date would be gone once it is that old.
    let day = (chrono::Utc::now() - Duration::days(1)).format("%Y-%m-%d");
    let clock = manual_clock(&format!("{day}T10:30:00Z"));
    let app = app_on(redis_store(&redis, "hcsv"), &clock, pages(KEY_1)).await;
    let http = browser();
    app.put("acme", CONFIG).await;
    for s in ["a", "b", "c"] {
        assert_eq!(app.activate("acme", s).await.0, 200);
    }
    clock.set(format!("{day}T12:15:00Z").parse().expect("time"));
    assert_eq!(
        app.usage("acme", r#"{"feature": "api", "amount": 7}"#)
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
    let session = console_cookie(&sign_in(&http, &app, ADMIN).await);
    let csv = get(
        &http,
        &app,
        &format!("/console/e/acme/history.csv?bucket=hour&from={day}T09:00:00Z&to={day}T13:00:00Z"),
        Some(&session),
    )
    .await;
    assert_eq!(csv.status, 200, "{}", csv.body);
    assert_eq!(
        csv.body,
        format!(
            "bucket_start,bucket_end,seats_peak,seats_denied,api_used,api_denied\n\
             {day}T09:00:00.000Z,{day}T10:00:00.000Z,0,0,0,0\n\
             {day}T10:00:00.000Z,{day}T11:00:00.000Z,3,0,0,0\n\
             {day}T11:00:00.000Z,{day}T12:00:00.000Z,3,0,0,0\n\
             {day}T12:00:00.000Z,{day}T13:00:00.000Z,3,0,7,1\n"
        )
    );
    for bad in [
        "/console/e/acme/history.csv?bucket=week",
        "/console/e/acme/history.csv?from=yesterday",
        "/console/e/acme/history.csv?from=2026-11-03T00:00:00Z&to=2026-11-02T00:00:00Z",
    ] {
        assert_eq!(
            get(&http, &app, bad, Some(&session)).await.status,
            400,
            "{bad}"
        );
    }
    assert_eq!(
        get(&http, &app, "/console/e/nobody/history.csv", Some(&session))
            .await
            .status,
        404
    );
    app.stop().await;
}

#[actix_rt::test]
async fn bad_page_requests_get_a_4xx_page_and_change_nothing() {
    let clock = manual_clock("2026-11-02T10:00:00Z");
    let app = app_on(memory_store(), &clock, pages(KEY_1)).await;
    let http = browser();
    app.put("acme", CONFIG).await;
    let session = open(&http, &app, &link(&app, "acme", "manage").await).await;
    let console = console_cookie(&sign_in(&http, &app, ADMIN).await);
    let long = "x".repeat(6000);
    for (method, path, cookie, want) in [
        (
            Method::GET,
            "/portal/e/acme?range=5y".to_string(),
            Some(&session),
            400,
        ),
        (Method::GET, "/portal/e/acme?token=".to_string(), None, 401),
        (
            Method::GET,
            "/portal/e/acme?token=a.b.c".to_string(),
            None,
            401,
        ),
        (
            Method::GET,
            format!("/portal/e/acme?token={long}"),
            None,
            401,
        ),
        (
            Method::GET,
            "/portal/e/no%20such".to_string(),
            Some(&session),
            404,
        ),
        (Method::GET, "/portal/e/".to_string(), None, 404),
        (Method::GET, "/portal/anything".to_string(), None, 404),
        (
            Method::PUT,
            "/portal/e/acme".to_string(),
            Some(&session),
            405,
        ),
        (
            Method::POST,
            "/portal/e/acme/customer-cap".to_string(),
            Some(&session),
            400,
        ),
        (Method::POST, "/console/login".to_string(), None, 400),
        (
            Method::GET,
            "/console?page=99999999999999999999".to_string(),
            Some(&console),
            400,
        ),
        (
            Method::GET,
            "/console/denied?hours=0".to_string(),
            Some(&console),
            400,
        ),
        (
            Method::GET,
            "/console/denied?after=garbage".to_string(),
            Some(&console),
            400,
        ),
        (
            Method::GET,
            "/console/search?id=".to_string(),
            Some(&console),
            400,
        ),
        (
            Method::GET,
            "/console/e/acme?range=forever".to_string(),
            Some(&console),
            400,
        ),
        (
            Method::POST,
            "/console/e/acme/portal-links".to_string(),
            Some(&console),
            400,
        ),
        (
            Method::GET,
            "/assets/0000/uPlot.min.css".to_string(),
            None,
            404,
        ),
        (
            Method::GET,
            "/assets/0000/../../Cargo.toml".to_string(),
            None,
            404,
        ),
    ] {
        let a = fetch(
            &http,
            &app,
            method.clone(),
            &path,
            cookie.map(String::as_str),
            None,
        )
        .await;
        assert_eq!(
            a.status,
            want,
            "{method} {}: {}",
            &path[..path.len().min(80)],
            a.body
        );
    }
    let (_, e) = app.get("acme").await;
    assert!(e["config"]["seats"]["customer_cap"].is_null(), "{e}");
    app.stop().await;
}
