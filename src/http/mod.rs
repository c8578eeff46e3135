//! The HTTP API (actix-web): routes, auth, problem+json errors, `/metrics`.

/// Adds a handler for `$method` to resource `$r`; a GET route answers
/// HEAD alike (actix sends no body for HEAD). Shared by the API's and the
/// pages' route tables.
macro_rules! route_of {
    ($r:ident, get, $handler:path) => {
        $r.route(web::get().to($handler))
            .route(web::head().to($handler))
    };
    ($r:ident, $method:ident, $handler:path) => {
        $r.route(web::$method().to($handler))
    };
}

pub mod auth;
pub mod batch;
mod events;
mod extract;
mod forwarding;
mod handlers;
mod nodes;
pub mod openapi;
pub mod pages;
pub mod problem;
pub mod reports;
mod webhooks;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Server, Service, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::web::{self, ServiceConfig};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;

pub use auth::{Auth, AuthSettings, Generated, Scope};
pub use batch::MAX_BATCH_EVENTS;

use crate::engine::Engine;
use problem::{ApiError, Kind};

/// Where and how the HTTP server listens; each default is written here once.
#[derive(clap::Args, Clone, Debug)]
pub struct HttpSettings {
    /// Address to listen on.
    #[arg(long, env = "HEADROOM_LISTEN", default_value = "127.0.0.1:8080", value_parser = crate::flags::address)]
    pub listen: std::net::SocketAddr,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "HEADROOM_WORKERS", value_parser = crate::flags::count)]
    pub workers: Option<usize>,
    /// How long a graceful shutdown waits for calls in flight.
    #[arg(long, env = "HEADROOM_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = crate::flags::duration)]
    pub shutdown_timeout: Duration,
    #[command(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    pub auth: auth::AuthSettings,
    #[command(flatten)]
    pub pages: pages::PageSettings,
}

impl Default for HttpSettings {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct Limits {
    /// Largest request body (configuration and batch requests).
    #[arg(long, env = "HEADROOM_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = crate::flags::count)]
    pub max_body_bytes: usize,
    /// Longest time a client may take to send a request's head, and then its
    /// body (slow clients cannot hold a worker; 408 after it).
    #[arg(long, env = "HEADROOM_REQUEST_TIMEOUT", default_value = "10s", value_parser = crate::flags::duration)]
    pub request_timeout: Duration,
    /// Most open connections served at once, all workers together; a connection
    /// beyond it is answered `503 too_many_connections` and closed.
    #[arg(long, env = "HEADROOM_MAX_CONNECTIONS", default_value_t = 25_000, value_parser = crate::flags::count)]
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

pub struct AppState {
    pub engine: Engine,
    pub auth: Auth,
    pub limits: Limits,
    pub metrics: PrometheusHandle,
    /// Webhook registrations (with Redis only).
    pub webhooks: Option<crate::webhooks::Webhooks>,
    /// This node's membership among several (with a cluster secret only).
    pub nodes: Option<crate::nodes::Membership>,
    /// This node: its id, advertised address and start.
    pub node: crate::nodes::SelfNode,
    /// Sends calls on to their owners (with several nodes only).
    pub forwarder: Option<crate::nodes::forward::Forwarder>,
    /// The customers' and the vendor's pages: signing keys and settings.
    pub pages: pages::Pages,
}

/// The `Allow` value of a route that takes `methods`: those, `HEAD` with
/// `GET`, and `OPTIONS`.
fn allow_of(methods: &[&str]) -> String {
    let mut all: Vec<&str> = methods.to_vec();
    if methods.contains(&"GET") {
        all.push("HEAD");
    }
    all.push("OPTIONS");
    all.join(", ")
}

/// `405` with the `Allow` header RFC 9110 §15.5.6 asks for.
async fn method_not_allowed(req: HttpRequest, allow: web::Data<Allow>) -> HttpResponse {
    use actix_web::ResponseError;
    let mut res = ApiError::new(
        Kind::MethodNotAllowed,
        format!(
            "{} is not allowed on {}; use {}",
            req.method(),
            req.path(),
            allow.0
        ),
    )
    .error_response();
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&allow.0) {
        res.headers_mut().insert(actix_web::http::header::ALLOW, v);
    }
    res
}

/// `OPTIONS`: `204` with the methods of the route.
async fn options(allow: web::Data<Allow>) -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header((actix_web::http::header::ALLOW, allow.0.clone()))
        .finish()
}

