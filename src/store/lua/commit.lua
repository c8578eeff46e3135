-- Applies one entitlement's change atomically, or nothing.
-- KEYS: 1 epoch, 2 state hash, 3 seats hash, 4 event stream, 5.. idempotency keys
-- ARGV: 1 expected epoch, 2 claim (0|1), 3 mode (put|replace|delete), 4 core JSON,
--       5 seat count, 6 event count, 7 stream MAXLEN, 8 idempotency TTL (ms),
--       9 entitlement id, then per seat (id, lease or ''),
--       per event (type, CloudEvents JSON), per idempotency key its record.
local epoch = redis.call('GET', KEYS[1]) or '0'
if epoch ~= ARGV[1] then
  return {'fenced', epoch}
end
local nkeys = #KEYS - 4
local found = {'keys'}
for i = 1, nkeys do
  local v = redis.call('GET', KEYS[4 + i])
  if v then
    found[#found + 1] = tostring(i)
    found[#found + 1] = v
  end
end
if #found > 1 then
  return found
end
if ARGV[2] == '1' then
  epoch = tostring(redis.call('INCR', KEYS[1]))
end
local nseats = tonumber(ARGV[5])
local nevents = tonumber(ARGV[6])
local a = 10
if ARGV[3] ~= 'put' then
  redis.call('DEL', KEYS[2], KEYS[3])
end
if ARGV[3] ~= 'delete' then
  redis.call('HSET', KEYS[2], 'core', ARGV[4])
  for _ = 1, nseats do
    if ARGV[a + 1] == '' then
      redis.call('HDEL', KEYS[3], ARGV[a])
    else
      redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 1])
    end
    a = a + 2
  end
end
for _ = 1, nevents do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*',
    'type', ARGV[a], 'entitlement', ARGV[9], 'event', ARGV[a + 1])
  a = a + 2
end
for i = 1, nkeys do
  redis.call('SET', KEYS[4 + i], ARGV[a], 'PX', ARGV[8])
  a = a + 1
end
return {'ok', epoch}
