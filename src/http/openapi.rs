//! The OpenAPI 3.1 document of the API, generated from the handlers'
//! `#[utoipa::path]` annotations and the types' `ToSchema` derives.
//!
//! Every route of [`super::ROUTES`] is in the document (a test checks it);
//! the pages under `/portal` and `/console` are for browsers and are not.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ResponseBuilder, ResponsesBuilder, content::ContentBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::handlers;

mod shape;

/// An error, as every route answers it (RFC 9457 problem details).
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct Problem {
    /// `https://headroom.dev/problems/<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    /// Stable: what a program matches on (see the API reference's errors).
    pub code: String,
    pub detail: String,
    /// With `invalid_request`: the field at fault, when known.
    pub field: Option<String>,
    /// With `denied`: why.
    pub reason: Option<crate::domain::DenyReason>,
    /// With `denied`: the decision, with the counters after it.
    pub decision: Option<Decision>,
}

/// A seat's or a usage call's decision.
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum Decision {
    Seat(crate::domain::SeatDecision),
    Usage(crate::domain::UsageDecision),
}

/// `POST /v1/usage/batch`'s body. Each event is read on its own: one that
/// is not a valid [`BatchEvent`] fails in its slot of the answer (the
/// request is still `200`), so any item is accepted here.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BatchRequest {
    /// At most 10,000 usage events, each a `BatchEvent`.
    #[schema(max_items = 10000)]
    pub events: Vec<serde_json::Value>,
}

/// A body with no fields: `{}` (or none at all).
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct NoFields {}

/// Which report `GET /v1/reports/overdraft` answers.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum ReportState {
    Overdraft,
    DeniedRecently,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BatchEvent {
    pub entitlement: crate::domain::EntitlementId,
    pub feature: crate::domain::FeatureKey,
    pub amount: crate::domain::Amount,
    pub idempotency_key: Option<crate::domain::IdempotencyKey>,
}

/// An event as the stream and the webhooks carry it: a CloudEvents 1.0
/// document (`Content-Type: application/cloudevents+json` on webhooks).
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct CloudEvent {
    pub specversion: String,
    /// `{entitlement}:{incarnation}:{seq}`: the same on a redelivery.
    pub id: String,
    pub source: String,
    /// One of `seat.overdraft_entered`, `seat.overdraft_exited`,
    /// `seat.hard_cap_reached`, `seat.denied`, `seat.expired`,
    /// `usage.threshold_crossed`, `usage.overdraft_entered`,
    /// `usage.hard_cap_reached`, `usage.denied`, `usage.reset`,
    /// `usage.period_closed`, `entitlement.updated`, `entitlement.deleted`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The entitlement.
    pub subject: String,
    pub time: chrono::DateTime<chrono::Utc>,
    pub datacontenttype: String,
    pub data: crate::domain::EventData,
}

/// `GET /healthz` and `/readyz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: String,
}

/// `GET /v1/cluster`.
#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct ClusterView {
    /// This node's id.
    #[serde(rename = "self")]
    pub self_: String,
    pub members: Vec<ClusterMember>,
}

#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
pub struct ClusterMember {
    pub id: String,
    /// host:port the other nodes reach it at.
    pub address: String,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// When its registration runs out unless renewed (`null` alone).
    pub lease_expires: Option<chrono::DateTime<chrono::Utc>>,
    /// The fraction of entitlements it owns, estimated.
    pub share: f64,
}

/// A webhook's type filter: an event type, a prefix, or everything.
#[derive(utoipa::ToSchema)]
#[schema(as = WebhookType)]
#[allow(dead_code)]
pub enum WebhookType {
    #[schema(rename = "*")]
    All,
    #[schema(rename = "seat.*")]
    Seat,
    #[schema(rename = "usage.*")]
    Usage,
    #[schema(rename = "entitlement.*")]
    Entitlement,
    #[schema(rename = "seat.overdraft_entered")]
    SeatOverdraftEntered,
    #[schema(rename = "seat.overdraft_exited")]
    SeatOverdraftExited,
    #[schema(rename = "seat.hard_cap_reached")]
    SeatHardCapReached,
    #[schema(rename = "seat.denied")]
    SeatDenied,
    #[schema(rename = "seat.expired")]
    SeatExpired,
    #[schema(rename = "usage.threshold_crossed")]
    UsageThresholdCrossed,
    #[schema(rename = "usage.overdraft_entered")]
    UsageOverdraftEntered,
    #[schema(rename = "usage.hard_cap_reached")]
    UsageHardCapReached,
    #[schema(rename = "usage.denied")]
    UsageDenied,
    #[schema(rename = "usage.reset")]
    UsageReset,
    #[schema(rename = "usage.period_closed")]
    UsagePeriodClosed,
    #[schema(rename = "entitlement.updated")]
    EntitlementUpdated,
    #[schema(rename = "entitlement.deleted")]
    EntitlementDeleted,
}

