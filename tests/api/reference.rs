//! The API reference in the repository (`docs/api.md`) lists exactly the
//! routes the application registers.

use std::collections::BTreeSet;

#[test]
fn the_reference_lists_every_route_the_application_serves() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md"))
        .expect("docs/api.md");
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .filter_map(|l| l.strip_suffix('`'))
        .map(str::to_string)
        .collect();
    let served: BTreeSet<String> = headroom::http::ROUTES
        .iter()
        .flat_map(|(pattern, methods)| methods.iter().map(move |m| format!("{m} {pattern}")))
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "served but not in docs/api.md: {missing:?}"
    );
    assert!(stale.is_empty(), "in docs/api.md but not served: {stale:?}");
}

#[test]
fn the_metrics_catalogue_names_every_route() {
    let served: BTreeSet<&str> = headroom::http::ROUTES
        .iter()
        .map(|(p, _)| *p)
        .chain(headroom::http::pages::ROUTES.iter().copied())
        .collect();
    let catalogued: BTreeSet<&str> = headroom::telemetry::ROUTES.iter().copied().collect();
    assert_eq!(served, catalogued);
}

/// The committed `openapi.json` is what the handlers generate (run `cargo
/// run --example openapi_json > openapi.json` after changing the API), and
/// a valid OpenAPI 3.1 document (openapi-spec-validator, in `.ci/venv`).
#[test]
fn the_committed_openapi_document_is_the_generated_one_and_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let committed = std::fs::read_to_string(path).expect("openapi.json");
    let generated = headroom::http::openapi::document_json().expect("the document encodes");
    assert_eq!(
        committed.trim_end(),
        generated.trim_end(),
        "run `cargo run --example openapi_json > openapi.json`"
    );
    let python = crate::helpers::venv_python("openapi_spec_validator");
    let out = std::process::Command::new(python)
        .args(["-m", "openapi_spec_validator", path])
        .output()
        .expect("openapi-spec-validator");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
