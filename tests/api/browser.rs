//! The pages in a real browser: Debian's Chromium, headless, loads the
//! customer's page and the console from a tracker on a real Redis with a
//! scripted history, and the tests read what the page's script plotted
//! (each chart's `data-plotted`, written after uPlot drew it) against the
//! API's history, check that no script error or content-security-policy
//! violation happened, and save screenshots (`target/screenshots/`, and
//! the README's `docs/screenshots/`). With JavaScript off, the same
//! numbers are in the tables.

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use scraper::{Html, Selector};
use serde_json::Value;

use crate::helpers::*;
use crate::pages::{KEY_1, app_on, link, pages};
use headroom::engine::Clock;

const CHROMIUM: &str = "chromium";

/// What Chromium printed and the page it ended on.
struct Loaded {
    dom: String,
    log: String,
}

fn chromium(args: &[&str], url: &str) -> Loaded {
    let out = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!("{CHROMIUM} could not run ({e}); `.ci/run` installs Debian's chromium")
        });
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Loaded {
        dom: String::from_utf8_lossy(&out.stdout).into_owned(),
        log: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Loads `url` with scripts on and checks nothing went wrong in the page:
/// no console message at all (script errors and CSP violations are
/// logged there) and no error recorded by the page's own script.
fn load(url: &str) -> Html {
    let loaded = chromium(&["--dump-dom", "--window-size=1100,2600"], url);
    let console: Vec<&str> = loaded
        .log
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .collect();
    assert!(console.is_empty(), "the page logged: {console:#?}");
    let dom = Html::parse_document(&loaded.dom);
    let html = dom
        .select(&Selector::parse("html").expect("selector"))
        .next()
        .expect("html");
    assert_eq!(
        html.value().attr("data-errors"),
        None,
        "errors recorded by the page"
    );
    dom
}

/// Loads `url` in Chromium with scripts disabled, driven through the
/// DevTools protocol (`--dump-dom` needs scripts to serialise the page):
/// the page as the browser parsed it.
fn without_scripts(url: &str) -> String {
    use std::io::{BufRead, BufReader};
    use tungstenite::Message;
    let profile = tempfile::tempdir().expect("a profile directory");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chromium");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let ws = stderr
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split("DevTools listening on ").nth(1).map(str::to_string))
        .expect("the DevTools address");
    let (mut socket, _) = tungstenite::connect(ws.trim()).expect("DevTools");
    let mut next_id = 0u64;
    // Sends one command and waits for its answer, skipping events, or
    // until an event named `until` arrives (then its params).
    let mut call = |method: &str, params: Value, session: Option<&str>, until: Option<&str>| {
        next_id += 1;
        let mut msg = serde_json::json!({"id": next_id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        socket.send(Message::text(msg.to_string())).expect("send");
        let mut answered = None;
        loop {
            let Message::Text(text) = socket.read().expect("read") else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).expect("JSON");
            if v["id"] == next_id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                answered = Some(v["result"].clone());
                if until.is_none() {
                    return v["result"].clone();
                }
            }
            if until.is_some_and(|e| v["method"] == e) && answered.is_some() {
                return v["params"].clone();
            }
        }
    };
    let target = call(
        "Target.createTarget",
        serde_json::json!({"url": "about:blank"}),
        None,
        None,
    );
    let attached = call(
        "Target.attachToTarget",
        serde_json::json!({"targetId": target["targetId"], "flatten": true}),
        None,
        None,
    );
    let session = attached["sessionId"].as_str().expect("session").to_string();
    let s = Some(session.as_str());
    call(
        "Emulation.setScriptExecutionDisabled",
        serde_json::json!({"value": true}),
        s,
        None,
    );
    call("Page.enable", serde_json::json!({}), s, None);
    call(
        "Page.navigate",
        serde_json::json!({"url": url}),
        s,
        Some("Page.loadEventFired"),
    );
    let doc = call("DOM.getDocument", serde_json::json!({"depth": -1}), s, None);
    let html = call(
        "DOM.getOuterHTML",
        serde_json::json!({"nodeId": doc["root"]["nodeId"]}),
        s,
        None,
    );
    let _ = child.kill();
    let _ = child.wait();
    html["outerHTML"].as_str().expect("outerHTML").to_string()
}

