//! One domain decision, without I/O: the floor under every other figure.

use std::hint::black_box;

use chrono::{DateTime, Duration, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use headroom::domain::{
    Amount, Effects, Entitlement, EntitlementConfig, EntitlementId, FeatureKey, SeatId,
};

fn entitlement(now: DateTime<Utc>) -> Entitlement {
    let cfg = EntitlementConfig::from_json(
        br#"{"seats": {"purchased": 100, "hard_cap": 120, "lease_seconds": 3600},
             "features": {"api": {"included": 1000000000, "hard_cap": 1200000000, "period": "month",
                                  "thresholds": [50, 80, 100, 110]}}}"#,
    )
    .expect("valid config");
    Entitlement::create(
        EntitlementId::parse("acme").expect("id"),
        cfg,
        now,
        &mut Effects::default(),
    )
}

fn decisions(c: &mut Criterion) {
    let now: DateTime<Utc> = "2026-11-28T00:00:00Z".parse().expect("time");
    let mut g = c.benchmark_group("domain");
    g.throughput(Throughput::Elements(1));

    let mut e = entitlement(now);
    let api = FeatureKey::parse("api").expect("key");
    let one = Amount::new(1).expect("amount");
    let mut fx = Effects::default();
    g.bench_function("usage decision", |b| {
        b.iter(|| {
            fx.events.clear();
            black_box(e.consume(&api, one, now, &mut fx).expect("feature"))
        })
    });

    let mut e = entitlement(now);
    let seats: Vec<SeatId> = (0..200)
        .map(|i| SeatId::parse(&format!("user-{i}")).expect("seat"))
        .collect();
    let mut i = 0usize;
    let mut fx = Effects::default();
    g.bench_function("seat activate or release", |b| {
        b.iter(|| {
            i = (i * 1_103_515_245 + 12_345) % seats.len();
            fx.events.clear();
            fx.seats.clear();
            let seat = &seats[i];
            if e.seats.lease(seat).is_some() {
                black_box(e.release(seat, now + Duration::seconds(1), &mut fx));
            } else {
                black_box(e.activate(seat, now + Duration::seconds(1), &mut fx));
            }
        })
    });
    // The live state written with every commit.
    let mut e = entitlement(now);
    let mut fx = Effects::default();
    e.consume(&api, Amount::new(10).expect("amount"), now, &mut fx)
        .expect("feature");
    e.activate(&seats[0], now, &mut fx);
    g.bench_function("state encode (written with each commit)", |b| {
        b.iter(|| black_box(serde_json::to_vec(black_box(&e)).expect("encodes")))
    });
    eprintln!(
        "state: {} bytes",
        serde_json::to_vec(&e).map_or(0, |v| v.len())
    );
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
