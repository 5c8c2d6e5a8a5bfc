-- events_flush.lua: writes one batch of request events (transport redis_call, whose hosts
-- forward exactly one command per call, so the batch's PUBLISH/XADD run inside one script).
-- Each command runs under pcall: one refused command does not stop the others, and the caller
-- learns what each one got, so it sends again only the commands that failed.
--
-- KEYS[1]: the stream key of the batch's events that go to a stream (absent when none do)
-- ARGV[1]: MAXLEN of that stream (approximate trimming, `MAXLEN ~`); "0" when there is none
-- ARGV[2..]: one triple per event: channel ("" = no PUBLISH), "1" to XADD it / "0", event JSON
-- Reply: one element per command run, in order (per event: its PUBLISH, then its XADD), as a
--        pipeline of the same commands would answer: the command's reply or its error reply.

local maxlen = ARGV[1]
local replies = {}

for i = 2, #ARGV - 2, 3 do
  local channel, to_stream, event = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if channel ~= '' then
    replies[#replies + 1] = redis.pcall('PUBLISH', channel, event)
  end
  if to_stream == '1' then
    replies[#replies + 1] = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'event', event)
  end
end

return replies
