//! How the command line prints answers for people (`-o table`, the
//! default): aligned columns, one row per item.

use serde_json::Value;

use super::{CliError, Result};
use crate::domain::{DenyReason, EntitlementView, Outcome, SeatDecision, UsageDecision};

/// Prints `rows` under `header`, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A JSON value as a cell: strings bare, `null` as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Granted => "granted",
        Outcome::Overdraft => "overdraft",
        Outcome::Denied => "denied",
    }
}

pub(super) fn entitlement(v: &EntitlementView) {
    let s = &v.seats;
    let since = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or_else(
            || "-".to_string(),
            // As the API writes times (and the report's rows show them).
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    };
    let mut rows = vec![vec![
        "seats".to_string(),
        s.in_use.to_string(),
        s.purchased.to_string(),
        s.hard_cap.to_string(),
        if s.overdraft { "yes" } else { "no" }.to_string(),
        since(s.overdraft_since),
        s.denied_total.to_string(),
    ]];
    for (key, f) in &v.features {
        rows.push(vec![
            key.to_string(),
            f.used.to_string(),
            f.included.to_string(),
            f.hard_cap.to_string(),
            if f.overdraft { "yes" } else { "no" }.to_string(),
            since(f.overdraft_since),
            f.denied_total.to_string(),
        ]);
    }
    println!(
        "{}{}",
        v.id,
        if v.config.disabled { " (disabled)" } else { "" }
    );
    table(
        &[
            "POOL",
            "USED",
            "PURCHASED",
            "HARD CAP",
            "OVERDRAFT",
            "OVERDRAFT SINCE",
            "DENIED",
        ],
        &rows,
    );
}

pub(super) fn entitlement_list(views: &[EntitlementView]) {
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let over: Vec<String> = v
                .features
                .iter()
                .filter(|(_, f)| f.overdraft)
                .map(|(k, _)| k.to_string())
                .chain(v.seats.overdraft.then(|| "seats".to_string()))
                .collect();
            vec![
                v.id.to_string(),
                format!(
                    "{}/{}/{}",
                    v.seats.in_use, v.seats.purchased, v.seats.hard_cap
                ),
                v.features.len().to_string(),
                if over.is_empty() {
                    "-".into()
                } else {
                    over.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "ENTITLEMENT",
            "SEATS (USED/PURCHASED/CAP)",
            "FEATURES",
            "OVERDRAFT",
        ],
        &rows,
    );
}

/// A denial's reason in words, as ` (hard cap)`; nothing for a grant.
fn reason(r: Option<DenyReason>) -> String {
    r.map(|r| format!(" ({})", r.as_str().replace('_', " ")))
        .unwrap_or_default()
}

pub(super) fn seat_decision(d: &SeatDecision) {
    let reason = reason(d.reason);
    println!(
        "{} {}{reason}: {} in use, {} purchased, hard cap {}{}",
        d.seat_id,
        outcome(d.outcome),
        d.in_use,
        d.purchased,
        d.hard_cap,
        if d.refreshed { " (renewed)" } else { "" }
    );
}

pub(super) fn usage_decision(d: &UsageDecision) {
    let reason = reason(d.reason);
    println!(
        "{} +{} {}{reason}: {} used, {} included, hard cap {}",
        d.feature,
        d.amount,
        outcome(d.outcome),
        d.used,
        d.included,
        d.hard_cap
    );
}

pub(super) fn release(v: &Value) {
    let released = v["released"].as_bool().unwrap_or(false);
    println!(
        "{} {}",
        cell(&v["seat_id"]),
        if released {
            "released"
        } else {
            "was not active"
        }
    );
}