/// A route's `Allow` value, in its resource's data.
struct Allow(String);

thread_local! {
    /// Requests this worker thread has served, for the idle memory trim.
    static SERVED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Every few seconds, if this worker served nothing since the last look,
/// hands the memory it freed back to the system (see
/// [`crate::telemetry::set_memory_trim`]): passivated entitlements are freed
/// on whichever thread sweeps them, and an allocator returns such pages only
/// when their owning thread runs it, which an idle worker otherwise never does.
async fn trim_when_idle(trim: fn()) {
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let served = SERVED.with(std::cell::Cell::get);
        if served == last {
            trim();
        }
        last = served;
    }
}

thread_local! {
    /// Histogram handles by (route, method, status), so that a request does
    /// not look its labels up in the registry.
    static DURATIONS: std::cell::RefCell<
        std::collections::HashMap<(&'static str, actix_web::http::Method, u16), metrics::Histogram>,
    > = std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Records the request duration under the route's pattern. It wraps each
/// resource, so the pattern is known without matching the path again.
fn timed(
    pattern: &'static str,
    methods: &'static [&'static str],
) -> actix_web::Resource<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::resource(pattern)
        .app_data(web::Data::new(Allow(allow_of(methods))))
        .route(web::method(actix_web::http::Method::OPTIONS).to(options))
        .default_service(web::to(method_not_allowed))
        .wrap_fn(move |req, srv| {
            SERVED.with(|s| s.set(s.get() + 1));
            let started = Instant::now();
            let method = req.method().clone();
            let fut = srv.call(req);
            async move {
                let res = fut.await?;
                let status = res.status().as_u16();
                DURATIONS.with(|d| {
                    d.borrow_mut()
                        .entry((pattern, method.clone(), status))
                        .or_insert_with(|| {
                            // Bounded: a client may send any method name.
                            let method_label = crate::telemetry::METHODS
                                .iter()
                                .find(|m| **m == method.as_str())
                                .copied()
                                .unwrap_or("other");
                            metrics::histogram!(
                                "headroom_http_request_duration_seconds",
                                "route" => pattern,
                                "method" => method_label,
                                "status" => status.to_string(),
                            )
                        })
                        .record(started.elapsed().as_secs_f64())
                });
                Ok(res)
            }
        })
}

/// Declares the route table once: [`ROUTES`] (what the API reference
/// must list, checked by a test) and [`routes`] (what the server
/// registers) come from the same lines.
macro_rules! api {
    ($($pattern:literal => { $($method:ident => $handler:path),+ $(,)? }),+ $(,)?) => {
        /// Every route: its pattern and its methods.
        pub const ROUTES: &[(&str, &[&str])] = &[
            $(($pattern, &[$(api!(@name $method)),+]),)+
        ];

        /// Every route of the API, each timed under its pattern; shared by
        /// `main` and the tests.
        pub fn routes(cfg: &mut ServiceConfig) {
            $({
                let resource = timed($pattern, &[$(api!(@name $method)),+]);
                $(let resource = route_of!(resource, $method, $handler);)+
                cfg.service(resource);
            })+
            pages::routes(cfg);
            cfg.default_service(web::to(handlers::not_found));
        }
    };
    (@name get) => { "GET" };
    (@name put) => { "PUT" };
    (@name post) => { "POST" };
    (@name delete) => { "DELETE" };
}

