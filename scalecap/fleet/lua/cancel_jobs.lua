--[[ cancel_jobs: mark the batch cancelled; count these of its jobs cancelled where still queued.
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash              KEYS[3] job states
    KEYS[5] finished (try_finish)   KEYS[6] outbox (job.completed, batch.completed)
    KEYS[10] the queue's queued-images counter   KEYS[1..4] get their TTL if this finished it
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3..] job ids
  Replies:
    the number of jobs cancelled; -1 when the batch does not exist
    (close_batch finishes a batch that this leaves with every job final)
]]
if not redis.call('HGET', KEYS[1], 'created_at') then return -1 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
local webhook_jobs = redis.call('HGET', KEYS[1], 'webhook_jobs') == '1'
local n = 0
for i = 3, #ARGV do
  local j = ARGV[i]
  local job = load_job(j)
  if job and job.s == 'queued' then
    job.s = 'cancelled'
    save_job(j, job)
    move('queued', 'cancelled'); move('_queue', nil)
    if webhook_jobs then push_event('job.completed', j) end
    n = n + 1
  end
end
apply_moves()
if n > 0 then try_finish() end
return n
