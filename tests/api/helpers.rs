//! Test fixtures: a private redis-server per test, the app on port 0, and
//! the tracker binary as a child process for crash tests.

use std::sync::Arc;
use std::time::Duration;

use headroom::engine::{Clock, EngineSettings, ManualClock, SystemClock};
use headroom::http::{AuthSettings, Limits};
use headroom::settings::Settings;
use headroom::startup::{Application, Wiring};
use headroom::store::{MemoryStore, RedisStore, Store, StoreSettings};
use serde_json::Value;

pub const ADMIN: &str = "test-admin-token";
pub const CLIENT: &str = "test-client-token";

pub use headroom_test_support::{RedisCluster, RedisServer, free_port};

/// The Redis key names the tests' stores write under `prefix` (the default
/// bucket count).
pub fn keys(prefix: &str) -> headroom::store::Keys {
    headroom::store::Keys::new(prefix, headroom::store::DEFAULT_BUCKETS)
}

/// A Redis the scenarios run on: a standalone server of the test's own, or
/// the cluster the tests share (each scenario under a prefix of its own).
pub trait TestRedis: Sync {
    /// The Redis prefix a scenario's `name` runs under.
    fn prefix(&self, name: &str) -> String;
    /// A store under the scenario's prefix.
    fn store(&self, name: &str) -> Arc<dyn Store>;
    /// Every event of the scenario's buckets' streams, in order of addition.
    fn stream(&self, name: &str) -> Vec<(String, String, Value)>;
    /// A connection to read keys with (following the slots on a cluster).
    fn connection(&self) -> Box<dyn redis::ConnectionLike>;
    /// The key names of the scenario's prefix.
    fn keys(&self, name: &str) -> headroom::store::Keys {
        keys(&self.prefix(name))
    }
}

impl TestRedis for RedisServer {
    fn prefix(&self, name: &str) -> String {
        name.to_string()
    }
    fn store(&self, name: &str) -> Arc<dyn Store> {
        redis_store(self, name)
    }
    fn stream(&self, name: &str) -> Vec<(String, String, Value)> {
        self.events(name)
    }
    fn connection(&self) -> Box<dyn redis::ConnectionLike> {
        Box::new(self.conn())
    }
}

/// The shared cluster, the scenarios' prefixes under `namespace` (so that
/// scenarios of several modules never meet).
pub struct OnCluster {
    pub cluster: Arc<RedisCluster>,
    pub namespace: &'static str,
}

impl TestRedis for OnCluster {
    fn prefix(&self, name: &str) -> String {
        format!("{}-{name}", self.namespace)
    }
    fn store(&self, name: &str) -> Arc<dyn Store> {
        cluster_store(&self.cluster, &self.prefix(name))
    }
    fn stream(&self, name: &str) -> Vec<(String, String, Value)> {
        self.cluster.events(&self.prefix(name))
    }
    fn connection(&self) -> Box<dyn redis::ConnectionLike> {
        Box::new(self.cluster.conn())
    }
}

/// Store settings for `prefix` on `cluster`.
pub fn cluster_settings(cluster: &RedisCluster, prefix: &str) -> StoreSettings {
    StoreSettings {
        redis_cluster: Some(headroom::flags::Seeds(cluster.urls())),
        redis_prefix: prefix.to_string(),
        redis_timeout: Duration::from_secs(2),
        ..StoreSettings::default()
    }
}

pub fn cluster_store(cluster: &RedisCluster, prefix: &str) -> Arc<dyn Store> {
    let s = cluster_settings(cluster, prefix);
    let (link, urls) = RedisStore::link(&s).expect("link").expect("a cluster");
    let window = EngineSettings::default().idempotency_window;
    Arc::new(RedisStore::on(link, &urls, &s, window))
}

pub fn redis_store(redis: &RedisServer, prefix: &str) -> Arc<dyn Store> {
    let s = StoreSettings {
        redis_prefix: prefix.to_string(),
        // Generous: tests run in parallel on two cores, and Redis fsyncs every write.
        redis_timeout: Duration::from_secs(2),
        ..StoreSettings::default()
    };
    let window = EngineSettings::default().idempotency_window;
    Arc::new(RedisStore::start(&redis.url(), &s, window).expect("redis store"))
}

/// Who may call a test app: these admin and client tokens.
pub fn tokens(admin: &[&str], client: &[&str]) -> AuthSettings {
    AuthSettings {
        admin_tokens: Some(admin.join(",")),
        client_tokens: Some(client.join(",")),
        ..Settings::default().http.auth
    }
}

