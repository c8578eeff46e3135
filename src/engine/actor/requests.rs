//! The requests an entitlement actor answers, each an actix message whose
//! `Result` is its own answer type, so that a wrong answer does not compile.
//!
//! A call's answer waits for its write (group commit), long after the
//! handler returned; actix hands its reply channel to the handler's result
//! ([`Deferred`]) only then. The two meet in a [`Reply`]: whichever of the
//! answer and the channel comes second sends.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::EntitlementActor;
use crate::domain::{
    CustomerCaps, EntitlementConfig, EntitlementView, ReleaseResult, SeatDecision, SeatId, SeatView,
};
use crate::engine::{Configured, EngineError, UsageReply, UsageRequest};
use crate::telemetry;

/// A request to an entitlement's actor.
pub(crate) trait Request: Filed + Send + 'static + Sized {
    type Answer: Send + 'static;
    /// Applies the request to the actor's state (in memory; the write
    /// follows).
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<Self::Answer, EngineError>;
    /// The usage a granted answer adds to the history.
    fn usage(_answer: &Self::Answer) -> impl Iterator<Item = &UsageReply> {
        std::iter::empty()
    }
    /// Counts the answer's decisions, once it is durable.
    fn count(_answer: &Self::Answer) {}
}

/// A request with the instant it was sent (for the mailbox wait).
pub(crate) struct Call<R> {
    pub request: R,
    pub sent: Instant,
}

impl<R> Call<R> {
    pub fn new(request: R) -> Self {
        Call {
            request,
            sent: Instant::now(),
        }
    }
}

impl<R: Request> Message for Call<R> {
    type Result = Result<R::Answer, EngineError>;
}

#[derive(Clone, Debug)]
pub(crate) struct Activate(pub SeatId);
#[derive(Clone, Debug)]
pub(crate) struct Release(pub SeatId);
#[derive(Clone, Debug)]
pub(crate) struct Consume(pub UsageRequest);
/// Many usage events of one entitlement, decided one after the other.
#[derive(Clone, Debug)]
pub(crate) struct ConsumeBatch(pub Arc<Vec<UsageRequest>>);
#[derive(Clone, Debug)]
pub(crate) struct Configure(pub Box<EntitlementConfig>, pub crate::engine::Precondition);
/// The customer's own ceilings, applied to the configuration the actor
/// holds (no other change can slip in between reading and writing it).
#[derive(Clone, Debug)]
pub(crate) struct SetCustomerCaps(pub Box<CustomerCaps>);
#[derive(Clone, Debug)]
pub(crate) struct Delete;
#[derive(Clone, Debug)]
pub(crate) struct Get;
#[derive(Clone, Debug)]
pub(crate) struct ListSeats;
/// The sweep timer's housekeeping: nobody waits for it.
#[derive(Clone, Debug)]
pub(crate) struct Sweep;

/// A read's answer (an entitlement that does not exist is an answer too),
/// with the owner epoch the actor held when it read: the engine checks it
/// against the store's before it trusts what memory said (another node may
/// have taken the entitlement since).
pub(crate) struct Held<T> {
    pub result: Result<T, EngineError>,
    pub epoch: u64,
}

/// Asks the actor to write what it holds and stop (graceful shutdown);
/// answered when it has stopped.
pub(crate) struct Drain;

impl Message for Drain {
    type Result = Result<(), EngineError>;
}

impl Request for Activate {
    type Answer = SeatDecision;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<SeatDecision, EngineError> {
        let (e, fx) = act.state_and_effects()?;
        Ok(e.activate(&self.0, now, fx))
    }
    fn count(d: &SeatDecision) {
        telemetry::engine::decision("activate", d.outcome, d.reason);
    }
}

impl Request for Release {
    type Answer = ReleaseResult;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<ReleaseResult, EngineError> {
        let (e, fx) = act.state_and_effects()?;
        Ok(e.release(&self.0, now, fx))
    }
}

fn count_usage(r: &UsageReply) {
    if !r.replayed {
        telemetry::engine::decision("usage", r.decision.outcome, r.decision.reason);
    }
}

impl Request for Consume {
    type Answer = UsageReply;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<UsageReply, EngineError> {
        act.usage(&self.0, now)
    }
    fn usage(answer: &UsageReply) -> impl Iterator<Item = &UsageReply> {
        std::iter::once(answer)
    }
    fn count(r: &UsageReply) {
        count_usage(r);
    }
}

impl Request for ConsumeBatch {
    type Answer = Vec<Result<UsageReply, EngineError>>;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<Self::Answer, EngineError> {
        act.state_and_effects()?;
        Ok(self.0.iter().map(|r| act.usage(r, now)).collect())
    }
    fn usage(answer: &Self::Answer) -> impl Iterator<Item = &UsageReply> {
        answer.iter().flatten()
    }
    fn count(answer: &Self::Answer) {
        answer.iter().flatten().for_each(count_usage);
    }
}

impl Request for Configure {
    /// Boxed: a view is large, and every waiting call is as large as the
    /// largest answer.
    type Answer = Box<Configured>;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<Box<Configured>, EngineError> {
        self.1.check(act.state.as_ref().map(|e| &e.config))?;
        Ok(Box::new(act.configure(&self.0, now)))
    }
}

impl Request for SetCustomerCaps {
    type Answer = Box<Configured>;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<Box<Configured>, EngineError> {
        let (e, _) = act.state_and_effects()?;
        let config = self.0.applied_to(&e.config).map_err(EngineError::Invalid)?;
        if config == e.config {
            return Ok(Box::new(Configured {
                created: false,
                view: e.view(),
            }));
        }
        Ok(Box::new(act.configure(&config, now)))
    }
}

