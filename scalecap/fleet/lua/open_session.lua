--[[ open_session: open submission session S on batch B, BEFORE create_batch, so a concurrent
  session of the same batch that closes meanwhile sees this one open and does not finish it.
  KEYS (the 11 every script receives, lib.lua, then one of its own):
    KEYS[1] batch hash   KEYS[12] sessions (zset: 'B S' -> deadline, Redis time)
  ARGV:
    [4] session id  [5] scope JSON ('' fleet-wide; stored only when this session creates the batch)
    [6] timeout in seconds (the deadline is Redis TIME + timeout)
  Writes: batch fields session:<id>, sessions (open count), scope (new batch). A batch cancelled
  before it held any job (an upload that failed at once) loses its cancel: it may be retried.
  Replies:
    'opened', 'open' (already open: a resent call)
]]
local S = ARGV[4]
if redis.call('HSETNX', KEYS[1], 'session:' .. S, '1') == 0 then return 'open' end
redis.call('HINCRBY', KEYS[1], 'sessions', 1)
local h = redis.call('HMGET', KEYS[1], 'created_at', 'cancel_requested', 'total')
if not h[1] then
  if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[1], 'scope', ARGV[5]) end
elseif h[2] == '1' and tonumber(h[3] or '0') == 0 then
  redis.call('HDEL', KEYS[1], 'cancel_requested')  -- cancelled empty (a failed upload): usable again
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[12], tonumber(t[1]) + tonumber(ARGV[6]), B .. ' ' .. S)
return 'opened'
