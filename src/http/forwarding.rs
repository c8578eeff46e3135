//! The middleware that sends a call for an entitlement another node owns
//! on to that node ([`crate::nodes::forward`]), before routing; and a
//! batch of usage events split per owner ([`spread_batch`]).

use std::rc::Rc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::{Error, ResponseError, web};
use futures_util::StreamExt;
use futures_util::future::{LocalBoxFuture, Ready, ready};

use super::AppState;
use super::batch::{self, Slot};
use super::problem::{ApiError, Kind};
use crate::domain::EntitlementId;
use crate::engine::UsageRequest;
use crate::nodes::Member;
use crate::nodes::coalesce::{NodeAnswer, NodeCall, Outcome};
use crate::nodes::forward::{FORWARDED_BY, ForwardError, Forwarder, Route, entitlement_of};

/// Wraps the application: see the module.
pub struct Forwarding;

impl<S, B> Transform<S, ServiceRequest> for Forwarding
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = Error;
    type Transform = ForwardingService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ForwardingService {
            service: Rc::new(service),
        }))
    }
}

pub struct ForwardingService<S> {
    service: Rc<S>,
}

impl<S, B> Service<ServiceRequest> for ForwardingService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<BoxBody>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let service = self.service.clone();
        Box::pin(async move {
            // Borrowed for the route; cloned only for a call that is sent on.
            let data = req.app_data::<web::Data<AppState>>();
            let forwarder = data.and_then(|s| s.forwarder.as_ref());
            let route = forwarder.map_or(Route::Local, |f| f.route(&req));
            let (state, forwarder, owner) = match (route, data, forwarder) {
                (Route::To(owner), Some(s), Some(f)) => (s.clone(), f.clone(), owner),
                (Route::Forged, ..) => {
                    let e = ApiError::new(
                        Kind::Forbidden,
                        "a call marked as sent on by another node needs the cluster secret",
                    );
                    return Ok(req.into_response(e.error_response()));
                }
                _ => {
                    return service
                        .call(req)
                        .await
                        .map(ServiceResponse::map_into_boxed_body);
                }
            };
            let (http, mut payload) = req.into_parts();
            let (limit, timeout) = (state.limits.max_body_bytes, state.limits.request_timeout);
            // The body within --max-body-bytes and --request-timeout, as the
            // routes read it: a client that trickles it holds nothing.
            let read = async {
                let mut body = actix_web::web::BytesMut::new();
                while let Some(chunk) = payload.next().await {
                    let chunk = chunk.map_err(|e| {
                        ApiError::new(Kind::InvalidRequest, format!("reading the body: {e}"))
                    })?;
                    if body.len() + chunk.len() > limit {
                        return Err(ApiError::new(
                            Kind::PayloadTooLarge,
                            format!("the body is larger than --max-body-bytes ({limit})"),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body.freeze())
            };
            let body = match tokio::time::timeout(timeout, read).await {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => return Ok(ServiceResponse::new(http, e.error_response())),
                Err(_) => {
                    let e = ApiError::new(
                        Kind::RequestTimeout,
                        format!("the body did not arrive within {timeout:?}"),
                    );
                    return Ok(ServiceResponse::new(http, e.error_response()));
                }
            };
            let mut owner = owner;
            for attempt in 0..2 {
                let failed = if let Some(call) = coalescible(&http, &body) {
                    match forwarder.coalesced(&owner, call).await {
                        Outcome::Answered(a) => return Ok(ServiceResponse::new(http, relay(a))),
                        Outcome::NotTaken(e) => e,
                        Outcome::NoAnswer(e) if safe_again(&http, &body) => e,
                        Outcome::NoAnswer(e) => return Ok(ServiceResponse::new(http, unknown(e))),
                    }
                } else {
                    match forwarder.forward(&owner, &http, body.clone()).await {
                        Ok(answer) => return Ok(ServiceResponse::new(http, answer)),
                        // Nothing was sent.
                        Err(e @ ForwardError::Unreachable { .. }) => e.to_string(),
                        // The owner died with the call, or answers no
                        // more: a call that can be applied again without
                        // effect is tried again (a keyed one replays what
                        // the owner wrote, if it did).
                        Err(e @ ForwardError::NoAnswer { .. }) if safe_again(&http, &body) => {
                            e.to_string()
                        }
                        Err(e) => return Ok(ServiceResponse::new(http, unknown(e.to_string()))),
                    }
                };
                tracing::debug!(error = %failed, "the owner did not take a call");
                // The owner that failed is passed over now: the call goes
                // to the node that owns it without that one, once; if that
                // is this node, or it fails too, the call is served here
                // (the owner epoch fences whichever write comes second).
                let next =
                    entitlement_of(http.path()).and_then(|id| forwarder.owner_elsewhere(&id));
                match next {
                    Some(next) if attempt == 0 && next.id != owner.id => owner = next,
                    _ => break,
                }
            }
            let req = ServiceRequest::from_parts(http, Payload::from(body));
            service
                .call(req)
                .await
                .map(ServiceResponse::map_into_boxed_body)
        })
    }
}

/// `504 outcome_unknown`: sent, no answer, and not safe to apply again.
fn unknown(detail: String) -> actix_web::HttpResponse {
    let mut err = ApiError::new(Kind::OutcomeUnknown, detail);
    err.retry_after = Some(1);
    err.error_response()
}

/// A usage call from a client, as it can travel with others to its owner
/// (`POST /v1/entitlements/{id}/usage`, no query, one `Authorization`
/// and at most one `Idempotency-Key` header in visible ASCII, a UTF-8
/// body); any other call is sent on by itself, as it came.
fn coalescible(req: &actix_web::HttpRequest, body: &[u8]) -> Option<NodeCall> {
    if req.method() != actix_web::http::Method::POST
        || !req.query_string().is_empty()
        || req.headers().contains_key(FORWARDED_BY)
    {
        return None;
    }
    let path = req.path();
    let id = entitlement_of(path)?;
    let rest = path.strip_prefix("/v1/entitlements/")?;
    if rest.split('/').nth(1) != Some("usage") || rest.split('/').count() != 2 {
        return None;
    }
    let one = |name: &str| -> Option<Option<String>> {
        let mut values = req.headers().get_all(name);
        let first = values.next();
        if values.next().is_some() {
            return None;
        }
        match first {
            None => Some(None),
            Some(v) => v.to_str().ok().map(|v| Some(v.to_string())),
        }
    };
    Some(NodeCall {
        entitlement: id.into_owned(),
        authorization: one("authorization")?,
        idempotency_key: one(super::extract::IDEMPOTENCY_KEY)?,
        body: std::str::from_utf8(body).ok()?.to_string(),
    })
}

/// The owner's answer to a call sent on with others, as the client gets it.
fn relay(a: NodeAnswer) -> actix_web::HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(a.status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut answer = actix_web::HttpResponse::build(status);
    for (name, value) in a.headers {
        answer.append_header((name, value));
    }
    answer.body(String::from(Box::<str>::from(a.body)))
}

/// Whether a call may be applied a second time without a second effect:
/// reads, configuration (`PUT`, `DELETE`), seats (by seat id), and usage
/// with an idempotency key (header or body). Usage without one may not.
fn safe_again(req: &actix_web::HttpRequest, body: &[u8]) -> bool {
    if !req.path().ends_with("/usage") {
        return true;
    }
    if req.headers().contains_key(super::extract::IDEMPOTENCY_KEY) {
        return true;
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("idempotency_key").map(serde_json::Value::is_string))
        .unwrap_or(false)
}

/// The answers to a batch's valid events, in order: each owner's part sent
/// on to it, all at once, this node's own part decided here meanwhile. A
/// batch sent on by another node is decided here whole (one hop).
pub(super) async fn spread_batch(
    state: &AppState,
    req: &actix_web::HttpRequest,
    events: Vec<(EntitlementId, UsageRequest)>,
) -> Vec<Slot> {
    match &state.forwarder {
        Some(f) if !req.headers().contains_key(FORWARDED_BY) => {
            let all = (0..events.len()).collect();
            distribute(state, f, req, &events, all, None, true).await
        }
        _ => slots(state.engine.consume_batch(events).await),
    }
}

/// The events at `idx`, in that order, each decided by its owner: this
/// node's decided here, every other owner's sent on to it as one part, all
/// at once. `failed`, an owner that did not take them, is passed over; with
/// `retry` false (they were sent on once already) all are decided here.
fn distribute<'a>(
    state: &'a AppState,
    forwarder: &'a Forwarder,
    req: &'a actix_web::HttpRequest,
    events: &'a [(EntitlementId, UsageRequest)],
    idx: Vec<usize>,
    failed: Option<&'a Member>,
    retry: bool,
) -> futures_util::future::LocalBoxFuture<'a, Vec<Slot>> {
    Box::pin(async move {
        let mut here = Vec::new();
        let mut away: std::collections::BTreeMap<String, (Member, Vec<usize>)> = Default::default();
        for (j, &i) in idx.iter().enumerate() {
            match forwarder.owner_elsewhere(events[i].0.as_str()) {
                Some(m) if retry && failed.is_none_or(|f| f.id != m.id) => away
                    .entry(m.id.clone())
                    .or_insert((m, Vec::new()))
                    .1
                    .push(j),
                _ => here.push(j),
            }
        }
        let local = async {
            let part = here.iter().map(|&j| events[idx[j]].clone()).collect();
            slots(state.engine.consume_batch(part).await)
        };
        let parts = away.values().map(|(owner, js)| {
            let part: Vec<usize> = js.iter().map(|&j| idx[j]).collect();
            // A part sent on after a failure is not sent on again.
            async move {
                send_part(
                    state,
                    forwarder,
                    req,
                    owner,
                    events,
                    &part,
                    failed.is_none(),
                )
                .await
            }
        });
        let (local, remote) = futures_util::join!(local, futures_util::future::join_all(parts));
        let remote = away.into_values().map(|(_, js)| js).zip(remote);
        scatter(
            idx.len(),
            std::iter::once((here, local)).chain(remote),
            || Slot::from(Err(crate::engine::EngineError::ActorUnavailable)),
        )
    })
}

