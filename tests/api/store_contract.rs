//! One contract, both stores: the in-memory store and Redis must behave alike.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use headroom::domain::{
    BucketRecord, BucketSize, Effects, Entitlement, EntitlementConfig, EntitlementId, FieldOp,
    IdempotencyKey, Lease, SeatId,
};
use headroom::store::{Commit, CommitOutcome, HistoryWrite, KeyRecord, Records, Store, Write};

use crate::helpers::*;

fn now() -> DateTime<Utc> {
    "2026-11-28T00:00:00Z".parse().unwrap_or_default()
}

fn id() -> EntitlementId {
    EntitlementId::parse("acme").unwrap()
}

fn state(purchased: u64) -> Entitlement {
    let cfg = EntitlementConfig::from_json(
        format!(r#"{{"seats": {{"purchased": {purchased}}}}}"#).as_bytes(),
    )
    .unwrap();
    Entitlement::create(id(), cfg, now(), &mut Effects::default())
}

fn seat(s: &str) -> SeatId {
    SeatId::parse(s).unwrap()
}

fn lease() -> Lease {
    Lease {
        activated_at: now(),
        expires_at: None,
    }
}

fn put(
    epoch: u64,
    claim: bool,
    e: &Entitlement,
    seats: Vec<(SeatId, Option<Lease>)>,
    keys: &[&str],
) -> Commit {
    Commit {
        id: id(),
        epoch,
        claim,
        write: Write::Put {
            replace: false,
            core: serde_json::to_string(e).unwrap(),
            config: claim.then(|| serde_json::to_string(&e.config).unwrap()),
            seats,
        },
        events: vec![("entitlement.updated", "{}".into())],
        overdraft: Default::default(),
        records: Records::default(),
        idempotency: keys
            .iter()
            .map(|k| KeyRecord {
                incarnation: e.incarnation(),
                key: IdempotencyKey::parse(k).unwrap(),
                record: format!("record-of-{k}"),
            })
            .collect(),
    }
}

pub async fn contract(store: Arc<dyn Store>) {
    // Unknown: nothing, not claimed.
    let loaded = store.load(&id()).await.unwrap();
    assert!(loaded.state.is_none() && !loaded.claimed);

    // The first write claims the epoch; a second creator with the old epoch is fenced.
    let e = state(5);
    let first = store
        .commit(put(
            loaded.epoch,
            true,
            &e,
            vec![(seat("a"), Some(lease()))],
            &["k1"],
        ))
        .await
        .unwrap();
    let CommitOutcome::Applied { epoch } = first else {
        panic!("{first:?}")
    };
    assert_eq!(epoch, loaded.epoch + 1);
    let rival = store
        .commit(put(loaded.epoch, true, &state(9), vec![], &[]))
        .await
        .unwrap();
    assert_eq!(rival, CommitOutcome::Fenced);

    // Loading claims again: the previous owner's epoch no longer writes.
    let reloaded = store.load(&id()).await.unwrap();
    assert!(reloaded.claimed && reloaded.epoch > epoch);
    let got = reloaded.state.unwrap();
    assert_eq!(got.config.seats.purchased, 5);
    assert_eq!(got.seats.in_use(), 1);
    assert_eq!(
        store
            .commit(put(epoch, false, &e, vec![], &[]))
            .await
            .unwrap(),
        CommitOutcome::Fenced
    );

    // A used idempotency key refuses the whole commit and returns its record.
    let e2 = state(7);
    let used = store
        .commit(put(
            reloaded.epoch,
            false,
            &e2,
            vec![(seat("b"), Some(lease()))],
            &["k2", "k1"],
        ))
        .await
        .unwrap();
    assert_eq!(
        used,
        CommitOutcome::KeysExist(vec![(
            IdempotencyKey::parse("k1").unwrap(),
            "record-of-k1".into()
        )])
    );
    let after = store.load(&id()).await.unwrap();
    let s = after.state.unwrap();
    assert_eq!(
        (s.config.seats.purchased, s.seats.in_use()),
        (5, 1),
        "nothing of it was written"
    );

    // Seats are written and removed one by one.
    let c = put(
        after.epoch,
        false,
        &e2,
        vec![(seat("a"), None), (seat("b"), Some(lease()))],
        &["k2"],
    );
    assert!(matches!(
        store.commit(c).await.unwrap(),
        CommitOutcome::Applied { .. }
    ));
    let after = store.load(&id()).await.unwrap();
    let s = after.state.unwrap();
    assert_eq!(s.seats.in_use(), 1);
    assert!(s.seats.lease(&seat("b")).is_some());

    // Records go with the write: the report indexes, the history buckets
    // (a peak keeps the larger value, counts add up) and closed periods.
    let hour = now().timestamp_millis();
    let far = hour + 400 * 86_400_000;
    let history = |peak: u64, added: u64| {
        let ops = vec![
            FieldOp::Max("sp", peak),
            FieldOp::Set("se", 3),
            FieldOp::Add("u:api".into(), added),
        ];
        HistoryWrite {
            hour,
            hour_ops: ops.clone(),
            day_ops: ops,
            hour_expire_at: far,
            day_expire_at: far,
        }
    };
    // Peeking reads the stored state without claiming it: the owner's
    // next write (with the epoch it holds) still goes through.
    let peeked = store
        .peek_many(&[id(), EntitlementId::parse("nobody").unwrap()])
        .await
        .unwrap();
    assert_eq!(peeked.len(), 2);
    let p = peeked[0]
        .as_ref()
        .expect("readable")
        .as_ref()
        .expect("stored");
    assert_eq!((p.config.seats.purchased, p.seats.in_use()), (5, 1));
    assert!(p.seats.lease(&seat("b")).is_some());
    assert!(peeked[1].as_ref().expect("readable").is_none());
    let mut c = put(after.epoch, false, &e2, vec![], &[]);
    c.records = Records {
        in_overdraft: Some(true),
        denied_at: Some(hour + 5),
        history: vec![history(4, 7)],
        periods: vec![r#"{"n":1}"#.into(), r#"{"n":2}"#.into()],
        periods_expire_at: far,
    };
    assert!(matches!(
        store.commit(c).await.unwrap(),
        CommitOutcome::Applied { .. }
    ));
    let mut c = put(after.epoch, false, &e2, vec![], &[]);
    c.records.history = vec![history(2, 1)];
    assert!(matches!(
        store.commit(c).await.unwrap(),
        CommitOutcome::Applied { .. }
    ));
    assert_eq!(store.overdraft_page(None, 10).await.unwrap(), ["acme"]);
    assert!(
        store
            .overdraft_page(Some("acme"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.denied_page(hour, None, 10).await.unwrap(),
        [("acme".to_string(), hour + 5)]
    );
    assert!(
        store
            .denied_page(hour + 6, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .denied_page(hour, Some((hour + 5, "acme".into())), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let expected = BucketRecord {
        seats_peak: Some(4),
        seats_end: Some(3),
        seats_denied: 0,
        features: [("api".to_string(), (8, 0))].into(),
    };
    assert_eq!(
        store
            .history(&id(), BucketSize::Hour, &[hour - 3_600_000, hour])
            .await
            .unwrap(),
        [None, Some(expected.clone())]
    );
    assert_eq!(
        store
            .history(&id(), BucketSize::Day, &[BucketSize::Day.start(hour)])
            .await
            .unwrap(),
        [Some(expected)]
    );
    assert_eq!(
        store.periods(&id(), 10).await.unwrap(),
        [r#"{"n":2}"#, r#"{"n":1}"#]
    );
    assert_eq!(store.periods(&id(), 1).await.unwrap(), [r#"{"n":2}"#]);

    // Delete removes state and seats; the entitlement is unknown again.
    let del = Commit {
        id: id(),
        epoch: after.epoch,
        claim: false,
        write: Write::Delete,
        events: vec![("entitlement.deleted", "{}".into())],
        idempotency: vec![],
        overdraft: Default::default(),
        records: Records {
            in_overdraft: Some(false),
            ..Records::default()
        },
    };
    assert!(matches!(
        store.commit(del).await.unwrap(),
        CommitOutcome::Applied { .. }
    ));
    let gone = store.load(&id()).await.unwrap();
    assert!(gone.state.is_none());
    // It left both report indexes; its history and billing records stay.
    assert!(store.overdraft_page(None, 10).await.unwrap().is_empty());
    assert!(store.denied_page(0, None, 10).await.unwrap().is_empty());
    assert_eq!(store.periods(&id(), 10).await.unwrap().len(), 2);
    store.shutdown().await;
}

#[actix_rt::test]
async fn memory_store_keeps_the_contract() {
    contract(memory_store()).await;
}

#[actix_rt::test]
async fn redis_store_keeps_the_contract() {
    let redis = RedisServer::start();
    contract(redis_store(&redis, "contract")).await;
    // Keys carry the prefix and the hash tag of the entitlement's bucket;
    // the layout is recorded.
    let mut c = redis.conn();
    let mut stored: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    stored.sort();
    let k = keys("contract");
    let acme = EntitlementId::parse("acme").unwrap();
    let b = k.bucket_of(&acme);
    let at = 1_795_824_000_000;
    let mut expected = vec![
        k.events(b),
        k.epoch(&acme),
        k.history(&acme, BucketSize::Day, at),
        k.history(&acme, BucketSize::Hour, at),
        k.idempotency(&acme, at, &IdempotencyKey::parse("k1").unwrap()),
        k.idempotency(&acme, at, &IdempotencyKey::parse("k2").unwrap()),
        k.periods(&acme),
        k.meta(),
    ];
    expected.sort();
    assert_eq!(stored, expected);
    let tag = format!(
        "contract:{{{}}}:",
        k.events(b).split(['{', '}']).nth(1).unwrap()
    );
    assert!(
        stored.iter().all(|s| s.starts_with(&tag) || *s == k.meta()),
        "{stored:?}"
    );
}
