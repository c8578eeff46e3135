//! The two Lua scripts, their arguments and their replies: the one place
//! where the layout each script reads is written down.
//!
//! `lua/commit.lua` applies the commits of a whole pipeline in one call,
//! each atomically and on its own; `lua/load.lua` reads an entitlement and
//! claims it.

use redis::Value;

use super::keys::Keys;
use super::text;
use crate::domain::{BucketSize, EntitlementId, FieldOp, Lease, SeatId};
use crate::store::{
    Commit, CommitOutcome, DENIALS_KEPT_MS, HistoryWrite, KeyRecord, Loaded, OverdraftCounts,
    PERIODS_KEPT, StoreError, Write, decode_state,
};

pub(super) const COMMIT_LUA: &str = include_str!("lua/commit.lua");
pub(super) const LOAD_LUA: &str = include_str!("lua/load.lua");

/// What every call of the commit script passes once, before its commits.
pub(super) struct CommitLimits {
    pub stream_maxlen: u64,
    pub idempotency_ttl_ms: u64,
}

/// What one commit passes to `lua/commit.lua`, field by field in the order
/// the script reads its `ARGV`; [`CommitArgs::push_keys`] and
/// [`CommitArgs::push_argv`] are its only encoders.
///
/// A call carries groups of commits, one group per bucket. Its `KEYS` are,
/// per group, the bucket's event stream, overdraft totals hash, overdraft
/// report index, recent-denials index and entitlement index, then per commit of the group its
/// epoch, state hash, seats hash, closed-periods list, the hour and day
/// history hashes of each history write, and its idempotency keys.
///
/// A call's `ARGV` are the group count, the stream's `MAXLEN`, the
/// idempotency TTL (ms), the closed periods kept per entitlement and how
/// long a denial stays in the recent-denials index (ms); then per group its
/// commit count and per commit the
/// fixed fields below (`deadline_ms` to `id`, with the five counts of the
/// variable parts between `periods_expire_at` and `id`), then the variable
/// parts: per seat its id and lease (`''` for released), per event its type
/// and CloudEvents JSON, per history write the hour and day expiry (ms)
/// and, for the hour record and then the day record, the op count and per
/// op `M|S|A`, field, value; per closed period its record; per idempotency
/// key its record.
///
/// A group of plain commits ([`is_plain`]) is sent with its
/// count negated, no shared keys, and per commit only its epoch, state
/// hash and history hashes as `KEYS` and `deadline_ms`, `expected_epoch`,
/// `core`, the history-write count and the history writes as `ARGV`.
///
/// The script answers one reply per commit, in order: `{'ok', epoch}`,
/// `{'fenced', epoch}`, `{'keys', index, record, ...}` or `{'expired'}`.
pub(super) struct CommitArgs<'a> {
    /// The entitlement's bucket (not sent: it picks the group).
    pub bucket: usize,
    /// Sent in the short layout ([`is_plain`]).
    pub plain: bool,
    /// Redis's clock (ms): the script refuses the commit after it.
    pub deadline_ms: i64,
    /// The owner epoch the commit was decided under.
    pub expected_epoch: u64,
    /// Claim the epoch with this write (`1`/`0`).
    pub claim: bool,
    /// `put`, `replace` (delete whatever is stored first) or `delete`.
    pub mode: &'static str,
    /// The state's counters as JSON (`''` for a delete).
    pub core: &'a str,
    /// The configuration as JSON, `''` when unchanged.
    pub config: &'a str,
    /// The change of the overdraft totals: entitlements, then seats.
    pub overdraft: OverdraftCounts,
    /// The report index: `+` in overdraft, `-` not, `''` unchanged.
    pub report: Option<bool>,
    /// The last denial of the commit (ms), `''` for none.
    pub denied_at: Option<i64>,
    /// When the closed-period records expire (ms).
    pub periods_expire_at: i64,
    pub id: &'a EntitlementId,
    pub seats: &'a [(SeatId, Option<Lease>)],
    pub events: &'a [(&'static str, String)],
    pub history: &'a [HistoryWrite],
    pub periods: &'a [String],
    pub keys: &'a [KeyRecord],
}

