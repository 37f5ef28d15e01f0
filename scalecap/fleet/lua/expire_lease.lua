--[[ expire_lease: a lease ran out (its worker died or hung): requeue its jobs that still hold
  its token into the quarantine lane. A job that was already running alone there is charged
  the lost attempt (and dead-lettered at max attempts).
  KEYS (of the 11 every script receives, lib.lua):
    KEYS[1] batch hash   KEYS[3] job states   KEYS[5] finished   KEYS[6] outbox
    KEYS[7] dead letters   KEYS[8] leases   KEYS[9] unpublished   KEYS[10] queued-images counter
  ARGV:
    [1] batch id  [2] retention (lib.lua; now is Redis' TIME)
    [3] attempt token   [4] lease member   [5] max attempts   [6] quarantine queue   [7..] job ids
  Replies (outcomes.LeaseReply):
    {'live', ''} when the lease is not past its deadline by Redis' clock (renewed meanwhile, or
    the caller's clock runs ahead): nothing changes; else
    {'expired', the unpublished member of the jobs sent to the quarantine lane or ''}
  Events: job.completed per job dead-lettered (webhook_jobs), batch.completed if that finished it.
]]
local token, max_attempts = ARGV[3], tonumber(ARGV[5])
local due = redis.call('ZSCORE', KEYS[8], ARGV[4])
if due and tonumber(due) > NOW then return {'live', ''} end
if not batch_exists() then  -- purged: nothing to take back, nothing to write
  redis.call('ZREM', KEYS[8], ARGV[4])
  return {'expired', ''}
end
local webhook_jobs = redis.call('HGET', KEYS[1], 'webhook_jobs') == '1'
local lost, ended = {}, false
for i = 7, #ARGV do
  local j = ARGV[i]
  local job = load_job(j)
  if job and job.s == 'running' and job.t == token then
    job.t = nil; job.d = nil
    if job.q == 1 then job.a = (job.a or 0) + 1 end
    if job.a >= max_attempts then
      move('running', 'failed')
      dead_letter(j, job, {stage = 'queue', type = 'WorkerLost',
        message = 'the worker was lost ' .. job.a .. ' time(s) while running this job alone'},
        webhook_jobs)
      ended = true
    else
      job.q = 1; job.s = 'queued'
      save_job(j, job)
      move('running', 'queued'); move(nil, '_queue')
      lost[#lost + 1] = {j, job.r}
    end
  end
end
apply_moves()
redis.call('ZREM', KEYS[8], ARGV[4])
local member = ''
if #lost > 0 then
  member = cjson.encode({c = token .. ':x', b = B, q = ARGV[6], jobs = lost})
  redis.call('ZADD', KEYS[9], NOWS, member)
end
if ended then try_finish() end
return {'expired', member}
