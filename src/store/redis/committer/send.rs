//! Sending a round of calls: one pipeline on a standalone Redis, each
//! call to its node on a cluster; `WAIT` for the replicas after writes;
//! calls that did not run for a reason that passes tried again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::SingleNodeRoutingInfo;

use super::{CommitterCore, GRACE};
use crate::store::StoreError;
use crate::store::redis::link::Conn;
use crate::store::redis::scripts::{COMMIT_LUA, LOAD_LUA};

/// Why one call of a pipeline failed.
#[derive(Clone, Debug)]
pub(super) enum CallError {
    Redis(redis::RedisError),
    /// It ran on the primary, and `WAIT` saw fewer replicas acknowledge it
    /// than asked for.
    NotReplicated {
        reached: u64,
        wanted: u32,
    },
}

impl CallError {
    pub(super) fn into_store(self, op: &'static str) -> StoreError {
        match self {
            CallError::Redis(e) => StoreError::redis(op, e),
            CallError::NotReplicated { reached, wanted } => StoreError::NotReplicated {
                op,
                reached,
                wanted,
            },
        }
    }

    /// Redis refused it before it ran, for a reason that passes: a
    /// redirect or a resharding or failover in progress (tried again), or a
    /// script it does not know yet (loaded, then tried again).
    fn did_not_run(&self) -> Option<&str> {
        match self {
            CallError::Redis(e) => e.code().filter(|c| {
                matches!(
                    *c,
                    "NOSCRIPT"
                        | "MOVED"
                        | "ASK"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                        | "MASTERDOWN"
                        | "LOADING"
                )
            }),
            CallError::NotReplicated { .. } => None,
        }
    }
}

pub(super) type CallResult = Result<Value, CallError>;

/// One script call or command of a pipeline, and whether it writes (a
/// commit, or a load, which bumps the epoch): writes wait for the replicas.
pub(super) struct Call {
    pub cmd: redis::Cmd,
    pub write: bool,
}

/// How long a call that did not run waits before it is tried again.
const AGAIN_AFTER: Duration = Duration::from_millis(20);

impl CommitterCore {
    /// `WAIT` for the configured replicas, its timeout what is left until
    /// `by` (the first caller's deadline, so that it answers in time).
    fn wait_cmd(&self, by: Instant) -> Option<redis::Cmd> {
        let wanted = self.settings.redis_wait_replicas;
        (wanted > 0).then(|| {
            // A margin for the answer to come back before the caller stops
            // waiting for it.
            let left = by
                .saturating_duration_since(Instant::now())
                .saturating_sub(2 * GRACE);
            let mut cmd = redis::cmd("WAIT");
            cmd.arg(wanted).arg(left.as_millis().max(1) as u64);
            cmd
        })
    }