/// A reqwest client (after installing the process's TLS provider, which
/// reqwest needs even for plain http).
/// One call with `token` and a JSON `body`: its status and JSON answer
/// (the text when it is not JSON).
async fn call(
    http: &reqwest::Client,
    url: String,
    method: reqwest::Method,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = http.request(method, url);
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

/// Idle connections are dropped after 2 s, before the tracker's 5 s
/// keep-alive closes them: a call is never sent on a connection the server
/// is closing at that moment (seen once as `IncompleteMessage`).
pub fn http_client() -> reqwest::Client {
    headroom::tls::install_crypto_provider();
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .expect("a reqwest client")
}

pub fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(100_000, Duration::from_secs(24 * 3600)))
}

/// The app, served in this process on a free port.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    server: actix_web::dev::ServerHandle,
    running: actix_rt::task::JoinHandle<Result<(), headroom::startup::StartupError>>,
}

pub struct AppOptions {
    pub clock: Arc<dyn Clock>,
    pub engine: EngineSettings,
    pub auth: AuthSettings,
    pub limits: Limits,
    pub webhooks: Option<headroom::webhooks::Webhooks>,
    pub pages: headroom::http::pages::PageSettings,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            clock: Arc::new(SystemClock),
            engine: EngineSettings::default(),
            auth: tokens(&[ADMIN], &[CLIENT]),
            limits: Limits::default(),
            webhooks: None,
            pages: headroom::http::pages::PageSettings::default(),
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
        let mut settings = Settings::default();
        settings.http.listen = "127.0.0.1:0".parse().expect("address");
        settings.http.workers = Some(2);
        settings.http.shutdown_timeout = Duration::from_secs(5);
        settings.http.limits = opts.limits;
        settings.http.auth = opts.auth;
        settings.http.pages = opts.pages;
        settings.engine = opts.engine;
        let wiring = Wiring {
            store,
            clock: opts.clock,
            webhooks: opts.webhooks,
            redis: None,
            dispatch: false,
            signals: false,
        };
        let app = Application::build_with(settings, wiring).expect("application");
        let port = app.port();
        let handle = app.handle();
        let running = actix_rt::spawn(app.run_until_stopped());
        TestApp {
            base: format!("http://127.0.0.1:{port}"),
            http: {
                headroom::tls::install_crypto_provider();
                reqwest::Client::builder()
            }
            .pool_max_idle_per_host(256)
            // Below the server's 5 s keep-alive, as in `http_client` (a
            // browser test's pause outlasted it: `IncompleteMessage`).
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .expect("client"),
            server: handle,
            running,
        }
    }

    /// Stops the server gracefully and waits until the engine wrote what it held.
    pub async fn stop(self) {
        self.server.stop(true).await;
        let _ = self.running.await;
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
        call(&self.http, self.url(path), method, token, body).await
    }

    /// `GET path` with `token`.
    pub async fn read(&self, path: &str, token: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, Some(token), None)
            .await
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
    inner: headroom_test_support::Tracker,
    /// One client for every call: a client per call pays for its set-up
    /// (TLS roots) and a new connection each time.
    client: reqwest::Client,
}

impl TrackerProcess {
    pub async fn start(redis_url: &str, prefix: &str) -> Self {
        Self::start_with(redis_url, prefix, &[]).await
    }

    /// On its embedded in-memory store, with the test tokens.
    pub async fn start_in_memory() -> Self {
        Self::spawn(&[
            ("HEADROOM_ADMIN_TOKENS", ADMIN),
            ("HEADROOM_CLIENT_TOKENS", CLIENT),
        ])
    }

    /// With more environment settings.
    pub async fn start_with(redis_url: &str, prefix: &str, extra: &[(&str, &str)]) -> Self {
        let mut env = vec![
            ("HEADROOM_REDIS_URL", redis_url),
            ("HEADROOM_REDIS_PREFIX", prefix),
            ("HEADROOM_ADMIN_TOKENS", ADMIN),
            ("HEADROOM_CLIENT_TOKENS", CLIENT),
            ("HEADROOM_REDIS_TIMEOUT", "2s"),
            ("HEADROOM_WATCH_ENTITLEMENTS", "acme"),
        ];
        env.extend_from_slice(extra);
        Self::spawn(&env)
    }

