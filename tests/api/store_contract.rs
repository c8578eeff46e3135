//! One contract, both stores: the in-memory store and Redis must behave alike.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use headroom::domain::{
    Effects, Entitlement, EntitlementConfig, EntitlementId, IdempotencyKey, Lease, SeatId,
};
use headroom::store::{Commit, CommitOutcome, KeyRecord, Store, Write};

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

async fn contract(store: Arc<dyn Store>) {
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

    // Delete removes state and seats; the entitlement is unknown again.
    let del = Commit {
        id: id(),
        epoch: after.epoch,
        claim: false,
        write: Write::Delete,
        events: vec![("entitlement.deleted", "{}".into())],
        idempotency: vec![],
        overdraft: Default::default(),
    };
    assert!(matches!(
        store.commit(del).await.unwrap(),
        CommitOutcome::Applied { .. }
    ));
    let gone = store.load(&id()).await.unwrap();
    assert!(gone.state.is_none());
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
    // Keys carry the prefix and one hash tag per entitlement.
    let mut c = redis.conn();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "contract:events",
            "contract:{acme}:epoch",
            "contract:{acme}:key:1795824000000:k1",
            "contract:{acme}:key:1795824000000:k2"
        ]
    );
}
