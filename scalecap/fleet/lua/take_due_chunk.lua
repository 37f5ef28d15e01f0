--[[ take_due_chunk: hand over retry notes whose time has come, atomically. A finish that queues
  jobs again notes them in `unpublished` due at Redis' now + the retry delay (finish_chunk); no
  worker publishes them with a countdown (Celery would turn it into an ETA by the sender's clock).
  Each note taken here stays noted, due again `hold` seconds later, until its publisher forgets it
  (BatchStore.published): a publisher that dies in between leaves it due again.
  Loaded alone (no lib.lua); times are Redis TIME, never the caller's clock.
  KEYS:
    KEYS[1] unpublished (zset: chunk JSON -> due)
  ARGV:
    [1] hold in seconds   [2] at most this many notes
  Replies:
    the notes taken (retry notes, chunk id ending ':r'); other notes wait for the reconciler's grace
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local taken = {}
local limit = tonumber(ARGV[2])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 10 * limit)) do
  local ok, chunk = pcall(cjson.decode, m)
  if ok and type(chunk) == 'table' and type(chunk.c) == 'string' and string.sub(chunk.c, -2) == ':r' then
    redis.call('ZADD', KEYS[1], string.format('%.3f', now + tonumber(ARGV[1])), m)
    taken[#taken + 1] = m
    if #taken >= limit then break end
  end
end
return taken
