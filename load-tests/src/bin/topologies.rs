//! headroom on the Redis it can run on, measured in one run with the same
//! client: a standalone Redis, a Redis Cluster of 3 primaries, and 3
//! primaries with a replica each with the tracker waiting for a replica
//! to acknowledge every write (`HEADROOM_REDIS_WAIT_REPLICAS=1`). The
//! rounds alternate the set-ups, so that the machine's drift falls on all
//! of them; each row is the median of its rounds.
//!
//! Every Redis node runs with `appendfsync everysec`, as `compare` does:
//! this measures the layout and the cluster, not the disk.
//!
//! ```sh
//! cargo run --release -p headroom-load --bin topologies -- --duration 8s --rounds 3
//! # before and after a change, on the standalone Redis only:
//! cargo run --release -p headroom-load --bin topologies -- --standalone-only \
//!     --before ../base/target/release/headroom --rounds 5
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use headroom_load::{Scenario, Spec, check_ledger, cpu_seconds, read_used, run, setup};
use headroom_test_support::{RedisCluster, RedisServer, Tracker};

#[derive(Parser, Debug)]
#[command(about = "headroom on standalone Redis, a 3-primary cluster, and 3+3 with WAIT 1")]
struct Args {
    /// Length of each run.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds over every set-up.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Entitlements, comma-separated: each is a column of runs.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 1000])]
    entitlements: Vec<usize>,
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Also run this tracker binary (an earlier build) on the standalone
    /// Redis, alternating with this build: a before and after.
    #[arg(long)]
    before: Option<std::path::PathBuf>,
    /// Also run this build on the standalone Redis with each of these
    /// bucket counts (`HEADROOM_REDIS_BUCKETS`; the default is 64).
    #[arg(long, value_delimiter = ',')]
    buckets: Vec<u32>,
    /// Only the standalone Redis (no clusters).
    #[arg(long)]
    standalone_only: bool,
    /// Skip `cargo build --release` (when the binaries are fresh).
    #[arg(long)]
    no_build: bool,
}

const EVERYSEC: [&str; 2] = ["--appendfsync", "everysec"];

/// What the tracker runs on.
enum Backend {
    Standalone(RedisServer),
    Cluster { cluster: RedisCluster, wait: usize },
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Standalone(_) => "standalone",
            Backend::Cluster { wait: 0, .. } => "cluster 3 primaries",
            Backend::Cluster { .. } => "cluster 3+3, WAIT 1",
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Backend::Standalone(r) => vec![("HEADROOM_REDIS_URL", r.url())],
            Backend::Cluster { cluster, wait } => vec![
                ("HEADROOM_REDIS_CLUSTER", cluster.seeds()),
                ("HEADROOM_REDIS_WAIT_REPLICAS", wait.to_string()),
            ],
        }
    }

    fn nodes(&self) -> Vec<&RedisServer> {
        match self {
            Backend::Standalone(r) => vec![r],
            Backend::Cluster { cluster, .. } => cluster.nodes.iter().collect(),
        }
    }

    /// CPU seconds every Redis node has used so far.
    fn redis_cpu(&self) -> f64 {
        self.nodes()
            .iter()
            .filter_map(|n| n.pid())
            .map(cpu_seconds)
            .sum()
    }

    /// Commands every primary has run so far (a replica's are the same
    /// writes again).
    fn redis_commands(&self) -> anyhow::Result<u64> {
        let primaries = match self {
            Backend::Standalone(r) => vec![r],
            Backend::Cluster { cluster, .. } => cluster.primaries(),
        };
        primaries
            .into_iter()
            .map(headroom_load::redis_commands)
            .sum()
    }
}

#[derive(Clone, Debug, Default)]
struct Run {
    decisions_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    server_us: f64,
    redis_us: f64,
    commands: f64,
}

