//! The composition root: [`Application::build`] wires settings into a
//! store, an engine, the HTTP server and the webhook dispatcher; `main`
//! and the tests both build the application here.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::{Server, ServerHandle};
use actix_web::web;

use crate::engine::{Clock, Engine, SystemClock};
use crate::http::{self, AppState, Generated};
use crate::nodes::{Membership, SelfNode};
use crate::settings::Settings;
use crate::store::{MemoryStore, RedisLink, RedisStore, Store, StoreError, chain};
use crate::webhooks::{DispatchError, Dispatcher, Webhooks};

/// Why the tracker could not start (or its server failed); each message is
/// one line that names the setting concerned and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "--listen (HEADROOM_LISTEN) = \"{addr}\": cannot listen there ({source}); stop what listens on it or choose another address"
    )]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--redis-url (HEADROOM_REDIS_URL): the store cannot start ({})", chain(.0))]
    Store(#[from] StoreError),
    #[error("the webhook dispatcher cannot start ({})", chain(.0))]
    Dispatcher(#[from] DispatchError),
    #[error("the client that sends calls on to other nodes cannot start ({0})")]
    Forwarder(#[source] reqwest::Error),
    #[error("the HTTP server failed ({0})")]
    Serve(#[source] std::io::Error),
}

/// What the application is built from besides its settings. `main` builds
/// it from the settings ([`Wiring::from_settings`]); tests inject a store
/// and a clock of their own.
pub struct Wiring {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// Webhook registrations (with Redis only).
    pub webhooks: Option<Webhooks>,
    /// The Redis connection, for the node registry (with Redis only).
    pub redis: Option<RedisLink>,
    /// Start the dispatcher that delivers to the registered webhooks.
    pub dispatch: bool,
    /// Stop gracefully on SIGINT/SIGTERM.
    pub signals: bool,
}

impl Wiring {
    /// The store the settings name (Redis, or the in-memory default), the
    /// system clock, webhooks and the dispatcher with Redis, and signals.
    pub async fn from_settings(settings: &Settings) -> Result<Self, StartupError> {
        let window = settings.engine.idempotency_window;
        let (store, webhooks, redis): (Arc<dyn Store>, _, _) = match RedisStore::link(
            &settings.store,
        )? {
            Some((link, urls)) => {
                let cluster = link.is_cluster();
                let store = RedisStore::on(link.clone(), &urls, &settings.store, window);
                match store.verify_layout().await {
                    Err(e @ (StoreError::Layout(_) | StoreError::Corrupt { .. })) => {
                        return Err(e.into());
                    }
                    // Checked again on every connection, once Redis is up.
                    Err(e) => {
                        tracing::warn!(error = %chain(&e), "could not check the Redis key layout at start")
                    }
                    Ok(()) => {}
                }
                tracing::info!(
                    prefix = %settings.store.redis_prefix,
                    buckets = settings.store.redis_buckets,
                    cluster,
                    wait_replicas = settings.store.redis_wait_replicas,
                    "persisting to Redis"
                );
                let hooks = Webhooks::on(
                    link.clone(),
                    store.keys().clone(),
                    settings.store.redis_timeout,
                );
                (Arc::new(store), Some(hooks), Some(link))
            }
            None => {
                tracing::warn!(
                    "no --redis-url or --redis-cluster: running on the embedded in-memory store; NOTHING SURVIVES A RESTART"
                );
                let store = MemoryStore::new(settings.store.stream_maxlen as usize, window);
                (Arc::new(store), None, None)
            }
        };
        Ok(Wiring {
            store,
            clock: Arc::new(SystemClock),
            webhooks,
            redis,
            dispatch: true,
            signals: true,
        })
    }
}

/// The tracker, bound and ready to run.
pub struct Application {
    server: Server,
    port: u16,
    engine: Engine,
    dispatcher: Option<Dispatcher>,
    nodes: Option<Membership>,
}

impl Application {
    /// Builds everything from the settings: binds the listener first (so
    /// that a port in use is the first and only thing reported), then the
    /// store, then the rest.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let listener = bind(settings.http.listen)?;
        let wiring = Wiring::from_settings(&settings).await?;
        let node = self_node(&settings, &listener)?;
        let nodes = match (&settings.nodes.cluster_secret, &wiring.redis) {
            (Some(_), Some(link)) => Some(
                Membership::join(
                    link.clone(),
                    &crate::store::Keys::new(
                        settings.store.redis_prefix.clone(),
                        settings.store.redis_buckets,
                    ),
                    node.id.clone(),
                    node.address.clone(),
                    settings.nodes.cluster_lease,
                    settings.store.redis_timeout,
                )
                .await,
            ),
            _ => None,
        };
        Self::build_on(listener, settings, wiring, (node, nodes))
    }

    /// Builds the application on the given wiring (tests: a store and a
    /// clock of their own).
    pub fn build_with(settings: Settings, wiring: Wiring) -> Result<Self, StartupError> {
        let listener = bind(settings.http.listen)?;
        let node = self_node(&settings, &listener)?;
        Self::build_on(listener, settings, wiring, (node, None))
    }

    /// Starts the application on a bound listener; generated tokens are
    /// printed only now, once nothing can fail any more.
    fn build_on(
        listener: TcpListener,
        settings: Settings,
        wiring: Wiring,
        (node, nodes): (SelfNode, Option<Membership>),
    ) -> Result<Self, StartupError> {
        let addr = settings.http.listen;
        let port = listener
            .local_addr()
            .map_err(|source| StartupError::Listen { addr, source })?
            .port();
        let mut engine_settings = settings.engine.clone();
        engine_settings.among_nodes = nodes.is_some();
        let engine = Engine::new(wiring.store, wiring.clock, engine_settings);
        if let Some(m) = &nodes {
            engine.on_fenced(m.renew_soon_handle());
            actix_rt::spawn(hand_over_on_changes(engine.clone(), m.clone()));
        }
        let dispatcher = match (&wiring.webhooks, wiring.dispatch) {
            (Some(hooks), true) => {
                let mut webhooks = settings.webhooks.clone();
                webhooks
                    .consumer
                    .get_or_insert_with(|| format!("headroom@{addr}"));
                Some(Dispatcher::start(hooks.clone(), webhooks)?)
            }
            _ => None,
        };
        let (auth, generated) = settings.http.auth.auth();
        let state = web::Data::new(AppState {
            engine: engine.clone(),
            auth,
            limits: settings.http.limits.clone(),
            metrics: crate::telemetry::metrics(),
            webhooks: wiring.webhooks,
            forwarder: match (&nodes, &settings.nodes.cluster_secret) {
                (Some(m), Some(secret)) => Some(
                    crate::nodes::forward::Forwarder::new(
                        m.clone(),
                        secret.clone(),
                        settings.nodes.forward_timeout,
                    )
                    .map_err(StartupError::Forwarder)?,
                ),
                _ => None,
            },
            nodes: nodes.clone(),
            node,
            pages: crate::http::pages::Pages::new(
                settings.http.pages.clone(),
                settings.nodes.cluster_secret.as_ref().map(|s| &*s.0),
            ),
        });
        let workers = settings
            .http
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let server = http::serve(listener, state, workers, settings.http.shutdown_timeout)
            .map_err(StartupError::Serve)?;
        show_next_step(&generated, &local_url(addr, port));
        tracing::info!(listen = %addr, port, workers, "headroom is listening");
        if wiring.signals {
            let leaving = nodes
                .clone()
                .map(|m| (m, settings.nodes.cluster_lease / 3 + LEAVE_MARGIN));
            actix_rt::spawn(stop_on_signals(server.handle(), leaving));
        }
        Ok(Application {
            server,
            port,
            engine,
            dispatcher,
            nodes,
        })
    }

    /// The port it listens on (the one the OS chose for port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Stops the server (from a test) as SIGTERM would.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until the server stops (a signal, or [`Application::handle`]),
    /// then stops the dispatcher and writes what the engine holds.
    pub async fn run_until_stopped(self) -> Result<(), StartupError> {
        let served = self.server.await.map_err(StartupError::Serve);
        if let Err(e) = &served {
            tracing::error!(error = %chain(e), "the HTTP server failed");
        }
        tracing::info!("HTTP stopped; writing what is left");
        if let Some(d) = self.dispatcher {
            d.stop().await;
        }
        if let Some(n) = &self.nodes
            && !n.has_left()
            && let Err(e) = n.leave().await
        {
            tracing::warn!(error = %chain(&e), "could not remove this node's registration; it runs out with its lease");
        }
        self.engine.shutdown().await;
        tracing::info!("stopped");
        served
    }
}

/// How long after a third of the lease a leaving node keeps serving: by
/// then every other node has renewed, seen it gone, and stopped sending it
/// calls.
const LEAVE_MARGIN: std::time::Duration = std::time::Duration::from_millis(500);

/// Each time the members change, lets go of the resident entitlements
/// another node owns now (all of them once this node left).
async fn hand_over_on_changes(engine: Engine, nodes: Membership) {
    let mut changes = nodes.changes();
    while changes.changed().await.is_ok() {
        let view = changes.borrow_and_update().clone();
        let left = nodes.has_left();
        if view.members.is_empty() && !left {
            // Not registered yet (or Redis unreachable): nobody else owns anything.
            continue;
        }
        let me = nodes.me();
        let moved =
            engine.hand_over(|id| !left && view.owner(id.as_str()).is_some_and(|o| o.id == me));
        if moved > 0 {
            tracing::info!(
                moved,
                members = view.members.len(),
                "members changed; handed over the entitlements other nodes own now"
            );
        }
    }
}

/// This node: a fresh id, and the address other nodes reach it at
/// (`--advertise`, or the address it listens on).
fn self_node(settings: &Settings, listener: &TcpListener) -> Result<SelfNode, StartupError> {
    let addr = settings.http.listen;
    let local = listener
        .local_addr()
        .map_err(|source| StartupError::Listen { addr, source })?;
    Ok(SelfNode {
        id: crate::nodes::new_node_id(),
        address: settings
            .nodes
            .advertise
            .clone()
            .unwrap_or_else(|| local.to_string()),
        started: chrono::Utc::now(),
    })
}

fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr).map_err(|source| StartupError::Listen { addr, source })
}

