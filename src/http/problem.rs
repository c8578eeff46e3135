//! RFC 9457 problem details: one table maps each error kind to its status,
//! stable `code` and title.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::domain::ValidationError;
use crate::domain::json::JsonError;
use crate::engine::EngineError;
use crate::store::chain;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidJson,
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    EntitlementNotFound,
    FeatureNotFound,
    MethodNotAllowed,
    IdempotencyConflict,
    PreconditionFailed,
    PayloadTooLarge,
    RequestTimeout,
    BatchTooLarge,
    Denied,
    RateLimited,
    StoreUnavailable,
    OutcomeUnknown,
    NotReplicated,
    ShuttingDown,
    TooManyConnections,
    WebhookNotFound,
    WebhooksUnavailable,
    StoredStateCorrupt,
    Internal,
}

impl Kind {
    /// `(status, code, title)`: the single place where kinds become HTTP.
    pub fn describe(self) -> (StatusCode, &'static str, &'static str) {
        use StatusCode as S;
        match self {
            Kind::InvalidJson => (S::BAD_REQUEST, "invalid_json", "Body is not valid JSON"),
            Kind::InvalidRequest => (S::BAD_REQUEST, "invalid_request", "Request is invalid"),
            Kind::Unauthorized => (
                S::UNAUTHORIZED,
                "unauthorized",
                "Missing or unknown bearer token",
            ),
            Kind::Forbidden => (
                S::FORBIDDEN,
                "forbidden",
                "Token lacks the scope for this call",
            ),
            Kind::NotFound => (S::NOT_FOUND, "not_found", "No such route"),
            Kind::EntitlementNotFound => {
                (S::NOT_FOUND, "entitlement_not_found", "Unknown entitlement")
            }
            Kind::FeatureNotFound => (S::NOT_FOUND, "feature_not_found", "Unknown feature"),
            Kind::MethodNotAllowed => (
                S::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            Kind::PreconditionFailed => (
                S::PRECONDITION_FAILED,
                "precondition_failed",
                "The condition of the request does not hold",
            ),
            Kind::IdempotencyConflict => (
                S::CONFLICT,
                "idempotency_conflict",
                "Idempotency key already used with another payload",
            ),
            Kind::PayloadTooLarge => (S::PAYLOAD_TOO_LARGE, "payload_too_large", "Body too large"),
            Kind::RequestTimeout => (
                S::REQUEST_TIMEOUT,
                "request_timeout",
                "Request not received in time",
            ),
            Kind::BatchTooLarge => (
                S::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                "Too many events in one batch",
            ),
            Kind::Denied => (S::TOO_MANY_REQUESTS, "denied", "Denied"),
            Kind::RateLimited => (
                S::TOO_MANY_REQUESTS,
                "rate_limited",
                "Too many seat calls with this token",
            ),
            Kind::StoreUnavailable => (
                S::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "Store unavailable",
            ),
            Kind::OutcomeUnknown => (
                S::GATEWAY_TIMEOUT,
                "outcome_unknown",
                "Store did not confirm the write; retry with the same idempotency key",
            ),
            Kind::NotReplicated => (
                S::GATEWAY_TIMEOUT,
                "not_replicated",
                "The write did not reach enough Redis replicas in time; retry with the same idempotency key",
            ),
            Kind::ShuttingDown => (
                S::SERVICE_UNAVAILABLE,
                "shutting_down",
                "Tracker is shutting down",
            ),
            Kind::WebhookNotFound => (S::NOT_FOUND, "webhook_not_found", "Unknown webhook"),
            Kind::WebhooksUnavailable => (
                S::CONFLICT,
                "webhooks_unavailable",
                "Webhooks need Redis (--redis-url)",
            ),
            Kind::StoredStateCorrupt => (
                S::INTERNAL_SERVER_ERROR,
                "stored_state_corrupt",
                "The stored state of this entitlement cannot be read",
            ),
            Kind::Internal => (S::INTERNAL_SERVER_ERROR, "internal_error", "Internal error"),
            Kind::TooManyConnections => (
                S::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "Too many open connections; this one is closed after the answer",
            ),
        }
    }
}

/// An error answered as `application/problem+json`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: Kind,
    pub detail: String,
    /// Extra members (the decision of a denial, the field that was invalid).
    pub extra: Option<serde_json::Value>,
    pub retry_after: Option<u64>,
    /// A denial answered again for a retried idempotency key.
    pub replayed: bool,
}

#[derive(Serialize)]
pub struct Problem<'a> {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: &'static str,
    pub status: u16,
    pub code: &'static str,
    pub detail: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extra: Option<&'a serde_json::Value>,
}

impl ApiError {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        ApiError {
            kind,
            detail: detail.into(),
            extra: None,
            retry_after: None,
            replayed: false,
        }
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.extra = Some(extra);
        self
    }

    pub fn problem(&self) -> Problem<'_> {
        let (status, code, title) = self.kind.describe();
        Problem {
            type_: format!("https://headroom.dev/problems/{code}"),
            title,
            status: status.as_u16(),
            code,
            detail: &self.detail,
            extra: self.extra.as_ref(),
        }
    }

    /// An answer that could not be encoded (a defect).
    pub fn encoding(e: serde_json::Error) -> Self {
        tracing::error!(error = %e, "an answer could not be encoded");
        ApiError::new(Kind::Internal, "the answer could not be encoded")
    }

    /// A body that is not the JSON a route takes, named in the product's words.
    pub fn json_error(e: serde_json::Error) -> Self {
        crate::domain::json::from_serde(e).into()
    }
}

impl From<JsonError> for ApiError {
    fn from(e: JsonError) -> Self {
        match e {
            JsonError::Syntax(message) => ApiError::new(Kind::InvalidJson, message),
            JsonError::Invalid(v) => v.into(),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let field = e.field.clone();
        ApiError::new(Kind::InvalidRequest, e.to_string())
            .with_extra(serde_json::json!({ "field": field }))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::Invalid(v) => return v.clone().into(),
            EngineError::NotFound(_) => Kind::EntitlementNotFound,
            EngineError::UnknownFeature(_) => Kind::FeatureNotFound,
            EngineError::Conflict(_) => Kind::IdempotencyConflict,
            EngineError::Unavailable(_) | EngineError::ActorUnavailable => Kind::StoreUnavailable,
            EngineError::OutcomeUnknown(_) => Kind::OutcomeUnknown,
            EngineError::NotReplicated(_) => Kind::NotReplicated,
            EngineError::Corrupt(_) => Kind::StoredStateCorrupt,
            EngineError::Encoding(_) => Kind::Internal,
            EngineError::ShuttingDown => Kind::ShuttingDown,
            EngineError::PreconditionFailed(_) => Kind::PreconditionFailed,
        };
        let mut err = ApiError::new(kind, chain(&e));
        if matches!(
            kind,
            Kind::StoreUnavailable
                | Kind::OutcomeUnknown
                | Kind::NotReplicated
                | Kind::ShuttingDown
        ) {
            err.retry_after = Some(1);
        }
        err
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.describe().1, self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.kind.describe().0
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        ));
        if let Some(s) = self.retry_after {
            res.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        if self.replayed {
            res.insert_header(("Idempotency-Replayed", "true"));
        }
        if self.kind == Kind::Unauthorized {
            res.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        if self.kind == Kind::TooManyConnections {
            res.force_close();
        }
        // Keeps the problem+json type set above; a body that cannot be
        // encoded answers actix's own 500.
        res.json(self.problem())
    }
}
