//! The middleware that sends a call for an entitlement another node owns
//! on to that node ([`crate::nodes::forward`]), before routing.

use std::rc::Rc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::{Error, ResponseError, web};
use futures_util::StreamExt;
use futures_util::future::{LocalBoxFuture, Ready, ready};

use super::AppState;
use super::problem::{ApiError, Kind};
use crate::nodes::forward::{ForwardError, Route};

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
            let state = req.app_data::<web::Data<AppState>>().cloned();
            let forwarder = state.as_ref().and_then(|s| s.forwarder.clone());
            let route = forwarder.as_ref().map_or(Route::Local, |f| f.route(&req));
            let (forwarder, state, owner) = match (route, forwarder, state) {
                (Route::To(owner), Some(f), Some(s)) => (f, s, owner),
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
            let limit = state.limits.max_body_bytes;
            let mut body = actix_web::web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk = chunk?;
                if body.len() + chunk.len() > limit {
                    let e = ApiError::new(
                        Kind::PayloadTooLarge,
                        format!("the body is larger than --max-body-bytes ({limit})"),
                    );
                    return Ok(ServiceResponse::new(http, e.error_response()));
                }
                body.extend_from_slice(&chunk);
            }
            let body = body.freeze();
            let serve_here = match forwarder.forward(&owner, &http, body.clone()).await {
                Ok(answer) => return Ok(ServiceResponse::new(http, answer)),
                // Nothing was sent: served here; the epoch fences whichever
                // write comes second.
                Err(e @ ForwardError::Unreachable { .. }) => e,
                // The owner died with the call, or answers no more: a call
                // that can be applied again without effect is served here
                // (a keyed one replays what the owner wrote, if it did).
                Err(e @ ForwardError::NoAnswer { .. }) if safe_again(&http, &body) => e,
                Err(e @ ForwardError::NoAnswer { .. }) => {
                    let mut err = ApiError::new(Kind::OutcomeUnknown, e.to_string());
                    err.retry_after = Some(1);
                    return Ok(ServiceResponse::new(http, err.error_response()));
                }
            };
            tracing::debug!(error = %serve_here, "serving here a call its owner did not take");
            let req = ServiceRequest::from_parts(http, Payload::from(body));
            service
                .call(req)
                .await
                .map(ServiceResponse::map_into_boxed_body)
        })
    }
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
