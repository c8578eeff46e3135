//! Logging and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::EVENT_KINDS;

/// Latency buckets suited to sub-millisecond calls, up to the store timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
];
const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Installs the process-wide Prometheus recorder once and describes every
/// metric; later calls return the same handle.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("headroom_store_batch_size".into()), &BATCH_BUCKETS));
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics stays empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "headroom_decisions_total",
        "Seat and usage decisions, by operation and outcome."
    );
    describe_counter!(
        "headroom_events_published_total",
        "Events written to the stream, by type."
    );
    describe_histogram!(
        "headroom_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request duration by route pattern, method and status."
    );
    describe_histogram!(
        "headroom_store_write_duration_seconds",
        Unit::Seconds,
        "Duration of one group-commit pipeline to the store."
    );
    describe_histogram!(
        "headroom_store_load_duration_seconds",
        Unit::Seconds,
        "Duration of loading one entitlement from the store."
    );
    describe_histogram!(
        "headroom_store_batch_size",
        "Calls carried by one store pipeline."
    );
    describe_counter!(
        "headroom_store_errors_total",
        "Failed store operations, by operation."
    );
    describe_gauge!(
        "headroom_resident_entitlements",
        "Entitlement actors in memory."
    );
    describe_gauge!(
        "headroom_entitlements_in_overdraft",
        "Resident entitlements with seats or a feature in overdraft."
    );
    for kind in EVENT_KINDS {
        metrics::counter!("headroom_events_published_total", "type" => kind).absolute(0);
    }
}

/// Logs to stderr, as text or JSON, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
