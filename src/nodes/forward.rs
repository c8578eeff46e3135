//! One internal hop: a call for an entitlement another live node owns is
//! sent on to that node, as it came (method, path, query, headers, body —
//! the client's token and idempotency key with it), and its answer is
//! relayed as it is. The hop is marked with this node's id and
//! authenticated with the cluster secret; the owner serves a marked call
//! itself, whatever its own view of the members (a node that left sends it
//! on once more; never a third time), so calls never go round in circles.
//! If the owner cannot be reached at all (nothing was sent), it is passed
//! over for a second and the call goes to the node that owns the
//! entitlement without it (or is served here): the owner epoch fences
//! whichever of the two writes second. If it was sent and no answer came,
//! a call that can be applied again without a second effect goes there too
//! (see `http/forwarding.rs`); one that cannot (usage without an
//! idempotency key) answers `504`: its outcome is unknown.

use std::time::{Duration, Instant};

use actix_web::dev::ServiceRequest;
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};
use subtle::ConstantTimeEq;

use super::{Member, Membership, Secret};

/// The header naming the node that sent a call on.
pub const FORWARDED_BY: &str = "headroom-forwarded-by";
/// The header that carries the cluster secret on a forwarded call.
pub const NODE_SECRET: &str = "headroom-node-secret";

/// The `Host` a client sent to the node that received a call, and the
/// client's address: what the pages check a form's origin against and
/// limit sign-ins by. Set by the receiving node, trusted only on a call
/// that carries the cluster secret.
pub const CLIENT_HOST: &str = "headroom-client-host";
pub const CLIENT_ADDRESS: &str = "headroom-client-address";

/// Headers that belong to one connection, not to the call.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// How long a member is passed over after a call sent to it found it
/// unreachable or got no answer: a paused or overloaded node costs one
/// forward timeout per second, not one per call (the owner epoch fences
/// whichever write comes second).
const SUSPECT_FOR: Duration = Duration::from_secs(1);

/// Sends calls on to their owners.
#[derive(Clone)]
pub struct Forwarder {
    membership: Membership,
    secret: Secret,
    /// Checked at start; each HTTP worker uses a client of its own built
    /// alike ([`Forwarder::client`]).
    client: reqwest::Client,
    timeout: Duration,
    /// Members that failed a forward lately, and until when they are passed over.
    suspects: std::sync::Arc<dashmap::DashMap<String, Instant>>,
}

/// Where a call is served.
pub enum Route {
    /// Here: this node owns the entitlement, or the call is not about one,
    /// or it was sent on to this node already.
    Local,
    /// At the owner.
    To(Member),
    /// Marked as forwarded, without the cluster secret.
    Forged,
}

/// Why a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Nothing reached the owner: the call can be served here.
    #[error("the owner {node} at {address} cannot be reached: {source}")]
    Unreachable {
        node: String,
        address: String,
        #[source]
        source: reqwest::Error,
    },
    /// Sent, and no (whole) answer came back in time.
    #[error("no answer from the owner {node} at {address}: {source}")]
    NoAnswer {
        node: String,
        address: String,
        #[source]
        source: reqwest::Error,
    },
}

impl Forwarder {
    /// Forwards with a client that waits at most `timeout` for an answer.
    pub fn new(
        membership: Membership,
        secret: Secret,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = build_client(timeout)?;
        Ok(Forwarder {
            membership,
            secret,
            client,
            timeout,
            suspects: Default::default(),
        })
    }

    /// Where `req` is served.
    pub fn route(&self, req: &ServiceRequest) -> Route {
        let Some(id) = entitlement_of(req.path()) else {
            return self.marked(req.headers()).unwrap_or(Route::Local);
        };
        match self.marked(req.headers()) {
            None => {}
            // A node that left sends a call it was sent on once more (the
            // sender had not seen it leave yet); a call sent on twice is
            // served where it arrives, so calls never go round in circles.
            Some(Route::Local) if self.membership.has_left() && !hopped_twice(req) => {}
            Some(route) => return route,
        }
        self.owner_elsewhere(&id).map_or(Route::Local, Route::To)
    }

