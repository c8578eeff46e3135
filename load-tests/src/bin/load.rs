//! The load test: drives headroom with one scenario, prints a progress line
//! every second and a summary, writes a JSON report, and checks the ledger.
//!
//! cargo run --release -p headroom-load --bin load -- --help

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use headroom_load::{Scenario, Spec, check_ledger, cleanup, read_used, run, setup, summary};

/// The first token of a comma-separated list, as the tracker reads
/// `HEADROOM_ADMIN_TOKENS` and `HEADROOM_CLIENT_TOKENS`.
fn first_token(s: &str) -> Result<String, String> {
    s.split(',')
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(String::from)
        .ok_or_else(|| "no token in the list".into())
}

#[derive(Parser, Debug)]
#[command(
    about = "Load-test a running headroom",
    long_about = "Load-test a running headroom: creates (or overwrites) the entitlements \
        {prefix}-0 … {prefix}-{N-1}, drives one scenario against them, prints a progress \
        line every second and a summary, writes a JSON report and checks the ledger (the \
        tracker's counters against what this client saw acknowledged). Exits non-zero when \
        more calls failed than --max-error-ratio allows, when nothing was acknowledged, or \
        when the ledger does not hold or cannot be read."
)]
struct Args {
    /// Address of the tracker.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Send the calls round robin over these nodes (comma-separated
    /// host:port) instead of `--addr` alone, as a round-robin balancer
    /// would; set-up and the ledger go through `--addr`.
    #[arg(long, value_delimiter = ',')]
    spread: Vec<SocketAddr>,
    /// Admin token (creates and reads the entitlements); the first of the
    /// tracker's own list is taken.
    #[arg(long, env = "HEADROOM_ADMIN_TOKENS", value_parser = first_token, hide_env_values = true)]
    admin_token: Option<String>,
    /// Client token (meters); the first of the tracker's own list is taken.
    #[arg(long, env = "HEADROOM_CLIENT_TOKENS", value_parser = first_token, hide_env_values = true)]
    client_token: Option<String>,
    /// What to send: usage calls, batches of usage events, or seat churn.
    #[arg(long, value_enum, default_value = "usage")]
    scenario: Scenario,
    /// Entitlements to spread the traffic over.
    #[arg(long, default_value_t = 1000)]
    entitlements: usize,
    /// Zipf exponent of the traffic over entitlements (0: uniform).
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long to send for.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fixed rate in requests per second (default: as fast as it answers).
    #[arg(long)]
    rate: Option<f64>,
    /// Usage events per batch (scenario batch).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Seed of the traffic's random choices.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Entitlement ids are `{prefix}-{n}`.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// Do not create the entitlements first (they must exist).
    #[arg(long)]
    no_setup: bool,
    /// Skip the ledger check at the end.
    #[arg(long)]
    no_ledger: bool,
    /// Delete the entitlements afterwards.
    #[arg(long)]
    cleanup: bool,
    /// Largest share of calls that may fail (HTTP 5xx, 4xx other than a
    /// denial, or no answer) before the run counts as failed.
    #[arg(long, default_value_t = 0.01)]
    max_error_ratio: f64,
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
            spread: args.spread.clone(),
            keyed: false,
            by_owner: None,
            timeout: None,
        };
        if !args.no_setup {
            println!(
                "creating {n} entitlements {p}-0 … {p}-{last} (overwriting any with those ids; --cleanup deletes them afterwards)",
                n = spec.entitlements,
                p = spec.prefix,
                last = spec.entitlements.saturating_sub(1)
            );
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
        if args.cleanup {
            let deleted = cleanup(&spec).await?;
            println!("deleted {deleted} entitlements {}-*", spec.prefix);
        }
        verdict(&report, args.max_error_ratio)
    })
}

/// Whether the run counts as a success.
fn verdict(report: &headroom_load::Report, max_error_ratio: f64) -> anyhow::Result<()> {
    let failed = report.http_errors + report.transport_errors;
    let ratio = failed as f64 / report.requests.max(1) as f64;
    anyhow::ensure!(
        report.requests > 0 && report.granted_or_overdraft + report.denied > 0,
        "no call was answered with a decision ({} requests, {failed} failed): check the tokens and the address",
        report.requests
    );
    anyhow::ensure!(
        ratio <= max_error_ratio,
        "{failed} of {} requests failed ({:.1} %, more than --max-error-ratio {:.1} %)",
        report.requests,
        ratio * 100.0,
        max_error_ratio * 100.0
    );
    if report.ledger.as_ref().is_some_and(|l| !l.ok) {
        anyhow::bail!("ledger check failed");
    }
    Ok(())
}
