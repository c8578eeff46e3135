//! What the engine and store benches share.

use headroom::domain::{EntitlementConfig, EntitlementId};
use headroom::engine::Engine;

/// Creates entitlements `e0` … `e{n-1}` with one feature that never runs
/// out, so every decision is a grant.
pub async fn create_entitlements(engine: &Engine, n: usize) -> Vec<EntitlementId> {
    let ids: Vec<EntitlementId> = (0..n)
        .map(|i| EntitlementId::parse(&format!("e{i}")).expect("id"))
        .collect();
    let cfg = EntitlementConfig::from_json(
        br#"{"features": {"api": {"included": 1000000000000, "hard_cap": "unlimited"}}}"#,
    )
    .expect("config");
    for id in &ids {
        engine.put(id, cfg.clone()).await.expect("put");
    }
    ids
}
