//! Extractors for what every handler needs before it starts: the caller's
//! scope, the entitlement id of the path, and a body read within its limit
//! and the request timeout. Handlers list them in the order they are
//! checked: a wrong token is refused before a bad id, a bad id before the
//! body is read.

use std::future::{Ready, ready};
use std::marker::PhantomData;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::web::{self, BytesMut};
use actix_web::{FromRequest, HttpRequest};
use futures_util::StreamExt;

use super::AppState;
use super::auth::Scope;
use super::problem::{ApiError, Kind};
use crate::domain::{EntitlementId, IdempotencyKey, SeatId, ValidationError};

/// The application's state, or a 500 if a route was mounted without it.
pub(super) fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::new(Kind::Internal, "the application state is missing"))
}

/// Declares a guard: an extractor that succeeds when the caller's token
/// has `$scope` (and, with `churn`, the token's seat churn allowance).
macro_rules! guard {
    ($(#[$doc:meta])* $name:ident, $scope:expr, $churn:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl FromRequest for $name {
            type Error = ApiError;
            type Future = Ready<Result<Self, ApiError>>;
            fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
                ready(state(req).and_then(|s| {
                    s.auth.require(req, $scope)?;
                    if $churn {
                        s.auth.churn(req)?;
                    }
                    Ok($name)
                }))
            }
        }
    };
}

guard!(
    /// The caller holds an admin token.
    Admin, Scope::Admin, false
);
guard!(
    /// The caller holds a client (metering) or admin token.
    Client, Scope::Client, false
);
guard!(
    /// A client allowed one more seat activation or release under the churn limit.
    SeatCaller, Scope::Client, true
);
guard!(
    /// The caller may read `/metrics`.
    MetricsReader, Scope::Metrics, false
);

/// Declares an extractor of one path segment, parsed by `$ty::parse`
/// (400 naming the field for one that does not parse).
macro_rules! path_id {
    ($(#[$doc:meta])* $name:ident($ty:ty), $segment:literal) => {
        $(#[$doc])*
        pub struct $name(pub $ty);

        impl FromRequest for $name {
            type Error = ApiError;
            type Future = Ready<Result<Self, ApiError>>;
            fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
                let raw = req.match_info().get($segment).unwrap_or_default();
                ready(<$ty>::parse(raw).map($name).map_err(ApiError::from))
            }
        }
    };
}

path_id!(
    /// The `{id}` of the path.
    EntitlementPath(EntitlementId), "id"
);
path_id!(
    /// The `{seat_id}` of the path.
    SeatPath(SeatId), "seat_id"
);

/// The standard `Idempotency-Key` header (IETF httpapi draft), parsed
/// like the body's `idempotency_key` (400 naming the header if it is not
/// a valid key).
pub struct IdempotencyHeader(pub Option<IdempotencyKey>);

/// The header's name, as clients send it.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

impl FromRequest for IdempotencyHeader {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(raw) = req.headers().get(IDEMPOTENCY_KEY) else {
            return ready(Ok(IdempotencyHeader(None)));
        };
        let invalid = |m: String| ValidationError::new(IDEMPOTENCY_KEY, m).into();
        ready(
            raw.to_str()
                .map_err(|_| invalid("not visible ASCII".into()))
                .and_then(IdempotencyHeader::parse)
                .map(|k| IdempotencyHeader(Some(k))),
        )
    }
}

impl IdempotencyHeader {
    /// The key of the header's (visible ASCII) value.
    pub fn parse(value: &str) -> Result<IdempotencyKey, ApiError> {
        // A structured-field string may come quoted.
        let s = value.trim();
        let s = s
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(s);
        IdempotencyKey::parse(s)
            .map_err(|e| ValidationError::new(IDEMPOTENCY_KEY, e.message).into())
    }
}

/// The query string as `T` (unknown parameters refused, field `query`).
pub struct Query<T>(pub T);

impl<T: for<'de> serde::Deserialize<'de>> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            crate::domain::json::decode_query(req.query_string())
                .map(Query)
                .map_err(ApiError::from),
        )
    }
}

/// A page size: 100 by default, 1 to `max`.
pub fn page_limit(limit: Option<usize>, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(ValidationError::new("limit", format!("must be 1 to {max}")).into())
    }
}

/// How large a body a route takes.
pub trait BodyLimit {
    fn limit(state: &AppState) -> usize;
}

/// A configuration or a batch: `--max-body-bytes`.
pub struct Large;
/// One usage call: 64 KiB.
pub struct Usage;
/// A webhook registration or a link request: 16 KiB.
pub struct Small;
/// A seat call: no body, or an empty JSON object.
pub struct Empty;

impl BodyLimit for Large {
    fn limit(state: &AppState) -> usize {
        state.limits.max_body_bytes
    }
}

/// The largest body of one usage call.
pub const USAGE_BODY_LIMIT: usize = 64 * 1024;

impl BodyLimit for Usage {
    fn limit(_: &AppState) -> usize {
        USAGE_BODY_LIMIT
    }
}

impl BodyLimit for Small {
    fn limit(_: &AppState) -> usize {
        16 * 1024
    }
}

impl BodyLimit for Empty {
    fn limit(_: &AppState) -> usize {
        1024
    }
}

/// The whole body, at most `L`'s limit (a longer one is refused with 413
/// before it is buffered whole), within the request timeout (408: a client
/// that trickles its body does not hold a worker's call open).
pub struct Body<L>(pub BytesMut, pub PhantomData<L>);

impl<L: BodyLimit + 'static> FromRequest for Body<L> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limits = state(req).map(|s| (L::limit(s), s.limits.request_timeout));
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let payload = payload.take();
        Box::pin(async move {
            let (limit, timeout) = limits?;
            let body = tokio::time::timeout(timeout, read(payload, declared, limit))
                .await
                .map_err(|_| {
                    ApiError::new(
                        Kind::RequestTimeout,
                        format!("the body did not arrive within {timeout:?}"),
                    )
                })??;
            Ok(Body(body, PhantomData))
        })
    }
}

/// A body over `limit` bytes.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        Kind::PayloadTooLarge,
        format!("the body limit is {limit} bytes"),
    )
}

async fn read(
    mut payload: Payload,
    declared: Option<usize>,
    limit: usize,
) -> Result<BytesMut, ApiError> {
    let too_large = || too_large(limit);
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(Kind::InvalidRequest, format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
