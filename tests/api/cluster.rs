//! The same scenarios on a 3-primary Redis Cluster as on a standalone
//! Redis: the store contract, concurrent seats, the reports merged across
//! buckets spread over the nodes, the metrics' sums, webhooks from every
//! bucket's stream, a restart, and the binary started on the cluster.
//!
//! One cluster serves the tests of this binary that run at the same time
//! (each under its own prefix); it stops when the last of them ends.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use headroom::store::RedisStore;
use headroom::webhooks::{Dispatcher, Webhooks};
use headroom_test_support::RedisCluster;
use reqwest::Method;

use crate::helpers::*;
use crate::webhooks::{Receiver, check_signed, fast_settings, register, traffic};

static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());

/// The 3-primary cluster the running tests share (started if none runs).
pub(crate) fn cluster() -> Arc<RedisCluster> {
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = shared.upgrade() {
        return c;
    }
    let c = Arc::new(RedisCluster::start(3, 0));
    *shared = Arc::downgrade(&c);
    c
}

/// The shared cluster, for the scenarios of module `namespace`.
fn on(namespace: &'static str) -> OnCluster {
    OnCluster {
        cluster: cluster(),
        namespace,
    }
}

/// Every usage scenario of `usage.rs`, one after the other.
#[actix_rt::test]
async fn the_usage_scenarios_hold_on_a_cluster() {
    use crate::usage::*;
    let r = on("usage");
    a_thousand_concurrent_usage_calls_never_pass_the_cap_on(&r).await;
    idempotent_retry_returns_the_first_decision_and_conflicts_are_409_on(&r).await;
    thresholds_jumped_over_in_one_call_each_emit_once_in_order_on(&r).await;
    period_rollover_with_an_injected_clock_on(&r).await;
    leases_expire_on_the_next_call_and_by_the_sweep_on(&r).await;
    a_limit_lowered_below_current_use_keeps_seats_and_emits_at_once_on(&r).await;
    delete_removes_the_entitlement_and_its_state_on(&r).await;
    concurrent_retries_of_keys_used_before_a_restart_all_replay_on(&r).await;
}

/// The report, history and billing-record scenarios of `reports.rs`, the
/// list of entitlements and the event stream of `listing.rs` (each bucket's
/// stream on its primary, read by that primary's clock), and the restart
/// of `seats.rs`.
#[actix_rt::test]
async fn the_evidence_scenarios_hold_on_a_cluster() {
    let r = on("evidence");
    crate::reports::the_report_lists_exactly_the_entitlements_in_overdraft_on(&r).await;
    crate::reports::history_of_a_scripted_day_on(&r).await;
    crate::reports::a_closed_period_is_a_billing_record_on(&r).await;
    crate::listing::the_list_holds_every_configured_entitlement_once_in_id_order_on(&r).await;
    crate::listing::the_event_stream_reads_every_event_once_while_it_is_written_on(&r).await;
    crate::seats::state_survives_a_restart_of_the_app_on_the_same_redis_on(&r).await;
}

#[actix_rt::test]
async fn the_store_keeps_the_contract_on_a_cluster() {
    let c = cluster();
    crate::store_contract::contract(cluster_store(&c, "contract")).await;
}

#[actix_rt::test]
async fn concurrent_seats_keep_the_cap_on_a_cluster() {
    let c = cluster();
    crate::seats::seed_scenario(cluster_store(&c, "seed"), || c.events("seed")).await;
}

