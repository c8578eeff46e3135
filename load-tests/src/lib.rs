//! The load generator shared by the `load` and `compare` commands.
//!
//! It is written on hyper's HTTP/1.1 client connections rather than on goose:
//! client and servers share the same two cores here, so the client's own cost
//! per request decides how much CPU the server under test gets. One hyper
//! connection per virtual user, latencies in an HDR histogram, no per-request
//! allocation beyond the request itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};
use serde::Serialize;
use tokio::net::TcpStream;

pub mod faults;

/// What each virtual user does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One `POST /v1/entitlements/{id}/usage` of amount 1 per request.
    Usage,
    /// `POST /v1/usage/batch` with `batch_size` events over Zipf entitlements.
    Batch,
    /// Seat churn: activations (70 %) and releases (30 %) over a pool of
    /// seat ids per entitlement, with leases.
    Seats,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub addr: SocketAddr,
    pub admin_token: Option<String>,
    pub client_token: Option<String>,
    pub scenario: Scenario,
    pub entitlements: usize,
    /// Zipf exponent of the traffic over entitlements (0 = uniform).
    pub zipf: f64,
    pub connections: usize,
    pub duration: Duration,
    /// Requests per second over all connections; `None` runs flat out.
    pub rate: Option<f64>,
    pub batch_size: usize,
    pub seed: u64,
    /// Entitlement ids are `{prefix}-{n}`.
    pub prefix: String,
    pub progress: bool,
    /// When not empty, each user sends its calls round robin over these
    /// (several nodes, as a round-robin balancer would) instead of `addr`.
    pub spread: Vec<SocketAddr>,
    /// Usage calls carry an idempotency key of their own, and a call whose
    /// outcome is unknown (no answer, a 5xx) is sent again with its key, to
    /// the next address, until it is answered (at most `KEYED_RETRIES`
    /// times): every call is resolved, and the ledger must be exact.
    pub keyed: bool,
    /// With `spread`: the address (its index in `spread`) each entitlement
    /// (by index) is sent to, as a client that knows the owners would;
    /// `None` sends round robin.
    pub by_owner: Option<Arc<Vec<usize>>>,
    /// A call not answered within this is given up (its connection
    /// dropped) and counted as a transport error; `None` waits.
    pub timeout: Option<Duration>,
}

/// How often a keyed call whose outcome is unknown is sent again.
pub const KEYED_RETRIES: usize = 200;

/// Limits each entitlement is configured with by [`setup`].
pub const INCLUDED: u64 = 1_000_000_000;
pub const HARD_CAP: u64 = 1_500_000_000;
pub const SEATS_PURCHASED: u64 = 20;
pub const SEATS_CAP: u64 = 30;
pub const SEAT_POOL: usize = 50;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    fn from(h: &Histogram<u64>) -> Self {
        Latency {
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub connections: usize,
    pub entitlements: usize,
    pub target_rate: Option<f64>,
    pub elapsed_s: f64,
    pub requests: u64,
    /// Usage events or seat calls decided (a batch request carries many).
    pub decisions: u64,
    pub requests_per_s: f64,
    pub decisions_per_s: f64,
    pub granted_or_overdraft: u64,
    pub denied: u64,
    pub http_errors: u64,
    pub transport_errors: u64,
    pub latency: Latency,
    pub ledger: Option<Ledger>,
}

/// The end-of-run check: the server's state equals what the client saw
/// acknowledged, and no cap was passed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Ledger {
    pub entitlements_checked: usize,
    pub mismatches: Vec<String>,
    pub cap_violations: Vec<String>,
    pub ok: bool,
}

/// Per-entitlement counts the client saw.
struct Counts {
    /// Usage units acknowledged (200).
    acked: Vec<AtomicU64>,
    /// Calls whose outcome the client does not know (transport error, 5xx).
    unknown: Vec<AtomicU64>,
    /// Highest `in_use` or `used` reported in a granted answer above the cap.
    cap_violations: AtomicU64,
}