impl<'a> CommitArgs<'a> {
    pub fn of(c: &'a Commit, bucket: usize, deadline_ms: i64) -> Self {
        let (mode, core, config, seats): (_, &str, &str, &[_]) = match &c.write {
            Write::Put {
                replace,
                core,
                config,
                seats,
            } => (
                if *replace { "replace" } else { "put" },
                core,
                config.as_deref().unwrap_or(""),
                seats,
            ),
            Write::Delete => ("delete", "", "", &[]),
        };
        CommitArgs {
            bucket,
            plain: is_plain(c),
            deadline_ms,
            expected_epoch: c.epoch,
            claim: c.claim,
            mode,
            core,
            config,
            overdraft: c.overdraft,
            report: c.records.in_overdraft,
            denied_at: c.records.denied_at,
            periods_expire_at: c.records.periods_expire_at,
            id: &c.id,
            seats,
            events: &c.events,
            history: &c.records.history,
            periods: &c.records.periods,
            keys: &c.idempotency,
        }
    }

    fn key_count(&self) -> usize {
        if self.plain {
            2 + 2 * self.history.len()
        } else {
            4 + 2 * self.history.len() + self.keys.len()
        }
    }

    fn push_history_keys(&self, keys: &super::keys::EntitlementKeys<'_>, cmd: &mut redis::Cmd) {
        for w in self.history {
            cmd.arg(keys.history(BucketSize::Hour, w.hour))
                .arg(keys.history(BucketSize::Day, BucketSize::Day.start(w.hour)));
        }
    }

    pub fn push_keys(&self, keys: &Keys, cmd: &mut redis::Cmd) {
        let k = keys.of(self.id);
        if self.plain {
            cmd.arg(k.epoch()).arg(k.state());
            self.push_history_keys(&k, cmd);
            return;
        }
        cmd.arg(k.epoch())
            .arg(k.state())
            .arg(k.seats())
            .arg(k.periods());
        self.push_history_keys(&k, cmd);
        for r in self.keys {
            cmd.arg(k.idempotency(r.incarnation, &r.key));
        }
    }

    pub fn push_argv(&self, cmd: &mut redis::Cmd) {
        if self.plain {
            cmd.arg(self.deadline_ms)
                .arg(self.expected_epoch)
                .arg(self.core)
                .arg(self.history.len());
            self.push_history_argv(cmd);
            return;
        }
        cmd.arg(self.deadline_ms)
            .arg(self.expected_epoch)
            .arg(if self.claim { "1" } else { "0" })
            .arg(self.mode)
            .arg(self.core)
            .arg(self.config)
            .arg(self.overdraft.entitlements)
            .arg(self.overdraft.seats)
            .arg(match self.report {
                Some(true) => "+",
                Some(false) => "-",
                None => "",
            })
            .arg(self.denied_at.map(|t| t.to_string()).unwrap_or_default())
            .arg(self.periods_expire_at)
            .arg(self.seats.len())
            .arg(self.events.len())
            .arg(self.history.len())
            .arg(self.periods.len())
            .arg(self.keys.len())
            .arg(self.id.as_str());
        for (seat, lease) in self.seats {
            cmd.arg(seat.as_str())
                .arg(lease.map(|l| l.encode()).unwrap_or_default());
        }
        for (kind, json) in self.events {
            cmd.arg(*kind).arg(json);
        }
        self.push_history_argv(cmd);
        for p in self.periods {
            cmd.arg(p);
        }
        for r in self.keys {
            cmd.arg(&r.record);
        }
    }

