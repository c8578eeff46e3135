#!lua
-- Reads an entitlement and, when it exists, claims it by bumping the epoch.
-- With ARGV[1] = '1' (a read-back after a write whose outcome is unknown)
-- the epoch is bumped even when nothing is stored, so that the unknown
-- write, should it still arrive, is refused as fenced: what this read
-- returns is then the final word on it.
-- KEYS: 1 epoch, 2 state hash, 3 seats hash (arguments and reply are
-- described in scripts.rs).
-- The shebang makes Redis refuse the whole script up front when it is out of
-- memory, instead of failing at its first write.
local core = redis.call('HGET', KEYS[2], 'core')
if not core then
  if ARGV[1] == '1' then
    return {tostring(redis.call('INCR', KEYS[1]))}
  end
  return {redis.call('GET', KEYS[1]) or '0'}
end
local epoch = redis.call('INCR', KEYS[1])
return {tostring(epoch), core, redis.call('HGETALL', KEYS[3]), redis.call('HGET', KEYS[2], 'config')}
