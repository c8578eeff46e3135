//! Crash and outage tests: every acknowledged call must be in the state
//! exactly once afterwards, proven by re-sending every call with its
//! idempotency key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;

use headroom::domain::EntitlementId;
use headroom::engine::EngineSettings;
use headroom::store::{RedisStore, Store, StoreSettings};

use crate::helpers::*;

#[derive(Debug, Clone)]
enum Seen {
    Acknowledged(Value),
    Failed(u16),
    NoAnswer,
}

struct Ledger(Mutex<HashMap<String, Seen>>);

impl Ledger {
    fn new() -> Self {
        Ledger(Mutex::new(HashMap::new()))
    }

    fn record(&self, key: String, seen: Seen) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, seen);
    }

    fn snapshot(&self) -> HashMap<String, Seen> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn usage_call(
    http: &reqwest::Client,
    base: &str,
    key: &str,
) -> Result<(u16, bool, Value), reqwest::Error> {
    let res = http
        .post(format!("{base}/v1/entitlements/acme/usage"))
        .bearer_auth(CLIENT)
        .body(format!(
            r#"{{"feature": "api", "amount": 1, "idempotency_key": "{key}"}}"#
        ))
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    let status = res.status().as_u16();
    let replayed = res.headers().contains_key("idempotency-replayed");
    if status == 503 {
        assert!(
            res.headers().contains_key("retry-after"),
            "503 carries Retry-After"
        );
    }
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, replayed, body))
}