struct Shared {
    spec: Spec,
    /// `/v1/entitlements/{id}/usage` of every entitlement, built once.
    usage_paths: Vec<String>,
    /// Each entitlement's batch event, built once, so that the client's
    /// cost per event stays small next to the server's.
    batch_events: Vec<String>,
    counts: Counts,
    requests: AtomicU64,
    errors: AtomicU64,
    /// The slowest answer since the last progress line (µs), and how many
    /// took longer than 5 ms: when in the run the tail happens.
    slowest_us: AtomicU64,
    over_5ms: AtomicU64,
    stop: AtomicBool,
}

fn auth(token: &Option<String>) -> Option<String> {
    token.as_ref().map(|t| format!("Bearer {t}"))
}

pub fn entitlement_id(prefix: &str, n: usize) -> String {
    format!("{prefix}-{n}")
}

/// A minimal HTTP/1.1 client on one kept-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let (status, _, body) = self.call_replayed(method, path, token, body).await?;
        Ok((status, body))
    }

    /// As [`Conn::call`], and whether the answer is a replay of an earlier
    /// decision (the `Idempotency-Replayed` header).
    pub async fn call_replayed(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(u16, bool, Bytes)> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let res = self.sender.send_request(req.body(Full::new(body))?).await?;
        let status = res.status().as_u16();
        let replayed = res.headers().contains_key("idempotency-replayed");
        let body = res.into_body().collect().await?.to_bytes();
        Ok((status, replayed, body))
    }
}

fn usage_config() -> String {
    format!(
        r#"{{"seats": {{"purchased": {SEATS_PURCHASED}, "hard_cap": {SEATS_CAP}, "lease_seconds": 60}},
            "features": {{"api": {{"included": {INCLUDED}, "hard_cap": {HARD_CAP}, "thresholds": [50, 100]}}}}}}"#
    )
}