/// The base URL a client on this machine reaches the tracker at.
fn local_url(addr: std::net::SocketAddr, port: u16) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
        ip if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{port}")
}

/// Shows the generated tokens once, on stdout, with a first call to try.
fn show_next_step(generated: &Generated, base: &str) {
    if let Some(t) = &generated.admin {
        println!("generated admin token (shown once): {t}");
    }
    if let Some(t) = &generated.client {
        println!("generated client token (shown once): {t}");
    }
    if let (Some(admin), Some(client)) = (&generated.admin, &generated.client) {
        println!(
            "try it: curl -s -X PUT {base}/v1/entitlements/demo -H 'Authorization: Bearer {admin}' \
             -d '{{\"seats\": {{\"purchased\": 2, \"hard_cap\": 3}}}}' && \
             curl -s -X POST {base}/v1/entitlements/demo/seats/alice -H 'Authorization: Bearer {client}'"
        );
        // The program as it was started (`target/release/headroom` under
        // `cargo run`), so that the line runs as printed.
        let program = std::env::args_os()
            .next()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "headroom".into());
        let url = if base == "http://127.0.0.1:8080" {
            String::new()
        } else {
            format!("HEADROOM_URL={base} ")
        };
        println!(
            "or the command line: {url}HEADROOM_TOKEN={admin} {program} entitlements list \
             ({program} help lists its commands)"
        );
        println!("the API in a browser: {base}/docs/");
    }
}

/// The first SIGINT (Ctrl-C) or SIGTERM stops the server gracefully: no new
/// connections, the calls in flight finish (each answered once durable),
/// then the engine writes what it holds. A second signal exits at once:
/// every call answered so far was durable, calls still in flight get no
/// answer.
async fn stop_on_signals(server: ServerHandle, leaving: Option<(Membership, std::time::Duration)>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("signal handlers could not be installed; stop the tracker with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    tracing::info!(
        signal = name,
        "stopping: finishing the calls in flight (send it again to stop at once)"
    );
    actix_rt::spawn(async move {
        if let Some((nodes, grace)) = leaving {
            // Leave first, then keep serving (sending calls on to their new
            // owners) until every other node has seen this one gone.
            if let Err(e) = nodes.leave().await {
                tracing::warn!(error = %chain(&e), "could not remove this node's registration; it runs out with its lease");
            }
            tracing::info!(grace = ?grace, "left the cluster; serving until the other nodes have seen it");
            tokio::time::sleep(grace).await;
        }
        server.stop(true).await;
    });
    let name = tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    tracing::warn!(
        signal = name,
        "second signal: exiting without waiting for the calls in flight"
    );
    std::process::exit(130);
}
