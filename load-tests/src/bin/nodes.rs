//! headroom on 1, 2 and 3 nodes sharing one Redis, measured in one run with
//! the same client spreading its calls round robin over the nodes (as a
//! round-robin balancer would): decisions per second, and decisions per
//! CPU-second of all nodes together — on this machine the nodes share the
//! same cores, so throughput cannot grow with them, but what each decision
//! costs can be compared. Then the cost of the internal hop: one hot
//! entitlement called through the node that owns it, and through the other
//! node (every call sent on). Rounds alternate the set-ups; each row is the
//! median of its rounds. Redis runs with `appendfsync everysec`, as
//! `compare` does.
//!
//! ```sh
//! cargo run --release -p headroom-load --bin nodes -- --duration 8s --rounds 3
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use headroom_load::{Conn, Scenario, Spec, check_ledger, cpu_seconds, read_used, run, setup};
use headroom_test_support::{RedisServer, Tracker};

#[derive(Parser, Debug)]
#[command(about = "headroom on 1, 2 and 3 nodes, and the cost of a forwarded call")]
struct Args {
    /// Length of each run.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds over every set-up.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 1000)]
    entitlements: usize,
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Connections of the hop measurement (one hot entitlement).
    #[arg(long, default_value_t = 8)]
    hop_connections: usize,
    /// HTTP workers of each node; default: the machine's cores divided
    /// among the nodes (at least 1), so that the nodes together run about
    /// as many workers as one node alone and the cores are not
    /// oversubscribed (on separate machines each node has cores of its own).
    #[arg(long)]
    node_workers: Option<usize>,
    /// Skip `cargo build --release` (when the binary is fresh).
    #[arg(long)]
    no_build: bool,
}

const SECRET: &str = "bench-cluster-secret-0123456789";
const ADMIN: &str = "bench-admin";
const CLIENT: &str = "bench-client";

