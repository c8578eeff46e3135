//! The overdraft report at scale: N entitlements in overdraft on a private
//! Redis, paged through whole by the tracker binary, page by page, with the
//! time and the Redis commands each page costs. A page reads at most
//! `B·c + 2·limit` ids from the buckets' indexes (`c = max(8, 2·limit/B)`)
//! and the states of the `limit` it lists, whatever N is; this measures it.
//!
//! The entitlements are copies of one made through the API (its stored
//! state and seats written under each id, each added to its bucket's
//! index), so that a million take seconds to write, not an hour.
//!
//! ```sh
//! cargo run --release -p headroom-load --bin report -- --entitlements 1000000
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use headroom::domain::EntitlementId;
use headroom::store::{DEFAULT_BUCKETS, Keys};
use headroom_load::Conn;
use headroom_test_support::{RedisServer, Tracker};

const ADMIN: &str = "Bearer report-admin";
const PREFIX: &str = "rep";

#[derive(Parser, Debug)]
#[command(about = "Page through the overdraft report of N entitlements")]
struct Args {
    /// Entitlements in overdraft (each run also measures 1,000 first).
    #[arg(long, default_value_t = 1_000_000)]
    entitlements: usize,
    /// Page sizes to page through with.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000])]
    limits: Vec<usize>,
    /// Skip `cargo build --release` (when the binaries are fresh).
    #[arg(long)]
    no_build: bool,
}

fn env(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("HEADROOM_REDIS_URL", redis.url()),
        ("HEADROOM_REDIS_PREFIX", PREFIX.into()),
        (
            "HEADROOM_ADMIN_TOKENS",
            ADMIN.trim_start_matches("Bearer ").into(),
        ),
        ("HEADROOM_CLIENT_TOKENS", "report-client".into()),
        ("HEADROOM_REDIS_TIMEOUT", "10s".into()),
    ]
}

fn start(bin: &std::path::Path, redis: &RedisServer) -> anyhow::Result<Tracker> {
    let env = env(redis);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Tracker::start(bin, &env)
}

async fn call(conn: &mut Conn, method: &str, path: &str, body: &str) -> anyhow::Result<Bytes> {
    let auth = if method == "POST" && path.contains("/seats/") {
        "Bearer report-client"
    } else {
        ADMIN
    };
    let (status, body) = conn
        .call(method, path, Some(auth), Bytes::from(body.to_string()))
        .await?;
    anyhow::ensure!(status < 300, "{method} {path}: {status} {body:?}");
    Ok(body)
}

/// A stored hash: its fields and values.
type Fields = Vec<(String, String)>;

/// The template: one entitlement in overdraft made through the API; its
/// stored state and seats.
async fn template(bin: &std::path::Path, redis: &RedisServer) -> anyhow::Result<(Fields, Fields)> {
    let mut tracker = start(bin, redis)?;
    let mut conn = Conn::open(tracker.addr()).await?;
    call(
        &mut conn,
        "PUT",
        "/v1/entitlements/template",
        r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#,
    )
    .await?;
    for seat in ["a", "b"] {
        call(
            &mut conn,
            "POST",
            &format!("/v1/entitlements/template/seats/{seat}"),
            "",
        )
        .await?;
    }
    anyhow::ensure!(tracker.terminate(), "the tracker stops");
    let keys = Keys::new(PREFIX, DEFAULT_BUCKETS);
    let id = EntitlementId::parse("template")?;
    let mut c = redis.conn();
    let read = |key: String, c: &mut redis::Connection| -> anyhow::Result<Fields> {
        let fields: Fields = redis::cmd("HGETALL").arg(&key).query(c)?;
        anyhow::ensure!(!fields.is_empty(), "{key} is not stored");
        Ok(fields)
    };
    let state = read(keys.state(&id), &mut c)?;
    let seats = read(keys.seats(&id), &mut c)?;
    // The template itself leaves, so that the report holds only the copies.
    let b = keys.bucket_of(&id);
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(keys.state(&id))
        .arg(keys.seats(&id))
        .ignore()
        .cmd("ZREM")
        .arg(keys.overdraft_index(b))
        .arg("template")
        .ignore()
        .cmd("DEL")
        .arg(keys.overdraft_totals(b))
        .ignore()
        .query(&mut c)?;
    Ok((state, seats))
}

