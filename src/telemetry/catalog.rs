//! The catalogue: every metric headroom exports, its type, help and the
//! bounded values of each label, described to the recorder at start.

use crate::domain::EVENT_KINDS;

/// What a metric is, in the one place every metric is described.
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
    /// Labels and their bounded value sets.
    pub labels: &'static [LabelDef],
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

pub struct LabelDef {
    pub name: &'static str,
    /// Every value the label takes; empty when the configuration bounds them
    /// (see `bound`).
    pub values: &'static [&'static str],
    pub bound: &'static str,
}

impl LabelDef {
    /// A label whose every value is listed.
    const fn fixed(name: &'static str, values: &'static [&'static str]) -> Self {
        LabelDef {
            name,
            values,
            bound: "",
        }
    }
}

/// Most entitlements `--watch-entitlements` may name.
pub const MAX_WATCHED: usize = 50;

const WATCHED_ENTITLEMENT: LabelDef = LabelDef {
    name: "entitlement",
    values: &[],
    bound: "an id of `--watch-entitlements` (at most 50)",
};
const WATCHED_FEATURE: LabelDef = LabelDef {
    name: "feature",
    values: &[],
    bound: "a feature of a watched entitlement (at most 256 each)",
};

pub const OPERATIONS: &[&str] = &["activate", "usage"];
pub const OUTCOMES: &[&str] = &["granted", "overdraft", "denied"];
pub const STORE_OPS: &[&str] = &["commit", "load", "pipeline", "connect"];
const OPERATION: LabelDef = LabelDef::fixed("operation", OPERATIONS);
pub const DENY_REASONS: &[&str] = &["hard_cap", "disabled", "expired"];
pub const VERSIONS: &[&str] = &[env!("CARGO_PKG_VERSION")];
/// The routes of the API and of the pages (the `route` label: patterns,
/// never raw paths).
pub const ROUTES: &[&str] = &[
    "/v1/entitlements",
    "/v1/entitlements/{id}",
    "/v1/entitlements/{id}/seats",
    "/v1/entitlements/{id}/seats/{seat_id}",
    "/v1/entitlements/{id}/usage",
    "/v1/usage/batch",
    "/v1/entitlements/{id}/history",
    "/v1/entitlements/{id}/periods",
    "/v1/entitlements/{id}/portal-links",
    "/v1/console-links",
    "/v1/reports/overdraft",
    "/v1/webhooks",
    "/v1/webhooks/{id}",
    "/v1/webhooks/{id}/deliveries",
    "/v1/webhooks/{id}/rotate-secret",
    "/v1/events",
    "/v1/cluster",
    "/v1/nodes/usage",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/portal/e/{id}",
    "/portal/e/{id}/customer-cap",
    "/console/login",
    "/console/logout",
    "/console",
    "/console/denied",
    "/console/search",
    "/console/overdraft.csv",
    "/console/e/{id}",
    "/console/e/{id}/history.csv",
    "/console/e/{id}/portal-links",
    "/console/e/{id}/revoke-links",
    "/assets/{hash}/{name}",
    "/docs",
    "/docs/{file:.*}",
    "/portal/{tail:.*}",
    "/console/{tail:.*}",
];
/// The `method` label; any other method is counted as `other`.
pub const METHODS: &[&str] = &[
    "GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS", "other",
];
/// The `status` label: the codes the API answers.
pub const STATUSES: &[&str] = &[
    "200", "201", "204", "303", "400", "401", "403", "404", "405", "408", "409", "412", "413",
    "429", "500", "503", "504",
];

/// Every metric headroom exports.
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        name: "headroom_decisions_total",
        kind: MetricKind::Counter,
        help: "Seat activations and usage decisions, by operation and outcome (replays of idempotent calls are not counted).",
        labels: &[OPERATION, LabelDef::fixed("outcome", OUTCOMES)],
    },
    MetricDef {
        name: "headroom_denials_total",
        kind: MetricKind::Counter,
        help: "Denied seat activations and usage calls, by operation and reason.",
        labels: &[OPERATION, LabelDef::fixed("reason", DENY_REASONS)],
    },
    MetricDef {
        name: "headroom_events_published_total",
        kind: MetricKind::Counter,
        help: "Events written to the stream, by type.",
        labels: &[LabelDef::fixed("type", &EVENT_KINDS)],
    },
    MetricDef {
        name: "headroom_http_request_duration_seconds",
        kind: MetricKind::Histogram,
        help: "HTTP request duration by route pattern, method and status.",
        labels: &[
            LabelDef::fixed("route", ROUTES),
            LabelDef::fixed("method", METHODS),
            LabelDef::fixed("status", STATUSES),
        ],
    },
    MetricDef {
        name: "headroom_http_connections_refused_total",
        kind: MetricKind::Counter,
        help: "Requests answered 503 too_many_connections because more than --max-connections were open.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_forwards_total",
        kind: MetricKind::Counter,
        help: "Calls for an entitlement another node owns, by outcome: answered (sent on, the owner's answer relayed), unreachable (nothing sent; served here), no_answer (sent, no answer in --forward-timeout: served here when it can be applied again, else answered 504), passed_over (not sent: the owner failed a call in the last second; served here).",
        labels: &[LabelDef::fixed(
            "outcome",
            &["answered", "unreachable", "no_answer", "passed_over"],
        )],
    },
    MetricDef {
        name: "headroom_forward_duration_seconds",
        kind: MetricKind::Histogram,
        help: "Time from sending a call on to its owner to having its answer (or failing).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_webhook_deliveries_total",
        kind: MetricKind::Counter,
        help: "Webhook delivery attempts by outcome: delivered, failed (retried later), dead_lettered (retries exhausted), dropped (endpoint deleted).",
        labels: &[LabelDef::fixed(
            "outcome",
            &["delivered", "failed", "dead_lettered", "dropped"],
        )],
    },
    MetricDef {
        name: "headroom_webhook_delivery_duration_seconds",
        kind: MetricKind::Histogram,
        help: "Duration of one webhook delivery attempt (until the endpoint answered, failed or timed out).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_webhook_retry_backlog",
        kind: MetricKind::Gauge,
        help: "Webhook deliveries waiting in the retry schedule.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_webhook_dead_letters",
        kind: MetricKind::Gauge,
        help: "Entries in the webhook dead-letter stream.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_webhook_endpoints",
        kind: MetricKind::Gauge,
        help: "Webhook endpoints registered.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_store_write_duration_seconds",
        kind: MetricKind::Histogram,
        help: "Duration of one group-commit pipeline to the store.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_store_load_duration_seconds",
        kind: MetricKind::Histogram,
        help: "Duration of loading one entitlement from the store.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_store_batch_size",
        kind: MetricKind::Histogram,
        help: "Calls (commits, loads, pings) carried by one store pipeline.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_store_errors_total",
        kind: MetricKind::Counter,
        help: "Failed store operations, by operation.",
        labels: &[LabelDef::fixed("op", STORE_OPS)],
    },
    MetricDef {
        name: "headroom_entitlement_actors",
        kind: MetricKind::Gauge,
        help: "Entitlements served by an actor now.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_cluster_members",
        kind: MetricKind::Gauge,
        help: "Live headroom nodes this node saw at its last registration renewal (with a cluster secret).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_forward_batch_size",
        kind: MetricKind::Histogram,
        help: "Usage calls carried by one request to their owner (calls that arrive while one is on its way go together in the next).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_claims_total",
        kind: MetricKind::Counter,
        help: "Owner-epoch claims: an entitlement this node read from the store (or created) and now owns. In steady state ~0; each one fences whatever another node still holds of it.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_fenced_writes_total",
        kind: MetricKind::Counter,
        help: "Writes refused because another node claimed the entitlement since this one read it: nothing was written; its calls were decided again on the stored state.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_stale_reads_total",
        kind: MetricKind::Counter,
        help: "Reads that found another node had claimed the entitlement since this one read it, and were answered from the stored state instead of memory (among nodes).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_page_logins_total",
        kind: MetricKind::Counter,
        help: "Portal and console link openings and console sign-ins, by outcome: opened (a valid link exchanged for a session), signed_in (an admin token in the console's form), refused (a link or token not valid), rate_limited (past --login-rate for the address).",
        labels: &[LabelDef::fixed(
            "outcome",
            &["opened", "signed_in", "refused", "rate_limited"],
        )],
    },
    MetricDef {
        name: "headroom_portal_links_minted_total",
        kind: MetricKind::Counter,
        help: "Portal links minted (API or console), by scope.",
        labels: &[LabelDef::fixed("scope", &["view", "manage"])],
    },
    MetricDef {
        name: "headroom_entitlements_handed_over_total",
        kind: MetricKind::Counter,
        help: "Resident entitlements this node let go of because the members changed and another node owns them now (or this node is leaving).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_entitlements_in_memory",
        kind: MetricKind::Gauge,
        help: "Entitlements in memory: with an actor, or dormant (idle, state kept).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_entitlements_in_overdraft",
        kind: MetricKind::Gauge,
        help: "Entitlements with seats or a feature in overdraft now, over all entitlements (kept by the store with each write).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_seats_in_overdraft",
        kind: MetricKind::Gauge,
        help: "Seats in use above what was purchased now, over all entitlements (kept by the store with each write).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_cpu_seconds_total",
        kind: MetricKind::Counter,
        help: "CPU time (user and system) the process used, in whole seconds.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_resident_memory_bytes",
        kind: MetricKind::Gauge,
        help: "Resident memory of the process.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_virtual_memory_bytes",
        kind: MetricKind::Gauge,
        help: "Virtual memory of the process.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_virtual_memory_max_bytes",
        kind: MetricKind::Gauge,
        help: "Most virtual memory the process may use.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_open_fds",
        kind: MetricKind::Gauge,
        help: "Open file descriptors (connections included).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_max_fds",
        kind: MetricKind::Gauge,
        help: "Most file descriptors the process may open.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_start_time_seconds",
        kind: MetricKind::Gauge,
        help: "When the process started, in seconds since the Unix epoch.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_process_threads",
        kind: MetricKind::Gauge,
        help: "Threads of the process.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_watched_seats_in_use",
        kind: MetricKind::Gauge,
        help: "Seats in use of a watched entitlement.",
        labels: &[WATCHED_ENTITLEMENT],
    },
    MetricDef {
        name: "headroom_watched_seats_purchased",
        kind: MetricKind::Gauge,
        help: "Seats purchased by a watched entitlement.",
        labels: &[WATCHED_ENTITLEMENT],
    },
    MetricDef {
        name: "headroom_watched_seats_hard_cap",
        kind: MetricKind::Gauge,
        help: "Effective seat cap of a watched entitlement (absent when unlimited).",
        labels: &[WATCHED_ENTITLEMENT],
    },
    MetricDef {
        name: "headroom_watched_usage",
        kind: MetricKind::Gauge,
        help: "Usage in the current period of a watched entitlement's feature.",
        labels: &[WATCHED_ENTITLEMENT, WATCHED_FEATURE],
    },
    MetricDef {
        name: "headroom_watched_usage_included",
        kind: MetricKind::Gauge,
        help: "Usage included per period for a watched entitlement's feature.",
        labels: &[WATCHED_ENTITLEMENT, WATCHED_FEATURE],
    },
    MetricDef {
        name: "headroom_stream_length",
        kind: MetricKind::Gauge,
        help: "Entries in the event stream (read when /metrics is scraped).",
        labels: &[],
    },
    MetricDef {
        name: "headroom_actor_mailbox_wait_seconds",
        kind: MetricKind::Histogram,
        help: "Time a call waits in its entitlement's mailbox before the actor takes it.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_entitlements_hibernated_total",
        kind: MetricKind::Counter,
        help: "Idle entitlements that gave up their actor and stayed in memory, dormant.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_entitlements_passivated_total",
        kind: MetricKind::Counter,
        help: "Entitlements that left memory after the idle timeout.",
        labels: &[],
    },
    MetricDef {
        name: "headroom_build_info",
        kind: MetricKind::Gauge,
        help: "Always 1; the version of the running tracker is its label.",
        labels: &[LabelDef::fixed("version", VERSIONS)],
    },
];

