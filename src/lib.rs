//! headroom tracks software seats and metered usage with overdraft: calls up
//! to what was purchased are granted, calls between purchased and the hard cap
//! are allowed but flagged, and calls past the cap are denied.
//!
//! # Layers
//! Each depends only on those below it: [`http`] → [`engine`] → [`store`]
//! and [`domain`]. [`startup`] wires them together for `main` and for the
//! tests; [`settings`] is the command line, made of the flag groups each
//! layer declares ([`flags`] holds what those share).
//!
//! # Where things live
//! - **The rules** (overdraft band, hard and customer caps, leases, periods,
//!   thresholds, events): [`domain`], pure functions of the state and `now`.
//!   Seats in `domain/entitlement/seats.rs`, metered usage in
//!   `domain/entitlement/meters.rs`, housekeeping (lease expiry, period
//!   ends) in `domain/entitlement/mod.rs`, configuration validation in
//!   `domain/config.rs`, the history a decision adds in `domain/history.rs`.
//! - **The routes**: registered in `http::routes` (`http/mod.rs`); handlers
//!   in `http/handlers.rs` (entitlements, seats, usage, batch, health,
//!   metrics), `http/reports.rs` (report, history, periods, the
//!   entitlement list), `http/events.rs` (the event stream) and
//!   `http/webhooks.rs`; the OpenAPI document is `http/openapi.rs` (from
//!   the handlers' `utoipa::path` annotations, shaped in
//!   `http/openapi/shape.rs`); the caller's scope, path ids, queries and
//!   bounded bodies are extractors in `http/extract.rs`; every error becomes
//!   problem+json in `http/problem.rs`, the one table of status and `code`.
//! - **The pages**: `http/pages/` — the customer's page (`portal.rs`), the
//!   console (`console.rs`), what an entitlement's page shows (`data.rs`),
//!   signed links, sessions and CSRF tokens (`sign.rs`), the link routes of
//!   the API (`links.rs`), CSV exports (`csv.rs`), embedded assets
//!   (`assets.rs`, uPlot vendored under `assets/uplot/`), the askama
//!   templates (`templates/`) and `/docs` (`docs.rs`, Swagger UI).
//! - **The command line**: `cli/` — `headroom <command>` as a client of
//!   the HTTP API; `main.rs` chooses between it and the server.
//! - **One call, end to end**: the handler calls [`engine::Engine`], which
//!   finds the entitlement's actor in the registry (`engine/registry.rs`)
//!   and sends it a typed request (`engine/actor/requests.rs`); the actor
//!   decides it on its in-memory state and the call waits for the write
//!   (`engine/actor/commit.rs`); the store writes it (`store/redis/`), and
//!   only then is the call answered.
//! - **Two levels of batching**: (1) an actor's calls that arrive while its
//!   write is in flight share its next write (`engine/actor/commit.rs`,
//!   `PendingWrite`); (2) each worker thread's committer sends the writes
//!   of all its actors as one pipeline with one script call (on a Redis
//!   Cluster, one call per bucket, all at once) (`store/redis/committer/`).
//! - **Redis keys**: every one is built in `store/redis/keys.rs`, which
//!   lists them and explains the buckets (hash slots); the scripts
//!   (`store/redis/lua/`) and the layout of their arguments
//!   (`store/redis/scripts.rs`) beside it; the layout record in
//!   `store/redis/layout.rs`; standalone Redis or cluster in
//!   `store/redis/link.rs`; the reports' merge over the buckets in
//!   `store/redis/reads.rs`.
//! - **Errors**: each layer has its own (`store::StoreError` with a class
//!   decided where the cause is known, [`engine::EngineError`],
//!   `http::problem::ApiError`), each keeping its cause as `source`.
//! - **Metrics**: described once in `telemetry/catalog.rs` (METRICS.md is
//!   generated from it); what the actors publish per decision in
//!   `telemetry/engine.rs`.
//! - **Several nodes**: [`nodes`]: each node's registration and lease in
//!   Redis and the live members (`nodes/mod.rs`), who owns an entitlement
//!   (rendezvous hashing, `nodes/ring.rs`); `GET /v1/cluster` shows them.
//!   A call for another node's entitlement is sent on by the middleware of
//!   `http/forwarding.rs` (`nodes/forward.rs`: one call as it came; usage
//!   calls batched per owner in `nodes/coalesce.rs`, decided by the owner
//!   in `http/nodes.rs`; batches split per owner); reads among nodes check
//!   the stored owner epoch (`engine::Engine::get`); the hand-over when the
//!   members change and the graceful leave are wired in `startup.rs`.
//! - **Webhooks**: registrations and signing in [`webhooks`], the
//!   dispatcher (stream reader, delivery workers, retry schedule) in
//!   `webhooks/dispatch/`.

pub mod cli;
pub mod domain;
pub mod engine;
pub mod flags;
pub mod http;
pub mod nodes;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhooks;
