//! Starting the tracker binary as an operator would: a bad setting or a
//! port in use is one line naming the setting, nothing else; good settings
//! start it and print a first call to try.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// The binary with only `env` (and `PATH`): nothing from this process's
/// environment leaks in. Backtraces are asked for, to show there are none.
fn headroom(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_headroom"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// Everything it printed, stdout and stderr, as non-empty lines.
fn lines(out: &Output) -> Vec<String> {
    [&out.stdout, &out.stderr]
        .iter()
        .flat_map(|b| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Runs a start that must fail; answers its one line and exit code.
fn refused(args: &[&str], env: &[(&str, &str)]) -> (String, i32) {
    let out = headroom(args, env).output().expect("run headroom");
    let lines = lines(&out);
    assert!(!out.status.success(), "started with {args:?} {env:?}");
    assert_eq!(lines.len(), 1, "one line, got:\n{}", lines.join("\n"));
    (lines[0].clone(), out.status.code().unwrap_or(-1))
}

#[test]
fn a_port_in_use_is_one_line_naming_the_setting_and_no_token_is_printed() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (line, code) = refused(&[], &[("HEADROOM_LISTEN", &addr)]);
    assert_eq!(code, 1);
    for part in ["--listen", "HEADROOM_LISTEN", addr.as_str(), "in use"] {
        assert!(line.contains(part), "`{part}` missing from: {line}");
    }
}

/// The key layout is recorded at first start; a process with another
/// bucket count, or data in the layout before buckets, is refused with one
/// line saying what to do, and nothing is written.
#[test]
fn another_bucket_count_or_the_old_layout_is_refused_in_one_line() {
    let redis = RedisServer::start();
    let url = redis.url();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let env = |buckets: &'static str, prefix: &'static str| {
        [
            ("HEADROOM_LISTEN", listen.clone()),
            ("HEADROOM_REDIS_URL", url.clone()),
            ("HEADROOM_REDIS_PREFIX", prefix.to_string()),
            ("HEADROOM_REDIS_BUCKETS", buckets.to_string()),
            ("HEADROOM_NO_AUTH", "true".to_string()),
        ]
    };
    let run = |e: [(&'static str, String); 5]| {
        let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        refused(&[], &pairs)
    };
    // The first start records 16 buckets.
    let first = env("16", "lay");
    let pairs: Vec<(&str, &str)> = first.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (up, _) = serve_briefly(headroom(&[], &pairs), port.parse().expect("port"));
    assert!(up, "the first start serves");
    let mut c = redis.conn();
    let recorded: Option<String> = redis::cmd("HGET")
        .arg("lay:meta")
        .arg("buckets")
        .query(&mut c)
        .expect("HGET");
    assert_eq!(recorded.as_deref(), Some("16"));

    let (line, code) = run(env("32", "lay"));
    assert_eq!(code, 1);
    for part in ["16 buckets", "uses 32", "HEADROOM_REDIS_BUCKETS", "`lay`"] {
        assert!(line.contains(part), "`{part}` missing from: {line}");
    }

    // Data written before buckets existed.
    redis::cmd("XADD")
        .arg("old:events")
        .arg("*")
        .arg("type")
        .arg("seat.denied")
        .query::<String>(&mut c)
        .expect("XADD");
    let (line, code) = run(env("64", "old"));
    assert_eq!(code, 1);
    for part in [
        "layout before buckets",
        "old:events",
        "HEADROOM_REDIS_PREFIX",
    ] {
        assert!(line.contains(part), "`{part}` missing from: {line}");
    }
    let meta: bool = redis::cmd("EXISTS")
        .arg("old:meta")
        .query(&mut c)
        .expect("EXISTS");
    assert!(!meta, "nothing recorded over the old layout");
}

#[test]
fn bad_settings_are_one_line_each_naming_flag_variable_and_value() {
    for (args, env, names, value) in [
        (
            vec!["--redis-timeout", "0s"],
            vec![],
            ["--redis-timeout", "HEADROOM_REDIS_TIMEOUT"],
            "0s",
        ),
        (
            vec![],
            vec![("HEADROOM_WORKERS", "0")],
            ["--workers", "HEADROOM_WORKERS"],
            "0",
        ),
        (
            vec!["--redis-url", "http://127.0.0.1:6379"],
            vec![],
            ["--redis-url", "HEADROOM_REDIS_URL"],
            "http://127.0.0.1:6379",
        ),
        (
            vec![],
            vec![("HEADROOM_REDIS_CLUSTER", "redis://127.0.0.1:7001,http://x")],
            ["--redis-cluster", "HEADROOM_REDIS_CLUSTER"],
            "http://x",
        ),
        (
            vec!["--redis-cluster", "redis://127.0.0.1:7001"],
            vec![("HEADROOM_REDIS_URL", "redis://127.0.0.1:6379/")],
            ["--redis-url", "--redis-cluster"],
            "cannot be used with",
        ),
        (
            vec!["--redis-buckets", "2000"],
            vec![],
            ["--redis-buckets", "HEADROOM_REDIS_BUCKETS"],
            "2000",
        ),
        (
            vec!["--listen", "no-such-host.invalid:80"],
            vec![],
            ["--listen", "HEADROOM_LISTEN"],
            "no-such-host.invalid:80",
        ),
        (
            vec![],
            vec![("HEADROOM_CLUSTER_SECRET", "short")],
            ["--cluster-secret", "HEADROOM_CLUSTER_SECRET"],
            "16 characters",
        ),
        (
            vec![],
            vec![("HEADROOM_CLUSTER_SECRET", "0123456789abcdef0123")],
            ["--cluster-secret", "--redis-url"],
            "no Redis",
        ),
        (
            vec![
                "--listen",
                "0.0.0.0:0",
                "--redis-url",
                "redis://127.0.0.1:1/",
            ],
            vec![("HEADROOM_CLUSTER_SECRET", "0123456789abcdef0123")],
            ["--listen", "HEADROOM_ADVERTISE"],
            "0.0.0.0:0",
        ),
        (
            vec![],
            vec![("HEADROOM_PORTAL_SECRETS", "0123456789abcdef0123,short")],
            ["--portal-secrets", "HEADROOM_PORTAL_SECRETS"],
            "16 characters",
        ),
        (
            vec!["--public-url", "ftp://licences.example.com"],
            vec![],
            ["--public-url", "HEADROOM_PUBLIC_URL"],
            "https://",
        ),
        (
            vec!["--login-rate", "0"],
            vec![],
            ["--login-rate", "HEADROOM_LOGIN_RATE"],
            "0",
        ),
        (
            vec!["--advertise", "node-1"],
            vec![],
            ["--advertise", "HEADROOM_ADVERTISE"],
            "node-1",
        ),
        (
            vec!["--webhook-backoff", "10s", "--webhook-backoff-max", "1s"],
            vec![],
            ["--webhook-backoff-max", "--webhook-backoff"],
            "1s",
        ),
    ] {
        let (line, code) = refused(&args, &env);
        assert_eq!(code, 2, "{line}");
        for part in names.iter().chain([&value]) {
            assert!(line.contains(part), "`{part}` missing from: {line}");
        }
        assert!(!line.contains("backtrace"), "{line}");
    }
}

#[test]
fn a_redis_password_or_a_secret_never_appears_in_an_error() {
    let (line, _) = refused(&["--redis-url", "redis://:s3cret@127.0.0.1:notaport/"], &[]);
    assert!(line.contains("--redis-url"), "{line}");
    assert!(!line.contains("s3cret"), "password shown: {line}");
    let (line, _) = refused(&[], &[("HEADROOM_CLUSTER_SECRET", "tooshort")]);
    assert!(line.contains("--cluster-secret"), "{line}");
    assert!(!line.contains("tooshort"), "secret shown: {line}");
    let (line, _) = refused(
        &[],
        &[("HEADROOM_PORTAL_SECRETS", "a-long-enough-key-1,tooshort")],
    );
    assert!(line.contains("--portal-secrets"), "{line}");
    assert!(
        !line.contains("tooshort") && !line.contains("a-long-enough"),
        "secret shown: {line}"
    );
}

/// Waits until `/healthz` answers on `addr`.
fn healthy(addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let req = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
            let mut answer = String::new();
            if s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut answer).is_ok()
                && answer.starts_with("HTTP/1.1 200")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts `cmd` (listening on 127.0.0.1:`port`), waits until it serves,
/// stops it; answers whether it served, and everything it printed.
fn serve_briefly(mut cmd: Command, port: u16) -> (bool, Output) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let up = healthy(&format!("127.0.0.1:{port}"));
    let _ = child.kill();
    (up, child.wait_with_output().expect("output"))
}

#[test]
fn a_host_name_is_accepted_and_a_first_call_is_printed_with_the_generated_tokens() {
    let port = free_port();
    let mut cmd = headroom(&[], &[("HEADROOM_LISTEN", &format!("localhost:{port}"))]);
    cmd.env("RUST_LOG", "warn");
    let (up, out) = serve_briefly(cmd, port);
    assert!(up, "did not serve on localhost:{port}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{stdout}"))
    };
    let admin = token("generated admin token (shown once): ");
    let client = token("generated client token (shown once): ");
    let next = token("try it: ");
    assert!(next.contains(&admin) && next.contains(&client), "{next}");
    assert!(
        next.contains(&format!(":{port}/v1/entitlements/")),
        "{next}"
    );
    let cli = token("or the command line: ");
    let base = next
        .split_whitespace()
        .find_map(|w| w.strip_suffix("/v1/entitlements/demo"))
        .expect("the first call's address");
    let program = env!("CARGO_BIN_EXE_headroom");
    assert!(
        cli.starts_with(&format!(
            "HEADROOM_URL={base} HEADROOM_TOKEN={admin} {program} entitlements list"
        )),
        "{cli}"
    );
    let docs = token("the API in a browser: ");
    assert_eq!(docs, format!("{base}/docs/"));
}

