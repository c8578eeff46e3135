use std::process::ExitCode;

/// mimalloc instead of the system allocator: allocation was about a tenth of
/// the tracker's CPU under load with glibc's malloc (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use headroom::settings::Settings;
use headroom::startup::Application;

/// `headroom` alone, or `headroom serve`, runs the tracker; the other
/// commands (`headroom entitlements get …`, `src/cli`) talk to one. Errors
/// end the process with one line on stderr that names the setting
/// concerned (status 2 for a bad setting, 1 when the tracker cannot start).
fn main() -> ExitCode {
    headroom::tls::install_crypto_provider();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if headroom::cli::is_client(&args) {
        return headroom::cli::main(args);
    }
    // `headroom serve …` is `headroom …`.
    if args.get(1).is_some_and(|a| a == "serve") {
        args.remove(1);
    }
    let settings = Settings::from_args_or_exit(args);
    // An idle worker gives the memory it freed back (RELIABILITY.md, "Scale").
    headroom::telemetry::set_memory_trim(|| {
        // SAFETY: mi_collect only walks this thread's own heap and the arenas.
        unsafe { libmimalloc_sys::mi_collect(true) }
    });
    headroom::telemetry::init_logging(settings.log_json);
    let served = actix_web::rt::System::new().block_on(async move {
        match Application::build(settings).await {
            Ok(app) => app.run_until_stopped().await,
            Err(e) => Err(e),
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("headroom: {e}");
            ExitCode::FAILURE
        }
    }
}
