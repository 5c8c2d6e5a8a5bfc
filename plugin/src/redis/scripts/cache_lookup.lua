-- cache_lookup.lua: read one cache entry and, on a miss or a stale entry, try to take its fill
-- lock, in one atomic step (the request waits for one round trip at most).
--
-- KEYS[1]  the entry: a hash with v (encoded response), t (stored at, ms), f (fresh ms),
--          w (stale-while-revalidate ms), e (stale-if-error ms), u (URL)
-- KEYS[2]  its fill lock: a request's token, or "pass" while the key is known uncacheable.
--          Both keys share the route's hash tag.
-- ARGV[1]  version tag that every readable v starts with ("KRC1")
-- ARGV[2]  lock time in ms; 0 turns coalescing off (no lock is taken)
-- ARGV[3]  this request's lock token
-- Reply    { state, age_ms, v, lock, fresh_ms, swr_ms, sie_ms, corrupt, now_ms }
--            state    "hit" fresh | "stale" within stale-while-revalidate | "expired" past it
--                     (v is still returned, for stale-if-error) | "miss" no entry
--            age_ms   the entry's age by Redis' clock (0 on a miss)
--            v        the encoded response; false (nil) on a miss
--            lock     1 taken by this request, 0 held by another, -1 not tried (a fresh hit,
--                     coalescing off, or Redis refused the lock: out of memory), -2 the key is
--                     marked uncacheable ("pass")
--            corrupt  1 when an unreadable entry (wrong type, missing fields, another version
--                     tag) was found: it has been deleted and this is a miss
--            now_ms   Redis' clock: a fill passes it to the store, which refuses the response
--                     when the route was purged after this lookup
--
-- Time is Redis TIME, so every gateway on this Redis computes the same age.
--
-- Out of memory (maxmemory with noeviction), Redis refuses the lock's SET: the lookup still
-- answers (-1, as with coalescing off) instead of failing, so hits and stale entries are still
-- served and a miss goes upstream at once. No shebang flags: the script writes (the lock, the
-- deletion of an unreadable entry), so `no-writes` does not fit, and a flagged script that is not
-- `allow-oom` is refused whole under OOM, fresh hits included; without flags Redis refuses only
-- the first write that would use memory, which the pcall below absorbs.

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function try_lock()
  local lock_ms = tonumber(ARGV[2]) or 0
  if lock_ms <= 0 then
    return -1
  end
  local taken = redis.pcall('SET', KEYS[2], ARGV[3], 'NX', 'PX', lock_ms)
  if type(taken) == 'table' and taken.err then
    return -1
  end
  if taken then
    return 1
  end
  if redis.call('GET', KEYS[2]) == 'pass' then
    return -2
  end
  return 0
end

local corrupt = 0
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'hash' then
  local f = redis.call('HMGET', KEYS[1], 'v', 't', 'f', 'w', 'e')
  local v = f[1]
  local at, fresh, swr, sie = tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
  if v and at and fresh and swr and sie and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
    local age = now - at
    if age < 0 then
      age = 0
    end
    if age < fresh then
      return { 'hit', age, v, -1, fresh, swr, sie, 0, now }
    end
    local state = 'expired'
    if age < fresh + swr then
      state = 'stale'
    end
    return { state, age, v, try_lock(), fresh, swr, sie, 0, now }
  end
  corrupt = 1
  redis.call('DEL', KEYS[1])
elseif kind ~= 'none' then
  corrupt = 1
  redis.call('DEL', KEYS[1])
end
return { 'miss', 0, false, try_lock(), 0, 0, 0, corrupt, now }
