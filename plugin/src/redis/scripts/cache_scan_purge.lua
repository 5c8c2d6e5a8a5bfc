-- cache_scan_purge.lua: one step of a pattern purge: SCAN a batch of entry keys and delete those
-- whose URL matches. Called again with the returned cursor until it is "0". Pattern purges are
-- the one place the cache scans the keyspace; they never run on a request's path.
--
-- KEYS     the purge mark of the route scanned (see cache_purge.lua), set at each step
-- ARGV[1]  the SCAN cursor ("0" to start)
-- ARGV[2]  SCAN MATCH pattern of the route's entry keys ("<prefix>c:{<route>}:e:*", escaped):
--          they share the mark's slot, so on Redis Cluster the script runs where they are
-- ARGV[3]  SCAN COUNT
-- ARGV[4]  an anchored Lua pattern an entry's URL (its u field) must match
-- Reply    { next_cursor, deleted }

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, mark in ipairs(KEYS) do
  redis.call('SET', mark, string.format('%.0f', now), 'PX', 3600000)
end

local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local deleted = 0
for _, key in ipairs(r[2]) do
  local ok, u = pcall(redis.call, 'HGET', key, 'u')
  if ok and type(u) == 'string' and string.find(u, ARGV[4]) then
    deleted = deleted + redis.call('DEL', key)
  end
end
return { r[1], deleted }
