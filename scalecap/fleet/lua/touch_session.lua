--[[ touch_session: keep session S of batch B alive (deadline = Redis TIME + timeout).
  KEYS (of the 11 every script receives, lib.lua): none
  ARGV (lib.lua's leading ones, then these three, read from the end):
    [n-2] session id  [n-1] timeout in seconds  [n] the sessions zset ('B S' -> deadline)
  Replies:
    'ok', 'gone' (closed meanwhile, e.g. by the reconciler: the producer must stop)
]]
local n = #ARGV
local member, TIMEOUT, SESSIONS = B .. ' ' .. ARGV[n - 2], tonumber(ARGV[n - 1]), ARGV[n]
if not redis.call('ZSCORE', SESSIONS, member) then return 'gone' end
local t = redis.call('TIME')
redis.call('ZADD', SESSIONS, tonumber(t[1]) + TIMEOUT, member)
return 'ok'
