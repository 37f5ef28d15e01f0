-- Mark the batch cancelled and count these of its jobs cancelled where still queued.
-- ARGV[4..]: job ids. Returns the number cancelled. (close_batch finishes the batch.)
if not redis.call('HGET', KEYS[1], 'created_at') then return -1 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
local webhook_jobs = redis.call('HGET', KEYS[1], 'webhook_jobs') == '1'
local n = 0
for i = 4, #ARGV do
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