/// `n` nodes on `redis` under `prefix` (with a cluster secret when more
/// than one), each registered and seeing the others.
async fn start_nodes(
    bin: &std::path::Path,
    redis: &RedisServer,
    prefix: &str,
    n: usize,
    workers: usize,
) -> anyhow::Result<Vec<Tracker>> {
    let url = redis.url();
    let workers = workers.to_string();
    let mut env = vec![
        ("HEADROOM_REDIS_URL", url.as_str()),
        ("HEADROOM_REDIS_PREFIX", prefix),
        ("HEADROOM_ADMIN_TOKENS", ADMIN),
        ("HEADROOM_CLIENT_TOKENS", CLIENT),
        ("HEADROOM_WORKERS", workers.as_str()),
    ];
    if n > 1 {
        env.push(("HEADROOM_CLUSTER_SECRET", SECRET));
    }
    let nodes = (0..n)
        .map(|_| Tracker::start(bin, &env))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        while members(node.addr()).await?.len() != n {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{n} nodes do not see each other"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(nodes)
}

/// The member ids `GET /v1/cluster` lists at `addr`.
async fn members(addr: SocketAddr) -> anyhow::Result<Vec<String>> {
    Ok(cluster(addr).await?.1)
}

/// The node at `addr`, and the member ids it lists.
async fn cluster(addr: SocketAddr) -> anyhow::Result<(String, Vec<String>)> {
    let mut conn = Conn::open(addr).await?;
    let auth = format!("Bearer {ADMIN}");
    let (status, body) = conn
        .call("GET", "/v1/cluster", Some(&auth), Bytes::new())
        .await?;
    anyhow::ensure!(status == 200, "GET /v1/cluster: {status}");
    let view: serde_json::Value = serde_json::from_slice(&body)?;
    let ids = view["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect();
    Ok((view["self"].as_str().unwrap_or_default().to_string(), ids))
}

/// The sum over `nodes` of the counter (all its series) `name`.
async fn counter(nodes: &[Tracker], name: &str) -> anyhow::Result<f64> {
    let auth = format!("Bearer {ADMIN}");
    let mut sum = 0.0;
    for node in nodes {
        let mut conn = Conn::open(node.addr()).await?;
        let (_, text) = conn
            .call("GET", "/metrics", Some(&auth), Bytes::new())
            .await?;
        sum += String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(sum)
}

fn cpu(nodes: &[Tracker]) -> f64 {
    nodes.iter().filter_map(Tracker::pid).map(cpu_seconds).sum()
}

#[derive(Clone, Debug, Default)]
struct Run {
    decisions_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Server CPU of all nodes per decision.
    server_us: f64,
    forwarded: f64,
    claims_per_s: f64,
    /// Redis CPU per decision.
    redis_us: f64,
    /// Redis commands per decision.
    commands: f64,
}

fn spec(
    addr: SocketAddr,
    args: &Args,
    entitlements: usize,
    connections: usize,
    prefix: &str,
) -> Spec {
    Spec {
        addr,
        admin_token: Some(ADMIN.into()),
        client_token: Some(CLIENT.into()),
        scenario: Scenario::Usage,
        entitlements,
        zipf: args.zipf,
        connections,
        duration: args.duration,
        rate: None,
        batch_size: 1,
        seed: 42,
        prefix: prefix.into(),
        progress: false,
        spread: Vec::new(),
        keyed: false,
        by_owner: None,
        timeout: None,
    }
}

/// One load run of `spec` on `nodes` (on `redis`): its figures, the
/// ledger checked through every node.
async fn measure(redis: &RedisServer, nodes: &[Tracker], spec: Spec) -> anyhow::Result<Run> {
    setup(&spec).await?;
    let before = read_used(&spec).await?;
    let redis_cpu = || redis.pid().map_or(0.0, cpu_seconds);
    let (redis0, cmds0) = (redis_cpu(), headroom_load::redis_commands(redis)?);
    let (cpu0, claims0, fwd0) = (
        cpu(nodes),
        counter(nodes, "headroom_claims_total").await?,
        counter(nodes, "headroom_forwards_total{outcome=\"answered\"}").await?,
    );
    let (mut report, tally) = run(spec.clone()).await?;
    let (redis1, cmds1) = (redis_cpu(), headroom_load::redis_commands(redis)?);
    let (cpu1, claims1, fwd1) = (
        cpu(nodes),
        counter(nodes, "headroom_claims_total").await?,
        counter(nodes, "headroom_forwards_total{outcome=\"answered\"}").await?,
    );
    for node in nodes {
        let through = Spec {
            addr: node.addr(),
            ..spec.clone()
        };
        report.ledger = None;
        check_ledger(&through, &before, &tally, &mut report).await?;
        let ledger = report.ledger.clone().unwrap_or_default();
        anyhow::ensure!(ledger.ok, "the ledger does not hold: {ledger:?}");
    }
    anyhow::ensure!(
        report.http_errors + report.transport_errors == 0,
        "errors: {}",
        headroom_load::summary(&report)
    );
    let d = report.decisions.max(1) as f64;
    Ok(Run {
        decisions_per_s: report.decisions_per_s,
        p50_ms: report.latency.p50_us as f64 / 1000.0,
        p99_ms: report.latency.p99_us as f64 / 1000.0,
        server_us: (cpu1 - cpu0) * 1e6 / d,
        forwarded: (fwd1 - fwd0) / d,
        claims_per_s: (claims1 - claims0) / report.elapsed_s,
        redis_us: (redis1 - redis0) * 1e6 / d,
        commands: (cmds1 - cmds0) as f64 / d,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// For each entitlement of `spec` (by index), the index in `nodes` of its
/// owner.
async fn owners(nodes: &[Tracker], spec: &Spec) -> anyhow::Result<Vec<usize>> {
    let mut selves = Vec::new();
    for n in nodes {
        selves.push(cluster(n.addr()).await?.0);
    }
    let ids = cluster(nodes[0].addr()).await?.1;
    Ok((0..spec.entitlements)
        .map(|e| {
            let id = headroom_load::entitlement_id(&spec.prefix, e);
            let owner = headroom::nodes::ring::owner(ids.iter().map(String::as_str), &id);
            selves
                .iter()
                .position(|s| Some(s.as_str()) == owner)
                .unwrap_or(0)
        })
        .collect())
}

/// A prefix whose entitlement `{prefix}-0` is owned by `owner` among `members`.
fn prefix_owned_by(members: &[String], owner: &str, stem: &str) -> String {
    (0..)
        .map(|k| format!("{stem}{k}"))
        .find(|p| {
            let id = headroom_load::entitlement_id(p, 0);
            headroom::nodes::ring::owner(members.iter().map(String::as_str), &id) == Some(owner)
        })
        .expect("some prefix is owned by each member")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = headroom_load::release_dir(args.no_build, &["-p", "headroom", "--bin", "headroom"])?;
    let bin = dir.join("headroom");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = |n: usize| args.node_workers.unwrap_or((cores / n).max(1));
    // (nodes, calls sent round robin or each to its owner)
    let counts = [
        (1usize, false),
        (2, false),
        (3, false),
        (2, true),
        (3, true),
    ];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); counts.len()];
    let mut hops: Vec<(Run, Run)> = Vec::new();
    for round in 0..args.rounds {
        for (i, &(n, direct)) in counts.iter().enumerate() {
            let prefix = format!("n{round}x{n}{}", if direct { "d" } else { "" });
            let r = rt.block_on(async {
                let nodes = start_nodes(&bin, &redis, &prefix, n, workers(n)).await?;
                let mut s = spec(
                    nodes[0].addr(),
                    &args,
                    args.entitlements,
                    args.connections,
                    "bench",
                );
                s.spread = nodes.iter().map(Tracker::addr).collect();
                if direct {
                    s.by_owner = Some(std::sync::Arc::new(owners(&nodes, &s).await?));
                }
                measure(&redis, &nodes, s).await
            })?;
            eprintln!(
                "round {round}, {n} node(s){}: {:.0} decisions/s, {:.1} µs CPU/decision, p99 {:.2} ms",
                if direct { ", to owners" } else { "" },
                r.decisions_per_s,
                r.server_us,
                r.p99_ms
            );
            runs[i].push(r);
        }
        let hop = rt.block_on(async {
            let prefix = format!("h{round}");
            let nodes = start_nodes(&bin, &redis, &prefix, 2, workers(2)).await?;
            let (me, ids) = cluster(nodes[0].addr()).await?;
            let other = ids
                .iter()
                .find(|i| **i != me)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no second member"))?;
            let local = prefix_owned_by(&ids, &me, "local");
            let away = prefix_owned_by(&ids, &other, "hop");
            let at = nodes[0].addr();
            let l = measure(
                &redis,
                &nodes,
                spec(at, &args, 1, args.hop_connections, &local),
            )
            .await?;
            let f = measure(
                &redis,
                &nodes,
                spec(at, &args, 1, args.hop_connections, &away),
            )
            .await?;
            anyhow::Ok((l, f))
        })?;
        eprintln!(
            "round {round}, hop: local p50 {:.2} ms, forwarded p50 {:.2} ms",
            hop.0.p50_ms, hop.1.p50_ms
        );
        hops.push(hop);
    }
    let base = median(runs[0].iter().map(|r| 1e6 / r.server_us).collect());
    println!(
        "| nodes | HTTP workers each | decisions/s | p50 ms | p99 ms | server CPU µs/decision (all nodes) | decisions per CPU-second | vs 1 node | calls sent on | claims/s | Redis CPU µs/decision | Redis cmds/decision |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (i, &(n, direct)) in counts.iter().enumerate() {
        let rs = &runs[i];
        let m = |f: fn(&Run) -> f64| median(rs.iter().map(f).collect());
        let each: Vec<String> = rs
            .iter()
            .map(|r| format!("{:.0}", r.decisions_per_s))
            .collect();
        let per_cpu = m(|r| 1e6 / r.server_us);
        println!(
            "| {n}{} | {} | {:.0} ({}) | {:.2} | {:.2} | {:.1} | {:.0} | {:.2} | {:.0} % | {:.2} | {:.1} | {:.2} |",
            if direct {
                ", each call to its owner"
            } else {
                ""
            },
            workers(n),
            m(|r| r.decisions_per_s),
            each.join(" / "),
            m(|r| r.p50_ms),
            m(|r| r.p99_ms),
            m(|r| r.server_us),
            per_cpu,
            per_cpu / base,
            m(|r| r.forwarded) * 100.0,
            m(|r| r.claims_per_s),
            m(|r| r.redis_us),
            m(|r| r.commands),
        );
    }
    println!();
    println!(
        "| one hot entitlement, {} connections, 2 nodes ({} HTTP worker(s) each), calls to the first | decisions/s | p50 ms | p99 ms | server CPU µs/decision (both nodes) |",
        args.hop_connections,
        workers(2)
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, pick) in [
        ("owned by it (local)", 0usize),
        ("owned by the other (every call sent on)", 1),
    ] {
        let rs: Vec<&Run> = hops
            .iter()
            .map(|h| if pick == 0 { &h.0 } else { &h.1 })
            .collect();
        let m = |f: fn(&Run) -> f64| median(rs.iter().map(|r| f(r)).collect());
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1} |",
            m(|r| r.decisions_per_s),
            m(|r| r.p50_ms),
            m(|r| r.p99_ms),
            m(|r| r.server_us),
        );
    }
    Ok(())
}
