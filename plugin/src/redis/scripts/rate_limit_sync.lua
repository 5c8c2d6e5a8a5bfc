-- rate_limit_sync.lua: one VM's count for one limit's window, added to the shared count
-- (rate limits with `sync`: the VM decides locally and reconciles every interval).
--
-- KEYS[1]  the shared counter of one limit in one aligned window
-- ARGV[1]  units this VM admitted in that window since its last sync (integer >= 0)
-- ARGV[2]  the window in milliseconds: the counter lives two windows
-- Reply    { count, now_ms }
--            count   the window's count over every VM, this VM's units included
--            now_ms  Redis TIME in milliseconds (every VM aligns its windows on it)

local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[1]) > 0 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
end
local t = redis.call('TIME')
return { count, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) }
