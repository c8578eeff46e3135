//! What can go wrong talking to a store, each error with its cause and one
//! [`ErrorClass`] decided here, where the cause is known.

use std::sync::Arc;
use std::time::Duration;

/// What a caller may conclude from a failed store operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The store could not be reached or did not answer; nothing is known to
    /// have changed, and trying again later may work.
    Transient,
    /// Known not to have been applied: never sent, or refused by Redis
    /// before it ran (out of memory), or refused by the script for running
    /// after its deadline.
    Refused,
    /// A write was sent and its answer never came: it may have been applied.
    Unknown,
    /// What is stored cannot be read: trying again does not help.
    Corrupt,
    /// A write ran on the primary but did not reach the replicas asked for
    /// (`--redis-wait-replicas`) in time: a failover may lose it, or not.
    /// Final: a read-back on the primary would find it and must not
    /// acknowledge it.
    NotReplicated,
}

/// The cause of a failure below the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Pool(Arc<deadpool_redis::PoolError>),
    #[error(transparent)]
    Build(Arc<deadpool_redis::BuildError>),
    #[error(transparent)]
    Json(Arc<serde_json::Error>),
    /// Redis answered something the protocol of our scripts does not allow.
    #[error("unexpected reply: {0}")]
    Reply(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis did not answer, or answered an error.
    #[error("{op}: {source}")]
    Redis {
        op: &'static str,
        class: ErrorClass,
        #[source]
        source: Cause,
    },
    #[error("{op}: no answer within {after:?}")]
    Timeout {
        op: &'static str,
        /// [`ErrorClass::Unknown`] for a write that was sent.
        class: ErrorClass,
        after: Duration,
    },
    /// Known not to have been applied (see [`ErrorClass::Refused`]).
    #[error("{op} refused: {reason}")]
    Refused {
        op: &'static str,
        reason: &'static str,
        #[source]
        source: Option<Cause>,
    },
    #[error("stored state of {id} is unreadable: {what}")]
    Corrupt {
        id: String,
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// The data under the prefix was written in another key layout (another
    /// bucket count, or the layout before buckets): nothing is read or
    /// written, so that two layouts never mix.
    #[error("{0}")]
    Layout(String),
    #[error(
        "{op}: written on the Redis primary but acknowledged by {reached} of the {wanted} replicas asked for in time"
    )]
    NotReplicated {
        op: &'static str,
        reached: u64,
        wanted: u32,
    },
    #[error("the store is shutting down")]
    ShuttingDown,
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Redis { class, .. } | StoreError::Timeout { class, .. } => *class,
            StoreError::Refused { .. } | StoreError::Layout(_) | StoreError::ShuttingDown => {
                ErrorClass::Refused
            }
            StoreError::Corrupt { .. } => ErrorClass::Corrupt,
            StoreError::NotReplicated { .. } => ErrorClass::NotReplicated,
        }
    }

    /// An error of Redis's or of the connection. `OOM` means Redis
    /// refused the whole script before it ran (scripts are declared
    /// `#!lua`), and a Redis Cluster's redirects and `TRYAGAIN`,
    /// `CLUSTERDOWN`, `MASTERDOWN` and `LOADING` that it refused the command
    /// before running it; anything else is transient (see
    /// [`StoreError::sent_write`]).
    pub fn redis(op: &'static str, e: redis::RedisError) -> Self {
        let refused = match e.code() {
            Some("OOM") => Some("Redis is out of memory"),
            Some("MOVED" | "ASK" | "TRYAGAIN") => {
                Some("the Redis Cluster is moving the slot (resharding)")
            }
            Some("CLUSTERDOWN" | "MASTERDOWN") => {
                Some("the Redis Cluster has no primary for the slot (failover)")
            }
            Some("LOADING") => Some("Redis is loading its data"),
            Some("NOSCRIPT") => Some("Redis does not know the script"),
            _ => None,
        };
        if let Some(reason) = refused {
            return StoreError::Refused {
                op,
                reason,
                source: Some(Cause::Redis(e)),
            };
        }
        StoreError::Redis {
            op,
            class: ErrorClass::Transient,
            source: Cause::Redis(e),
        }
    }

    pub fn timeout(op: &'static str, after: Duration) -> Self {
        StoreError::Timeout {
            op,
            class: ErrorClass::Transient,
            after,
        }
    }

    /// The same failure, of a write that was sent: whatever did not refuse
    /// it up front leaves its outcome unknown.
    pub fn sent_write(self) -> Self {
        match self {
            StoreError::Redis {
                op,
                class: ErrorClass::Transient,
                source,
            } => StoreError::Redis {
                op,
                class: ErrorClass::Unknown,
                source,
            },
            StoreError::Timeout {
                op,
                class: ErrorClass::Transient,
                after,
            } => StoreError::Timeout {
                op,
                class: ErrorClass::Unknown,
                after,
            },
            other => other,
        }
    }

    /// A failure before anything was sent: the operation was not applied.
    pub fn not_sent(op: &'static str, reason: &'static str, source: Option<Cause>) -> Self {
        StoreError::Refused { op, reason, source }
    }

    /// Redis answered in a shape our protocol does not allow.
    pub fn reply(op: &'static str, what: impl Into<String>) -> Self {
        StoreError::Redis {
            op,
            class: ErrorClass::Transient,
            source: Cause::Reply(what.into()),
        }
    }

    pub fn corrupt(id: impl ToString, what: impl Into<String>, source: Option<Cause>) -> Self {
        StoreError::Corrupt {
            id: id.to_string(),
            what: what.into(),
            source,
        }
    }

    /// The error code Redis answered (`BUSYGROUP`, `NOSCRIPT`, …), also
    /// from within a pipeline (its first failing command's).
    pub fn redis_code(&self) -> Option<String> {
        let StoreError::Redis {
            source: Cause::Redis(e),
            ..
        } = self
        else {
            return None;
        };
        e.clone()
            .into_server_errors()
            .and_then(|errors| errors.first().map(|(_, e)| e.code().to_string()))
    }
}

impl From<serde_json::Error> for Cause {
    fn from(e: serde_json::Error) -> Self {
        Cause::Json(Arc::new(e))
    }
}

/// Formats an error with its chain of causes, `outer: inner: innermost`,
/// for logs and problem details.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // `#[error(transparent)]` and `{source}` in a message repeat a cause.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_from_the_cause() {
        let io = || redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(
            StoreError::redis("load", io()).class(),
            ErrorClass::Transient
        );
        assert_eq!(
            StoreError::redis("commit", io()).sent_write().class(),
            ErrorClass::Unknown
        );
        let late = StoreError::not_sent("commit", "waited past its deadline", None);
        assert_eq!(late.sent_write().class(), ErrorClass::Refused);
        assert_eq!(
            StoreError::corrupt("acme", "core", None).class(),
            ErrorClass::Corrupt
        );
    }

    #[test]
    fn a_chain_names_every_cause_once() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let e = StoreError::redis("commit", io);
        let text = chain(&e);
        assert!(text.starts_with("commit: "), "{text}");
        assert_eq!(
            text.to_lowercase().matches("broken pipe").count(),
            1,
            "{text}"
        );
    }
}
