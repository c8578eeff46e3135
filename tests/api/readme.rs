//! Runs the runnable blocks of the README and the guides verbatim against
//! the tracker binary (and a private Redis where the guide needs one), and
//! checks what they print.

use std::process::Command;

use crate::helpers::*;

/// The code block of `file` (relative to the repository) between
/// `<!-- {name}:start -->` and `<!-- {name}:end -->`, fenced as `lang`.
fn block(file: &str, name: &str, lang: &str) -> String {
    let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let start = text
        .find(&format!("<!-- {name}:start -->"))
        .expect("start marker");
    let end = text
        .find(&format!("<!-- {name}:end -->"))
        .expect("end marker");
    let block = &text[start..end];
    let fence = format!("```{lang}\n");
    let code_start = block.find(&fence).expect("code block") + fence.len();
    let code_end = block[code_start..].find("```").expect("block end") + code_start;
    block[code_start..code_end].to_string()
}

/// Runs a shell block with `env`; answers its output lines, blanks folded.
fn run_block(script: &str, env: &[(&str, &str)]) -> Vec<String> {
    let out = Command::new("bash")
        .args(["-eo", "pipefail", "-c", script])
        .envs(env.iter().copied())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "block failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The README's first walk-through, on the in-memory tracker right after
/// the first command, prints exactly what the README says, every time.
#[actix_rt::test]
async fn the_readme_walkthrough_works_verbatim_on_the_in_memory_tracker() {
    let tracker = TrackerProcess::start_in_memory().await;
    let script = block("README.md", "walkthrough", "sh");
    let env = [
        ("HEADROOM", tracker.base.as_str()),
        ("ADMIN_TOKEN", ADMIN),
        ("CLIENT_TOKEN", CLIENT),
    ];
    let expected = [
        "PUT 201",
        "ann granted 200",
        "bob granted 200",
        "cem granted 200",
        "dee overdraft 200",
        "eve denied 429",
        "exports 11 overdraft 200",
        "exports 2 denied 429",
        "\"entitlement\":\"demo\"",
    ];
    for round in 1..=2 {
        assert_eq!(run_block(&script, &env), expected, "round {round}");
    }
}

/// The Redis guide's walk-through, twice against the same Redis: the same
/// output each time.
#[actix_rt::test]
async fn the_redis_walkthrough_works_verbatim_and_twice() {
    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "headroom").await;
    let script = block("docs/redis.md", "redis-walkthrough", "sh");
    let url = redis.url();
    let env = [
        ("HEADROOM", tracker.base.as_str()),
        ("HEADROOM_REDIS_URL", url.as_str()),
        ("ADMIN_TOKEN", ADMIN),
        ("CLIENT_TOKEN", CLIENT),
    ];
    for round in 1..=2 {
        let lines = run_block(&script, &env);
        for expected in [
            "PUT 201",
            "100 granted 200",
            "20 overdraft 200",
            "1 denied 429",
            "1 entitlement.updated",
            "1 seat.overdraft_entered",
            "1 seat.hard_cap_reached",
            "1 seat.denied",
        ] {
            assert!(
                lines.iter().any(|l| l == expected),
                "round {round}: missing `{expected}` in:\n{}",
                lines.join("\n")
            );
        }
        assert!(
            lines.iter().any(|l| l.contains(r#""in_use":120"#)),
            "round {round}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("entitlement.deleted")),
            "round {round}: the stream was not started afresh"
        );
    }
}

/// The README's webhook receiver, run as printed: it verifies the
/// signature of every delivery from the tracker binary and refuses a
/// forged one.
#[actix_rt::test]
async fn the_readme_webhook_receiver_verifies_deliveries() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "headroom").await;
    let http = http_client();
    let port = free_port();
    let created: serde_json::Value = http
        .post(format!("{}/v1/webhooks", tracker.base))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({
            "url": format!("http://127.0.0.1:{port}/"),
            "types": ["seat.*"],
        }))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("json");
    let secret = created["secret"].as_str().expect("secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("receiver.py");
    std::fs::write(&script, block("docs/webhooks.md", "receiver", "python"))
        .expect("write receiver.py");
    let mut receiver = Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .env("WEBHOOK_SECRET", secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 must be on the PATH");
    // Wait for it to listen.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A forged delivery is refused.
    let forged = http
        .post(format!("http://127.0.0.1:{port}/"))
        .header(
            "Headroom-Signature",
            format!("t={},v1=00", chrono::Utc::now().timestamp()),
        )
        .body("{}")
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), 401);

    let put = http
        .put(format!("{}/v1/entitlements/acme", tracker.base))
        .bearer_auth(ADMIN)
        .body(r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
        .send()
        .await
        .expect("put");
    assert!(put.status().is_success());
    for seat in ["a", "b", "c"] {
        http.post(format!(
            "{}/v1/entitlements/acme/seats/{seat}",
            tracker.base
        ))
        .bearer_auth(CLIENT)
        .send()
        .await
        .expect("activate");
    }
    // seat.overdraft_entered, seat.hard_cap_reached, seat.denied: each
    // verified and printed by the receiver.
    let stdout = receiver.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .take(3)
            .map(|l| l.unwrap_or_default())
            .collect::<Vec<_>>()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !lines.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
    let mut kinds: Vec<String> = lines
        .join()
        .expect("reader")
        .iter()
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "seat.denied acme",
            "seat.hard_cap_reached acme",
            "seat.overdraft_entered acme"
        ]
    );
}