    fn push_history_argv(&self, cmd: &mut redis::Cmd) {
        for w in self.history {
            cmd.arg(w.hour_expire_at).arg(w.day_expire_at);
            for ops in [&w.hour_ops, &w.day_ops] {
                cmd.arg(ops.len());
                for op in ops {
                    match op {
                        FieldOp::Max(f, v) => cmd.arg("M").arg(*f).arg(*v),
                        FieldOp::Set(f, v) => cmd.arg("S").arg(*f).arg(*v),
                        FieldOp::Add(f, v) => cmd.arg("A").arg(f.as_str()).arg(*v),
                    };
                }
            }
        }
    }
}

/// Whether `c` writes the state's counters and their history and nothing
/// else: no seats, configuration, events, billing records, idempotency
/// keys, claim or report change. Such a commit needs none of its bucket's
/// shared keys and goes in the script's short layout.
pub(super) fn is_plain(c: &Commit) -> bool {
    matches!(&c.write, Write::Put { replace: false, config: None, seats, .. } if seats.is_empty())
        && !c.claim
        && c.events.is_empty()
        && c.idempotency.is_empty()
        && c.overdraft == OverdraftCounts::default()
        && c.records.in_overdraft.is_none()
        && c.records.denied_at.is_none()
        && c.records.periods.is_empty()
}

