//! The Redis store's group commit: decisions persisted per second, and Redis
//! round trips per decision, with 1 to 256 calls in flight on one hot
//! entitlement and spread over 1,000 entitlements. Starts its own
//! redis-server on a free port.

use std::sync::Arc;
use std::time::Instant;

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use headroom::domain::{Amount, FeatureKey};
use headroom::engine::{Engine, EngineSettings, SystemClock, UsageRequest};
use headroom::store::{RedisStore, StoreSettings};
use headroom_test_support::RedisServer;

fn group_commit(c: &mut Criterion) {
    // No persistence: this measures group commit, not the disk.
    let redis = RedisServer::start_with(&["--appendonly", "no"]);
    let sys = actix_rt::System::new();
    let (engine, store) = sys.block_on(async {
        let window = EngineSettings::default().idempotency_window;
        let store = Arc::new(
            RedisStore::start(&redis.url(), &StoreSettings::default(), window).expect("store"),
        );
        let engine = Engine::new(
            store.clone(),
            Arc::new(SystemClock),
            EngineSettings::default(),
        );
        (engine, store)
    });
    let ids = sys.block_on(common::create_entitlements(&engine, 1000));
    let api = FeatureKey::parse("api").expect("key");
    let mut g = c.benchmark_group("redis group commit");
    g.throughput(Throughput::Elements(1));
    for (label, spread) in [("hot entitlement", 1usize), ("1,000 entitlements", 1000)] {
        for in_flight in [1usize, 16, 64, 256] {
            let (mut decisions, trips_before) = (0u64, store.round_trips());
            g.bench_with_input(
                BenchmarkId::new(label, in_flight),
                &in_flight,
                |b, &in_flight| {
                    b.iter_custom(|iters| {
                        decisions += iters;
                        sys.block_on(async {
                            let started = Instant::now();
                            futures_util::stream::iter(0..iters as usize)
                                .for_each_concurrent(in_flight, |i| {
                                    let req = UsageRequest {
                                        feature: api.clone(),
                                        amount: Amount::new(1).expect("amount"),
                                        idempotency_key: None,
                                    };
                                    let (engine, id) = (&engine, &ids[i % spread]);
                                    async move {
                                        engine.consume(id, req).await.expect("decision");
                                    }
                                })
                                .await;
                            started.elapsed()
                        })
                    })
                },
            );
            let trips = store.round_trips() - trips_before;
            eprintln!(
                "  {label}, {in_flight} in flight: {:.3} Redis round trips per decision",
                trips as f64 / decisions.max(1) as f64
            );
        }
    }
    g.finish();
    sys.block_on(engine.shutdown());
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
