//! What the settings groups of every layer share: each layer declares its
//! own flags (a `clap::Args` struct with its defaults, written once), and
//! [`crate::settings::Settings`] flattens them into the command line.

use std::time::Duration;

/// A settings group with every default and no environment: what a test or
/// a bench gets from `Default`.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|a| a.env(None::<&str>));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<&str>())
        .unwrap_or_else(|e| unreachable!("every flag of a settings group has a default: {e}"));
    T::from_arg_matches(&matches)
        .unwrap_or_else(|e| unreachable!("the defaults of a settings group parse: {e}"))
}

/// A duration flag, more than zero: `500ms`, `30s`, `24h`, `35days`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration such as 500ms, 30s, 24h or 35days"))?;
    if d.is_zero() {
        return Err("must be more than 0; write a duration such as 500ms, 30s or 24h".into());
    }
    Ok(d)
}

/// A count flag: a whole number of at least 1.
pub fn count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}; write a whole number of at least 1")),
    }
}

/// A bucket count for the Redis key layout: 1 to the most there may be.
pub fn buckets(s: &str) -> Result<u32, String> {
    let max = crate::store::MAX_BUCKETS;
    match count(s)? {
        n if n <= max as usize => Ok(n as u32),
        _ => Err(format!("must be at most {max}")),
    }
}

/// [`count`] as a `u64`.
pub fn count_u64(s: &str) -> Result<u64, String> {
    count(s).map(|n| n as u64)
}

/// An address to listen on: `host:port`, where host may be a name
/// (`localhost:8080`) or an IPv4/IPv6 address (`[::1]:8080`).
pub fn address(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let mut found = s.to_socket_addrs().map_err(|e| {
        format!("{e}; write host:port, e.g. 127.0.0.1:8080, localhost:8080 or [::1]:8080")
    })?;
    found
        .next()
        .ok_or_else(|| format!("{s} resolves to no address; write host:port"))
}

/// A Redis URL, checked as Redis will read it: `redis://host:port/db` or
/// `rediss://` for TLS (a password may be given as `redis://:pw@host`).
pub fn redis_url(s: &str) -> Result<String, String> {
    use redis::IntoConnectionInfo;
    s.into_connection_info().map_err(|e| {
        let detail = e.detail().unwrap_or("not a Redis URL");
        format!("{detail}; write redis://host:port/ or rediss://host:port/ for TLS")
    })?;
    Ok(s.to_string())
}

/// A Redis Cluster's seed nodes.
#[derive(Clone, Debug)]
pub struct Seeds(pub Vec<String>);

/// Comma-separated Redis URLs (a cluster's seed nodes), each checked.
pub fn redis_seeds(s: &str) -> Result<Seeds, String> {
    let seeds = list(s);
    if seeds.is_empty() {
        return Err("name at least one seed node, e.g. redis://127.0.0.1:7000".into());
    }
    seeds
        .iter()
        .map(|seed| redis_url(seed))
        .collect::<Result<_, _>>()
        .map(Seeds)
}

/// A comma-separated list, blanks left out.
pub fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}
