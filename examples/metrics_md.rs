//! Prints METRICS.md from the metrics catalogue:
//! `cargo run --example metrics_md > METRICS.md`.

fn main() {
    print!("{}", headroom::telemetry::metrics_markdown());
}
