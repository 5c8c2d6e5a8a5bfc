-- cache_unlock.lua: release a fill lock this request holds, without storing.
--
-- KEYS[1]  the fill lock
-- ARGV[1]  this request's lock token
-- ARGV[2]  pass_ms: > 0 marks the key uncacheable ("pass") for that long, so concurrent and
--          later misses go upstream at once instead of waiting for a fill that never comes
-- Reply    1 released, 0 the lock was not this request's (expired, or taken over)

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local pass_ms = tonumber(ARGV[2]) or 0
if pass_ms > 0 then
  redis.call('SET', KEYS[1], 'pass', 'PX', pass_ms)
else
  redis.call('DEL', KEYS[1])
end
return 1
