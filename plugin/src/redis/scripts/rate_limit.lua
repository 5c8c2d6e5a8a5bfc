-- rate_limit.lua: decide every limit of one request in one atomic step.
--
-- KEYS[i]  state of limit i. The keys of one request share one hash tag (one Redis Cluster slot).
-- ARGV[1]  n, the number of limits (= #KEYS)
-- ARGV[2 + 4*(i-1) ..] four values per limit i:
--            algorithm  "sliding_log" | "sliding_window" | "fixed_window" | "gcra"
--            limit      requests per window (integer >= 1)
--            window_ms  window length in milliseconds (integer >= 1)
--            burst      gcra: requests admitted at once from idle (integer >= 1); else ignored
-- Reply    { allowed, retry_after_ms, remaining_1, reset_ms_1, over_1, ..., remaining_n, reset_ms_n, over_n }
--            allowed         1 when every limit admits the request: then each consumed one unit.
--                            0 otherwise: nothing was consumed (denied requests are free).
--            retry_after_ms  0 when allowed; else when every violated limit admits again
--            remaining_i     units left after this request (when denied: left before it)
--            reset_ms_i      when limit i next gives a unit back (fixed_window: when it resets)
--            over_i          1 when limit i refused this request
--
-- Time is Redis TIME in microseconds, so every gateway on this Redis agrees on the clock.
-- Numbers written to Redis are formatted with %.0f / %.17g: Lua's default %.14g would round
-- microsecond timestamps.

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function fmt(x)
  return string.format('%.0f', x)
end

local function ceil_ms(us)
  if us <= 0 then
    return 0
  end
  return math.ceil(us / 1000)
end

-- Each check returns: ok, available (units before this request), reset_us, retry_us, state
-- where state is what commit needs.

local function sliding_log_check(key, limit, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
  local count = redis.call('ZCARD', key)
  if count < limit then
    local reset = window
    if count > 0 then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      reset = tonumber(oldest[2]) + window - now
    end
    return true, limit - count, reset, 0, nil
  end
  -- One slot frees when the (count - limit + 1)-th oldest entry leaves the window.
  local e = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
  local retry = tonumber(e[2]) + window - now
  if retry < 1 then
    retry = 1
  end
  return false, 0, retry, retry, nil
end

local function sliding_log_commit(key, window)
  -- Members must be unique: move past an equal timestamp (scripts run one at a time).
  local m = now
  while redis.call('ZADD', key, 'NX', fmt(m), fmt(m)) == 0 do
    m = m + 1
  end
  redis.call('PEXPIRE', key, ceil_ms(window) + 1)
end

local function fixed_window_check(key, limit, window)
  -- The guide's semantics: a window starts with the first admitted request and lasts `window`.
  local st = redis.call('HMGET', key, 's', 'c')
  local start, count = now, 0
  if st[1] and st[2] then
    local s = tonumber(st[1])
    if s and now < s + window then
      start = s
      count = tonumber(st[2]) or 0
    end
  end
  local reset = start + window - now
  if count < limit then
    return true, limit - count, reset, 0, { start, count }
  end
  return false, 0, reset, reset, nil
end

local function fixed_window_commit(key, window, state)
  local start, count = state[1], state[2]
  redis.call('HSET', key, 's', fmt(start), 'c', count + 1)
  redis.call('PEXPIRE', key, ceil_ms(start + window - now) + 1)
end

local function sliding_window_check(key, limit, window)
  local idx = math.floor(now / window)
  local elapsed = now - idx * window
  local st = redis.call('HMGET', key, 'w', 'c', 'p')
  local cur, prev = 0, 0
  if st[1] then
    local w = tonumber(st[1])
    if w == idx then
      cur = tonumber(st[2]) or 0
      prev = tonumber(st[3]) or 0
    elseif w == idx - 1 then
      prev = tonumber(st[2]) or 0
    end
  end
  local est = prev * (window - elapsed) / window + cur
  local state = { idx, cur, prev }
  if est + 1 <= limit then
    local reset = window - elapsed
    if prev > 0 and window / prev < reset then
      reset = window / prev
    end
    return true, math.floor(limit - est), reset, 0, state
  end
  local retry
  if cur + 1 <= limit then
    -- Wait until the previous window's weight has dropped enough in this window.
    local e = window * (1 - (limit - cur - 1) / prev)
    retry = e - elapsed
  else
    -- Wait for the next window, where this window's count is the weighted previous one.
    local e = window * (1 - (limit - 1) / cur)
    retry = (window - elapsed) + e
  end
  retry = math.ceil(retry)
  if retry < 1 then
    retry = 1
  end
  return false, 0, retry, retry, nil
end

local function sliding_window_commit(key, window, state)
  local idx, cur, prev = state[1], state[2], state[3]
  redis.call('HSET', key, 'w', fmt(idx), 'c', cur + 1, 'p', prev)
  redis.call('PEXPIRE', key, ceil_ms(2 * window) + 1)
end

local function gcra_check(key, limit, window, burst)
  local interval = window / limit
  local tolerance = burst * interval
  local tat = tonumber(redis.call('GET', key) or '') or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if now >= allow_at then
    local available = math.floor((now - allow_at) / interval) + 1
    local reset = allow_at + available * interval - now
    return true, available, reset, 0, new_tat
  end
  local retry = math.ceil(allow_at - now)
  return false, 0, retry, retry, nil
end

local function gcra_commit(key, new_tat)
  redis.call('SET', key, string.format('%.17g', new_tat), 'PX', ceil_ms(new_tat - now) + 1)
end

local n = tonumber(ARGV[1])
local checks = {}
local allowed = true
local retry_after = 0

for i = 1, n do
  local base = 2 + 4 * (i - 1)
  local algorithm = ARGV[base]
  local limit = tonumber(ARGV[base + 1])
  local window = tonumber(ARGV[base + 2]) * 1000
  local burst = tonumber(ARGV[base + 3]) or limit
  local key = KEYS[i]
  local ok, available, reset, retry, state
  if algorithm == 'sliding_log' then
    ok, available, reset, retry, state = sliding_log_check(key, limit, window)
  elseif algorithm == 'fixed_window' then
    ok, available, reset, retry, state = fixed_window_check(key, limit, window)
  elseif algorithm == 'sliding_window' then
    ok, available, reset, retry, state = sliding_window_check(key, limit, window)
  elseif algorithm == 'gcra' then
    ok, available, reset, retry, state = gcra_check(key, limit, window, burst)
  else
    return redis.error_reply('ERR krowoc rate_limit: unknown algorithm ' .. tostring(algorithm))
  end
  checks[i] = { algorithm, key, window, ok, available, reset, state }
  if not ok then
    allowed = false
    if retry > retry_after then
      retry_after = retry
    end
  end
end

local reply = { allowed and 1 or 0, ceil_ms(retry_after) }
for i = 1, n do
  local c = checks[i]
  local algorithm, key, window, ok, available, reset, state = c[1], c[2], c[3], c[4], c[5], c[6], c[7]
  local remaining = available
  if allowed then
    remaining = available - 1
    if algorithm == 'sliding_log' then
      sliding_log_commit(key, window)
    elseif algorithm == 'fixed_window' then
      fixed_window_commit(key, window, state)
    elseif algorithm == 'sliding_window' then
      sliding_window_commit(key, window, state)
    else
      gcra_commit(key, state)
    end
  end
  if remaining < 0 then
    remaining = 0
  end
  reply[#reply + 1] = math.floor(remaining)
  reply[#reply + 1] = ceil_ms(reset)
  reply[#reply + 1] = ok and 0 or 1
end
return reply
