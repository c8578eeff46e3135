//! The load test: drives headroom with one scenario, prints a progress line
//! every second and a summary, writes a JSON report, and checks the ledger.
//!
//! cargo run --release -p headroom-load --bin load -- --help

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use headroom_load::{Scenario, Spec, check_ledger, read_used, run, setup, summary};

#[derive(Parser, Debug)]
#[command(about = "Load-test a running headroom")]
struct Args {
    /// Address of the tracker.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    #[arg(long, env = "HEADROOM_ADMIN_TOKEN")]
    admin_token: Option<String>,
    #[arg(long, env = "HEADROOM_CLIENT_TOKEN")]
    client_token: Option<String>,
    #[arg(long, value_enum, default_value = "usage")]
    scenario: Scenario,
    #[arg(long, default_value_t = 1000)]
    entitlements: usize,
    /// Zipf exponent of traffic over entitlements.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fixed rate in requests per second (default: as fast as it answers).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Entitlement ids are `{prefix}-{n}`.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Do not create the entitlements first.
    #[arg(long)]
    no_setup: bool,
    /// Skip the ledger check at the end.
    #[arg(long)]
    no_ledger: bool,
    /// Where to write the JSON report.
    #[arg(long, default_value = "load-report.json")]
    report: std::path::PathBuf,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let spec = Spec {
            addr: args.addr,
            admin_token: args.admin_token,
            client_token: args.client_token,
            scenario: args.scenario,
            entitlements: args.entitlements,
            zipf: args.zipf,
            connections: args.connections,
            duration: args.duration,
            rate: args.rate,
            batch_size: args.batch_size,
            seed: args.seed,
            prefix: args.prefix,
            progress: true,
        };
        if !args.no_setup {
            setup(&spec).await?;
        }
        let before = if args.no_ledger {
            Vec::new()
        } else {
            read_used(&spec).await?
        };
        let (mut report, tally) = run(spec.clone()).await?;
        if !args.no_ledger {
            check_ledger(&spec, &before, &tally, &mut report).await?;
        }
        print!("{}", summary(&report));
        std::fs::write(&args.report, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", args.report.display());
        if report.ledger.as_ref().is_some_and(|l| !l.ok) {
            anyhow::bail!("ledger check failed");
        }
        Ok(())
    })
}
