//! The OpenAPI document proven against the running server: schemathesis
//! (in `.ci/venv`, settings in `.ci/schemathesis.toml`: seeded, bounded)
//! generates valid and invalid calls for every operation, follows the
//! links between them, and checks for server errors, undocumented status
//! codes, responses that do not match their schema or content type, and
//! calls accepted without their token.

use std::process::Command;

use crate::helpers::*;

#[actix_rt::test]
async fn schemathesis_finds_nothing_against_the_running_tracker() {
    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "contract").await;
    let root = env!("CARGO_MANIFEST_DIR");
    let python = venv_python("schemathesis");
    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    let out = Command::new(&schemathesis)
        .current_dir(root)
        .args([
            "--no-color",
            "--config-file",
            ".ci/schemathesis.toml",
            "run",
            "openapi.json",
        ])
        .args(["--url", &tracker.base, "--seed", "1"])
        .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
        .output()
        .expect("schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}