async fn measure(
    (bin, backend, extra): (&std::path::Path, &Backend, &[(&'static str, String)]),
    args: &Args,
    entitlements: usize,
    prefix: &str,
) -> anyhow::Result<Run> {
    let mut env = backend.env();
    env.extend(extra.iter().cloned());
    env.extend([
        ("HEADROOM_REDIS_PREFIX", prefix.to_string()),
        ("HEADROOM_ADMIN_TOKENS", "bench-admin".into()),
        ("HEADROOM_CLIENT_TOKENS", "bench-client".into()),
        ("HEADROOM_WORKERS", "2".into()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tracker = Tracker::start(bin, &env)?;
    let addr: SocketAddr = tracker.addr();
    let spec = Spec {
        addr,
        admin_token: Some("bench-admin".into()),
        client_token: Some("bench-client".into()),
        scenario: Scenario::Usage,
        entitlements,
        zipf: args.zipf,
        connections: args.connections,
        duration: args.duration,
        rate: None,
        batch_size: 1000,
        seed: 42,
        prefix: "bench".into(),
        progress: false,
        spread: Vec::new(),
        keyed: false,
        by_owner: None,
        timeout: None,
    };
    setup(&spec).await?;
    let before = read_used(&spec).await?;
    let pid = tracker
        .pid()
        .ok_or_else(|| anyhow::anyhow!("no tracker pid"))?;
    let (cpu0, redis0, cmds0) = (
        cpu_seconds(pid),
        backend.redis_cpu(),
        backend.redis_commands()?,
    );
    let (mut report, tally) = run(spec.clone()).await?;
    let (cpu1, redis1, cmds1) = (
        cpu_seconds(pid),
        backend.redis_cpu(),
        backend.redis_commands()?,
    );
    check_ledger(&spec, &before, &tally, &mut report).await?;
    let ledger = report.ledger.clone().unwrap_or_default();
    anyhow::ensure!(
        ledger.ok,
        "{}: the ledger does not hold: {ledger:?}",
        backend.name()
    );
    let d = report.decisions.max(1) as f64;
    Ok(Run {
        decisions_per_s: report.decisions_per_s,
        p50_ms: report.latency.p50_us as f64 / 1000.0,
        p99_ms: report.latency.p99_us as f64 / 1000.0,
        server_us: (cpu1 - cpu0) * 1e6 / d,
        redis_us: (redis1 - redis0) * 1e6 / d,
        commands: (cmds1 - cmds0) as f64 / d,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = headroom_load::release_dir(args.no_build, &["-p", "headroom", "--bin", "headroom"])?;
    let bin = dir.join("headroom");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cluster_extra = |c: RedisCluster| {
        for n in &c.nodes {
            let _: redis::RedisResult<()> = redis::cmd("CONFIG")
                .arg(&["SET", "appendfsync", "everysec"])
                .query(&mut n.conn());
        }
        c
    };
    let mut backends = vec![Backend::Standalone(RedisServer::start_with(&EVERYSEC))];
    if !args.standalone_only {
        backends.push(Backend::Cluster {
            cluster: cluster_extra(RedisCluster::start(3, 0)),
            wait: 0,
        });
        backends.push(Backend::Cluster {
            cluster: cluster_extra(RedisCluster::start(3, 1)),
            wait: 1,
        });
    }
    // (name, tracker binary, backend, settings of its own)
    type Setup<'a> = (
        String,
        &'a std::path::Path,
        &'a Backend,
        Vec<(&'static str, String)>,
    );
    let mut setups: Vec<Setup> = Vec::new();
    if let Some(before) = &args.before {
        setups.push(("standalone, before".into(), before, &backends[0], vec![]));
    }
    for b in &backends {
        setups.push((b.name().to_string(), &bin, b, vec![]));
    }
    for &buckets in &args.buckets {
        let name = format!("standalone, {buckets} buckets");
        let env = vec![("HEADROOM_REDIS_BUCKETS", buckets.to_string())];
        setups.push((name, &bin, &backends[0], env));
    }
    let mut runs: Vec<Vec<Vec<Run>>> =
        vec![vec![Vec::new(); args.entitlements.len()]; setups.len()];
    for round in 0..args.rounds {
        for (e, &n) in args.entitlements.iter().enumerate() {
            for (s, (name, bin, backend, extra)) in setups.iter().enumerate() {
                // A prefix per run: the builds may differ in key layout.
                let prefix = format!("t{round}e{n}s{s}");
                let r = rt.block_on(measure((bin, backend, extra), &args, n, &prefix))?;
                eprintln!(
                    "round {round}, {n} entitlements, {name}: {:.0} decisions/s, p99 {:.2} ms",
                    r.decisions_per_s, r.p99_ms
                );
                runs[s][e].push(r);
            }
        }
    }
    println!(
        "| Redis | entitlements | decisions/s | p50 ms | p99 ms | server CPU µs/decision | Redis CPU µs/decision (all nodes) | Redis cmds/decision (primaries) |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (s, (name, ..)) in setups.iter().enumerate() {
        for (e, &n) in args.entitlements.iter().enumerate() {
            let rs = &runs[s][e];
            let m = |f: fn(&Run) -> f64| median(rs.iter().map(f).collect());
            let each: Vec<String> = rs
                .iter()
                .map(|r| format!("{:.0}", r.decisions_per_s))
                .collect();
            println!(
                "| {name} | {n} | {:.0} ({}) | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} |",
                m(|r| r.decisions_per_s),
                each.join(" / "),
                m(|r| r.p50_ms),
                m(|r| r.p99_ms),
                m(|r| r.server_us),
                m(|r| r.redis_us),
                m(|r| r.commands),
            );
        }
    }
    Ok(())
}
