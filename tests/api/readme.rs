//! Runs the README's walk-through verbatim against the tracker binary and a
//! private Redis, and checks what it prints.

use std::process::Command;

use crate::helpers::*;

fn walkthrough() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("walkthrough start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walkthrough end marker");
    let block = &readme[start..end];
    let code_start = block.find("```sh\n").expect("sh block") + "```sh\n".len();
    let code_end = block[code_start..].find("```").expect("block end") + code_start;
    block[code_start..code_end].to_string()
}

#[actix_rt::test]
async fn the_readme_walkthrough_works_verbatim() {
    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "headroom").await;
    let script = walkthrough();
    let out = Command::new("bash")
        .args(["-eo", "pipefail", "-c", &script])
        .env("HEADROOM", &tracker.base)
        .env("HEADROOM_REDIS_URL", redis.url())
        .env("ADMIN_TOKEN", ADMIN)
        .env("CLIENT_TOKEN", CLIENT)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for expected in [
        "PUT 201",
        "100 granted 200",
        "20 overdraft 200",
        "1 denied 429",
        "1 seat.overdraft_entered",
        "1 seat.hard_cap_reached",
        "1 seat.denied",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
    assert!(stdout.contains(r#""in_use":120"#), "{stdout}");
}
