--[[ close_session: close session S of batch B. When it was the last open one, submission is
  closed (closed=1) and the batch finishes here if every job is final (try_finish: its
  batch.completed event and its retention TTL in this same script). A session that did not end
  'ok' on a batch with no job at all cancels the batch.
  KEYS (the 11 every script receives, lib.lua, then one of its own):
    KEYS[1] batch hash   KEYS[12] sessions (zset: 'B S' -> deadline)   try_finish: KEYS[1..6]
  ARGV:
    [4] session id  [5] how it ended: 'ok' | 'failed' (the producer gave up) | 'abandoned' (the
    reconciler, past its deadline)  [6] '1': only if its deadline (Redis TIME) has passed
  Replies:
    'completed', 'ok' (closed, not finished), 'open' (other sessions remain), 'alive' (deadline
    not passed), 'dropped' (the batch was never created: the session's fields are deleted),
    'gone' (not open: closed already, a resent call)
  Events: batch.completed if that finished the batch.
]]
local S, how = ARGV[4], ARGV[5]
local member = B .. ' ' .. S
if ARGV[6] == '1' then
  local deadline = redis.call('ZSCORE', KEYS[12], member)
  if deadline and tonumber(deadline) > tonumber(redis.call('TIME')[1]) then return 'alive' end
end
redis.call('ZREM', KEYS[12], member)
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
  redis.call('HSET', KEYS[1], 'closed', '1', 'closed_at', ARGV[2])
end
if try_finish() then return 'completed' end
return 'ok'