    /// Where a call for `id` goes when it is not served here: the live
    /// member that owns it, or — while that member is passed over (a call
    /// sent to it failed in the last second) — the member that owns it
    /// once that one is gone, as every node computes alike. `None` when
    /// that is this node.
    pub fn owner_elsewhere(&self, id: &str) -> Option<Member> {
        let view = self.membership.view();
        let me = self.membership.me();
        let now = Instant::now();
        let passed_over =
            |m: &Member| m.id != me && self.suspects.get(&m.id).is_some_and(|until| now < *until);
        let owner = view.owner(id)?;
        let owner = if passed_over(owner) {
            metrics::counter!("headroom_forwards_total", "outcome" => "passed_over").increment(1);
            view.owner_among(id, |m| !passed_over(m))?
        } else {
            owner
        };
        (owner.id != me).then(|| owner.clone())
    }

    /// `None` for a call from a client; for one marked as sent on by a
    /// node, `Local` when it carries the cluster secret, else `Forged`.
    fn marked(&self, headers: &actix_web::http::header::HeaderMap) -> Option<Route> {
        headers.get(FORWARDED_BY)?;
        let given = headers
            .get(NODE_SECRET)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        Some(if bool::from(given.ct_eq(self.secret.0.as_bytes())) {
            Route::Local
        } else {
            Route::Forged
        })
    }

    /// Sends the call (`req` and its `body`) to `owner` and answers what
    /// the owner answered.
    pub async fn forward(
        &self,
        owner: &Member,
        req: &HttpRequest,
        body: Bytes,
    ) -> Result<HttpResponse, ForwardError> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
            .unwrap_or(reqwest::Method::GET);
        let (status, headers, body) = self
            .exchange(owner, method, path, Some(req), 1, body)
            .await?;
        let mut answer = HttpResponse::build(status);
        for (name, value) in &headers {
            if HOP_BY_HOP.contains(&name.as_str()) {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_str().as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) {
                answer.append_header((n, v));
            }
        }
        Ok(answer.body(body))
    }

    /// A `POST` of `body` carrying `calls` calls to `owner`'s `path`
    /// (with the client's headers of `req`, if any): one owner's part of a
    /// batch, or usage calls sent on together ([`super::coalesce`]). Answers
    /// the owner's status and body.
    pub async fn post(
        &self,
        owner: &Member,
        path: &str,
        req: Option<&HttpRequest>,
        calls: u64,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ForwardError> {
        let (status, _, body) = self
            .exchange(owner, reqwest::Method::POST, path, req, calls, body)
            .await?;
        Ok((status, body))
    }

    /// Whether `headers` mark a call from another node, with the cluster
    /// secret.
    pub fn is_from_a_node(&self, headers: &actix_web::http::header::HeaderMap) -> bool {
        matches!(self.marked(headers), Some(Route::Local))
    }

    /// One exchange with `owner` carrying `calls` calls: with the headers
    /// of the client's `req` (but those of its connection), marked and
    /// authenticated; the answer read whole.
    async fn exchange(
        &self,
        owner: &Member,
        method: reqwest::Method,
        path: &str,
        req: Option<&HttpRequest>,
        calls: u64,
        body: Bytes,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes), ForwardError> {
        let started = Instant::now();
        let url = format!("http://{}{path}", owner.address);
        let mut out = self.client().request(method, &url).body(body);
        match req {
            Some(req) => {
                for (name, value) in req.headers() {
                    if !HOP_BY_HOP.contains(&name.as_str())
                        && name != NODE_SECRET
                        && name != FORWARDED_BY
                        && name != CLIENT_HOST
                        && name != CLIENT_ADDRESS
                    {
                        out = out.header(name.as_str(), value.as_bytes());
                    }
                }
                let (host, address) = client_of(req, self.is_from_a_node(req.headers()));
                if let Some(host) = host {
                    out = out.header(CLIENT_HOST, host);
                }
                if let Some(address) = address {
                    out = out.header(CLIENT_ADDRESS, address);
                }
            }
            None => out = out.header("content-type", "application/json"),
        }
        // The nodes it went through, this one first.
        let by = match req
            .and_then(|r| r.headers().get(FORWARDED_BY))
            .and_then(|v| v.to_str().ok())
        {
            Some(earlier) => format!("{}, {earlier}", self.membership.me()),
            None => self.membership.me().to_string(),
        };
        out = out
            .header(FORWARDED_BY, by)
            .header(NODE_SECRET, &*self.secret.0);
        let outcome = |o: &'static str| {
            metrics::counter!("headroom_forwards_total", "outcome" => o).increment(calls);
            metrics::histogram!("headroom_forward_duration_seconds")
                .record(started.elapsed().as_secs_f64());
        };
        let failed = |source: reqwest::Error| {
            let (node, address) = (owner.id.clone(), owner.address.clone());
            if self
                .suspects
                .insert(node.clone(), Instant::now() + SUSPECT_FOR)
                .is_none()
            {
                tracing::warn!(node = %node, address = %address, error = %source, "a call sent on to its owner failed; passing it over for a second");
            }
            if source.is_connect() {
                outcome("unreachable");
                ForwardError::Unreachable {
                    node,
                    address,
                    source,
                }
            } else {
                outcome("no_answer");
                ForwardError::NoAnswer {
                    node,
                    address,
                    source,
                }
            }
        };
        let sent = out.send().await.map_err(failed)?;
        let status = StatusCode::from_u16(sent.status().as_u16())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = sent.headers().clone();
        let body = sent.bytes().await.map_err(failed)?;
        outcome("answered");
        Ok((status, headers, body))
    }
}