/// `GET /v1/webhooks`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhookList {
    pub webhooks: Vec<crate::webhooks::Webhook>,
}

/// `GET /v1/webhooks/{id}/deliveries`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct DeliveryLog {
    pub webhook: String,
    pub deliveries: Vec<crate::webhooks::LogEntry>,
}

/// A closed usage period, as a billing record.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PeriodRecord {
    pub feature: crate::domain::FeatureKey,
    pub period_start: chrono::DateTime<chrono::Utc>,
    pub period_end: chrono::DateTime<chrono::Utc>,
    pub used: u64,
    pub included: u64,
    /// Used above what was included.
    pub overage: u64,
    pub peak: u64,
    pub denied: u64,
    pub closed_at: chrono::DateTime<chrono::Utc>,
}

/// One result per event, in order: its decision (denied ones included),
/// or the problem that made it fail.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BatchAnswer {
    pub results: Vec<BatchResult>,
}

#[derive(ToSchema, serde::Serialize)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum BatchResult {
    Decision(crate::domain::UsageDecision),
    Failed { error: Problem },
}

/// The errors any route may answer, whatever it does.
pub struct CommonErrors;

fn problem(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

impl utoipa::IntoResponses for CommonErrors {
    fn responses()
    -> std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::Response>> {
        ResponsesBuilder::new()
            .response("401", problem("`unauthorized`: no token, or one that is not known."))
            .response("403", problem("`forbidden`: the token lacks the scope of this call."))
            .response("405", problem("`method_not_allowed`, with `Allow`."))
            .response("408", problem("`request_timeout`: the body did not arrive within `--request-timeout`."))
            .response(
                "500",
                problem("`stored_state_corrupt` (what Redis holds cannot be read) or `internal_error` (a defect)."),
            )
            .response(
                "503",
                problem("`store_unavailable`, `shutting_down` or `too_many_connections`, with `Retry-After`: the call had no effect."),
            )
            .response(
                "504",
                problem("`outcome_unknown` or `not_replicated`, with `Retry-After`: the write may have been applied; retry with the same idempotency key."),
            )
            .build()
            .into()
    }
}

/// The bearer tokens of each scope.
struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("admin", "An admin token (`--admin-tokens`): every call."),
            (
                "client",
                "A client token (`--client-tokens`): metering and evidence reads.",
            ),
            (
                "metrics",
                "A scrape token (`--metrics-tokens`), when configured, for `/metrics`.",
            ),
        ] {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(what.to_string());
            components.add_security_scheme(name, SecurityScheme::Http(scheme));
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "headroom",
        description = "Seats and metered usage with overdraft: granted within what was purchased, \
                       allowed but flagged up to the hard cap, denied past it.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::reports::list_entitlements,
        handlers::put_entitlement,
        handlers::get_entitlement,
        handlers::delete_entitlement,
        handlers::list_seats,
        handlers::activate_seat,
        handlers::release_seat,
        handlers::record_usage,
        handlers::record_batch,
        super::reports::overdraft_report,
        super::reports::history,
        super::reports::periods,
        super::webhooks::create,
        super::webhooks::list,
        super::webhooks::get,
        super::webhooks::delete,
        super::webhooks::deliveries,
        super::webhooks::rotate_secret,
        super::pages::links::create_portal_link,
        super::pages::links::revoke_portal_links,
        super::pages::links::create_console_link,
        super::events::list_events,
        handlers::cluster,
        super::nodes::node_usage,
        handlers::healthz,
        handlers::readyz,
        handlers::metrics,
        serve,
    ),
    components(schemas(Problem, CloudEvent, BatchEvent, ReportState, super::events::EventsStart)),
    modifiers(&Security),
    tags(
        (name = "entitlements", description = "What each customer bought (admin token)."),
        (name = "metering", description = "Seats and usage (client or admin token)."),
        (name = "evidence", description = "The overdraft report, history and closed periods."),
        (name = "webhooks", description = "Endpoints that get the events (admin token, Redis only)."),
        (name = "events", description = "The event stream, read through the tracker (admin token)."),
        (name = "pages", description = "Links to the customer's page and the console."),
        (name = "nodes", description = "Several nodes on one Redis."),
        (name = "operations", description = "Health, readiness and metrics (no token)."),
    ),
)]
pub struct ApiDoc;