/// 120 entitlements in overdraft over every bucket (and so every node):
/// the report pages through them in id order, each once; the denials
/// report lists them most recent first; the gauges sum the buckets.
#[actix_rt::test]
async fn reports_and_gauges_merge_the_buckets_of_every_node() {
    let c = cluster();
    let app = TestApp::spawn(cluster_store(&c, "rep")).await;
    let ids: Vec<String> = (0..120).map(|i| format!("cust-{i:03}")).collect();
    let work = ids.iter().map(|id| {
        let app = &app;
        async move {
            assert_eq!(
                app.put(id, r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
                    .await
                    .0,
                201
            );
            for s in ["a", "b", "c"] {
                app.activate(id, s).await;
            }
        }
    });
    join_all(work).await;
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/reports/overdraft?limit=7&cursor={c}"),
            None => "/v1/reports/overdraft?limit=7".to_string(),
        };
        let (status, page) = app.send(Method::GET, &path, Some(ADMIN), None).await;
        assert_eq!(status, 200, "{page}");
        for e in page["items"].as_array().expect("items") {
            listed.push(e["entitlement"].as_str().expect("id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(listed, ids, "every entitlement once, in id order");

    let (status, denied) = app
        .send(
            Method::GET,
            "/v1/reports/overdraft?state=denied_recently&hours=1&limit=200",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 200, "{denied}");
    // Compared as times: RFC 3339 text of a whole second has no fraction
    // ("…:01Z" sorts after "…:01.123Z" as text).
    let at: Vec<chrono::DateTime<chrono::Utc>> = denied["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| {
            let text = e["last_denied_at"].as_str().expect("at");
            chrono::DateTime::parse_from_rfc3339(text)
                .expect("RFC 3339")
                .to_utc()
        })
        .collect();
    assert_eq!(at.len(), 120);
    assert!(
        at.windows(2).all(|w| w[0] >= w[1]),
        "most recent first: {at:?}"
    );

    let metrics = app.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("headroom_entitlements_in_overdraft ") && l.ends_with(" 120")),
        "{metrics}"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn webhooks_deliver_from_every_buckets_stream_on_a_cluster() {
    let c = cluster();
    let s = cluster_settings(&c, "whc");
    let store = cluster_store(&c, "whc");
    let (link, _) = RedisStore::link(&s).expect("link").expect("a cluster");
    let hooks = Webhooks::on(link, keys("whc"), Duration::from_secs(2));
    let app = TestApp::spawn_with(
        store,
        AppOptions {
            webhooks: Some(hooks.clone()),
            ..AppOptions::default()
        },
    )
    .await;
    let dispatcher = Dispatcher::start(hooks, fast_settings("c1")).expect("dispatcher");
    let receiver = Receiver::new(200);
    receiver.listen();
    let (_, secret) = register(&app, &receiver.url(), None).await;
    let ids: Vec<String> = (0..12).map(|i| format!("hook-{i}")).collect();
    join_all(ids.iter().map(|id| traffic(&app, id))).await;
    let want: BTreeSet<String> = c
        .events("whc")
        .into_iter()
        .map(|(_, _, e)| e["id"].as_str().expect("id").to_string())
        .collect();
    assert!(want.len() >= 12 * 4, "{} events", want.len());
    let got = receiver.wait_for(want.len(), 30).await;
    let got_ids: BTreeSet<String> = got.iter().map(|r| r.id()).collect();
    assert_eq!(got_ids, want, "every event of every bucket");
    assert_eq!(got.len(), want.len(), "each once");
    for r in &got {
        check_signed(r, &secret);
    }
    dispatcher.stop().await;
    receiver.stop().await;
    app.stop().await;
}

#[actix_rt::test]
async fn state_survives_a_restart_on_a_cluster() {
    let c = cluster();
    let app = TestApp::spawn(cluster_store(&c, "again")).await;
    let ids: Vec<String> = (0..30).map(|i| format!("r-{i}")).collect();
    for id in &ids {
        app.put(
            id,
            r#"{"features": {"api": {"included": 10, "hard_cap": 12}}}"#,
        )
        .await;
        for k in 0..3 {
            let body = format!(r#"{{"feature": "api", "amount": 4, "idempotency_key": "k{k}"}}"#);
            app.usage(id, &body).await;
        }
    }
    app.stop().await;
    let app = TestApp::spawn(cluster_store(&c, "again")).await;
    for id in &ids {
        let (_, view) = app.get(id).await;
        assert_eq!(view["features"]["api"]["used"], 12, "{id}: {view}");
        // The keyed call is answered from the store, not applied again.
        let (status, d) = app
            .usage(
                id,
                r#"{"feature": "api", "amount": 4, "idempotency_key": "k1"}"#,
            )
            .await;
        assert_eq!(status, 200, "{d}");
    }
    let (_, view) = app.get(&ids[0]).await;
    assert_eq!(view["features"]["api"]["used"], 12);
    app.stop().await;
}

/// The binary on the cluster, configured as an operator would.
#[actix_rt::test]
async fn the_binary_runs_on_a_cluster_from_its_seed_nodes() {
    let c = cluster();
    let seeds = c.seeds();
    let mut tracker = TrackerProcess::spawn_env(&[
        ("HEADROOM_REDIS_CLUSTER", &seeds),
        ("HEADROOM_REDIS_PREFIX", "bin"),
    ]);
    let (status, _) = tracker
        .send(
            Method::PUT,
            "/v1/entitlements/acme",
            Some(ADMIN),
            Some(r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#),
        )
        .await;
    assert_eq!(status, 201);
    for (seat, want) in [("a", 200), ("b", 200), ("c", 429)] {
        let path = format!("/v1/entitlements/acme/seats/{seat}");
        let (status, _) = tracker.send(Method::POST, &path, Some(CLIENT), None).await;
        assert_eq!(status, want, "seat {seat}");
    }
    assert!(tracker.terminate(), "stops gracefully");
    let kinds: Vec<String> = c.events("bin").into_iter().map(|(k, ..)| k).collect();
    assert!(kinds.contains(&"seat.denied".to_string()), "{kinds:?}");
}

/// A usage call: entitlement, idempotency key.
type Call = (String, String);

/// Three primaries with a replica each, the tracker acknowledging only
/// writes that reached a replica (`HEADROOM_REDIS_WAIT_REPLICAS=1`): a
/// primary SIGKILLed under load is replaced by its replica, the answers
/// meanwhile are 503/504 (never 500), the service recovers by itself, no
/// acknowledged call is lost and no cap is passed.
#[actix_rt::test]
async fn a_primary_killed_under_load_loses_no_acknowledged_call_with_wait_replicas() {
    let mut c = RedisCluster::start(3, 1);
    let seeds = c.seeds();
    let tracker = TrackerProcess::spawn_env(&[
        ("HEADROOM_REDIS_CLUSTER", &seeds),
        ("HEADROOM_REDIS_PREFIX", "fo"),
        ("HEADROOM_REDIS_WAIT_REPLICAS", "1"),
        ("HEADROOM_REDIS_TIMEOUT", "1s"),
    ]);
    let ids: Vec<String> = (0..24).map(|i| format!("fo-{i}")).collect();
    for id in &ids {
        let (status, body) = tracker
            .send(
                Method::PUT,
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                Some(r#"{"features": {"api": {"included": 100, "hard_cap": 120}}}"#),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let calls: Vec<Call> = (0..2_400)
        .map(|n| (ids[n % ids.len()].clone(), format!("k{n}")))
        .collect();
    let statuses = Mutex::new(vec![0u16; calls.len()]);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let primary = c
        .nodes
        .iter()
        .position(|n| c.primaries().iter().any(|p| p.port == n.port))
        .expect("a primary");
    let workers = (0..8).map(|_| async {
        loop {
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n >= calls.len() {
                return;
            }
            let status = tracker.use_api(&calls[n].0, &calls[n].1).await;
            statuses.lock().expect("lock")[n] = status;
        }
    });
    let killer = async {
        while next.load(std::sync::atomic::Ordering::Relaxed) < 600 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.nodes[primary].kill();
        // The replica takes over (node timeout 2 s); the killed node comes
        // back as its replica, as an operator or an orchestrator restarts
        // it: with a replica to acknowledge writes, the shard takes them
        // again by itself. Until then its calls answer 503/504.
        tokio::time::sleep(Duration::from_secs(4)).await;
        c.nodes[primary].restart();
    };
    futures_util::future::join(join_all(workers), killer).await;
    let statuses = statuses.into_inner().expect("statuses");
    let mut seen: std::collections::BTreeMap<u16, usize> = Default::default();
    for s in &statuses {
        *seen.entry(*s).or_default() += 1;
    }
    assert!(
        seen.keys().all(|s| [200, 429, 503, 504].contains(s)),
        "answers during the failover: {seen:?}"
    );
    assert!(
        seen.get(&503).or(seen.get(&504)).is_some(),
        "the kill was felt: {seen:?}"
    );

    // It recovers by itself.
    c.wait_until_ok(6);
    c.wait_for_replicas(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for id in &ids {
        while tracker
            .send(
                Method::GET,
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                None,
            )
            .await
            .0
            != 200
        {
            assert!(std::time::Instant::now() < deadline, "{id} did not recover");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Every call again with its key: an acknowledged one answers its
    // decision again (it was stored), the others are decided now or
    // replayed; what is used is exactly what was granted, within the cap.
    let tracker = &tracker;
    let again = join_all(calls.chunks(300).map(|chunk| async move {
        let mut out = Vec::new();
        for call in chunk {
            out.push(tracker.use_api(&call.0, &call.1).await);
        }
        out
    }))
    .await
    .concat();
    let mut granted: std::collections::HashMap<&str, u64> = Default::default();
    for ((call, first), again) in calls.iter().zip(&statuses).zip(again) {
        if *first == 200 {
            assert_eq!(again, 200, "acknowledged call {call:?} lost");
        }
        assert!([200, 429].contains(&again), "{call:?} answered {again}");
        if again == 200 {
            *granted.entry(call.0.as_str()).or_default() += 1;
        }
    }
    for id in &ids {
        let used = tracker.api_used(id).await.1.expect("used");
        assert!(used <= 120, "{id} passed its cap: {used}");
        assert_eq!(used, granted[id.as_str()], "{id}: used vs granted");
    }
}
