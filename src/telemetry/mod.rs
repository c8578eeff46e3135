//! Logging, the Prometheus recorder, and what the engine publishes.
//!
//! Every metric is described once, in `catalog`; `engine` holds the
//! series the entitlement actors update on each decision.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

mod catalog;
pub(crate) mod engine;

pub use catalog::{
    DENY_REASONS, LabelDef, MAX_WATCHED, METHODS, METRICS, MetricDef, MetricKind, OPERATIONS,
    OUTCOMES, ROUTES, STATUSES, STORE_OPS, VERSIONS, metrics_markdown,
};

/// Latency buckets suited to sub-millisecond calls, up to the store timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

static MEMORY_TRIM: OnceLock<fn()> = OnceLock::new();

/// Sets how an idle worker gives freed memory back to the system (the
/// binary passes mimalloc's collect; tests, on the system allocator, none).
pub fn set_memory_trim(trim: fn()) {
    let _ = MEMORY_TRIM.set(trim);
}

pub(crate) fn memory_trim() -> Option<fn()> {
    MEMORY_TRIM.get().copied()
}

/// Installs the process-wide Prometheus recorder once and describes every
/// metric; later calls return the same handle.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &BATCH_BUCKETS));
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics stays empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            catalog::describe();
            // Histogram samples wait in a buffer until they are folded into
            // the buckets; without a scrape they would pile up without
            // bound (tens of MB after a few hundred thousand calls), so
            // they are folded every second whether or not anyone scrapes.
            let upkeep = handle.clone();
            let started = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = started {
                tracing::warn!(error = %e, "metrics upkeep thread not started");
            }
            handle
        })
        .clone()
}

/// Reads the process figures (CPU, memory, descriptors, threads) into their
/// metrics; `/metrics` calls it before rendering. metrics-process reads them
/// from /proc, so a scrape costs a few file reads.
pub fn collect_process_metrics() {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR
        .get_or_init(|| metrics_process::Collector::new("headroom_"))
        .collect();
}

/// Logs to stderr, as text or JSON, filtered by `RUST_LOG` (default `info`).
/// Without `RUST_LOG`, headroom's own events from `info` and the HTTP
/// framework's only from `warn` (its start-up chatter says nothing an
/// operator needs). Colour only on a terminal, and never with `NO_COLOR`.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,actix_server=warn,actix_web=warn,actix_http=warn,actix=warn")
    });
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
