//! Operations: generated tokens, `--no-auth`, metrics.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

#[actix_rt::test]
async fn tokens_are_generated_and_printed_once_when_none_are_configured() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .env_clear()
        .env("HEADROOM_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start headroom");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut token = |prefix: &str| {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(line.starts_with(prefix), "{line}");
        line.rsplit(' ').next().unwrap_or_default().to_string()
    };
    let admin = token("generated admin token");
    let client = token("generated client token");
    let http = http_client();
    let base = format!("http://127.0.0.1:{port}");
    let mut status = 0;
    for _ in 0..100 {
        if let Ok(r) = http
            .put(format!("{base}/v1/entitlements/acme"))
            .bearer_auth(&admin)
            .body(r#"{"seats": {"purchased": 1}}"#)
            .send()
            .await
        {
            status = r.status().as_u16();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 201);
    let r = http
        .post(format!("{base}/v1/entitlements/acme/seats/a"))
        .bearer_auth(&client)
        .send()
        .await
        .expect("activate");
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .get(format!("{base}/v1/entitlements/acme"))
        .bearer_auth(&client)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 403);
    let _ = child.kill();
    let _ = child.wait();
}

#[actix_rt::test]
async fn no_auth_accepts_calls_without_a_token() {
    let opts = AppOptions {
        auth: headroom::http::AuthSettings {
            no_auth: true,
            ..tokens(&[], &[])
        },
        ..AppOptions::default()
    };
    let app = TestApp::spawn_with(memory_store(), opts).await;
    let (s, _) = app
        .send(
            reqwest::Method::PUT,
            "/v1/entitlements/acme",
            None,
            Some(r#"{"seats": {"purchased": 1}}"#),
        )
        .await;
    assert_eq!(s, 201);
    let (s, _) = app
        .send(
            reqwest::Method::POST,
            "/v1/entitlements/acme/seats/a",
            None,
            None,
        )
        .await;
    assert_eq!(s, 200);
    app.stop().await;
}

#[actix_rt::test]
async fn metrics_export_the_core_series_with_bounded_labels() {
    let redis = RedisServer::start();
    let app = TestApp::spawn(redis_store(&redis, "metrics")).await;
    app.put("acme", r#"{"seats": {"purchased": 1, "hard_cap": 2}}"#)
        .await;
    for s in ["a", "b", "c"] {
        app.activate("acme", s).await;
    }
    let text = app.scrape().await;
    for series in [
        r#"headroom_decisions_total{operation="activate",outcome="granted"}"#,
        r#"headroom_decisions_total{operation="activate",outcome="overdraft"}"#,
        r#"headroom_decisions_total{operation="activate",outcome="denied"}"#,
        r#"headroom_events_published_total{type="seat.overdraft_entered"}"#,
        "headroom_http_request_duration_seconds_bucket",
        r#"route="/v1/entitlements/{id}/seats/{seat_id}""#,
        "headroom_store_write_duration_seconds_bucket",
        "headroom_store_batch_size_bucket",
        "headroom_entitlement_actors",
        "headroom_entitlements_in_memory",
        "headroom_entitlements_in_overdraft",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    let denials = text
        .lines()
        .find(|l| {
            l.starts_with(r#"headroom_denials_total{operation="activate",reason="hard_cap"}"#)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(denials >= 1.0, "the denial is counted by reason");
    for forbidden in ["acme", "seat_id=\""] {
        assert!(
            !text.contains(forbidden),
            "unbounded label value {forbidden} in /metrics"
        );
    }
    // Only watched entitlements (none in this app; another test's) carry an id.
    for (i, _) in text.match_indices("entitlement=\"") {
        let value = text[i + 13..].split('"').next().unwrap_or_default();
        assert_eq!(
            value, "watched-1",
            "an unwatched entitlement id in /metrics"
        );
    }
    app.stop().await;
}

/// `name{k="v",...} value` → (name, labels).
fn parse_series(line: &str) -> Option<(String, Vec<(String, String)>)> {
    let (series, _value) = line.rsplit_once(' ')?;
    let Some(open) = series.find('{') else {
        return Some((series.to_string(), Vec::new()));
    };
    let name = series[..open].to_string();
    let body = series[open + 1..].strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let end = after.find('"')?;
        labels.push((
            key.trim_start_matches(',').to_string(),
            after[..end].to_string(),
        ));
        rest = &after[end + 1..];
    }
    Some((name, labels))
}

#[actix_rt::test]
async fn metrics_md_and_the_exported_series_match_the_catalogue() {
    use headroom::telemetry::{METRICS, MetricKind, metrics_markdown};

    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/METRICS.md"))
        .unwrap_or_default();
    assert_eq!(
        committed,
        metrics_markdown(),
        "run `cargo run --example metrics_md > METRICS.md`"
    );

    let redis = RedisServer::start();
    let opts = AppOptions {
        engine: headroom::engine::EngineSettings {
            watched: headroom::engine::Watched::parse("watched-1").unwrap(),
            ..headroom::engine::EngineSettings::default()
        },
        ..AppOptions::default()
    };
    let hooks = headroom::webhooks::Webhooks::new(
        &redis.url(),
        keys("catalogue"),
        std::time::Duration::from_secs(2),
    )
    .expect("webhooks");
    let opts = AppOptions {
        webhooks: Some(hooks.clone()),
        ..opts
    };
    let app = TestApp::spawn_with(redis_store(&redis, "catalogue"), opts).await;
    // A webhook delivery, so that the webhook series exist too.
    let dispatcher = headroom::webhooks::Dispatcher::start(
        hooks,
        headroom::webhooks::WebhookSettings {
            consumer: Some("catalogue".into()),
            ..Default::default()
        },
    )
    .expect("dispatcher");
    let receiver = crate::webhooks::Receiver::new(200);
    receiver.listen();
    let (status, _) = app
        .send(
            reqwest::Method::POST,
            "/v1/webhooks",
            Some(ADMIN),
            Some(&serde_json::json!({ "url": receiver.url() }).to_string()),
        )
        .await;
    assert_eq!(status, 201);
    app.put(
        "watched-1",
        r#"{"seats": {"purchased": 1, "hard_cap": 2}, "features": {"f": {"included": 1}}}"#,
    )
    .await;
    for s in ["a", "b", "c"] {
        app.activate("watched-1", s).await;
    }
    app.usage("watched-1", r#"{"feature": "f", "amount": 2}"#)
        .await;
    app.send(
        reqwest::Method::from_bytes(b"FROBNICATE").unwrap_or(reqwest::Method::GET),
        "/v1/usage/batch",
        None,
        None,
    )
    .await;
    assert!(
        !receiver.wait_for(1, 20).await.is_empty(),
        "a webhook delivery"
    );
    // The dispatcher's gauges are set about once a second.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let text = app.scrape().await;
    dispatcher.stop().await;
    receiver.stop().await;

    let mut exported = std::collections::HashSet::new();
    for line in text.lines().filter(|l| l.starts_with("headroom_")) {
        let (name, labels) = parse_series(line).unwrap_or_else(|| panic!("unparsable: {line}"));
        let family = METRICS
            .iter()
            .find(|m| {
                name == m.name
                    || (m.kind == MetricKind::Histogram
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name == format!("{}{s}", m.name)))
            })
            .unwrap_or_else(|| panic!("{name} is exported but not in the catalogue"));
        exported.insert(family.name);
        for (key, value) in labels {
            if key == "le" {
                continue;
            }
            let label = family
                .labels
                .iter()
                .find(|l| l.name == key)
                .unwrap_or_else(|| panic!("{name}: label {key} is not in the catalogue"));
            if label.values.is_empty() {
                // Bounded by configuration: the watched entitlements of the
                // apps in this test binary, and their features.
                assert!(
                    ["watched-1", "f"].contains(&value.as_str()),
                    "{name}: {key}=\"{value}\" is not configured"
                );
            } else {
                assert!(
                    label.values.contains(&value.as_str()),
                    "{name}: {key}=\"{value}\" is not in its bounded set"
                );
            }
        }
    }
    // Exported only by a node among several: `nodes.rs` checks them.
    let among_several = [
        "headroom_cluster_members",
        "headroom_forwards_total",
        "headroom_forward_duration_seconds",
        "headroom_forward_batch_size",
    ];
    for m in METRICS.iter().filter(|m| !among_several.contains(&m.name)) {
        assert!(
            exported.contains(m.name),
            "{} is in the catalogue but not exported",
            m.name
        );
    }
    app.stop().await;
}

#[actix_rt::test]
async fn promtool_check_metrics_is_clean() {
    let app = TestApp::spawn(memory_store()).await;
    app.put("acme", r#"{"seats": {"purchased": 1}}"#).await;
    app.activate("acme", "a").await;
    app.activate("acme", "b").await;
    let text = app.scrape().await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be on the PATH (apt-get install prometheus)");
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/prometheus"))
        .output()
        .expect("promtool must be on the PATH (apt-get install prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_name_only_catalogued_metrics() {
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok, "{out}");
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/grafana/prometheus/alerts.yml"
    ))
    .expect("alerts.yml");
    let names: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("headroom_"))
        .collect();
    assert!(!names.is_empty());
    for name in names {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            headroom::telemetry::METRICS
                .iter()
                .any(|m| m.name == base || m.name == name),
            "alerts.yml uses {name}, which headroom does not export"
        );
    }
}

/// With scrape tokens configured, `/metrics` answers only to them and to
/// admin tokens.
#[actix_rt::test]
async fn metrics_can_be_protected_with_scrape_tokens() {
    let app = TestApp::spawn_with(
        memory_store(),
        AppOptions {
            auth: headroom::http::AuthSettings {
                metrics_tokens: Some("scrape-me".into()),
                ..tokens(&[ADMIN], &[CLIENT])
            },
            ..AppOptions::default()
        },
    )
    .await;
    let status = |token: Option<&'static str>| {
        let app = &app;
        async move {
            app.send(reqwest::Method::GET, "/metrics", token, None)
                .await
                .0
        }
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("wrong")).await, 401);
    assert_eq!(status(Some(CLIENT)).await, 403);
    assert_eq!(status(Some("scrape-me")).await, 200);
    assert_eq!(status(Some(ADMIN)).await, 200);
    app.stop().await;
}

