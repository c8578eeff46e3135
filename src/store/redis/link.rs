//! How headroom reaches Redis: one standalone server through a
//! deadpool-redis pool, or a Redis Cluster through redis-rs's cluster
//! connection (one multiplexed connection per node, routed by hash slot,
//! following `MOVED` by refreshing its slot map).
//!
//! The cluster connection is built with no retries of its own: a command it
//! retried after a dropped connection could run twice, and a commit must
//! run once. What cannot have run (a redirect, `TRYAGAIN` during a
//! resharding, `CLUSTERDOWN` during a failover, `NOSCRIPT` on a new
//! primary) is tried again by the committer within the call's deadline;
//! what may have run is settled by the read-back, as on a standalone Redis.
//!
//! A deadpool-redis cluster pool would add nothing: the cluster connection
//! is already shared and multiplexed.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::store::{Cause, StoreError};

/// A way to Redis, cheap to clone.
#[derive(Clone)]
pub enum Link {
    Standalone(Pool),
    Cluster(Arc<ClusterLink>),
}

/// The cluster connection, renewed from the seeds when it stops answering.
///
/// redis-rs reads the slot map again on a redirect, but not when a node
/// simply goes away: calls for the slots of a primary that died wait on
/// its address even after its replica took over. A connection that fails
/// that way (no answer, or a dropped connection) is replaced, at most once
/// a second, by a new one that reads the slot map from the live nodes.
pub struct ClusterLink {
    client: redis::cluster::ClusterClient,
    timeout: Duration,
    current: std::sync::RwLock<(ClusterConnection, std::time::Instant)>,
}

/// A cluster connection that connects in the background (the cluster need
/// not be up yet), each step bounded by `timeout`.
fn connect(client: &redis::cluster::ClusterClient, timeout: Duration) -> ClusterConnection {
    let config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    client.get_pending_async_connection_with_config(config)
}

/// How often a failing cluster connection may be renewed.
const RENEW_EVERY: Duration = Duration::from_secs(1);

impl ClusterLink {
    fn get(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// After a failure that may be a node gone: a new connection, unless
    /// one was made within [`RENEW_EVERY`].
    fn renew(&self) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.1.elapsed() >= RENEW_EVERY {
            *current = (
                connect(&self.client, self.timeout),
                std::time::Instant::now(),
            );
            tracing::debug!("renewed the Redis Cluster connection");
        }
    }
}

impl Link {
    /// A pool of connections to the Redis at `url` whose connect, response,
    /// wait and recycle steps are each bounded by `timeout`.
    pub fn standalone(url: &str, timeout: Duration, size: usize) -> Result<Link, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager = Manager::new_with_config(url, config).map_err(|e| {
            StoreError::not_sent("connect", "the Redis URL is invalid", Some(e.into()))
        })?;
        let pool = Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                StoreError::not_sent(
                    "connect",
                    "the Redis pool could not be built",
                    Some(Cause::Build(Arc::new(e))),
                )
            })?;
        Ok(Link::Standalone(pool))
    }

    /// A connection to the Redis Cluster the `seeds` belong to; it connects
    /// in the background, so the cluster need not be up yet.
    pub fn cluster(seeds: &[String], timeout: Duration) -> Result<Link, StoreError> {
        let client = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(0)
            // A node that stays unreachable (a primary that died) is
            // dropped after a few attempts, and the slot map is read again
            // from the others, which know its replica took over.
            .max_connection_attempts(std::num::NonZeroUsize::new(3).expect("3 > 0"))
            .build()
            .map_err(|e| {
                StoreError::not_sent("connect", "the cluster seeds are invalid", Some(e.into()))
            })?;
        let first = connect(&client, timeout);
        let link = ClusterLink {
            client,
            timeout,
            current: std::sync::RwLock::new((first, std::time::Instant::now())),
        };
        Ok(Link::Cluster(Arc::new(link)))
    }

    /// Tells the link a call failed with `e`: on a cluster, a failure that
    /// may mean a node went away renews the connection.
    pub fn failed(&self, e: &StoreError) {
        if let Link::Cluster(c) = self {
            let gone = match e {
                StoreError::Timeout { .. } => true,
                StoreError::Redis {
                    source: crate::store::Cause::Redis(r),
                    ..
                } => r.is_io_error() || r.is_timeout() || r.is_connection_dropped(),
                _ => false,
            };
            if gone {
                c.renew();
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Link::Cluster(_))
    }

    /// A connection to send on, within `timeout`.
    pub(super) async fn conn(&self, timeout: Duration) -> Result<Conn, StoreError> {
        match self {
            Link::Standalone(pool) => {
                let conn = tokio::time::timeout(timeout, pool.get())
                    .await
                    .map_err(|_| StoreError::timeout("connect", timeout))?
                    .map_err(|e| match e {
                        deadpool_redis::PoolError::Timeout(_) => {
                            StoreError::timeout("connect", timeout)
                        }
                        other => StoreError::not_sent(
                            "connect",
                            "no connection to Redis",
                            Some(Cause::Pool(Arc::new(other))),
                        ),
                    })?;
                Ok(Conn::Single(MultiplexedConnection::clone(&conn)))
            }
            Link::Cluster(c) => Ok(Conn::Cluster(c.get())),
        }
    }

    /// Runs `pipe` within `timeout`. On a cluster its commands must share a
    /// hash slot (or name no key); see [`Link::each`] for commands that do
    /// not.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        timeout: Duration,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let run = async {
            let mut conn = self.conn(timeout).await?;
            pipe.query_async(&mut conn)
                .await
                .map_err(|e| StoreError::redis(op, e))
        };
        let result = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| StoreError::timeout(op, timeout))
            .and_then(|r| r);
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }

    /// Runs `cmds`, each naming one key (or none), and answers one reply
    /// each: one pipeline on a standalone Redis, each command to its own
    /// node, all at once, on a cluster.
    pub async fn each(
        &self,
        op: &'static str,
        timeout: Duration,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<Value>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Link::Standalone(_) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                self.query(op, timeout, &pipe).await
            }
            Link::Cluster(c) => {
                let conn = c.get();
                let run = futures_util::future::join_all(cmds.into_iter().map(|cmd| {
                    let mut c = conn.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                }));
                let result = tokio::time::timeout(timeout, run)
                    .await
                    .map_err(|_| StoreError::timeout(op, timeout))
                    .and_then(|replies| {
                        replies
                            .into_iter()
                            .map(|r| r.map_err(|e| StoreError::redis(op, e)))
                            .collect()
                    });
                if let Err(e) = &result {
                    self.failed(e);
                }
                result
            }
        }
    }
}

/// A connection that calls are sent on.
#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipe, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
