//! The engine without HTTP: passivation, and a model-based test (seats,
//! usage, idempotent replays, reconfigurations, deletes, restarts and clock
//! steps across lease expiries and month ends) on memory and on Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use headroom::domain::{
    Amount, EntitlementConfig, EntitlementId, FeatureKey, IdempotencyKey, Outcome, SeatId,
};
use headroom::engine::{Clock, Engine, EngineError, EngineSettings, SystemClock, UsageRequest};
use proptest::prelude::*;

use crate::helpers::*;

fn eid(s: &str) -> EntitlementId {
    EntitlementId::parse(s).unwrap()
}

fn config(json: &str) -> EntitlementConfig {
    EntitlementConfig::from_json(json.as_bytes()).unwrap()
}

#[actix_rt::test]
async fn idle_entitlements_leave_memory_and_come_back_from_the_store() {
    // Long enough that all 300 are still resident when counted, even on a
    // loaded machine.
    let settings = EngineSettings {
        idle_timeout: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(25),
        ..EngineSettings::default()
    };
    let engine = Engine::new(memory_store(), Arc::new(SystemClock), settings);
    for i in 0..300 {
        let id = eid(&format!("e{i}"));
        engine
            .put(&id, config(r#"{"seats": {"purchased": 1}}"#))
            .await
            .unwrap();
        engine
            .activate(&id, SeatId::parse("a").unwrap())
            .await
            .unwrap();
    }
    for i in 0..50 {
        assert!(matches!(
            engine.get(&eid(&format!("ghost{i}"))).await,
            Err(EngineError::NotFound(_))
        ));
    }
    assert!(engine.resident() >= 300);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.resident() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} still resident",
            engine.resident()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Passivated state is reloaded on the next call.
    let d = engine
        .activate(&eid("e7"), SeatId::parse("b").unwrap())
        .await
        .unwrap();
    assert_eq!((d.outcome, d.in_use), (Outcome::Denied, 1));
    engine.shutdown().await;
}

#[derive(Debug, Clone)]
enum Op {
    Activate(u8),
    Release(u8),
    Usage {
        amount: u64,
        key: Option<u8>,
    },
    /// Moves the clock by this many seconds (even, so that no step lands
    /// exactly on a lease's end: leases last an odd 61 s).
    Advance(i64),
    /// New seat limits: purchased, hard cap.
    Reconfigure(u64, u64),
    /// Deletes the entitlement and creates it again: a fresh incarnation.
    Reset,
    /// A new engine on the same store: everything is read back.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..12).prop_map(Op::Activate),
        2 => (0u8..12).prop_map(Op::Release),
        4 => (1u64..6, proptest::option::of(0u8..6)).prop_map(|(amount, key)| Op::Usage { amount, key }),
        2 => prop_oneof![1i64..60, 1i64..40 * 86_400].prop_map(|half| Op::Advance(2 * half)),
        1 => (0u64..8, 0u64..4).prop_map(|(p, extra)| Op::Reconfigure(p, p + extra)),
        1 => Just(Op::Reset),
        1 => Just(Op::Restart),
    ]
}

const LEASE: i64 = 61;

fn seats_config(purchased: u64, cap: u64) -> EntitlementConfig {
    config(&format!(
        r#"{{"seats": {{"purchased": {purchased}, "hard_cap": {cap}, "lease_seconds": {LEASE}}},
            "features": {{"f": {{"included": 20, "hard_cap": 30, "period": "month"}}}}}}"#
    ))
}

/// The reference: seats with their lease ends, a counter for the current
/// calendar month, and the first decision of each key.
#[derive(Default)]
struct Model {
    seats: HashMap<u8, chrono::DateTime<chrono::Utc>>,
    cap: u64,
    used: u64,
    month: (i32, u32),
    keys: HashMap<u8, (u64, u64, Outcome)>,
}

impl Model {
    fn at(&mut self, now: chrono::DateTime<chrono::Utc>) {
        use chrono::Datelike;
        self.seats.retain(|_, ends| *ends > now);
        if (now.year(), now.month()) != self.month {
            self.month = (now.year(), now.month());
            self.used = 0;
        }
    }
}

