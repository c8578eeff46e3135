//! Test support: the processes headroom's tests, the fault suite and the
//! load tools drive, a private `redis-server` and the tracker binary, each
//! on a port of its own and killed with its owner (and on drop).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A free port whose cluster bus port (+10000) is free too, below 55535.
pub fn free_cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over processes by pid, then walked; both ports are checked.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 2_000) as u16 * 12;
    loop {
        let port = start + NEXT.fetch_add(1, Ordering::Relaxed) % 25_000;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if port < 45_535 && free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// SIGKILL and reap, if it runs.
fn reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status();
}

/// A redis-server of the caller's own, on a free port, with its data in a
/// temporary folder that outlives restarts. `appendfsync always`, so that
/// killing it loses nothing it acknowledged; `DEBUG` enabled for the fault
/// suite.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    /// Settings after the defaults (a later setting wins in redis-server).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with `extra` settings on top of the defaults, e.g.
    /// `["--appendonly", "no"]` for a benchmark.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts on `port` (a cluster node's: see [`free_cluster_port`]).
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        let mut server = RedisServer {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on the PATH (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Whether it answers now; `LOADING` (replaying the AOF) does not count.
    pub fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_millis(200)))?;
                redis::cmd("PING").query::<String>(&mut c)
            })
            .is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the private redis")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: Redis gets no chance to do anything more.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// SIGTERM: Redis finishes what it is doing, syncs and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "-TERM");
            let _ = c.wait();
        }
    }

    /// Entries of the event streams under `prefix` (every bucket's), in
    /// the order they were added: `(type, entitlement, CloudEvents JSON)`.
    pub fn events(&self, prefix: &str) -> Vec<(String, String, serde_json::Value)> {
        let mut c = self.conn();
        let mut entries = stream_entries(&mut c, prefix);
        entries.sort_by_key(|(at, ..)| *at);
        entries
            .into_iter()
            .map(|(_, ty, ent, ev)| (ty, ent, ev))
            .collect()
    }

    /// Starts it again on the same port and data (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The tracker binary, on a port that stays the same across restarts.
pub struct Tracker {
    bin: PathBuf,
    env: Vec<(String, String)>,
    pub port: u16,
    child: Option<Child>,
}

impl Tracker {
    /// Starts `bin` with `HEADROOM_*` settings `env` (the listen address is
    /// added) and waits until `/readyz` answers 200.
    pub fn start(bin: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut tracker = Tracker::unstarted(bin, env);
        tracker.spawn()?;
        Ok(tracker)
    }

    /// As [`Tracker::start`], but not started yet: its port is chosen, and
    /// [`Tracker::restart`] starts it (a node a test adds later).
    pub fn unstarted(bin: &Path, env: &[(&str, &str)]) -> Self {
        Tracker {
            bin: bin.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            port: free_port(),
            child: None,
        }
    }

    /// Sends `sig` (`-STOP`, `-CONT`) without waiting for anything.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            signal(c, sig);
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HEADROOM_LISTEN", self.addr().to_string())
            .env(
                "RUST_LOG",
                std::env::var("TRACKER_LOG").unwrap_or("error".into()),
            )
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TRACKER_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not become ready",
                self.bin.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether `/readyz` answers 200 (a blocking probe, 500 ms at most).
    pub fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) =
            std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let req = format!(
            "GET /readyz HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.addr()
        );
        let mut answer = String::new();
        s.write_all(req.as_bytes()).is_ok()
            && s.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 200")
    }

    /// SIGKILL: no shutdown hook runs.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// SIGTERM, then waits; answers whether it exited with status 0.
    pub fn terminate(&mut self) -> bool {
        self.stop_with("-TERM")
    }

    /// Sends `sig` (`-INT`, `-TERM`), then waits; answers whether it exited
    /// with status 0.
    pub fn stop_with(&mut self, sig: &str) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        signal(&c, sig);
        c.wait().is_ok_and(|s| s.success())
    }

    /// Starts it again with the same settings and port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An entry of a bucket's event stream: its `(ms, seq)` id, type,
/// entitlement and CloudEvents JSON.
pub type StreamEntry = ((u64, u64), String, String, serde_json::Value);

/// Every entry of every event stream under `prefix` on the Redis node
/// behind `c` (the buckets' streams are `{prefix}:{<tag>}:events`), each
/// stream in its order.
pub fn stream_entries(c: &mut redis::Connection, prefix: &str) -> Vec<StreamEntry> {
    let mut streams: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:{{*}}:events"))
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query(c)
            .expect("SCAN");
        streams.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    streams.sort();
    let mut out = Vec::new();
    for stream in streams {
        let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query(c)
            .expect("XRANGE");
        for (id, fields) in entries {
            let get = |k: &str| {
                fields
                    .chunks(2)
                    .find(|p| p[0] == k)
                    .map(|p| p[1].clone())
                    .unwrap_or_default()
            };
            let (ms, seq) = id.split_once('-').unwrap_or((&id, "0"));
            let at = (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0));
            let event = serde_json::from_str(&get("event")).unwrap_or(serde_json::Value::Null);
            out.push((at, get("type"), get("entitlement"), event));
        }
    }
    out
}

