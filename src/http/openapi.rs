//! The OpenAPI 3.1 document of the API, generated from the handlers'
//! `#[utoipa::path]` annotations and the types' `ToSchema` derives.
//!
//! Every route of [`super::ROUTES`] is in the document (a test checks it);
//! the pages under `/portal` and `/console` are for browsers and are not.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ResponseBuilder, ResponsesBuilder, content::ContentBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::handlers;

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

/// What a created resource leads to: OpenAPI links from an operation's
/// success answers to the operations that use what it made (so that a
/// client, or schemathesis's stateful phase, goes create → use →
/// delete). Each: the operation (method, path), its statuses, and the
/// operations linked with the parameters they take from it.
type Link = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const LINKS: &[Link] = &[
    (
        "put",
        "/v1/entitlements/{id}",
        &["200", "201"],
        &[
            "get_entitlement",
            "list_seats",
            "activate_seat",
            "record_usage",
            "entitlement_history",
            "entitlement_periods",
            "create_portal_link",
            "revoke_portal_links",
            "delete_entitlement",
        ],
        &[("id", "$request.path.id")],
    ),
    (
        "post",
        "/v1/entitlements/{id}/seats/{seat_id}",
        &["200"],
        &["release_seat"],
        &[
            ("id", "$request.path.id"),
            ("seat_id", "$request.path.seat_id"),
        ],
    ),
    (
        "post",
        "/v1/webhooks",
        &["201"],
        &[
            "get_webhook",
            "webhook_deliveries",
            "rotate_webhook_secret",
            "delete_webhook",
        ],
        &[("id", "$response.body#/id")],
    ),
];

fn links(doc: &mut serde_json::Value) {
    use serde_json::{Map, Value};
    for (method, path, statuses, targets, params) in LINKS {
        let parameters: Map<String, Value> = params
            .iter()
            .map(|(name, from)| (name.to_string(), Value::from(*from)))
            .collect();
        let links: Map<String, Value> = targets
            .iter()
            .map(|op| {
                let link = serde_json::json!({"operationId": op, "parameters": parameters});
                (op.to_string(), link)
            })
            .collect();
        for status in *statuses {
            let pointer = format!(
                "/paths/{}/{method}/responses/{status}",
                path.replace('~', "~0").replace('/', "~1")
            );
            // A test checks that each exists (`every_link_leads_somewhere`).
            if let Some(answer) = doc.pointer_mut(&pointer).and_then(Value::as_object_mut) {
                answer.insert("links".into(), Value::Object(links.clone()));
            }
        }
    }
}

/// A summary taken from a handler's comment that begins by naming its
/// route ("`GET /v1/events`: the events…"), without the route, which
/// readers of the document see next to it already.
fn without_route(summary: &mut serde_json::Value) {
    let Some(text) = summary.as_str() else {
        return;
    };
    let Some(rest) = text
        .strip_prefix('`')
        .and_then(|t| t.split_once("`: "))
        .filter(|(route, _)| route.contains(" /"))
        .map(|(_, rest)| rest)
    else {
        return;
    };
    let mut chars = rest.chars();
    if let Some(first) = chars.next() {
        *summary = serde_json::Value::String(first.to_uppercase().chain(chars).collect());
    }
}

/// A schema that utoipa wrote "T or null" for an `Option<T>`, as T.
fn not_null(schema: &mut serde_json::Value) -> bool {
    if let Some(types) = schema.get_mut("type").and_then(|t| t.as_array_mut()) {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types[0].clone();
            schema["type"] = only;
        }
        return true;
    }
    let inner = schema
        .get("oneOf")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2 && o[1] == serde_json::json!({"type": "null"}))
        .map(|o| o[0].clone());
    match inner {
        Some(inner) => {
            *schema = inner;
            true
        }
        None => false,
    }
}

/// Every `u64` of the API as what it is: utoipa writes them `int64` with
/// minimum 0, whose range ends at 2^63 - 1; the API takes up to 2^64 - 1.
fn unsigned(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let integer = match map.get("type") {
                Some(serde_json::Value::String(t)) => t == "integer",
                Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer
                && map.get("format").is_some_and(|f| f == "int64")
                && map.get("minimum").is_some_and(|m| m == 0)
            {
                map.insert("format".into(), "uint64".into());
                if !map.contains_key("maximum") {
                    map.insert("maximum".into(), u64::MAX.into());
                }
            }
            map.values_mut().for_each(unsigned);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unsigned),
        _ => {}
    }
}

