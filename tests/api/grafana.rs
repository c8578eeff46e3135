//! The dashboards and alerts run against a real Prometheus scraping a real
//! tracker every second: every panel query and every alert expression must
//! evaluate, and return series.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

const GRAFANA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana");

fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("{GRAFANA}/dashboards")).expect("grafana/dashboards") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read");
            assert!(
                !text.contains("${DS_"),
                "{}: use the datasource variable, not ${{DS_…}} inputs",
                path.display()
            );
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.display().to_string(), json));
        }
    }
    assert!(!out.is_empty(), "no dashboards");
    out
}

/// Every query of every panel, with the dashboard it is in.
fn panel_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (file, dash) in dashboards() {
        for panel in dash["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((format!("{file}: {}", panel["title"]), expr.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn dashboards_follow_the_lint_rules() {
    for (file, dash) in dashboards() {
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{file}: a `datasource` variable"
        );
        for panel in dash["panels"].as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                continue;
            }
            let title = &panel["title"];
            let unit = panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .unwrap_or_default();
            assert!(!unit.is_empty(), "{file}: panel {title} has no unit");
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{file}: panel {title}"
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    target["datasource"]["uid"], "${datasource}",
                    "{file}: panel {title}"
                );
                let expr = target["expr"].as_str().unwrap_or_default();
                for f in ["rate(", "irate(", "increase("] {
                    for (i, _) in expr.match_indices(f) {
                        let window = expr[i..].split(']').next().unwrap_or_default();
                        assert!(
                            window.ends_with("[$__rate_interval"),
                            "{file}: panel {title}: {f} without $__rate_interval"
                        );
                    }
                }
            }
        }
    }
}

struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[String]) -> Self {
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {GRAFANA}/prometheus/alerts.yml\n\
             scrape_configs:\n  - job_name: headroom\n    static_configs:\n      - targets: [{targets}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write config");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus must be on the PATH (apt-get install prometheus)");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn query(&self, http: &reqwest::Client, expr: &str) -> Value {
        let res = http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await;
        match res {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seat and usage calls that produce granted, overdraft and denied
/// decisions and events, for `for_how_long`, sent round robin over `bases`
/// (nodes: so that some are sent on to the owner).
async fn scripted_load(bases: &[String], for_how_long: Duration) {
    let http = http_client();
    let turn = std::cell::Cell::new(0);
    let call =
        |m: reqwest::Method, path: String, token: &'static str, body: Option<&'static str>| {
            let base = &bases[turn.get() % bases.len()];
            turn.set(turn.get() + 1);
            let mut req = http.request(m, format!("{base}{path}")).bearer_auth(token);
            if let Some(b) = body {
                req = req.body(b);
            }
            req.send()
        };
    let put = call(
        reqwest::Method::PUT,
        "/v1/entitlements/acme".into(),
        ADMIN,
        Some(
            r#"{"seats": {"purchased": 2, "hard_cap": 3}, "features": {"api": {"included": 1000000, "hard_cap": 1200000, "thresholds": [50]}}}"#,
        ),
    );
    assert_eq!(put.await.expect("put").status().as_u16(), 201);
    let started = Instant::now();
    while started.elapsed() < for_how_long {
        for seat in ["a", "b", "c", "d"] {
            let _ = call(
                reqwest::Method::POST,
                format!("/v1/entitlements/acme/seats/{seat}"),
                CLIENT,
                None,
            )
            .await;
        }
        for seat in ["c", "d"] {
            let _ = call(
                reqwest::Method::DELETE,
                format!("/v1/entitlements/acme/seats/{seat}"),
                CLIENT,
                None,
            )
            .await;
        }
        let _ = call(
            reqwest::Method::POST,
            "/v1/entitlements/acme/usage".into(),
            CLIENT,
            Some(r#"{"feature": "api", "amount": 100000}"#),
        )
        .await;
        let _ = call(
            reqwest::Method::POST,
            "/v1/entitlements/acme/usage".into(),
            CLIENT,
            Some(r#"{"feature": "api", "amount": 1}"#),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn series(answer: &Value) -> usize {
    answer["data"]["result"].as_array().map_or(0, Vec::len)
}

#[actix_rt::test]
async fn every_panel_and_alert_expression_returns_data_from_a_real_prometheus() {
    let redis = RedisServer::start();
    // Two nodes, so that the nodes row has calls sent on between them.
    let nodes = [("HEADROOM_CLUSTER_SECRET", "grafana-cluster-secret-0123")];
    let tracker = TrackerProcess::start_with(&redis.url(), "grafana", &nodes).await;
    let other = TrackerProcess::start_with(&redis.url(), "grafana", &nodes).await;
    let bases = [tracker.base.clone(), other.base.clone()];
    let targets: Vec<String> = bases
        .iter()
        .map(|b| b.trim_start_matches("http://").to_string())
        .collect();
    let prometheus = Prometheus::start(&targets);
    let http = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{}/-/ready", prometheus.base))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "prometheus did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A webhook endpoint, so that the webhook panels have deliveries.
    let receiver = crate::webhooks::Receiver::new(200);
    receiver.listen();
    let registered = http
        .post(format!("{}/v1/webhooks", tracker.base))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({ "url": receiver.url(), "types": ["seat.*"] }))
        .send()
        .await
        .expect("register webhook");
    assert_eq!(registered.status().as_u16(), 201);
    // Both nodes see each other before the load.
    let deadline = Instant::now() + Duration::from_secs(10);
    for base in &bases {
        loop {
            let view: Value = http
                .get(format!("{base}/v1/cluster"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("cluster")
                .json()
                .await
                .unwrap_or(Value::Null);
            if view["members"].as_array().map(Vec::len) == Some(2) {
                break;
            }
            assert!(Instant::now() < deadline, "two members: {view}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    scripted_load(&bases, Duration::from_secs(8)).await;
    assert!(
        !receiver.got().is_empty(),
        "webhook deliveries during the load"
    );

    // Panels: as Grafana would send them, with $__rate_interval for a 1 s scrape.
    let mut failures = Vec::new();
    for (panel, expr) in panel_queries() {
        let q = expr
            .replace("$__rate_interval", "10s")
            .replace("$entitlement", "acme");
        let mut answer = prometheus.query(&http, &q).await;
        let until = Instant::now() + Duration::from_secs(10);
        while answer["status"] == "success" && series(&answer) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            answer = prometheus.query(&http, &q).await;
        }
        if answer["status"] != "success" || series(&answer) == 0 {
            failures.push(format!("{panel}: {q} -> {answer}"));
        }
    }

    // The per-entitlement dashboard's variable lists the watched entitlement.
    let values: Value = http
        .get(format!(
            "{}/api/v1/label/entitlement/values",
            prometheus.base
        ))
        .query(&[("match[]", "headroom_watched_seats_in_use")])
        .send()
        .await
        .expect("label values")
        .json()
        .await
        .unwrap_or(Value::Null);
    if !values["data"]
        .as_array()
        .is_some_and(|v| v.iter().any(|x| x == "acme"))
    {
        failures.push(format!("entitlement variable: {values}"));
    }

    // Alerts: Prometheus evaluated each rule without error, and what each
    // compares against its threshold returns series.
    let rules = http
        .get(format!("{}/api/v1/rules", prometheus.base))
        .send()
        .await
        .expect("rules")
        .json::<Value>()
        .await
        .unwrap_or(Value::Null);
    let rules: Vec<Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(rules.len(), 5, "every alert rule is loaded");
    for rule in &rules {
        let name = &rule["name"];
        if rule["health"] != "ok" {
            failures.push(format!(
                "alert {name}: health {} {}",
                rule["health"], rule["lastError"]
            ));
        }
        let expr = rule["query"].as_str().unwrap_or_default();
        let measured = expr.rsplit_once(" > ").map_or(expr, |(lhs, _)| lhs);
        let answer = prometheus.query(&http, measured).await;
        if answer["status"] != "success" || series(&answer) == 0 {
            failures.push(format!("alert {name}: {measured} -> {answer}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