pub(super) fn seat_list(v: &Value) {
    let rows: Vec<Vec<String>> = v["seats"]
        .as_array()
        .map(|seats| {
            seats
                .iter()
                .map(|s| {
                    vec![
                        cell(&s["seat_id"]),
                        cell(&s["activated_at"]),
                        cell(&s["lease_expires_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["SEAT", "ACTIVATED", "LEASE EXPIRES"], &rows);
}

/// The report's items: one row per pool (seats or feature) in overdraft
/// or with denials.
fn report_rows(items: &[Value]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for item in items {
        let id = cell(&item["entitlement"]);
        let s = &item["seats"];
        if s["overdraft"] == true || s["denied_period"].as_u64().unwrap_or(0) > 0 {
            rows.push(vec![
                id.clone(),
                "seats".into(),
                cell(&s["in_use"]),
                cell(&s["purchased"]),
                cell(&s["hard_cap"]),
                cell(&s["peak"]),
                cell(&s["overdraft_since"]),
                cell(&s["denied_period"]),
            ]);
        }
        if let Some(features) = item["features"].as_object() {
            for (key, f) in features {
                rows.push(vec![
                    id.clone(),
                    key.clone(),
                    cell(&f["used"]),
                    cell(&f["included"]),
                    cell(&f["hard_cap"]),
                    cell(&f["peak"]),
                    cell(&f["overdraft_since"]),
                    cell(&f["denied_period"]),
                ]);
            }
        }
    }
    rows
}

const REPORT_HEADER: [&str; 8] = [
    "ENTITLEMENT",
    "POOL",
    "USED",
    "PURCHASED",
    "HARD CAP",
    "PEAK",
    "OVERDRAFT SINCE",
    "DENIED",
];

pub(super) fn report(items: &[Value]) {
    table(&REPORT_HEADER, &report_rows(items));
}

pub(super) fn report_csv(items: &[Value]) -> Result<()> {
    let mut w = csv::Writer::from_writer(std::io::stdout());
    let header = REPORT_HEADER.map(|h| h.to_lowercase().replace(' ', "_"));
    let fail = |e: csv::Error| CliError::Other(format!("cannot write CSV: {e}"));
    w.write_record(&header).map_err(fail)?;
    for row in report_rows(items) {
        w.write_record(&row).map_err(fail)?;
    }
    w.flush()
        .map_err(|e| CliError::Other(format!("cannot write CSV: {e}")))
}

pub(super) fn history(v: &Value) {
    let buckets = v["buckets"].as_array().cloned().unwrap_or_default();
    let mut features: Vec<String> = buckets
        .iter()
        .filter_map(|b| b["features"].as_object())
        .flat_map(|f| f.keys().cloned())
        .collect();
    features.sort();
    features.dedup();
    let mut header: Vec<String> = vec!["START".into(), "SEATS PEAK".into(), "SEATS DENIED".into()];
    for f in &features {
        header.push(format!("{f} ADDED"));
        header.push(format!("{f} DENIED"));
    }
    let rows: Vec<Vec<String>> = buckets
        .iter()
        .map(|b| {
            let mut row = vec![
                cell(&b["start"]),
                cell(&b["seats"]["peak"]),
                cell(&b["seats"]["denied"]),
            ];
            for f in &features {
                let fb = &b["features"][f];
                let n = |k: &str| fb[k].as_u64().unwrap_or(0).to_string();
                row.push(n("added"));
                row.push(n("denied"));
            }
            row
        })
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header, &rows);
}

pub(super) fn periods(v: &Value) {
    let rows: Vec<Vec<String>> = v["periods"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    [
                        "feature",
                        "period_start",
                        "period_end",
                        "used",
                        "included",
                        "overage",
                        "denied",
                    ]
                    .iter()
                    .map(|k| cell(&p[*k]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "FEATURE", "START", "END", "USED", "INCLUDED", "OVERAGE", "DENIED",
        ],
        &rows,
    );
}

pub(super) fn webhook_created(v: &Value) {
    println!("{} registered for {}", cell(&v["id"]), cell(&v["url"]));
    println!(
        "secret (shown only now): {}",
        v["secret"].as_str().unwrap_or("-")
    );
}

pub(super) fn webhook_list(v: &Value) {
    let rows: Vec<Vec<String>> = v["webhooks"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let types: Vec<String> = w["types"]
                        .as_array()
                        .map(|t| t.iter().map(cell).collect())
                        .unwrap_or_default();
                    vec![
                        cell(&w["id"]),
                        cell(&w["url"]),
                        types.join(","),
                        cell(&w["created_at"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["WEBHOOK", "URL", "TYPES", "CREATED"], &rows);
}

pub(super) fn deliveries(v: &Value) {
    let rows: Vec<Vec<String>> = v["deliveries"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| {
                    [
                        "at", "type", "event_id", "attempt", "outcome", "status", "error",
                    ]
                    .iter()
                    .map(|k| cell(&d[*k]))
                    .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "AT", "TYPE", "EVENT", "ATTEMPT", "OUTCOME", "STATUS", "ERROR",
        ],
        &rows,
    );
}

pub(super) fn event(e: &Value) {
    println!(
        "{}  {:<24}  {:<20}  {}",
        cell(&e["time"]),
        cell(&e["type"]),
        cell(&e["subject"]),
        e["data"]
    );
}
