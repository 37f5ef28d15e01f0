-- Close submission; returns 'completed' when that finished the batch, 'ok', or 'missing'.
if not redis.call('HGET', KEYS[1], 'created_at') then return 'missing' end
redis.call('HSET', KEYS[1], 'closed', '1', 'closed_at', ARGV[2])
if try_finish() then return 'completed' end
return 'ok'
