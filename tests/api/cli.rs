//! The `headroom` command line against a real tracker (a process of its
//! own, on a private redis-server): the everyday tasks, its output in both
//! formats and its exit codes.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::*;

/// `headroom <args>` as a client of `tracker` with `token`.
fn headroom(tracker: &TrackerProcess, token: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(args)
        .env("HEADROOM_URL", &tracker.base)
        .env("HEADROOM_TOKEN", token)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run headroom");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

/// Runs and expects `want` as the exit code; stdout.
fn run(tracker: &TrackerProcess, args: &[&str], want: i32) -> String {
    let out = headroom(tracker, ADMIN, args);
    assert_eq!(
        code(&out),
        want,
        "{args:?}\nstdout: {}\nstderr: {}",
        text(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    text(&out)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[actix_rt::test]
async fn the_command_line_does_the_everyday_tasks_against_a_tracker() {
    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "cli").await;
    let config = r#"{"seats": {"purchased": 3, "hard_cap": 4},
        "features": {"exports": {"included": 10, "hard_cap": 12, "period": "month"}}}"#;

    // Entitlements: put (created, then replaced), get, list.
    let out = run(
        &tracker,
        &["entitlements", "put", "demo", "--config", config],
        0,
    );
    assert!(out.starts_with("demo created"), "{out}");
    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), config).expect("write");
    let path = file.path().to_str().expect("path");
    let out = run(
        &tracker,
        &["entitlements", "put", "demo", "--file", path],
        0,
    );
    assert!(out.starts_with("demo replaced"), "{out}");
    run(
        &tracker,
        &["entitlements", "put", "spare", "--config", config],
        0,
    );
    let got = json(&run(
        &tracker,
        &["entitlements", "get", "demo", "-o", "json"],
        0,
    ));
    let (_, api) = tracker
        .send(
            reqwest::Method::GET,
            "/v1/entitlements/demo",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(got, api, "-o json prints the API's body unchanged");
    let out = run(&tracker, &["entitlements", "list"], 0);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("demo") && rows[1].starts_with("spare"),
        "{out}"
    );

    // Seats past the cap: three granted, one in overdraft, one denied (4).
    for (seat, want, word) in [
        ("ann", 0, "granted"),
        ("bob", 0, "granted"),
        ("cem", 0, "granted"),
        ("dee", 0, "overdraft"),
    ] {
        let out = run(&tracker, &["seats", "activate", "demo", seat], want);
        assert!(out.contains(word), "{seat}: {out}");
    }
    let denied = headroom(
        &tracker,
        CLIENT,
        &["-o", "json", "seats", "activate", "demo", "eve"],
    );
    assert_eq!(code(&denied), 4);
    assert_eq!(json(&text(&denied))["decision"]["outcome"], "denied");
    // In a table the denial is the decision, like a grant, on stdout.
    let denied = run(&tracker, &["seats", "activate", "demo", "eve"], 4);
    assert_eq!(
        denied.trim(),
        "eve denied (hard cap): 4 in use, 3 purchased, hard cap 4"
    );
    let listed = json(&run(&tracker, &["seats", "list", "demo", "-o", "json"], 0));
    assert_eq!(listed["seats"].as_array().expect("seats").len(), 4);
    assert!(run(&tracker, &["seats", "release", "demo", "ann"], 0).contains("released"));
    run(&tracker, &["seats", "activate", "demo", "ann"], 0);

    // Usage with an idempotency key: a retry answers the first decision.
    let first = run(
        &tracker,
        &[
            "-o",
            "json",
            "usage",
            "record",
            "demo",
            "exports",
            "11",
            "--idempotency-key",
            "k1",
        ],
        0,
    );
    let again = run(
        &tracker,
        &[
            "-o",
            "json",
            "usage",
            "record",
            "demo",
            "exports",
            "11",
            "--idempotency-key",
            "k1",
        ],
        0,
    );
    assert_eq!(json(&first), json(&again));
    assert_eq!(json(&first)["outcome"], "overdraft");
    run(&tracker, &["usage", "record", "demo", "exports", "2"], 4);

    // The report, as a table and as CSV; history and periods.
    let out = run(&tracker, &["reports", "overdraft"], 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("demo") && l.contains("seats")),
        "{out}"
    );
    assert!(!out.contains("spare"), "{out}");
    let csv = run(&tracker, &["reports", "overdraft", "--csv"], 0);
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("csv")).collect();
    assert_eq!(records.len(), 2, "{csv}");
    assert_eq!(&records[0][0], "demo");
    let pools: Vec<&str> = records.iter().map(|r| &r[1]).collect();
    assert!(
        pools.contains(&"seats") && pools.contains(&"exports"),
        "{csv}"
    );
    let history = json(&run(
        &tracker,
        &["history", "demo", "--bucket", "day", "-o", "json"],
        0,
    ));
    let buckets = history["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.last().expect("today")["seats"]["peak"], 4);
    assert!(run(&tracker, &["history", "demo"], 0).starts_with("START"));
    let periods = json(&run(&tracker, &["periods", "demo", "-o", "json"], 0));
    assert_eq!(periods["periods"], serde_json::json!([]));

    // The events through the tracker, filtered.
    let out = run(
        &tracker,
        &[
            "events",
            "tail",
            "--from-start",
            "--no-follow",
            "--type",
            "seat.denied,usage.denied",
            "-o",
            "json",
        ],
        0,
    );
    let kinds: Vec<String> = out
        .lines()
        .map(|l| json(l)["type"].as_str().expect("type").to_string())
        .collect();
    // eve twice (in JSON, then in a table), then the usage denial.
    assert_eq!(
        kinds,
        ["seat.denied", "seat.denied", "usage.denied"],
        "{out}"
    );
    let out = run(
        &tracker,
        &[
            "events",
            "tail",
            "--from-start",
            "--no-follow",
            "--entitlement",
            "spare",
        ],
        0,
    );
    assert_eq!(out.lines().count(), 1, "spare was only created: {out}");
    assert!(out.contains("entitlement.updated"), "{out}");

    // Webhooks: create (the secret, once), list, deliveries, delete.
    let created = json(&run(
        &tracker,
        &[
            "-o",
            "json",
            "webhooks",
            "create",
            "http://127.0.0.1:9/hook",
            "--type",
            "seat.denied",
        ],
        0,
    ));
    let id = created["id"].as_str().expect("id").to_string();
    assert!(
        created["secret"]
            .as_str()
            .expect("secret")
            .starts_with("whsec_")
    );
    assert!(run(&tracker, &["webhooks", "list"], 0).contains(&id));
    run(&tracker, &["seats", "activate", "demo", "fay"], 4);
    let mut attempts = 0;
    for _ in 0..100 {
        let log = json(&run(
            &tracker,
            &["-o", "json", "webhooks", "deliveries", &id],
            0,
        ));
        attempts = log["deliveries"].as_array().map_or(0, Vec::len);
        if attempts > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(attempts > 0, "the denial was attempted at the closed port");
    assert!(run(&tracker, &["webhooks", "deliveries", &id], 0).contains("seat.denied"));
    run(&tracker, &["webhooks", "delete", &id], 0);
    run(&tracker, &["webhooks", "delete", &id], 3);

    // Delete, then the exit codes of what went wrong.
    run(&tracker, &["entitlements", "delete", "spare"], 0);
    run(&tracker, &["entitlements", "get", "spare"], 3);
    // A configuration the server's rules refuse is refused before sending.
    let out = headroom(
        &tracker,
        ADMIN,
        &[
            "entitlements",
            "put",
            "bad",
            "--config",
            r#"{"seats": {"purchased": 3, "hard_cap": 2}}"#,
        ],
    );
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("seats.hard_cap"));
    run(&tracker, &["entitlements", "get", "bad"], 3);
    // A stale --if-match is refused (412: 4).
    run(
        &tracker,
        &[
            "entitlements",
            "put",
            "demo",
            "--config",
            config,
            "--if-match",
            "\"stale\"",
        ],
        4,
    );
    // A client token cannot read the report (403: 1); no tracker: 1.
    assert_eq!(
        code(&headroom(&tracker, CLIENT, &["reports", "overdraft"])),
        1
    );
    let out = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args([
            "--url",
            &format!("http://127.0.0.1:{}", free_port()),
            "entitlements",
            "list",
        ])
        .output()
        .expect("run");
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the tracker"));
    // A command line that is wrong: 2, with clap's message.
    run(&tracker, &["seats", "activate", "demo"], 2);
    run(&tracker, &["history", "demo", "--bucket", "week"], 2);
}

#[test]
fn the_command_line_prints_its_document_completions_and_man_page() {
    let bin = env!("CARGO_BIN_EXE_headroom");
    let out = Command::new(bin).arg("openapi").output().expect("run");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json"))
        .expect("openapi.json");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        committed.trim()
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin)
            .args(["completions", shell])
            .output()
            .expect("run");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("entitlements") && script.contains("tail"),
            "{shell}"
        );
    }
    let out = Command::new(bin).arg("man").output().expect("run");
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH headroom 1"), "{page}");
    assert!(page.contains("entitlements"), "{page}");
    // The Debian package installs the committed page: regenerate it with
    // `cargo run -q -- man > packaging/headroom.1`.
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/headroom.1"))
            .expect("packaging/headroom.1");
    assert_eq!(page, committed, "packaging/headroom.1 is stale");
    // `headroom --help` (the server's) points to the commands.
    let out = Command::new(bin).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("headroom entitlements"), "{help}");
    assert!(help.contains("`headroom help`"), "{help}");
    // `headroom help` is the command line's: every command, listed.
    let out = Command::new(bin).arg("help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in headroom::cli::COMMANDS {
        assert!(
            help.contains(&format!("\n  {command} ")),
            "{command}: {help}"
        );
    }
}
