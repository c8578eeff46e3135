//! Usage calls for entitlements another node owns, sent on to it in
//! batches, the way Gubernator batches the requests it sends its peers:
//! per owner (and per HTTP worker), the first call goes at once, and the
//! calls that arrive while it is on its way go together in the next
//! request — up to [`MAX_IN_FLIGHT`] requests at once and [`MAX_CALLS`]
//! calls in one. No call waits for a timer; under load one internal
//! request carries many calls, so the hop costs the owner one request, not
//! one per call (BENCHMARKS.md: the nodes bench).
//!
//! Each call travels as its client sent it (token, `Idempotency-Key`
//! header, body) to `POST /v1/nodes/usage`, where the owner checks and
//! decides it as if it had come directly, and answers with the status,
//! headers and body it would have answered; the receiving node relays them.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::Member;
use super::forward::{ForwardError, Forwarder};

/// The owner's endpoint for calls sent on in batches.
pub const PATH: &str = "/v1/nodes/usage";
/// Most calls in one request to an owner.
pub const MAX_CALLS: usize = 1_000;
/// Most requests on their way to one owner at once, per HTTP worker.
pub const MAX_IN_FLIGHT: usize = 1;

/// One usage call as its client sent it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCall {
    /// The entitlement of the path (percent-decoded).
    pub entitlement: String,
    /// The `Authorization` header's value, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
    /// The `Idempotency-Key` header's value, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The body, as sent.
    pub body: String,
}

/// A batch of calls.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCalls {
    pub calls: Vec<NodeCall>,
}

/// The owner's answer to one call: what it would have answered the client.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Box<RawValue>,
}

#[derive(Serialize, Deserialize)]
pub struct NodeAnswers {
    pub answers: Vec<NodeAnswer>,
}

/// What became of a call sent on in a batch.
#[derive(Debug)]
pub enum Outcome {
    /// The owner's answer, to relay.
    Answered(NodeAnswer),
    /// The owner did not take it (unreachable, or it refused the request
    /// whole before deciding anything): serve it here.
    NotTaken(String),
    /// Sent, and no answer came: it may have been applied.
    NoAnswer(String),
}

/// The calls waiting for one owner, on one HTTP worker.
struct Queue {
    owner: Member,
    waiting: RefCell<VecDeque<(NodeCall, oneshot::Sender<Outcome>)>>,
    in_flight: Cell<usize>,
}

thread_local! {
    /// Each worker's queues, by owner id and address.
    static QUEUES: RefCell<HashMap<(String, String), Rc<Queue>>> = RefCell::new(HashMap::new());
}

impl Forwarder {
    /// Sends `call` on to `owner` with the others waiting for it, and
    /// answers what became of it.
    pub async fn coalesced(&self, owner: &Member, call: NodeCall) -> Outcome {
        let key = (owner.id.clone(), owner.address.clone());
        let queue = QUEUES.with(|q| {
            q.borrow_mut()
                .entry(key)
                .or_insert_with(|| {
                    Rc::new(Queue {
                        owner: owner.clone(),
                        waiting: RefCell::new(VecDeque::new()),
                        in_flight: Cell::new(0),
                    })
                })
                .clone()
        });
        let (tx, rx) = oneshot::channel();
        queue.waiting.borrow_mut().push_back((call, tx));
        if queue.in_flight.get() < MAX_IN_FLIGHT {
            queue.in_flight.set(queue.in_flight.get() + 1);
            let forwarder = self.clone();
            actix_rt::spawn(async move {
                forwarder.send_waiting(&queue).await;
                queue.in_flight.set(queue.in_flight.get() - 1);
            });
        }
        rx.await
            .unwrap_or_else(|_| Outcome::NoAnswer("the request that carried it was dropped".into()))
    }

    /// Sends what waits in `queue`, a batch at a time, until nothing does.
    async fn send_waiting(&self, queue: &Queue) {
        loop {
            // Let the worker's other ready tasks (calls it is reading)
            // queue theirs first: a fuller request, no timer.
            tokio::task::yield_now().await;
            let batch: Vec<_> = {
                let mut waiting = queue.waiting.borrow_mut();
                let n = waiting.len().min(MAX_CALLS);
                waiting.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let (calls, replies): (Vec<NodeCall>, Vec<_>) = batch.into_iter().unzip();
            metrics::histogram!("headroom_forward_batch_size").record(calls.len() as f64);
            let outcomes = self.send_batch(&queue.owner, NodeCalls { calls }).await;
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
    }

    /// One request to `owner` with `batch`: an outcome per call, in order.
    async fn send_batch(&self, owner: &Member, batch: NodeCalls) -> Vec<Outcome> {
        let n = batch.calls.len();
        let all = |make: &dyn Fn() -> Outcome| (0..n).map(|_| make()).collect();
        let body = match serde_json::to_vec(&batch) {
            Ok(b) => b,
            Err(e) => return all(&|| Outcome::NotTaken(format!("not encoded: {e}"))),
        };
        match self
            .post(owner, PATH, None, n as u64, Bytes::from(body))
            .await
        {
            Ok((status, body)) if status == StatusCode::OK => {
                match serde_json::from_slice::<NodeAnswers>(&body) {
                    Ok(a) if a.answers.len() == n => {
                        a.answers.into_iter().map(Outcome::Answered).collect()
                    }
                    _ => all(&|| {
                        Outcome::NoAnswer(format!(
                            "the owner {} answered something else than {n} answers",
                            owner.id
                        ))
                    }),
                }
            }
            // Refused whole (its secret, its size, or it is not among
            // several): nothing was decided.
            Ok((status, _)) => all(&|| {
                Outcome::NotTaken(format!(
                    "the owner {} refused the calls: {status}",
                    owner.id
                ))
            }),
            Err(e @ ForwardError::Unreachable { .. }) => {
                let e = e.to_string();
                all(&|| Outcome::NotTaken(e.clone()))
            }
            Err(e @ ForwardError::NoAnswer { .. }) => {
                let e = e.to_string();
                all(&|| Outcome::NoAnswer(e.clone()))
            }
        }
    }
}