    /// On the Redis `env` names (`HEADROOM_REDIS_CLUSTER`, say), with the
    /// test tokens.
    pub fn spawn_env(env: &[(&str, &str)]) -> Self {
        let mut t = Self::unstarted_env(env);
        t.restart();
        t
    }

    /// One call: its status and JSON body (the text when it is not JSON).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        call(&self.client, url, method, token, body).await
    }

    /// `PUT /v1/entitlements/{id}` as admin with `config`, which must
    /// create it.
    pub async fn create(&self, id: &str, config: &str) {
        let path = format!("/v1/entitlements/{id}");
        let (status, body) = self
            .send(reqwest::Method::PUT, &path, Some(ADMIN), Some(config))
            .await;
        assert_eq!(status, 201, "{path}: {body}");
    }

    /// One keyed call using 1 unit of feature `api` of `id`: its status.
    pub async fn use_api(&self, id: &str, key: &str) -> u16 {
        let body = format!(r#"{{"feature": "api", "amount": 1, "idempotency_key": "{key}"}}"#);
        let path = format!("/v1/entitlements/{id}/usage");
        self.send(reqwest::Method::POST, &path, Some(CLIENT), Some(&body))
            .await
            .0
    }

    /// `GET /v1/entitlements/{id}` as admin: its status and `api`'s `used`.
    pub async fn api_used(&self, id: &str) -> (u16, Option<u64>) {
        let path = format!("/v1/entitlements/{id}");
        let (status, view) = self
            .send(reqwest::Method::GET, &path, Some(ADMIN), None)
            .await;
        (status, view["features"]["api"]["used"].as_u64())
    }

    /// As [`TrackerProcess::spawn_env`], not started yet (its port chosen):
    /// [`TrackerProcess::restart`] starts it.
    pub fn unstarted_env(env: &[(&str, &str)]) -> Self {
        let mut all = vec![
            ("HEADROOM_ADMIN_TOKENS", ADMIN),
            ("HEADROOM_CLIENT_TOKENS", CLIENT),
            ("HEADROOM_REDIS_TIMEOUT", "2s"),
        ];
        all.extend_from_slice(env);
        let inner = headroom_test_support::Tracker::unstarted(
            env!("CARGO_BIN_EXE_headroom").as_ref(),
            &all,
        );
        TrackerProcess {
            base: format!("http://{}", inner.addr()),
            inner,
            client: http_client(),
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.inner.addr()
    }

    /// Sends `sig` (`-STOP`, `-CONT`) without waiting.
    pub fn signal(&self, sig: &str) {
        self.inner.signal(sig);
    }

    fn spawn(env: &[(&str, &str)]) -> Self {
        let inner =
            headroom_test_support::Tracker::start(env!("CARGO_BIN_EXE_headroom").as_ref(), env)
                .expect("start headroom");
        TrackerProcess {
            base: format!("http://{}", inner.addr()),
            inner,
            client: http_client(),
        }
    }

    /// SIGTERM, then waits for the process to exit; returns whether it
    /// exited cleanly.
    pub fn terminate(&mut self) -> bool {
        self.inner.terminate()
    }

    /// Sends `sig` (`-INT` is Ctrl-C), then waits for the process to exit;
    /// returns whether it exited cleanly.
    pub fn stop_with(&mut self, sig: &str) -> bool {
        self.inner.stop_with(sig)
    }

    /// SIGKILL: no shutdown hook runs.
    pub fn kill(&mut self) {
        self.inner.kill();
    }

    /// Starts it again with the same settings (on the same port).
    pub fn restart(&mut self) {
        self.inner.restart().expect("restart headroom");
        self.base = format!("http://{}", self.inner.addr());
    }
}

pub fn count_kind(events: &[(String, String, Value)], entitlement: &str, kind: &str) -> usize {
    events
        .iter()
        .filter(|(k, e, _)| k == kind && e == entitlement)
        .count()
}

/// The Python of the virtual environment `.ci/run` makes (`.ci/venv`), or
/// `HEADROOM_TEST_PYTHON`, checked to have `module`.
pub fn venv_python(module: &str) -> String {
    let python = std::env::var("HEADROOM_TEST_PYTHON")
        .unwrap_or_else(|_| format!("{}/.ci/venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let has = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "{python} with the `{module}` package is needed: run .ci/run once (it makes .ci/venv \
         from .ci/requirements.txt), or set HEADROOM_TEST_PYTHON to a Python that has it"
    );
    python
}
