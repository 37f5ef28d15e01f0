--[[ take_event: hand one webhook event over to a delivery task, atomically. It moves into the
  pending set with a lease, so it is due again unless its task settles it (settle_event) first.
  Loaded alone (no lib.lua); times are Redis TIME, never the caller's clock.
  KEYS:
    KEYS[1] outbox (list, RPUSHed by the transitions)   KEYS[2] pending (zset: event JSON -> due)
  ARGV:
    [1] 'new' (the oldest outbox event) | 'due' (a pending event whose time has come: a retry, or
    a hand-over whose task was lost)  [2] lease in seconds
  Replies:
    the event JSON, or false when there is none
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ev
if ARGV[1] == 'new' then
  ev = redis.call('LPOP', KEYS[1])
else
  ev = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1)[1]
end
if not ev then return false end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ev)
return ev
