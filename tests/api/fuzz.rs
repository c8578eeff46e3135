//! Fuzzing on stable Rust, driven by proptest so that it runs in CI
//! (cargo-fuzz needs a nightly toolchain, which this project's machines
//! cannot install).
//!
//! Inputs are the seed corpus in `tests/fuzz-corpus/<target>/` mutated
//! (bytes flipped, inserted, deleted and duplicated, JSON tokens spliced
//! in), or arbitrary bytes. Targets: configuration validation, the batch
//! decoder and the id parsers called directly (no panic), and the same
//! bodies and paths sent to the running app (never a 5xx, never a panic,
//! and the app still answers afterwards).
//!
//! `FUZZ_CASES` sets the cases per target (default 256 here);
//! `FUZZ_CASES=20000 cargo test --release --test api fuzz` is the longer run.
//! Failing inputs are kept by proptest in `tests/proptest-regressions/fuzz.txt`
//! and replayed first on every run; an input worth keeping for good goes in
//! `tests/fuzz-corpus/regressions/<target>/`, which is always replayed whole.

use std::path::Path;

use headroom::domain::{EntitlementConfig, EntitlementId, FeatureKey, IdempotencyKey, SeatId};
use proptest::prelude::*;

use crate::helpers::*;

/// Every file of `tests/fuzz-corpus/<target>/` and of its regressions.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    let mut files = Vec::new();
    for dir in [root.join(target), root.join("regressions").join(target)] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if let Ok(bytes) = std::fs::read(e.path()) {
                    files.push(bytes);
                }
            }
        }
    }
    assert!(!files.is_empty(), "no corpus for {target}");
    files
}

/// Fragments that tend to break JSON handling and validation.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "0.5",
    "18446744073709551616",
    "99999999999999999999999999",
    "\"unlimited\"",
    "\"\"",
    "\\u0000",
    "\\ud800",
    "é",
    "🦀",
    "[]",
    "{}",
    "\"month\"",
    "\"2026-02-30T00:00:00Z\"",
    "\"seats\"",
    "\"features\"",
    "\"events\"",
    "\"amount\"",
    "%2F",
    "..",
    "/",
    "%00",
];

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Token(usize, usize),
}

fn apply(mut data: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = data.len().max(1);
        match *edit {
            Edit::Flip(at, bit) => {
                if let Some(b) = data.get_mut(at % len) {
                    *b ^= 1 << (bit % 8);
                }
            }
            Edit::Insert(at, byte) => data.insert((at % len).min(data.len()), byte),
            Edit::Delete(at, n) => {
                let start = (at % len).min(data.len());
                let end = (start + n % 16).min(data.len());
                data.drain(start..end);
            }
            Edit::Duplicate(at, n) => {
                let start = (at % len).min(data.len());
                let end = (start + n % 32).min(data.len());
                let copy = data[start..end].to_vec();
                data.splice(start..start, copy);
            }
            Edit::Token(at, t) => {
                let at = (at % len).min(data.len());
                let token = TOKENS[t % TOKENS.len()].as_bytes();
                data.splice(at..at, token.iter().copied());
            }
        }
    }
    data
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Flip(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Insert(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, n)| Edit::Duplicate(a, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, t)| Edit::Token(a, t)),
    ]
}

/// A seed of `target` with up to eight edits, or arbitrary bytes.
fn input(target: &str) -> impl Strategy<Value = Vec<u8>> + use<> {
    let seeds = corpus(target);
    prop_oneof![
        8 => (0..seeds.len(), proptest::collection::vec(edit(), 0..8))
            .prop_map(move |(i, edits)| apply(seeds[i].clone(), &edits)),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Sends `body` to `path` with both tokens in turn; answers the statuses.
async fn send_all(app: &TestApp, method: reqwest::Method, path: &str, body: &[u8]) -> Vec<u16> {
    let mut statuses = Vec::new();
    for token in [ADMIN, CLIENT] {
        let Ok(url) = reqwest::Url::parse(&format!("{}{path}", app.base)) else {
            continue;
        };
        let res = app
            .http
            .request(method.clone(), url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await;
        if let Ok(res) = res {
            statuses.push(res.status().as_u16());
        }
    }
    statuses
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Failing inputs are saved next to this file and replayed first.
        source_file: Some(file!()),
        ..ProptestConfig::default()
    }
}

/// Runs `strategy`'s cases against one app on the embedded store: every
/// answer must be below 500, and the app must still answer afterwards.
fn fuzz_http<S: Strategy>(
    strategy: S,
    request: impl Fn(&S::Value) -> (reqwest::Method, String, Vec<u8>),
) where
    S::Value: std::fmt::Debug,
{
    let system = actix_rt::System::new();
    let app = system.block_on(TestApp::spawn(memory_store()));
    system.block_on(async {
        app.put(
            "acme",
            r#"{"seats": {"purchased": 2, "hard_cap": 3}, "features": {"api": {"included": 10, "hard_cap": 12}}}"#,
        )
        .await;
    });
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let result = runner.run(&strategy, |value| {
        let (method, path, body) = request(&value);
        let statuses = system.block_on(send_all(&app, method, &path, &body));
        prop_assert!(
            statuses.iter().all(|s| *s < 500),
            "{statuses:?} for {path:?} {:?}",
            String::from_utf8_lossy(&body)
        );
        let (health, _) = system.block_on(app.send(reqwest::Method::GET, "/healthz", None, None));
        prop_assert_eq!(health, 200);
        Ok(())
    });
    system.block_on(app.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_validation_never_panics(body in input("config")) {
        let _ = EntitlementConfig::from_json(&body);
    }

    #[test]
    fn the_batch_decoder_never_panics(body in input("batch")) {
        let _ = headroom::http::batch::decode(&body);
    }

    #[test]
    fn id_parsers_never_panic(raw in input("path")) {
        let s = String::from_utf8_lossy(&raw);
        for part in s.split('/') {
            let _ = EntitlementId::parse(part);
            let _ = SeatId::parse(part);
            let _ = FeatureKey::parse(part);
            let _ = IdempotencyKey::parse(part);
        }
    }
}

#[test]
fn configuration_bodies_never_get_a_5xx() {
    fuzz_http(input("config"), |body| {
        (
            reqwest::Method::PUT,
            "/v1/entitlements/fuzzed".into(),
            body.clone(),
        )
    });
}

#[test]
fn usage_bodies_never_get_a_5xx() {
    fuzz_http(input("usage"), |body| {
        (
            reqwest::Method::POST,
            "/v1/entitlements/acme/usage".into(),
            body.clone(),
        )
    });
}

#[test]
fn batch_bodies_never_get_a_5xx() {
    fuzz_http(input("batch"), |body| {
        (
            reqwest::Method::POST,
            "/v1/usage/batch".into(),
            body.clone(),
        )
    });
}

#[test]
fn paths_never_get_a_5xx() {
    fuzz_http((input("path"), 0usize..4), |(raw, method)| {
        let methods = [
            reqwest::Method::GET,
            reqwest::Method::PUT,
            reqwest::Method::POST,
            reqwest::Method::DELETE,
        ];
        let path = String::from_utf8_lossy(raw).into_owned();
        (methods[*method].clone(), path, b"{}".to_vec())
    });
}
