//! Runs the runnable blocks of the README and the guides verbatim against
//! the tracker binary (and a private Redis where the guide needs one), and
//! checks what they print.

use std::process::Command;

use crate::helpers::*;

/// A guide's text (`file` relative to the repository).
fn guide(file: &str) -> String {
    let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A line with its runs of blanks folded into one space, as the blocks'
/// output is compared.
fn folded(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The code block of `file` (relative to the repository) between
/// `<!-- {name}:start -->` and `<!-- {name}:end -->`, fenced as `lang`.
fn block(file: &str, name: &str, lang: &str) -> String {
    let text = guide(file);
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
    stdout.lines().map(folded).collect()
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
    // Then the customer's page of the README's next block.
    let pages = format!("{script}\n{}", block("README.md", "pages", "sh"));
    let lines = run_block(&pages, &env);
    let send = format!("send: {}/portal/e/demo?token=…", tracker.base);
    assert_eq!(
        lines[expected.len()..],
        [send, "seats in use: 4".to_string()]
    );
}

/// The first ```` ```text ```` block after `<!-- {name}:end -->` in `file`:
/// what the guide says the block prints, blanks folded as [`run_block`]
/// folds them.
fn printed_after(file: &str, name: &str) -> Vec<String> {
    let text = guide(file);
    let end = text
        .find(&format!("<!-- {name}:end -->"))
        .expect("end marker");
    let start = text[end..].find("```text\n").expect("what it prints") + end + 8;
    let stop = text[start..].find("```").expect("block end") + start;
    text[start..stop].lines().map(folded).collect()
}

/// Times (RFC 3339, as the API and the command line write them) as `TIME`:
/// they differ from run to run.
fn timeless(lines: &[String]) -> Vec<String> {
    let time = |w: &str| {
        w.len() >= 20
            && w.as_bytes()[4] == b'-'
            && w.as_bytes()[10] == b'T'
            && w.ends_with('Z')
            && w[..4].bytes().all(|b| b.is_ascii_digit())
    };
    lines
        .iter()
        .map(|l| {
            l.split(' ')
                .map(|w| if time(w) { "TIME" } else { w })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The README's command-line block, after its walk-through, with the
/// binary on `PATH` as the README says: what the README shows it print,
/// times aside, twice.
#[actix_rt::test]
async fn the_readme_command_line_block_works_verbatim_after_the_walkthrough() {
    let tracker = TrackerProcess::start_in_memory().await;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_headroom"))
        .parent()
        .expect("the binary's directory");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let walkthrough = block("README.md", "walkthrough", "sh");
    let cli = block("README.md", "cli", "sh");
    let env = [
        ("HEADROOM", tracker.base.as_str()),
        ("ADMIN_TOKEN", ADMIN),
        ("CLIENT_TOKEN", CLIENT),
        ("PATH", path.as_str()),
    ];
    let expected = timeless(&printed_after("README.md", "cli"));
    assert!(expected.len() > 10, "{expected:?}");
    for round in 1..=2 {
        run_block(&walkthrough, &env);
        let lines = timeless(&run_block(&cli, &env));
        assert_eq!(lines, expected, "round {round}");
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
    let mut receiver = Command::new(venv_python("standardwebhooks"))
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
        .header("webhook-id", "forged")
        .header(
            "webhook-timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header("webhook-signature", "v1,AAAA")
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

fn python_with_redis() -> String {
    venv_python("redis")
}

/// Runs the guide's consumer with `--drain` and `env`: its output lines.
fn run_consumer(env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("consumer.py");
    std::fs::write(&script, block("docs/redis.md", "consumer", "python")).expect("write");
    let out = Command::new(python_with_redis())
        .arg(&script)
        .arg("--drain")
        .envs(env.iter().copied())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "consumer.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    lines
}

/// Traffic over 30 entitlements through `tracker`, so that the events
/// fall in many buckets.
async fn events_in_many_buckets(tracker: &TrackerProcess) {
    for n in 0..30 {
        let path = format!("/v1/entitlements/c-{n}");
        let body = r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#;
        let (status, _) = tracker
            .send(reqwest::Method::PUT, &path, Some(ADMIN), Some(body))
            .await;
        assert_eq!(status, 201);
        for seat in ["a", "b", "c"] {
            let path = format!("/v1/entitlements/c-{n}/seats/{seat}");
            tracker
                .send(reqwest::Method::POST, &path, Some(CLIENT), None)
                .await;
        }
    }
}

/// What the consumer should print for `events`: each event once.
fn expected_lines(events: Vec<(String, String, serde_json::Value)>) -> Vec<String> {
    let mut want: Vec<String> = events
        .into_iter()
        .map(|(ty, ent, ev)| format!("{ty} {ent} {}", ev["id"].as_str().expect("id")))
        .collect();
    want.sort();
    want
}

/// The guide's Python consumer reads every bucket's stream of a standalone
/// Redis: every event once, also those it was given before and did not
/// acknowledge; a second run of the same group prints nothing (all
/// acknowledged); another group gets them all again.
#[actix_rt::test]
async fn the_python_consumer_reads_every_buckets_stream() {
    let redis = RedisServer::start();
    let tracker = TrackerProcess::start(&redis.url(), "pyc").await;
    events_in_many_buckets(&tracker).await;
    let want = expected_lines(redis.events("pyc"));
    assert!(want.len() >= 30 * 4, "{} events", want.len());
    // The consumer was given two events of one stream and stopped before
    // acknowledging them: it is given them again.
    let mut conn = redis.conn();
    let keys = keys("pyc");
    let c0 = headroom::domain::EntitlementId::parse("c-0").expect("id");
    let stream = keys.events(keys.bucket_of(&c0));
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", &stream, "billing", "0", "MKSTREAM"])
        .query(&mut conn)
        .expect("XGROUP");
    let given: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            "billing",
            "billing-1",
            "COUNT",
            "2",
            "STREAMS",
            &stream,
            ">",
        ])
        .query(&mut conn)
        .expect("XREADGROUP");
    assert_ne!(given, redis::Value::Nil, "c-0's bucket has events");
    let url = redis.url();
    let env = [
        ("HEADROOM_REDIS_URL", url.as_str()),
        ("HEADROOM_REDIS_PREFIX", "pyc"),
    ];
    assert_eq!(run_consumer(&env), want);
    assert_eq!(run_consumer(&env), Vec::<String>::new(), "acknowledged");
    let other = [&env[..], &[("GROUP", "audit")]].concat();
    assert_eq!(run_consumer(&other), want, "another group");
}

/// The same consumer on a 3-primary Redis Cluster, from its seed nodes.
#[actix_rt::test]
async fn the_python_consumer_reads_every_buckets_stream_on_a_cluster() {
    let c = crate::cluster::cluster();
    let seeds = c.seeds();
    let tracker = TrackerProcess::spawn_env(&[
        ("HEADROOM_REDIS_CLUSTER", &seeds),
        ("HEADROOM_REDIS_PREFIX", "pyc"),
    ]);
    events_in_many_buckets(&tracker).await;
    let want = expected_lines(c.events("pyc"));
    assert!(want.len() >= 30 * 4, "{} events", want.len());
    let env = [
        ("HEADROOM_REDIS_CLUSTER", seeds.as_str()),
        ("HEADROOM_REDIS_PREFIX", "pyc"),
    ];
    assert_eq!(run_consumer(&env), want);
    assert_eq!(run_consumer(&env), Vec::<String>::new(), "acknowledged");
}

/// `BASE`: six free ports from it on, their bus ports too, below 55535.
fn six_free_ports() -> u16 {
    loop {
        let base = headroom_test_support::free_cluster_port();
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if (base..base + 6).all(|p| p < 45_535 && free(p) && free(p + 10_000)) {
            return base;
        }
    }
}

/// Runs the guide's cluster-stop block when dropped, so that the daemons
/// the guide starts do not outlive a failed test.
struct StopCluster<'a>(&'a [(&'a str, &'a str)]);

impl Drop for StopCluster<'_> {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args(["-c", &block("docs/redis.md", "cluster-stop", "sh")])
            .envs(self.0.iter().copied())
            .output();
    }
}

/// The guide's cluster how-to, on free ports: its first block starts a
/// 3+3 cluster, the tracker binary runs with the settings of the second
/// (the ports moved), takes calls, and the third block stops the cluster
/// and removes its data.
#[actix_rt::test]
async fn the_cluster_how_to_works_verbatim_on_free_ports() {
    let base = six_free_ports();
    let data = tempfile::tempdir().expect("tempdir");
    let (base_s, data_s) = (base.to_string(), data.path().join("hr-cluster"));
    let env = [
        ("BASE", base_s.as_str()),
        ("DATA", data_s.to_str().expect("utf-8")),
    ];
    let stop = StopCluster(&env);
    let lines = run_block(&block("docs/redis.md", "cluster-start", "sh"), &env);
    assert_eq!(lines, ["cluster_state:ok"]);

    // The second block's settings, its ports moved to ours.
    let run = block("docs/redis.md", "cluster-run", "sh").replace("\\\n", " ");
    let mut settings: Vec<(String, String)> = Vec::new();
    for word in run.split_whitespace().take_while(|w| *w != "cargo") {
        let (k, v) = word.split_once('=').expect("NAME=value");
        let mut v = v.to_string();
        for i in 0..6u16 {
            v = v.replace(&format!(":{}", 7001 + i), &format!(":{}", base + i));
        }
        settings.push((k.to_string(), v));
    }
    assert!(run.contains("cargo run --release"), "{run}");
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let tracker = TrackerProcess::spawn_env(&settings);
    let (status, body) = tracker
        .send(
            reqwest::Method::PUT,
            "/v1/entitlements/acme",
            Some(ADMIN),
            Some(r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    for (seat, want) in [("a", 200), ("b", 200), ("c", 429)] {
        let path = format!("/v1/entitlements/acme/seats/{seat}");
        let (status, _) = tracker
            .send(reqwest::Method::POST, &path, Some(CLIENT), None)
            .await;
        assert_eq!(status, want, "seat {seat}");
    }
    drop(tracker);
    drop(stop);
    assert!(!data_s.exists(), "the stop block removes the data");
    for p in base..base + 6 {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
            "node {p} stopped"
        );
    }
}
