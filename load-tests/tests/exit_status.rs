//! The load tool's exit status tells a failed run from a good one: a wrong
//! token (every call refused) fails it, and a good run with `--cleanup`
//! succeeds and leaves nothing behind. Tokens come from the tracker's own
//! variables.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use headroom::engine::SystemClock;
use headroom::settings::Settings;
use headroom::startup::{Application, Wiring};
use headroom::store::MemoryStore;

async fn tracker() -> (Application, String) {
    let mut settings = Settings::default();
    settings.http.listen = "127.0.0.1:0".parse().expect("address");
    settings.http.workers = Some(1);
    settings.http.auth.admin_tokens = Some("adm,adm2".into());
    settings.http.auth.client_tokens = Some("cli".into());
    let wiring = Wiring {
        store: Arc::new(MemoryStore::new(100_000, Duration::from_secs(3600))),
        clock: Arc::new(SystemClock),
        webhooks: None,
        redis: None,
        dispatch: false,
        signals: false,
    };
    let app = Application::build_with(settings, wiring).expect("application");
    let addr = format!("127.0.0.1:{}", app.port());
    (app, addr)
}

fn load(addr: &str, client_token: &str, extra: &[&str]) -> std::process::Output {
    let report = tempfile::NamedTempFile::new().expect("report file");
    Command::new(env!("CARGO_BIN_EXE_load"))
        .args(["--addr", addr, "--entitlements", "5", "--connections", "2"])
        .args(["--duration", "300ms", "--prefix", "exit"])
        .arg("--report")
        .arg(report.path())
        .args(extra)
        .env("HEADROOM_ADMIN_TOKENS", "adm,adm2")
        .env("HEADROOM_CLIENT_TOKENS", client_token)
        .output()
        .expect("run load")
}

#[actix_rt::test]
async fn a_refused_run_fails_and_a_good_one_cleans_up() {
    let (app, addr) = tracker().await;
    let engine = app.engine().clone();
    let handle = app.handle();
    let running = actix_rt::spawn(app.run_until_stopped());

    let addr2 = addr.clone();
    let refused = actix_rt::task::spawn_blocking(move || load(&addr2, "wrong", &[]))
        .await
        .expect("load");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a run with a wrong token passed");
    assert!(stderr.contains("no call was answered"), "{stderr}");

    let addr2 = addr.clone();
    let good = actix_rt::task::spawn_blocking(move || load(&addr2, "cli", &["--cleanup"]))
        .await
        .expect("load");
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        stdout.contains("creating 5 entitlements exit-0"),
        "{stdout}"
    );
    assert!(stdout.contains("deleted 5 entitlements"), "{stdout}");
    let id = headroom::domain::EntitlementId::parse("exit-0").expect("id");
    assert!(engine.get(&id).await.is_err(), "--cleanup left exit-0");

    handle.stop(true).await;
    running.await.expect("stopped").expect("ran");
}
