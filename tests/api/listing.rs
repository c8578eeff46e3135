//! `GET /v1/entitlements` (every configured entitlement, paged) and
//! `GET /v1/events` (the event streams read through the tracker), on a
//! real redis-server, on the shared cluster (tests/api/cluster.rs) and on
//! the embedded store.

use std::collections::{BTreeSet, HashMap};

use futures_util::future::join_all;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

/// Every page of `path` (a query with `limit`), following `next_cursor`:
/// the items' `field`s in order.
async fn all_pages(app: &TestApp, path: &str, field: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_string(),
        };
        let (status, body) = app.send(Method::GET, &url, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{url}: {body}");
        for item in body["items"].as_array().expect("items") {
            out.push(item[field].as_str().expect("field").to_string());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("{path} never ended");
}

#[actix_rt::test]
async fn the_list_holds_every_configured_entitlement_once_in_id_order() {
    the_list_holds_every_configured_entitlement_once_in_id_order_on(&RedisServer::start()).await;
    let app = TestApp::spawn(memory_store()).await;
    list_scenario(&app).await;
    app.stop().await;
}

pub(crate) async fn the_list_holds_every_configured_entitlement_once_in_id_order_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("list")).await;
    list_scenario(&app).await;
    app.stop().await;
    // What was acknowledged is listed by a process that starts afresh.
    let app = TestApp::spawn(redis.store("list")).await;
    let listed = all_pages(&app, "/v1/entitlements?limit=1000", "id").await;
    assert_eq!(listed.len(), 200);
    app.stop().await;
}

