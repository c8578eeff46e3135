#!lua
-- Applies the changes of several entitlements, each atomically and on its
-- own: one entitlement's refusal (fenced, idempotency key used) leaves the
-- others' writes alone. One call carries a whole pipeline of commits, so
-- Redis pays the script-call overhead once per round trip.
--
-- KEYS: 1 event stream, 2 overdraft totals hash, then per commit: epoch,
--       state hash, seats hash and its idempotency keys.
-- ARGV: 1 commit count, 2 stream MAXLEN, 3 idempotency TTL (ms), then per
--       commit: deadline (ms in Redis's clock), expected epoch, claim (0|1),
--       mode (put|replace|delete), state JSON, configuration JSON ('' when
--       unchanged), change of entitlements in overdraft, change of seats in
--       overdraft, seat count, event count, key count, entitlement id, then
--       per seat (id, lease or ''), per event (type, CloudEvents JSON), per
--       idempotency key its record.
-- Returns one reply per commit: {'ok', epoch}, {'fenced', epoch},
-- {'keys', index, record, ...} or {'expired'}.
--
-- A commit that runs after its deadline is refused: the tracker has stopped
-- waiting for it and answered 503, so it must leave no trace (a write that
-- waited out a CLIENT PAUSE or a DEBUG SLEEP, say). The shebang makes Redis
-- refuse the whole script up front when it is out of memory, instead of
-- failing at its first write and leaving a commit half applied.
local stream, totals, maxlen, ttl = KEYS[1], KEYS[2], ARGV[2], ARGV[3]
local k, a = 3, 4
local out = {}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for c = 1, tonumber(ARGV[1]) do
  local epoch_key, state_key, seats_key = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local deadline = tonumber(ARGV[a])
  a = a + 1
  local expected, claim, mode, core, config = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local d_entitlements, d_seats = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local nseats, nevents, nkeys = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), tonumber(ARGV[a + 9])
  local id = ARGV[a + 10]
  local seat_a = a + 11
  local event_a = seat_a + 2 * nseats
  local record_a = event_a + 2 * nevents
  local key_k = k + 3
  k = key_k + nkeys
  a = record_a + nkeys

  local epoch = now <= deadline and (redis.call('GET', epoch_key) or '0')
  if not epoch then
    out[c] = {'expired'}
  elseif epoch ~= expected then
    out[c] = {'fenced', epoch}
  else
    local found = {'keys'}
    for i = 0, nkeys - 1 do
      local v = redis.call('GET', KEYS[key_k + i])
      if v then
        found[#found + 1] = tostring(i + 1)
        found[#found + 1] = v
      end
    end
    if #found > 1 then
      out[c] = found
    else
      if claim == '1' then
        epoch = tostring(redis.call('INCR', epoch_key))
      end
      if mode ~= 'put' then
        redis.call('DEL', state_key, seats_key)
      end
      if mode ~= 'delete' then
        redis.call('HSET', state_key, 'core', core)
        if config ~= '' then
          redis.call('HSET', state_key, 'config', config)
        end
        for i = 0, nseats - 1 do
          local seat, lease = ARGV[seat_a + 2 * i], ARGV[seat_a + 2 * i + 1]
          if lease == '' then
            redis.call('HDEL', seats_key, seat)
          else
            redis.call('HSET', seats_key, seat, lease)
          end
        end
      end
      for i = 0, nevents - 1 do
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
          'type', ARGV[event_a + 2 * i], 'entitlement', id, 'event', ARGV[event_a + 2 * i + 1])
      end
      for i = 0, nkeys - 1 do
        redis.call('SET', KEYS[key_k + i], ARGV[record_a + i], 'PX', ttl)
      end
      if d_entitlements ~= 0 then
        redis.call('HINCRBY', totals, 'entitlements', d_entitlements)
      end
      if d_seats ~= 0 then
        redis.call('HINCRBY', totals, 'seats', d_seats)
      end
      out[c] = {'ok', epoch}
    end
  end
end
return out
