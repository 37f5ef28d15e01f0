--[[ settle_event: remove a handed-over webhook event from the pending set and, for a retry,
  put its next attempt in its place, due after a delay. Loaded alone (no lib.lua); Redis TIME.
  KEYS:
    KEYS[1] pending (zset: event JSON -> due time)
  ARGV:
    [1] the event JSON as handed over  [2] the next attempt's JSON ('' when settled for good)
    [3] delay in seconds before the next attempt is due
  Replies:
    1, or 0 when the event was not pending (another delivery of it settled it first; the retry
    is then not scheduled twice)
]]
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] ~= '' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3]), ARGV[2])
end
return 1