api! {
    "/v1/entitlements" => { get => reports::list_entitlements },
    "/v1/entitlements/{id}" => {
        put => handlers::put_entitlement,
        get => handlers::get_entitlement,
        delete => handlers::delete_entitlement,
    },
    "/v1/entitlements/{id}/seats" => { get => handlers::list_seats },
    "/v1/entitlements/{id}/seats/{seat_id}" => {
        post => handlers::activate_seat,
        delete => handlers::release_seat,
    },
    "/v1/entitlements/{id}/usage" => { post => handlers::record_usage },
    "/v1/usage/batch" => { post => handlers::record_batch },
    "/v1/entitlements/{id}/history" => { get => reports::history },
    "/v1/entitlements/{id}/periods" => { get => reports::periods },
    "/v1/entitlements/{id}/portal-links" => {
        post => pages::links::create_portal_link,
        delete => pages::links::revoke_portal_links,
    },
    "/v1/console-links" => { post => pages::links::create_console_link },
    "/v1/reports/overdraft" => { get => reports::overdraft_report },
    "/v1/webhooks" => { post => webhooks::create, get => webhooks::list },
    "/v1/webhooks/{id}" => { get => webhooks::get, delete => webhooks::delete },
    "/v1/webhooks/{id}/deliveries" => { get => webhooks::deliveries },
    "/v1/webhooks/{id}/rotate-secret" => { post => webhooks::rotate_secret },
    "/v1/events" => { get => events::list_events },
    "/v1/cluster" => { get => handlers::cluster },
    "/v1/nodes/usage" => { post => nodes::node_usage },
    "/healthz" => { get => handlers::healthz },
    "/readyz" => { get => handlers::readyz },
    "/metrics" => { get => handlers::metrics },
    "/openapi.json" => { get => openapi::serve },
}

/// Counts the open connections of all workers. A connection accepted while
/// `limit` are open is marked `over`: each of its requests is answered
/// `503 too_many_connections` and the connection is closed. Actix's own
/// per-worker cap stays above the limit, so an excess connection gets that
/// answer rather than waiting unseen in the listen backlog.
#[derive(Clone)]
struct ConnectionGate {
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    limit: usize,
}

/// Kept in the connection's data: leaves the gate when the connection closes.
struct ConnectionSlot {
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    over: bool,
}

impl ConnectionGate {
    fn new(limit: usize) -> Self {
        ConnectionGate {
            open: Default::default(),
            limit,
        }
    }

    fn enter(&self) -> ConnectionSlot {
        use std::sync::atomic::Ordering;
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            open: self.open.clone(),
            over: before >= self.limit,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Excess connections actix accepts per worker beyond the limit, to answer
/// them; past this they wait in the listen backlog.
const EXCESS_CONNECTIONS: usize = 1024;

/// Starts the HTTP server on `listener`; the caller awaits the returned
/// server and stops it through its handle (actix's own signal handling is
/// off: it stops at once on SIGINT, see `startup::stop_on_signals`).
pub fn serve(
    listener: TcpListener,
    state: web::Data<AppState>,
    workers: usize,
    shutdown_timeout: Duration,
) -> std::io::Result<Server> {
    let limits = state.limits.clone();
    let gate = ConnectionGate::new(limits.max_connections);
    let forwarding_on = state.forwarder.is_some();
    let server = HttpServer::new(move || {
        // Runs once on each worker thread as it starts: open this thread's
        // store connection now, so that the first calls do not pay for it.
        let store = state.engine.store().clone();
        actix_rt::spawn(async move {
            if let Err(e) = store.ping().await {
                tracing::warn!(error = %e, "store not reachable yet");
            }
        });
        if let Some(trim) = crate::telemetry::memory_trim() {
            actix_rt::spawn(trim_when_idle(trim));
        }

        App::new()
            .app_data(state.clone())
            .wrap_fn(|req, srv| {
                let over = req
                    .conn_data::<ConnectionSlot>()
                    .is_some_and(|slot| slot.over);
                let fut = (!over).then(|| srv.call(req));
                async move {
                    match fut {
                        Some(fut) => fut.await,
                        None => {
                            metrics::counter!("headroom_http_connections_refused_total")
                                .increment(1);
                            let mut e = ApiError::new(
                                Kind::TooManyConnections,
                                "the tracker serves at most --max-connections open connections",
                            );
                            e.retry_after = Some(1);
                            Err(e.into())
                        }
                    }
                }
            })
            .configure(routes)
            // Only with several nodes: alone, a request pays nothing for it.
            .wrap(actix_web::middleware::Condition::new(
                forwarding_on,
                forwarding::Forwarding,
            ))
    })
    .on_connect(move |_, ext| {
        ext.insert(gate.enter());
    })
    .workers(workers.max(1))
    .shutdown_timeout(shutdown_timeout.as_secs())
    .client_request_timeout(limits.request_timeout)
    .max_connections(limits.max_connections.saturating_add(EXCESS_CONNECTIONS))
    .disable_signals()
    .listen(listener)?;
    Ok(server.run())
}
