//! The side-by-side comparison: builds everything in release mode, starts a
//! private Redis, and runs the same client against
//! - B0: actix-web parsing the usage JSON and answering a constant,
//! - B1: one EVALSHA check-and-increment per call (the usual design),
//! - T: headroom with durable Redis persistence,
//! - T-mem: headroom on its in-memory store,
//!
//! then T and B0 at fixed rates (25/50/75 % of T's peak), T with 1,000-event
//! batches, T's cold start, and prints a markdown table.
//!
//! cargo run --release -p headroom-load --bin compare

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use headroom_load::{
    Conn, Report, Scenario, Spec, check_ledger, cpu_seconds, read_used, redis_commands, run, setup,
};
use headroom_test_support::RedisServer;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Run B0, B1, T and T-mem back to back and print the table")]
struct Args {
    /// Length of each peak run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 1000)]
    entitlements: usize,
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// HTTP workers of every server under test.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Skip `cargo build --release` (when the binaries are fresh).
    #[arg(long)]
    no_build: bool,
    #[arg(long, default_value = "compare-report.json")]
    report: PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {}", self.name);
    }
}

fn bin(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

async fn wait_ready(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = Conn::open(addr).await
            && c.call("GET", path, None, bytes::Bytes::new()).await.is_ok()
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "server on {addr} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Serialize, Clone)]
struct Row {
    name: String,
    report: Report,
    redis_commands_per_decision: Option<f64>,
    server_cpu_s_per_1k: f64,
    redis_cpu_s_per_1k: Option<f64>,
    /// The load client's own CPU (this process).
    client_cpu_s_per_1k: f64,
}

struct Bench<'a> {
    args: &'a Args,
    dir: PathBuf,
    redis: &'a RedisServer,
}

enum Server {
    B0,
    B1,
    Headroom { durable: bool },
}

impl Bench<'_> {
    fn spawn(&self, server: &Server, addr: SocketAddr) -> anyhow::Result<Proc> {
        let workers = self.args.workers.to_string();
        let (name, mut cmd) = match server {
            Server::B0 | Server::B1 => {
                let mode = if matches!(server, Server::B0) {
                    "b0"
                } else {
                    "b1"
                };
                let mut c = Command::new(bin(&self.dir, "baseline"));
                c.args([
                    "--mode",
                    mode,
                    "--listen",
                    &addr.to_string(),
                    "--workers",
                    &workers,
                ]);
                c.args(["--redis-url", &self.redis.url()]);
                (mode.to_uppercase(), c)
            }
            Server::Headroom { durable } => {
                let mut c = Command::new(bin(&self.dir, "headroom"));
                c.env("HEADROOM_LISTEN", addr.to_string())
                    .env("HEADROOM_WORKERS", &workers)
                    .env("HEADROOM_ADMIN_TOKENS", "bench-admin")
                    .env("HEADROOM_CLIENT_TOKENS", "bench-client")
                    .env("RUST_LOG", "warn");
                if *durable {
                    c.env("HEADROOM_REDIS_URL", self.redis.url());
                }
                (if *durable { "T".into() } else { "T-mem".into() }, c)
            }
        };
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        Ok(Proc { child, name })
    }

    fn spec(&self, addr: SocketAddr, scenario: Scenario, rate: Option<f64>, tokens: bool) -> Spec {
        Spec {
            addr,
            admin_token: tokens.then(|| "bench-admin".into()),
            client_token: tokens.then(|| "bench-client".into()),
            scenario,
            entitlements: self.args.entitlements,
            zipf: self.args.zipf,
            connections: self.args.connections,
            duration: self.args.duration,
            rate,
            batch_size: 1000,
            seed: 42,
            prefix: "bench".into(),
            progress: false,
            spread: Vec::new(),
            keyed: false,
            by_owner: None,
            timeout: None,
        }
    }

    /// Starts a server, loads it, measures, stops it.
    async fn measure(
        &self,
        name: &str,
        server: Server,
        scenario: Scenario,
        rate: Option<f64>,
    ) -> anyhow::Result<Row> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let proc = self.spawn(&server, addr)?;
        let headroom = matches!(server, Server::Headroom { .. });
        wait_ready(addr, if headroom { "/readyz" } else { "/" }).await?;
        let spec = self.spec(addr, scenario, rate, headroom);
        if headroom {
            setup(&spec).await?;
        }
        let before = if headroom {
            read_used(&spec).await?
        } else {
            Vec::new()
        };
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut self.redis.conn())?;
        let me = std::process::id();
        let (cpu0, rcpu0, ccpu0) = (
            cpu_seconds(proc.pid()),
            cpu_seconds(self.redis.pid().unwrap_or(0)),
            cpu_seconds(me),
        );
        let (mut report, tally) = run(spec.clone()).await?;
        let (cpu1, rcpu1, ccpu1) = (
            cpu_seconds(proc.pid()),
            cpu_seconds(self.redis.pid().unwrap_or(0)),
            cpu_seconds(me),
        );
        let commands = redis_commands(self.redis)?;
        if headroom {
            check_ledger(&spec, &before, &tally, &mut report).await?;
        }
        let uses_redis = !matches!(server, Server::B0 | Server::Headroom { durable: false });
        let k = report.decisions.max(1) as f64 / 1000.0;
        let row = Row {
            name: name.to_string(),
            redis_commands_per_decision: uses_redis
                .then(|| commands as f64 / report.decisions.max(1) as f64),
            server_cpu_s_per_1k: (cpu1 - cpu0) / k,
            redis_cpu_s_per_1k: uses_redis.then(|| (rcpu1 - rcpu0) / k),
            client_cpu_s_per_1k: (ccpu1 - ccpu0) / k,
            report,
        };
        eprintln!(
            "{name}: {:.0} decisions/s, p99 {} µs",
            row.report.decisions_per_s, row.report.latency.p99_us
        );
        drop(proc);
        Ok(row)
    }

    /// The first call to each of `n` entitlements whose state is in Redis
    /// but not in the tracker's memory (a fresh process).
    async fn cold_start(&self, n: usize) -> anyhow::Result<Report> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let spec = Spec {
            entitlements: n,
            connections: 16,
            ..self.spec(addr, Scenario::Usage, None, true)
        };
        {
            let _warm = self.spawn(&Server::Headroom { durable: true }, addr)?;
            wait_ready(addr, "/readyz").await?;
            setup(&spec).await?;
        }
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let _proc = self.spawn(&Server::Headroom { durable: true }, addr)?;
        wait_ready(addr, "/readyz").await?;
        let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let started = Instant::now();
        let ids: Vec<usize> = (0..n).collect();
        let mut tasks = Vec::new();
        for chunk in ids.chunks(n.div_ceil(16)) {
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut conn = Conn::open(addr).await?;
                let mut lat = Vec::with_capacity(chunk.len());
                for i in chunk {
                    let path = format!("/v1/entitlements/bench-{i}/usage");
                    let t = Instant::now();
                    let (status, _) = conn
                        .call(
                            "POST",
                            &path,
                            Some("Bearer bench-client"),
                            bytes::Bytes::from_static(br#"{"feature":"api","amount":1}"#),
                        )
                        .await?;
                    anyhow::ensure!(status == 200, "cold call {path}: {status}");
                    lat.push(t.elapsed().as_micros() as u64);
                }
                anyhow::Ok(lat)
            }));
        }
        for t in tasks {
            for us in t.await?? {
                hist.record(us.max(1))?;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok(Report {
            scenario: "cold first call".into(),
            connections: 16,
            entitlements: n,
            elapsed_s: elapsed,
            requests: n as u64,
            decisions: n as u64,
            requests_per_s: n as f64 / elapsed,
            decisions_per_s: n as f64 / elapsed,
            granted_or_overdraft: n as u64,
            latency: headroom_load::Latency {
                p50_us: hist.value_at_quantile(0.5),
                p90_us: hist.value_at_quantile(0.9),
                p99_us: hist.value_at_quantile(0.99),
                p999_us: hist.value_at_quantile(0.999),
                max_us: hist.max(),
                mean_us: hist.mean(),
            },
            ..Report::default()
        })
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = headroom_load::release_dir(args.no_build, &["--workspace", "--bins"])?;
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let bench = Bench { args: &args, dir, redis: &redis };
        let b0 = bench.measure("B0", Server::B0, Scenario::Usage, None).await?;
        let b1 = bench.measure("B1", Server::B1, Scenario::Usage, None).await?;
        let t = bench.measure("T", Server::Headroom { durable: true }, Scenario::Usage, None).await?;
        let tmem = bench.measure("T-mem", Server::Headroom { durable: false }, Scenario::Usage, None).await?;
        let peak = t.report.requests_per_s;
        let mut fixed = Vec::new();
        for share in [0.25, 0.5, 0.75] {
            let name = format!("T at {:.0} %", share * 100.0);
            fixed.push(bench.measure(&name, Server::Headroom { durable: true }, Scenario::Usage, Some(peak * share)).await?);
            // B0 at the same rate: what the client and the machine add to
            // any server's latency at this rate (the client paces on tokio's
            // millisecond timer, so requests leave in small bursts).
            let name = format!("B0 at T's {:.0} %", share * 100.0);
            fixed.push(bench.measure(&name, Server::B0, Scenario::Usage, Some(peak * share)).await?);
        }
        let batch = bench.measure("T batch", Server::Headroom { durable: true }, Scenario::Batch, None).await?;
        let seats = bench.measure("T seats", Server::Headroom { durable: true }, Scenario::Seats, None).await?;
        let cold = bench.cold_start(2000).await?;

        let mut out = String::new();
        out += &format!(
            "{} connections, {} entitlements (Zipf {}), {} s per run, {} HTTP workers per server, client and servers on this machine\n\n",
            args.connections, args.entitlements, args.zipf, args.duration.as_secs(), args.workers
        );
        out += "| run | decisions/s | p50 ms | p99 ms | p99.9 ms | Redis cmds/decision | server CPU-s/1k | Redis CPU-s/1k | client CPU-s/1k | ledger |\n";
        out += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n";
        let rows: Vec<&Row> = [&b0, &b1, &t, &tmem].into_iter().chain(fixed.iter()).chain([&batch, &seats]).collect();
        for r in &rows {
            let l = &r.report.latency;
            out += &format!(
                "| {} | {:.0} | {} | {} | {} | {} | {:.4} | {} | {:.4} | {} |\n",
                r.name,
                r.report.decisions_per_s,
                ms(l.p50_us),
                ms(l.p99_us),
                ms(l.p999_us),
                opt(r.redis_commands_per_decision, 3),
                r.server_cpu_s_per_1k,
                opt(r.redis_cpu_s_per_1k, 4),
                r.client_cpu_s_per_1k,
                r.report.ledger.as_ref().map_or("–", |l| if l.ok { "OK" } else { "FAILED" }),
            );
        }
        let ratio = |a: &Row, b: &Row| a.report.decisions_per_s / b.report.decisions_per_s.max(1.0);
        out += &format!(
            "\nT/B0 = {:.2}   T/B1 = {:.2}   T-mem/B0 = {:.2}   batch events/s = {:.0}\n",
            ratio(&t, &b0),
            ratio(&t, &b1),
            ratio(&tmem, &b0),
            batch.report.decisions_per_s
        );
        out += &format!(
            "cold first call ({} entitlements in Redis, fresh process): p50 {} ms, p99 {} ms\n",
            cold.entitlements,
            ms(cold.latency.p50_us),
            ms(cold.latency.p99_us)
        );
        println!("{out}");
        #[derive(Serialize)]
        struct Full<'a> {
            rows: Vec<&'a Row>,
            cold: &'a Report,
            table: &'a str,
        }
        std::fs::write(&args.report, serde_json::to_string_pretty(&Full { rows, cold: &cold, table: &out })?)?;
        eprintln!("report written to {}", args.report.display());
        let failed = [&t, &tmem, &batch, &seats]
            .into_iter()
            .chain(fixed.iter())
            .any(|r| r.report.ledger.as_ref().is_some_and(|l| !l.ok));
        anyhow::ensure!(!failed, "a ledger check failed");
        Ok(())
    })
}