/// A Redis Cluster of the caller's own: `primaries` nodes with `replicas`
/// each, on free ports (bus ports +10000, below 55535), each node a
/// [`RedisServer`] (`appendfsync always`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(primaries: usize, replicas: usize) -> Self {
        let extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        let nodes: Vec<RedisServer> = (0..primaries * (1 + replicas))
            .map(|_| RedisServer::start_on(free_cluster_port(), &extra))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be on the PATH (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok(primaries * (1 + replicas));
        cluster.wait_for_replicas(replicas);
        cluster
    }

    /// Waits until every primary has `replicas` replicas online.
    pub fn wait_for_replicas(&self, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let online = self.primaries().iter().all(|p| {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut p.conn())
                    .unwrap_or_default();
                info.lines()
                    .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                    .count()
                    >= replicas
            });
            if online {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas did not come online"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node says the cluster is ok and knows every node.
    pub fn wait_until_ok(&self, known: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().filter(|n| n.ping()).all(|n| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut n.conn())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{known}"))
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What a live node says of every node (`CLUSTER NODES`).
    pub fn topology(&self) -> Vec<ClusterNode> {
        for n in self.nodes.iter().filter(|n| n.ping()) {
            let nodes: redis::RedisResult<String> =
                redis::cmd("CLUSTER").arg("NODES").query(&mut n.conn());
            if let Ok(text) = nodes {
                return text.lines().filter_map(ClusterNode::parse).collect();
            }
        }
        Vec::new()
    }

    /// The index in `nodes` of a live primary that serves slots, the one
    /// serving most.
    pub fn serving_primary(&self) -> Option<usize> {
        let top = self.topology();
        let best = top
            .iter()
            .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
            .max_by_key(|n| n.slot_count())?;
        self.nodes.iter().position(|n| n.port == best.port)
    }

    /// The port of the node serving `slot`.
    pub fn owner_of(top: &[ClusterNode], slot: u16) -> Option<u16> {
        top.iter()
            .filter(|n| n.primary && !n.failed)
            .find(|n| n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|n| n.port)
    }

    /// Moves `slots` slots (with their keys) from the primary on port
    /// `from` to the one on `to` with `redis-cli --cluster reshard`.
    pub fn reshard(&self, from: u16, to: u16, slots: usize) -> anyhow::Result<()> {
        let top = self.topology();
        let id = |port: u16| {
            top.iter()
                .find(|n| n.port == port)
                .map(|n| n.id.clone())
                .ok_or_else(|| anyhow::anyhow!("no node on port {port}"))
        };
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &id(from)?, "--cluster-to", &id(to)?])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --cluster reshard: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Waits until the slots of the node on `port` (stopped) are served by
    /// another node: its replica took over.
    pub fn wait_for_failover_of(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let top = self.topology();
            let served: usize = top
                .iter()
                .filter(|n| n.primary && !n.failed && n.port != port)
                .map(ClusterNode::slot_count)
                .sum();
            if served == 16384 {
                return;
            }
            assert!(Instant::now() < deadline, "no replica took over");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed nodes, comma-separated, as `HEADROOM_REDIS_CLUSTER` takes them.
    pub fn seeds(&self) -> String {
        self.urls().join(",")
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes that are primaries now.
    pub fn primaries(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.ping())
            .filter(|n| {
                let role: Vec<redis::Value> =
                    redis::cmd("ROLE").query(&mut n.conn()).unwrap_or_default();
                matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master")
            })
            .collect()
    }

    /// A connection that follows the cluster's slots.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .and_then(|c| c.get_connection())
            .expect("connect to the private cluster")
    }

    /// Entries of the event streams under `prefix` on every primary, in the
    /// order they were added: `(type, entitlement, CloudEvents JSON)`.
    pub fn events(&self, prefix: &str) -> Vec<(String, String, serde_json::Value)> {
        let mut entries: Vec<StreamEntry> = self
            .primaries()
            .iter()
            .flat_map(|n| stream_entries(&mut n.conn(), prefix))
            .collect();
        entries.sort_by_key(|(at, ..)| *at);
        entries
            .into_iter()
            .map(|(_, ty, ent, ev)| (ty, ent, ev))
            .collect()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    /// Flagged `fail` (or `fail?`) by the node asked.
    pub failed: bool,
    /// Slot ranges it serves, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    fn parse(line: &str) -> Option<ClusterNode> {
        let mut f = line.split_whitespace();
        let id = f.next()?.to_string();
        // ip:port@bus[,hostname]
        let addr = f.next()?;
        let port = addr.split('@').next()?.rsplit_once(':')?.1.parse().ok()?;
        let flags = f.next()?;
        let slots = f
            .skip(5)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|a| (a, a)),
            })
            .collect();
        Some(ClusterNode {
            id,
            port,
            primary: flags.split(',').any(|f| f == "master"),
            failed: flags.split(',').any(|f| f == "fail" || f == "fail?"),
            slots,
        })
    }

    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|(a, b)| usize::from(b - a) + 1).sum()
    }
}
