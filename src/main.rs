use clap::Parser;

/// mimalloc instead of the system allocator: allocation was about a tenth of
/// the tracker's CPU under load with glibc's malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use headroom::settings::Settings;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    headroom::tls::install_crypto_provider();
    let settings = Settings::parse();
    headroom::telemetry::init_logging(settings.log_json);
    settings.run().await
}