/// The document `/openapi.json` serves.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as JSON, shaped for its readers (see [`shape::apply`]).
pub fn document_json() -> Result<String, serde_json::Error> {
    let mut doc = serde_json::to_value(document())?;
    shape::apply(&mut doc);
    serde_json::to_string_pretty(&doc)
}

static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    document_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"the document could not be encoded: {e}\"}}"))
});

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi_document",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of every route.", body = serde_json::Value)),
)]
pub async fn serve() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT.as_str())
}

#[cfg(test)]
mod tests {
    use super::shape::LINKS;
    use super::*;

    #[test]
    fn every_route_and_method_is_in_the_document() {
        let doc = serde_json::to_value(document()).expect("json");
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("item").keys() {
                if ["get", "put", "post", "delete"].contains(&method.as_str()) {
                    documented.insert(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        let served: std::collections::BTreeSet<String> = super::super::ROUTES
            .iter()
            .flat_map(|(p, ms)| ms.iter().map(move |m| format!("{m} {p}")))
            .collect();
        assert_eq!(documented, served);
    }

    /// Every link is on an answer the document has, and leads to an
    /// operation it has, with parameters that operation takes.
    #[test]
    fn every_link_leads_somewhere() {
        let doc: serde_json::Value =
            serde_json::from_str(&document_json().expect("encodes")).expect("JSON");
        let mut operations = std::collections::HashMap::new();
        for item in doc["paths"].as_object().expect("paths").values() {
            for op in item.as_object().expect("item").values() {
                if let Some(id) = op.get("operationId").and_then(|i| i.as_str()) {
                    operations.insert(id.to_string(), op.clone());
                }
            }
        }
        let mut seen = 0;
        for (method, path, statuses, targets, params) in LINKS {
            for status in *statuses {
                let links = &doc["paths"][path][method]["responses"][status]["links"];
                assert!(links.is_object(), "{method} {path} {status} has no links");
                seen += links.as_object().expect("links").len();
            }
            for target in *targets {
                let op = operations
                    .get(*target)
                    .unwrap_or_else(|| panic!("{target}"));
                for (name, _) in *params {
                    let takes = op["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == *name));
                    assert!(takes, "{target} takes no {name}");
                }
            }
        }
        assert!(seen >= 14, "{seen}");
    }

    #[test]
    fn each_event_type_has_its_data_schema() {
        let doc: serde_json::Value =
            serde_json::from_str(&document_json().expect("json")).expect("json");
        let schemas = &doc["components"]["schemas"];
        assert!(schemas.get("EventData").is_none());
        let mapping = schemas["CloudEvent"]["discriminator"]["mapping"]
            .as_object()
            .expect("mapping");
        assert_eq!(mapping.len(), crate::domain::EVENT_KINDS.len());
        // The variants were matched to the types by order: a few of each
        // kind's own fields say the order held.
        for (data, field) in [
            ("SeatDeniedData", "seat_id"),
            ("SeatExpiredData", "lease_expired_at"),
            ("UsageThresholdCrossedData", "threshold"),
            ("UsagePeriodClosedData", "overage"),
            ("EntitlementUpdatedData", "created"),
        ] {
            assert!(schemas[data]["properties"].get(field).is_some(), "{data}");
        }
        assert_eq!(
            schemas["EntitlementDeletedData"]["additionalProperties"],
            false
        );
    }

    #[test]
    fn the_webhook_type_filter_lists_every_event_type() {
        let doc: serde_json::Value =
            serde_json::from_str(&document_json().expect("json")).expect("json");
        let schemas = &doc["components"]["schemas"];
        let listed: Vec<&str> = schemas["WebhookType"]["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for kind in crate::domain::EVENT_KINDS {
            assert!(listed.contains(&kind), "{kind}");
        }
        let max = &schemas["NewWebhook"]["properties"]["types"]["maxItems"];
        assert_eq!(max, crate::domain::EVENT_KINDS.len());
        let included = &schemas["FeatureConfig"]["properties"]["included"];
        assert_eq!(included["maximum"], u64::MAX, "a u64 is documented as one");
    }

    #[test]
    fn the_document_is_openapi_3_1_with_its_schemas() {
        let doc = serde_json::to_value(document()).expect("json");
        assert_eq!(doc["openapi"], "3.1.0");
        for schema in [
            "EntitlementConfig",
            "EntitlementView",
            "Problem",
            "Limit",
            "SeatView",
        ] {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
        }
        let put = &doc["paths"]["/v1/entitlements/{id}"]["put"];
        for status in ["200", "201", "400", "401", "412", "503"] {
            assert!(put["responses"][status].is_object(), "PUT answers {status}");
        }
    }
}