/// Runs `ops` against the engine and compares each answer with [`Model`].
async fn run_model(
    ops: Vec<Op>,
    store: Arc<dyn headroom::store::Store>,
) -> Result<(), TestCaseError> {
    let clock = manual_clock("2026-01-30T12:00:00Z");
    let start = || Engine::new(store.clone(), clock.clone(), EngineSettings::default());
    let mut engine = start();
    let id = eid("acme");
    engine.put(&id, seats_config(4, 6)).await.unwrap();
    let feature = FeatureKey::parse("f").unwrap();
    let mut m = Model {
        cap: 6,
        ..Model::default()
    };
    m.at(clock.now());
    for op in ops {
        let now = clock.now();
        m.at(now);
        match op {
            Op::Activate(s) => {
                let d = engine
                    .activate(&id, SeatId::parse(&format!("s{s}")).unwrap())
                    .await
                    .unwrap();
                let fits = m.seats.contains_key(&s) || (m.seats.len() as u64) < m.cap;
                prop_assert_eq!(d.outcome != Outcome::Denied, fits, "activate s{}", s);
                if fits {
                    m.seats.insert(s, now + chrono::Duration::seconds(LEASE));
                }
                prop_assert_eq!(d.in_use, m.seats.len() as u64);
            }
            Op::Release(s) => {
                let r = engine
                    .release(&id, SeatId::parse(&format!("s{s}")).unwrap())
                    .await
                    .unwrap();
                prop_assert_eq!(r.released, m.seats.remove(&s).is_some());
            }
            Op::Usage { amount, key } => {
                let req = UsageRequest {
                    feature: feature.clone(),
                    amount: Amount::new(amount).unwrap(),
                    idempotency_key: key.map(|k| IdempotencyKey::parse(&format!("k{k}")).unwrap()),
                };
                let res = engine.consume(&id, req).await;
                match key.and_then(|k| m.keys.get(&k).copied()) {
                    Some((first_amount, first_used, first_outcome)) => {
                        if first_amount == amount {
                            let r = res.unwrap();
                            prop_assert!(r.replayed);
                            prop_assert_eq!(
                                (r.decision.used, r.decision.outcome),
                                (first_used, first_outcome)
                            );
                        } else {
                            prop_assert!(matches!(res, Err(EngineError::Conflict(_))));
                        }
                    }
                    None => {
                        let r = res.unwrap();
                        let fits = m.used + amount <= 30;
                        if fits {
                            m.used += amount;
                        }
                        prop_assert_eq!(r.decision.outcome != Outcome::Denied, fits);
                        prop_assert_eq!(r.decision.used, m.used);
                        if let Some(k) = key {
                            m.keys
                                .insert(k, (amount, r.decision.used, r.decision.outcome));
                        }
                    }
                }
            }
            Op::Advance(secs) => clock.advance(chrono::Duration::seconds(secs)),
            Op::Reconfigure(purchased, cap) => {
                engine.put(&id, seats_config(purchased, cap)).await.unwrap();
                m.cap = cap;
            }
            Op::Reset => {
                engine.delete(&id).await.unwrap();
                engine.put(&id, seats_config(4, 6)).await.unwrap();
                m = Model {
                    cap: 6,
                    ..Model::default()
                };
                m.at(now);
            }
            Op::Restart => {
                engine.shutdown().await;
                engine = start();
            }
        }
    }
    m.at(clock.now());
    let view = engine.get(&id).await.unwrap();
    prop_assert_eq!(
        view.features[&feature].used,
        m.used,
        "replays changed nothing"
    );
    prop_assert_eq!(view.seats.in_use, m.seats.len() as u64);
    engine.shutdown().await;
    Ok(())
}

#[test]
fn engine_matches_the_model_on_redis() {
    let redis = RedisServer::start();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(24));
    let case = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        actix_rt::System::new()
            .block_on(async { run_model(ops, redis_store(&redis, &format!("model{n}"))).await })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn engine_matches_the_model_with_idempotent_replays(ops in proptest::collection::vec(op(), 1..60)) {
        actix_rt::System::new().block_on(run_model(ops, memory_store()))?;
    }
}

