-- cache_purge.lua: delete every entry an index set lists (a tag, a URL, a path, a route), then
-- the set itself. No keyspace scan: the set names the entries.
--
-- KEYS[1]  the index set
-- KEYS[2]  the route's purge mark, set to Redis time (ms): fills that looked up before it are
--          not stored (their response may predate this purge)
-- ARGV[1]  the entry key prefix of its route ("<prefix>c:{<route>}:e:", the same hash tag);
--          each member is appended to it
-- Reply    the number of entries deleted

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Kept longer than any fill can take (a fill lock lasts at most 10 minutes).
redis.call('SET', KEYS[2], string.format('%.0f', now), 'PX', 3600000)

local members = redis.call('SMEMBERS', KEYS[1])
local deleted = 0
local batch = {}
for _, m in ipairs(members) do
  batch[#batch + 1] = ARGV[1] .. m
  if #batch == 256 then
    deleted = deleted + redis.call('DEL', unpack(batch))
    batch = {}
  end
end
if #batch > 0 then
  deleted = deleted + redis.call('DEL', unpack(batch))
end
redis.call('DEL', KEYS[1])
return deleted
