--[[ touch_session: keep session S of batch B alive (deadline = Redis TIME + timeout).
  KEYS (the 11 every script receives, lib.lua, then one of its own):
    KEYS[12] sessions (zset: 'B S' -> deadline)
  ARGV:
    [4] session id  [6] timeout in seconds ([5] unused)
  Replies:
    'ok', 'gone' (closed meanwhile, e.g. by the reconciler: the producer must stop)
]]
local member = B .. ' ' .. ARGV[4]
if not redis.call('ZSCORE', KEYS[12], member) then return 'gone' end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[12], tonumber(t[1]) + tonumber(ARGV[6]), member)
return 'ok'