async fn create_acme(http: &reqwest::Client, base: &str) {
    let res = http
        .put(format!("{base}/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .body(r#"{"features": {"api": {"included": 1000000}}}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(res.status().as_u16(), 201);
}

/// A client that sends `calls` usage calls, each with a fresh key.
async fn load(
    http: &reqwest::Client,
    base: &str,
    ledger: &Ledger,
    worker: usize,
    calls: usize,
    pause: Duration,
) {
    for i in 0..calls {
        let key = format!("w{worker}-{i}");
        let seen = match usage_call(http, base, &key).await {
            Ok((200, _, body)) => Seen::Acknowledged(body),
            Ok((status, _, _)) => Seen::Failed(status),
            Err(_) => Seen::NoAnswer,
        };
        ledger.record(key, seen);
        tokio::time::sleep(pause).await;
    }
}

/// Re-sends every call with its key: acknowledged ones must come back as
/// replays of the same decision, the others are applied now; afterwards the
/// counter equals the number of distinct calls.
async fn check_ledger(http: &reqwest::Client, base: &str, ledger: &Ledger) {
    let seen = ledger.snapshot();
    for (key, s) in &seen {
        // As a client would: a 503/504 (Redis slow on a loaded machine) is
        // sent again with the same key.
        let mut answer = usage_call(http, base, key).await.expect("tracker answers");
        for _ in 0..50 {
            if !matches!(answer.0, 503 | 504) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer = usage_call(http, base, key).await.expect("tracker answers");
        }
        let (status, replayed, body) = answer;
        assert_eq!(status, 200, "retry of {key}: {body}");
        if let Seen::Acknowledged(first) = s {
            assert!(replayed, "acknowledged call {key} was lost");
            assert_eq!(&body, first, "replay of {key} answers the first decision");
        }
    }
    let res = http
        .get(format!("{base}/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("get");
    let view: Value = res.json().await.expect("json");
    assert_eq!(
        view["features"]["api"]["used"].as_u64(),
        Some(seen.len() as u64),
        "each call applied exactly once"
    );
}

#[actix_rt::test]
async fn sigkill_of_the_tracker_during_load_loses_no_acknowledged_call() {
    let redis = RedisServer::start();
    let mut tracker = TrackerProcess::start(&redis.url(), "crash").await;
    let http = http_client();
    create_acme(&http, &tracker.base).await;

    let ledger = Ledger::new();
    let base = tracker.base.clone();
    let clients = (0..16).map(|w| load(&http, &base, &ledger, w, 400, Duration::ZERO));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tracker.kill();
    };
    futures_util::join!(join_all(clients), killer);

    let seen = ledger.snapshot();
    let acked = seen
        .values()
        .filter(|s| matches!(s, Seen::Acknowledged(_)))
        .count();
    let lost = seen
        .values()
        .filter(|s| matches!(s, Seen::NoAnswer))
        .count();
    assert!(
        acked > 0 && lost > 0,
        "the kill happened during load ({acked} acknowledged, {lost} unanswered)"
    );

    let tracker = TrackerProcess::start(&redis.url(), "crash").await;
    check_ledger(&http, &tracker.base, &ledger).await;
}

#[actix_rt::test]
async fn redis_outage_during_load_answers_503_and_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let app = TestApp::spawn(redis_store(&redis, "outage")).await;
    app.put("acme", r#"{"features": {"api": {"included": 1000000}}}"#)
        .await;

    let ledger = Ledger::new();
    let clients = (0..8).map(|w| {
        load(
            &app.http,
            &app.base,
            &ledger,
            w,
            150,
            Duration::from_millis(10),
        )
    });
    let outage = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (ready, _) = app.send(reqwest::Method::GET, "/readyz", None, None).await;
        redis.restart();
        ready
    };
    let (_, ready_during_outage) = futures_util::join!(join_all(clients), outage);
    assert_eq!(
        ready_during_outage, 503,
        "/readyz fails while Redis is down"
    );

    let seen = ledger.snapshot();
    let unavailable = seen
        .values()
        .filter(|s| matches!(s, Seen::Failed(503)))
        .count();
    assert!(unavailable > 0, "calls during the outage answered 503");
    // 504: a write in flight when Redis died, neither confirmed nor read back.
    let expected = |s: &Seen| matches!(s, Seen::Acknowledged(_) | Seen::Failed(503 | 504));
    assert!(
        seen.values().all(expected),
        "only 200, 503 or 504: {:?}",
        seen.values().filter(|s| !expected(s)).collect::<Vec<_>>()
    );
    // The app was not restarted: it serves again once Redis is back.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app
        .send(reqwest::Method::GET, "/readyz", None, None)
        .await
        .0
        != 200
    {
        assert!(std::time::Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check_ledger(&app.http, &app.base, &ledger).await;
    app.stop().await;
}

#[actix_rt::test]
async fn sigterm_finishes_calls_in_flight_and_exits_cleanly() {
    let redis = RedisServer::start();
    let mut tracker = TrackerProcess::start(&redis.url(), "term").await;
    let http = http_client();
    create_acme(&http, &tracker.base).await;

    let ledger = Ledger::new();
    let base = tracker.base.clone();
    let clients = (0..8).map(|w| load(&http, &base, &ledger, w, 300, Duration::ZERO));
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The wait blocks this thread; the clients resume once it returns.
        tracker.terminate()
    };
    let (_, clean) = futures_util::join!(join_all(clients), stopper);
    assert!(clean, "headroom exits with status 0 after SIGTERM");
    let seen = ledger.snapshot();
    assert!(seen.values().any(|s| matches!(s, Seen::Acknowledged(_))));

    let tracker = TrackerProcess::start(&redis.url(), "term").await;
    check_ledger(&http, &tracker.base, &ledger).await;
}

/// Ctrl-C (SIGINT) and SIGTERM both drain: a call held in flight (Redis
/// paused for writes) when the signal arrives is answered 200 once Redis
/// takes the write, and the process exits cleanly.
async fn a_signal_finishes_a_call_held_in_flight(sig: &'static str) {
    let redis = RedisServer::start();
    let mut tracker = TrackerProcess::start(&redis.url(), "drain").await;
    let http = http_client();
    create_acme(&http, &tracker.base).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("WRITE")
        .query(&mut redis.conn())
        .expect("CLIENT PAUSE");
    let (client, base) = (http.clone(), tracker.base.clone());
    let call = actix_rt::spawn(async move { usage_call(&client, &base, "held").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = tokio::task::spawn_blocking(move || tracker.stop_with(sig))
        .await
        .expect("signal");
    let answer = call.await.expect("call");
    let Ok((200, false, decision)) = answer else {
        panic!("the call in flight at {sig} was answered {answer:?}");
    };
    assert!(stopped, "headroom exits with status 0 after {sig}");
    let tracker = TrackerProcess::start(&redis.url(), "drain").await;
    let ledger = Ledger::new();
    ledger
        .0
        .lock()
        .expect("ledger")
        .insert("held".into(), Seen::Acknowledged(decision));
    check_ledger(&http, &tracker.base, &ledger).await;
}

#[actix_rt::test]
async fn ctrl_c_finishes_a_call_held_in_flight() {
    a_signal_finishes_a_call_held_in_flight("-INT").await;
}

#[actix_rt::test]
async fn sigterm_finishes_a_call_held_in_flight() {
    a_signal_finishes_a_call_held_in_flight("-TERM").await;
}

/// Redis blocked (`DEBUG SLEEP`, `CLIENT PAUSE`) past the store timeout: the
/// call is answered within that timeout (503, or 504 when its write was sent
/// and could not be read back), and the write Redis runs when it wakes is
/// refused, so the call left no trace.
async fn blocked_redis_answers_in_time_and_the_write_never_lands(block: &[&str]) {
    let redis = RedisServer::start();
    let settings = StoreSettings {
        redis_prefix: "blocked".into(),
        redis_timeout: Duration::from_millis(400),
        ..StoreSettings::default()
    };
    let window = EngineSettings::default().idempotency_window;
    let store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(RedisStore::start(&redis.url(), &settings, window).expect("store"));
    let app = TestApp::spawn(store).await;
    app.put("acme", r#"{"features": {"api": {"included": 100}}}"#)
        .await;
    // The first call, before any block, loads the entitlement; with the
    // short timeout a loaded CI machine can miss it once, so it is sent
    // until it is served (keyed: applied once). What is tested is below.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = app
            .usage(
                "acme",
                r#"{"feature": "api", "amount": 1, "idempotency_key": "warm-up"}"#,
            )
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "before the block");
        assert!(std::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // DEBUG SLEEP blocks the connection that sends it too: its own thread.
    let mut conn = redis.conn();
    let block: Vec<String> = block.iter().map(|s| s.to_string()).collect();
    let blocker = std::thread::spawn(move || {
        let _: redis::RedisResult<()> = redis::cmd(&block[0]).arg(&block[1..]).query(&mut conn);
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let (status, body) = app
        .usage("acme", r#"{"feature": "api", "amount": 5}"#)
        .await;
    let waited = started.elapsed();
    assert!(status == 503 || status == 504, "{status} {body}");
    assert!(
        waited < Duration::from_millis(1300),
        "answered while Redis was still blocked, not after it: {waited:?}"
    );

    // Redis wakes and runs the queued write: it must be refused.
    let _ = blocker.join();
    let mut used = None;
    for _ in 0..50 {
        let (status, view) = app.get("acme").await;
        if status == 200 {
            used = view["features"]["api"]["used"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(used, Some(1), "the call answered {status} was not applied");
    app.stop().await;
}

#[actix_rt::test]
async fn debug_sleep_past_the_timeout_answers_in_time_and_leaves_no_trace() {
    blocked_redis_answers_in_time_and_the_write_never_lands(&["DEBUG", "SLEEP", "1.5"]).await;
}

#[actix_rt::test]
async fn client_pause_past_the_timeout_answers_in_time_and_leaves_no_trace() {
    blocked_redis_answers_in_time_and_the_write_never_lands(&["CLIENT", "PAUSE", "1500", "ALL"])
        .await;
}

/// The fault-injection suite (shared with `cargo run -p headroom-load --bin
/// faults`, which runs it longer): load on a private Redis while the tracker
/// is SIGKILLed and restarted, Redis is SIGKILLed, stopped and restarted,
/// paused, put to sleep and filled to maxmemory; then every call is sent
/// again with its key and the ledger must hold exactly.
/// What Redis holds for an entitlement cannot be read: its calls answer
/// `500 stored_state_corrupt` without `Retry-After`, at once and without
/// reading the store again for each; other entitlements are served; the
/// overdraft report and the closed periods list what they could not read.
#[actix_rt::test]
async fn corrupt_state_answers_500_once_and_is_reported() {
    let redis = RedisServer::start();
    let first = TestApp::spawn(redis_store(&redis, "corrupt")).await;
    for id in ["bad", "good"] {
        let (status, _) = first
            .put(id, r#"{"seats": {"purchased": 1, "hard_cap": 3}}"#)
            .await;
        assert_eq!(status, 201);
        for seat in ["s1", "s2"] {
            assert_eq!(first.activate(id, seat).await.0, 200);
        }
    }
    first.stop().await;
    let mut c = redis.conn();
    redis::cmd("HSET")
        .arg(keys("corrupt").state(&EntitlementId::parse("bad").unwrap()))
        .arg("core")
        .arg("{not json")
        .query::<()>(&mut c)
        .expect("HSET");
    redis::cmd("LPUSH")
        .arg(keys("corrupt").periods(&EntitlementId::parse("good").unwrap()))
        .arg("{not json")
        .query::<()>(&mut c)
        .expect("LPUSH");

    let store = std::sync::Arc::new(crate::engine::CountingStore::new(redis_store(
        &redis, "corrupt",
    )));
    let app = TestApp::spawn(store.clone()).await;
    for _ in 0..5 {
        let res = app
            .http
            .get(app.url("/v1/entitlements/bad"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), 500);
        assert!(res.headers().get("retry-after").is_none());
        let body: Value = res.json().await.expect("problem");
        assert_eq!(body["code"], "stored_state_corrupt", "{body}");
    }
    let loads = store.loads.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(loads, 1, "five calls read the corrupt state {loads} times");
    assert_eq!(app.activate("bad", "s3").await.0, 500);
    assert_eq!(app.get("good").await.0, 200);

    let (status, report) = app.read("/v1/reports/overdraft", ADMIN).await;
    assert_eq!(status, 200, "{report}");
    let listed: Vec<&str> = report["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["entitlement"].as_str())
        .collect();
    assert_eq!(listed, ["good"], "{report}");
    assert_eq!(report["unreadable"][0]["entitlement"], "bad", "{report}");

    let (status, periods) = app.read("/v1/entitlements/good/periods", CLIENT).await;
    assert_eq!(status, 200, "{periods}");
    assert_eq!(periods["periods"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        periods["unreadable"].as_array().map(Vec::len),
        Some(1),
        "{periods}"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn every_fault_under_load_keeps_the_ledger_and_the_caps() {
    use headroom_load::faults::{self, Fault, Plan, Topology};
    let timeout = Duration::from_millis(500);
    let plan = Plan {
        bin: env!("CARGO_BIN_EXE_headroom").into(),
        entitlements: 20,
        connections: 6,
        redis_timeout: timeout,
        steady: Duration::from_millis(800),
        outage: Duration::from_millis(1200),
        faults: Fault::ALL.to_vec(),
        topology: Topology::Standalone,
        progress: false,
    };
    let report = faults::run(plan).await.expect("the suite runs");
    let table = faults::markdown(&report);
    println!("{table}");
    assert!(report.ok, "{table}");
    assert!(
        report.answers.acknowledged > 0 && report.answers.unavailable > 0,
        "{table}"
    );
    for f in &report.faults {
        assert!(f.answers.calls > 0, "load ran during {}: {table}", f.fault);
        assert!(
            f.recovery_ms.is_some(),
            "recovered by itself after {}: {table}",
            f.fault
        );
    }
    // Promptly: within the store timeout and its grace, with room for a
    // debug build on a loaded machine (a correctness bound, not a target).
    let slowest = report.answers.max_503_ms.max(report.answers.max_504_ms);
    assert!(
        slowest < (timeout + Duration::from_millis(1000)).as_secs_f64() * 1000.0,
        "a 503/504 took {slowest:.0} ms: {table}"
    );
}

/// The same suite on a Redis Cluster of 3 primaries with a replica each,
/// the tracker waiting for a replica to acknowledge every write: slots
/// moved between primaries under the load (`redis-cli --cluster reshard`),
/// a primary killed (its replica takes over; it comes back as a replica),
/// stopped, paused, put to sleep and filled to `maxmemory`. Nothing
/// acknowledged is lost, no cap is passed, every answer is a decision or a
/// 503/504, and each fault heals by itself.
#[actix_rt::test]
async fn every_fault_on_a_cluster_with_replicas_keeps_the_ledger_and_the_caps() {
    use headroom_load::faults::{self, Fault, Plan, Topology};
    let plan = Plan {
        bin: env!("CARGO_BIN_EXE_headroom").into(),
        entitlements: 24,
        connections: 6,
        redis_timeout: Duration::from_millis(500),
        steady: Duration::from_millis(800),
        outage: Duration::from_millis(1200),
        faults: Fault::CLUSTER.to_vec(),
        topology: Topology::Cluster {
            primaries: 3,
            replicas: 1,
        },
        progress: false,
    };
    let report = faults::run(plan).await.expect("the suite runs");
    let table = faults::markdown(&report);
    println!("{table}");
    assert!(report.ok, "{table}");
    assert_eq!(report.answers.other_errors, 0, "never a 500: {table}");
    for f in &report.faults {
        assert!(f.answers.calls > 0, "load ran during {}: {table}", f.fault);
        assert!(
            f.recovery_ms.is_some(),
            "recovered by itself after {}: {table}",
            f.fault
        );
    }
    let moved = report
        .faults
        .iter()
        .find_map(|f| f.moved_entitlements)
        .expect("a resharding");
    assert!(moved > 0, "the resharding moved entitlements: {table}");
}
