//! The Redis store's group commit: decisions persisted per second, and Redis
//! round trips per decision, with 1 to 256 calls in flight on one hot
//! entitlement and spread over 1,000 entitlements. Starts its own
//! redis-server on a free port.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use headroom::domain::{Amount, EntitlementConfig, EntitlementId, FeatureKey};
use headroom::engine::{Engine, EngineSettings, SystemClock, UsageRequest};
use headroom::store::{RedisSettings, RedisStore};

struct Redis(Child, u16, std::path::PathBuf);

impl Redis {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let dir = std::env::temp_dir().join(format!("headroom-bench-{port}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        let url = format!("redis://127.0.0.1:{port}/");
        for _ in 0..500 {
            let up = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis(child, port, dir)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.2);
    }
}

fn group_commit(c: &mut Criterion) {
    let redis = Redis::start();
    let sys = actix_rt::System::new();
    let (engine, store) = sys.block_on(async {
        let store = Arc::new(
            RedisStore::start(RedisSettings::new(format!(
                "redis://127.0.0.1:{}/",
                redis.1
            )))
            .expect("store"),
        );
        let engine = Engine::new(
            store.clone(),
            Arc::new(SystemClock),
            EngineSettings::default(),
        );
        (engine, store)
    });
    let ids: Vec<EntitlementId> = (0..1000)
        .map(|i| EntitlementId::parse(&format!("e{i}")).expect("id"))
        .collect();
    let cfg = EntitlementConfig::from_json(
        br#"{"features": {"api": {"included": 1000000000000, "hard_cap": "unlimited"}}}"#,
    )
    .expect("config");
    sys.block_on(async {
        for id in &ids {
            engine.put(id, cfg.clone()).await.expect("put");
        }
    });
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
