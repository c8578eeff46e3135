//! `POST /v1/nodes/usage`: usage calls another node received for
//! entitlements this node owns, sent on together
//! ([`crate::nodes::coalesce`]). Only nodes reach it: the call must carry
//! the cluster secret, and no client or admin token opens it. Each call is
//! checked and decided as if its client had sent it here — its token, its
//! entitlement, its `Idempotency-Key` header and its body, in the order
//! the usage route checks them — the valid ones in one engine batch, and
//! each is answered with the status, headers and body the usage route
//! would have answered.

use actix_web::body::MessageBody;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde_json::value::RawValue;

use super::AppState;
use super::auth::Scope;
use super::extract::{Body, IdempotencyHeader, Large, USAGE_BODY_LIMIT, too_large};
use super::handlers::{usage_answer, usage_request};
use super::problem::{ApiError, Kind};
use crate::domain::{EntitlementId, json};
use crate::engine::UsageRequest;
use crate::nodes::coalesce::{NodeAnswer, NodeAnswers, NodeCall, NodeCalls};

/// Internal: usage calls another node sent on together to this owner.
#[utoipa::path(
    post,
    path = "/v1/nodes/usage",
    tag = "nodes",
    request_body(content = serde_json::Value, description = "`{\"calls\": [{\"entitlement\", \"authorization\", \"idempotency_key\", \"body\"}]}`: each call as its client sent it.", content_type = "application/json"),
    responses(
        (status = 200, description = "`{\"answers\": [{\"status\", \"headers\", \"body\"}]}`: each call's answer, in order, as the usage route gives it.", body = serde_json::Value),
        (status = 400, description = "`invalid_json` or `invalid_request`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`: the request does not carry the cluster secret.", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not_found`: this node is alone (no cluster secret).", body = super::openapi::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`.", body = super::openapi::Problem, content_type = "application/problem+json"),
        super::openapi::CommonErrors,
    ),
    security(("node" = [])),
)]
pub async fn node_usage(
    req: HttpRequest,
    Body(body, ..): Body<Large>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let Some(forwarder) = &state.forwarder else {
        return Err(ApiError::new(
            Kind::NotFound,
            "this node is alone (no cluster secret): no calls come from other nodes",
        ));
    };
    if !forwarder.is_from_a_node(req.headers()) {
        return Err(ApiError::new(
            Kind::Forbidden,
            "only another node may send calls here (with the cluster secret); client and admin tokens do not open it",
        ));
    }
    let NodeCalls { calls } = json::decode(&body)?;
    if calls.len() > crate::nodes::coalesce::MAX_CALLS {
        return Err(ApiError::new(
            Kind::BatchTooLarge,
            format!(
                "{} calls; at most {}",
                calls.len(),
                crate::nodes::coalesce::MAX_CALLS
            ),
        ));
    }
    let (mut valid, mut valid_idx) = (Vec::new(), Vec::new());
    let (mut refused, mut refused_idx) = (Vec::new(), Vec::new());
    for (i, call) in calls.iter().enumerate() {
        match check(&state, call) {
            Ok(ev) => {
                valid.push(ev);
                valid_idx.push(i);
            }
            Err(e) => {
                refused.push(Err(e));
                refused_idx.push(i);
            }
        }
    }
    // From here on every call is answered in its slot: nothing fails whole
    // once calls were decided.
    let decided = state
        .engine
        .consume_batch(valid)
        .await
        .into_iter()
        .map(|r| {
            r.map_err(ApiError::from)
                .and_then(|reply| usage_answer(reply, || state.engine.now()))
        });
    let answers = super::forwarding::scatter(
        calls.len(),
        [(refused_idx, refused), (valid_idx, decided.collect())],
        || Err(ApiError::from(crate::engine::EngineError::ActorUnavailable)),
    );
    let out = answers
        .into_iter()
        .map(|a| relayable(a.unwrap_or_else(|e| e.error_response())))
        .collect();
    let body = serde_json::to_vec(&NodeAnswers { answers: out }).map_err(ApiError::encoding)?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// A call checked as the usage route checks it: token, entitlement,
/// `Idempotency-Key` header, body.
fn check(state: &AppState, call: &NodeCall) -> Result<(EntitlementId, UsageRequest), ApiError> {
    state
        .auth
        .require_authorization(call.authorization.as_deref(), Scope::Client)?;
    let id = EntitlementId::parse(&call.entitlement)?;
    let header = call
        .idempotency_key
        .as_deref()
        .map(IdempotencyHeader::parse)
        .transpose()?;
    if call.body.len() > USAGE_BODY_LIMIT {
        return Err(too_large(USAGE_BODY_LIMIT));
    }
    Ok((id, usage_request(call.body.as_bytes(), header)?))
}

/// An answer as the receiving node relays it.
fn relayable(response: HttpResponse) -> NodeAnswer {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter(|(n, _)| *n != actix_web::http::header::CONTENT_LENGTH)
        .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
        .collect();
    // Our answers' bodies are JSON held in memory.
    let body = response
        .into_body()
        .try_into_bytes()
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_else(|| {
            RawValue::from_string(r#"{"title":"the answer could not be relayed"}"#.into())
                .expect("constant JSON")
        });
    NodeAnswer {
        status,
        headers,
        body,
    }
}