/// Counts the commits and loads that reach the store.
pub(crate) struct CountingStore {
    inner: Arc<dyn headroom::store::Store>,
    pub(crate) commits: std::sync::atomic::AtomicUsize,
    pub(crate) loads: std::sync::atomic::AtomicUsize,
}

impl CountingStore {
    pub(crate) fn new(inner: Arc<dyn headroom::store::Store>) -> Self {
        CountingStore {
            inner,
            commits: Default::default(),
            loads: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl headroom::store::Store for CountingStore {
    async fn load(
        &self,
        id: &EntitlementId,
    ) -> Result<headroom::store::Loaded, headroom::store::StoreError> {
        self.loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.load(id).await
    }
    async fn epoch(&self, id: &EntitlementId) -> Result<u64, headroom::store::StoreError> {
        self.inner.epoch(id).await
    }
    async fn commit(
        &self,
        commit: headroom::store::Commit,
    ) -> Result<headroom::store::CommitOutcome, headroom::store::StoreError> {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.commit(commit).await
    }
    async fn ping(&self) -> Result<(), headroom::store::StoreError> {
        self.inner.ping().await
    }
    async fn stream_length(&self) -> Result<u64, headroom::store::StoreError> {
        self.inner.stream_length().await
    }
    async fn overdraft_totals(
        &self,
    ) -> Result<headroom::store::OverdraftCounts, headroom::store::StoreError> {
        self.inner.overdraft_totals().await
    }
    async fn peek_many(
        &self,
        ids: &[EntitlementId],
    ) -> Result<Vec<headroom::store::Peeked>, headroom::store::StoreError> {
        self.inner.peek_many(ids).await
    }
    async fn overdraft_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, headroom::store::StoreError> {
        self.inner.overdraft_page(after, limit).await
    }
    async fn entitlement_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, headroom::store::StoreError> {
        self.inner.entitlement_page(after, limit).await
    }
    async fn events_page(
        &self,
        from: headroom::store::EventsFrom,
        of: Option<&EntitlementId>,
        limit: usize,
    ) -> Result<headroom::store::EventsPage, headroom::store::StoreError> {
        self.inner.events_page(from, of, limit).await
    }
    async fn denied_page(
        &self,
        since: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, headroom::store::StoreError> {
        self.inner.denied_page(since, after, limit).await
    }
    async fn history(
        &self,
        id: &EntitlementId,
        size: headroom::domain::BucketSize,
        starts: &[i64],
    ) -> Result<Vec<Option<headroom::domain::BucketRecord>>, headroom::store::StoreError> {
        self.inner.history(id, size, starts).await
    }
    async fn links_revoked_at(
        &self,
        id: &EntitlementId,
    ) -> Result<Option<i64>, headroom::store::StoreError> {
        self.inner.links_revoked_at(id).await
    }
    async fn revoke_links(
        &self,
        id: &EntitlementId,
        at: i64,
        keep: std::time::Duration,
    ) -> Result<(), headroom::store::StoreError> {
        self.inner.revoke_links(id, at, keep).await
    }
    async fn periods(
        &self,
        id: &EntitlementId,
        limit: usize,
    ) -> Result<Vec<String>, headroom::store::StoreError> {
        self.inner.periods(id, limit).await
    }
    async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[actix_rt::test]
async fn concurrent_calls_share_writes() {
    let redis = RedisServer::start();
    let store = Arc::new(CountingStore::new(redis_store(&redis, "group")));
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    let id = eid("hot");
    engine
        .put(&id, config(r#"{"features": {"f": {"included": 1000000}}}"#))
        .await
        .unwrap();
    let before = store.commits.load(std::sync::atomic::Ordering::Relaxed);
    let calls = (0..500).map(|i| {
        let engine = &engine;
        let id = &id;
        async move {
            let req = UsageRequest {
                feature: FeatureKey::parse("f").unwrap(),
                amount: Amount::new(1).unwrap(),
                idempotency_key: Some(IdempotencyKey::parse(&format!("k{i}")).unwrap()),
            };
            engine.consume(id, req).await
        }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    let commits = store.commits.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        commits < 500,
        "500 calls took {commits} writes: no group commit"
    );
    let view = engine.get(&id).await.unwrap();
    assert_eq!(view.features[&FeatureKey::parse("f").unwrap()].used, 500);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn idle_entitlements_hibernate_wake_without_the_store_and_still_expire_leases() {
    let clock = manual_clock("2026-11-28T00:00:00Z");
    let store = Arc::new(CountingStore {
        inner: memory_store(),
        commits: Default::default(),
        loads: Default::default(),
    });
    let settings = EngineSettings {
        hibernate_after: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(60),
        sweep_interval: Duration::from_millis(20),
        ..EngineSettings::default()
    };
    let engine = Engine::new(store.clone(), clock.clone(), settings);
    for i in 0..100 {
        let id = eid(&format!("e{i}"));
        engine
            .put(
                &id,
                config(r#"{"seats": {"purchased": 1, "lease_seconds": 60}}"#),
            )
            .await
            .unwrap();
        engine
            .activate(&id, SeatId::parse("a").unwrap())
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.counts() != (0, 100) {
        assert!(
            Instant::now() < deadline,
            "not dormant: {:?}",
            engine.counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Woken by a call: the state is the committed one, not read again.
    let loads = store.loads.load(std::sync::atomic::Ordering::Relaxed);
    let d = engine
        .activate(&eid("e3"), SeatId::parse("b").unwrap())
        .await
        .unwrap();
    assert_eq!((d.outcome, d.in_use), (Outcome::Denied, 1));
    assert_eq!(
        store.loads.load(std::sync::atomic::Ordering::Relaxed),
        loads
    );
    // Leases of dormant entitlements still expire on time, with their event.
    let before = store.commits.load(std::sync::atomic::Ordering::Relaxed);
    clock.advance(chrono::Duration::seconds(61));
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.commits.load(std::sync::atomic::Ordering::Relaxed) < before + 100 {
        assert!(
            Instant::now() < deadline,
            "leases of dormant entitlements did not expire"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = engine.get(&eid("e42")).await.unwrap();
    assert_eq!(view.seats.in_use, 0);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn overdraft_totals_are_exact_across_restarts_and_processes() {
    let redis = RedisServer::start();
    let store = redis_store(&redis, "totals");
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    let cfg = config(
        r#"{"seats": {"purchased": 1, "hard_cap": 5}, "features": {"f": {"included": 10, "hard_cap": 100}}}"#,
    );
    for id in ["a", "b", "c"] {
        engine.put(&eid(id), cfg.clone()).await.unwrap();
    }
    for seat in ["s1", "s2", "s3"] {
        engine
            .activate(&eid("a"), SeatId::parse(seat).unwrap())
            .await
            .unwrap();
    }
    engine
        .activate(&eid("b"), SeatId::parse("s1").unwrap())
        .await
        .unwrap();
    engine
        .activate(&eid("b"), SeatId::parse("s2").unwrap())
        .await
        .unwrap();
    let usage = UsageRequest {
        feature: FeatureKey::parse("f").unwrap(),
        amount: Amount::new(20).unwrap(),
        idempotency_key: None,
    };
    engine.consume(&eid("c"), usage).await.unwrap();
    let totals = store.overdraft_totals().await.unwrap();
    assert_eq!(
        (totals.entitlements, totals.seats),
        (3, 3),
        "a: 2 seats over, b: 1, c: usage"
    );
    engine.shutdown().await;

    // Another process on the same Redis: the totals carry over and stay exact.
    let store = redis_store(&redis, "totals");
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    engine
        .release(&eid("a"), SeatId::parse("s3").unwrap())
        .await
        .unwrap();
    engine
        .release(&eid("b"), SeatId::parse("s2").unwrap())
        .await
        .unwrap();
    engine.delete(&eid("c")).await.unwrap();
    let totals = store.overdraft_totals().await.unwrap();
    assert_eq!(
        (totals.entitlements, totals.seats),
        (1, 1),
        "only a is left, one seat over"
    );
    engine.shutdown().await;
}
