//! Webhooks against a real redis-server and real local HTTP receivers.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use headroom::webhooks::{Dispatcher, WebhookSettings, Webhooks, verify};
use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

/// One request a receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    headers: HashMap<String, String>,
    body: String,
}

impl Received {
    pub fn event(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    pub fn id(&self) -> String {
        self.event()["id"].as_str().expect("id").to_string()
    }
}

/// A local HTTP receiver: records each request, answers `status` after
/// `delay_ms`.
#[derive(Clone)]
pub struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    started: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    server: Arc<Mutex<Option<actix_web::dev::ServerHandle>>>,
}

async fn receive(req: HttpRequest, body: web::Bytes, r: web::Data<Receiver>) -> HttpResponse {
    r.started.fetch_add(1, Ordering::SeqCst);
    let delay = r.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_lowercase(),
                v.to_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    r.got.lock().expect("lock").push(Received {
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    });
    r.answered.fetch_add(1, Ordering::SeqCst);
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(r.status.load(Ordering::SeqCst)).expect("status"),
    )
    .finish()
}

impl Receiver {
    /// A receiver on a free port, not listening yet.
    pub fn new(status: u16) -> Self {
        Receiver {
            port: free_port(),
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(status)),
            delay_ms: Arc::default(),
            started: Arc::default(),
            answered: Arc::default(),
            server: Arc::default(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn listen(&self) {
        let data = web::Data::new(self.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .bind(("127.0.0.1", self.port))
        .expect("bind receiver")
        .run();
        *self.server.lock().expect("lock") = Some(server.handle());
        actix_rt::spawn(server);
    }

    pub async fn stop(&self) {
        let handle = self.server.lock().expect("lock").take();
        if let Some(h) = handle {
            h.stop(false).await;
        }
    }

    pub fn got(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }

    /// Waits until it got `n` requests (at most `secs`); returns them.
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        for _ in 0..secs * 20 {
            if self.got().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.got()
    }
}

pub(crate) fn fast_settings(consumer: &str) -> WebhookSettings {
    WebhookSettings {
        timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        consumer: Some(consumer.into()),
        ..WebhookSettings::default()
    }
}

async fn app_with_webhooks(redis: &RedisServer, prefix: &str) -> (TestApp, Webhooks) {
    let hooks =
        Webhooks::new(&redis.url(), keys(prefix), Duration::from_secs(2)).expect("webhooks");
    let app = TestApp::spawn_with(
        redis_store(redis, prefix),
        AppOptions {
            webhooks: Some(hooks.clone()),
            ..AppOptions::default()
        },
    )
    .await;
    (app, hooks)
}

/// Registers a webhook; returns its id and secret.
pub(crate) async fn register(app: &TestApp, url: &str, types: Option<&[&str]>) -> (String, String) {
    let body = match types {
        Some(t) => serde_json::json!({ "url": url, "types": t }),
        None => serde_json::json!({ "url": url }),
    };
    let (status, created) = app
        .send(
            Method::POST,
            "/v1/webhooks",
            Some(ADMIN),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["secret"]
        .as_str()
        .expect("secret shown once")
        .to_string();
    assert!(secret.starts_with("whsec_"));
    (created["id"].as_str().expect("id").to_string(), secret)
}

/// Seat traffic that emits `entitlement.updated`, `seat.overdraft_entered`,
/// `seat.hard_cap_reached` and `seat.denied`, then usage events.
pub(crate) async fn traffic(app: &TestApp, id: &str) {
    app.put(
        id,
        r#"{"seats": {"purchased": 2, "hard_cap": 3},
            "features": {"api": {"included": 10, "hard_cap": 12, "period": "month"}}}"#,
    )
    .await;
    for s in ["a", "b", "c", "d"] {
        app.activate(id, s).await;
    }
    app.usage(id, r#"{"feature": "api", "amount": 11}"#).await;
}

/// The CloudEvent ids written to the stream (after `after`, if given) of
/// the given types.
fn stream_ids(
    redis: &RedisServer,
    prefix: &str,
    wanted: impl Fn(&str) -> bool,
) -> BTreeSet<String> {
    redis
        .events(prefix)
        .into_iter()
        .filter(|(kind, _, _)| wanted(kind))
        .map(|(_, _, e)| e["id"].as_str().expect("id").to_string())
        .collect()
}

pub(crate) fn check_signed(r: &Received, secret: &str) {
    let header = |name: &str| {
        r.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .as_str()
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let now = chrono::Utc::now().timestamp();
    let body = r.body.as_bytes();
    assert!(
        verify(secret, id, timestamp, signature, body, now, 300),
        "signature of {}",
        r.body
    );
    assert!(!verify(
        "whsec_AAAA",
        id,
        timestamp,
        signature,
        body,
        now,
        300
    ));
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/cloudevents+json")
    );
    assert_eq!(
        r.headers.get("headroom-delivery-id").map(String::as_str),
        Some(id)
    );
    assert_eq!(r.event()["specversion"], "1.0");
}

/// What the Standard Webhooks Python library (`standardwebhooks`, in
/// `.ci/venv`) says of each delivery with `secret`: `ok`, or the error.
pub(crate) fn library_verdicts(got: &[Received], secret: &str) -> Vec<String> {
    let deliveries: Vec<Value> = got
        .iter()
        .map(|r| serde_json::json!({ "headers": r.headers, "body": r.body }))
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, deliveries = sys.argv[1], json.load(sys.stdin)
for d in deliveries:
    try:
        Webhook(secret).verify(d["body"], d["headers"])
        print("ok")
    except Exception as e:
        print(type(e).__name__)
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(venv_python("standardwebhooks"))
        .args(["-c", script, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&deliveries).expect("json").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[actix_rt::test]
async fn each_matching_event_is_delivered_once_and_signed() {
    let redis = RedisServer::start();
    let (app, hooks) = app_with_webhooks(&redis, "wh1").await;
    let dispatcher = Dispatcher::start(hooks, fast_settings("t1")).expect("dispatcher");
    let seats_only = Receiver::new(200);
    let everything = Receiver::new(204);
    seats_only.listen();
    everything.listen();
    let (seats_id, seats_secret) = register(&app, &seats_only.url(), Some(&["seat.*"])).await;
    let (_, all_secret) = register(&app, &everything.url(), None).await;
    // Events before registration are not sent: this one is older.
    // (Registration reads the stream's end; the entitlement comes after.)
    traffic(&app, "acme").await;
    traffic(&app, "globex").await;

    let want_all = stream_ids(&redis, "wh1", |_| true);
    let want_seats = stream_ids(&redis, "wh1", |k| k.starts_with("seat."));
    assert!(want_seats.len() >= 6 && want_all.len() > want_seats.len());
    let got_all = everything.wait_for(want_all.len(), 20).await;
    let got_seats = seats_only.wait_for(want_seats.len(), 20).await;
    // Exactly once: wait a little for any duplicate to show up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got_all_after = everything.got();
    let got_seats_after = seats_only.got();
    assert_eq!(got_all_after.len(), got_all.len(), "no duplicate");
    assert_eq!(got_seats_after.len(), got_seats.len(), "no duplicate");
    let ids = |rs: &[Received]| rs.iter().map(Received::id).collect::<BTreeSet<_>>();
    assert_eq!(got_all.len(), want_all.len());
    assert_eq!(ids(&got_all), want_all);
    assert_eq!(got_seats.len(), want_seats.len());
    assert_eq!(ids(&got_seats), want_seats);
    for r in &got_all {
        check_signed(r, &all_secret);
    }
    // The stock Standard Webhooks library verifies every real delivery,
    // and refuses them with another endpoint's secret.
    assert!(
        library_verdicts(&got_all, &all_secret)
            .iter()
            .all(|v| v == "ok"),
        "standardwebhooks refused a delivery"
    );
    assert!(
        library_verdicts(&got_all, &seats_secret)
            .iter()
            .all(|v| v == "WebhookVerificationError"),
        "standardwebhooks accepted another secret"
    );
    for r in &got_seats {
        check_signed(r, &seats_secret);
        assert!(
            r.event()["type"]
                .as_str()
                .expect("type")
                .starts_with("seat.")
        );
    }

    // The delivery log, newest first; registrations never show the secret.
    let (status, log) = app
        .send(
            Method::GET,
            &format!("/v1/webhooks/{seats_id}/deliveries?limit=1000"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 200, "{log}");
    let entries = log["deliveries"].as_array().expect("deliveries");
    assert_eq!(entries.len(), want_seats.len());
    assert!(
        entries
            .iter()
            .all(|e| e["outcome"] == "delivered" && e["status"] == 200)
    );
    let (_, listed) = app
        .send(Method::GET, "/v1/webhooks", Some(ADMIN), None)
        .await;
    assert_eq!(listed["webhooks"].as_array().expect("list").len(), 2);
    assert!(!listed.to_string().contains("whsec_"), "{listed}");
    let (status, one) = app
        .send(
            Method::GET,
            &format!("/v1/webhooks/{seats_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(one["types"], serde_json::json!(["seat.*"]));
    assert!(one.get("secret").is_none());
    let metrics = app.scrape().await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("headroom_webhook_deliveries_total{outcome=\"delivered\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );

    // Deleted: no more deliveries, and 404 afterwards.
    let (status, _) = app
        .send(
            Method::DELETE,
            &format!("/v1/webhooks/{seats_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, body) = app
        .send(
            Method::DELETE,
            &format!("/v1/webhooks/{seats_id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "webhook_not_found");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = seats_only.got().len();
    traffic(&app, "initech").await;
    let want_all = stream_ids(&redis, "wh1", |_| true);
    everything.wait_for(want_all.len(), 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seats_only.got().len(),
        before,
        "a deleted webhook gets nothing"
    );
    dispatcher.stop().await;
    seats_only.stop().await;
    everything.stop().await;
    app.stop().await;
}

#[actix_rt::test]
async fn a_receiver_that_was_down_gets_everything_after_retries() {
    let redis = RedisServer::start();
    let (app, hooks) = app_with_webhooks(&redis, "wh2").await;
    let dispatcher = Dispatcher::start(hooks, fast_settings("t2")).expect("dispatcher");
    let receiver = Receiver::new(200);
    let (id, secret) = register(&app, &receiver.url(), None).await;
    traffic(&app, "acme").await;
    let want = stream_ids(&redis, "wh2", |_| true);
    // Down: attempts fail and are retried.
    let mut failed = 0;
    for _ in 0..100 {
        let (_, log) = app
            .send(
                Method::GET,
                &format!("/v1/webhooks/{id}/deliveries"),
                Some(ADMIN),
                None,
            )
            .await;
        failed = log["deliveries"]
            .as_array()
            .map_or(0, |l| l.iter().filter(|e| e["outcome"] == "failed").count());
        if failed >= want.len() * 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed >= want.len() * 2,
        "each delivery was tried more than once"
    );
    receiver.listen();
    let got = receiver.wait_for(want.len(), 30).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got_after = receiver.got();
    assert_eq!(got_after.len(), got.len(), "no duplicate");
    assert_eq!(got.iter().map(Received::id).collect::<BTreeSet<_>>(), want);
    for r in &got {
        check_signed(r, &secret);
        let attempt: u32 = r.headers["headroom-attempt"].parse().expect("attempt");
        assert!(attempt >= 2, "delivered on a retry");
    }
    // Nothing is left in the retry schedule.
    let mut c = redis.conn();
    let backlog: u64 = redis::cmd("ZCARD")
        .arg(keys("wh2").webhook_retry())
        .query(&mut c)
        .expect("ZCARD");
    assert_eq!(backlog, 0);
    dispatcher.stop().await;
    receiver.stop().await;
    app.stop().await;
}

#[actix_rt::test]
async fn failing_and_hanging_receivers_end_in_the_dead_letter_stream_without_delaying_others() {
    let redis = RedisServer::start();
    let (app, hooks) = app_with_webhooks(&redis, "wh3").await;
    let dispatcher = Dispatcher::start(
        hooks,
        WebhookSettings {
            // Long enough that the healthy endpoint is served well before the
            // hanging one's requests time out and free its slots; each round
            // of 4 hanging requests then takes this long.
            timeout: Duration::from_secs(4),
            retry_for: Duration::from_millis(1500),
            ..fast_settings("t3")
        },
    )
    .expect("dispatcher");
    let healthy = Receiver::new(200);
    let failing = Receiver::new(500);
    let hanging = Receiver::new(200);
    hanging.delay_ms.store(60_000, Ordering::SeqCst);
    for r in [&healthy, &failing, &hanging] {
        r.listen();
    }
    let (_, _) = register(&app, &healthy.url(), None).await;
    let (failing_id, _) = register(&app, &failing.url(), None).await;
    let (hanging_id, _) = register(&app, &hanging.url(), None).await;
    for i in 0..5 {
        traffic(&app, &format!("ent-{i}")).await;
    }
    let want = stream_ids(&redis, "wh3", |_| true);
    assert!(
        want.len() > 20,
        "more events than the hanging endpoint's queue and slots"
    );
    // The healthy receiver gets everything while the hanging endpoint
    // still holds every request it was sent (none has even timed out).
    let got = healthy.wait_for(want.len(), 20).await;
    assert_eq!(got.iter().map(Received::id).collect::<BTreeSet<_>>(), want);
    assert_eq!(hanging.answered.load(Ordering::SeqCst), 0);
    let started = hanging.started.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&started),
        "at most 4 requests in flight per endpoint: {started}"
    );

    // Both bad endpoints end in the dead-letter stream, each event once.
    let dead_for = |hook: &str| -> BTreeSet<String> {
        let mut c = redis.conn();
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(keys("wh3").webhook_dead())
            .arg("-")
            .arg("+")
            .query(&mut c)
            .expect("XRANGE");
        entries
            .into_iter()
            .filter_map(|(_, f)| {
                let m: HashMap<String, String> =
                    f.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();
                (m.get("webhook").map(String::as_str) == Some(hook)).then(|| {
                    let e: Value = serde_json::from_str(&m["event"]).expect("event");
                    e["id"].as_str().expect("id").to_string()
                })
            })
            .collect()
    };
    // The hanging endpoint times out 4 requests at a time: ≈ 7 rounds of 4 s.
    let mut ok = false;
    for _ in 0..900 {
        if dead_for(&failing_id).len() == want.len() && dead_for(&hanging_id).len() == want.len() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ok,
        "dead letters: failing {} hanging {} of {}",
        dead_for(&failing_id).len(),
        dead_for(&hanging_id).len(),
        want.len()
    );
    assert_eq!(dead_for(&failing_id), want);
    assert_eq!(dead_for(&hanging_id), want);
    assert!(failing.got().len() >= want.len(), "each was tried");
    assert_eq!(
        healthy.got().len(),
        want.len(),
        "the healthy one got each once"
    );
    let metrics = app.scrape().await;
    assert!(metrics.contains("headroom_webhook_deliveries_total{outcome=\"dead_lettered\"}"));
    dispatcher.stop().await;
    for r in [&healthy, &failing, &hanging] {
        r.stop().await;
    }
    app.stop().await;
}

/// Creates entitlements `e{n}` on the tracker at `base`.
async fn create(http: &reqwest::Client, base: &str, ns: std::ops::Range<usize>) {
    for n in ns {
        let res = http
            .put(format!("{base}/v1/entitlements/e{n}"))
            .bearer_auth(ADMIN)
            .body(r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
            .send()
            .await
            .expect("put");
        assert!(res.status().is_success());
    }
}

/// The tracker binary is killed while its deliveries hang on a receiver
/// (read from the stream, not acknowledged) and others wait in the retry
/// schedule; restarted under the same consumer name, it delivers
/// everything, nothing lost.
#[actix_rt::test]
async fn delivery_resumes_after_a_tracker_restart() {
    let redis = RedisServer::start();
    let mut tracker = TrackerProcess::start_with(
        &redis.url(),
        "wh4",
        &[
            ("HEADROOM_WEBHOOK_BACKOFF", "100ms"),
            ("HEADROOM_WEBHOOK_BACKOFF_MAX", "300ms"),
        ],
    )
    .await;
    let http = http_client();
    let receiver = Receiver::new(200);
    receiver.delay_ms.store(60_000, Ordering::SeqCst);
    receiver.listen();
    let created: Value = http
        .post(format!("{}/v1/webhooks", tracker.base))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({ "url": receiver.url() }))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let secret = created["secret"].as_str().expect("secret").to_string();
    create(&http, &tracker.base, 0..10).await;
    // Let the dispatcher read them: some hang on the receiver, the rest
    // wait in its queue or in the retry schedule. Then kill it.
    for _ in 0..100 {
        if receiver.started.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(receiver.started.load(Ordering::SeqCst) > 0);
    assert!(receiver.got().is_empty());
    tracker.kill();
    receiver.delay_ms.store(0, Ordering::SeqCst);
    tracker.restart();
    // The old client's pooled connection died with the process.
    create(&http_client(), &tracker.base, 10..15).await;
    let want = stream_ids(&redis, "wh4", |_| true);
    assert_eq!(want.len(), 15);
    let got = receiver.wait_for(want.len(), 30).await;
    assert_eq!(
        got.iter().map(Received::id).collect::<BTreeSet<_>>(),
        want,
        "nothing lost"
    );
    for r in &got {
        check_signed(r, &secret);
    }
    // Once all are in, the group has nothing pending.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = redis.conn();
    for stream in keys("wh4").all_events() {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("headroom-webhooks")
            .query(&mut c)
            .expect("XPENDING");
        let redis::Value::Array(parts) = summary else {
            panic!("XPENDING answered {summary:?}")
        };
        assert_eq!(
            parts.first(),
            Some(&redis::Value::Int(0)),
            "every entry of {stream} acknowledged"
        );
    }
    tracker.kill();
    receiver.stop().await;
}

/// Bad registrations are refused and change nothing; webhooks need Redis.
#[actix_rt::test]
async fn bad_webhook_registrations_are_refused() {
    let redis = RedisServer::start();
    let (app, _hooks) = app_with_webhooks(&redis, "wh5").await;
    let cases = [
        (r#"{"url": "ftp://example.com/"}"#, "invalid_request"),
        (r#"{"url": "not a url"}"#, "invalid_request"),
        (r#"{"url": "http://"}"#, "invalid_request"),
        (
            r#"{"url": "https://example.com/", "types": ["seat.nope"]}"#,
            "invalid_request",
        ),
        (
            r#"{"url": "https://example.com/", "types": []}"#,
            "invalid_request",
        ),
        (
            r#"{"url": "https://example.com/", "colour": "red"}"#,
            "invalid_request",
        ),
        (r#"{"url": 5}"#, "invalid_request"),
        (r#"{"url": "#, "invalid_json"),
    ];
    for (body, code) in cases {
        let (status, answer) = app
            .send(Method::POST, "/v1/webhooks", Some(ADMIN), Some(body))
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["code"], code, "{body}");
    }
    let (_, listed) = app
        .send(Method::GET, "/v1/webhooks", Some(ADMIN), None)
        .await;
    assert_eq!(
        listed["webhooks"],
        serde_json::json!([]),
        "nothing registered"
    );
    let (status, _) = app
        .send(
            Method::POST,
            "/v1/webhooks",
            Some(CLIENT),
            Some(r#"{"url": "http://h/"}"#),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .send(
            Method::GET,
            "/v1/webhooks/wh_nope/deliveries",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 404);
    app.stop().await;

    let memory = TestApp::spawn(memory_store()).await;
    let (status, body) = memory
        .send(
            Method::POST,
            "/v1/webhooks",
            Some(ADMIN),
            Some(r#"{"url": "http://h/"}"#),
        )
        .await;
    assert_eq!(status, 409);
    assert_eq!(body["code"], "webhooks_unavailable");
    memory.stop().await;
}

#[actix_rt::test]
async fn a_rotated_secret_and_the_old_one_both_sign_until_the_overlap_ends() {
    let redis = RedisServer::start();
    let (app, hooks) = app_with_webhooks(&redis, "rot").await;
    let dispatcher = Dispatcher::start(hooks, fast_settings("rot")).expect("dispatcher");
    let receiver = Receiver::new(204);
    receiver.listen();
    let (id, old) = register(&app, &receiver.url(), Some(&["entitlement.*"])).await;
    let rotate = |body: &'static str| {
        let app = &app;
        let path = format!("/v1/webhooks/{id}/rotate-secret");
        async move { app.send(Method::POST, &path, Some(ADMIN), Some(body)).await }
    };
    for bad in [
        r#"{"overlap_seconds": 604801}"#,
        r#"{"overlap_seconds": -1}"#,
        r#"{"x": 1}"#,
    ] {
        assert_eq!(rotate(bad).await.0, 400, "{bad}");
    }
    let (status, _) = app
        .send(
            Method::POST,
            "/v1/webhooks/wh_nobody/rotate-secret",
            Some(ADMIN),
            Some("{}"),
        )
        .await;
    assert_eq!(status, 404);
    let (status, rotated) = rotate(r#"{"overlap_seconds": 3}"#).await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().expect("secret").to_string();
    assert!(new.starts_with("whsec_") && new != old);
    assert!(rotated["previous_secret_expires_at"].is_string());

    // In the overlap: two signatures, each secret verifies (the library too).
    app.put("acme", r#"{"seats": {"purchased": 1}}"#).await;
    let got = receiver.wait_for(1, 20).await;
    assert_eq!(got.len(), 1);
    let signatures = got[0].headers["webhook-signature"].split(' ').count();
    assert_eq!(signatures, 2, "{:?}", got[0].headers);
    check_signed(&got[0], &old);
    check_signed(&got[0], &new);
    assert_eq!(library_verdicts(&got, &old), ["ok"]);
    assert_eq!(library_verdicts(&got, &new), ["ok"]);

    // After it: the new secret only.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    app.put("acme", r#"{"seats": {"purchased": 2}}"#).await;
    let got = receiver.wait_for(2, 20).await;
    assert_eq!(got.len(), 2);
    let last = &got[1..];
    assert_eq!(last[0].headers["webhook-signature"].split(' ').count(), 1);
    assert_eq!(library_verdicts(last, &new), ["ok"]);
    assert_eq!(library_verdicts(last, &old), ["WebhookVerificationError"]);
    dispatcher.stop().await;
    app.stop().await;
}
