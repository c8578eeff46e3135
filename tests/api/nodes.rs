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

fn member_ids(view: &Value) -> Vec<String> {
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
        if views.iter().all(|v| member_ids(v).len() == want) {
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
    assert_eq!(member_ids(&view).len(), 1, "{view}");
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
        assert_eq!(
            member_ids(v),
            sorted,
            "the same members, by id, on every node"
        );
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
    assert!(views.iter().all(|v| !member_ids(v).contains(&left)));

    let died = views[1]["self"].as_str().expect("self").to_string();
    c.kill();
    let views = until_members(&[&a], 1).await;
    assert!(
        !member_ids(&views[0]).contains(&died),
        "dropped after its lease"
    );
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
        nodes[0]
            .create(id, r#"{"features": {"api": {"included": 1000000}}}"#)
            .await;
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
        // A node that owns all three entitlements forwards nothing; the
        // others send their usage calls on in batches.
        timed |= text
            .lines()
            .any(|l| l.starts_with("headroom_forward_duration_seconds_count"))
            && text
                .lines()
                .any(|l| l.starts_with("headroom_forward_batch_size_count"));
        forwarded += metric(&text, "headroom_forwards_total{outcome=\"answered\"}");
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
        nodes[0]
            .create(
                id,
                r#"{"features": {"api": {"included": 100, "hard_cap": 120}}}"#,
            )
            .await;
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
    // Until its lease ran out the dead node was passed over: its calls went
    // to the node that owns them without it.
    let mut passed_over = 0.0;
    for node in nodes {
        passed_over += metric(
            &scrape(node).await,
            "headroom_forwards_total{outcome=\"passed_over\"}",
        );
    }
    assert!(passed_over > 0.0, "the dead owner was passed over");
}

/// What happens to the third node while the load runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// SIGKILL: no goodbye; dropped when its lease runs out.
    Kill,
    /// It starts under the load (the balancer already sends it calls).
    Add,
    /// SIGTERM: it leaves, hands over and stops.
    Stop,
    /// SIGSTOP past its lease, then SIGCONT: what it held is stale.
    Pause,
}

const LEASE: Duration = Duration::from_secs(2);
const CAP: u64 = 50;

/// Three nodes on `redis` (settings `backing`, data under `prefix`), the
/// load client sending keyed usage calls round robin over them (8
/// connections, a call given up after 1.5 s and sent again with its key
/// to the next node until answered), the third node changed two seconds
/// in. Then: every call was resolved; what each entitlement used, read
/// through every live node, is exactly what was acknowledged and at most
/// its cap; and what the change must show.
async fn under_load(backing: &[(&str, &str)], prefix: &str, change: Change) {
    let mut env = backing.to_vec();
    env.extend_from_slice(&[
        ("HEADROOM_REDIS_PREFIX", prefix),
        ("HEADROOM_CLUSTER_SECRET", SECRET),
        ("HEADROOM_CLUSTER_LEASE", "2s"),
        ("HEADROOM_FORWARD_TIMEOUT", "1s"),
    ]);
    let mut nodes = vec![
        TrackerProcess::spawn_env(&env),
        TrackerProcess::spawn_env(&env),
    ];
    let third = if change == Change::Add {
        TrackerProcess::unstarted_env(&env)
    } else {
        TrackerProcess::spawn_env(&env)
    };
    let live: Vec<&TrackerProcess> = nodes
        .iter()
        .chain((change != Change::Add).then_some(&third))
        .collect();
    until_members(&live, live.len()).await;
    let entitlements = 12;
    let config = format!(r#"{{"features": {{"api": {{"included": 40, "hard_cap": {CAP}}}}}}}"#);
    for i in 0..entitlements {
        let id = headroom_load::entitlement_id(prefix, i);
        nodes[0].create(&id, &config).await;
    }
    let spec = headroom_load::Spec {
        addr: nodes[0].addr(),
        admin_token: Some(ADMIN.into()),
        client_token: Some(CLIENT.into()),
        scenario: headroom_load::Scenario::Usage,
        entitlements,
        zipf: 0.0,
        connections: 8,
        duration: Duration::from_secs(6),
        rate: None,
        batch_size: 1,
        seed: 7,
        prefix: prefix.into(),
        progress: false,
        spread: vec![nodes[0].addr(), nodes[1].addr(), third.addr()],
        keyed: true,
        by_owner: None,
        timeout: Some(Duration::from_millis(1_500)),
    };
    let load = tokio::spawn(headroom_load::run(spec.clone()));
    let changed = tokio::task::spawn_blocking(move || {
        let mut third = third;
        std::thread::sleep(Duration::from_secs(2));
        let clean = match change {
            Change::Kill => {
                third.kill();
                true
            }
            Change::Add => {
                third.restart();
                true
            }
            Change::Stop => third.terminate(),
            Change::Pause => {
                third.signal("-STOP");
                std::thread::sleep(LEASE + Duration::from_millis(1_500));
                third.signal("-CONT");
                true
            }
        };
        (third, clean)
    });
    let (mut report, tally) = load.await.expect("load task").expect("load runs");
    let (third, clean) = changed.await.expect("change");
    assert!(clean, "{change:?}: the third node stopped cleanly");
    let live: Vec<&TrackerProcess> = nodes
        .iter()
        .chain(matches!(change, Change::Add | Change::Pause).then_some(&third))
        .collect();
    until_members(&live, live.len()).await;
    let summary = headroom_load::summary(&report);
    assert_eq!(
        tally.unknown_total(),
        0,
        "{change:?}: every call resolved: {summary}"
    );
    assert!(
        report.denied > 0 && report.granted_or_overdraft > 0,
        "{change:?}: caps reached: {summary}"
    );
    if change == Change::Stop {
        assert_eq!(
            report.http_errors, 0,
            "a graceful stop answers no 5xx: {summary}"
        );
    }
    for node in &live {
        let spec = headroom_load::Spec {
            addr: node.addr(),
            ..spec.clone()
        };
        let before = vec![0; entitlements];
        check_ledger(&spec, &before, &tally, &mut report).await;
        for i in 0..entitlements {
            let id = headroom_load::entitlement_id(prefix, i);
            let used = node.api_used(&id).await.1.expect("used");
            assert!(used <= CAP, "{change:?}: {id} used {used}");
        }
    }
    match change {
        Change::Add => {
            // The new node owns a share and claimed it; the others let go.
            let text = scrape(&third).await;
            assert!(metric(&text, "headroom_claims_total") > 0.0, "{text}");
            let mut handed = 0.0;
            for n in &nodes {
                handed += metric(&scrape(n).await, "headroom_entitlements_handed_over_total");
            }
            assert!(
                handed > 0.0,
                "the first two handed over the new node's share"
            );
        }
        Change::Pause => {
            let text = scrape(&third).await;
            assert!(
                metric(&text, "headroom_fenced_writes_total") > 0.0,
                "the paused node's late writes were fenced: {text}"
            );
        }
        Change::Kill | Change::Stop => {}
    }
    drop(third);
    nodes.clear();
}

/// Reads every entitlement back through `spec.addr` and requires it to
/// equal exactly what was acknowledged.
async fn check_ledger(
    spec: &headroom_load::Spec,
    before: &[u64],
    tally: &headroom_load::Tally,
    report: &mut headroom_load::Report,
) {
    report.ledger = None;
    headroom_load::check_ledger(spec, before, tally, report)
        .await
        .expect("ledger read");
    let ledger = report.ledger.as_ref().expect("ledger");
    assert!(ledger.ok, "through {}: {ledger:?}", spec.addr);
}

/// Every change under load, one after the other, on a standalone Redis.
#[actix_rt::test]
async fn nodes_under_load_on_a_standalone_redis_lose_nothing_and_pass_no_cap() {
    let redis = RedisServer::start();
    let url = redis.url();
    for (n, change) in [Change::Kill, Change::Add, Change::Stop, Change::Pause]
        .into_iter()
        .enumerate()
    {
        under_load(
            &[("HEADROOM_REDIS_URL", &url)],
            &format!("load-{n}"),
            change,
        )
        .await;
    }
}

/// The same on the shared Redis Cluster (3 primaries).
#[actix_rt::test]
async fn nodes_under_load_on_a_redis_cluster_lose_nothing_and_pass_no_cap() {
    let cluster = crate::cluster::cluster();
    let seeds = cluster.seeds();
    for (n, change) in [Change::Kill, Change::Add, Change::Stop, Change::Pause]
        .into_iter()
        .enumerate()
    {
        under_load(
            &[("HEADROOM_REDIS_CLUSTER", &seeds)],
            &format!("nodes-load-{n}"),
            change,
        )
        .await;
    }
}

/// A node's `/metrics` text.
async fn scrape(node: &TrackerProcess) -> String {
    let (_, text) = node.send(Method::GET, "/metrics", Some(ADMIN), None).await;
    text.as_str().unwrap_or_default().to_string()
}

/// While views of the members disagree, two nodes may both serve one
/// entitlement (each call marked as sent on is served where it arrives,
/// as during a join): a read through the node that wrote first still
/// answers every acknowledged call, not what it holds in memory.
#[actix_rt::test]
async fn a_read_answers_what_another_node_wrote_behind_its_back() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    until_members(&[&a, &b], 2).await;
    let http = http_client();
    let marked = |n: &TrackerProcess, method: Method, path: &str, body: Option<&str>| {
        let mut req = http
            .request(method, format!("{}{path}", n.base))
            .bearer_auth(ADMIN)
            .header("headroom-forwarded-by", "n-test")
            .header("headroom-node-secret", SECRET);
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        async move {
            let answer = req.send().await.expect("send");
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, _) = marked(
        &a,
        Method::PUT,
        "/v1/entitlements/shared",
        Some(r#"{"seats": {"purchased": 5}, "features": {"api": {"included": 100}}}"#),
    )
    .await;
    assert_eq!(status, 201);
    let usage = r#"{"feature": "api", "amount": 1}"#;
    for (n, seat) in [(&a, "s1"), (&b, "s2"), (&b, "s3")] {
        let (status, _) = marked(
            n,
            Method::POST,
            "/v1/entitlements/shared/usage",
            Some(usage),
        )
        .await;
        assert_eq!(status, 200);
        let path = format!("/v1/entitlements/shared/seats/{seat}");
        let (status, _) = marked(n, Method::POST, &path, None).await;
        assert_eq!(status, 200);
    }
    for (name, n) in [("a", &a), ("b", &b)] {
        let (status, view) = marked(n, Method::GET, "/v1/entitlements/shared", None).await;
        assert_eq!(status, 200);
        assert_eq!(view["features"]["api"]["used"], 3, "through {name}: {view}");
        assert_eq!(view["seats"]["in_use"], 3, "through {name}: {view}");
        let (status, seats) = marked(n, Method::GET, "/v1/entitlements/shared/seats", None).await;
        assert_eq!(status, 200);
        assert_eq!(
            seats["seats"].as_array().map(Vec::len),
            Some(3),
            "through {name}: {seats}"
        );
    }
    let text = scrape(&a).await;
    assert!(metric(&text, "headroom_stale_reads_total") > 0.0, "{text}");
}

/// A batch of events of many entitlements sent to one node is split per
/// owner, the parts sent on at once, and answered in input order; sent
/// again, its keyed events replay and nothing is counted twice.
#[actix_rt::test]
async fn a_batch_is_split_per_owner_and_answered_in_order() {
    let redis = RedisServer::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    until_members(&[&nodes[0], &nodes[1], &nodes[2]], 3).await;
    let ids: Vec<String> = (0..30).map(|i| format!("b-{i}")).collect();
    for id in &ids {
        nodes[0]
            .create(
                id,
                r#"{"features": {"api": {"included": 8, "hard_cap": 9}}}"#,
            )
            .await;
    }
    // Ten keyed events per entitlement, interleaved, then one for an
    // entitlement nobody created and one that is malformed.
    let mut events: Vec<String> = (0..300)
        .map(|n| {
            format!(
                r#"{{"entitlement": "{}", "feature": "api", "amount": 1, "idempotency_key": "e{n}"}}"#,
                ids[n % ids.len()]
            )
        })
        .collect();
    events.push(r#"{"entitlement": "nobody", "feature": "api", "amount": 1}"#.into());
    events.push(r#"{"entitlement": "b-0", "feature": "api", "amount": 0}"#.into());
    let body = format!(r#"{{"events": [{}]}}"#, events.join(","));
    let check = |answer: &Value| {
        let results = answer["results"].as_array().expect("results");
        assert_eq!(results.len(), 302, "{answer}");
        for (n, r) in results[..300].iter().enumerate() {
            // The n-th event of an entitlement is its (n / 30 + 1)-th unit:
            // 8 included, the 9th in overdraft, the 10th denied.
            let unit = n / ids.len() + 1;
            let want = match unit {
                1..=8 => "granted",
                9 => "overdraft",
                _ => "denied",
            };
            assert_eq!(r["outcome"], want, "event {n}: {r}");
            assert_eq!(r["used"], unit.min(9), "event {n}: {r}");
        }
        assert_eq!(results[300]["error"]["code"], "entitlement_not_found");
        assert_eq!(results[301]["error"]["status"], 400);
    };
    let before = answered(&nodes[0]).await;
    let (status, answer) = nodes[0]
        .send(Method::POST, "/v1/usage/batch", Some(CLIENT), Some(&body))
        .await;
    assert_eq!(status, 200, "{answer}");
    check(&answer);
    let view = members(&nodes[0]).await;
    let all = member_ids(&view);
    let others: std::collections::BTreeSet<&str> = ids
        .iter()
        .filter_map(|id| headroom::nodes::ring::owner(all.iter().map(String::as_str), id))
        .filter(|o| *o != view["self"])
        .collect();
    assert_eq!(
        answered(&nodes[0]).await - before,
        others.len() as f64,
        "one part for each other owner"
    );
    // Sent again through another node: the same answers, nothing added.
    let (status, again) = nodes[1]
        .send(Method::POST, "/v1/usage/batch", Some(CLIENT), Some(&body))
        .await;
    assert_eq!(status, 200, "{again}");
    check(&again);
    for id in &ids {
        for node in &nodes {
            assert_eq!(node.api_used(id).await.1, Some(9), "{id}");
        }
    }
}

/// The README's three nodes behind HAProxy (`packaging/haproxy`), as it
/// runs them: the balancer answers what one node would, and a node stopped
/// gracefully under keyed load through it costs no error at all.
#[actix_rt::test]
async fn three_nodes_behind_haproxy_answer_as_one_and_stop_without_errors() {
    let redis = RedisServer::start();
    let ports: Vec<String> = (0..4)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/haproxy/three-nodes");
    let run = std::process::Command::new(script)
        .env("HEADROOM_BIN", env!("CARGO_BIN_EXE_headroom"))
        .env("HEADROOM_REDIS_URL", redis.url())
        .env("HEADROOM_ADMIN_TOKENS", ADMIN)
        .env("HEADROOM_CLIENT_TOKENS", CLIENT)
        .env("HEADROOM_CLUSTER_LEASE", "2s")
        .env("HEADROOM_LB", &ports[0])
        .env("HEADROOM_NODE_1", &ports[1])
        .env("HEADROOM_NODE_2", &ports[2])
        .env("HEADROOM_NODE_3", &ports[3])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("packaging/haproxy/three-nodes runs");
    let mut run = Stopped(run);
    let lb = format!("http://{}", ports[0]);
    let http = http_client();
    let get = |path: &str| {
        let req = http.get(format!("{lb}{path}")).bearer_auth(ADMIN);
        async move {
            match req.send().await {
                Ok(a) => (
                    a.status().as_u16(),
                    a.json::<Value>().await.unwrap_or(Value::Null),
                ),
                Err(_) => (0, Value::Null),
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, view) = get("/v1/cluster").await;
        if status == 200 && member_ids(&view).len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three members behind HAProxy: {status} {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The README's calls: 3 seats purchased, hard cap 4, five users.
    let put = http
        .put(format!("{lb}/v1/entitlements/demo"))
        .bearer_auth(ADMIN)
        .body(r#"{"seats": {"purchased": 3, "hard_cap": 4}, "features": {"api": {"included": 1000000}}}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 201);
    let mut outcomes = Vec::new();
    for user in ["ann", "bob", "cem", "dee", "eve"] {
        let a = http
            .post(format!("{lb}/v1/entitlements/demo/seats/{user}"))
            .bearer_auth(CLIENT)
            .send()
            .await
            .expect("activate");
        let status = a.status().as_u16();
        let body: Value = a.json().await.expect("json");
        outcomes.push(format!(
            "{} {status}",
            body["outcome"]
                .as_str()
                .or(body["decision"]["outcome"].as_str())
                .unwrap_or("?")
        ));
    }
    assert_eq!(
        outcomes,
        [
            "granted 200",
            "granted 200",
            "granted 200",
            "overdraft 200",
            "denied 429"
        ]
    );
    // Round robin: six reads meet every node twice, each answers the same.
    for _ in 0..6 {
        let (status, view) = get("/v1/entitlements/demo").await;
        assert_eq!(status, 200);
        assert_eq!(view["seats"]["in_use"], 4, "{view}");
    }

    // Keyed usage through the balancer while node 2 stops gracefully.
    let spec = headroom_load::Spec {
        addr: ports[0].parse().expect("address"),
        admin_token: Some(ADMIN.into()),
        client_token: Some(CLIENT.into()),
        scenario: headroom_load::Scenario::Usage,
        entitlements: 6,
        zipf: 0.0,
        connections: 6,
        duration: Duration::from_secs(5),
        rate: None,
        batch_size: 1,
        seed: 11,
        prefix: "lb".into(),
        progress: false,
        spread: Vec::new(),
        keyed: true,
        by_owner: None,
        timeout: Some(Duration::from_secs(8)),
    };
    headroom_load::setup(&spec).await.expect("setup");
    let load = tokio::spawn(headroom_load::run(spec.clone()));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let node2 = child_listening_on(run.0.id(), &ports[2]).expect("node 2's process");
    let stopped = tokio::task::spawn_blocking(move || {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &node2.to_string()])
            .status();
        // Its exit: the three-nodes script reaps it.
        let proc = format!("/proc/{node2}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&proc).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        !std::path::Path::new(&proc).exists()
    });
    let (mut report, tally) = load.await.expect("load task").expect("load runs");
    assert!(stopped.await.expect("stop"), "node 2 exited");
    let summary = headroom_load::summary(&report);
    assert_eq!(report.http_errors + report.transport_errors, 0, "{summary}");
    assert_eq!(tally.unknown_total(), 0, "{summary}");
    check_ledger(&spec, &[0; 6], &tally, &mut report).await;
    let _ = std::process::Command::new("kill")
        .args(["-INT", &run.0.id().to_string()])
        .status();
    let status = run.0.wait().expect("three-nodes exits");
    assert!(
        status.success(),
        "three-nodes stops cleanly on Ctrl-C: {status}"
    );
}

/// A script stopped with SIGTERM (which it passes on) when the test ends,
/// passed or not.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}

/// The child of `parent` whose `HEADROOM_LISTEN` is `listen`.
fn child_listening_on(parent: u32, listen: &str) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|kv| kv == format!("HEADROOM_LISTEN={listen}").as_bytes())
            })
        })
}

/// Usage calls sent on to their owner together answer exactly what the
/// owner answers them directly — statuses, bodies, the replay header —
/// for granted, replayed, denied, unauthenticated and invalid calls; the
/// internal endpoint opens only with the cluster secret.
#[actix_rt::test]
async fn usage_calls_sent_on_together_answer_what_the_owner_answers() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    until_members(&[&a, &b], 2).await;
    let view = members(&b).await;
    let all = member_ids(&view);
    let owned_by_b = |id: &str| {
        headroom::nodes::ring::owner(all.iter().map(String::as_str), id) == view["self"].as_str()
    };
    let mut owned = (0..).map(|i| format!("co-{i}")).filter(|id| owned_by_b(id));
    let (through_a, at_b) = (owned.next().expect("one"), owned.next().expect("two"));
    for id in [&through_a, &at_b] {
        b.create(
            id,
            r#"{"features": {"api": {"included": 2, "hard_cap": 3}}}"#,
        )
        .await;
    }
    let http = http_client();
    let call =
        |node: &TrackerProcess, id: &str, token: Option<&str>, key: Option<&str>, body: &str| {
            let mut req = http
                .post(format!("{}/v1/entitlements/{id}/usage", node.base))
                .body(body.to_string());
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(k) = key {
                req = req.header("Idempotency-Key", k);
            }
            async move {
                let r = req.send().await.expect("send");
                let status = r.status().as_u16();
                let replayed = r.headers().get("idempotency-replayed").cloned();
                let kind = r.headers().get("content-type").cloned();
                (status, replayed, kind, r.text().await.expect("body"))
            }
        };
    let one = r#"{"feature": "api", "amount": 1}"#;
    let script: Vec<(Option<&str>, Option<&str>, &str)> = vec![
        (Some(CLIENT), Some("k1"), one),
        (Some(CLIENT), Some("k1"), one),
        (None, None, one),
        (Some("not-a-token"), None, one),
        (
            Some(CLIENT),
            Some("k2"),
            r#"{"feature": "api", "amount": 1, "idempotency_key": "k3"}"#,
        ),
        (Some(CLIENT), None, r#"{"feature": "api", "amount": 0}"#),
        (Some(CLIENT), None, r#"{"feature": "nope", "amount": 1}"#),
        (Some(ADMIN), None, one),
        (Some(CLIENT), None, r#"{"feature": "api", "amount": 1}"#),
        (
            Some(CLIENT),
            Some("k4"),
            r#"{"feature": "api", "amount": 5}"#,
        ),
        (
            Some(CLIENT),
            Some("k4"),
            r#"{"feature": "api", "amount": 5}"#,
        ),
    ];
    for (n, (token, key, body)) in script.into_iter().enumerate() {
        let relayed = call(&a, &through_a, token, key, body).await;
        let direct = call(&b, &at_b, token, key, body).await;
        assert_eq!(relayed, direct, "call {n}: {body}");
    }
    let text = scrape(&a).await;
    assert!(
        metric(&text, "headroom_forward_batch_size_count") > 0.0,
        "sent on in batches: {text}"
    );
    // The internal endpoint: only with the cluster secret.
    for token in [ADMIN, CLIENT] {
        let r = http
            .post(format!("{}/v1/nodes/usage", b.base))
            .bearer_auth(token)
            .body(r#"{"calls": []}"#)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 403, "{token}");
    }
    let r = http
        .post(format!("{}/v1/nodes/usage", b.base))
        .header("headroom-forwarded-by", "n-test")
        .header("headroom-node-secret", SECRET)
        .body(r#"{"calls": []}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let alone = TrackerProcess::start(&redis.url(), "alone-co").await;
    let r = http
        .post(format!("{}/v1/nodes/usage", alone.base))
        .bearer_auth(ADMIN)
        .body(r#"{"calls": []}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
}

/// A batch sent while one owner is dead (its lease not yet run out): the
/// dead owner's part goes to the nodes that own its events without it, and
/// every event is decided once.
#[actix_rt::test]
async fn a_batch_part_for_a_dead_owner_goes_to_its_successor() {
    let redis = RedisServer::start();
    let mut nodes = [node(&redis), node(&redis), node(&redis)];
    until_members(&[&nodes[0], &nodes[1], &nodes[2]], 3).await;
    let ids: Vec<String> = (0..30).map(|i| format!("d-{i}")).collect();
    for id in &ids {
        nodes[0]
            .create(id, r#"{"features": {"api": {"included": 10}}}"#)
            .await;
    }
    // Who owns what, with all three and without the one killed.
    let view = members(&nodes[0]).await;
    let all = member_ids(&view);
    let (me, dead) = (
        view["self"].as_str().expect("self").to_string(),
        members(&nodes[2]).await["self"]
            .as_str()
            .expect("self")
            .to_string(),
    );
    let owner = |id: &str, without: Option<&str>| {
        headroom::nodes::ring::owner(
            all.iter()
                .map(String::as_str)
                .filter(|m| Some(*m) != without),
            id,
        )
        .map(str::to_string)
    };
    let first: std::collections::BTreeSet<String> = ids
        .iter()
        .filter_map(|id| owner(id, None))
        .filter(|o| *o != me)
        .collect();
    let successors: std::collections::BTreeSet<String> = ids
        .iter()
        .filter(|id| owner(id, None).as_deref() == Some(dead.as_str()))
        .filter_map(|id| owner(id, Some(&dead)))
        .filter(|o| *o != me)
        .collect();
    let before = answered(&nodes[0]).await;
    nodes[2].kill();
    let events: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                r#"{{"entitlement": "{id}", "feature": "api", "amount": 1, "idempotency_key": "dead-{id}"}}"#
            )
        })
        .collect();
    let body = format!(r#"{{"events": [{}]}}"#, events.join(","));
    let (status, answer) = nodes[0]
        .send(Method::POST, "/v1/usage/batch", Some(CLIENT), Some(&body))
        .await;
    assert_eq!(status, 200, "{answer}");
    for (n, r) in answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .enumerate()
    {
        assert_eq!(r["outcome"], "granted", "event {n}: {r}");
        assert_eq!(r["used"], 1, "event {n}: {r}");
    }
    // One part for each live other owner, and one sent again to each
    // successor of the dead node's events that is not this node.
    let live_parts = first.iter().filter(|o| **o != dead).count();
    assert_eq!(
        answered(&nodes[0]).await - before,
        (live_parts + successors.len()) as f64,
        "parts: {first:?}, successors of {dead}: {successors:?}"
    );
    for id in &ids {
        for node in &nodes[..2] {
            assert_eq!(node.api_used(id).await.1, Some(1), "{id}");
        }
    }
}

/// The calls `node` sent on and had answered.
async fn answered(node: &TrackerProcess) -> f64 {
    metric(
        &scrape(node).await,
        "headroom_forwards_total{outcome=\"answered\"}",
    )
}

/// The sum of the series of a `/metrics` page whose lines start with
/// `series` (a name, or a name and its labels).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A call for another node's entitlement whose body trickles gets 408
/// after the request timeout at the node that received it, as any call
/// does; nothing is sent on.
#[actix_rt::test]
async fn a_body_that_never_arrives_for_another_nodes_entitlement_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let env = [
        ("HEADROOM_REDIS_URL", redis.url()),
        ("HEADROOM_REDIS_PREFIX", "slow".to_string()),
        ("HEADROOM_CLUSTER_SECRET", SECRET.to_string()),
        ("HEADROOM_REQUEST_TIMEOUT", "500ms".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (a, b) = (
        TrackerProcess::spawn_env(&env),
        TrackerProcess::spawn_env(&env),
    );
    until_members(&[&a, &b], 2).await;
    let view = members(&b).await;
    let all = member_ids(&view);
    let id = (0..)
        .map(|i| format!("slow-{i}"))
        .find(|id| {
            headroom::nodes::ring::owner(all.iter().map(String::as_str), id)
                == view["self"].as_str()
        })
        .expect("an id b owns");
    let before = answered(&a).await;
    let mut s = tokio::net::TcpStream::connect(a.addr())
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/entitlements/{id}/usage HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {CLIENT}\r\ncontent-length: 100\r\n\r\n{{",
        a.addr()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
        .await
        .expect("answered before the test gave up")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(answered(&a).await, before, "nothing sent on");
}

/// The pages of an entitlement go to its owner like its API calls: a link
/// opened and a form posted through any node work (the owner checks the
/// form's origin against the host the browser asked), and no node but the
/// owner ever loads the entitlement (one claim each, no fenced write).
#[actix_rt::test]
async fn an_entitlements_pages_are_served_by_its_owner_through_any_node() {
    let redis = RedisServer::start();
    let nodes = [node(&redis), node(&redis)];
    until_members(&[&nodes[0], &nodes[1]], 2).await;
    let http = crate::pages::browser();
    let ids: Vec<String> = (0..6).map(|i| format!("page{i}")).collect();
    for id in &ids {
        nodes[0]
            .create(id, r#"{"seats": {"purchased": 2, "hard_cap": 4}}"#)
            .await;
    }
    for id in &ids {
        let (status, body) = nodes[0]
            .send(
                Method::POST,
                &format!("/v1/entitlements/{id}/portal-links"),
                Some(ADMIN),
                Some(r#"{"scope": "manage"}"#),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let link = body["url"].as_str().expect("url");
        // Opened through node 1, the page read through node 0.
        let opened = http
            .get(format!("{}{link}", nodes[1].base))
            .send()
            .await
            .expect("open");
        assert_eq!(opened.status().as_u16(), 303, "{id}");
        let cookie = opened
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_string();
        let page = http
            .get(format!("{}/portal/e/{id}", nodes[0].base))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("page");
        assert_eq!(page.status().as_u16(), 200, "{id}");
        let html = page.text().await.expect("html");
        assert!(html.contains(&format!("Usage of {id}")), "{id}");
        let at = html.find(r#"name="csrf" value=""#).expect("csrf") + 19;
        let csrf = html[at..].split('"').next().expect("csrf").to_string();
        // The customer's form, posted through node 1 from node 1's page.
        let posted = http
            .post(format!("{}/portal/e/{id}/customer-cap", nodes[1].base))
            .header("cookie", &cookie)
            .header("origin", &nodes[1].base)
            .form(&[("csrf", csrf.as_str()), ("seats", "3")])
            .send()
            .await
            .expect("post");
        assert_eq!(posted.status().as_u16(), 303, "{id}");
        let (_, e) = nodes[1]
            .send(
                Method::GET,
                &format!("/v1/entitlements/{id}"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(e["config"]["seats"]["customer_cap"], 3, "{id}: {e}");
    }
    let (mut claims, mut fenced) = (0.0, 0.0);
    for n in &nodes {
        let text = scrape(n).await;
        claims += metric(&text, "headroom_claims_total");
        fenced += metric(&text, "headroom_fenced_writes_total");
    }
    assert_eq!(
        claims,
        ids.len() as f64,
        "each entitlement loaded by its owner only"
    );
    assert_eq!(fenced, 0.0);
}
