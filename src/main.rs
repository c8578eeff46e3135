use clap::Parser;

/// mimalloc instead of the system allocator: allocation was about a tenth of
/// the tracker's CPU under load with glibc's malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use headroom::settings::Settings;
use headroom::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    headroom::tls::install_crypto_provider();
    // An idle worker gives the memory it freed back (RELIABILITY.md, "Scale").
    headroom::telemetry::set_memory_trim(|| {
        // SAFETY: mi_collect only walks this thread's own heap and the arenas.
        unsafe { libmimalloc_sys::mi_collect(true) }
    });
    let settings = Settings::parse();
    headroom::telemetry::init_logging(settings.log_json);
    Application::build(settings)?.run_until_stopped().await?;
    Ok(())
}
