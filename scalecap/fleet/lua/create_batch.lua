--[[ create_batch: create a batch, or reopen it for a resubmission with the same config,
  model and sink. A mismatch writes nothing.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[5] finished (a reopened batch leaves it)   KEYS[11] owners
    KEYS[1..4] lose their TTL when reopened
  ARGV:
    [1] batch id  [2] now  [3] retention (lib.lua)
    [4] config JSON   [5] config hash   [6] model   [7] queue   [8] sink   [9] webhook URL or ''
    [10] '1' for per-job events   [11] owner or ''   [12] the batches index key
    [13] the owner's batches index key (when [11] is set)
  Replies (outcomes.CreateReply):
    {'created'} | {'reopened'} | {'mismatch', field, stored value}
]]
local config, chash, model, queue, sink = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
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
redis.call('HSET', KEYS[1], 'created_at', ARGV[2], 'config', config, 'config_hash', chash,
           'model', model, 'queue', queue, 'sink', sink, 'webhook', ARGV[9],
           'webhook_jobs', ARGV[10], 'owner', ARGV[11], 'total', 0, 'queued', 0, 'running', 0,
           'done', 0, 'failed', 0, 'cancelled', 0, 'dead_lettered', 0, 'stale_results', 0, 'seq', 0)
redis.call('ZADD', ARGV[12], ARGV[2], B)
if ARGV[11] ~= '' then
  redis.call('ZADD', ARGV[13], ARGV[2], B)
  redis.call('HSET', KEYS[11], B, ARGV[11])
end
return {'created'}
