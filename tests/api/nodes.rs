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
