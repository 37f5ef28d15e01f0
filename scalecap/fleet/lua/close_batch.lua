--[[ close_batch: close submission; finishes the batch if every job is final.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[5] finished   KEYS[6] outbox   KEYS[1..4] get their TTL
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
  Replies (outcomes.BatchReply):
    'completed' (this call finished the batch), 'ok', 'missing'
  Events: batch.completed if that finished the batch.
]]
if not redis.call('HGET', KEYS[1], 'created_at') then return 'missing' end
redis.call('HSET', KEYS[1], 'closed', '1', 'closed_at', NOWS)
if try_finish() then return 'completed' end
return 'ok'
