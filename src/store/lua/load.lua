-- Reads an entitlement and, when it exists, claims it by bumping the epoch.
-- KEYS: 1 epoch, 2 state hash, 3 seats hash
local core = redis.call('HGET', KEYS[2], 'core')
if not core then
  return {redis.call('GET', KEYS[1]) or '0'}
end
local epoch = redis.call('INCR', KEYS[1])
return {tostring(epoch), core, redis.call('HGETALL', KEYS[3]), redis.call('HGET', KEYS[2], 'config') or '{}'}
