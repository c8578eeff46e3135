//! The load tool against an in-process tracker for a moment, every scenario,
//! ledger included: keeps the tool from rotting.

use std::sync::Arc;
use std::time::Duration;

use headroom::engine::SystemClock;
use headroom::settings::Settings;
use headroom::startup::{Application, Wiring};
use headroom::store::MemoryStore;
use headroom_load::{Scenario, Spec, check_ledger, read_used, run, setup};

#[actix_rt::test]
async fn every_scenario_runs_and_its_ledger_holds() {
    let store = Arc::new(MemoryStore::new(100_000, Duration::from_secs(3600)));
    let mut settings = Settings::default();
    settings.http.listen = "127.0.0.1:0".parse().expect("address");
    settings.http.workers = Some(1);
    settings.http.shutdown_timeout = Duration::from_secs(1);
    settings.http.auth.admin_tokens = Some("adm".into());
    settings.http.auth.client_tokens = Some("cli".into());
    let wiring = Wiring {
        store,
        clock: Arc::new(SystemClock),
        webhooks: None,
        redis: None,
        dispatch: false,
        signals: false,
    };
    let app = Application::build_with(settings, wiring).expect("application");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], app.port()));
    let handle = app.handle();
    let running = actix_rt::spawn(app.run_until_stopped());

    for scenario in [Scenario::Usage, Scenario::Batch, Scenario::Seats] {
        let spec = Spec {
            addr,
            admin_token: Some("adm".into()),
            client_token: Some("cli".into()),
            scenario,
            entitlements: 20,
            zipf: 1.1,
            connections: 4,
            duration: Duration::from_millis(500),
            rate: None,
            batch_size: 50,
            seed: 1,
            prefix: "smoke".into(),
            progress: false,
            spread: Vec::new(),
            keyed: false,
            by_owner: None,
            timeout: None,
        };
        setup(&spec).await.expect("setup");
        let before = read_used(&spec).await.expect("read");
        let (mut report, tally) = run(spec.clone()).await.expect("run");
        check_ledger(&spec, &before, &tally, &mut report)
            .await
            .expect("ledger");
        assert!(report.requests > 0, "{scenario:?} sent nothing");
        assert_eq!(
            report.http_errors + report.transport_errors,
            0,
            "{scenario:?}: {report:?}"
        );
        let ledger = report.ledger.expect("ledger");
        assert!(ledger.ok, "{scenario:?}: {ledger:?}");
        assert_eq!(ledger.entitlements_checked, 20);
    }
    handle.stop(true).await;
    running.await.expect("stopped").expect("ran");
}
