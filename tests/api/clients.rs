//! The OpenAPI document is usable by an off-the-shelf generator: a Python
//! client generated from the committed `openapi.json` (openapi-python-client,
//! offline, settings in `.ci/openapi-python-client.yaml`) creates an
//! entitlement, activates seats past its cap and reads the overdraft report
//! against a running tracker (`tests/clients/python_smoke.py`). The client is
//! generated afresh in a temporary directory each run; it is proof of the
//! document, not a package this project maintains.

use std::process::Command;

use crate::helpers::*;

#[actix_rt::test]
async fn a_generated_python_client_creates_activates_past_the_cap_and_reads_the_report() {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = venv_python("openapi_python_client");
    let generator = std::path::Path::new(&python).with_file_name("openapi-python-client");
    let dir = tempfile::tempdir().expect("temporary directory");
    let package = dir.path().join("headroom_client");
    let out = Command::new(&generator)
        .current_dir(root)
        .args(["generate", "--path", "openapi.json", "--meta", "none"])
        .args([
            "--config",
            ".ci/openapi-python-client.yaml",
            "--output-path",
        ])
        .arg(&package)
        .output()
        .expect("openapi-python-client");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "generation failed:\n{said}");
    // The generator warns about what it could not express; it must not.
    assert!(!said.contains("Warning"), "generation warned:\n{said}");

    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "pyclient").await;
    let out = Command::new(&python)
        .arg(format!("{root}/tests/clients/python_smoke.py"))
        .args([&tracker.base, ADMIN, CLIENT, "smoke"])
        .env("PYTHONPATH", dir.path())
        .output()
        .expect("python");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the generated client's smoke test failed:\n{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.ends_with("ok\n"), "{printed}");
    assert!(printed.contains("outcomes: ["), "{printed}");
}
