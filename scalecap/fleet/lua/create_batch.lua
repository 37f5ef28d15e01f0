--[[ create_batch: create a batch, or reopen it for a resubmission with the same config,
  model and sink. A mismatch writes nothing.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[5] finished (a reopened batch leaves it)   KEYS[11] owners
    KEYS[1..4] lose their TTL when reopened
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3] config JSON   [4] config hash   [5] model   [6] queue   [7] sink   [8] webhook URL or ''
    [9] '1' for per-job events   [10] owner or ''   [11] the batches index key
    [12] the owner's batches index key (when [10] is set)
  Replies (outcomes.CreateReply):
    {'created'} | {'reopened'} | {'mismatch', field, stored value}
]]
local config, chash, model, queue, sink = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local h = redis.call('HMGET', KEYS[1], 'created_at', 'config_hash', 'model', 'sink', 'queue')
if h[1] then
  if h[2] ~= chash then return {'mismatch', 'config', h[2]} end
  if h[3] ~= model then return {'mismatch', 'model', h[3]} end
  if h[4] ~= sink then return {'mismatch', 'sink', h[4]} end
  redis.call('HDEL', KEYS[1], 'closed', 'finished_at')
  redis.call('ZREM', KEYS[5], B)
  set_retention(0)
  return {'reopened'}
end
redis.call('HSET', KEYS[1], 'created_at', NOWS, 'config', config, 'config_hash', chash,
           'model', model, 'queue', queue, 'sink', sink, 'webhook', ARGV[8],
           'webhook_jobs', ARGV[9], 'owner', ARGV[10], 'total', 0, 'queued', 0, 'running', 0,
           'done', 0, 'failed', 0, 'cancelled', 0, 'dead_lettered', 0, 'stale_results', 0, 'seq', 0)
redis.call('ZADD', ARGV[11], NOWS, B)
if ARGV[10] ~= '' then
  redis.call('ZADD', ARGV[12], NOWS, B)
  redis.call('HSET', KEYS[11], B, ARGV[10])
end
return {'created'}