#[test]
fn a_token_that_is_both_admin_and_client_is_warned_about() {
    let port = free_port();
    let cmd = headroom(
        &[],
        &[
            ("HEADROOM_LISTEN", &format!("127.0.0.1:{port}")),
            ("HEADROOM_ADMIN_TOKENS", "same-token"),
            ("HEADROOM_CLIENT_TOKENS", "same-token,other"),
            ("RUST_LOG", "warn"),
        ],
    );
    let (up, out) = serve_briefly(cmd, port);
    assert!(up);
    let all = lines(&out).join("\n");
    assert!(
        all.contains("both --admin-tokens and --client-tokens"),
        "{all}"
    );
    assert!(!all.contains("same-token"), "a token was printed: {all}");
}

/// Written to a file (here a pipe), the log has no colour codes, and the
/// HTTP framework's start-up chatter stays below the default level.
#[test]
fn logs_to_a_file_are_plain_and_quiet() {
    let port = free_port();
    let cmd = headroom(&[], &[("HEADROOM_LISTEN", &format!("127.0.0.1:{port}"))]);
    let (up, out) = serve_briefly(cmd, port);
    assert!(up);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("headroom is listening"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a file: {log:?}");
    assert!(
        !log.contains("actix_server"),
        "framework chatter at info: {log}"
    );
}

/// Redis going away and coming back is logged as it changes: once
/// unreachable (naming host and port), once reachable again, not once per
/// failed call.
#[actix_rt::test]
async fn redis_outages_are_logged_once_as_state_changes() {
    let mut redis = RedisServer::start();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = headroom(
        &[],
        &[
            ("HEADROOM_LISTEN", &format!("127.0.0.1:{port}")),
            ("HEADROOM_REDIS_URL", &redis.url()),
            ("HEADROOM_REDIS_TIMEOUT", "300ms"),
            ("HEADROOM_ADMIN_TOKENS", ADMIN),
            ("HEADROOM_CLIENT_TOKENS", CLIENT),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start");
    assert!(healthy(&format!("127.0.0.1:{port}")));
    let http = http_client();
    let put = |id: String| {
        http.put(format!("{base}/v1/entitlements/{id}"))
            .bearer_auth(ADMIN)
            .body(r#"{"seats": {"purchased": 1}}"#)
            .send()
    };
    assert_eq!(put("before".into()).await.expect("put").status(), 201);
    redis.kill();
    for i in 0..40 {
        let res = put(format!("down-{i}")).await.expect("answer");
        assert_eq!(res.status().as_u16(), 503);
    }
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while put("after".into())
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 201
    {
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&out.stderr);
    let count = |s: &str| log.lines().filter(|l| l.contains(s)).count();
    assert_eq!(count("Redis is unreachable"), 1, "{log}");
    assert_eq!(count("Redis is reachable again"), 1, "{log}");
    let at = format!("127.0.0.1:{}", redis.port);
    assert!(
        log.lines()
            .any(|l| l.contains("Redis is unreachable") && l.contains(&at)),
        "{log}"
    );
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 3, "{warnings} warnings for one outage:\n{log}");
}

/// On a terminal the log is coloured, unless `NO_COLOR` is set (the
/// terminal is a pseudo-terminal made by `script`, from util-linux).
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let on_a_terminal = |no_color: bool| {
        let port = free_port();
        // Started, then stopped by Ctrl-C after a second.
        let cmd = format!(
            "timeout -s INT 1 {} --listen 127.0.0.1:{port} --admin-tokens a --client-tokens c",
            env!("CARGO_BIN_EXE_headroom")
        );
        let mut script = Command::new("script");
        script
            .args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TERM", "xterm");
        if no_color {
            script.env("NO_COLOR", "1");
        }
        let out = script.output().expect("script (util-linux) runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let coloured = on_a_terminal(false);
    assert!(coloured.contains("headroom is listening"), "{coloured}");
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(true);
    assert!(plain.contains("headroom is listening"), "{plain}");
    assert!(
        !plain.contains("\u{1b}["),
        "colour with NO_COLOR: {plain:?}"
    );
}