/// `n` answers in order from parts of (indexes, their answers); `missing`
/// for an index no part answered (every index is in one part).
pub(super) fn scatter<T>(
    n: usize,
    parts: impl IntoIterator<Item = (Vec<usize>, Vec<T>)>,
    missing: impl Fn() -> T,
) -> Vec<T> {
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(n).collect();
    for (idx, answers) in parts {
        for (i, a) in idx.into_iter().zip(answers) {
            out[i] = Some(a);
        }
    }
    out.into_iter()
        .map(|a| a.unwrap_or_else(&missing))
        .collect()
}

fn slots(answers: Vec<Result<crate::engine::UsageReply, crate::engine::EngineError>>) -> Vec<Slot> {
    answers.into_iter().map(Slot::from).collect()
}

/// One owner's part of a batch (the events at `idx`), sent on to it. If
/// the owner cannot be reached, or is stopping, the part goes (once, when
/// `retry`) to the nodes that own its events without that owner, or is
/// decided here (the owner epoch fences the other's writes); if it was
/// sent and no answer came, so do its keyed events (they replay what the
/// owner wrote, if it did), and the others answer `outcome_unknown`.
async fn send_part(
    state: &AppState,
    forwarder: &Forwarder,
    req: &actix_web::HttpRequest,
    owner: &Member,
    events: &[(EntitlementId, UsageRequest)],
    idx: &[usize],
    retry: bool,
) -> Vec<Slot> {
    let part = || {
        distribute(
            state,
            forwarder,
            req,
            events,
            idx.to_vec(),
            Some(owner),
            retry,
        )
    };
    let body = match batch::encode_events(idx.iter().map(|&i| &events[i])) {
        Ok(b) => b,
        Err(e) => {
            let e = ApiError::encoding(e);
            return idx.iter().map(|_| Slot::Decided(Err(e.clone()))).collect();
        }
    };
    let failure = match forwarder
        .post(owner, "/v1/usage/batch", Some(req), 1, body.into())
        .await
    {
        Ok((status, body)) if status.is_success() => {
            match batch::decode_results(&body, idx.len()) {
                Some(results) => return results.into_iter().map(Slot::Relayed).collect(),
                None => format!(
                    "the owner {} answered its part of the batch with something else than its results",
                    owner.id
                ),
            }
        }
        Ok((status, _)) if status == actix_web::http::StatusCode::SERVICE_UNAVAILABLE => {
            // Stopping, or its Redis is out of reach: nothing was applied.
            return part().await;
        }
        Ok((_, body)) => {
            // Refused as a whole (nothing applied): its problem in each slot.
            let problem = std::str::from_utf8(&body)
                .ok()
                .filter(|b| {
                    serde_json::from_str::<serde_json::Value>(b).is_ok_and(|v| v.is_object())
                })
                .and_then(|b| {
                    serde_json::value::RawValue::from_string(format!(r#"{{"error":{b}}}"#)).ok()
                });
            match problem {
                Some(p) => return idx.iter().map(|_| Slot::Relayed(p.clone())).collect(),
                None => format!("the owner {} refused its part of the batch", owner.id),
            }
        }
        Err(ForwardError::Unreachable { .. }) => return part().await,
        Err(e @ ForwardError::NoAnswer { .. }) => e.to_string(),
    };
    // Sent, outcome unknown: keyed events are safe to decide again.
    let (keyed, unkeyed): (Vec<usize>, Vec<usize>) =
        (0..idx.len()).partition(|&j| events[idx[j]].1.idempotency_key.is_some());
    let again = keyed.iter().map(|&j| idx[j]).collect();
    let decided = distribute(state, forwarder, req, events, again, Some(owner), retry).await;
    let mut unknown = ApiError::new(Kind::OutcomeUnknown, failure);
    unknown.retry_after = Some(1);
    let unknowns = unkeyed
        .iter()
        .map(|_| Slot::Decided(Err(unknown.clone())))
        .collect();
    scatter(idx.len(), [(keyed, decided), (unkeyed, unknowns)], || {
        Slot::Decided(Err(unknown.clone()))
    })
}
