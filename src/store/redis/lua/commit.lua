#!lua
-- Applies the changes of several entitlements, each atomically and on its
-- own: one entitlement's refusal (fenced, idempotency key used) leaves the
-- others' writes alone. The commits come in groups, one per bucket, each
-- led by its bucket's shared keys (stream, totals, report indexes, the
-- entitlement index). On a standalone Redis one call carries a whole
-- pipeline of commits, so Redis pays the script-call overhead once per
-- round trip; on a Redis Cluster one call carries one bucket's (one hash
-- slot's) commits.
--
-- A group of plain commits (a negative count: the state's counters and
-- their history, nothing else, as most usage calls write) comes without
-- shared keys and with a short layout, so the call that carries the usual
-- write costs Redis a fraction of what a full commit does.
--
-- KEYS, ARGV and the replies are laid out in scripts.rs (`CommitArgs`),
-- the one encoder of this script's arguments; the reads below follow it
-- field by field.
--
-- A commit that runs after its deadline is refused: the tracker has stopped
-- waiting for it and answered 503, so it must leave no trace (a write that
-- waited out a CLIENT PAUSE or a DEBUG SLEEP, say). The shebang makes Redis
-- refuse the whole script up front when it is out of memory, instead of
-- failing at its first write and leaving a commit half applied.
local maxlen, ttl, periods_kept, denials_kept = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local k, a = 1, 6
local function arg()
  a = a + 1
  return ARGV[a - 1]
end
local function key()
  k = k + 1
  return KEYS[k - 1]
end
-- A commit's history writes: per write, the hour and day hashes (KEYS from
-- `hk`) and, from ARGV `h`, their expiries and per hash its ops.
local function history(hk, h, nhist)
  for i = 0, nhist - 1 do
    local expires = {ARGV[h], ARGV[h + 1]}
    h = h + 2
    for j = 1, 2 do
      local bucket = KEYS[hk + 2 * i + j - 1]
      local nops = tonumber(ARGV[h])
      h = h + 1
      -- Whether a field was created: only then may the bucket be new
      -- and need its expiry (set once; later writes skip it).
      local fresh = false
      for o = 0, nops - 1 do
        local op, field, value = ARGV[h + 3 * o], ARGV[h + 3 * o + 1], ARGV[h + 3 * o + 2]
        if op == 'A' then
          fresh = redis.call('HINCRBY', bucket, field, value) == tonumber(value) or fresh
        elseif op == 'S' then
          fresh = redis.call('HSET', bucket, field, value) == 1 or fresh
        else
          local old = redis.call('HGET', bucket, field)
          if not old or tonumber(value) > tonumber(old) then
            fresh = redis.call('HSET', bucket, field, value) == 1 or fresh
          end
        end
      end
      if fresh then
        redis.call('PEXPIREAT', bucket, expires[j], 'NX')
      end
      h = h + 3 * nops
    end
  end
end
-- Skips the ARGV of `nhist` history writes starting at `a`.
local function skip_history(nhist)
  for _ = 1, nhist do
    a = a + 2
    for _ = 1, 2 do
      a = a + 1 + 3 * tonumber(ARGV[a])
    end
  end
end
local out = {}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local c = 0
-- A plain commit: the state's counters and its history, nothing else (the
-- usual usage call). It needs none of its bucket's shared keys and a
-- fraction of a full commit's arguments.
local function plain()
  local epoch_key, state_key = key(), key()
  local deadline, expected, core, nhist = tonumber(arg()), arg(), arg(), tonumber(arg())
  local hist_k, hist_a = k, a
  k = k + 2 * nhist
  skip_history(nhist)
  local epoch = now <= deadline and (redis.call('GET', epoch_key) or '0')
  if not epoch then
    return {'expired'}
  elseif epoch ~= expected then
    return {'fenced', epoch}
  end
  redis.call('HSET', state_key, 'core', core)
  history(hist_k, hist_a, nhist)
  return {'ok', epoch}
end
for _ = 1, tonumber(ARGV[1]) do
  local n = tonumber(arg())
  if n < 0 then
    for _ = 1, -n do
      c = c + 1
      out[c] = plain()
    end
  else
    local stream, totals, overdraft_index, denied_index, index = key(), key(), key(), key(), key()
    for _ = 1, n do
      c = c + 1
      local epoch_key, state_key, seats_key, periods_key = key(), key(), key(), key()
      local deadline = tonumber(arg())
      local expected, claim, mode, core, config = arg(), arg(), arg(), arg(), arg()
      local d_entitlements, d_seats = tonumber(arg()), tonumber(arg())
      local report, denied_at, periods_expire = arg(), arg(), arg()
      local nseats, nevents, nhist, nperiods, nkeys =
        tonumber(arg()), tonumber(arg()), tonumber(arg()), tonumber(arg()), tonumber(arg())
      local id = arg()
      -- Where this commit's variable parts start; skipped over when refused.
      local seat_a = a
      local event_a = seat_a + 2 * nseats
      local hist_a = event_a + 2 * nevents
      local hist_k = k
      k = k + 2 * nhist
      local key_k = k
      k = k + nkeys
      a = hist_a
      skip_history(nhist)
      local period_a = a
      local record_a = period_a + nperiods
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
          history(hist_k, hist_a, nhist)
          for i = 0, nperiods - 1 do
            redis.call('LPUSH', periods_key, ARGV[period_a + i])
          end
          if nperiods > 0 then
            redis.call('LTRIM', periods_key, 0, periods_kept - 1)
            redis.call('PEXPIREAT', periods_key, periods_expire)
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
          if report == '+' then
            redis.call('ZADD', overdraft_index, 0, id)
          elseif report == '-' then
            redis.call('ZREM', overdraft_index, id)
          end
          if denied_at ~= '' then
            -- Old entries go when a new one comes: the index stays bounded by
            -- the entitlements denied within the window, and a hot entitlement's
            -- denials cost one command each.
            if redis.call('ZADD', denied_index, denied_at, id) == 1 then
              redis.call('ZREMRANGEBYSCORE', denied_index, '-inf', '(' .. (tonumber(denied_at) - denials_kept))
            end
          elseif mode == 'delete' then
            redis.call('ZREM', denied_index, id)
          end
          -- The list of entitlements: written with each configuration (rare).
          if mode == 'delete' then
            redis.call('ZREM', index, id)
          elseif config ~= '' then
            redis.call('ZADD', index, 0, id)
          end
          out[c] = {'ok', epoch}
        end
      end
    end
  end
end
return out
