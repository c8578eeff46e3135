//! The baselines headroom is measured against, serving the same usage route:
//! - `b0`: parses the usage JSON and answers a constant decision (the
//!   framework ceiling);
//! - `b1`: the usual stateless design, one EVALSHA check-and-increment per
//!   call through deadpool-redis.

use std::net::SocketAddr;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::{Parser, ValueEnum};
use deadpool_redis::{Pool, Runtime};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    B0,
    B1,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Hard cap each entitlement's counter is checked against (B1).
    #[arg(long, default_value_t = u64::MAX / 2)]
    cap: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Usage {
    feature: String,
    amount: u64,
    #[serde(default)]
    idempotency_key: Option<String>,
}

const DECISION: &str = r#"{"outcome":"granted","feature":"api","amount":1,"used":1,"included":1000000,"hard_cap":1200000,"remaining_purchased":999999,"remaining_overdraft":200000,"period_start":null,"period_end":null}"#;

const CHECK_AND_INCREMENT: &str = r#"
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local amount = tonumber(ARGV[2])
if used + amount > tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[1], 'denied', 1)
  return {0, used}
end
return {1, redis.call('HINCRBY', KEYS[1], ARGV[1], amount)}
"#;

fn parse(body: &[u8]) -> Result<Usage, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

async fn b0(_path: web::Path<String>, body: web::Bytes) -> HttpResponse {
    match parse(&body) {
        Ok(_) => HttpResponse::Ok()
            .content_type("application/json")
            .body(DECISION),
        Err(e) => HttpResponse::BadRequest().body(e),
    }
}

struct B1 {
    /// One multiplexed connection taken from the pool and shared: checking a
    /// connection out of deadpool per call costs a PING round trip, which
    /// would make the baseline slower than the usual design really is.
    conn: redis::aio::MultiplexedConnection,
    script: redis::Script,
    cap: u64,
}

async fn b1(path: web::Path<String>, body: web::Bytes, state: web::Data<B1>) -> HttpResponse {
    let usage = match parse(&body) {
        Ok(u) => u,
        Err(e) => return HttpResponse::BadRequest().body(e),
    };
    let mut conn = state.conn.clone();
    let key = format!("b1:{{{}}}:usage", path.into_inner());
    let res: redis::RedisResult<(u8, u64)> = state
        .script
        .key(key)
        .arg(&usage.feature)
        .arg(usage.amount)
        .arg(state.cap)
        .invoke_async(&mut conn)
        .await;
    match res {
        Ok((granted, used)) => {
            let outcome = if granted == 1 { "granted" } else { "denied" };
            let body = serde_json::json!({
                "outcome": outcome, "feature": usage.feature, "amount": usage.amount, "used": used,
                "hard_cap": state.cap,
            });
            if granted == 1 {
                HttpResponse::Ok().json(body)
            } else {
                HttpResponse::TooManyRequests().json(body)
            }
        }
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = match args.mode {
        Mode::B0 => {
            HttpServer::new(|| App::new().route("/v1/entitlements/{id}/usage", web::post().to(b0)))
                .workers(args.workers)
                .bind(args.listen)?
                .run()
        }
        Mode::B1 => {
            let pool: Pool = deadpool_redis::Config::from_url(&args.redis_url)
                .create_pool(Some(Runtime::Tokio1))?;
            let conn = deadpool_redis::Connection::take(pool.get().await?);
            let state = web::Data::new(B1 {
                conn,
                script: redis::Script::new(CHECK_AND_INCREMENT),
                cap: args.cap,
            });
            HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .route("/v1/entitlements/{id}/usage", web::post().to(b1))
            })
            .workers(args.workers)
            .bind(args.listen)?
            .run()
        }
    };
    server.await?;
    Ok(())
}