/// Saves a screenshot under `target/screenshots/` and `docs/screenshots/`.
fn screenshot(url: &str, name: &str, height: u32) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target: PathBuf = root.join("target/screenshots");
    std::fs::create_dir_all(&target).expect("target/screenshots");
    let file = target.join(name);
    let size = format!("--window-size=1100,{height}");
    let shot = format!("--screenshot={}", file.display());
    let loaded = chromium(&[&shot, &size], url);
    assert!(file.exists(), "no screenshot: {}", loaded.log);
    std::fs::copy(&file, root.join("docs/screenshots").join(name)).expect("docs/screenshots");
}

fn attr<'a>(dom: &'a Html, selector: &str, name: &str) -> &'a str {
    dom.select(&Selector::parse(selector).expect("selector"))
        .next()
        .unwrap_or_else(|| panic!("no {selector}"))
        .value()
        .attr(name)
        .unwrap_or_else(|| panic!("{selector} has no {name}"))
}

fn plotted(dom: &Html, selector: &str) -> Value {
    assert_eq!(
        attr(dom, selector, "data-drawn"),
        "true",
        "{selector} drawn"
    );
    serde_json::from_str(attr(dom, selector, "data-plotted")).expect("plotted JSON")
}

fn numbers(values: impl Iterator<Item = u64>) -> Value {
    Value::from(values.collect::<Vec<_>>())
}

/// The scripted day: the day before yesterday (UTC), so that its 30 hours
/// end before now and its hourly buckets are inside Redis's retention (a
/// fixed date's would expire 35 days on, by Redis's own clock).
fn script_day() -> DateTime<Utc> {
    use chrono::DurationRound;
    (Utc::now() - Duration::days(2))
        .duration_trunc(Duration::days(1))
        .expect("truncate")
}

