-- events_flush.lua: writes one batch of request events (transport redis_call, whose hosts
-- forward exactly one command per call, so the batch's PUBLISH/XADD run inside one script).
-- Each command runs under pcall: one refused event does not stop the others.
--
-- KEYS[1]: the stream key of the batch's events that go to a stream (absent when none do)
-- ARGV[1]: MAXLEN of that stream (approximate trimming, `MAXLEN ~`); "0" when there is none
-- ARGV[2..]: one triple per event: channel ("" = no PUBLISH), "1" to XADD it / "0", event JSON
-- Reply: {written, refused, first error ("" when none)}; an event counts as written when
--        every command for it succeeded.

local maxlen = ARGV[1]
local written, refused, first_error = 0, 0, ''

local function ok(reply)
  if type(reply) == 'table' and reply.err then
    if first_error == '' then first_error = reply.err end
    return false
  end
  return true
end

for i = 2, #ARGV - 2, 3 do
  local channel, to_stream, event = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local good = true
  if channel ~= '' then
    good = ok(redis.pcall('PUBLISH', channel, event)) and good
  end
  if to_stream == '1' then
    good = ok(redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'event', event)) and good
  end
  if good then written = written + 1 else refused = refused + 1 end
end

return {written, refused, first_error}
