//! The OpenAPI 3.1 document of the API, generated from the handlers'
//! `#[utoipa::path]` annotations and the types' `ToSchema` derives.
//!
//! Work in progress (issue 16): the entitlement routes are described; the
//! others follow, and `/openapi.json` is served once every route of
//! [`super::ROUTES`] is in the document (a test lists what is missing).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ResponseBuilder, ResponsesBuilder, content::ContentBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::handlers;

/// An error, as every route answers it (RFC 9457 problem details).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Problem {
    /// `https://headroom.dev/problems/<code>`.
    #[schema(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    /// Stable: what a program matches on (see the API reference's errors).
    pub code: String,
    pub detail: String,
    /// With `invalid_request`: the field at fault, when known.
    pub field: Option<String>,
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
        handlers::put_entitlement,
        handlers::get_entitlement,
        handlers::delete_entitlement,
        handlers::list_seats,
    ),
    components(schemas(Problem)),
    modifiers(&Security),
    tags(
        (name = "entitlements", description = "What each customer bought (admin token)."),
    ),
)]
pub struct ApiDoc;

/// The document, as `/openapi.json` will serve it.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

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
