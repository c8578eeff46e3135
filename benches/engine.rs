//! The engine in process (in-memory store): decisions per second through the
//! actors, on one hot entitlement and on 10,000 entitlements with Zipf
//! traffic, 64 calls in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use headroom::domain::{Amount, EntitlementId, FeatureKey};
use headroom::engine::{Engine, EngineSettings, SystemClock, UsageRequest};
use headroom::store::MemoryStore;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

const IN_FLIGHT: usize = 64;

fn setup(sys: &actix_rt::SystemRunner, n: usize) -> (Engine, Vec<EntitlementId>) {
    let store = Arc::new(MemoryStore::new(1_000_000, Duration::from_secs(86_400)));
    let engine = Engine::new(store, Arc::new(SystemClock), EngineSettings::default());
    let ids = sys.block_on(common::create_entitlements(&engine, n));
    (engine, ids)
}

fn run(
    sys: &actix_rt::SystemRunner,
    engine: &Engine,
    targets: &[usize],
    ids: &[EntitlementId],
) -> Duration {
    let api = FeatureKey::parse("api").expect("key");
    sys.block_on(async {
        let started = Instant::now();
        futures_util::stream::iter(targets)
            .for_each_concurrent(IN_FLIGHT, |&t| {
                let req = UsageRequest {
                    feature: api.clone(),
                    amount: Amount::new(1).expect("amount"),
                    idempotency_key: None,
                };
                let id = &ids[t];
                async move {
                    engine.consume(id, req).await.expect("decision");
                }
            })
            .await;
        started.elapsed()
    })
}

fn engine(c: &mut Criterion) {
    let sys = actix_rt::System::new();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));

    let (hot, hot_ids) = setup(&sys, 1);
    g.bench_function("one hot entitlement", |b| {
        b.iter_custom(|iters| run(&sys, &hot, &vec![0; iters as usize], &hot_ids))
    });

    let (many, many_ids) = setup(&sys, 10_000);
    let zipf = Zipf::new(10_000.0, 1.1).expect("zipf");
    let mut rng = SmallRng::seed_from_u64(7);
    g.bench_function("10k entitlements, Zipf 1.1", |b| {
        b.iter_custom(|iters| {
            let targets: Vec<usize> = (0..iters)
                .map(|_| zipf.sample(&mut rng) as usize - 1)
                .collect();
            run(&sys, &many, &targets, &many_ids)
        })
    });
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