    /// What `WAIT` answered, for the writes it followed.
    fn replicated(&self, wait: Result<Value, redis::RedisError>) -> Result<(), CallError> {
        let wanted = self.settings.redis_wait_replicas;
        match wait {
            Ok(Value::Int(n)) if n >= i64::from(wanted) => Ok(()),
            Ok(Value::Int(n)) => Err(CallError::NotReplicated {
                reached: n.max(0) as u64,
                wanted,
            }),
            Ok(other) => Err(CallError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "WAIT answered",
                format!("{other:?}"),
            )))),
            Err(e) => Err(CallError::Redis(e)),
        }
    }

    /// Sends `calls` and answers one result each; each call that did not
    /// run for a reason that passes is tried again while time is left
    /// (after loading the scripts, for `NOSCRIPT`). Fails as a whole only
    /// when the connection did.
    pub(super) async fn send(
        &self,
        mut conn: Conn,
        calls: &[Call],
        (wait_by, until): (Instant, Instant),
    ) -> Result<Vec<CallResult>, StoreError> {
        let mut results: Vec<Option<CallResult>> = calls.iter().map(|_| None).collect();
        let mut todo: Vec<usize> = (0..calls.len()).collect();
        loop {
            let sent = match &mut conn {
                Conn::Single(c) => {
                    self.send_pipeline(c, calls, &todo, (wait_by, until))
                        .await?
                }
                Conn::Cluster(c) => self.send_each(c, calls, &todo, (wait_by, until)).await?,
            };
            let mut again = Vec::new();
            let mut noscript = false;
            for (i, r) in todo.iter().copied().zip(sent) {
                match r.as_ref().err().and_then(CallError::did_not_run) {
                    Some(code) if Instant::now() + AGAIN_AFTER + GRACE < until => {
                        noscript |= code == "NOSCRIPT";
                        again.push(i);
                    }
                    _ => {}
                }
                results[i] = Some(r);
            }
            if again.is_empty() {
                break;
            }
            if noscript {
                self.load_scripts(&mut conn, until).await?;
            } else {
                tokio::time::sleep(AGAIN_AFTER).await;
            }
            todo = again;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(CallError::Redis(unsent()))))
            .collect())
    }

    /// The calls `todo` in one pipeline, with one `WAIT` after them when
    /// any writes.
    async fn send_pipeline(
        &self,
        conn: &mut MultiplexedConnection,
        calls: &[Call],
        todo: &[usize],
        (wait_by, until): (Instant, Instant),
    ) -> Result<Vec<CallResult>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &i in todo {
            pipe.add_command(calls[i].cmd.clone());
        }
        let writes = todo.iter().any(|&i| calls[i].write);
        let wait = self.wait_cmd(wait_by).filter(|_| writes);
        if let Some(w) = &wait {
            pipe.add_command(w.clone());
        }
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut replies: Vec<redis::RedisResult<Value>> =
            tokio::time::timeout_at(until.into(), pipe.query_async(conn))
                .await
                .map_err(|_| self.timeout("pipeline"))?
                .map_err(|e| StoreError::redis("pipeline", e))?;
        let expected = todo.len() + usize::from(wait.is_some());
        if replies.len() != expected {
            return Err(StoreError::reply(
                "pipeline",
                format!("{} results for {expected} calls", replies.len()),
            ));
        }
        let replicated = match wait {
            Some(_) => replies.pop().map(|w| self.replicated(w)),
            None => None,
        };
        Ok(todo
            .iter()
            .zip(replies)
            .map(|(&i, r)| {
                let r = r.map_err(CallError::Redis)?;
                match &replicated {
                    Some(Err(e)) if calls[i].write => Err(e.clone()),
                    _ => Ok(r),
                }
            })
            .collect())
    }

    /// The calls `todo` on a cluster, each to the node of its slot, all at
    /// once; a write is followed by `WAIT` on its node. A call redirected
    /// (its slot is being moved, `ASK`, or was, `MOVED`) is sent to the node
    /// named at once, without waiting for the slot map to be read again.
    async fn send_each(
        &self,
        conn: &ClusterConnection,
        calls: &[Call],
        todo: &[usize],
        (wait_by, until): (Instant, Instant),
    ) -> Result<Vec<CallResult>, StoreError> {
        let sends = todo.iter().map(|&i| {
            let mut conn = conn.clone();
            let call = &calls[i];
            async move {
                let wait = || self.wait_cmd(wait_by).filter(|_| call.write);
                let first = self.send_one(&mut conn, call, wait(), None).await;
                match &first {
                    Err(CallError::Redis(e)) => match redirect(e) {
                        Some(to) => self.send_one(&mut conn, call, wait(), Some(to)).await,
                        None => first,
                    },
                    _ => first,
                }
            }
        });
        tokio::time::timeout_at(until.into(), futures_util::future::join_all(sends))
            .await
            .map_err(|_| self.timeout("pipeline"))
    }

    /// One call (and its `WAIT`) to the node of its slot, or to the node a
    /// redirect named (after `ASKING`, for an `ASK`).
    async fn send_one(
        &self,
        conn: &mut ClusterConnection,
        call: &Call,
        wait: Option<redis::Cmd>,
        redirected: Option<Redirect>,
    ) -> CallResult {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut pipe = redis::pipe();
        // Each reply on its own, its error with its code (a refusal such
        // as `OOM` is known not to have run).
        pipe.ignore_errors();
        let asking = matches!(redirected, Some(Redirect { asking: true, .. }));
        if asking {
            pipe.cmd("ASKING");
        }
        pipe.add_command(call.cmd.clone());
        let waits = wait.is_some();
        if let Some(w) = wait {
            pipe.add_command(w);
        }
        let replies = match redirected {
            Some(Redirect { to, .. }) => {
                let skip = usize::from(asking);
                conn.route_pipeline(pipe, skip, 1 + usize::from(waits), to)
                    .await
            }
            None if !waits => {
                return call
                    .cmd
                    .query_async::<Value>(conn)
                    .await
                    .map_err(CallError::Redis);
            }
            None => pipe.query_async::<Vec<Value>>(conn).await,
        }
        .map_err(CallError::Redis)?;
        let mut replies = replies.into_iter();
        let reply = replies
            .next()
            .ok_or_else(|| CallError::Redis(unsent()))?
            .extract_error()
            .map_err(CallError::Redis)?;
        if let Some(w) = replies.next() {
            self.replicated(w.extract_error())?;
        }
        Ok(reply)
    }

    /// Loads the scripts (on a cluster, on every node).
    async fn load_scripts(&self, conn: &mut Conn, until: Instant) -> Result<(), StoreError> {
        let load = async {
            for src in [COMMIT_LUA, LOAD_LUA] {
                let _: Value = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(src)
                    .query_async(&mut *conn)
                    .await
                    .map_err(|e| StoreError::redis("script load", e))?;
            }
            Ok(())
        };
        tokio::time::timeout_at(until.into(), load)
            .await
            .map_err(|_| self.timeout("script load"))?
    }
}

/// Where a redirect sends a call.
struct Redirect {
    to: SingleNodeRoutingInfo,
    /// `ASK`: the slot is being moved there; `ASKING` goes first.
    asking: bool,
}

/// The node a `MOVED` or `ASK` names (`<slot> <host>:<port>`).
fn redirect(e: &redis::RedisError) -> Option<Redirect> {
    let asking = match e.code()? {
        "ASK" => true,
        "MOVED" => false,
        _ => return None,
    };
    let (addr, _slot) = e.redirect_node()?;
    let (host, port) = addr.rsplit_once(':')?;
    Some(Redirect {
        to: SingleNodeRoutingInfo::ByAddress {
            host: host.to_string(),
            port: port.parse().ok()?,
        },
        asking,
    })
}

/// A call that was never sent (it cannot happen: every call is answered).
fn unsent() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "the call was not sent"))
}
