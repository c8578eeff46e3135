//! headroom tracks software seats and metered usage with overdraft: calls up
//! to what was purchased are granted, calls between purchased and the hard cap
//! are allowed but flagged, and calls past the cap are denied.
//!
//! Where things live, each layer depending only on those below it:
//! - [`http`]: actix-web routes, auth, problem+json errors, `/metrics`.
//! - [`engine`]: one actix actor per entitlement, a `dashmap` registry,
//!   group commit, passivation and the lease sweep.
//! - [`store`]: persistence behind the [`store::Store`] trait, in memory or
//!   in Redis, writing state and events atomically.
//! - [`domain`]: the pure rules, with `now` as an argument and no I/O.
//! - [`settings`] and [`telemetry`]: flags, environment and logging for `main`.

pub mod domain;
pub mod engine;
pub mod flags;
pub mod http;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhooks;