/// The document as JSON. Optional bodies and parameters are written
/// `Option<T>` in the annotations, which utoipa renders as "T or null";
/// a route takes no body or a T, never `null`, and a header or query
/// parameter cannot be null, so those are made "T, not required".
pub fn document_json() -> Result<String, serde_json::Error> {
    let mut doc = serde_json::to_value(document())?;
    unsigned(&mut doc);
    events_by_type(&mut doc);
    links(&mut doc);
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for operation in paths
            .values_mut()
            .filter_map(|i| i.as_object_mut())
            .flat_map(|i| i.values_mut())
        {
            if let Some(summary) = operation.get_mut("summary") {
                without_route(summary);
            }
            if let Some(params) = operation
                .get_mut("parameters")
                .and_then(|p| p.as_array_mut())
            {
                for param in params {
                    if let Some(schema) = param.get_mut("schema") {
                        not_null(schema);
                    }
                }
            }
            let Some(body) = operation.get_mut("requestBody") else {
                continue;
            };
            let Some(content) = body.get_mut("content").and_then(|c| c.as_object_mut()) else {
                continue;
            };
            let mut optional = false;
            for media in content.values_mut() {
                let Some(schema) = media.get_mut("schema") else {
                    continue;
                };
                if schema.get("oneOf").is_some() && not_null(schema) {
                    optional = true;
                }
                if schema.get("$ref").and_then(|r| r.as_str())
                    == Some("#/components/schemas/NoFields")
                {
                    optional = true;
                }
            }
            if optional {
                body["required"] = serde_json::Value::Bool(false);
            }
        }
    }
    serde_json::to_string_pretty(&doc)
}

/// `EventData` is untagged, so utoipa documents it as one `oneOf` whose
/// variants overlap (`{"in_use", "hard_cap"}` fits two). The event's
/// `type` says which it is: `CloudEvent` becomes a `oneOf` over the event
/// types (discriminated by `type`), each with its own `data` schema
/// (`SeatDeniedData`, …: exactly the fields written, nothing more).
fn events_by_type(doc: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let variants = match schemas.remove("EventData") {
        Some(Value::Object(mut data)) => match data.remove("oneOf") {
            Some(Value::Array(v)) => v,
            _ => return,
        },
        _ => return,
    };
    let Some(Value::Object(mut base)) = schemas.remove("CloudEvent") else {
        return;
    };
    if let Some(props) = base.get_mut("properties").and_then(Value::as_object_mut) {
        props.remove("data");
        props.remove("type");
    }
    base.insert(
        "description".into(),
        json!("What every event has in common."),
    );
    schemas.insert("CloudEventBase".into(), Value::Object(base));
    let mut one_of = Vec::new();
    let mut mapping = serde_json::Map::new();
    for (kind, mut data) in crate::domain::EVENT_KINDS.iter().zip(variants) {
        let name: String = kind
            .split(['.', '_'])
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect();
        if let Some(d) = data.as_object_mut() {
            d.insert("additionalProperties".into(), Value::Bool(false));
            d.insert(
                "description".into(),
                json!(format!("The `data` of `{kind}`.")),
            );
        }
        schemas.insert(format!("{name}Data"), data);
        let event = json!({
            "description": format!("A `{kind}` event."),
            "allOf": [
                {"$ref": "#/components/schemas/CloudEventBase"},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": kind},
                        "data": {"$ref": format!("#/components/schemas/{name}Data")},
                    },
                    "required": ["type", "data"],
                },
            ],
        });
        schemas.insert(format!("{name}Event"), event);
        let reference = format!("#/components/schemas/{name}Event");
        one_of.push(json!({"$ref": reference}));
        mapping.insert(kind.to_string(), Value::String(reference));
    }
    schemas.insert(
        "CloudEvent".into(),
        json!({
            "description": "An event as the stream and the webhooks carry it: a CloudEvents 1.0 \
                document (`Content-Type: application/cloudevents+json` on webhooks), its `data` \
                by its `type`.",
            "oneOf": one_of,
            "discriminator": {"propertyName": "type", "mapping": mapping},
        }),
    );
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