/// The scripted customer: 100 seats purchased, a hard cap of 120; 117 in
/// use at 08:10, 120 at 09:10 and the 121st denied, 110 from 09:40; `api_calls` (1,000 a
/// day, cap 1,200, thresholds 50/80/100 %) crossing each threshold, going
/// into overdraft and denied once; the next day opens a new period, so the
/// first is closed.
async fn scripted(app: &TestApp, clock: &headroom::engine::ManualClock, day: DateTime<Utc>) {
    let at = |h: i64, m: i64| clock.set(day + Duration::hours(h) + Duration::minutes(m));
    at(7, 0);
    let (status, body) = app
        .put(
            "acme",
            r#"{"seats": {"purchased": 100, "hard_cap": 120},
                "features": {"api_calls": {"included": 1000, "hard_cap": 1200,
                             "period": "day", "thresholds": [50, 80, 100]}}}"#,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    at(8, 10);
    for s in 1..=117 {
        assert_eq!(app.activate("acme", &format!("s{s}")).await.0, 200);
    }
    at(9, 10);
    for s in 118..=120 {
        assert_eq!(app.activate("acme", &format!("s{s}")).await.0, 200);
    }
    assert_eq!(app.activate("acme", "s121").await.0, 429, "the 121st");
    at(9, 40);
    for s in 111..=120 {
        assert_eq!(app.release("acme", &format!("s{s}")).await.0, 200);
    }
    for (h, amount, want) in [
        (10, 600, 200),
        (11, 300, 200),
        (12, 200, 200),
        (13, 150, 429),
    ] {
        at(h, 30);
        let body = format!(r#"{{"feature": "api_calls", "amount": {amount}}}"#);
        assert_eq!(app.usage("acme", &body).await.0, want, "{amount} at {h}:30");
    }
    at(26, 0);
    let body = r#"{"feature": "api_calls", "amount": 40}"#;
    assert_eq!(
        app.usage("acme", body).await.0,
        200,
        "the next day's period"
    );
    at(30, 0);
}

#[actix_rt::test]
async fn the_customers_page_draws_the_apis_numbers_in_chromium() {
    let redis = RedisServer::start();
    let day = script_day();
    let clock = manual_clock(&day.to_rfc3339());
    let app = app_on(redis_store(&redis, "browser"), &clock, pages(KEY_1)).await;
    scripted(&app, &clock, day).await;
    // What the page should show: the API's history of the last 24 hours.
    let now = clock.now();
    let from = (now - Duration::hours(24)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let to = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, history) = app
        .send(
            Method::GET,
            &format!("/v1/entitlements/acme/history?bucket=hour&from={from}&to={to}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 200, "{history}");
    let buckets = history["buckets"].as_array().expect("buckets");
    let peaks = numbers(
        buckets
            .iter()
            .map(|b| b["seats"]["peak"].as_u64().expect("peak")),
    );
    let seat_denials = numbers(
        buckets
            .iter()
            .map(|b| b["seats"]["denied"].as_u64().expect("denied")),
    );
    let feature = |field: &str| {
        numbers(
            buckets
                .iter()
                .map(|b| b["features"]["api_calls"][field].as_u64().unwrap_or(0)),
        )
    };
    let peaks_list: Vec<u64> = serde_json::from_value(peaks.clone()).expect("peaks");
    assert!(
        peaks_list.windows(2).any(|w| w == [117, 120]),
        "117 one hour and 120 the next: {peaks_list:?}"
    );

    let url = app.url(&format!("{}&range=24h", link(&app, "acme", "view").await));
    let dom = load(&url);
    let seats = plotted(&dom, r#"figure[data-chart="seats"]"#);
    assert_eq!(seats["peak"], peaks, "peak seats as the API has them");
    let n = buckets.len();
    assert_eq!(seats["purchased"], numbers(std::iter::repeat_n(100, n)));
    assert_eq!(seats["cap"], numbers(std::iter::repeat_n(120, n)));
    let denials = plotted(&dom, r#"figure[data-chart="seat_denials"]"#);
    assert_eq!(denials["denied"], seat_denials);
    assert_eq!(
        seat_denials
            .as_array()
            .map(|d| d.iter().filter_map(Value::as_u64).sum::<u64>()),
        Some(1)
    );
    let api = plotted(
        &dom,
        r#"figure[data-chart="feature"][data-feature="api_calls"]"#,
    );
    assert_eq!(api["used"], feature("added"));
    assert_eq!(api["denied"], feature("denied"));
    // The figures of now and the closed period.
    let figure = |item: &str, name: &str| {
        dom.select(
            &Selector::parse(&format!(r#"[data-item="{item}"] [data-figure="{name}"]"#))
                .expect("selector"),
        )
        .next()
        .map(|e| e.text().collect::<String>())
        .unwrap_or_else(|| panic!("no figure {item} {name}"))
    };
    assert_eq!(figure("seats", "in_use"), "110");
    assert_eq!(figure("seats", "purchased"), "100");
    assert_eq!(figure("seats", "hard_cap"), "120");
    assert_eq!(figure("seats", "denied_total"), "1");
    assert_eq!(figure("feature", "used"), "40");
    let period_row: Vec<String> = dom
        .select(&Selector::parse(r#"table[data-table="periods"] tbody tr td"#).expect("selector"))
        .map(|e| e.text().collect())
        .collect();
    assert_eq!(
        period_row,
        [
            "api_calls",
            &day.format("%Y-%m-%d 00:00 UTC").to_string(),
            &(day + Duration::days(1))
                .format("%Y-%m-%d 00:00 UTC")
                .to_string(),
            "1100",
            "1000",
            "100",
            "1100",
            "1"
        ],
        "the closed period"
    );
    screenshot(&url, "portal.png", 2300);

    // Without JavaScript: no chart, the same numbers in the tables.
    let dom = Html::parse_document(&without_scripts(&url));
    assert!(
        dom.select(&Selector::parse("[data-drawn]").expect("selector"))
            .next()
            .is_none(),
        "no script ran"
    );
    let column = |chart: &str, col: usize| {
        let rows = Selector::parse(&format!(
            r#"figure[data-chart="{chart}"] + details.numbers tbody tr"#
        ))
        .expect("selector");
        let cell = Selector::parse("td").expect("selector");
        numbers(dom.select(&rows).map(|r| {
            r.select(&cell)
                .nth(col)
                .expect("cell")
                .text()
                .collect::<String>()
                .parse::<u64>()
                .expect("a number")
        }))
    };
    assert_eq!(column("seats", 1), peaks);
    assert_eq!(column("seats", 2), numbers(std::iter::repeat_n(100, n)));
    assert_eq!(column("seat_denials", 1), seat_denials);
    assert_eq!(column("feature", 1), feature("added"));
    assert_eq!(column("feature", 2), feature("denied"));
    app.stop().await;
}

#[actix_rt::test]
async fn the_console_lists_and_shows_the_customer_in_chromium() {
    let redis = RedisServer::start();
    let day = script_day();
    let clock = manual_clock(&day.to_rfc3339());
    let app = app_on(redis_store(&redis, "console-browser"), &clock, pages(KEY_1)).await;
    scripted(&app, &clock, day).await;
    // A second customer in overdraft, so the list has two rows.
    app.put("globex", r#"{"seats": {"purchased": 1, "hard_cap": 3}}"#)
        .await;
    for s in ["a", "b"] {
        assert_eq!(app.activate("globex", s).await.0, 200);
    }
    let console_link = || async {
        let (status, body) = app
            .send(Method::POST, "/v1/console-links", Some(ADMIN), Some("{}"))
            .await;
        assert_eq!(status, 201, "{body}");
        app.url(body["url"].as_str().expect("url"))
    };

    let url = console_link().await;
    let dom = load(&url);
    let rows: Vec<String> = dom
        .select(
            &Selector::parse(r#"table[data-table="overdraft"] tbody tr td:nth-child(2)"#)
                .expect("selector"),
        )
        .map(|e| e.text().collect())
        .collect();
    assert_eq!(rows, ["acme", "globex"], "in overdraft, longest first");
    screenshot(&console_link().await, "console.png", 900);

    let url = format!("{}&next=/console/e/acme?range=24h", console_link().await);
    let dom = load(&url);
    let seats = plotted(&dom, r#"figure[data-chart="seats"]"#);
    assert!(
        seats["peak"]
            .as_array()
            .is_some_and(|p| p.iter().any(|v| v == 120)),
        "{seats}"
    );
    assert!(attr(&dom, "pre.config", "class") == "config");
    screenshot(&url, "console-entitlement.png", 2600);
    app.stop().await;
}

/// `/docs` in Chromium: Swagger UI (embedded, nothing from a CDN) reads
/// this server's `/openapi.json` and lists every operation of it, with no
/// script error or content-security-policy violation.
#[actix_rt::test]
async fn the_docs_page_lists_every_operation_in_chromium() {
    let tracker = TrackerProcess::start_in_memory().await;
    let doc: Value = serde_json::from_str(
        &headroom::http::openapi::document_json().expect("the document encodes"),
    )
    .expect("JSON");
    let mut operations: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("path item").keys();
            methods
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    operations.sort();

    let url = format!("{}/docs", tracker.base);
    let dom = load(&url);
    let title = dom
        .select(&Selector::parse("title").expect("selector"))
        .next()
        .map(|t| t.text().collect::<String>());
    assert_eq!(title.as_deref(), Some("headroom API"));
    let mut shown: Vec<String> = dom
        .select(&Selector::parse(".opblock-summary").expect("selector"))
        .map(|op| {
            let part = |s: &str| {
                op.select(&Selector::parse(s).expect("selector"))
                    .next()
                    .map(|e| {
                        e.value()
                            .attr("data-path")
                            .map_or_else(|| e.text().collect(), str::to_string)
                    })
                    .unwrap_or_default()
            };
            format!(
                "{} {}",
                part(".opblock-summary-method"),
                part(".opblock-summary-path")
            )
        })
        .collect();
    shown.sort();
    assert_eq!(shown, operations, "the operations Swagger UI lists");
    screenshot(&url, "docs.png", 900);
}
