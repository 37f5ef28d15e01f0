-- Admit a submission against a key's quota, atomically (producer/api/quota.py).
-- KEYS[1] the key's active set (batch ids that may hold queued images)
-- KEYS[2] the key's reservations hash: batch id -> "images reserved:time reserved"
-- ARGV: max images, wanted (-1: a stream, take all the room left), batch id, key prefix,
--       seconds a reservation for a batch that never appeared is kept
-- In use = for each active batch, queued + running + the reserved images not yet registered
-- (reserved - total, until the batch closes). Returns {admitted, in_use}: admitted is the
-- images reserved for ARGV[3] (0 and nothing written when there is no room, or not room for all).
local max, wanted, batch, prefix, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local now = tonumber(redis.call('TIME')[1])
local in_use = 0
for _, b in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HMGET', prefix .. 'batch:' .. b, 'created_at', 'finished_at', 'closed', 'queued',
                       'running', 'total')
  local res = redis.call('HGET', KEYS[2], b)
  local reserved, at = 0, now
  if res then
    local sep = string.find(res, ':', 1, true)
    reserved, at = tonumber(string.sub(res, 1, sep - 1)), tonumber(string.sub(res, sep + 1))
  end
  if h[2] or (not h[1] and (not res or now - at > grace)) then
    redis.call('SREM', KEYS[1], b)            -- finished, or gone (expired, never created)
    redis.call('HDEL', KEYS[2], b)
  else
    local pending = 0
    if not h[3] then pending = math.max(0, reserved - (tonumber(h[6]) or 0)) end
    in_use = in_use + (tonumber(h[4]) or 0) + (tonumber(h[5]) or 0) + pending
  end
end
local room = math.max(0, max - in_use)
if wanted == 0 then return {0, in_use} end
local take = wanted
if wanted < 0 then take = room end
if take > room or room == 0 then return {0, in_use} end
redis.call('SADD', KEYS[1], batch)
local prev = redis.call('HGET', KEYS[2], batch)
local before = 0
if prev then before = tonumber(string.sub(prev, 1, string.find(prev, ':', 1, true) - 1)) end
redis.call('HSET', KEYS[2], batch, tostring(before + take) .. ':' .. tostring(now))
return {take, in_use}