/// 230 entitlements created (spread over every bucket), 30 deleted, one
/// used: paged with several page sizes, the list is exactly the other 200,
/// in id order, each as `GET /v1/entitlements/{id}` shows it.
async fn list_scenario(app: &TestApp) {
    let ids: Vec<String> = (0..230).map(|i| format!("list-{i:03}")).collect();
    join_all(ids.iter().map(|id| async move {
        let (status, body) = app
            .put(id, r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
            .await;
        assert_eq!(status, 201, "{body}");
    }))
    .await;
    for id in ids.iter().skip(200) {
        let (status, _) = app
            .send(
                Method::DELETE,
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(status, 204);
    }
    assert_eq!(app.activate("list-007", "ann").await.0, 200);
    let expected: Vec<String> = ids[..200].to_vec();
    for limit in [1, 7, 64, 1000] {
        let listed = all_pages(app, &format!("/v1/entitlements?limit={limit}"), "id").await;
        assert_eq!(listed, expected, "limit {limit}");
    }
    let (_, first) = app.read("/v1/entitlements?limit=10", ADMIN).await;
    let (_, one) = app.get("list-007").await;
    assert_eq!(
        first["items"][7], one,
        "a listed entitlement as GET shows it"
    );
    assert_eq!(first["items"][7]["seats"]["in_use"], 1);
    // Bad input changes nothing and says which parameter.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=%21%21", "cursor"),
        ("cursor=bzphY21l", "cursor"),
    ] {
        let (status, body) = app.read(&format!("/v1/entitlements?{query}"), ADMIN).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    assert_eq!(app.read("/v1/entitlements", CLIENT).await.0, 403);
}

/// Follows `GET /v1/events` from `cursor` with `query` until a page comes
/// back empty: the events' ids in order and the cursor to go on from.
async fn read_events(app: &TestApp, query: &str, mut cursor: String) -> (Vec<Value>, String) {
    let mut events = Vec::new();
    for _ in 0..100_000 {
        let path = format!("/v1/events?cursor={cursor}{query}");
        let (status, body) = app.send(Method::GET, &path, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{path}: {body}");
        cursor = body["next_cursor"].as_str().expect("cursor").to_string();
        let page = body["events"].as_array().expect("events");
        if page.is_empty() {
            return (events, cursor);
        }
        events.extend(page.iter().cloned());
    }
    panic!("the stream never ended");
}

fn event_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

#[actix_rt::test]
async fn the_event_stream_reads_every_event_once_while_it_is_written() {
    the_event_stream_reads_every_event_once_while_it_is_written_on(&RedisServer::start()).await;
    let app = TestApp::spawn(memory_store()).await;
    events_scenario(&app).await;
    app.stop().await;
}

pub(crate) async fn the_event_stream_reads_every_event_once_while_it_is_written_on(
    redis: &impl TestRedis,
) {
    let app = TestApp::spawn(redis.store("tail")).await;
    events_scenario(&app).await;
    app.stop().await;
    // The reader saw what the stream holds, in each entitlement's order.
    let stored: Vec<String> = redis
        .stream("tail")
        .iter()
        .map(|(_, _, e)| e["id"].as_str().expect("id").to_string())
        .collect();
    let app = TestApp::spawn(redis.store("tail")).await;
    let (all, _) = read_events(&app, "&limit=1000", "0-0".into()).await;
    let mut read = event_ids(&all);
    let mut stored_sorted = stored;
    read.sort();
    stored_sorted.sort();
    assert_eq!(read, stored_sorted, "the stream holds what the reader read");
    app.stop().await;
}

/// 40 entitlements each cross their thresholds and get denied while two
/// readers page through the stream with small pages (one from the oldest
/// event, one from `from=now`, taken before the writes), concurrently with
/// the writes. Each reader gets every event once, each entitlement's in the
/// order it made them; the type and entitlement filters get exactly their
/// share; a waiting read answers with the event that arrives meanwhile.
async fn events_scenario(app: &TestApp) {
    let (status, start) = app.read("/v1/events?from=now", ADMIN).await;
    assert_eq!(status, 200, "{start}");
    assert_eq!(start["events"], serde_json::json!([]));
    let from_now = start["next_cursor"].as_str().expect("cursor").to_string();
    let ids: Vec<String> = (0..40).map(|i| format!("ev-{i:02}")).collect();
    let done: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let writes = async {
        join_all(ids.iter().map(|id| async move {
            let (status, body) = app
                .put(id, r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
                .await;
            assert_eq!(status, 201, "{body}");
            for seat in ["a", "b", "c", "d"] {
                app.activate(id, seat).await;
            }
            app.release(id, "b").await;
        }))
        .await;
        done.set(std::time::Instant::now()).expect("once");
    };
    let follow = |cursor: String| {
        let done = &done;
        async move {
            let mut events = Vec::new();
            let mut cursor = cursor;
            // Pages of 3 until a page read well after the last write was
            // acknowledged comes back empty (a Redis millisecond later).
            for _ in 0..100_000 {
                let asked = std::time::Instant::now();
                let path = format!("/v1/events?cursor={cursor}&limit=3");
                let (status, body) = app.send(Method::GET, &path, Some(ADMIN), None).await;
                assert_eq!(status, 200, "{body}");
                cursor = body["next_cursor"].as_str().expect("cursor").to_string();
                let page = body["events"].as_array().expect("events").clone();
                let caught_up = done
                    .get()
                    .is_some_and(|d| asked > *d + std::time::Duration::from_millis(5));
                if page.is_empty() && caught_up {
                    return events;
                }
                events.extend(page);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            panic!("the reader never caught up");
        }
    };
    let (_, from_start, after_now) = tokio::join!(writes, follow("0-0".into()), follow(from_now));
    let read = event_ids(&from_start);
    let unique: BTreeSet<&String> = read.iter().collect();
    assert_eq!(unique.len(), read.len(), "an event read twice");
    // Each entitlement's events are numbered 1, 2, 3… in the order it made
    // them: every one is there, in that order.
    let mut per: HashMap<String, Vec<u64>> = HashMap::new();
    for id in &read {
        let (entitlement, seq) = id.rsplit_once(':').expect("entitlement:incarnation:seq");
        per.entry(entitlement.to_string())
            .or_default()
            .push(seq.parse().expect("seq"));
    }
    assert_eq!(per.len(), ids.len(), "every entitlement's events");
    for (entitlement, seqs) in &per {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, &expected,
            "{entitlement}'s events in order, none missing"
        );
        assert!(seqs.len() >= 4, "{entitlement}: {seqs:?}");
    }
    // Started before the writes, `from=now` reads the same, in the same order.
    assert_eq!(event_ids(&after_now), read, "from=now");
    // Filters: exactly the events of that type, of that entitlement.
    let (denied, _) = read_events(app, "&type=seat.denied&limit=7", "0-0".into()).await;
    let expected_denied: Vec<String> = from_start
        .iter()
        .filter(|e| e["type"] == "seat.denied")
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert!(!expected_denied.is_empty());
    let mut got = event_ids(&denied);
    got.sort();
    let mut want = expected_denied.clone();
    want.sort();
    assert_eq!(got, want, "type filter");
    let (one, _) = read_events(app, "&entitlement=ev-07&limit=2", "0-0".into()).await;
    let want: Vec<String> = from_start
        .iter()
        .filter(|e| e["subject"] == "ev-07")
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(event_ids(&one), want, "entitlement filter, in order");
    let (two, _) = read_events(
        app,
        "&entitlement=ev-07&type=seat.denied,entitlement.updated",
        "0-0".into(),
    )
    .await;
    assert!(two.iter().all(|e| e["subject"] == "ev-07"
        && (e["type"] == "seat.denied" || e["type"] == "entitlement.updated")));
    assert!(two.iter().any(|e| e["type"] == "entitlement.updated"));
    // A waiting read: answered with the event that arrives while it waits.
    let (_, tail) = read_events(app, "", "0-0".into()).await;
    let waiting = async {
        app.read(&format!("/v1/events?cursor={tail}&wait=20"), ADMIN)
            .await
    };
    let write = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        app.activate("ev-00", "e").await
    };
    let ((status, body), _) = tokio::join!(waiting, write);
    assert_eq!(status, 200, "{body}");
    let got: Vec<&str> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    // ev-00 holds a after b was released: e takes it into overdraft again.
    assert_eq!(
        got,
        ["seat.overdraft_entered", "seat.hard_cap_reached"],
        "{body}"
    );
    // Bad input: 400 naming the parameter.
    for (query, field) in [
        ("cursor=12", "cursor"),
        ("cursor=1-2&from=now", "from"),
        ("from=yesterday", "from"),
        ("type=seat.nope", "type"),
        ("entitlement=%20", "entitlement"),
        ("wait=26", "wait"),
        ("limit=0", "limit"),
    ] {
        let (status, body) = app.read(&format!("/v1/events?{query}"), ADMIN).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
    }
    assert_eq!(app.read("/v1/events", CLIENT).await.0, 403);
}
