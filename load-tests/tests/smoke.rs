//! The load tool against an in-process tracker for a moment, every scenario,
//! ledger included: keeps the tool from rotting.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use headroom::engine::{Engine, EngineSettings, SystemClock};
use headroom::http::{self, AppState, Auth, Limits};
use headroom::store::MemoryStore;
use headroom_load::{Scenario, Spec, check_ledger, read_used, run, setup};

#[actix_rt::test]
async fn every_scenario_runs_and_its_ledger_holds() {
    let store = Arc::new(MemoryStore::new(100_000, Duration::from_secs(3600)));
    let engine = Engine::new(store, Arc::new(SystemClock), EngineSettings::default());
    let state = web::Data::new(AppState {
        engine: engine.clone(),
        auth: Auth::new(vec!["adm".into()], vec!["cli".into()]),
        limits: Limits::default(),
        metrics: headroom::telemetry::metrics(),
        webhooks: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = http::serve(listener, state, 1, Duration::from_secs(1), false).expect("serve");
    let handle = server.handle();
    actix_rt::spawn(server);

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
    engine.shutdown().await;
}
