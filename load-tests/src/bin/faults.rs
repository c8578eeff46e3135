//! The fault-injection suite against the release build: load on a private
//! Redis while every fault in turn is injected, then the ledger. Prints the
//! fault matrix (the table in RELIABILITY.md) and writes a JSON report.
//!
//! ```sh
//! cargo run --release -p headroom-load --bin faults
//! cargo run --release -p headroom-load --bin faults -- --cluster-primaries 3
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use headroom_load::faults::{self, Fault, Plan, Topology};

#[derive(Parser, Debug)]
#[command(about = "Inject every fault under load and check the ledger")]
struct Args {
    #[arg(long, default_value_t = 40)]
    entitlements: usize,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// The tracker's --redis-timeout.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    redis_timeout: Duration,
    /// Load before each fault and after the last.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    steady: Duration,
    /// How long each fault lasts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    outage: Duration,
    /// Faults to inject, in order (default: all; on a cluster, with
    /// `reshard`).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// Run on a private Redis Cluster of this many primaries (0: one
    /// standalone Redis).
    #[arg(long, default_value_t = 0)]
    cluster_primaries: usize,
    /// Replicas per primary on the cluster; the tracker waits for them
    /// (`HEADROOM_REDIS_WAIT_REPLICAS`).
    #[arg(long, default_value_t = 1)]
    cluster_replicas: usize,
    /// Skip `cargo build --release` (when the binaries are fresh).
    #[arg(long)]
    no_build: bool,
    #[arg(long, default_value = "faults-report.json")]
    report: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = headroom_load::release_dir(args.no_build, &["-p", "headroom", "--bin", "headroom"])?;
    let topology = match args.cluster_primaries {
        0 => Topology::Standalone,
        primaries => Topology::Cluster {
            primaries,
            replicas: args.cluster_replicas,
        },
    };
    let plan = Plan {
        bin: dir.join("headroom"),
        entitlements: args.entitlements,
        connections: args.connections,
        redis_timeout: args.redis_timeout,
        steady: args.steady,
        outage: args.outage,
        faults: match (args.faults.is_empty(), topology) {
            (false, _) => args.faults.clone(),
            (true, Topology::Standalone) => Fault::ALL.to_vec(),
            (true, Topology::Cluster { .. }) => Fault::CLUSTER.to_vec(),
        },
        topology,
        progress: true,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = rt.block_on(faults::run(plan))?;
    print!("{}", faults::markdown(&report));
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("report written to {}", args.report.display());
    anyhow::ensure!(report.ok, "the ledger does not hold");
    Ok(())
}