/// `rediss://` with a password: the tracker talks TLS to a redis-server
/// that requires it (and a password), trusts the CA named by
/// `SSL_CERT_FILE`, and never writes the password to its logs, even at
/// debug level.
#[actix_rt::test]
async fn redis_over_tls_with_a_password_works_and_the_password_is_never_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl must be on the PATH (apt-get install openssl)")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=headroom-test-ca",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);

    let password = "tls-test-pw-7f3a";
    let port = free_port();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "redis.crt",
            "--tls-key-file",
            "redis.key",
        ])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--requirepass", password, "--save", ""])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let listen = free_port();
    let log = std::fs::File::create(d.join("headroom.log")).expect("log");
    let mut tracker = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .env("SSL_CERT_FILE", d.join("ca.crt"))
        .env("HEADROOM_LISTEN", format!("127.0.0.1:{listen}"))
        .env(
            "HEADROOM_REDIS_URL",
            format!("rediss://:{password}@127.0.0.1:{port}/"),
        )
        .env("HEADROOM_ADMIN_TOKENS", ADMIN)
        .env("HEADROOM_CLIENT_TOKENS", CLIENT)
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("headroom");
    let http = http_client();
    let base = format!("http://127.0.0.1:{listen}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created = http
        .put(format!("{base}/v1/entitlements/acme"))
        .bearer_auth(ADMIN)
        .body(r#"{"features": {"api": {"included": 10}}}"#)
        .send()
        .await
        .map(|r| r.status().as_u16());
    let used = http
        .post(format!("{base}/v1/entitlements/acme/usage"))
        .bearer_auth(CLIENT)
        .body(r#"{"feature": "api", "amount": 3}"#)
        .send()
        .await
        .map(|r| r.status().as_u16());
    let _ = tracker.kill();
    let _ = tracker.wait();
    let _ = redis.kill();
    let _ = redis.wait();
    let logs = std::fs::read_to_string(d.join("headroom.log")).unwrap_or_default();
    assert!(ready, "ready over TLS: {logs}");
    assert_eq!(created.ok(), Some(201), "{logs}");
    assert_eq!(used.ok(), Some(200), "{logs}");
    assert!(!logs.is_empty(), "debug logs were written");
    assert!(!logs.contains(password), "the password is in the logs");
}

/// Times the tracker answers have the precision the store keeps (ms), so
/// they read the same before and after a restart.
#[actix_rt::test]
async fn times_are_answered_to_the_millisecond() {
    let app = TestApp::spawn(memory_store()).await;
    let (_, view) = app.put("acme", r#"{"seats": {"purchased": 1}}"#).await;
    for field in ["created_at", "updated_at"] {
        let t = view[field].as_str().unwrap_or_default();
        let fraction = t
            .split_once('.')
            .map_or("", |(_, f)| f.trim_end_matches('Z'));
        assert!(fraction.len() <= 3, "{field} = {t}");
    }
    app.stop().await;
}