/// Describes every metric to the recorder and creates the counters of every
/// label combination at zero, so that a series exists before its first event.
pub(super) fn describe() {
    for m in METRICS {
        match m.kind {
            MetricKind::Counter => metrics::describe_counter!(m.name, m.help),
            MetricKind::Gauge => metrics::describe_gauge!(m.name, m.help),
            MetricKind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
        if m.kind == MetricKind::Counter {
            for labels in combinations(m.labels) {
                metrics::counter!(m.name, labels).absolute(0);
            }
        }
        if m.kind == MetricKind::Gauge && m.labels.is_empty() {
            metrics::gauge!(m.name).increment(0.0);
        }
    }
    for version in VERSIONS {
        metrics::gauge!("headroom_build_info", "version" => *version).set(1.0);
    }
}

fn combinations(labels: &[LabelDef]) -> Vec<Vec<metrics::Label>> {
    labels.iter().fold(vec![Vec::new()], |acc, l| {
        acc.iter()
            .flat_map(|prefix| {
                l.values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push(metrics::Label::new(l.name, *v));
                    next
                })
            })
            .collect()
    })
}

/// METRICS.md, generated from [`METRICS`]
/// (`cargo run --example metrics_md > METRICS.md`; a test checks it).
pub fn metrics_markdown() -> String {
    let mut out = String::from(
        "# Metrics\n\nGenerated from `src/telemetry/catalog.rs` by `cargo run --example metrics_md > METRICS.md`;\n\
         a test fails when this file and the catalogue differ. Every label has a\n\
         bounded set of values; none carries an entitlement, seat or feature id.\n\n\
         | metric | type | help | labels |\n| --- | --- | --- | --- |\n",
    );
    for m in METRICS {
        let labels = if m.labels.is_empty() {
            "–".to_string()
        } else {
            m.labels
                .iter()
                .map(|l| {
                    format!(
                        "`{}`: {}",
                        l.name,
                        l.values
                            .iter()
                            .map(|v| format!("`{v}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        };
        out += &format!(
            "| `{}` | {} | {} | {} |\n",
            m.name,
            m.kind.as_str(),
            m.help,
            labels
        );
    }
    out
}
