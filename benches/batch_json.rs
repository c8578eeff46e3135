//! Decoding and encoding a 1,000-event `POST /v1/usage/batch`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use headroom::domain::{Limit, Outcome, UsageDecision};
use headroom::engine::UsageReply;
use headroom::http::batch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn body(n: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(1);
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"entitlement":"customer-{}","feature":"api_calls","amount":{},"idempotency_key":"evt-{i}"}}"#,
                rng.random_range(0..1000),
                rng.random_range(1..100)
            )
        })
        .collect();
    format!(r#"{{"events":[{}]}}"#, events.join(",")).into_bytes()
}

fn json(c: &mut Criterion) {
    let body = body(1000);
    let mut g = c.benchmark_group("batch json (1,000 events)");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(batch::decode(black_box(&body)).expect("valid")))
    });

    let decoded = batch::decode(&body).expect("valid");
    let results: Vec<_> = decoded
        .into_iter()
        .map(|d| {
            let (_, req) = d.expect("valid event");
            batch::Slot::Decided(Ok(UsageReply {
                decision: UsageDecision {
                    outcome: Outcome::Granted,
                    reason: None,
                    feature: req.feature,
                    amount: req.amount.get(),
                    used: 1234,
                    included: 1_000_000,
                    hard_cap: Limit::Finite(1_200_000),
                    remaining_purchased: 998_766,
                    remaining_overdraft: Some(200_000),
                    period_start: None,
                    period_end: None,
                },
                replayed: false,
            }))
        })
        .collect();
    g.bench_function("encode", |b| {
        b.iter(|| black_box(batch::encode(black_box(&results))))
    });
    g.finish();
}

criterion_group!(benches, json);
criterion_main!(benches);
