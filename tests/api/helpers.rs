//! Test fixtures: a private redis-server per test, the app on port 0, and
//! the tracker binary as a child process for crash tests.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use headroom::engine::{Clock, Engine, EngineSettings, ManualClock, SystemClock};
use headroom::http::{self, AppState, Auth, Limits};
use headroom::store::{MemoryStore, RedisSettings, RedisStore, Store};
use serde_json::Value;

pub const ADMIN: &str = "test-admin-token";
pub const CLIENT: &str = "test-client-token";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A redis-server of this test's own, on a free port, with its data in a
/// temporary folder. `appendfsync always`, so that killing it loses nothing
/// that it acknowledged.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            // DEBUG SLEEP, for the fault tests.
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on the PATH (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to the test redis")
    }

    /// SIGKILL: Redis gets no chance to do anything more.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Entries of the event stream: `(type, entitlement, CloudEvents JSON)`.
    pub fn events(&self, prefix: &str) -> Vec<(String, String, Value)> {
        let mut c = self.conn();
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(format!("{prefix}:events"))
            .arg("-")
            .arg("+")
            .query::<Vec<(String, Vec<String>)>>(&mut c)
            .expect("XRANGE")
            .into_iter()
            .map(|(id, fields)| {
                let pairs = fields
                    .chunks(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect();
                (id, pairs)
            })
            .collect();
        entries
            .into_iter()
            .map(|(_, fields)| {
                let get = |k: &str| {
                    fields
                        .iter()
                        .find(|(f, _)| f == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let event = serde_json::from_str(&get("event")).unwrap_or(Value::Null);
                (get("type"), get("entitlement"), event)
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis_store(redis: &RedisServer, prefix: &str) -> Arc<dyn Store> {
    let mut s = RedisSettings::new(redis.url());
    s.prefix = prefix.to_string();
    // Generous: tests run in parallel on two cores, and Redis fsyncs every write.
    s.timeout = Duration::from_secs(2);
    Arc::new(RedisStore::start(s).expect("redis store"))
}

pub fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(100_000, Duration::from_secs(24 * 3600)))
}

/// The app, served in this process on a free port.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub engine: Engine,
    server: actix_web::dev::ServerHandle,
}

pub struct AppOptions {
    pub clock: Arc<dyn Clock>,
    pub engine: EngineSettings,
    pub auth: Auth,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            clock: Arc::new(SystemClock),
            engine: EngineSettings::default(),
            auth: Auth::new(vec![ADMIN.into()], vec![CLIENT.into()]),
        }
    }
}

pub fn manual_clock(start: &str) -> Arc<ManualClock> {
    Arc::new(ManualClock::new(start.parse().expect("timestamp")))
}

impl TestApp {
    pub async fn spawn(store: Arc<dyn Store>) -> Self {
        Self::spawn_with(store, AppOptions::default()).await
    }

    pub async fn spawn_with(store: Arc<dyn Store>, opts: AppOptions) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            headroom::telemetry::init_logging(false);
        }
        let engine = Engine::new(store, opts.clock, opts.engine);
        let state = web::Data::new(AppState {
            engine: engine.clone(),
            auth: opts.auth,
            limits: Limits::default(),
            metrics: headroom::telemetry::metrics(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = http::serve(listener, state, 2, Duration::from_secs(5), false).expect("serve");
        let handle = server.handle();
        actix_rt::spawn(server);
        TestApp {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .expect("client"),
            engine,
            server: handle,
        }
    }

    pub async fn stop(self) {
        self.server.stop(true).await;
        self.engine.shutdown().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The text of `/metrics`.
    pub async fn scrape(&self) -> String {
        let res = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        res.text().await.unwrap_or_default()
    }

    pub async fn put(&self, id: &str, config: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::PUT,
            &format!("/v1/entitlements/{id}"),
            Some(ADMIN),
            Some(config),
        )
        .await
    }

    pub async fn get(&self, id: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::GET,
            &format!("/v1/entitlements/{id}"),
            Some(ADMIN),
            None,
        )
        .await
    }

    pub async fn activate(&self, id: &str, seat: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            &format!("/v1/entitlements/{id}/seats/{seat}"),
            Some(CLIENT),
            None,
        )
        .await
    }

    pub async fn release(&self, id: &str, seat: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::DELETE,
            &format!("/v1/entitlements/{id}/seats/{seat}"),
            Some(CLIENT),
            None,
        )
        .await
    }

    pub async fn usage(&self, id: &str, body: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            &format!("/v1/entitlements/{id}/usage"),
            Some(CLIENT),
            Some(body),
        )
        .await
    }
}

/// The tracker binary as a child process, for tests that kill it.
pub struct TrackerProcess {
    pub base: String,
    child: Child,
}

impl TrackerProcess {
    pub async fn start(redis_url: &str, prefix: &str) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_headroom"))
            .env("HEADROOM_LISTEN", format!("127.0.0.1:{port}"))
            .env("HEADROOM_REDIS_URL", redis_url)
            .env("HEADROOM_REDIS_PREFIX", prefix)
            .env("HEADROOM_ADMIN_TOKENS", ADMIN)
            .env("HEADROOM_CLIENT_TOKENS", CLIENT)
            .env("HEADROOM_REDIS_TIMEOUT", "2s")
            .env("HEADROOM_WATCH_ENTITLEMENTS", "acme")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start headroom");
        // Owned before anything can fail, so that Drop kills and reaps it.
        let tracker = TrackerProcess {
            base: format!("http://127.0.0.1:{port}"),
            child,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ready = http.get(format!("{}/readyz", tracker.base)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return tracker;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("headroom did not become ready");
    }

    /// SIGTERM, then waits for the process to exit; returns whether it
    /// exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().is_ok_and(|s| s.success())
    }

    /// SIGKILL: no shutdown hook runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TrackerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn count_kind(events: &[(String, String, Value)], entitlement: &str, kind: &str) -> usize {
    events
        .iter()
        .filter(|(k, e, _)| k == kind && e == entitlement)
        .count()
}
