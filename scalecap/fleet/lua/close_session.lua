--[[ close_session: close session S of batch B. When it was the last open one, submission is
  closed (closed=1) and the batch finishes here if every job is final (try_finish: its
  batch.completed event and its retention TTL in this same script). A session that did not end
  'ok' on a batch with no job at all cancels the batch.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   try_finish: KEYS[1..6]
  ARGV (lib.lua's leading ones, then these four, read from the end):
    [n-3] session id  [n-2] how it ended: 'ok' | 'failed' (the producer gave up) | 'abandoned'
    (the reconciler, past its deadline)  [n-1] '1': only if its deadline (Redis TIME) has passed
    [n] the sessions zset ('B S' -> deadline)
  Replies:
    'completed', 'ok' (closed, not finished), 'open' (other sessions remain), 'alive' (deadline
    not passed), 'dropped' (the batch was never created: the session's fields are deleted),
    'gone' (not open: closed already, a resent call)
  Events: batch.completed if that finished the batch.
]]
local n = #ARGV
local S, how, due_only, SESSIONS = ARGV[n - 3], ARGV[n - 2], ARGV[n - 1] == '1', ARGV[n]
local member = B .. ' ' .. S
local t = redis.call('TIME')
if due_only then
  local deadline = redis.call('ZSCORE', SESSIONS, member)
  if deadline and tonumber(deadline) > tonumber(t[1]) then return 'alive' end
end
redis.call('ZREM', SESSIONS, member)
if redis.call('HDEL', KEYS[1], 'session:' .. S) == 0 then return 'gone' end
if redis.call('HINCRBY', KEYS[1], 'sessions', -1) > 0 then return 'open' end
redis.call('HSET', KEYS[1], 'sessions', 0)
if not redis.call('HGET', KEYS[1], 'created_at') then
  redis.call('DEL', KEYS[1])  -- the batch was never created: only this session's fields were there
  return 'dropped'
end
if redis.call('HGET', KEYS[1], 'closed') ~= '1' then  -- closed already: a refused resubmission
  if how ~= 'ok' and tonumber(redis.call('HGET', KEYS[1], 'total') or '0') == 0 then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  end
  local closed_at = string.format('%.3f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
  redis.call('HSET', KEYS[1], 'closed', '1', 'closed_at', closed_at)
end
if try_finish() then return 'completed' end
return 'ok'
