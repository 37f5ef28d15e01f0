--[[ open_session: open submission session S on batch B, BEFORE create_batch, so a concurrent
  session of the same batch that closes meanwhile sees this one open and does not finish it.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash
  ARGV (lib.lua's leading ones, then these four, read from the end so either layout works):
    [n-3] session id  [n-2] scope JSON ('' fleet-wide; stored only when this session creates the
    batch)  [n-1] timeout in seconds (deadline = Redis TIME + timeout)  [n] the sessions zset
    ('B S' -> deadline; one Redis, like the record index keys)
  Writes: batch fields session:<id>, sessions (open count), scope (new batch). A batch cancelled
  before it held any job (an upload that failed at once) loses its cancel: it may be retried.
  Replies:
    'opened', 'open' (already open: a resent call)
]]
local n = #ARGV
local S, SCOPE, TIMEOUT, SESSIONS = ARGV[n - 3], ARGV[n - 2], tonumber(ARGV[n - 1]), ARGV[n]
if redis.call('HSETNX', KEYS[1], 'session:' .. S, '1') == 0 then return 'open' end
redis.call('HINCRBY', KEYS[1], 'sessions', 1)
local h = redis.call('HMGET', KEYS[1], 'created_at', 'cancel_requested', 'total')
if not h[1] then
  if SCOPE ~= '' then redis.call('HSETNX', KEYS[1], 'scope', SCOPE) end
elseif h[2] == '1' and tonumber(h[3] or '0') == 0 then
  redis.call('HDEL', KEYS[1], 'cancel_requested')  -- cancelled empty (a failed upload): usable again
end
local t = redis.call('TIME')
redis.call('ZADD', SESSIONS, tonumber(t[1]) + TIMEOUT, B .. ' ' .. S)
return 'opened'
