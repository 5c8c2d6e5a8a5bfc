-- cache_store.lua: store one response and index it, in one atomic step; release the fill lock
-- when this request holds it.
--
-- KEYS[1]  the entry (hash, see cache_lookup.lua)
-- KEYS[2]  its fill lock
-- KEYS[3]  the route's purge mark: Redis time (ms) of its last purge
-- KEYS[4..] index sets the entry joins: the route's, its path's, its URL's, one per tag.
--          Every key shares the route's hash tag.
-- ARGV[1]  v, the encoded response
-- ARGV[2]  fresh_ms   freshness lifetime, counted from the response's generation
-- ARGV[3]  swr_ms     stale-while-revalidate window after it
-- ARGV[4]  sie_ms     stale-if-error window after it
-- ARGV[5]  age_ms     the response's age when it arrived (its Age field)
-- ARGV[6]  the entry's URL (matched by pattern purges)
-- ARGV[7]  the entry's member name in the index sets (its key hash)
-- ARGV[8]  this request's lock token ("" when it holds none)
-- ARGV[9]  Redis time (ms) of the lookup that sent this request upstream ("0": unknown)
-- Reply    how long Redis keeps the entry, in ms; 0: already too old, nothing stored;
--          -1: the route was purged after the lookup, so the response may predate the purge
--          and is not stored
--
-- The entry lives fresh + max(swr, sie) from its generation; each index set lives as long as
-- the longest-lived entry it lists (PTTL only ever raised).

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local fresh = tonumber(ARGV[2]) or 0
local swr = tonumber(ARGV[3]) or 0
local sie = tonumber(ARGV[4]) or 0
local age = tonumber(ARGV[5]) or 0
local keep = fresh + math.max(swr, sie) - age

if ARGV[8] ~= '' and redis.call('GET', KEYS[2]) == ARGV[8] then
  redis.call('DEL', KEYS[2])
end
if keep <= 0 then
  return 0
end
local looked_up = tonumber(ARGV[9]) or 0
local purged = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
if looked_up > 0 and purged >= looked_up then
  return -1
end

local function fmt(x)
  return string.format('%.0f', x)
end

redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', fmt(now - age), 'f', fmt(fresh), 'w', fmt(swr),
  'e', fmt(sie), 'u', ARGV[6])
redis.call('PEXPIRE', KEYS[1], fmt(keep))
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[7])
  if redis.call('PTTL', KEYS[i]) < keep then
    redis.call('PEXPIRE', KEYS[i], fmt(keep))
  end
end
return keep
