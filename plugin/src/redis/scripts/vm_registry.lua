-- vm_registry.lua: how many VMs decide rate limits against this Redis, for failure_mode local
-- (during an outage each VM's bucket admits its share of a limit, not all of it).
--
-- KEYS[1]  a sorted set: one member per VM, scored with when its registration lapses (ms)
-- ARGV[1]  this VM's member id
-- ARGV[2]  how long a registration lasts, in ms
-- ARGV[3]  "1": this VM decides requests, register it; "0": it does not, take it out
-- Reply    the number of registered VMs, lapsed ones removed

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2]) or 0

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' and ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  -- The set lives as long as its longest registration: its expiry is only ever raised.
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
