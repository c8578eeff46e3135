use std::process::ExitCode;

/// mimalloc instead of the system allocator: allocation was about a tenth of
/// the tracker's CPU under load with glibc's malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use headroom::settings::Settings;
use headroom::startup::Application;

/// Errors end the process with one line on stderr that names the setting
/// concerned (status 2 for a bad setting, 1 when the tracker cannot start).
#[actix_web::main]
async fn main() -> ExitCode {
    headroom::tls::install_crypto_provider();
    // An idle worker gives the memory it freed back (RELIABILITY.md, "Scale").
    headroom::telemetry::set_memory_trim(|| {
        // SAFETY: mi_collect only walks this thread's own heap and the arenas.
        unsafe { libmimalloc_sys::mi_collect(true) }
    });
    let settings = Settings::from_env_or_exit();
    headroom::telemetry::init_logging(settings.log_json);
    let served = match Application::build(settings).await {
        Ok(app) => app.run_until_stopped().await,
        Err(e) => Err(e),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("headroom: {e}");
            ExitCode::FAILURE
        }
    }
}