/// `n` copies of the template, `e0000000`…, in their buckets' indexes (the
/// stored state names its entitlement: the name is replaced).
fn copy(redis: &RedisServer, (state, seats): &(Fields, Fields), n: usize) -> anyhow::Result<()> {
    let keys = Keys::new(PREFIX, DEFAULT_BUCKETS);
    let mut c = redis.conn();
    for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let name = format!("e{i:07}");
            let id = EntitlementId::parse(&name)?;
            let b = keys.bucket_of(&id);
            let renamed: Fields = state
                .iter()
                .map(|(f, v)| (f.clone(), v.replace("\"template\"", &format!("\"{name}\""))))
                .collect();
            pipe.cmd("HSET").arg(keys.state(&id)).arg(&renamed).ignore();
            pipe.cmd("HSET").arg(keys.seats(&id)).arg(seats).ignore();
            pipe.cmd("ZADD")
                .arg(keys.overdraft_index(b))
                .arg(0)
                .arg(&name)
                .ignore();
            pipe.cmd("HINCRBY")
                .arg(keys.overdraft_totals(b))
                .arg("entitlements")
                .arg(1)
                .ignore();
        }
        let _: () = pipe.query(&mut c)?;
    }
    Ok(())
}

/// Redis's count of each command so far.
fn command_calls(redis: &RedisServer, cmd: &str) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

struct Paged {
    pages: usize,
    listed: usize,
    times: Vec<Duration>,
    zrange_per_page: f64,
}

/// Pages through the whole report with `limit`; checks each id comes once
/// and in order.
async fn page_through(conn: &mut Conn, redis: &RedisServer, limit: usize) -> anyhow::Result<Paged> {
    let zrange = command_calls(redis, "zrange")?;
    let mut times = Vec::new();
    let mut cursor: Option<String> = None;
    let mut last: Option<String> = None;
    let mut listed = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/reports/overdraft?limit={limit}&cursor={c}"),
            None => format!("/v1/reports/overdraft?limit={limit}"),
        };
        let started = Instant::now();
        let body = call(conn, "GET", &path, "").await?;
        times.push(started.elapsed());
        let page: serde_json::Value = serde_json::from_slice(&body)?;
        for item in page["items"].as_array().context("items")? {
            let id = item["entitlement"]
                .as_str()
                .context("entitlement")?
                .to_string();
            anyhow::ensure!(last.as_ref().is_none_or(|l| *l < id), "{id} out of order");
            last = Some(id);
            listed += 1;
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let pages = times.len();
    let zrange_per_page = (command_calls(redis, "zrange")? - zrange) as f64 / pages as f64;
    Ok(Paged {
        pages,
        listed,
        times,
        zrange_per_page,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = headroom_load::release_dir(args.no_build, &["-p", "headroom", "--bin", "headroom"])?;
    let bin = dir.join("headroom");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!(
        "| entitlements | limit | pages | listed | median ms | p99 ms | max ms | first page ms | last page ms | ZRANGE per page | Redis used_memory MiB |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in [1_000, args.entitlements] {
        let redis = RedisServer::start_with(&["--appendonly", "no"]);
        let tmpl = rt.block_on(template(&bin, &redis))?;
        let started = Instant::now();
        copy(&redis, &tmpl, n)?;
        eprintln!(
            "{n} entitlements written in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let tracker = start(&bin, &redis)?;
        let info: String = redis::cmd("INFO").arg("memory").query(&mut redis.conn())?;
        let used: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        for &limit in &args.limits {
            let paged = rt.block_on(async {
                let mut conn = Conn::open(tracker.addr()).await?;
                page_through(&mut conn, &redis, limit).await
            })?;
            anyhow::ensure!(paged.listed == n, "listed {} of {n}", paged.listed);
            let (first, last) = (paged.times[0], *paged.times.last().expect("a page"));
            let mut sorted = paged.times.clone();
            sorted.sort();
            println!(
                "| {n} | {limit} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |",
                paged.pages,
                paged.listed,
                ms(quantile(&sorted, 0.5)),
                ms(quantile(&sorted, 0.99)),
                ms(*sorted.last().expect("a page")),
                ms(first),
                ms(last),
                paged.zrange_per_page,
                used / (1024.0 * 1024.0),
            );
        }
        drop(tracker);
    }
    Ok(())
}