/// One call of the commit script carrying all of `commits`, the plain ones
/// first (one group), then the others by bucket (a group per run of one
/// bucket).
pub(super) fn commit_call(
    sha: &str,
    keys: &Keys,
    limits: &CommitLimits,
    commits: &[CommitArgs<'_>],
) -> redis::Cmd {
    let groups: Vec<&[CommitArgs<'_>]> = commits
        .chunk_by(|a, b| a.plain == b.plain && (a.plain || a.bucket == b.bucket))
        .collect();
    let shared = groups.iter().filter(|g| !g[0].plain).count();
    let nkeys: usize = 5 * shared + commits.iter().map(CommitArgs::key_count).sum::<usize>();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(nkeys);
    for group in &groups {
        if group[0].plain {
            for c in *group {
                c.push_keys(keys, &mut cmd);
            }
            continue;
        }
        let b = group[0].bucket;
        cmd.arg(keys.events(b))
            .arg(keys.overdraft_totals(b))
            .arg(keys.overdraft_index(b))
            .arg(keys.denied_index(b))
            .arg(keys.entitlement_index(b));
        for c in *group {
            c.push_keys(keys, &mut cmd);
        }
    }
    cmd.arg(groups.len())
        .arg(limits.stream_maxlen)
        .arg(limits.idempotency_ttl_ms)
        .arg(PERIODS_KEPT)
        .arg(DENIALS_KEPT_MS);
    for group in &groups {
        let n = group.len() as i64;
        cmd.arg(if group[0].plain { -n } else { n });
        for c in *group {
            c.push_argv(&mut cmd);
        }
    }
    cmd
}

/// One commit's reply of the commit script.
pub(super) fn parse_commit_reply(c: &Commit, v: Value) -> Result<CommitOutcome, StoreError> {
    let bad = || StoreError::reply("commit", format!("unexpected commit reply for {}", c.id));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let tag = items.first().and_then(text).ok_or_else(bad)?;
    match tag.as_str() {
        "ok" => {
            let epoch = items
                .get(1)
                .and_then(text)
                .and_then(|s| s.parse().ok())
                .ok_or_else(bad)?;
            Ok(CommitOutcome::Applied { epoch })
        }
        "fenced" => Ok(CommitOutcome::Fenced),
        "expired" => Err(StoreError::not_sent(
            "commit",
            "the write arrived after its deadline",
            None,
        )),
        "keys" => {
            let mut found = Vec::new();
            for pair in items[1..].chunks(2) {
                let idx: usize = text(&pair[0])
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(bad)?;
                let record = pair.get(1).and_then(text).ok_or_else(bad)?;
                let key = &c.idempotency.get(idx.wrapping_sub(1)).ok_or_else(bad)?.key;
                found.push((key.clone(), record));
            }
            Ok(CommitOutcome::KeysExist(found))
        }
        _ => Err(bad()),
    }
}

/// One call of the load script: `KEYS` epoch, state hash, seats hash;
/// `ARGV` `1` to bump the epoch even when nothing is stored (a read-back
/// that fences an unknown write).
pub(super) fn load_call(sha: &str, keys: &Keys, id: &EntitlementId, fence: bool) -> redis::Cmd {
    let k = keys.of(id);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha)
        .arg(3)
        .arg(k.epoch())
        .arg(k.state())
        .arg(k.seats())
        .arg(if fence { "1" } else { "0" });
    cmd
}

/// The `(seat, lease)` pairs of an `HGETALL` reply of a seats hash.
pub(super) fn seat_pairs(reply: Option<&Value>) -> Vec<(String, String)> {
    let Some(Value::Array(fields)) = reply else {
        return Vec::new();
    };
    fields
        .chunks(2)
        .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
        .collect()
}

/// The load script's reply: `{epoch}` when nothing is stored, else
/// `{epoch, core, seats, config}`.
pub(super) fn parse_load_reply(id: &EntitlementId, value: Value) -> Result<Loaded, StoreError> {
    let corrupt = |what: &str| StoreError::corrupt(id, what, None);
    let Value::Array(items) = value else {
        return Err(corrupt("load reply"));
    };
    let epoch: u64 = items
        .first()
        .and_then(text)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("epoch"))?;
    let Some(core) = items.get(1) else {
        return Ok(Loaded {
            epoch,
            claimed: false,
            state: None,
        });
    };
    let core = text(core).ok_or_else(|| corrupt("core"))?;
    let config = items
        .get(3)
        .and_then(text)
        .ok_or_else(|| corrupt("config"))?;
    let state = decode_state(
        id,
        core.as_bytes(),
        config.as_bytes(),
        seat_pairs(items.get(2)),
    )?;
    Ok(Loaded {
        epoch,
        claimed: true,
        state: Some(state),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Records;

    fn commit(id: &str, events: Vec<(&'static str, String)>) -> Commit {
        Commit {
            id: EntitlementId::parse(id).expect("a valid id"),
            epoch: 1,
            claim: false,
            write: Write::Put {
                replace: false,
                core: "{}".into(),
                config: None,
                seats: Vec::new(),
            },
            events,
            idempotency: Vec::new(),
            overdraft: OverdraftCounts::default(),
            records: Records::default(),
        }
    }

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "<cursor>".into(),
            })
            .collect()
    }

    #[test]
    fn plain_commits_go_first_in_a_group_of_their_own_without_shared_keys() {
        let keys = Keys::new("t", 4);
        let (plain, full) = (
            commit("a", Vec::new()),
            commit("b", vec![("entitlement.updated", "{}".into())]),
        );
        let mut commits = [CommitArgs::of(&full, 1, 9), CommitArgs::of(&plain, 2, 9)];
        assert!(!commits[0].plain && commits[1].plain);
        commits.sort_by_key(|c| (!c.plain, c.bucket));
        let limits = CommitLimits {
            stream_maxlen: 10,
            idempotency_ttl_ms: 10,
        };
        let a = args(&commit_call("sha", &keys, &limits, &commits));
        // 2 keys for the plain commit; 5 shared + 4 for the full one.
        assert_eq!(a[..3], ["EVALSHA", "sha", "11"]);
        assert_eq!(a[3], keys.epoch(&plain.id));
        assert_eq!(a[4], keys.state(&plain.id));
        assert_eq!(a[5], keys.events(1));
        // Two groups; the plain one first, its count negated, then its
        // deadline, epoch, core and history count.
        assert_eq!(a[14], "2");
        assert_eq!(a[19..24], ["-1", "9", "1", "{}", "0"]);
        assert_eq!(a[24], "1");
    }
}