impl Request for Delete {
    type Answer = ();
    fn apply(&self, act: &mut EntitlementActor, now: DateTime<Utc>) -> Result<(), EngineError> {
        act.delete(now)
    }
}

impl Request for Get {
    type Answer = Held<Box<EntitlementView>>;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<Self::Answer, EngineError> {
        let epoch = act.epoch;
        let result = act.state_and_effects().map(|(e, fx)| {
            e.housekeeping(now, fx);
            Box::new(e.view())
        });
        Ok(Held { result, epoch })
    }
}

impl Request for ListSeats {
    type Answer = Held<Vec<SeatView>>;
    fn apply(
        &self,
        act: &mut EntitlementActor,
        now: DateTime<Utc>,
    ) -> Result<Self::Answer, EngineError> {
        let epoch = act.epoch;
        let result = act.state_and_effects().map(|(e, fx)| {
            e.housekeeping(now, fx);
            e.seat_list()
        });
        Ok(Held { result, epoch })
    }
}

impl Request for Sweep {
    type Answer = ();
    fn apply(&self, act: &mut EntitlementActor, now: DateTime<Utc>) -> Result<(), EngineError> {
        if let Ok((e, fx)) = act.state_and_effects() {
            e.housekeeping(now, fx);
        }
        Ok(())
    }
}

enum Meeting<T> {
    Neither,
    Answer(Result<T, EngineError>),
    Channel(OneshotSender<Result<T, EngineError>>),
    Done,
}

/// The actor's end of a call's answer.
pub(crate) struct Reply<T>(Rc<RefCell<Meeting<T>>>);

/// The handler's result: takes actix's reply channel to the [`Reply`].
pub(crate) struct Deferred<T>(Rc<RefCell<Meeting<T>>>);

pub(crate) fn reply<T>() -> (Reply<T>, Deferred<T>) {
    let meeting = Rc::new(RefCell::new(Meeting::Neither));
    (Reply(meeting.clone()), Deferred(meeting))
}

impl<T> Reply<T> {
    pub fn send(self, answer: Result<T, EngineError>) {
        let mut m = self.0.borrow_mut();
        match std::mem::replace(&mut *m, Meeting::Done) {
            Meeting::Channel(tx) => {
                let _ = tx.send(answer);
            }
            Meeting::Neither => *m = Meeting::Answer(answer),
            // Answered already, or nobody waits (a sweep, a caller gone).
            Meeting::Answer(a) => *m = Meeting::Answer(a),
            Meeting::Done => {}
        }
    }
}

impl<M, T> MessageResponse<EntitlementActor, M> for Deferred<T>
where
    M: Message<Result = Result<T, EngineError>>,
    T: 'static,
{
    fn handle(self, _: &mut Context<EntitlementActor>, tx: Option<OneshotSender<M::Result>>) {
        let mut m = self.0.borrow_mut();
        match (std::mem::replace(&mut *m, Meeting::Done), tx) {
            (Meeting::Answer(a), Some(tx)) => {
                let _ = tx.send(a);
            }
            (Meeting::Neither, Some(tx)) => *m = Meeting::Channel(tx),
            _ => {}
        }
    }
}

/// A decided call: its request (to decide it again if its state was never
/// written), where its answer goes, and the answer.
pub(crate) struct Decided<R: Request> {
    pub request: R,
    pub reply: Reply<R::Answer>,
    pub answer: Result<R::Answer, EngineError>,
}

impl<R: Request> Decided<R> {
    fn answer(self) {
        if let Ok(a) = &self.answer {
            R::count(a);
        }
        self.reply.send(self.answer);
    }

    fn fail(self, e: &EngineError) {
        self.reply.send(Err(e.clone()));
    }

    fn decide_again(self, act: &mut EntitlementActor) {
        act.decide(self.request, self.reply);
    }
}

/// Files a decided call among those waiting for the write (declared for
/// each request type by `waiting!`).
pub(crate) trait Filed: Sized {
    fn wait(decided: Decided<Self>) -> Waiting
    where
        Self: Request;
}

/// Declares [`Waiting`], a call waiting for its write of any of these
/// request types, and `each_waiting!`, which runs code on the [`Decided`]
/// inside whichever it is.
macro_rules! waiting {
    ($($kind:ident),* $(,)?) => {
        pub(crate) enum Waiting {
            $($kind(Decided<$kind>),)*
        }

        $(impl Filed for $kind {
            fn wait(d: Decided<Self>) -> Waiting {
                Waiting::$kind(d)
            }
        })*

        macro_rules! each_waiting {
            ($w:expr, $d:ident => $body:expr) => {
                match $w {
                    $(Waiting::$kind($d) => $body,)*
                }
            };
        }
    };
}

waiting!(
    Activate,
    Release,
    Consume,
    ConsumeBatch,
    Configure,
    SetCustomerCaps,
    Delete,
    Get,
    ListSeats,
    Sweep,
);

impl Waiting {
    /// Sends the answer (its write is durable) and counts its decisions.
    pub fn answer(self) {
        each_waiting!(self, d => d.answer())
    }

    /// Answers `e` instead of the decision (its write failed).
    pub fn fail(self, e: &EngineError) {
        each_waiting!(self, d => d.fail(e))
    }

    /// Decides the call again, on state read back from the store.
    pub fn decide_again(self, act: &mut EntitlementActor) {
        each_waiting!(self, d => d.decide_again(act))
    }
}

/// A call received while the entitlement's state is unknown: decided once
/// it is read back (its placeholder answer is never sent; a read that fails
/// answers it with the read's error).
pub(crate) fn undecided<R: Request>(request: R, reply: Reply<R::Answer>) -> Waiting {
    R::wait(Decided {
        request,
        reply,
        answer: Err(EngineError::ActorUnavailable),
    })
}
