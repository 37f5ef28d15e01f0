-- Keep submission session ARGV[4] of batch B alive: its deadline becomes Redis TIME + ARGV[6].
-- KEYS: 1 batch hash (the 11 shared keys, lib.lua), 12 sessions (zset: 'B S' -> deadline).
-- ARGV: 4 session id, 6 timeout in seconds (ARGV[5] unused).
-- Returns 'ok' | 'gone' (closed meanwhile, e.g. by the reconciler: the producer must stop).
local member = B .. ' ' .. ARGV[4]
if not redis.call('ZSCORE', KEYS[12], member) then return 'gone' end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[12], tonumber(t[1]) + tonumber(ARGV[6]), member)
return 'ok'