/// Creates (or resets the configuration of) every entitlement of the run.
pub async fn setup(spec: &Spec) -> anyhow::Result<()> {
    let token = auth(&spec.admin_token);
    let body = Bytes::from(usage_config());
    let per_conn = spec.entitlements.div_ceil(8).max(1);
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let (addr, token, body, prefix) =
            (spec.addr, token.clone(), body.clone(), spec.prefix.clone());
        let n = spec.entitlements;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await?;
            for i in (chunk * per_conn)..((chunk + 1) * per_conn).min(n) {
                let path = format!("/v1/entitlements/{}", entitlement_id(&prefix, i));
                let (status, body) = conn
                    .call("PUT", &path, token.as_deref(), body.clone())
                    .await?;
                anyhow::ensure!(
                    status < 300,
                    "setup PUT {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                );
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Deletes the entitlements [`setup`] created (`--cleanup`).
pub async fn cleanup(spec: &Spec) -> anyhow::Result<usize> {
    let token = auth(&spec.admin_token);
    let mut conn = Conn::open(spec.addr).await?;
    let mut deleted = 0;
    for i in 0..spec.entitlements {
        let path = format!("/v1/entitlements/{}", entitlement_id(&spec.prefix, i));
        let (status, body) = conn
            .call("DELETE", &path, token.as_deref(), Bytes::new())
            .await?;
        anyhow::ensure!(
            status == 204 || status == 404,
            "cleanup DELETE {path}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        deleted += usize::from(status == 204);
    }
    Ok(deleted)
}

/// Runs the load; returns its report and what the client saw acknowledged.
pub async fn run(spec: Spec) -> anyhow::Result<(Report, Tally)> {
    let n = spec.entitlements.max(1);
    let shared = Arc::new(Shared {
        counts: Counts {
            acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            unknown: (0..n).map(|_| AtomicU64::new(0)).collect(),
            cap_violations: AtomicU64::new(0),
        },
        requests: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        slowest_us: AtomicU64::new(0),
        over_5ms: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        usage_paths: (0..n)
            .map(|i| format!("/v1/entitlements/{}/usage", entitlement_id(&spec.prefix, i)))
            .collect(),
        batch_events: if spec.scenario == Scenario::Batch {
            (0..n)
                .map(|i| {
                    format!(
                        r#"{{"entitlement":"{}","feature":"api","amount":1}}"#,
                        entitlement_id(&spec.prefix, i)
                    )
                })
                .collect()
        } else {
            Vec::new()
        },
        spec,
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..shared.spec.connections {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move { user(shared, c).await }));
    }
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = (0, 0);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !shared.stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = (
                    shared.requests.load(Ordering::Relaxed),
                    shared.errors.load(Ordering::Relaxed),
                );
                let slowest = shared.slowest_us.swap(0, Ordering::Relaxed);
                let over = shared.over_5ms.swap(0, Ordering::Relaxed);
                if shared.spec.progress {
                    eprintln!(
                        "[{:>4.0}s] {:>8} req/s  {:>6} errors/s  slowest {:>6.1} ms  {:>5} over 5 ms  ({} requests so far)",
                        started.elapsed().as_secs_f64(),
                        now.0 - last.0,
                        now.1 - last.1,
                        slowest as f64 / 1000.0,
                        over,
                        now.0
                    );
                }
                last = now;
            }
        })
    };
    tokio::time::sleep(shared.spec.duration).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut total = UserStats::new();
    for t in tasks {
        total.merge(t.await?);
    }
    progress.abort();
    let elapsed = started.elapsed().as_secs_f64();
    let spec = &shared.spec;
    let report = Report {
        scenario: format!("{:?}", spec.scenario).to_lowercase(),
        connections: spec.connections,
        entitlements: spec.entitlements,
        target_rate: spec.rate,
        elapsed_s: elapsed,
        requests: total.requests,
        decisions: total.decisions,
        requests_per_s: total.requests as f64 / elapsed,
        decisions_per_s: total.decisions as f64 / elapsed,
        granted_or_overdraft: total.granted,
        denied: total.denied,
        http_errors: total.http_errors,
        transport_errors: total.transport_errors,
        latency: Latency::from(&total.latency),
        ledger: None,
    };
    Ok((report, tally(&shared.counts)))
}

/// What the client saw acknowledged, per entitlement, for [`check_ledger`].
pub struct Tally {
    acked: Vec<u64>,
    unknown: Vec<u64>,
    /// Granted answers that reported a value above the hard cap.
    cap_violations: u64,
}

impl Tally {
    /// Calls whose outcome the client never learned (with `keyed`, those
    /// still unknown after every retry).
    pub fn unknown_total(&self) -> u64 {
        self.unknown.iter().sum()
    }

    /// Usage units acknowledged, over all entitlements.
    pub fn acked_total(&self) -> u64 {
        self.acked.iter().sum()
    }
}

fn tally(c: &Counts) -> Tally {
    Tally {
        acked: c.acked.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
        unknown: c
            .unknown
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect(),
        cap_violations: c.cap_violations.load(Ordering::Relaxed),
    }
}

struct UserStats {
    requests: u64,
    decisions: u64,
    granted: u64,
    denied: u64,
    http_errors: u64,
    transport_errors: u64,
    latency: Histogram<u64>,
}

