//! Reading the buckets' event streams in pages, for `GET /v1/events`.
//!
//! Each bucket has its own stream, and Redis numbers a stream's entries by
//! its own clock (`ms-seq`). A page reads every stream from the same
//! position and, in the same script, the clock of the Redis that holds it;
//! then it keeps only the entries before the smallest *bound*: a stream's
//! clock when it was read to its end, or the entry after the last one read
//! when it was cut at the count. Every entry before that position has been
//! read in every stream, and every entry added later is numbered at or
//! after it (a stream numbers new entries from its clock, which has passed
//! the bound), so a reader that goes on from there misses nothing and sees
//! nothing twice. (A Redis whose clock is set back numbers new entries from
//! its last one: they wait, not lost, until the clocks pass them again.)

use redis::Value;

use super::{RedisStore, text};
use crate::domain::EntitlementId;
use crate::store::{EventEntry, EventsFrom, EventsPage, StoreError, StreamPos};

/// One stream's clock and its entries from `ARGV[1]` on, at most
/// `ARGV[2]` of them (none when 0: a reader that starts now).
const READ: &str = "local t = redis.call('TIME')\n\
    local entries = {}\n\
    if ARGV[2] ~= '0' then\n\
      entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])\n\
    end\n\
    return {t[1], t[2], entries}";

const OP: &str = "event stream read";

impl RedisStore {
    pub(super) async fn read_events_page(
        &self,
        from: EventsFrom,
        of: Option<&EntitlementId>,
        limit: usize,
    ) -> Result<EventsPage, StoreError> {
        let keys = &self.core.keys;
        let buckets: Vec<usize> = match of {
            Some(id) => vec![keys.bucket_of(id)],
            None => (0..keys.buckets()).collect(),
        };
        let (start, first) = match from {
            EventsFrom::Oldest => (StreamPos { ms: 0, seq: 0 }, "-".to_string()),
            EventsFrom::Now => (StreamPos { ms: 0, seq: 0 }, "+".to_string()),
            EventsFrom::At(p) => (p, p.to_string()),
        };
        // Each stream's share of the page, twice over, so that one read
        // usually fills it however the entries are spread.
        let count = match from {
            EventsFrom::Now => 0,
            _ => (2 * limit.max(1))
                .div_ceil(buckets.len())
                .clamp(16, limit.max(16)),
        };
        let cmds = buckets
            .iter()
            .map(|&b| {
                redis::cmd("EVAL")
                    .arg(READ)
                    .arg(1)
                    .arg(keys.events(b))
                    .arg(&first)
                    .arg(count)
                    .clone()
            })
            .collect();
        let replies = self.read_each(OP, cmds).await?;
        let mut bound: Option<StreamPos> = None;
        let mut more = false;
        let mut read: Vec<(StreamPos, usize, EventEntry)> = Vec::new();
        for (&b, reply) in buckets.iter().zip(replies) {
            let (clock, entries) = parse_read(reply)?;
            let full = count > 0 && entries.len() >= count;
            more |= full;
            let this = match entries.last() {
                Some(last) if full => last.pos.next(),
                _ => StreamPos { ms: clock, seq: 0 },
            };
            bound = Some(bound.map_or(this, |m| m.min(this)));
            read.extend(entries.into_iter().map(|e| (e.pos, b, e)));
        }
        let bound = bound.unwrap_or(start).max(start);
        read.retain(|(pos, _, e)| {
            *pos >= start && *pos < bound && of.is_none_or(|id| id.as_str() == e.entitlement)
        });
        read.sort_by_key(|(pos, b, _)| (*pos, *b));
        let next = match read.get(limit.max(1) - 1) {
            // Cut after the limit-th entry, and after every other stream's
            // entry at its position (streams number theirs independently).
            Some(&(cut, _, _)) if read.len() > limit => {
                read.retain(|(pos, _, _)| *pos <= cut);
                more = true;
                cut.next()
            }
            _ => bound,
        };
        let entries = read.into_iter().map(|(_, _, e)| e).collect();
        Ok(EventsPage {
            entries,
            next,
            more,
        })
    }
}

/// A [`READ`] reply: the stream's clock (ms) and its entries.
fn parse_read(v: Value) -> Result<(u64, Vec<EventEntry>), StoreError> {
    let bad = |what: &str| StoreError::reply(OP, format!("unexpected {what}"));
    let Value::Array(mut items) = v else {
        return Err(bad("reply"));
    };
    if items.len() != 3 {
        return Err(bad("reply"));
    }
    let entries = items.pop().ok_or_else(|| bad("reply"))?;
    let number = |v: &Value| text(v).and_then(|s| s.parse::<u64>().ok());
    let secs = number(&items[0]).ok_or_else(|| bad("TIME"))?;
    let micros = number(&items[1]).ok_or_else(|| bad("TIME"))?;
    let clock = secs * 1000 + micros / 1000;
    let entries = match entries {
        Value::Array(list) => list,
        Value::Nil => Vec::new(),
        _ => return Err(bad("entries")),
    };
    let entries = entries
        .into_iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                return Err(bad("entry"));
            };
            let pos = parts
                .first()
                .and_then(text)
                .and_then(|s| StreamPos::parse(&s))
                .ok_or_else(|| bad("entry id"))?;
            let Some(Value::Array(fields)) = parts.get(1) else {
                return Err(bad("entry fields"));
            };
            let mut e = EventEntry {
                pos,
                kind: String::new(),
                entitlement: String::new(),
                event: String::new(),
            };
            for pair in fields.chunks(2) {
                let (Some(name), Some(value)) = (pair.first().and_then(text), pair.get(1)) else {
                    return Err(bad("entry fields"));
                };
                let value = text(value).ok_or_else(|| bad("entry field"))?;
                match name.as_str() {
                    "type" => e.kind = value,
                    "entitlement" => e.entitlement = value,
                    "event" => e.event = value,
                    _ => {}
                }
            }
            if e.event.is_empty() {
                return Err(bad("entry without an event"));
            }
            Ok(e)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((clock, entries))
}
