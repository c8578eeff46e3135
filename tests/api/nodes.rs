//! Several headroom nodes on one Redis: who the members are.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

const SECRET: &str = "test-cluster-secret-0123456789";

fn node(redis: &RedisServer) -> TrackerProcess {
    let url = redis.url();
    TrackerProcess::spawn_env(&[
        ("HEADROOM_REDIS_URL", &url),
        ("HEADROOM_REDIS_PREFIX", "nodes"),
        ("HEADROOM_CLUSTER_SECRET", SECRET),
        ("HEADROOM_CLUSTER_LEASE", "2s"),
    ])
}

async fn members(node: &TrackerProcess) -> Value {
    let (status, body) = node
        .send(Method::GET, "/v1/cluster", Some(ADMIN), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

fn ids(view: &Value) -> Vec<String> {
    view["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_string())
        .collect()
}

/// Waits until every node in `nodes` sees exactly `want` members.
async fn until_members(nodes: &[&TrackerProcess], want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut views = Vec::new();
        for n in nodes {
            views.push(members(n).await);
        }
        if views.iter().all(|v| ids(v).len() == want) {
            return views;
        }
        assert!(Instant::now() < deadline, "members: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Alone, a node is its own only member, owning everything.
#[actix_rt::test]
async fn a_node_without_a_cluster_secret_is_alone() {
    let redis = RedisServer::start();
    let alone = TrackerProcess::start(&redis.url(), "alone").await;
    let view = members(&alone).await;
    assert_eq!(ids(&view).len(), 1, "{view}");
    assert_eq!(view["members"][0]["id"], view["self"]);
    assert_eq!(view["members"][0]["share"], 1.0);
    assert!(view["members"][0]["lease_expires"].is_null());
    let (status, _) = alone
        .send(Method::GET, "/v1/cluster", Some(CLIENT), None)
        .await;
    assert_eq!(status, 403, "admin only");
}

/// Three nodes on one Redis see the same three members with a third of
/// the entitlements each; a node stopped gracefully leaves at once, a node
/// killed is dropped when its lease runs out.
#[actix_rt::test]
async fn nodes_register_see_each_other_and_are_dropped_when_they_stop_or_die() {
    let redis = RedisServer::start();
    let (a, mut b, mut c) = (node(&redis), node(&redis), node(&redis));
    let views = until_members(&[&a, &b, &c], 3).await;
    let selves: Vec<String> = views
        .iter()
        .map(|v| v["self"].as_str().expect("self").to_string())
        .collect();
    let mut sorted = selves.clone();
    sorted.sort();
    for v in &views {
        assert_eq!(ids(v), sorted, "the same members, by id, on every node");
        let shares: Vec<f64> = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["share"].as_f64().expect("share"))
            .collect();
        assert!(
            (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{shares:?}"
        );
        assert!(
            shares.iter().all(|s| (0.28..0.39).contains(s)),
            "{shares:?}"
        );
        for m in v["members"].as_array().expect("members") {
            let address = m["address"].as_str().expect("address");
            assert!(address.starts_with("127.0.0.1:"), "{address}");
        }
    }
    let left = views[1]["self"].as_str().expect("self").to_string();
    assert!(b.terminate(), "b stops gracefully");
    // Gone at once: well before its 2 s lease would run out.
    let started = Instant::now();
    let views = until_members(&[&a, &c], 2).await;
    assert!(
        started.elapsed() < Duration::from_millis(1_900),
        "left by itself"
    );
    assert!(views.iter().all(|v| !ids(v).contains(&left)));

    let died = views[1]["self"].as_str().expect("self").to_string();
    c.kill();
    let views = until_members(&[&a], 1).await;
    assert!(!ids(&views[0]).contains(&died), "dropped after its lease");
}

/// Keyed usage calls on three entitlements, sent round robin through three
/// nodes (8 at a time): each call is served by its entitlement's owner, and
/// a read through any node then answers exactly the acknowledged total.
#[actix_rt::test]
async fn calls_through_any_node_are_served_by_the_owner_and_reads_are_exact() {
    let redis = RedisServer::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    until_members(&[&nodes[0], &nodes[1], &nodes[2]], 3).await;
    let ids = ["acme", "globex", "initech"];
    for id in ids {
        let (status, body) = nodes[0]
            .send(
                Method::PUT,
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                Some(r#"{"features": {"api": {"included": 1000000}}}"#),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let calls: Vec<(usize, &str, String)> = (0..600)
        .map(|n| (n % 3, ids[(n / 3) % 3], format!("k{n}")))
        .collect();
    let acked = std::sync::Mutex::new(std::collections::HashMap::<&str, u64>::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = (0..8).map(|_| async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((via, id, key)) = calls.get(i) else {
                return;
            };
            let body = format!(r#"{{"feature": "api", "amount": 1, "idempotency_key": "{key}"}}"#);
            let (status, answer) = nodes[*via]
                .send(
                    Method::POST,
                    &format!("/v1/entitlements/{id}/usage"),
                    Some(CLIENT),
                    Some(&body),
                )
                .await;
            assert_eq!(status, 200, "{answer}");
            *acked.lock().expect("lock").entry(id).or_default() += 1;
        }
    });
    futures_util::future::join_all(workers).await;
    let acked = acked.into_inner().expect("acked");
    for id in ids {
        for (n, node) in nodes.iter().enumerate() {
            let (status, used) = node.api_used(id).await;
            assert_eq!(status, 200, "{id} read through node {n}");
            assert_eq!(used, Some(acked[id]), "{id} read through node {n}");
        }
    }
    // Two of every three calls went through a node that does not own the
    // entitlement and were sent on.
    let (mut forwarded, mut timed) = (0.0, false);
    for node in &nodes {
        let (_, text) = node.send(Method::GET, "/metrics", Some(ADMIN), None).await;
        let text = text.as_str().unwrap_or_default().to_string();
        assert!(
            text.lines().any(|l| l == "headroom_cluster_members 3"),
            "{text}"
        );
        // A node that owns all three entitlements forwards nothing.
        timed |= text
            .lines()
            .any(|l| l.starts_with("headroom_forward_duration_seconds_count"));
        forwarded += text
            .lines()
            .filter(|l| l.starts_with("headroom_forwards_total{outcome=\"answered\"}"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(forwarded >= 300.0, "forwarded {forwarded}");
    assert!(timed, "the forwards are timed");
}

/// A call marked as sent on by a node is served only with the cluster
/// secret; client and admin tokens do not stand in for it.
#[actix_rt::test]
async fn a_call_marked_as_forwarded_needs_the_cluster_secret() {
    let redis = RedisServer::start();
    let n = node(&redis);
    until_members(&[&n], 1).await;
    let http = http_client();
    for secret in [
        None,
        Some("wrong-secret-0123456789"),
        Some(ADMIN),
        Some(CLIENT),
    ] {
        let mut req = http
            .get(format!("{}/v1/entitlements/acme", n.base))
            .bearer_auth(ADMIN)
            .header("headroom-forwarded-by", "n-000000000000");
        if let Some(s) = secret {
            req = req.header("headroom-node-secret", s);
        }
        let answer = req.send().await.expect("send");
        assert_eq!(answer.status(), 403, "{secret:?}");
    }
    let answer = http
        .get(format!("{}/v1/entitlements/acme", n.base))
        .bearer_auth(ADMIN)
        .header("headroom-forwarded-by", "n-000000000000")
        .header("headroom-node-secret", SECRET)
        .send()
        .await
        .expect("send");
    assert_eq!(answer.status(), 404, "served here: not created");
}

/// A node SIGKILLed under load: calls through the others for the
/// entitlements it owned are served (its owner unreachable, they are
/// served where they arrive), never answered 5xx; once its lease ran out
/// the others own its share; every call sent again with its key is
/// answered as first acknowledged, and what is used is what was granted.
#[actix_rt::test]
async fn a_node_killed_under_load_loses_no_acknowledged_call() {
    let redis = RedisServer::start();
    let mut nodes = vec![node(&redis), node(&redis), node(&redis)];
    until_members(&[&nodes[0], &nodes[1], &nodes[2]], 3).await;
    let ids: Vec<String> = (0..12).map(|i| format!("k-{i}")).collect();
    for id in &ids {
        let (status, _) = nodes[0]
            .send(
                Method::PUT,
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                Some(r#"{"features": {"api": {"included": 100, "hard_cap": 120}}}"#),
            )
            .await;
        assert_eq!(status, 201);
    }
    // Calls only through the two nodes that live on; the third is killed
    // after a third of them.
    let calls: Vec<(usize, String, String)> = (0..1_200)
        .map(|n| (n % 2, ids[n % ids.len()].clone(), format!("c{n}")))
        .collect();
    let statuses = std::sync::Mutex::new(vec![0u16; calls.len()]);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let victim = nodes.pop().expect("a third node");
    let victim = std::sync::Mutex::new(victim);
    let nodes = &nodes;
    let workers = (0..6).map(|_| async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((via, id, key)) = calls.get(i) else {
                return;
            };
            if i == 400 {
                victim.lock().expect("victim").kill();
            }
            let status = nodes[*via].use_api(id, key).await;
            statuses.lock().expect("statuses")[i] = status;
        }
    });
    futures_util::future::join_all(workers).await;
    let statuses = statuses.into_inner().expect("statuses");
    let mut seen = std::collections::BTreeMap::<u16, usize>::new();
    for s in &statuses {
        *seen.entry(*s).or_default() += 1;
    }
    assert!(
        seen.keys().all(|s| [200, 429].contains(s)),
        "answers while a node died: {seen:?}"
    );
    // Its share is the others' once its lease ran out.
    until_members(&[&nodes[0], &nodes[1]], 2).await;
    let pairs: Vec<_> = calls.iter().zip(&statuses).collect();
    let again = futures_util::future::join_all(pairs.chunks(pairs.len().div_ceil(6)).map(
        |chunk| async move {
            let mut out = Vec::new();
            for ((via, id, key), _) in chunk {
                out.push(nodes[1 - via].use_api(id, key).await);
            }
            out
        },
    ))
    .await
    .concat();
    let mut granted = std::collections::HashMap::<&str, u64>::new();
    for (((_, id, key), first), again) in pairs.iter().zip(again) {
        assert_eq!(again, **first, "{key} through the other node");
        if again == 200 {
            *granted.entry(id.as_str()).or_default() += 1;
        }
    }
    for id in &ids {
        for node in nodes {
            let used = node.api_used(id).await.1.expect("used");
            assert!(used <= 120, "{id}: {used}");
            assert_eq!(used, granted[id.as_str()], "{id}: used vs granted");
        }
    }
}