impl UserStats {
    fn new() -> Self {
        UserStats {
            requests: 0,
            decisions: 0,
            granted: 0,
            denied: 0,
            http_errors: 0,
            transport_errors: 0,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    fn merge(&mut self, o: UserStats) {
        self.requests += o.requests;
        self.decisions += o.decisions;
        self.granted += o.granted;
        self.denied += o.denied;
        self.http_errors += o.http_errors;
        self.transport_errors += o.transport_errors;
        let _ = self.latency.add(&o.latency);
    }
}

/// Finds `"key":<digits>` in a JSON body without parsing all of it.
fn number_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let pos = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = body[pos..].iter().take_while(|b| b.is_ascii_digit());
    let mut v: u64 = 0;
    let mut any = false;
    for d in digits {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

fn contains(body: &[u8], needle: &[u8]) -> bool {
    body.windows(needle.len()).any(|w| w == needle)
}

async fn user(shared: Arc<Shared>, index: usize) -> UserStats {
    let spec = &shared.spec;
    let mut stats = UserStats::new();
    let mut rng = SmallRng::seed_from_u64(spec.seed.wrapping_add(index as u64 * 7919));
    let n = spec.entitlements.max(1);
    let zipf = Zipf::new(n as f64, spec.zipf.max(0.0)).ok();
    let pick = move |rng: &mut SmallRng| -> usize {
        match &zipf {
            Some(z) => (z.sample(rng) as usize).saturating_sub(1).min(n - 1),
            None => 0,
        }
    };
    let token = auth(&spec.client_token);
    let usage_paths = &shared.usage_paths;
    let usage_body = Bytes::from_static(br#"{"feature":"api","amount":1}"#);
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.connections as f64 / r.max(1.0)));
    let start = Instant::now();
    let addrs = if spec.spread.is_empty() {
        vec![spec.addr]
    } else {
        spec.spread.clone()
    };
    let mut conns: Vec<Option<Conn>> = addrs.iter().map(|_| None).collect();
    let mut turn = index;
    let mut k: u32 = 0;
    // A keyed call whose outcome is unknown: sent again before the next.
    let mut again: Option<(usize, Bytes, usize)> = None;
    let mut sent: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) || again.is_some() {
        // Open-loop pacing: a slow answer is not hidden by sending the next
        // request late.
        // When the client is behind schedule (a slow answer), latency counts
        // from when the request was due; when it slept, from when it woke,
        // so the timer's millisecond granularity is not charged to the server.
        let due = match interval {
            Some(iv) => {
                let due = start + iv * k;
                k += 1;
                match due.checked_duration_since(Instant::now()) {
                    Some(wait) => {
                        tokio::time::sleep(wait).await;
                        Instant::now()
                    }
                    None => due,
                }
            }
            None => Instant::now(),
        };
        let e = match &again {
            Some((e, ..)) => *e,
            None => pick(&mut rng),
        };
        turn = match &spec.by_owner {
            Some(owners) => owners.get(e).copied().unwrap_or(0) % addrs.len(),
            None => (turn + 1) % addrs.len(),
        };
        let conn = &mut conns[turn];
        if conn.is_none() {
            match Conn::open(addrs[turn]).await {
                Ok(c) => *conn = Some(c),
                Err(_) => {
                    stats.transport_errors += 1;
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    if addrs.len() == 1 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let (method, path, body, events): (&str, String, Bytes, Vec<usize>) = match spec.scenario {
            Scenario::Usage if spec.keyed => {
                let body = match &again {
                    Some((_, body, _)) => body.clone(),
                    None => {
                        sent += 1;
                        Bytes::from(format!(
                            r#"{{"feature":"api","amount":1,"idempotency_key":"{}-{index}-{sent}"}}"#,
                            spec.seed
                        ))
                    }
                };
                ("POST", usage_paths[e].clone(), body, vec![e])
            }
            Scenario::Usage => ("POST", usage_paths[e].clone(), usage_body.clone(), vec![e]),
            Scenario::Batch => {
                let events: Vec<usize> = (0..spec.batch_size).map(|_| pick(&mut rng)).collect();
                let mut body = String::with_capacity(spec.batch_size * 64 + 16);
                body.push_str(r#"{"events":["#);
                for (i, ev) in events.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(&shared.batch_events[*ev]);
                }
                body.push_str("]}");
                (
                    "POST",
                    "/v1/usage/batch".to_string(),
                    Bytes::from(body),
                    events,
                )
            }
            Scenario::Seats => {
                let seat = rand::Rng::random_range(&mut rng, 0..SEAT_POOL);
                let method = if rand::Rng::random_bool(&mut rng, 0.7) {
                    "POST"
                } else {
                    "DELETE"
                };
                let path = format!(
                    "/v1/entitlements/{}/seats/s{seat}",
                    entitlement_id(&spec.prefix, e)
                );
                (method, path, Bytes::new(), vec![])
            }
        };
        let call = c.call(method, &path, token.as_deref(), body.clone());
        let result = match spec.timeout {
            Some(t) => tokio::time::timeout(t, call)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {t:?}"))),
            None => call.await,
        };
        if spec.keyed && spec.scenario == Scenario::Usage {
            let unknown = match &result {
                Ok((status, _)) => *status >= 500,
                Err(_) => true,
            };
            if result.is_err() {
                *conn = None;
            }
            let tries = again.as_ref().map_or(0, |(.., t)| *t);
            if unknown && tries < KEYED_RETRIES {
                if result.is_err() {
                    stats.transport_errors += 1;
                } else {
                    stats.http_errors += 1;
                }
                shared.errors.fetch_add(1, Ordering::Relaxed);
                again = Some((e, body, tries + 1));
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            again = None;
        }
        let us = due.elapsed().as_micros() as u64;
        let _ = stats.latency.record(us.max(1));
        shared.slowest_us.fetch_max(us, Ordering::Relaxed);
        if us > 5_000 {
            shared.over_5ms.fetch_add(1, Ordering::Relaxed);
        }
        stats.requests += 1;
        shared.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok((status, body)) => {
                stats.decisions += events.len().max(1) as u64;
                match (spec.scenario, status) {
                    (Scenario::Batch, 200) => {
                        // Caps are far above what a run reaches: every event
                        // of an answered batch must be granted.
                        if contains(&body, br#""error""#) || contains(&body, br#""denied""#) {
                            stats.http_errors += 1;
                            for ev in &events {
                                shared.counts.unknown[*ev].fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            stats.granted += events.len() as u64;
                            for ev in &events {
                                shared.counts.acked[*ev].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    (Scenario::Usage, 200) => {
                        stats.granted += 1;
                        shared.counts.acked[e].fetch_add(1, Ordering::Relaxed);
                        if number_after(&body, br#""used":"#).is_some_and(|u| u > HARD_CAP) {
                            shared.counts.cap_violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    (Scenario::Seats, 200) => {
                        stats.granted += 1;
                        if number_after(&body, br#""in_use":"#).is_some_and(|u| u > SEATS_CAP) {
                            shared.counts.cap_violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    (_, 429) => stats.denied += 1,
                    _ => {
                        stats.http_errors += 1;
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        for ev in &events {
                            shared.counts.unknown[*ev].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(_) => {
                stats.transport_errors += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                for ev in &events {
                    shared.counts.unknown[*ev].fetch_add(1, Ordering::Relaxed);
                }
                conns[turn] = None;
            }
        }
    }
    stats
}

/// Every entitlement of the run, as `GET /v1/entitlements/{id}` answers.
async fn read_views(spec: &Spec) -> anyhow::Result<Vec<serde_json::Value>> {
    let token = auth(&spec.admin_token);
    let mut conn = Conn::open(spec.addr).await?;
    let mut views = Vec::with_capacity(spec.entitlements);
    for i in 0..spec.entitlements.max(1) {
        let id = entitlement_id(&spec.prefix, i);
        let path = format!("/v1/entitlements/{id}");
        let (status, body) = conn
            .call("GET", &path, token.as_deref(), Bytes::new())
            .await?;
        anyhow::ensure!(status == 200, "GET {id}: {status}");
        views.push(serde_json::from_slice(&body)?);
    }
    Ok(views)
}

/// Reads each entitlement's usage counter, so that the ledger compares what
/// a run added, whatever earlier runs left.
pub async fn read_used(spec: &Spec) -> anyhow::Result<Vec<u64>> {
    Ok(read_views(spec)
        .await?
        .iter()
        .map(|v| v["features"]["api"]["used"].as_u64().unwrap_or(0))
        .collect())
}

/// Reads every entitlement back and compares it with what the client saw:
/// `used` must equal the acknowledged units (give or take the calls whose
/// outcome is unknown), and no counter may be above its hard cap.
pub async fn check_ledger(
    spec: &Spec,
    before: &[u64],
    tally: &Tally,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (acked, unknown) = (&tally.acked, &tally.unknown);
    let views = read_views(spec).await?;
    let ledger = report.ledger.get_or_insert_with(Ledger::default);
    if tally.cap_violations > 0 {
        ledger.cap_violations.push(format!(
            "{} granted answers reported a value above the hard cap",
            tally.cap_violations
        ));
    }
    for (i, view) in views.iter().enumerate() {
        let id = entitlement_id(&spec.prefix, i);
        ledger.entitlements_checked += 1;
        let used = view["features"]["api"]["used"].as_u64().unwrap_or(0);
        let in_use = view["seats"]["in_use"].as_u64().unwrap_or(0);
        if used > HARD_CAP {
            ledger
                .cap_violations
                .push(format!("{id}: used {used} > hard cap {HARD_CAP}"));
        }
        if in_use > SEATS_CAP {
            ledger
                .cap_violations
                .push(format!("{id}: {in_use} seats > hard cap {SEATS_CAP}"));
        }
        if spec.scenario != Scenario::Seats {
            let (a, u) = (acked[i], unknown[i]);
            let added = used.saturating_sub(before.get(i).copied().unwrap_or(0));
            if added < a || added > a + u {
                ledger.mismatches.push(format!(
                    "{id}: this run added {added}, acknowledged {a}, unknown {u}"
                ));
            }
        }
    }
    ledger.ok = ledger.mismatches.is_empty() && ledger.cap_violations.is_empty();
    Ok(())
}

/// One line per figure, for people.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "{} over {} entitlements, {} connections, {:.1} s{}\n",
        r.scenario,
        r.entitlements,
        r.connections,
        r.elapsed_s,
        r.target_rate
            .map(|t| format!(" at {t:.0} req/s"))
            .unwrap_or_default()
    );
    s += &format!(
        "  requests {}  ({:.0}/s)   decisions {} ({:.0}/s)\n",
        r.requests, r.requests_per_s, r.decisions, r.decisions_per_s
    );
    s += &format!(
        "  granted/overdraft {}  denied {}  http errors {}  transport errors {}\n",
        r.granted_or_overdraft, r.denied, r.http_errors, r.transport_errors
    );
    let l = &r.latency;
    s += &format!(
        "  latency p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs\n",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
    );
    if let Some(ledger) = &r.ledger {
        if ledger.ok {
            s += &format!(
                "  ledger: OK ({} entitlements checked)\n",
                ledger.entitlements_checked
            );
        } else {
            s += "  ledger: FAILED\n";
            for m in ledger
                .mismatches
                .iter()
                .chain(&ledger.cap_violations)
                .take(20)
            {
                s += &format!("    {m}\n");
            }
        }
    }
    s
}

/// Builds `cargo build --release <args>` (unless `skip`) and answers the
/// folder of the running binary, where the release binaries are.
pub fn release_dir(skip: bool, args: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if !skip {
        eprintln!("cargo build --release {}", args.join(" "));
        let status =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release"])
                .args(args)
                .status()?;
        anyhow::ensure!(status.success(), "cargo build failed");
    }
    Ok(dir)
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start past ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports in clock ticks; 100 per second on every supported platform here.
    ticks / 100.0
}

/// Commands Redis executed since the last `CONFIG RESETSTAT`, scripts'
/// inner commands included, bookkeeping (INFO, CONFIG, CLIENT) excluded.
pub fn redis_commands(redis: &headroom_test_support::RedisServer) -> anyhow::Result<u64> {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())?;
    Ok(stats
        .lines()
        .filter(|l| {
            l.starts_with("cmdstat_")
                && !l.starts_with("cmdstat_info")
                && !l.starts_with("cmdstat_config")
                && !l.starts_with("cmdstat_client")
        })
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}