fn build_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .pool_max_idle_per_host(64)
        // Below the owner's 5 s keep-alive: a call is never sent on a
        // connection the owner is closing at that moment (it would have
        // no answer, and a usage call without a key could not be retried).
        .pool_idle_timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

thread_local! {
    /// This thread's client, and the timeout it was built with.
    static CLIENT: std::cell::RefCell<Option<(Duration, reqwest::Client)>> =
        const { std::cell::RefCell::new(None) };
}

impl Forwarder {
    /// The client of this HTTP worker: its connections are polled by the
    /// worker that uses them (one shared client's connections would be
    /// driven by whichever worker opened them, every call waking another
    /// thread).
    fn client(&self) -> reqwest::Client {
        CLIENT.with(|c| {
            let mut c = c.borrow_mut();
            if let Some((t, client)) = &*c
                && *t == self.timeout
            {
                return client.clone();
            }
            let client = build_client(self.timeout).unwrap_or_else(|_| self.client.clone());
            *c = Some((self.timeout, client.clone()));
            client
        })
    }
}

/// The `Host` the client sent and the client's address: as a node that
/// sent the call on passed them (`from_a_node`: it carries the cluster
/// secret), else as this node sees them.
pub fn client_of(req: &HttpRequest, from_a_node: bool) -> (Option<String>, Option<String>) {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if from_a_node {
        return (header(CLIENT_HOST), header(CLIENT_ADDRESS));
    }
    (header("host"), req.peer_addr().map(|a| a.ip().to_string()))
}

/// Whether a call went through two nodes already.
fn hopped_twice(req: &ServiceRequest) -> bool {
    req.headers()
        .get(FORWARDED_BY)
        .is_some_and(|v| v.as_bytes().contains(&b','))
}

/// The entitlement a path is about: `/v1/entitlements/{id}` and below, and
/// its pages `/portal/e/{id}` and `/console/e/{id}` and below
/// (percent-decoded, as the handlers read it).
pub(crate) fn entitlement_of(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    let rest = path
        .strip_prefix("/v1/entitlements/")
        .or_else(|| path.strip_prefix("/portal/e/"))
        .or_else(|| path.strip_prefix("/console/e/"))?;
    let id = rest.split('/').next()?;
    if id.is_empty() {
        return None;
    }
    percent_encoding::percent_decode_str(id).decode_utf8().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entitlement_of_a_path() {
        let of = |p| entitlement_of(p).map(|c| c.into_owned());
        assert_eq!(of("/v1/entitlements/acme").as_deref(), Some("acme"));
        assert_eq!(
            of("/v1/entitlements/acme/seats/u1").as_deref(),
            Some("acme")
        );
        assert_eq!(of("/v1/entitlements/%61cme").as_deref(), Some("acme"));
        assert_eq!(entitlement_of("/v1/entitlements/"), None);
        assert_eq!(entitlement_of("/v1/usage/batch"), None);
        assert_eq!(entitlement_of("/v1/cluster"), None);
        assert_eq!(of("/portal/e/acme").as_deref(), Some("acme"));
        assert_eq!(of("/console/e/acme/history.csv").as_deref(), Some("acme"));
        assert_eq!(entitlement_of("/console"), None);
        assert_eq!(entitlement_of("/console/search"), None);
    }
}
